"""Runs a sweep's points one after another on this machine, resumably.

A point is finished when its run directory holds training's final evaluation (eval.json) at the
point's last step; finished points are skipped. Any other point is (re)started with mtp-train,
which resumes from the point's newest checkpoint. Each point trains in a subprocess (its own
memory, its own compile cache), so a failed point is recorded and the sweep goes on.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from mtp_jax.errors import UserError
from mtp_jax.sweep.experiment import Experiment, Point

OWNER_FILE = "sweep.json"  # which experiment a results directory belongs to
FAILED_FILE = "sweep_failed.json"
LOG_FILE = "train.log"


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
    owner.write_text(json.dumps({"name": experiment.name, "experiment": str(experiment.path)}, indent=2))


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


def run_point(experiment: Experiment, point: Point) -> tuple[int, float]:
    """(exit status, seconds) of training one point; its output goes to RUN_DIR/train.log."""
    run_dir = Path(point.overrides["train.run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    # Points of the same shape (e.g. seeds) compile the same programs: share JAX's persistent cache.
    env = {"JAX_COMPILATION_CACHE_DIR": str(experiment.results_dir / "jax_cache"), **os.environ}
    start = time.monotonic()
    with open(run_dir / LOG_FILE, "a") as log:
        code = subprocess.call([*train_command(), str(experiment.base), *point.args()], stdout=log, stderr=log, env=env)
    if code != 0:
        (run_dir / FAILED_FILE).write_text(json.dumps({"returncode": code, "log": str(run_dir / LOG_FILE)}))
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


def parse_shard(shard: str) -> tuple[int, int]:
    i, _, k = shard.partition("/")
    if not (i.isdigit() and k.isdigit() and 0 <= int(i) < int(k)):
        raise UserError(f"--shard {shard!r} must be I/K with 0 <= I < K, e.g. 0/2 and 1/2 for two processes")
    return int(i), int(k)


def run_local(experiment: Experiment, out: TextIO | None = None, shard: str = "0/1") -> int:
    """Runs every unfinished point (of this shard); returns the number of failed points."""
    out = out or sys.stdout
    index, count = parse_shard(shard)
    claim_results_dir(experiment)
    failed = 0
    total = len(experiment.points)
    for point in experiment.points[index::count]:
        head = f"[{point.index + 1}/{total}] {point.name}:"
        if status(experiment, point) == "done":
            print(f"{head} finished earlier, skipped", file=out, flush=True)
            continue
        print(f"{head} training ...", file=out, flush=True)
        code, seconds = run_point(experiment, point)
        if code == 0 and status(experiment, point) == "done":
            print(f"{head} done in {seconds:.0f} s; {_summary(point)}", file=out, flush=True)
        else:
            failed += 1
            log = Path(point.overrides["train.run_dir"]) / LOG_FILE
            print(f"{head} FAILED (exit {code}) after {seconds:.0f} s; see {log}", file=out, flush=True)
    print(f"sweep {experiment.name}: {total - failed} of {total} points finished, {failed} failed", file=out, flush=True)
    return failed
