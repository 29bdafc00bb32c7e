"""`mtp-eval RUN_DIR --task humaneval|mbpp`: pass@k of a run's newest checkpoint.

`add_arguments` puts the flags on mtp-eval's parser and `run_task` runs one evaluation, so the
command-line module only routes. Flags are checked before the checkpoint loads.
"""

from __future__ import annotations

import argparse
import functools
from typing import Sequence

from mtp_jax.errors import UserError

TASKS = ("humaneval", "mbpp")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    group = ap.add_argument_group("code tasks (--task humaneval|mbpp)")
    group.add_argument("--samples", type=int, default=10, help="samples per problem and temperature (paper: 200)")
    group.add_argument("--temperature", default="0.2,0.8", help="temperature grid, comma-separated (0 = greedy)")
    group.add_argument("--k", default="1,10,100", help="pass@k values, comma-separated (k <= samples)")
    group.add_argument("--top-p", type=float, default=0.95)
    group.add_argument("--limit", type=int, default=None, help="only the first P problems")
    group.add_argument("--max-new-tokens", type=int, default=0, help="0 = the benchmark's default (256)")
    group.add_argument("--speculative", type=int, default=0, metavar="K", help="self-speculative decoding with heads 1..K")
    group.add_argument("--rows", type=int, default=32, help="sequences per decoding call")
    group.add_argument("--workers", type=int, default=0, help="programs run at once (0 = every core)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--sandbox-python", default=None, help="interpreter the programs run with (default: the first "
                       "of this Python, its base and /usr/bin/python3 that the sandbox's unprivileged user can start)")


def numbers(flag: str, text: str, kind: type) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated {kind.__name__}s, e.g. {flag} 1,10") from None


def settings_from(args: argparse.Namespace):
    from mtp_jax.evals.code.evaluate import Settings

    settings = Settings(task=args.task, samples=args.samples, temperatures=numbers("--temperature", args.temperature, float),
                        ks=numbers("--k", args.k, int), top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        speculative=args.speculative, seed=args.seed, limit=args.limit, rows=args.rows)
    settings.check()
    if args.speculative < 0 or args.workers < 0 or args.rows < 1:
        raise UserError("--speculative and --workers must be >= 0 and --rows >= 1")
    return settings


class ModelDecoder:
    """The KV-cached decoder over a model's parameters (`Decoder`), in fixed shapes so one
    compilation serves many calls: rows padded to `rows`, prompt length to a multiple of
    `bucket` by one extra all-EOT row (its output is dropped)."""

    def __init__(self, mtp, params, speculative: int = 0, rows: int = 32, bucket: int = 128):
        from mtp_jax.decode.generate import generate
        from mtp_jax.decode.speculative import speculative_generate

        self.decode = functools.partial(speculative_generate, k=speculative) if speculative else generate
        self.mtp, self.params, self.rows, self.bucket = mtp, params, rows, bucket

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling, seed: int,
                 stop_tokens: Sequence[int]) -> list[list[int]]:
        eot = stop_tokens[0]
        longest = -(-max(len(p) for p in prompts) // self.bucket) * self.bucket
        filler = [[eot] * longest] * (max(self.rows, len(prompts)) + 1 - len(prompts))
        result = self.decode(self.mtp, self.params, [*prompts, *filler], max_new_tokens=max_new_tokens,
                             sampling=sampling, seed=seed, stop_tokens=stop_tokens)
        return result.completions()[: len(prompts)]


def run_task(args: argparse.Namespace) -> dict:
    """Evaluates the run's newest checkpoint on a code task; prints and returns the record."""
    settings = settings_from(args)
    from tqdm import tqdm

    from mtp_jax.evals.code.evaluate import evaluate
    from mtp_jax.evals.code.sandbox import Sandbox
    from mtp_jax.run import read_config, restore_run

    heads = read_config(args.run_dir).model.mtp_heads
    if args.speculative > heads:
        raise UserError(f"--speculative {args.speculative} exceeds the run's {heads} heads; use 1..{heads}")
    from mtp_jax.evals.code.benchmarks import load

    total = sum(settings.samples_at(t) for t in settings.temperatures) * len(load(settings.task, settings.limit))
    run = restore_run(args.run_dir)
    decoder = ModelDecoder(run.built.mtp, run.params, settings.speculative, settings.rows)
    with Sandbox(workers=args.workers or None, python=args.sandbox_python) as sandbox, tqdm(total=total, desc=settings.task, unit="sample") as bar:
        record = evaluate(args.run_dir, run.step, settings, decoder, run.tokenizer, sandbox, bar.update)
    return record
