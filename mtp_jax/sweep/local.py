"""Runs a sweep's points one after another on this machine, resumably.

A point is finished when its run directory holds training's final evaluation (eval.json) at the
point's last step; finished points are skipped. Any other point is (re)started with mtp-train,
which resumes from the point's newest checkpoint. Each point trains in a subprocess (its own
memory, its own compile cache), so a failed point is recorded and the sweep goes on.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TextIO

from mtp_jax.atomic import write_atomic
from mtp_jax.errors import UserError
from mtp_jax.sweep.experiment import Experiment, Point

OWNER_FILE = "sweep.json"  # which experiment a results directory belongs to
FAILED_FILE = "sweep_failed.json"
LOG_FILE = "train.log"
LOCK_FILE = ".sweep.lock"
STOP = threading.Event()  # set by SIGTERM: the current point is checkpointed, no further point starts


def claim_results_dir(experiment: Experiment) -> None:
    """Marks results_dir as this experiment's, or refuses one that belongs to another experiment."""
    owner = experiment.results_dir / OWNER_FILE
    if owner.is_file():
        name = json.loads(owner.read_text()).get("name")
        if name != experiment.name:
            raise UserError(f"results_dir '{experiment.results_dir}' belongs to experiment '{name}', not "
                            f"'{experiment.name}'; set another results_dir in {experiment.path}")
        return
    experiment.results_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(owner, json.dumps({"name": experiment.name, "experiment": str(experiment.path)}, indent=2))


def _die_with_parent() -> None:
    """In the trainer before exec: SIGTERM when the sweep driver dies however it dies (kill -9 too), so no orphan
    finishes a point the rerun has marked failed; the trainer saves its step on SIGTERM as on preemption."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def status(experiment: Experiment, point: Point) -> str:
    """'done', 'failed' (the last attempt exited non-zero), or 'pending'."""
    run_dir = Path(point.overrides["train.run_dir"])
    final = run_dir / "eval.json"
    if final.is_file():
        try:
            if json.loads(final.read_text()).get("step") == experiment.config(point).train.steps:
                return "done"
        except json.JSONDecodeError:
            pass
    return "failed" if (run_dir / FAILED_FILE).is_file() else "pending"


def train_command() -> list[str]:
    """MTP_TRAIN_CMD as in launch/ (split on spaces), else this interpreter's mtp-train."""
    return shlex.split(os.environ.get("MTP_TRAIN_CMD", "")) or [sys.executable, "-m", "mtp_jax.cli", "train"]


def try_lock(point: Point) -> IO | None:
    """An exclusive lock on the point's run directory, or None if another sweep process trains it
    (the lock dies with its process, so a killed sweep never leaves a point locked)."""
    run_dir = Path(point.overrides["train.run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def run_point(experiment: Experiment, point: Point) -> tuple[int, float]:
    """(exit status, seconds) of training one point; its output goes to RUN_DIR/train.log."""
    run_dir = Path(point.overrides["train.run_dir"])
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    # Points of the same shape (e.g. seeds) compile the same programs: share JAX's persistent cache.
    env = {"JAX_COMPILATION_CACHE_DIR": str(experiment.results_dir / "jax_cache"), **os.environ}
    start = time.monotonic()
    with open(run_dir / LOG_FILE, "a") as log:
        child = subprocess.Popen([*train_command(), str(experiment.base), *point.args()], stdout=log, stderr=log, env=env,
                                 preexec_fn=_die_with_parent)
        # SIGTERM (a preempted sweep driver) goes on to mtp-train, which saves a checkpoint and exits.
        previous = signal.signal(signal.SIGTERM, lambda *_: (STOP.set(), child.send_signal(signal.SIGTERM)))
        try:
            code = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if code != 0:
        write_atomic(run_dir / FAILED_FILE, json.dumps({"returncode": code, "log": str(run_dir / LOG_FILE)}))
    return code, time.monotonic() - start


def _summary(point: Point) -> str:
    from mtp_jax.evals.results import latest_results

    parts = []
    for task, record in sorted(latest_results(point.overrides["train.run_dir"]).items()):
        key = {"heldout": "loss/head_1", "induction": "second_token_accuracy",
               "polynomial": "exact_match/in_domain"}.get(task)
        if key in record["metrics"]:
            parts.append(f"{task} {key} {record['metrics'][key]:.4f}")
    return ", ".join(parts)


def run_local(experiment: Experiment, out: TextIO | None = None) -> int:
    """Runs every unfinished point not being trained by another sweep process (several may share
    a grid); returns the number of failed points."""
    out = out or sys.stdout
    claim_results_dir(experiment)
    failed = busy = 0
    total = len(experiment.points)
    for point in experiment.points:
        head = f"[{point.index + 1}/{total}] {point.name}:"
        if status(experiment, point) == "done":
            print(f"{head} finished earlier, skipped", file=out, flush=True)
            continue
        lock = try_lock(point)
        if lock is None:
            print(f"{head} being trained by another sweep process, skipped", file=out, flush=True)
            busy += 1
            continue
        print(f"{head} training ...", file=out, flush=True)
        with lock:
            code, seconds = run_point(experiment, point)
        if STOP.is_set():
            print(f"{head} stopped by SIGTERM after {seconds:.0f} s; run the sweep again to resume", file=out, flush=True)
            return failed
        if code == 0 and status(experiment, point) == "done":
            print(f"{head} done in {seconds:.0f} s; {_summary(point)}", file=out, flush=True)
        else:
            failed += 1
            log = Path(point.overrides["train.run_dir"]) / LOG_FILE
            print(f"{head} FAILED (exit {code}) after {seconds:.0f} s; see {log}", file=out, flush=True)
    print(f"sweep {experiment.name}: {total - failed - busy} of {total} points finished, {failed} failed, "
          f"{busy} trained by other processes", file=out, flush=True)
    return failed
