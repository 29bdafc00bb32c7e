"""Held-out evaluation: per-head loss, perplexity, bits per byte and top-1 accuracy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np


def evaluate(eval_step: Callable, params: Any, batches: Iterable[Any], n_heads: int, bytes_per_token: float) -> dict:
    """Mean of per-batch metrics (batches are full windows, so batch means weigh tokens about equally)."""
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        metrics = jax.device_get(eval_step(params, batch))
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(np.asarray(value))
        count += 1
    if count == 0:
        raise ValueError("no evaluation batches")
    mean = {k: v / count for k, v in sums.items()}
    losses = {i: mean[f"loss/head_{i}"] for i in range(1, n_heads + 1)}
    heads = [{"head": i, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
              "bits_per_byte": loss / math.log(2) / bytes_per_token, "accuracy": mean[f"accuracy/head_{i}"]}
             for i, loss in losses.items()]
    return {"loss": mean["loss"], "heads": heads, "batches": count}


def format_table(result: dict, unigram: float | None = None) -> str:
    """A plain-text table of held-out metrics per head, against the unigram baseline."""
    lines = [f"{'head':>4}  {'predicts':>8}  {'loss':>8}  {'ppl':>9}  {'bits/byte':>9}  {'top-1':>6}"]
    for h in result["heads"]:
        lines.append(
            f"{h['head']:>4}  {'t+' + str(h['head']):>8}  {h['loss']:8.4f}  {h['perplexity']:9.2f}  "
            f"{h['bits_per_byte']:9.4f}  {h['accuracy']:6.3f}"
        )
    if unigram is not None:
        lines.append(f"{'unigram baseline (nats/token)':>34}  {unigram:8.4f}")
    return "\n".join(lines)


def flat_metrics(result: dict) -> dict[str, float]:
    """The held-out result as flat metrics for tables and plots: loss, then per head loss,
    bits per byte and accuracy, and the unigram baseline."""
    out = {"loss": result["loss"], "unigram_baseline": result["unigram_baseline"]}
    for h in result["heads"]:
        for key in ("loss", "bits_per_byte", "accuracy"):
            out[f"{key}/head_{h['head']}"] = h[key]
    return out


def heldout_report(
    cfg: Any, eval_step: Callable, params: Any, tokenizer: Any, data_dir: Path, run_dir: Path, step: int,
    final: bool = False, place: Callable[[dict], Any] = lambda b: b, process: tuple[int, int] = (0, 1),
) -> dict:
    """Evaluates the held-out split of the prepared store in `data_dir` (`build.dataset_folder`, resolved by
    the caller), adds the unigram baseline, prints the table and writes the result record to
    RUN_DIR/evals/heldout/step_<step>.json (and, for training's `final` evaluation, eval.json)."""
    from mtp_jax.data import pipeline, store
    from mtp_jax.evals.results import make_record, write_json_atomic, write_result

    batches = pipeline.make_eval_batches(cfg, tokenizer, data_dir, cfg.train.eval_batches, *process)
    stats = store.corpus_stats(data_dir, tokenizer.vocab_size)
    result = evaluate(eval_step, params, (place(b) for b in batches), cfg.model.mtp_heads, stats["val_bytes_per_token"])
    result["unigram_baseline"] = stats["unigram_baseline"]
    result["step"] = step
    record = make_record("heldout", step, flat_metrics(result), result)
    if process[0] == 0:
        write_result(run_dir, record)
        if final:
            write_json_atomic(run_dir / "eval.json", record)
        print(format_table(result, result["unigram_baseline"]), flush=True)
    return result
