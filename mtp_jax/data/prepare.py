"""`mtp-prepare CONFIG.yaml OUT_DIR [section.key=value ...]`: tokenize a text corpus once into the
prepared token store (store.py), then train on it with data.source=prepared data.path=OUT_DIR.

One machine: `mtp-prepare CONFIG OUT --workers 8` does everything. Many machines (a SLURM array
or one GKE job per shard): `--tokenizer-only` first (trains BPE on a bounded sample, fixes the
plan), then `--shard I/N` on each machine, then `--merge` once. An interrupted preparation
continues with `--resume`, redoing only the part it was writing.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mtp_jax.config import Config, load_config
from mtp_jax.data import build, sources, store
from mtp_jax.data.tokenizer import load_tokenizer, make_tokenizer
from mtp_jax.errors import ArgParser, UserError, full_disk_in, guarded


def parse_shard(value: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise UserError(f"--shard {value!r} is not I/N; give e.g. --shard 3/8 (I from 0 to N-1)") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {value} needs 0 <= I < N; e.g. --shard 0/{max(count, 1)}")
    return index, count


def _start(cfg: Config, out: Path, part_bytes: int, resume: bool) -> dict:
    """A new preparation in an empty OUT_DIR: tokenizer and plan. With `resume`, a start cut before its plan was
    written (OUT_DIR holds tokenizer/ alone, which no part was encoded with yet) starts again."""
    found = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if resume and found == ["tokenizer"]:
        shutil.rmtree(out / "tokenizer")
    elif found and resume:
        raise UserError(f"OUT_DIR '{out}' holds {', '.join(found)} but no {build.PLAN_FILE}, so no preparation was "
                        "started there to resume; choose an empty folder")
    elif found:
        raise UserError(f"OUT_DIR '{out}' is not empty; choose an empty folder (or pass --resume to continue "
                        "a preparation there)")
    parts = sources.parts(cfg.data, part_bytes)
    out.mkdir(parents=True, exist_ok=True)
    return build.create(out, cfg.data, make_tokenizer(cfg.data, parts), parts, part_bytes)


def _existing(cfg: Config, out: Path) -> dict:
    """The plan of a started preparation, checked against this config and tokenizer."""
    plan = json.loads((out / build.PLAN_FILE).read_text())
    want = build.data_fields(cfg.data)
    for key, value in plan["data"].items():
        if want.get(key) != value:
            raise UserError(f"'{out}' is being prepared with data.{key}={value!r}, not {want.get(key)!r}; "
                            "use the same config or a new OUT_DIR")
    tokenizer = load_tokenizer(out / "tokenizer")
    if tokenizer.fingerprint != plan["fingerprint"]:
        raise UserError(f"'{out / 'tokenizer'}' ({tokenizer.fingerprint}) is not the tokenizer '{out}' was started "
                        f"with ({plan['fingerprint']}); restore it or prepare into a new folder")
    return plan


def prepare(config_path: str | None, out_dir: str, overrides: list[str] | tuple[str, ...] = (), *,
            workers: int = 0, shard: tuple[int, int] = (0, 1), resume: bool = False, tokenizer_only: bool = False,
            merge_only: bool = False, part_bytes: int = sources.PART_BYTES, progress: bool = True) -> dict:
    """Runs the requested step; returns the manifest once the dataset is complete, else the plan."""
    cfg = load_config(config_path, overrides)
    if cfg.data.source == "prepared":
        raise UserError("data.source=prepared is already prepared; set data.source to stdlib, files or jsonl")
    if cfg.data.max_bytes > 0 and shard[1] > 1:
        raise UserError(f"data.max_bytes={cfg.data.max_bytes} cuts the whole stream, so it cannot be sharded; "
                        "drop --shard or set data.max_bytes=0")
    out = Path(out_dir)
    if not (out / build.PLAN_FILE).is_file():
        if merge_only or shard[1] > 1:
            raise UserError(f"'{out}' holds no started preparation; run `mtp-prepare CONFIG {out} --tokenizer-only` "
                            "first (or prepare on one machine without --shard/--merge)")
        plan = _start(cfg, out, part_bytes, resume)
    elif tokenizer_only:
        raise UserError(f"'{out}' already has its tokenizer; go on with --shard I/N")
    else:
        plan = _existing(cfg, out)
    if tokenizer_only:
        return plan
    if not merge_only:
        parts = sources.parts(cfg.data, plan["part_bytes"])
        mine = [k for k in range(len(parts)) if k % shard[1] == shard[0]]
        begun = [k for k in mine if (out / store.PARTS_DIR / build.part_name(k, len(parts))).exists()]
        if begun and not resume:
            raise UserError(f"OUT_DIR '{out}' already holds parts of shard {shard[0]}/{shard[1]}; pass --resume to "
                            "continue that preparation or choose an empty folder")
        tokenizer = load_tokenizer(out / "tokenizer")
        build.write_parts(out, cfg.data, parts, plan, tokenizer, shard, workers, progress)
        if shard[1] > 1:
            return plan
    return build.merge(out, plan, cfg.data)


@guarded
def main(argv: list[str]) -> int:
    parser = ArgParser(prog="mtp-prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML whose data section names the corpus and tokenizer")
    parser.add_argument("out_dir", help="folder for tokenizer/, parts/ and data_manifest.json")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.max_bytes=1000000")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = in this process)")
    parser.add_argument("--shard", default="0/1", help="I/N: prepare parts k with k mod N == I (one machine of N)")
    parser.add_argument("--tokenizer-only", action="store_true", help="first step of a sharded preparation")
    parser.add_argument("--merge", action="store_true", help="last step of a sharded preparation")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted preparation in OUT_DIR")
    parser.add_argument("--part-bytes", type=int, default=sources.PART_BYTES, help="input bytes per part (first step only: the plan keeps it)")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.part_bytes <= 0:
        raise UserError(f"--workers={args.workers} --part-bytes={args.part_bytes}: use workers >= 0, part bytes > 0")
    shard = parse_shard(args.shard)
    rerun = "choose another OUT_DIR; then rerun with --resume, which keeps the finished parts"
    with full_disk_in(args.out_dir, "the prepared data", rerun):  # an unfinished part is redone, never passed off
        result = prepare(args.config, args.out_dir, args.overrides, workers=args.workers, shard=shard,
                         resume=args.resume, tokenizer_only=args.tokenizer_only, merge_only=args.merge,
                         part_bytes=args.part_bytes, progress=sys.stderr.isatty())
    if "totals" not in result:
        print(f"{args.out_dir}: {result['parts']} parts planned ({result['tokenizer']}); next: "
              + ("--shard I/N on each machine" if args.tokenizer_only else "--merge once every shard is done"))
        return 0
    totals = result["totals"]
    print(f"prepared {args.out_dir}: " + ", ".join(
        f"{s} {totals[s]['documents']} documents / {totals[s]['tokens']} tokens" for s in sources.SPLITS)
        + f" ({result['tokenizer']}); train with data.source=prepared data.path={args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
