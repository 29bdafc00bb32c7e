"""Task evaluations of a model on the fixed test sets: one function per task, one entry point
(`evaluate_task`) that writes the shared result record and the TensorBoard scalars."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.config import Config, ConfigError
from mtp_jax.model.transformer import MTP
from mtp_jax.tasks import induction, polynomial
from mtp_jax.tasks.metrics import answer_scores, induction_counts

BATCH = 32
LENGTH_MULTIPLE = 64  # padded lengths are rounded up to this, so few shapes compile


def _scores(mtp: MTP, params: Any, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(argmax of every head (N, B, T), head 1's loss on the next token (B, T))."""
    logits_NBTV = mtp.forward(params, tokens_BT)
    next_BT = jnp.concatenate([tokens_BT[:, 1:], tokens_BT[:, -1:]], axis=1)
    logp_BTV = jax.nn.log_softmax(logits_NBTV[0], axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, next_BT[..., None], axis=-1)[..., 0]
    return jnp.argmax(logits_NBTV, axis=-1), nll_BT


@functools.lru_cache(maxsize=4)
def _scorer(mtp: MTP) -> Callable:
    """One jitted scorer per model, so evaluations during training do not recompile."""
    return jax.jit(functools.partial(_scores, mtp))


def predictions(mtp: MTP, params: Any, seqs: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pred_NT, nll_T) per sequence, batched and right-padded (causal: padding never reaches them)."""
    score = _scorer(mtp)
    length = -(-max(len(s) for s in seqs) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    for start in range(0, len(seqs), BATCH):
        chunk = seqs[start:start + BATCH]
        tokens_BT = np.zeros((BATCH, length), np.int32)
        for row, seq in zip(tokens_BT, chunk):
            row[: len(seq)] = seq
        pred_NBT, nll_BT = jax.device_get(score(params, tokens_BT))
        for b, seq in enumerate(chunk):
            yield pred_NBT[:, b, : len(seq)], nll_BT[b, : len(seq)]


def _bytes_only(tokenizer: Any, task: str) -> None:
    if tokenizer.name != "bytes":
        raise ConfigError(f"--task {task} needs a run trained with data.tokenizer=bytes; this run's is {tokenizer.name}")


def eval_induction(cfg: Config, mtp: MTP, params: Any, tokenizer: Any) -> tuple[dict[str, float], dict]:
    """Accuracy on names' second (and first) tokens at their repeated occurrences, test stories
    cut to the training context (train.seq_len), as the model saw stories in training."""
    _bytes_only(tokenizer, "induction")
    stories = induction.test_set(cfg.data.task_test_examples)
    seqs = [np.asarray(tokenizer.encode(s.text), np.int32)[: cfg.train.seq_len] for s in stories]
    totals = {"repeats": 0, "second": 0, "first": 0, "second_head_2": 0}
    for story, seq, (pred_NT, _) in zip(stories, seqs, predictions(mtp, params, seqs)):
        repeats = [offset for offset, _ in induction.repeated(story.spans) if offset + 1 < len(seq)]
        counts = induction_counts(pred_NT, seq, repeats)
        totals = {k: totals[k] + counts[k] for k in totals}
    n = max(totals["repeats"], 1)
    metrics = {"second_token_accuracy": totals["second"] / n, "first_token_accuracy": totals["first"] / n}
    if cfg.model.mtp_heads >= 2:
        metrics["second_token_accuracy/head_2"] = totals["second_head_2"] / n
    return metrics, {"stories": len(stories), **totals}


def eval_polynomial(cfg: Config, mtp: MTP, params: Any, tokenizer: Any) -> tuple[dict[str, float], dict]:
    """Per m: greedy exact match, per-coefficient accuracy and answer-token loss on the test set."""
    _bytes_only(tokenizer, "polynomial")
    tests = polynomial.test_set(cfg.data.task_test_examples, cfg.data.task_test_ops)
    metrics: dict[str, float] = {}
    for m, examples in tests.items():
        seqs = [np.asarray(tokenizer.encode(ex.text), np.int32) for ex in examples]
        exact, coef, loss = [], [], []
        for ex, seq, (pred_NT, nll_T) in zip(examples, seqs, predictions(mtp, params, seqs)):
            e, c, l = answer_scores(pred_NT[0], nll_T, seq, len(ex.prompt), polynomial.DEG)
            exact.append(e), coef.append(c), loss.append(l)
        metrics[f"exact_match/m_{m}"] = float(np.mean(exact))
        metrics[f"coefficient_accuracy/m_{m}"] = float(np.mean(coef))
        metrics[f"answer_loss/m_{m}"] = float(np.mean(loss))
    ranges = {"in_domain": range(1, cfg.data.task_train_ops + 1),
              "out_of_domain": range(cfg.data.task_train_ops + 1, cfg.data.task_test_ops + 1)}
    for name, ms in ranges.items():
        for key in ("exact_match", "coefficient_accuracy", "answer_loss"):
            if len(ms):
                metrics[f"{key}/{name}"] = float(np.mean([metrics[f"{key}/m_{m}"] for m in ms]))
    return metrics, {"examples_per_m": cfg.data.task_test_examples, "train_ops": cfg.data.task_train_ops}


TASKS: dict[str, Callable[..., tuple[dict[str, float], dict]]] = {
    "induction": eval_induction,
    "polynomial": eval_polynomial,
}


def evaluate_task(task: str, cfg: Config, mtp: MTP, params: Any, tokenizer: Any, run_dir: str | Path, step: int) -> dict:
    """Runs one task's evaluation and writes RUN_DIR/evals/<task>/step_N.json and TensorBoard scalars."""
    from mtp_jax.evals.results import make_record, write_result

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    metrics, details = TASKS[task](cfg, mtp, params, tokenizer)
    record = make_record(task, step, metrics, details)
    write_result(run_dir, record)
    if cfg.train.tensorboard:
        from tensorboardX import SummaryWriter

        with SummaryWriter(str(Path(run_dir) / "tensorboard")) as tb:
            for key, value in metrics.items():
                tb.add_scalar(f"{task}/{key}", value, step)
    return record


def evaluate_run_task(run_dir: str | Path, task: str, step: int | None = None) -> dict:
    """`mtp-eval RUN_DIR --task induction|polynomial`: the run's newest (or given) checkpoint."""
    from mtp_jax.run import restore_run

    run = restore_run(run_dir, step)
    return evaluate_task(task, run.built.cfg, run.built.mtp, run.params, run.tokenizer, run_dir, run.step)
