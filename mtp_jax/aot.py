"""Ahead-of-time compilation for a TPU topology this host does not have (`mtp-compile`).

The TPU compiler (libtpu, the `tpu` extra) runs on any Linux host. From a topology name it
describes the chips of a slice (or several slices); the real train step is lowered from abstract
parameters, optimizer state and batch carrying their real shardings over that topology's mesh,
and compiled for it. Nothing is allocated. The compiled program's memory analysis gives the
bytes each chip needs, checked against its HBM; its cost analysis gives the compiler's FLOPs and
its own step-time estimate, which is an estimate, never a measurement.

    mtp-compile experiments/paper/6.7b_n4.yaml --topology v5p:4x4x8
    mtp-compile CONFIG --topology v5p:2x2x2 --slices 2 mesh.dcn_data=2      # multislice
    mtp-compile CONFIG --topology v5e:4x4 --decode --decode-batch 32 --decode-context 2048
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from mtp_jax.config import Config, load_config
from mtp_jax.errors import ArgParser, UserError, guarded

GIB = 2**30
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # per TPU chip, the vendor's data sheets
GPU_SPECS = Path(__file__).parent / "gpu_specs"  # XLA target descriptions: <chip>.txtpb
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def gpu_chips() -> list[str]:
    return sorted(p.stem for p in GPU_SPECS.glob("*.txtpb"))


def hbm_bytes(topology: str) -> int:
    """Memory of one device of the topology: the TPU chip's data sheet, or the GPU description's."""
    chip = topology.split(":", 1)[0]
    if chip in HBM_GIB:
        return HBM_GIB[chip] * GIB
    found = re.search(r"device_memory_size:\s*(\d+)", (GPU_SPECS / f"{chip}.txtpb").read_text())
    return int(found.group(1))


def _check_name(name: str) -> tuple[str, str]:
    chip, _, shape = name.partition(":")
    if chip in gpu_chips() and shape.isdigit() and int(shape) >= 1:
        return chip, shape
    if chip not in HBM_GIB or not shape:
        raise UserError(f"--topology {name!r} is not a topology name; use CHIP:SHAPE, a TPU slice (CHIP one of "
                        f"{', '.join(HBM_GIB)}, e.g. v5p:2x2x2, v5e:4x4) or GPUs of one host "
                        f"({', '.join(f'{g}:8' for g in gpu_chips())})")
    return chip, shape


def topology_devices(name: str, slices: int = 1) -> list[Any]:
    """The compile-only devices of TPU topology `name` (e.g. v5p:2x2x2) times `slices` slices, or of
    one host's GPUs (e.g. h100:8, described by gpu_specs/<chip>.txtpb)."""
    chip, shape = _check_name(name)
    if slices < 1:
        raise UserError(f"--slices {slices} must be >= 1")
    from mtp_jax import platforms

    gpu = chip not in HBM_GIB
    if gpu and slices > 1:
        raise UserError(f"--slices {slices}: GPU topologies describe one host; use --slices 1")
    if gpu and not platforms.has_cuda_plugin():
        raise UserError(f"--topology {name!r} needs JAX's CUDA plugin to compile for GPUs; install it with "
                        f"pip install -e '.[gpu]'")
    try:
        from jax.experimental import topologies

        with platforms.compile_only("gpu" if gpu else "tpu"):
            if gpu:
                spec = (GPU_SPECS / f"{chip}.txtpb").read_text()
                return list(topologies.get_topology_desc(platform="cuda", topology_name=name,
                                                         topology=f"1x1x{shape}", target_config=spec).devices)
            extra = {"num_slices": slices} if slices > 1 else {}
            return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **extra).devices)
    except Exception as err:  # noqa: BLE001 - the compilers' errors are runtime errors with a message
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "libtpu" in first.lower() or "Unknown backend" in first or "not found" in first.lower():
            raise UserError(f"cannot load the TPU compiler ({first}); install it with pip install -e '.[tpu]'") from None
        raise UserError(f"--topology {name!r} was refused by the compiler ({first}); use a shape this chip "
                        f"comes in, e.g. v5p:2x2x2 or v5e:4x4") from None


_HBM_OOM = re.compile(r"required for (.+?) \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class DoesNotFit(UserError):
    """The TPU compiler refused the program: it needs more HBM than a chip has (bytes per device)."""

    def __init__(self, program: str, what: str, needed: float, available: float):
        self.program, self.needed, self.available = program, needed, available
        super().__init__(f"{program} step needs {needed / GIB:.1f} GiB of HBM per device for {what} but a chip has "
                         f"{available / GIB:.1f} GiB")


def compiled_or_refused(lowered: Any, program: str) -> Any:
    """`lowered.compile()`, with the TPU compiler's out-of-HBM refusal as a DoesNotFit."""
    try:
        return lowered.compile()
    except Exception as err:  # noqa: BLE001 - XLA raises JaxRuntimeError; anything else propagates below
        found = _HBM_OOM.search(str(err))
        if found is None:
            raise
        what, n, unit, m, unit2 = found.groups()
        raise DoesNotFit(program, what, float(n) * _UNITS[unit], float(m) * _UNITS[unit2]) from None


def tokenizer_vocab(cfg: Config) -> int:
    """The tokenizer's size as the config implies it, without building the tokenizer."""
    from mtp_jax.data.tokenizer import ByteTokenizer

    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if cfg.data.tokenizer == "bytes":
        return ByteTokenizer.vocab_size
    if cfg.data.tokenizer == "bpe":
        return cfg.data.bpe_vocab_size
    raise UserError("data.tokenizer=pretrained takes its size from the checkpoint; set model.vocab_size to compile "
                    "without it (32000 for Llama 2 / Meta's checkpoints)")


def memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes from XLA's memory analysis; `total` counts donated (aliased) buffers once."""
    m = compiled.memory_analysis()
    out = {f: int(getattr(m, f"{f}_size_in_bytes")) for f in MEMORY_FIELDS}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def cost(compiled: Any) -> dict[str, float | None]:
    """The compiler's per-device FLOPs and step-time estimate in seconds (None where it gives none: a
    program with cross-slice collectives gets a negative placeholder)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    seconds = float(analysis.get("optimal_seconds", -1.0))
    return {"flops": float(analysis.get("flops", 0.0)), "seconds": seconds if seconds > 0 else None}


def _abstract(shape: tuple[int, ...], dtype: Any, sharding: Any) -> Any:
    import jax

    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compile_train(cfg: Config, devices: list[Any]) -> tuple[Any, Any]:
    """(compiled train step, the Built it came from) for `devices`, from abstract inputs only."""
    import jax.numpy as jnp

    from mtp_jax import platforms
    from mtp_jax.run import build

    with platforms.compiling_for(devices[0].platform):
        built = build(cfg, devices)
        fns = built.fns
        width = cfg.train.seq_len + cfg.model.mtp_heads
        batch = {k: _abstract((cfg.train.batch_size, width), jnp.int32, fns.batch_sharding)
                 for k in ("tokens", "segment_ids")}
        return compiled_or_refused(fns.train_step.lower(fns.abstract_state, batch), "train"), built


def compile_decode(built: Any, devices: list[Any], batch: int, context: int) -> dict[str, Any]:
    """(compiled program, compile seconds) of the cached decoding passes at `batch` sequences and
    `context` cache slots, parameters in bfloat16 with the training shardings: the plain pass (one
    token, head 1) and the verify pass (n tokens through every head), each donating its cache."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mtp_jax import platforms, sharding
    from mtp_jax.decode.passes import logits, verify_pass, wide_pass

    fns, mtp, n = built.fns, built.mtp, built.cfg.model.mtp_heads
    params = jax.tree.map(lambda a, s: _abstract(a.shape, jnp.bfloat16, s), mtp.abstract_params(),
                          fns.state_shardings["params"])
    rules = fns.rules
    batch_axes = sharding.logical_to_spec(("batch",), rules)[0]
    split = batch_axes if batch % sharding.axis_size(fns.mesh, batch_axes) == 0 else None
    cache_sh = NamedSharding(fns.mesh, P(None, split))
    cache = jax.tree.map(lambda a: _abstract(a.shape, jnp.bfloat16, cache_sh),
                         jax.eval_shape(lambda: mtp.init_cache(batch, context, jnp.bfloat16)))
    tokens_sh = NamedSharding(fns.mesh, P(split))

    def plain(p, c, t, pos):
        h_NBTD, c = wide_pass(mtp, p, c, t, pos, 1)
        return logits(mtp, p, h_NBTD[0]), c

    def verify(p, c, t, pos):
        first_BTV, draft = verify_pass(mtp, p, c, t, pos, n)
        drafts_BJV, c = draft(jnp.zeros((t.shape[0],), jnp.int32))
        return first_BTV, drafts_BJV, c

    out = {}
    with platforms.compiling_for(devices[0].platform), sharding.activate(fns.mesh, rules):
        for name, fn, width in (("plain", plain, 1), ("verify", verify, n)):
            t = _abstract((batch, width), jnp.int32, tokens_sh)
            start = time.perf_counter()
            lowered = jax.jit(fn, donate_argnums=1).lower(params, cache, t, t)
            out[name] = (compiled_or_refused(lowered, name), time.perf_counter() - start)
    return out


@dataclasses.dataclass
class Report:
    """What `mtp-compile` prints: one program's per-device memory and the compiler's estimates."""

    program: str
    topology: str
    slices: int
    device_kind: str
    devices: int
    memory: dict[str, int]
    hbm_bytes: int
    compiler_flops: float  # all devices
    compiler_estimate_s: float | None  # the compiler's own estimate, not a measurement
    model_flops: float = 0.0  # per step (training only)
    compile_s: float = 0.0

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.hbm_bytes

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fits"] = self.fits
        d["per_device_gib"] = {k: v / GIB for k, v in self.memory.items()}
        d["hbm_gib"] = self.hbm_bytes / GIB
        peak = _peak(self.device_kind)
        if self.model_flops and self.compiler_estimate_s and peak:
            mfu = self.model_flops / (self.devices * peak * self.compiler_estimate_s)
            if mfu <= 1:
                d["mfu_compiler_estimate"] = mfu
            else:  # XLA's cost analysis counts a loop body once: the estimate covers one scanned block
                d["estimate_note"] = ("the compiler's estimate counts each loop body once (scanned layers), so it is "
                                      "not a step time; python -m mtp_jax.benchmarks.compile_grid --estimate "
                                      "extrapolates one")
        return d


def _peak(kind: str) -> float | None:
    from mtp_jax.flops import peak_flops

    return peak_flops(kind)


def report(program: str, compiled: Any, topology: str, slices: int, devices: list[Any], model_flops: float = 0.0,
           compile_s: float = 0.0) -> Report:
    c = cost(compiled)
    return Report(program=program, topology=topology, slices=slices, device_kind=devices[0].device_kind,
                  devices=len(devices), memory=memory(compiled), hbm_bytes=hbm_bytes(topology),
                  compiler_flops=c["flops"] * len(devices), compiler_estimate_s=c["seconds"],
                  model_flops=model_flops, compile_s=compile_s)


def table(reports: list[Report]) -> str:
    rows = ["program  per-device GiB: args  temp  out  total / HBM   fits  compiler estimate s  MFU (est.)"]
    for r in reports:
        g = {k: v / GIB for k, v in r.memory.items()}
        mfu = r.as_dict().get("mfu_compiler_estimate")
        est = "-" if r.compiler_estimate_s is None else f"{r.compiler_estimate_s:.4f}"
        rows.append(f"{r.program:8} {g['argument']:20.2f} {g['temp']:5.2f} {g['output']:4.2f} {g['total']:6.2f} / "
                    f"{r.hbm_bytes / GIB:<4.0f} {str(r.fits):5} {est:>19}  {'-' if mfu is None else f'{mfu:.3f}'}")
    return "\n".join(rows)


def advice(program: str, need: float, have: float, kind: str, cfg: Config) -> str:
    return (f"{program} step needs {need / GIB:.1f} GiB per device but a {kind} chip has {have / GIB:.0f} GiB; "
            f"shard further (a larger topology with mesh.fsdp=-1, now {cfg.mesh.fsdp}), raise train.micro_batches "
            f"(now {cfg.train.micro_batches}), or set model.remat=full (now {cfg.model.remat})")


def write_executable(compiled: Any, path: Path) -> None:
    """The serialized executable, written atomically: never a partial file."""
    from jax.experimental import serialize_executable

    from mtp_jax.atomic import write_atomic

    payload, _, _ = serialize_executable.serialize(compiled)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, payload)


def run(cfg: Config, topology: str, slices: int = 1, decode: tuple[int, int] | None = None,
        serialize: Path | None = None, train: bool = True) -> list[Report]:
    """Compiles the train step (unless `train` is false) and the decode passes (when `decode` gives
    their batch and context) for the topology; the reports, train first."""
    from mtp_jax import platforms
    from mtp_jax.flops import model_flops_per_token
    from mtp_jax.run import build, resolve_vocab

    devices = topology_devices(topology, slices)
    cfg = resolve_vocab(cfg, tokenizer_vocab(cfg))
    reports = []
    if train:
        start = time.perf_counter()
        compiled, built = compile_train(cfg, devices)
        tokens = cfg.train.batch_size * cfg.train.seq_len
        reports.append(report("train", compiled, topology, slices, devices,
                              model_flops_per_token(cfg.model, cfg.train.seq_len) * tokens, time.perf_counter() - start))
        if serialize is not None:
            write_executable(compiled, serialize)
    else:
        with platforms.compiling_for(devices[0].platform):
            built = build(cfg, devices)
    if decode is not None:
        for name, (c, seconds) in compile_decode(built, devices, *decode).items():
            reports.append(report(name, c, topology, slices, devices, compile_s=seconds))
    return reports


@guarded
def main(argv: list[str]) -> int:
    ap = ArgParser(prog="mtp-compile", description="Compile a config's train step (and decode passes) for a TPU "
                   "topology on this host: per-device memory against HBM, the compiler's FLOPs and time estimate.")
    ap.add_argument("config", help="experiment YAML, e.g. experiments/paper/6.7b_n4.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. mesh.fsdp=-1 train.micro_batches=2")
    ap.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x8, v5e:4x4, v6e:4x4, v4:2x2x2; "
                    "or one host's GPUs, e.g. h100:8 (needs the gpu extra)")
    ap.add_argument("--slices", type=int, default=1, help="slices of that topology over DCN (set mesh.dcn_*)")
    ap.add_argument("--decode", action="store_true", help="also compile the plain and verify decoding passes")
    ap.add_argument("--decode-batch", type=int, default=32, help="sequences decoded at once (--decode)")
    ap.add_argument("--decode-context", type=int, default=2048, help="KV-cache slots per sequence (--decode)")
    ap.add_argument("--serialize", type=Path, help="write the compiled train executable to this file")
    ap.add_argument("--skip-train", action="store_true", help="compile only the decode passes (with --decode)")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.skip_train and (not args.decode or args.serialize):
        raise UserError("--skip-train compiles only the decode passes: add --decode, and drop --serialize (it writes "
                        "the train step)")
    if args.decode and (args.decode_batch < 1 or args.decode_context < cfg.model.mtp_heads + 1):
        raise UserError(f"--decode-batch {args.decode_batch} must be >= 1 and --decode-context "
                        f"{args.decode_context} >= {cfg.model.mtp_heads + 1}")
    try:
        reports = run(cfg, args.topology, args.slices, (args.decode_batch, args.decode_context) if args.decode else None,
                      args.serialize, train=not args.skip_train)
    except DoesNotFit as err:
        print(json.dumps({"config": args.config, "overrides": args.overrides, "reports": [
            {"program": err.program, "topology": args.topology, "fits": False, "needed_gib": err.needed / GIB,
             "hbm_gib": hbm_bytes(args.topology) / GIB, "compiler_refused": str(err)}]}))
        raise UserError(advice(err.program, err.needed, hbm_bytes(args.topology), args.topology.split(":")[0],
                               cfg)) from None
    print(f"{args.topology} x {args.slices} slice(s): {reports[0].devices} x {reports[0].device_kind}; "
          f"times are the compiler's estimates, not measurements")
    print(table(reports))
    notes = {r.as_dict().get("estimate_note") for r in reports} - {None}
    for note in notes:
        print(f"note: {note}")
    print(json.dumps({"config": args.config, "overrides": args.overrides,
                      "reports": [r.as_dict() for r in reports]}))
    for r in reports:
        if not r.fits:
            raise UserError(advice(r.program, r.memory["total"], r.hbm_bytes, r.device_kind, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
