"""Test hooks: named points where a test can stop a real process deterministically.

`pause_point("save", step)` does nothing unless MTP_PAUSE_AT names this point (`save` or
`save:12`); then it creates the file MTP_PAUSE_FILE (so the test knows the process is there) and
sleeps until a signal ends or interrupts it, or until the test deletes that file (then it goes on:
a test changes the world there, e.g. lowers the file-size limit to fill the "disk"). Tests send
Ctrl-C or kill -9 at start-up, mid-step or mid-save this way instead of guessing with timers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_point(name: str, step: int | None = None) -> None:
    wanted = os.environ.get("MTP_PAUSE_AT")
    if not wanted or wanted not in (name, f"{name}:{step}"):
        return
    marker = os.environ.get("MTP_PAUSE_FILE")
    if marker:
        Path(marker).write_text(f"{name}:{step}\n")
    while not marker or Path(marker).exists():
        time.sleep(0.05)
