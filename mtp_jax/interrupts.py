"""Ctrl-C for the long-running commands: status 130, at most one line, never a hang or a crash dump.

The first Ctrl-C raises KeyboardInterrupt in the main thread as usual; the command tidies up (a
trainer deletes its unfinished checkpoint save) and leaves through `exit_interrupted`, which skips
interpreter teardown (tearing down with JAX compiling or Orbax writing in other threads is what
crashed). A main thread stuck in compiled code never sees the KeyboardInterrupt: a watcher thread,
woken by the signal itself, then forces the exit after GRACE_S seconds, and at once on a second Ctrl-C.

SIGTERM while a trainer starts up (`terminate_start_up`, until its first step, where the trainer's own handler
takes over to save that step) ends the start the same way, with its own line and status 143: nothing is saved
yet, and a start that ends early leaves the run directory as it was.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Callable, NoReturn, TypeVar

from mtp_jax.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

Main = TypeVar("Main", bound=Callable[..., int])

GRACE_S = float(os.environ.get("MTP_INTERRUPT_GRACE_S", "5"))  # tests raise it to reach the second Ctrl-C
_said = threading.Lock()
_installed = False


class Terminated(KeyboardInterrupt):
    """SIGTERM during a trainer's start-up: unwinds as a Ctrl-C does (the start is undone), then `exit_for` says so."""


STARTING = threading.Event()  # set by `terminate_start_up`, cleared when the trainer's own SIGTERM handler takes over


def _on_sigterm(signum: int, frame: object) -> None:
    """Ends a start-up; afterwards (a handler put back after training) SIGTERM changes nothing: the run is finishing."""
    if STARTING.is_set():
        raise Terminated


def terminate_start_up() -> None:
    """Until the trainer installs its own handler, SIGTERM raises Terminated: the default action, silent death, is
    what this replaces. Call from the main thread."""
    STARTING.set()
    signal.signal(signal.SIGTERM, _on_sigterm)


def exit_terminated() -> NoReturn:
    exit_now("terminated (SIGTERM) before the first step, so nothing was saved; rerun the same command to start or "
             "resume", EXIT_TERMINATED)


def exit_for(stop: KeyboardInterrupt) -> NoReturn:
    """The one line and status for a Ctrl-C or a start-up SIGTERM."""
    if isinstance(stop, Terminated):
        exit_terminated()
    exit_interrupted()


def exit_interrupted() -> NoReturn:
    """Prints the one line (once, whichever thread gets here first), silences stderr, exits 130."""
    exit_now("interrupted", EXIT_INTERRUPTED)


def exit_now(message: str, status: int) -> NoReturn:
    """`error: message`, then exit without interpreter teardown (which, with JAX or Orbax threads still running or
    failed, prints pages of 'Exception ignored' or crashes)."""
    if _said.acquire(blocking=False):
        print(f"error: {message}", file=sys.stderr, flush=True)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # threads dying with us print nothing more
    os._exit(status)


def install() -> None:
    """Starts the watcher; call once from the main thread before the command's work begins."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    _installed = True
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(reader, writer), name="mtp-ctrl-c", daemon=True).start()


def _watch(reader: socket.socket, writer: socket.socket) -> None:
    seen = 0
    while True:
        for signum in reader.recv(64):
            if signum == signal.SIGTERM and STARTING.is_set():
                threading.Timer(GRACE_S, exit_terminated).start()  # if the main thread is stuck in compiled code
            if signum != signal.SIGINT:
                continue
            seen += 1
            if seen == 1:
                threading.Timer(GRACE_S, exit_interrupted).start()
            else:
                exit_interrupted()


def interruptible(main: Main) -> Main:
    """Runs a command under the watcher; a Ctrl-C its own code did not handle ends it through `exit_interrupted`.
    Put it inside `errors.guarded`, so the KeyboardInterrupt reaches this first."""

    def run(*args, **kwargs) -> int:
        install()
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt as stop:
            exit_for(stop)

    run.__doc__ = main.__doc__
    return run  # type: ignore[return-value]
