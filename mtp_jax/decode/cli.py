"""`mtp-generate RUN_DIR --prompt TEXT`: a completion from a trained run, plus decoding statistics.

The prompt is the start of a document, laid out as training laid documents out: the tokenizer's
start token first where it has one (Llama's <s>), else nothing (a document's first token attends
to nothing before it: the end-of-text token closes the previous document and is never attended
across). With no --prompt, documents start with DEFAULT_PROMPT, how most Python modules begin; a
prompt must encode to at least one token. The completion printed is exactly the text that follows
the prompt (`completion_text`).

Flags are checked before anything loads, and `--speculative K` and the memory plan
(`decode/memory.py`: parameters in --dtype, KV cache, working set) before the checkpoint is
restored, so every mistake is one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from mtp_jax.config import Config
from mtp_jax.decode.memory import add_dtype_argument
from mtp_jax.errors import ArgParser, ConfigError, guarded
from mtp_jax.interrupts import interruptible

DEFAULT_PROMPT = '"""'  # a module docstring: how more than half of the standard library's modules start


def _parser() -> argparse.ArgumentParser:
    ap = ArgParser(prog="mtp-generate", description="Complete a prompt with a trained MTP run.")
    ap.add_argument("run_dir", help="a training run directory (train.run_dir)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT,
                    help=f"the start of a document to complete (default {DEFAULT_PROMPT}, a module docstring)")
    ap.add_argument("--speculative", type=int, default=0, metavar="K",
                    help="self-speculative decoding with heads 1..K (0 = plain decoding)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--seed", type=int, default=0)
    add_dtype_argument(ap)
    return ap


def _check(args: argparse.Namespace) -> None:
    from mtp_jax.decode.generate import Sampling

    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = args.prompt[err.start:err.end].encode("utf-8", "surrogateescape")
        raise ConfigError(f"--prompt is not valid UTF-8 (bytes {bad!r} at character {err.start}); "
                          f"pass text in UTF-8 (e.g. convert it with iconv)") from None
    if args.speculative < 0:
        raise ConfigError(f"--speculative {args.speculative} must be >= 0 (0 = plain decoding)")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    Sampling(args.temperature, args.top_k, args.top_p).check()


def warn_past_context(cfg: Config, prompt_len: int, new_tokens: int) -> None:
    """Past the trained context is only a warning (few-shot evaluation prompts are long)."""
    if prompt_len + new_tokens > cfg.train.seq_len:
        print(f"warning: prompt ({prompt_len} tokens) + --max-new-tokens {new_tokens} exceeds the trained context "
              f"train.seq_len={cfg.train.seq_len}; tokens past it are extrapolation", file=sys.stderr, flush=True)


@guarded
@interruptible
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    from mtp_jax.data.tokenizer import completion_text, document_start, encode_prompt
    from mtp_jax.decode.generate import Sampling, generate
    from mtp_jax.decode.memory import plan_run
    from mtp_jax.decode.speculative import speculative_generate
    from mtp_jax.run import load_run, read_config, read_tokenizer

    cfg = read_config(args.run_dir)
    heads = cfg.model.mtp_heads
    if args.speculative > heads:
        raise ConfigError(f"--speculative {args.speculative} exceeds the run's {heads} heads; use 1..{heads}")
    tokenizer = read_tokenizer(Path(args.run_dir) / "tokenizer")
    prompt = encode_prompt(tokenizer, args.prompt)  # a document start, as in training
    if len(prompt) == len(document_start(tokenizer)):
        raise ConfigError(f"--prompt {args.prompt!r} encodes to no tokens; give the start of a document, "
                          f"e.g. --prompt '{DEFAULT_PROMPT}'")
    plan = plan_run(args.run_dir, args.dtype, 1, len(prompt), len(prompt) + args.max_new_tokens + heads,
                    fix=f"load with --dtype bfloat16, shorten the prompt ({len(prompt)} tokens) or lower "
                        f"--max-new-tokens {args.max_new_tokens}")
    print(plan.describe(), file=sys.stderr, flush=True)
    warn_past_context(cfg, len(prompt), args.max_new_tokens)
    _, _, mtp, params = load_run(args.run_dir, dtype=args.dtype, devices=plan.devices)
    decode = functools.partial(speculative_generate, k=args.speculative) if args.speculative else generate
    result = decode(mtp, params, [prompt], max_new_tokens=args.max_new_tokens, seed=args.seed,
                    sampling=Sampling(args.temperature, args.top_k, args.top_p), stop_tokens=[tokenizer.eot_id])
    s = result.stats
    print(completion_text(tokenizer, prompt, result.completions()[0]))
    print(f"[{s.tokens_generated} tokens, {s.forward_passes} forward passes, {s.tokens_per_forward:.2f} tokens/pass, "
          f"{s.tokens_per_s:.1f} tokens/s, compile {s.compile_s:.1f}s]")
    return 0
