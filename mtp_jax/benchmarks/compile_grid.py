"""The paper's grid compiled for TPU: every experiments/paper/<size>_n<n>.yaml through `mtp-compile`
for the topology the cluster table recommends, and splash / blockwise / xla attention side by side.

Each row is one `mtp-compile` process (its command is printed beside the row), so a row can be
rerun alone. Prints a Markdown table per part and one JSON object last. Times are the compiler's
estimates, not measurements; memory is XLA's per-device analysis.

XLA's cost analysis counts the body of a loop once, whatever its trip count, so the estimate of a
step whose blocks are scanned covers one block. `--estimate` therefore also compiles three shallow,
fully unrolled probes per size on the same topology and per-device batch (one chunk of
cross-entropy): (trunk 1, n 1), (trunk 2, n 1) and (trunk 1, n 2). Their differences are the
compiler's estimate of one trunk block and of one head (block, unembedding and loss), and
    estimate(size, n) = probe(1, 1) + (trunk blocks - 1) x block + (n - 1) x head.

    python -m mtp_jax.benchmarks.compile_grid [--sizes 0.3b,6.7b] [--heads 1,4] [--attention] [--out FILE.json]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SIZES = ("0.3b", "0.6b", "1.3b", "3b", "6.7b", "13b")
HEADS = (1, 2, 4)
# One v5p pod slice of 128 chips (v5p-256) for every size: the paper's batch of 2048 x 4096 tokens
# is then 16 sequences per chip, FSDP over all 128 chips.
TOPOLOGY = {size: "v5p:4x4x8" for size in SIZES}
# One host of 8 H100s at the same per-device load (16 sequences of 4096 each); the paper's batch
# then takes 16 such hosts (mesh.dcn_data=16) or 16 micro-batches.
GPU_TOPOLOGY, GPU_OVERRIDES = "h100:8", ["train.batch_size=128", "mesh.data=1", "mesh.fsdp=-1"]
# Attention kernels at T = 4096 and 8192: the 0.3B shape, n = 4, 16 sequences over 8 chips.
ATTENTION = ("splash", "blockwise", "xla")
ATTENTION_RUN = ("experiments/paper/0.3b_n4.yaml", "v5p:2x2x2", ["train.batch_size=16"])
GIB = 2**30


def command(config: str, topology: str, overrides: list[str]) -> list[str]:
    return ["mtp-compile", config, "--topology", topology, *overrides]


_DONE: dict[str, dict[str, Any]] = {}  # command -> row, from --rows (each row appended as it completes)
_ROWS: list[Path] = []
_READ_ONLY: list[bool] = []  # --no-compile: tables from the --rows file alone


def compile_one(config: str, topology: str, overrides: list[str] = ()) -> dict[str, Any]:
    """The train report of one `mtp-compile` run, or the error line it ended with (a row already in
    the --rows file is read back instead of compiled again)."""
    cmd = command(config, topology, list(overrides))
    if " ".join(cmd) in _DONE:
        return _DONE[" ".join(cmd)]
    if _READ_ONLY:
        return {"command": " ".join(cmd), "error": "not compiled yet"}
    row = _compile(cmd)
    if _ROWS:
        with _ROWS[0].open("a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def _compile(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "mtp_jax.aot", *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    row: dict[str, Any] = {"command": " ".join(cmd), "returncode": proc.returncode}
    if lines:
        row.update(json.loads(lines[-1])["reports"][0])
    if proc.returncode:
        row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return row


def probe_estimates(size: str) -> dict[str, Any]:
    """The compiler's step-time estimates of the three unrolled probes of one size (see above)."""
    from mtp_jax.config import load_config

    config = f"experiments/paper/{size}_n1.yaml"
    seq = load_config(config).train.seq_len
    fixed = ["model.layer_loop=unroll", f"train.ce_chunk={seq}"]
    probes = {}
    for name, layers, heads in (("t1_n1", 2, 1), ("t2_n1", 3, 1), ("t1_n2", 3, 2)):
        row = compile_one(config, TOPOLOGY[size], [*fixed, f"model.n_layers={layers}", f"model.mtp_heads={heads}"])
        probes[name] = {"command": row["command"], "seconds": row.get("compiler_estimate_s"), "error": row.get("error")}
    return probes


def extrapolated(probes: dict[str, Any], trunk_blocks: int, n: int) -> float | None:
    """estimate = probe(1, 1) + (trunk blocks - 1) x block + (n - 1) x head, None if a probe failed."""
    p = {k: v["seconds"] for k, v in probes.items()}
    if None in p.values():
        return None
    return p["t1_n1"] + (trunk_blocks - 1) * (p["t2_n1"] - p["t1_n1"]) + (n - 1) * (p["t1_n2"] - p["t1_n1"])


def _gib(row: dict[str, Any], key: str) -> str:
    return f"{row['memory'][key] / GIB:.2f}" if "memory" in row else "-"


def grid_table(rows: list[dict[str, Any]]) -> str:
    out = ["| config | topology | fits | per-device GiB (total / temp) | extrapolated compiler estimate s/step | "
           "n / n=1 | MFU at that estimate | command |", "|---|---|---|---|---|---|---|---|"]
    base = {r["size"]: r.get("estimate_s") for r in rows if r["n"] == 1}
    for r in rows:
        est = r.get("estimate_s")
        ratio = f"{est / base[r['size']]:.3f}" if est and base.get(r["size"]) else "-"
        mfu = r.get("mfu_at_estimate")
        fits = r.get("fits", r.get("error", "-"))
        out.append(f"| {r['size']}_n{r['n']} | {r['topology_name']} | {fits} | "
                   f"{_gib(r, 'total')} / {_gib(r, 'temp')} | {'-' if est is None else f'{est:.2f}'} | {ratio} | "
                   f"{'-' if mfu is None else f'{mfu:.3f}'} | `{r['command']}` |")
    return "\n".join(out)


def flat_in_n(rows: list[dict[str, Any]]) -> str:
    """Per-device temporaries of n = 4 over n = 1, per size where both compiled."""
    temp = {(r["size"], r["n"]): r["memory"]["temp"] for r in rows if "memory" in r}
    return "\n".join(f"- {size}: temp n = 4 / n = 1 = {temp[size, 4] / temp[size, 1]:.3f}"
                     for size in SIZES if (size, 1) in temp and (size, 4) in temp)


def attention_table(rows: list[dict[str, Any]]) -> str:
    out = ["| attention | T | fits | per-device temp GiB | total GiB | compiler estimate s/step | command |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = r.get("compiler_estimate_s")
        out.append(f"| {r['attention']} | {r['seq_len']} | {r.get('fits', r.get('error', '-'))} | {_gib(r, 'temp')} | "
                   f"{_gib(r, 'total')} | {'-' if est is None else f'{est:.3f}'} | `{r['command']}` |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    from mtp_jax.errors import ArgParser

    ap = ArgParser(prog="compile_grid", description=__doc__)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {','.join(SIZES)}")
    ap.add_argument("--heads", default=",".join(map(str, HEADS)), help="comma-separated n values")
    ap.add_argument("--attention", action="store_true", help="also splash vs blockwise vs xla at T = 4096, 8192")
    ap.add_argument("--estimate", action="store_true", help="also the unrolled probes and extrapolated estimates")
    ap.add_argument("--only-estimate", type=Path, help="skip the grid's compiles: read them from this earlier --out")
    ap.add_argument("--out", type=Path, help="also write the JSON summary here")
    ap.add_argument("--rows", type=Path, help="JSON lines of finished compiles: appended to, and read back on a rerun")
    ap.add_argument("--no-compile", action="store_true", help="only the tables of the rows already in --rows")
    ap.add_argument("--gpu", action="store_true", help=f"compile for {GPU_TOPOLOGY} instead (needs the gpu extra)")
    args = ap.parse_args(argv)
    if args.no_compile:
        _READ_ONLY.append(True)
    if args.rows is not None:
        _ROWS.append(args.rows)
        if args.rows.is_file():
            _DONE.update({row["command"]: row for row in map(json.loads, args.rows.read_text().splitlines()) if row})
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        from mtp_jax.errors import UserError

        raise UserError(f"--sizes {','.join(unknown)} unknown; choose from {','.join(SIZES)}")
    grid = json.loads(args.only_estimate.read_text())["grid"] if args.only_estimate else []
    for size in [] if args.only_estimate else sizes:
        for n in (int(h) for h in args.heads.split(",") if h):
            topology, extra = (GPU_TOPOLOGY, GPU_OVERRIDES) if args.gpu else (TOPOLOGY[size], [])
            row = compile_one(f"experiments/paper/{size}_n{n}.yaml", topology, extra)
            grid.append({"size": size, "n": n, "topology_name": topology, **row})
            print(json.dumps({k: grid[-1].get(k) for k in ("command", "fits", "compiler_estimate_s", "error")}),
                  file=sys.stderr, flush=True)
    probes = {}
    if (args.estimate or args.only_estimate) and not args.gpu:  # the GPU compiler gives no time estimate
        from mtp_jax.config import load_config
        from mtp_jax.flops import peak_flops

        for size in sorted({r["size"] for r in grid}, key=SIZES.index):
            probes[size] = probe_estimates(size)
            print(json.dumps({size: probes[size]}), file=sys.stderr, flush=True)
        for r in grid:
            model = load_config(f"experiments/paper/{r['size']}_n{r['n']}.yaml").model
            r["estimate_s"] = extrapolated(probes[r["size"]], model.trunk_layers, r["n"])
            peak = peak_flops(r.get("device_kind", ""))
            if r["estimate_s"] and peak and r.get("model_flops"):
                r["mfu_at_estimate"] = r["model_flops"] / (r["devices"] * peak * r["estimate_s"])
    attention = []
    if args.attention:
        config, topology, extra = ATTENTION_RUN
        for t in (4096, 8192):
            for impl in ATTENTION:
                row = compile_one(config, topology, [*extra, f"train.seq_len={t}", f"model.attention={impl}"])
                attention.append({"attention": impl, "seq_len": t, **row})
                print(json.dumps({k: attention[-1].get(k) for k in ("command", "fits", "error")}), file=sys.stderr,
                      flush=True)
    if grid:
        print(grid_table(grid))
        print(flat_in_n(grid))
    if attention:
        print(attention_table(attention))
    summary = {"grid": grid, "probes": probes, "attention": attention}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
