"""The accelerator check: everything the README wants measured on one GPU/TPU host, in one run.

1. bf16 training tokens/s and MFU, n = 1 vs n = 4, at the paper's 0.3B shape (d_model 1024,
   18 layers, 16 heads, vocab 32000, T = 4096): `benchmarks.throughput`; the wall-clock ratio
   is the paper's Table S5 figure (1.07-1.22).
2. The attention implementation `auto` picks and the loss-and-gradient temp memory at T = 4096
   and 8192 (`benchmarks.memory --seq-sweep`, issue-12 shape).
3. Decode pass costs: seconds of one cached forward pass feeding w tokens through all n heads
   (a self-speculative verify pass) over one token through head 1 (a plain greedy pass).

`--platform cpu --tiny` runs the same code at toy shapes (CI). Prints one JSON object last.

    python -m mtp_jax.benchmarks.accelerator [--platform cpu] [--tiny]   # or benchmarks/accelerator.sh
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

SHAPES = {  # (throughput flags, memory flags, decode shape)
    "paper": (
        ["--d-model", "1024", "--n-layers", "18", "--attn-heads", "16", "--vocab", "32000", "--seq", "4096",
         "--batch", "2", "--dtype", "bfloat16", "--rounds", "5", "--steps", "2", "--warmup", "1"],
        ["--seqs", "4096,8192"],
        dict(d_model=1024, n_layers=18, attn_heads=16, vocab_size=32000, context=2048, batches=(1, 8)),
    ),
    "tiny": (
        ["--d-model", "64", "--n-layers", "5", "--attn-heads", "2", "--vocab", "256", "--seq", "64",
         "--batch", "2", "--rounds", "1", "--steps", "1", "--warmup", "1", "--no-plain"],
        ["--seqs", "128,256", "--d-model", "64", "--attn-heads", "2", "--vocab", "256", "--chunk", "64"],
        dict(d_model=64, n_layers=5, attn_heads=2, vocab_size=256, context=64, batches=(1, 2)),
    ),
}


def pass_costs(d_model: int, n_layers: int, attn_heads: int, vocab_size: int, context: int, batches: tuple, heads: int = 4) -> dict:
    """Median seconds of cached forward passes (random weights; cost does not depend on them)."""
    import jax
    import jax.numpy as jnp

    from mtp_jax.config import ModelConfig
    from mtp_jax.decode.generate import forward_step
    from mtp_jax.model.transformer import MTP

    mtp = MTP(ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, attn_heads=attn_heads, mtp_heads=heads))
    params = jax.jit(mtp.init)(jax.random.key(0))
    out: dict[str, Any] = {}
    for b in batches:
        cache = mtp.init_cache(b, context + heads + 1)
        seconds = {}
        for width, used in [(1, 1)] + [(w, heads) for w in range(1, heads + 1)]:
            fn = jax.jit(lambda p, c, t, pos, used=used: forward_step(mtp, p, c, t, pos, used)[0])
            tokens = jnp.zeros((b, width), jnp.int32)
            positions = jnp.broadcast_to(context + jnp.arange(width), (b, width))  # after `context` cached tokens
            jax.block_until_ready(fn(params, cache, tokens, positions))
            times = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready(fn(params, cache, tokens, positions))
                times.append(time.perf_counter() - start)
            seconds[f"w{width}_heads{used}"] = statistics.median(times)
        base = seconds["w1_heads1"]
        out[f"batch{b}"] = {"seconds": seconds, "cost_over_plain_pass": {k: v / base for k, v in seconds.items()}}
    return out


def main(argv: list[str] | None = None) -> dict:
    from mtp_jax.errors import ArgParser

    ap = ArgParser(description=__doc__)
    ap.add_argument("--platform", default="", help="force a JAX platform (cpu, gpu, tpu); default: the best one")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CI); figures mean nothing")
    args = ap.parse_args(argv)
    import jax

    if args.platform:
        jax.config.update("jax_platforms", args.platform)
    from mtp_jax.benchmarks import memory, throughput

    train_flags, memory_flags, decode_shape = SHAPES["tiny" if args.tiny else "paper"]
    result: dict[str, Any] = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "tiny": args.tiny}
    seconds: dict[str, float] = {}
    for name, run in (
        ("training", lambda: throughput.main(train_flags)),
        ("attention_memory", lambda: memory.main(["--seq-sweep", *memory_flags])),
        ("decode_pass_costs", lambda: pass_costs(**decode_shape)),
    ):
        start = time.perf_counter()
        result[name] = run()
        seconds[name] = time.perf_counter() - start
    t = result["training"]
    result["summary"] = {
        "tokens_per_s_n1": t["n1"]["tokens_per_s"], "tokens_per_s_n4": t["n4"]["tokens_per_s"],
        "mfu_n1": t["n1"]["mfu"], "mfu_n4": t["n4"]["mfu"],
        "wall_clock_ratio_n4_over_n1": t["n1"]["tokens_per_s"] / t["n4"]["tokens_per_s"],
        "attention": result["attention_memory"]["attention"],
        "attention_temp_bytes": result["attention_memory"]["temp_bytes"],
    }
    result["seconds"] = seconds
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
