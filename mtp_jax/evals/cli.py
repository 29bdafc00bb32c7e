"""`mtp-eval RUN_DIR`: the held-out table of a trained run, also written as RUN_DIR/eval.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mtp_jax.evals.heldout import heldout_report
from mtp_jax.run import restore_run


def evaluate_run(run_dir: str | Path, batches: int | None = None) -> dict:
    built, tokenizer, params = restore_run(run_dir)
    cfg = built.cfg
    if batches:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batches=batches))
    return heldout_report(cfg, built.fns.eval_step, params, tokenizer, Path(run_dir))
