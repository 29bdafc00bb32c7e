"""Ctrl-C at every pause point inside an asynchronous save, through the real trainer: each cut leaves the committed
step or nothing, every committed step restores, and each run resumes the last one. A committed step damaged later
(what a cleanup racing Orbax's rename once left) is skipped by the resume with one line naming it."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_interrupts import RUN, leftovers, paused_trainer
from test_train import checkpoint_steps, finish, mtp_train

# (pause point, release the writer after Ctrl-C?, the committed steps allowed afterwards)
CUTS = [
    ("save_begin:2", False, [[]]),  # before Orbax starts: nothing
    ("save:2", False, [[2]]),  # the write is in flight: it commits within the settle time
    ("save_commit:4", False, [[2]]),  # the writer is held before its rename: step 4 must not appear
    ("save_commit:4", True, [[2], [2, 4]]),  # the writer renames while the trainer tidies up
    ("save:6", False, [[2, 4], [2, 4, 6]]),  # the final forced save
]


def restorable(run_dir: Path, step: int) -> bool:
    """An independent read of every array of a committed step (Orbax directly, not the Checkpointer)."""
    try:
        state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
    except Exception:  # noqa: BLE001 - any failure means the step does not restore
        return False
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


@pytest.mark.slow
def test_ctrl_c_at_every_save_pause_point_leaves_committed_or_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for i, (where, release, allowed) in enumerate(CUTS):
        marker = tmp_path / f"at{i}"
        proc = paused_trainer(run_dir, where, marker)
        proc.send_signal(2)
        if release:
            marker.unlink()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err, (where, err[-3000:])
        assert err.splitlines()[-1] == "error: interrupted", (where, err[-3000:])
        steps = checkpoint_steps(run_dir)
        assert steps in allowed, (where, steps)
        assert all(restorable(run_dir, s) for s in steps), (where, steps)
        assert all(".orbax-checkpoint-tmp" in name for name in leftovers(run_dir)), leftovers(run_dir)
    # A committed step that lost files (its metadata and a shard): the resume names it in one line, falls back.
    newest = max(checkpoint_steps(run_dir))
    broken = run_dir / "checkpoints" / str(newest)
    (broken / "state" / "_METADATA").unlink()
    code, _, err = finish(mtp_train(run_dir, *RUN))
    assert code == 0, err[-3000:]
    named = [line for line in err.splitlines() if f"checkpoint step {newest} is unreadable" in line]
    assert len(named) == 1 and named[0].startswith("warning:"), err[-3000:]
    assert "Traceback" not in err and checkpoint_steps(run_dir)[-1] == 6 and restorable(run_dir, 6)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]
