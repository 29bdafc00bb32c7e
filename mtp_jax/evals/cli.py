"""`mtp-eval RUN_DIR`: the held-out table of a trained run's newest checkpoint, written as
RUN_DIR/evals/heldout/step_<step>.json (training's own final evaluation, eval.json, is left alone)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mtp_jax.data.build import dataset_folder
from mtp_jax.evals.heldout import heldout_report
from mtp_jax.run import restore_run


def evaluate_run(run_dir: str | Path, batches: int | None = None) -> dict:
    run = restore_run(run_dir)
    cfg = run.built.cfg
    if batches:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batches=batches))
    data_dir = dataset_folder(cfg, run.tokenizer, run_dir)
    return heldout_report(cfg, run.built.fns.eval_step, run.params, run.tokenizer, data_dir, Path(run_dir), run.step)

