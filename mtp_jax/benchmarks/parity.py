"""CPU efficiency against the PyTorch peer, each engine normalised by its own matmul rate.

XLA's and PyTorch's CPU GEMMs differ in speed, so the figure of merit is an engine's
efficiency: model FLOP/s of its training step over the FLOP/s of a bare float32 matmul of the
step's dominant shape ((B*T, d) x (d, d_ff)), both measured by the same engine in the same
round. The PyTorch peer (`--peer`, by default `../shared/peers/torch_mtp.py` beside the
checkout: trunk once, then each head's forward and backward, one trunk backward, AdamW with
clipping) runs in a worker process under an
interpreter that has torch (`benchmarks/torch_peer.py`); mtp_jax runs its own train step
(`StepFns`). The parent alternates the engines item by item (order reversed every round), only
one runs at a time, so drift on a shared machine hits both alike. Both sides count FLOPs with
`mtp_jax.flops.model_flops_per_token` (the peer's own formula gives the same figure).

Per shape and n: median over rounds of each engine's tokens/s and efficiency, the raw ratio
(mtp_jax tokens/s over the peer's) and the normalised ratio (efficiency over efficiency), plus the
median of the within-round normalised ratios as a noise check. Prints one JSON object last.

    python -m mtp_jax.benchmarks.parity --torch-python ../torchvenv/bin/python [--shapes small,large]
    taskset -c 0 benchmarks/parity.sh   # one core each: no thread-pool contention on a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from mtp_jax import sharding
from mtp_jax.benchmarks.throughput import Timed, mtp_model
from mtp_jax.config import MeshConfig, ModelConfig, OptimConfig, TrainConfig
from mtp_jax.errors import ArgParser, guarded
from mtp_jax.flops import model_flops_per_token

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "benchmarks" / "torch_peer.py"
# (d_model, blocks, vocab, batch, seq): the throughput benchmark's shape and a larger one.
SHAPES = {"small": (256, 6, 4096, 4, 256), "large": (512, 6, 8192, 8, 512)}


class TorchWorker:
    """The peer's models in a child process; one command, one JSON answer."""

    def __init__(self, python: str, peer: Path, cfg: ModelConfig, batch: int, seq: int, ns: list[int]):
        args = dict(d=cfg.d_model, layers=cfg.n_layers, heads=cfg.attn_heads, vocab=cfg.vocab_size, batch=batch,
                    seq=seq, **{"d-ff": cfg.d_ff_})
        cmd = [python, str(WORKER), "--peer", str(peer), "--ns", ",".join(map(str, ns))]
        cmd += [x for k, v in args.items() for x in (f"--{k}", str(v))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker exited (status {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def seconds(self, command: str) -> float:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def jax_matmul(m: int, k: int, n: int):
    """Seconds for `calls` jitted float32 (m, k) x (k, n) matmuls, the last one waited for."""
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()

    def run(calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            r = f(a, b)
        r.block_until_ready()
        return time.perf_counter() - start

    return run


def measure_shape(name: str, args: argparse.Namespace) -> dict:
    d, layers, vocab, batch, seq = SHAPES[name]
    ns = [1, 4]
    cfgs = {n: ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, attn_heads=args.attn_heads, mtp_heads=n,
                           attention=args.attention) for n in ns}
    tcfg = TrainConfig(batch_size=batch, seq_len=seq, ce_chunk=args.ce_chunk)
    mesh = sharding.make_mesh(MeshConfig(data=1), [jax.devices()[0]])
    jax_models: dict[int, Timed] = {n: mtp_model(f"n{n}", cfgs[n], tcfg, OptimConfig(), mesh) for n in ns}
    for m in jax_models.values():
        m.run(1 + args.warmup)
    torch = TorchWorker(args.torch_python, Path(args.peer), cfgs[1], batch, seq, ns)
    for n in ns:
        torch.seconds(f"step {n} {1 + args.warmup}")
    mm_shape = (batch * seq, d, cfgs[1].d_ff_)
    mm_flops = 2 * mm_shape[0] * mm_shape[1] * mm_shape[2] * args.mm_calls
    jax_mm = jax_matmul(*mm_shape)
    items = {
        ("jax", "mm"): lambda: jax_mm(args.mm_calls), ("torch", "mm"): lambda: torch.seconds(f"matmul {args.mm_calls}"),
        **{("jax", n): (lambda n=n: jax_models[n].run(args.steps)) for n in ns},
        **{("torch", n): (lambda n=n: torch.seconds(f"step {n} {args.steps}")) for n in ns},
    }
    secs: dict[tuple, list[float]] = {key: [] for key in items}
    for r in range(args.rounds):
        for key in (list(items) if r % 2 == 0 else list(items)[::-1]):
            secs[key].append(items[key]())
        print(f"{name} round {r + 1}: " + "  ".join(f"{e}/{k} {s[-1]:.3f}s" for (e, k), s in secs.items()), flush=True)
    torch.close()
    return summarise(name, secs, cfgs, tcfg, mm_flops, ns, args.steps, torch.info)


def summarise(name, secs, cfgs, tcfg, mm_flops, ns, steps, torch_info) -> dict:
    rounds = len(secs[("jax", "mm")])
    tokens = tcfg.batch_size * tcfg.seq_len * steps
    tps = {(e, n): [tokens / s for s in secs[(e, n)]] for e in ("jax", "torch") for n in ns}
    mm = {e: [mm_flops / s for s in secs[(e, "mm")]] for e in ("jax", "torch")}
    eff = {(e, n): [tps[(e, n)][r] * model_flops_per_token(cfgs[n], tcfg.seq_len) / mm[e][r] for r in range(rounds)]
           for e in ("jax", "torch") for n in ns}
    med = statistics.median
    out: dict = {"shape": dict(zip(("d_model", "blocks", "vocab", "batch", "seq"), SHAPES[name])),
                 "matmul_gflops": {e: round(med(v) / 1e9, 1) for e, v in mm.items()}, "torch": torch_info}
    for n in ns:
        out[f"n{n}"] = {
            "tokens_per_s": {e: round(med(tps[(e, n)]), 1) for e in ("jax", "torch")},
            "efficiency": {e: round(med(eff[(e, n)]), 3) for e in ("jax", "torch")},
            "raw_ratio": round(med(tps[("jax", n)]) / med(tps[("torch", n)]), 3),
            "normalised_ratio": round(med(eff[("jax", n)]) / med(eff[("torch", n)]), 3),
            "normalised_ratio_within_rounds": round(med(
                eff[("jax", n)][r] / eff[("torch", n)][r] for r in range(rounds)), 3),
        }
    return out


@guarded
def main(argv: list[str]) -> int:
    ap = ArgParser(prog="python -m mtp_jax.benchmarks.parity", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-python", required=True, help="an interpreter with torch installed (not this venv)")
    ap.add_argument("--peer", default=str(ROOT.parent / "shared" / "peers" / "torch_mtp.py"))
    ap.add_argument("--shapes", default="small,large", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--attn-heads", type=int, default=4)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--ce-chunk", type=int, default=TrainConfig.ce_chunk)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1, help="training steps per timed item")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mm-calls", type=int, default=20)
    args = ap.parse_args(argv)
    for s in args.shapes.split(","):
        if s not in SHAPES:
            ap.error(f"--shapes: {s!r} is not one of {', '.join(SHAPES)}")
    if not Path(args.peer).is_file():
        ap.error(f"--peer {args.peer}: no such file; point it at the PyTorch peer torch_mtp.py")
    result: dict = {s: measure_shape(s, args) for s in args.shapes.split(",")}
    result["cpus"] = len(os.sched_getaffinity(0))  # `taskset -c 0 ...` gives each engine one core
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
