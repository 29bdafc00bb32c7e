"""Ctrl-C at start-up, mid-step and mid-save, and SIGTERM at start-up, reached deterministically through the pause
hooks (mtp_jax/hooks.py): status 130 (143), one line, no traceback or crash, no half-written checkpoint left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import ROOT, TINY, checkpoint_steps, finish, mtp_train

from mtp_jax.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
RUN = ["train.steps=6", "train.checkpoint_every=2", "train.tensorboard=false"]


def paused_trainer(run_dir: Path, where: str, marker: Path, *overrides: str, grace_s: str = "5") -> subprocess.Popen:
    """A trainer stopped at pause point `where`; returns once it is there."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MTP_PAUSE_AT": where, "MTP_PAUSE_FILE": str(marker),
           "MTP_INTERRUPT_GRACE_S": grace_s}
    proc = subprocess.Popen([sys.executable, "-m", "mtp_jax.cli", "train", QUICKSTART, *TINY, *RUN,
                             f"train.run_dir={run_dir}", *overrides], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(marker, proc)
    return proc


def wait_for(marker: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-3000:]


def interrupted(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "Exception" not in err
    assert [line for line in err.splitlines() if line.startswith("error")] == ["error: interrupted"]
    assert err.splitlines()[-1] == "error: interrupted"
    return err


def leftovers(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return [p.name for p in folder.iterdir() if not p.name.isdigit()] if folder.is_dir() else []


def test_ctrl_c_at_startup(tmp_path: Path) -> None:
    err = interrupted(paused_trainer(tmp_path / "run", "startup", tmp_path / "at"))
    assert err.strip() == "error: interrupted"
    assert leftovers(tmp_path / "run") == [] and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
def test_ctrl_c_mid_step_keeps_committed_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    interrupted(paused_trainer(run_dir, "step:3", tmp_path / "at", "train.async_checkpoint=false"))
    assert checkpoint_steps(run_dir) == [2] and leftovers(run_dir) == []


@pytest.mark.slow
def test_ctrl_c_mid_save_leaves_nothing_the_resume_trips_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    interrupted(paused_trainer(run_dir, "save:4", tmp_path / "at"))  # the step-4 async save is in flight
    assert leftovers(run_dir) == [] and set(checkpoint_steps(run_dir)) <= {2, 4}
    code, _, err = finish(mtp_train(run_dir, *RUN))
    assert code == 0, err[-3000:]
    assert "unreadable" not in err and checkpoint_steps(run_dir)[-1] == 6


@pytest.mark.slow
def test_second_ctrl_c_forces_exit(tmp_path: Path) -> None:
    """The first Ctrl-C starts the tidy-up, which pauses; only a second Ctrl-C can end it (grace period raised)."""
    run_dir, marker = tmp_path / "run", tmp_path / "at"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MTP_PAUSE_AT": "interrupted", "MTP_PAUSE_FILE": str(marker),
           "MTP_INTERRUPT_GRACE_S": "600"}
    proc = subprocess.Popen([sys.executable, "-m", "mtp_jax.cli", "train", QUICKSTART, *TINY, *RUN, "train.steps=100000",
                             f"train.run_dir={run_dir}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for(run_dir / "config.yaml", proc)  # written inside the trainer's handled region
    proc.send_signal(signal.SIGINT)
    wait_for(marker, proc)
    interrupted(proc)


@pytest.mark.parametrize("where", ["startup", "prepare_part:0"])  # after the lock; inside the data cache's build
def test_sigterm_before_the_first_step_says_so_and_changes_nothing(where: str, tmp_path: Path) -> None:
    """A scheduler's SIGTERM while the trainer starts up: one line, status 143, the (empty) run directory as it was."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = paused_trainer(run_dir, where, tmp_path / "at")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TERMINATED, err[-3000:]
    assert err.strip() == ("error: terminated (SIGTERM) before the first step, so nothing was saved; rerun the same "
                           "command to start or resume")
    assert list(run_dir.iterdir()) == []
