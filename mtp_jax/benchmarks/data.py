"""Data at scale: mtp-prepare and training start-up on 1x and 8x a corpus, and loader throughput.

The 1x corpus is the standard library's source (the default corpus's files), the 8x corpus eight
copies of it under new names (symbolic links in copy0/ ... copy7/), prepared with the byte
tokenizer. Every figure comes from a fresh child process in this one run, so ratios compare like
with like on a shared machine:
  - prepare: tokens/s, tokens/s per worker, peak RSS of the main process and of the largest worker;
  - start-up: seconds from an empty run directory to the first local batch (no model, so no
    compilation), peak RSS, and the bytes the run directory holds afterwards;
  - loader: tokens/s the train iterator delivers (packing and segment ids included) at --seq,
    in-process and with Grain workers, and at the quickstart's shape (seq 128, batch 16) against
    the tokens/s the quickstart model's compiled train step consumes there.
Prints one JSON object as its last line.

    python -m mtp_jax.benchmarks.data [--copies 8] [--workers 2] [--seq 4096] [--batches 40]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mtp_jax.errors import ArgParser, guarded

STARTUP = """
import json, resource, sys, time
from mtp_jax.config import load_config
from mtp_jax.data import build, pipeline
from mtp_jax.data.tokenizer import build_tokenizer
cfg = load_config(None, sys.argv[1:])
start = time.perf_counter()
tokenizer = build_tokenizer(cfg.data, cfg.train.run_dir)
folder = build.dataset_folder(cfg, tokenizer, cfg.train.run_dir)
batch = next(pipeline.make_train_iterator(cfg, tokenizer, folder))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

LOADER = """
import json, sys, time
from mtp_jax.config import load_config
from mtp_jax.data import build, pipeline
from mtp_jax.data.tokenizer import build_tokenizer
batches, cfg = int(sys.argv[1]), load_config(None, sys.argv[2:])
tokenizer = build_tokenizer(cfg.data, cfg.train.run_dir)
it = pipeline.make_train_iterator(cfg, tokenizer, build.dataset_folder(cfg, tokenizer, cfg.train.run_dir))
next(it)  # start-up and worker spawn excluded
start = time.perf_counter()
tokens = sum(next(it)["tokens"].size for _ in range(batches))
print(json.dumps({"tokens_per_s": tokens / (time.perf_counter() - start)}))
it.close()
"""

PREPARE = """
import json, resource, sys, time
from mtp_jax.data import prepare
start = time.perf_counter()
manifest = prepare.prepare(None, sys.argv[1], sys.argv[3:], workers=int(sys.argv[2]), progress=False)
seconds = time.perf_counter() - start
tokens = sum(t["tokens"] for t in manifest["totals"].values())
print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                  "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

STEP = """
import json, sys, time
import jax, numpy as np
from mtp_jax.config import load_config
from mtp_jax.run import build, resolve_vocab
cfg = resolve_vocab(load_config(sys.argv[1], sys.argv[2:]), 2048)
fns = build(cfg).fns
state = fns.init(jax.random.key(0))
shape = (cfg.train.batch_size, cfg.train.seq_len + cfg.model.mtp_heads)
local = {"tokens": np.ones(shape, np.int32), "segment_ids": np.ones(shape, np.int32)}
batch = {k: jax.make_array_from_process_local_data(fns.batch_sharding, v) for k, v in local.items()}
state, metrics = fns.train_step(state, batch)
jax.block_until_ready(metrics)  # compiled
start, steps = time.perf_counter(), 5
for _ in range(steps):
    state, metrics = fns.train_step(state, batch)
jax.block_until_ready(metrics)
print(json.dumps({"tokens_per_s": steps * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - start)}))
"""


def child(script: str, *args: str) -> dict:
    """Runs a script in a fresh interpreter; its last stdout line is a JSON object."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_corpus(root: Path, copies: int) -> Path:
    """`copies` copies of the standard library's corpus files under copy<i>/, as symbolic links."""
    from mtp_jax.config import load_config
    from mtp_jax.data.sources import input_files

    folder = root / f"corpus_{copies}x"
    for name, path in input_files(load_config(None, []).data):
        for i in range(copies):
            link = folder / f"copy{i}" / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return folder


def folder_bytes(folder: Path, read: bool = False) -> int:
    """Bytes of the files under `folder` (reading them all with read=True)."""
    return sum(len(p.read_bytes()) if read else p.stat().st_size for p in folder.rglob("*") if p.is_file())


@guarded
def main(argv: list[str]) -> int:
    ap = ArgParser(prog="python -m mtp_jax.benchmarks.data", description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=8, help="size of the large corpus in copies of the standard library")
    ap.add_argument("--workers", type=int, default=2, help="mtp-prepare worker processes and Grain workers")
    ap.add_argument("--seq", type=int, default=4096, help="train.seq_len of the start-up and loader runs")
    ap.add_argument("--batch", type=int, default=16, help="train.batch_size of the start-up and loader runs")
    ap.add_argument("--batches", type=int, default=40, help="batches timed per loader measurement")
    args = ap.parse_args(argv)
    quickstart = str(Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml")
    result: dict = {"corpus": "stdlib source, byte tokenizer", "copies": args.copies, "workers": args.workers,
                    "cpus": os.cpu_count(), "note": "one run on a shared CPU: compare the ratios"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder_bytes(make_corpus(root / "warm", 1), read=True)  # the 1x run must not pay for a cold page cache
        for copies in (1, args.copies):
            corpus, out, run = make_corpus(root, copies), root / f"prepared_{copies}x", root / f"run_{copies}x"
            prep = child(PREPARE, str(out), str(args.workers), "data.source=files", f"data.path={corpus}")
            prep["tokens_per_s_per_worker"] = prep["tokens_per_s"] / max(args.workers, 1)
            train = ["data.source=prepared", f"data.path={out}", f"train.run_dir={run}",
                     f"train.seq_len={args.seq}", f"train.batch_size={args.batch}"]
            start = child(STARTUP, *train)
            start["run_dir_bytes"] = folder_bytes(run)
            result[f"{copies}x"] = {"prepare": prep, "first_batch": start}
            if copies == 1:
                loader = {f"seq{args.seq}_grain_workers_{w}": child(LOADER, str(args.batches), *train,
                                                                   f"data.worker_count={w}")["tokens_per_s"]
                          for w in (0, args.workers)}
                small = [*train[:3], "train.seq_len=128", "train.batch_size=16"]
                loader["seq128_grain_workers_0"] = child(LOADER, str(args.batches * 8), *small)["tokens_per_s"]
                result["loader_tokens_per_s"] = loader
        big, one = result[f"{args.copies}x"], result["1x"]
        result["prepare_peak_rss_growth_mb"] = big["prepare"]["main_peak_rss_mb"] - one["prepare"]["main_peak_rss_mb"]
        result["prepare_worker_peak_rss_growth_mb"] = (big["prepare"]["worker_peak_rss_mb"]
                                                       - one["prepare"]["worker_peak_rss_mb"])
        result["first_batch_seconds_growth"] = big["first_batch"]["seconds"] - one["first_batch"]["seconds"]
        result["first_batch_peak_rss_growth_mb"] = big["first_batch"]["peak_rss_mb"] - one["first_batch"]["peak_rss_mb"]
        result["run_dir_bytes_growth"] = big["first_batch"]["run_dir_bytes"] - one["first_batch"]["run_dir_bytes"]
        step = child(STEP, quickstart)  # its shape: seq_len 128, batch 16
        result["quickstart_step_consumes_tokens_per_s"] = step["tokens_per_s"]
        result["loader_over_step"] = result["loader_tokens_per_s"]["seq128_grain_workers_0"] / step["tokens_per_s"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
