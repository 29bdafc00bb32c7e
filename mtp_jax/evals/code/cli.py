"""`mtp-eval RUN_DIR --task humaneval|mbpp`: pass@k of a run's newest checkpoint.

`add_arguments` puts the flags on mtp-eval's parser and `run_task` runs one evaluation, so the
command-line module only routes. Flags are checked before the checkpoint loads.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence

from mtp_jax.decode.memory import add_dtype_argument
from mtp_jax.errors import UserError

TASKS = ("humaneval", "mbpp")
BUCKET = 128  # prompt lengths are padded to a multiple of this, so few lengths compile


def add_arguments(ap: argparse.ArgumentParser) -> None:
    group = ap.add_argument_group("code tasks (--task humaneval|mbpp)")
    group.add_argument("--samples", type=int, default=10, help="samples per problem and temperature (paper: 200)")
    group.add_argument("--temperature", default="0.2,0.8", help="temperature grid, comma-separated (0 = greedy)")
    group.add_argument("--k", default="1,10,100", help="pass@k values, comma-separated (k <= samples)")
    group.add_argument("--top-p", type=float, default=0.95)
    group.add_argument("--limit", type=int, default=None, help="only the first P problems")
    group.add_argument("--max-new-tokens", type=int, default=0, help="0 = the benchmark's default (256)")
    group.add_argument("--speculative", type=int, default=0, metavar="K", help="self-speculative decoding with heads 1..K")
    group.add_argument("--rows", type=int, default=32, help="sequences per decoding call (the memory plan's batch)")
    group.add_argument("--workers", type=int, default=0, help="programs run at once (0 = every core)")
    group.add_argument("--seed", type=int, default=0)
    add_dtype_argument(group)
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
    compilation serves many calls: at most `rows` sequences per call (more prompts take more
    calls, each with its own seed), padded to `rows` and their prompt length to a multiple of
    `bucket` by one extra all-EOT row (its output is dropped)."""

    def __init__(self, mtp, params, speculative: int = 0, rows: int = 32, bucket: int = BUCKET):
        from mtp_jax.decode.generate import generate
        from mtp_jax.decode.speculative import speculative_generate

        self.decode = functools.partial(speculative_generate, k=speculative) if speculative else generate
        self.mtp, self.params, self.rows, self.bucket = mtp, params, rows, bucket

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling, seed: int,
                 stop_tokens: Sequence[int]) -> list[list[int]]:
        chunks = [prompts[i : i + self.rows] for i in range(0, len(prompts), self.rows)]
        return [out for i, chunk in enumerate(chunks)
                for out in self._call(chunk, max_new_tokens, sampling, seed + i, stop_tokens)]

    def _call(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling, seed: int,
              stop_tokens: Sequence[int]) -> list[list[int]]:
        eot = stop_tokens[0]
        longest = padded_length(max(len(p) for p in prompts), self.bucket)
        filler = [[eot] * longest] * (self.rows + 1 - len(prompts))
        result = self.decode(self.mtp, self.params, [*prompts, *filler], max_new_tokens=max_new_tokens,
                             sampling=sampling, seed=seed, stop_tokens=stop_tokens)
        return result.completions()[: len(prompts)]


def padded_length(prompt_len: int, bucket: int = BUCKET) -> int:
    return -(-prompt_len // bucket) * bucket


def memory_plan(args: argparse.Namespace, settings, tokenizer, heads: int):
    """The memory plan of the longest prompt (padded as `ModelDecoder` pads it) in a full call."""
    from mtp_jax.data.tokenizer import encode_prompt
    from mtp_jax.decode.memory import plan_run
    from mtp_jax.evals.code.benchmarks import load

    longest = max(len(encode_prompt(tokenizer, p.prompt)) for p in load(settings.task, settings.limit))
    prompt_len = padded_length(longest)
    return plan_run(args.run_dir, args.dtype, settings.rows + 1, prompt_len, prompt_len + settings.new_tokens + heads,
                    fix="load with --dtype bfloat16, lower --rows or --max-new-tokens")


def run_task(args: argparse.Namespace) -> dict:
    """Evaluates the run's newest checkpoint on a code task; prints and returns the record."""
    settings = settings_from(args)
    from pathlib import Path

    from tqdm import tqdm

    from mtp_jax.evals.code.evaluate import evaluate
    from mtp_jax.evals.code.sandbox import Sandbox
    from mtp_jax.run import read_config, read_tokenizer, restore_inference

    heads = read_config(args.run_dir).model.mtp_heads
    if args.speculative > heads:
        raise UserError(f"--speculative {args.speculative} exceeds the run's {heads} heads; use 1..{heads}")
    from mtp_jax.evals.code.benchmarks import load

    total = sum(settings.samples_at(t) for t in settings.temperatures) * len(load(settings.task, settings.limit))
    plan = memory_plan(args, settings, read_tokenizer(Path(args.run_dir) / "tokenizer"), heads)
    print(plan.describe(), file=sys.stderr, flush=True)
    run = restore_inference(args.run_dir, dtype=args.dtype, devices=plan.devices)
    decoder = ModelDecoder(run.mtp, run.params, settings.speculative, settings.rows)
    with Sandbox(workers=args.workers or None, python=args.sandbox_python) as sandbox, tqdm(total=total, desc=settings.task, unit="sample") as bar:
        record = evaluate(args.run_dir, run.step, settings, decoder, run.tokenizer, sandbox, bar.update,
                          lambda line: tqdm.write(line, file=sys.stderr))
    return record
