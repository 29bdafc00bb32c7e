"""`mtp-generate RUN_DIR --prompt TEXT`: a completion from a trained run, plus decoding statistics.

The prompt is the start of a document, fed as is: in training a document's first token attends
to nothing before it (the end-of-text token closes the previous document and is never attended
across), so no end-of-text token goes in front. With no --prompt, documents start with
DEFAULT_PROMPT, how most Python modules begin; a prompt must encode to at least one token.

Flags are checked before anything loads, and `--speculative K` against the run's head count
before the checkpoint is restored, so every mistake is one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import sys

from mtp_jax.config import Config
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


def decode_bytes(cfg: Config, prompt_len: int, new_tokens: int) -> dict[str, int]:
    """Bytes decoding needs beyond the weights: KV caches of every block (float32 upper bound) and the
    prefill's attention scores (every head, prompt x cache slots)."""
    m = cfg.model
    slots = prompt_len + new_tokens + m.mtp_heads
    return {"kv_cache": 2 * m.n_layers * slots * m.kv_heads_ * m.head_dim_ * 4,
            "prefill_attention": m.attn_heads * prompt_len * slots * 4}


def check_budget(cfg: Config, prompt_len: int, new_tokens: int, available: int) -> None:
    """Refuses up front what cannot fit in memory; past the trained context is only a warning
    (few-shot evaluation prompts are long)."""
    need = decode_bytes(cfg, prompt_len, new_tokens)
    if sum(need.values()) > available:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.1f} GiB" for k, v in need.items())
        raise ConfigError(
            f"a {prompt_len}-token prompt plus --max-new-tokens {new_tokens} needs about "
            f"{sum(need.values()) / 2**30:.1f} GiB ({parts}) but {available / 2**30:.1f} GiB is available; "
            f"shorten the prompt or lower --max-new-tokens"
        )
    if prompt_len + new_tokens > cfg.train.seq_len:
        print(f"warning: prompt ({prompt_len} tokens) + --max-new-tokens {new_tokens} exceeds the trained context "
              f"train.seq_len={cfg.train.seq_len}; tokens past it are extrapolation", file=sys.stderr, flush=True)


def _memory_bytes() -> int:
    """Free memory of the first local device, or the host's available RAM on CPU (not its total)."""
    from mtp_jax.capacity import available_bytes

    return available_bytes()


@guarded
@interruptible
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    from mtp_jax.decode.generate import Sampling, generate
    from mtp_jax.decode.speculative import speculative_generate
    from mtp_jax.run import load_run, read_config

    cfg = read_config(args.run_dir)
    heads = cfg.model.mtp_heads
    if args.speculative > heads:
        raise ConfigError(f"--speculative {args.speculative} exceeds the run's {heads} heads; use 1..{heads}")
    _, tokenizer, mtp, params = load_run(args.run_dir)
    prompt = tokenizer.encode(args.prompt)  # a document start, as in training: nothing before it
    if not prompt:
        raise ConfigError(f"--prompt {args.prompt!r} encodes to no tokens; give the start of a document, "
                          f"e.g. --prompt '{DEFAULT_PROMPT}'")
    check_budget(cfg, len(prompt), args.max_new_tokens, _memory_bytes())  # before decoding allocates anything
    decode = functools.partial(speculative_generate, k=args.speculative) if args.speculative else generate
    result = decode(mtp, params, [prompt], max_new_tokens=args.max_new_tokens, seed=args.seed,
                    sampling=Sampling(args.temperature, args.top_k, args.top_p), stop_tokens=[tokenizer.eot_id])
    completion = [t for t in result.completions()[0] if t != tokenizer.eot_id]
    s = result.stats
    print(tokenizer.decode(completion))
    print(f"[{s.tokens_generated} tokens, {s.forward_passes} forward passes, {s.tokens_per_forward:.2f} tokens/pass, "
          f"{s.tokens_per_s:.1f} tokens/s, compile {s.compile_s:.1f}s]")
    return 0
