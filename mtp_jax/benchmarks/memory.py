"""Peak temporary memory of the loss-and-gradient computation, flat vs naive, for n = 1, 2, 4, 8.

Deterministic figures from XLA's compiled `memory_analysis()` (temp buffers), plus the median
wall-clock of one loss-and-gradient call at n = 4 for both paths, measured in the same run.
`--seq-sweep` instead gives the flat path's temp bytes over sequence lengths (compiling only)
for one attention implementation: linear attention memory shows as x2 per doubling of T.
Prints one JSON object as its last line.

    python -m mtp_jax.benchmarks.memory [--heads 1,2,4,8] [--d-model 512] [--seq 1024] [--head-type sequential] ...
    python -m mtp_jax.benchmarks.memory --seq-sweep [--attention auto] [--seqs 1024,2048,4096,8192]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from mtp_jax.config import ModelConfig
from mtp_jax.loss import loss_weights, mtp_loss
from mtp_jax.model.attention import IMPLEMENTATIONS, resolve
from mtp_jax.model.head_kinds import HEAD_KINDS, head_kind
from mtp_jax.model.transformer import MTP


def compiled_step(cfg: ModelConfig, impl: str, batch: int, seq: int, chunk: int):
    """(compiled value_and_grad, params, batch) for one head count and loss path."""
    mtp = MTP(cfg)
    weights = loss_weights(cfg.mtp_heads)
    grad_fn = jax.jit(
        jax.value_and_grad(lambda p, b: mtp_loss(mtp, p, b, weights, chunk, impl), has_aux=True)
    )
    params = jax.eval_shape(mtp.init, jax.random.key(0))
    shape = (batch, seq + cfg.mtp_heads)
    data = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32), "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32)}
    return grad_fn.lower(params, data).compile(), mtp


def median_seconds(compiled, mtp: MTP, cfg: ModelConfig, batch: int, seq: int, repeats: int) -> float:
    params = jax.jit(mtp.init)(jax.random.key(0))
    shape = (batch, seq + cfg.mtp_heads)
    data = {
        "tokens": jax.random.randint(jax.random.key(1), shape, 0, cfg.vocab_size, jnp.int32),
        "segment_ids": jnp.ones(shape, jnp.int32),
    }
    jax.block_until_ready(compiled(params, data))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, data))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seq_sweep(model_cfg, args) -> dict:
    """temp bytes per sequence length (compile only) and the ratio of the last two lengths."""
    n = int(args.heads.split(",")[0])
    cfg = model_cfg(n)
    seqs = [int(s) for s in args.seqs.split(",")]
    temp = {}
    for seq in seqs:
        compiled, _ = compiled_step(cfg, "flat", args.batch, seq, args.chunk)
        temp[str(seq)] = compiled.memory_analysis().temp_size_in_bytes
        chosen = resolve(cfg.attention, seq, MTP(cfg).dtype)
        print(f"T={seq:6d} attention={chosen:9s} temp={temp[str(seq)] / 2**20:9.1f} MiB", flush=True)
    result = {
        "temp_bytes": temp,
        "attention": {str(s): resolve(cfg.attention, s, MTP(cfg).dtype) for s in seqs},
        f"ratio_temp_{seqs[-1]}_over_{seqs[-2]}": temp[str(seqs[-1])] / temp[str(seqs[-2])],
        "config": {"d_model": cfg.d_model, "attn_heads": cfg.attn_heads, "trunk_layers": cfg.trunk_layers,
                   "mtp_heads": n, "vocab": cfg.vocab_size, "batch": args.batch, "attention": cfg.attention,
                   "platform": jax.default_backend()},
    }
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="1,2,4,8")
    ap.add_argument("--trunk-layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--attn-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--time-heads", type=int, default=4, help="head count for the timing comparison (0 = skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS)
    ap.add_argument("--head-type", default="transformer", choices=HEAD_KINDS)
    ap.add_argument("--seq-sweep", action="store_true",
                    help="temp bytes over --seqs at d_model 512, 1 trunk block + 1 head, vocab 4096, batch 1 (unless given)")
    ap.add_argument("--seqs", default="1024,2048,4096,8192")
    args = ap.parse_args(argv)
    if args.seq_sweep:  # d_model 512, 8 heads, 1 trunk block + 1 head, vocab 4096, batch 1
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for flag, value in (("--trunk-layers", 1), ("--vocab", 4096), ("--batch", 1), ("--heads", "1")):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)

    def model_cfg(n: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=args.vocab, d_model=args.d_model, attn_heads=args.attn_heads, mtp_heads=n,
            n_layers=args.trunk_layers + (n if head_kind(args.head_type).block else 0),
            attention=args.attention, head_type=args.head_type,
        )

    if args.seq_sweep:
        return seq_sweep(model_cfg, args)

    result: dict = {"flat": {}, "naive": {}, "seconds": {}}
    for n in [int(h) for h in args.heads.split(",")]:
        for impl in ("flat", "naive"):
            compiled, mtp = compiled_step(model_cfg(n), impl, args.batch, args.seq, args.chunk)
            result[impl][str(n)] = compiled.memory_analysis().temp_size_in_bytes
            print(f"n={n} {impl:5s} temp={result[impl][str(n)] / 2**20:9.1f} MiB", flush=True)
            if n == args.time_heads:
                secs = median_seconds(compiled, mtp, model_cfg(n), args.batch, args.seq, args.repeats)
                result["seconds"][f"{impl}{n}"] = secs
                print(f"n={n} {impl:5s} median {secs:.2f} s per loss-and-gradient call", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
