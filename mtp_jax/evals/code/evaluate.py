"""Sampling, execution and scoring of a code benchmark: n completions per problem and temperature,
each run in the sandbox, pass@k at the best temperature per k (the paper's protocol).

Every sample is appended to `RUN_DIR/evals/<task>/step_<step>.samples-<settings>.jsonl` (problem,
temperature, completion, status) as soon as its batch has run, so an interrupted evaluation
continues where it stopped: a (problem, temperature) unit with n samples on file is not redone.
The settings hash in the name covers everything that changes a sample (n, top-p, max new tokens,
speculative K, seed), so other flags never mix with these; temperatures and --limit may change.
The aggregate is an `evals/results.py` record at `step_<step>.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Protocol, Sequence

from mtp_jax.data.tokenizer import completion_text, encode_prompt
from mtp_jax.decode.generate import Sampling
from mtp_jax.errors import UserError
from mtp_jax.evals.code import benchmarks
from mtp_jax.evals.code.passk import bootstrap_ci, per_problem
from mtp_jax.evals.code.sandbox import Sandbox
from mtp_jax.evals.results import make_record, result_path, write_result


class Decoder(Protocol):
    """What sampling needs from a model: completions (token ids) for token prompts."""

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling, seed: int,
                 stop_tokens: Sequence[int]) -> list[list[int]]: ...


@dataclasses.dataclass(frozen=True)
class Settings:
    task: str
    samples: int = 10  # the paper's 200 takes hours on a CPU; pass@100 needs --samples >= 100
    temperatures: tuple[float, ...] = (0.2, 0.8)
    ks: tuple[int, ...] = (1, 10, 100)
    top_p: float = 0.95
    max_new_tokens: int = 0  # 0 = the benchmark's default
    speculative: int = 0
    seed: int = 0
    limit: int | None = None
    rows: int = 32  # sequences per generate call (whole problems: at least n)

    def check(self) -> None:
        if self.samples < 1:
            raise UserError(f"--samples {self.samples} must be >= 1")
        if not self.temperatures or not self.ks or min(self.ks) < 1:
            raise UserError(f"--temperature {self.temperatures} and --k {self.ks} need at least one value; k >= 1")
        for t in self.temperatures:
            Sampling(t, 0, self.top_p).check()
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit} must be >= 1 (the number of problems to evaluate)")
        if self.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be >= 1 (or 0 for the benchmark's default)")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or benchmarks.DEFAULT_MAX_NEW_TOKENS[self.task]

    def samples_at(self, temperature: float) -> int:
        return 1 if temperature == 0 else self.samples  # greedy samples are all the same

    def fingerprint(self) -> str:
        key = dict(task=self.task, samples=self.samples, top_p=self.top_p, max_new_tokens=self.new_tokens,
                   speculative=self.speculative, seed=self.seed)
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def samples_path(run_dir: str | Path, settings: Settings, step: int) -> Path:
    result = result_path(run_dir, settings.task, step)
    return result.with_name(f"{result.stem}.samples-{settings.fingerprint()}.jsonl")


def read_samples(path: Path) -> dict[tuple[str, float], list[dict]]:
    """(task id, temperature) -> its samples on file; a line cut by a kill is skipped."""
    units: dict[tuple[str, float], list[dict]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            units.setdefault((row["task_id"], row["temperature"]), []).append(row)
    return units


def decoder_calls(problems: int, n: int, rows: int) -> int:
    """Decoding calls `sample_units` makes for `problems` problems of n samples each: batches of
    max(1, rows // n) problems, each batch's n x problems sequences in calls of at most `rows`."""
    per_batch = max(1, rows // n)
    return sum(-(-min(per_batch, problems - start) * n // rows) for start in range(0, problems, per_batch))


def estimated_seconds(call_s: float, todo: dict[float, int], settings: Settings) -> float:
    """Time left for the problems `todo` at each temperature, at `call_s` seconds per decoding call
    (decoding plus running the programs), each call a full batch of `settings.rows` sequences."""
    return call_s * sum(decoder_calls(p, settings.samples_at(t), settings.rows) for t, p in todo.items())


def estimate_line(call_s: float, todo: dict[float, int], settings: Settings) -> str:
    hours = estimated_seconds(call_s, todo, settings) / 3600
    return (f"estimated time left: about {hours:.1f} h (an estimate: {call_s:.1f} s per call of {settings.rows} "
            f"sequences, timed on the first batch after compilation)")


def sample_units(problems: Sequence[benchmarks.Problem], settings: Settings, decoder: Decoder, tokenizer,
                 sandbox: Sandbox, path: Path, progress: Callable[[int], None] = lambda n: None,
                 report: Callable[[str], None] = lambda line: None) -> dict:
    """Generates, runs and records every unit not on file yet; returns all units' samples.
    `report` gets the estimated time left once the second batch (the first after compilation) ran."""
    done = {unit: rows[-settings.samples_at(unit[1]):] for unit, rows in read_samples(path).items()
            if len(rows) >= settings.samples_at(unit[1])}
    todo = {t: sum((p.task_id, t) not in done for p in problems) for t in settings.temperatures}
    batches = 0
    for t in settings.temperatures:
        pending = [p for p in problems if (p.task_id, t) not in done]
        progress(sum(settings.samples_at(t) for p in problems if (p.task_id, t) in done))
        per_call = max(1, settings.rows // settings.samples_at(t))
        for start in range(0, len(pending), per_call):
            batch = pending[start : start + per_call]
            began = time.perf_counter()
            rows = run_batch(batch, t, settings, decoder, tokenizer, sandbox)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
                f.flush()
                os.fsync(f.fileno())
            for row in rows:
                done.setdefault((row["task_id"], t), []).append(row)
            progress(len(rows))
            todo[t] -= len(batch)
            batches += 1
            if batches == 2 and any(todo.values()):
                calls = decoder_calls(len(batch), settings.samples_at(t), settings.rows)
                report(estimate_line((time.perf_counter() - began) / calls, todo, settings))
    return done


def run_batch(batch: Sequence[benchmarks.Problem], temperature: float, settings: Settings, decoder: Decoder,
              tokenizer, sandbox: Sandbox) -> list[dict]:
    """n completions for each problem of the batch, cut at the stop strings, run in the sandbox."""
    n = settings.samples_at(temperature)
    prompts = [encode_prompt(tokenizer, p.prompt) for p in batch for _ in range(n)]
    seed = zlib.crc32(json.dumps([settings.seed, temperature, [p.task_id for p in batch]]).encode())
    outputs = decoder(prompts, settings.new_tokens, Sampling(temperature, 0, settings.top_p), seed, [tokenizer.eot_id])
    problems = [p for p in batch for _ in range(n)]
    completions = [benchmarks.cut(completion_text(tokenizer, ids, out), p.stops)
                   for p, ids, out in zip(problems, prompts, outputs)]
    outcomes = sandbox.run_many([p.program(c) for p, c in zip(problems, completions)])
    return [dict(task_id=p.task_id, temperature=temperature, sample=i % n, completion=c, status=o.status,
                 error_type=o.error_type, new_tokens=len(out))
            for i, (p, c, o, out) in enumerate(zip(problems, completions, outcomes, outputs))]


def score(problems: Sequence[benchmarks.Problem], units: dict, settings: Settings) -> tuple[dict, dict]:
    """(metrics, details): pass@k per temperature, the best temperature per k with its 90% CI,
    per-problem pass counts, and how the samples failed."""
    metrics: dict[str, float] = {}
    table: dict[str, dict] = {}
    per_problem_counts: dict[str, dict] = {p.task_id: {} for p in problems}
    for t in settings.temperatures:
        rows = [units[(p.task_id, t)] for p in problems]
        ns = [len(r) for r in rows]
        cs = [sum(s["status"] == "pass" for s in r) for r in rows]
        for p, n, c in zip(problems, ns, cs):
            per_problem_counts[p.task_id][str(t)] = {"n": n, "passed": c}
        entry: dict[str, object] = {"statuses": dict(Counter(s["status"] for r in rows for s in r)),
                                    "errors": dict(Counter(s["error_type"] for r in rows for s in r if s["error_type"]).most_common(10))}
        for k in (k for k in settings.ks if k <= min(ns)):
            values = per_problem(ns, cs, k)
            low, high = bootstrap_ci(values)
            entry[f"pass@{k}"] = {"value": float(values.mean()), "ci90": [low, high]}
            metrics[f"pass@{k}/t{t:g}"] = float(values.mean())
        table[f"{t:g}"] = entry
    best_temperature = {}
    for k in settings.ks:
        scored = [(table[f"{t:g}"][f"pass@{k}"]["value"], t) for t in settings.temperatures if f"pass@{k}" in table[f"{t:g}"]]
        if not scored:
            continue
        value, t = max(scored, key=lambda vt: (vt[0], -vt[1]))
        low, high = table[f"{t:g}"][f"pass@{k}"]["ci90"]
        metrics.update({f"pass@{k}": value, f"pass@{k}/ci90_low": low, f"pass@{k}/ci90_high": high,
                        f"pass@{k}/temperature": t})
        best_temperature[f"pass@{k}"] = t
    details = {"problems": len(problems), "per_temperature": table, "best_temperature": best_temperature,
               "per_problem": per_problem_counts}
    return metrics, details


def evaluate(run_dir: str | Path, step: int, settings: Settings, decoder: Decoder, tokenizer, sandbox: Sandbox,
             progress: Callable[[int], None] = lambda n: None, report: Callable[[str], None] = lambda line: None) -> dict:
    """Samples, runs and scores; writes and returns the evaluation record (`report`: the time estimate)."""
    settings.check()
    problems = benchmarks.load(settings.task, settings.limit)
    if not any(k <= settings.samples_at(t) for k in settings.ks for t in settings.temperatures):
        raise UserError(f"every --k {settings.ks} exceeds --samples {settings.samples}; use k <= samples")
    path = samples_path(run_dir, settings, step)
    units = sample_units(problems, settings, decoder, tokenizer, sandbox, path, progress, report)
    metrics, details = score(problems, units, settings)
    details.update(settings=dataclasses.asdict(settings) | {"max_new_tokens": settings.new_tokens},
                   samples_file=path.name, sandbox=sandbox.describe(), stop_strings=list(problems[0].stops))
    record = make_record(settings.task, step, metrics, details)
    write_result(run_dir, record)
    return record
