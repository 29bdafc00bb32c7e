"""Evaluations of a model on the synthetic tasks' fixed test sets (mtp_jax/tasks/): one function
per task, one entry point (`evaluate_task`) that writes the shared result record and the
TensorBoard scalars."""

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

BATCH_TOKENS = 16384  # rows x padded length per call: short sequences go in wide batches
LENGTH_MULTIPLE = 16  # padded lengths are rounded up to this, so few shapes compile


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


def _batches(lengths: list[int]) -> Iterator[tuple[int, list[int]]]:
    """(padded length, sequence indices) per call: sequences sorted by length, padded to a
    multiple of LENGTH_MULTIPLE, BATCH_TOKENS // length rows a call (one shape per length)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    padded = [-(-lengths[i] // LENGTH_MULTIPLE) * LENGTH_MULTIPLE for i in order]
    start = 0
    while start < len(order):
        length = padded[start]
        rows = max(1, BATCH_TOKENS // length)
        end = start
        while end < len(order) and end - start < rows and padded[end] == length:
            end += 1
        yield length, order[start:end]
        start = end


def predictions(mtp: MTP, params: Any, seqs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pred_NT, nll_T) per sequence, in order; batched by length and right-padded (causal:
    padding never reaches them)."""
    score = _scorer(mtp)
    out: list[Any] = [None] * len(seqs)
    for length, chunk in _batches([len(s) for s in seqs]):
        tokens_BT = np.zeros((max(1, BATCH_TOKENS // length), length), np.int32)
        for row, i in zip(tokens_BT, chunk):
            row[: len(seqs[i])] = seqs[i]
        pred_NBT, nll_BT = jax.device_get(score(params, tokens_BT))
        for b, i in enumerate(chunk):
            out[i] = (pred_NBT[:, b, : len(seqs[i])], nll_BT[b, : len(seqs[i])])
    return out


def greedy_answers(mtp: MTP, params: Any, prompts: list[np.ndarray], answers: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(head 1's greedy answers, head 1's per-token loss on `answers` teacher-forced), answers
    of a fixed length, by whole-sequence passes instead of token-by-token decoding.

    Pass p scores prompt + a guess (first the reference) and takes head 1's argmax at every answer
    position: if the guess's first p - 1 tokens are greedy, the new guess's first p are (each
    argmax sees only earlier tokens). A guess that reproduces itself is the greedy answer, so only
    the others are scored again, and after `length` passes every guess is greedy.
    """
    length = len(answers[0])
    guess = list(answers)
    todo = list(range(len(prompts)))
    losses: list[np.ndarray] = []
    for step in range(length):
        outs = predictions(mtp, params, [np.concatenate([prompts[i], guess[i]]) for i in todo])
        if step == 0:
            losses = [nll_T[len(p) - 1: len(p) - 1 + length] for p, (_, nll_T) in zip(prompts, outs)]
        still = []
        for i, (pred_NT, _) in zip(todo, outs):
            new = pred_NT[0, len(prompts[i]) - 1: len(prompts[i]) - 1 + length].astype(guess[i].dtype)
            if not np.array_equal(new, guess[i]):
                guess[i] = new
                still.append(i)
        todo = still
        if not todo:
            break
    return guess, losses


def _bytes_only(tokenizer: Any, task: str) -> None:
    if tokenizer.name != "bytes":
        raise ConfigError(f"--task {task} needs a run trained with data.tokenizer=bytes; this run's is {tokenizer.name}")


def eval_induction(cfg: Config, mtp: MTP, params: Any, tokenizer: Any, final: bool) -> tuple[dict[str, float], dict]:
    """Accuracy on names' second (and first) tokens at every repeated occurrence of the whole test
    stories (never cut: a train.seq_len below the longest story scores positions unseen in training,
    and the details record both lengths so a table can show it)."""
    _bytes_only(tokenizer, "induction")
    stories = induction.test_set(cfg.data.task_test_examples)
    seqs = [np.asarray(tokenizer.encode(s.text), np.int32) for s in stories]
    totals = {"repeats": 0, "second": 0, "first": 0, "second_head_2": 0}
    for story, seq, (pred_NT, _) in zip(stories, seqs, predictions(mtp, params, seqs)):
        counts = induction_counts(pred_NT, seq, [offset for offset, _ in induction.repeated(story.spans)])
        totals = {k: totals[k] + counts[k] for k in totals}
    n = max(totals["repeats"], 1)
    metrics = {"second_token_accuracy": totals["second"] / n, "first_token_accuracy": totals["first"] / n}
    if cfg.model.mtp_heads >= 2:
        metrics["second_token_accuracy/head_2"] = totals["second_head_2"] / n
    window = {"longest_story_tokens": max(len(s) for s in seqs), "seq_len": cfg.train.seq_len}
    return metrics, {"stories": len(stories), **totals, **window}


def eval_polynomial(cfg: Config, mtp: MTP, params: Any, tokenizer: Any, final: bool) -> tuple[dict[str, float], dict]:
    """Per m: exact match and per-coefficient accuracy of head 1's greedy answer, and its
    teacher-forced loss on the reference answer tokens; every m's expressions in one batched pass.
    Evaluations during training score the in-domain m only (a third of the cost of all ten); the
    final one, and mtp-eval of a finished run, every m."""
    _bytes_only(tokenizer, "polynomial")
    ops = cfg.data.task_test_ops if final else cfg.data.task_train_ops
    examples = [ex for m, group in polynomial.test_set(cfg.data.task_test_examples, cfg.data.task_test_ops).items()
                if m <= ops for ex in group]
    prompts = [np.asarray(tokenizer.encode(ex.prompt), np.int32) for ex in examples]
    references = [np.asarray(tokenizer.encode(ex.answer), np.int32) for ex in examples]
    greedy, losses = greedy_answers(mtp, params, prompts, references)
    scores: dict[int, list[tuple[bool, np.ndarray, float]]] = {}
    for ex, *score in zip(examples, greedy, references, losses):
        scores.setdefault(ex.ops, []).append(answer_scores(*score))
    metrics: dict[str, float] = {}
    for m, rows in scores.items():
        metrics[f"exact_match/m_{m}"] = float(np.mean([exact for exact, _, _ in rows]))
        metrics[f"coefficient_accuracy/m_{m}"] = float(np.mean([correct for _, correct, _ in rows]))
        metrics[f"answer_loss/m_{m}"] = float(np.mean([loss for _, _, loss in rows]))
    ranges = {"in_domain": range(1, cfg.data.task_train_ops + 1),
              "out_of_domain": range(cfg.data.task_train_ops + 1, cfg.data.task_test_ops + 1)}
    for name, ms in ranges.items():
        for key in ("exact_match", "coefficient_accuracy", "answer_loss"):
            if len(ms) and all(m in scores for m in ms):
                metrics[f"{key}/{name}"] = float(np.mean([metrics[f"{key}/m_{m}"] for m in ms]))
    return metrics, {"examples_per_m": cfg.data.task_test_examples, "train_ops": cfg.data.task_train_ops}


TASKS: dict[str, Callable[..., tuple[dict[str, float], dict]]] = {
    "induction": eval_induction,
    "polynomial": eval_polynomial,
}


def evaluate_task(task: str, cfg: Config, mtp: MTP, params: Any, tokenizer: Any, run_dir: str | Path, step: int) -> dict:
    """Runs one task's evaluation (the final one at train.steps) and writes RUN_DIR/evals/<task>/step_N.json and TensorBoard scalars."""
    from mtp_jax.evals.results import make_record, write_result

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    metrics, details = TASKS[task](cfg, mtp, params, tokenizer, step >= cfg.train.steps)
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
