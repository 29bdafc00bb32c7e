"""An attention implementation the platform cannot run is refused through the real command like
every other config error: one `error:` line, exit status 2, and the run directory never created."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_failures import QUICKSTART, command

from mtp_jax.errors import EXIT_USER


@pytest.mark.parametrize("attention,needs", [("cudnn", "GPU"), ("splash", "TPU")])
def test_unrunnable_attention_is_refused_before_the_run_directory_is_written(attention: str, needs: str,
                                                                            tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = command("train", QUICKSTART, f"model.attention={attention}", f"train.run_dir={run_dir}")  # on CPU
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == EXIT_USER and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"error: model.attention='{attention}' needs a {needs}"), lines
    assert not run_dir.exists()
