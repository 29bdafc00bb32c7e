"""One schema for every evaluation result (held-out loss, synthetic tasks, code benchmarks).

A result is a JSON record written to `RUN_DIR/evals/<task>/step_<step>.json`:

    {"schema": 1, "task": "heldout", "step": 300, "created": "2026-...Z",
     "metrics": {"loss": 5.37, "loss/head_1": ...},   # flat name -> finite float: what tables plot
     "details": {...}}                                 # task-specific (per head, per problem, ...)

The checkpoint step is part of the name, so evaluating an older checkpoint never replaces a newer
result, and the sweep report reads every task of every run the same way (`read_results`).
Writes are atomic (temporary file + rename): a killed evaluation leaves no half file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from mtp_jax.atomic import write_json
from mtp_jax.errors import DivergenceError, UserError

SCHEMA = 1


def result_path(run_dir: str | Path, task: str, step: int) -> Path:
    return Path(run_dir) / "evals" / task / f"step_{step:08d}.json"


def make_record(task: str, step: int, metrics: dict[str, float], details: dict[str, Any] | None = None) -> dict:
    """The record for one evaluation; refuses non-finite metrics (a diverged checkpoint is no result)."""
    if not task or "/" in task:
        raise UserError(f"evaluation task name {task!r} must be a non-empty name without '/'")
    if not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise TypeError(f"metrics must be numbers: {metrics}")
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise DivergenceError(
            f"evaluation '{task}' of step {step} gave non-finite metrics {bad}; the checkpoint holds diverged "
            f"weights: evaluate an earlier step"
        )
    return {
        "schema": SCHEMA,
        "task": task,
        "step": int(step),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "details": details or {},
    }


def write_json_atomic(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)
    return path


def write_result(run_dir: str | Path, record: dict) -> Path:
    """Writes a `make_record` record to its step-named file and returns the path."""
    return write_json_atomic(result_path(run_dir, record["task"], record["step"]), record)


def read_results(run_dir: str | Path, task: str | None = None) -> list[dict]:
    """Every result of a run (or of one task), ordered by task then step; unreadable files are skipped."""
    root = Path(run_dir) / "evals"
    pattern = f"{task}/step_*.json" if task else "*/step_*.json"
    records = []
    for path in sorted(root.glob(pattern)):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("schema") == SCHEMA:
            records.append(record)
    return sorted(records, key=lambda r: (r["task"], r["step"]))


def latest_results(run_dir: str | Path) -> dict[str, dict]:
    """task -> its newest-step record."""
    return {r["task"]: r for r in read_results(run_dir)}
