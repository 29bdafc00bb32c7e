"""Plain greedy vs self-speculative greedy decoding of a trained run.

    python -m mtp_jax.benchmarks.decode RUN_DIR [--prompt-len 128] [--new-tokens 128]
                                                [--num-prompts 8] [--batch-sizes 1,8]

Prompts are the first --prompt-len tokens of held-out (val) windows of the run's data; if the
data cannot be loaded, random token prompts instead (the JSON says which). For every batch size:
plain greedy, then speculative greedy for every k in 1..n, each run once untimed (compile and
warm-up) before it is timed. No stop tokens: every method generates exactly --new-tokens per
prompt, so wall-clock speedups compare equal work; each figure is the fastest of three
rounds. Every speculative completion is checked against plain greedy and mismatches are
reported. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mtp_jax.errors import ArgParser, ConfigError, guarded
from mtp_jax.decode.generate import Result, generate
from mtp_jax.decode.speculative import speculative_generate


def held_out_prompts(cfg: Any, tokenizer: Any, run_dir: Path, prompt_len: int, count: int) -> tuple[np.ndarray, str]:
    """(count, prompt_len) prompt ids and where they came from ('val' or 'random')."""
    try:
        from mtp_jax.data.pipeline import make_eval_batches

        batches = make_eval_batches(cfg, tokenizer, run_dir, -(-count // cfg.train.batch_size))
        rows = np.concatenate([b["tokens"][b["segment_ids"][:, 0] > 0] for b in batches])
        source = "val"
    except (ImportError, ConfigError, OSError) as err:
        print(f"held-out data unavailable ({type(err).__name__}: {err}); using random prompts", file=sys.stderr)
        ids = np.setdiff1d(np.arange(min(cfg.model.vocab_size, 256)), [tokenizer.eot_id])
        rows, source = np.random.default_rng(0).choice(ids, (count, prompt_len)), "random"
    if len(rows) == 0:
        raise ConfigError(f"the val split of '{run_dir}' has no windows to take prompts from")
    if rows.shape[1] < prompt_len:
        raise ConfigError(f"--prompt-len {prompt_len} exceeds the run's windows of {rows.shape[1]} tokens; "
                          "pass a smaller one")
    return rows[np.arange(count) % len(rows), :prompt_len].astype(np.int32), source


def measure(decode: Callable[[list[list[int]]], Result], batches: list[list[list[int]]],
            rounds: int = 3) -> tuple[dict, list]:
    """Figures over all batches, from the fastest of `rounds` rounds after one untimed run of
    the first batch (shared CPUs and GPUs are noisy); and the completions."""
    decode(batches[0])
    wall_of = lambda results: sum(r.stats.wall_s for r in results)
    results = min(([decode(b) for b in batches] for _ in range(rounds)), key=wall_of)
    new, wall = sum(r.stats.tokens_generated for r in results), wall_of(results)
    passes = int(sum(r.passes.sum() for r in results))
    figures = {"tokens_per_forward": round(new / passes, 3), "tokens_per_s": round(new / wall, 1),
               "wall_s": round(wall, 4)}
    return figures, [c for r in results for c in r.completions()]


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def benchmark(mtp: Any, params: Any, prompts: np.ndarray, new_tokens: int, batch_sizes: list[int]) -> tuple[dict, list]:
    """{batch size: {method: figures}} and a list of mismatches against plain greedy."""
    report, mismatches = {}, []
    for size in batch_sizes:
        count = -(-len(prompts) // size) * size
        rows = [prompts[i % len(prompts)].tolist() for i in range(count)]
        batches = [rows[i : i + size] for i in range(0, count, size)]
        greedy, reference = measure(lambda b: generate(mtp, params, b, new_tokens), batches)
        report[str(size)] = {"greedy": greedy}
        print(f"batch {size} greedy: {greedy}")
        for k in range(1, mtp.cfg.mtp_heads + 1):
            spec, completions = measure(lambda b: speculative_generate(mtp, params, b, k, new_tokens), batches)
            spec["speedup"] = round(spec["tokens_per_s"] / greedy["tokens_per_s"], 3)
            bad = [i for i, (c, r) in enumerate(zip(completions, reference)) if c != r]
            spec["matches_greedy"] = not bad
            mismatches += [{"batch_size": size, "k": k, "prompt": i % len(prompts),
                            "position": first_difference(completions[i], reference[i])} for i in bad]
            report[str(size)][f"k={k}"] = spec
            print(f"batch {size} speculative k={k}: {spec}")
    return report, mismatches


@guarded
def main(argv: list[str]) -> int:
    ap = ArgParser(prog="python -m mtp_jax.benchmarks.decode", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r} must be comma-separated integers, e.g. 1,8") from None
    if min(sizes + [args.prompt_len, args.new_tokens, args.num_prompts]) < 1:
        raise ConfigError("batch sizes, --prompt-len, --new-tokens and --num-prompts must be positive integers")
    from mtp_jax.run import load_run

    cfg, tokenizer, mtp, params = load_run(args.run_dir)
    prompts, source = held_out_prompts(cfg, tokenizer, Path(args.run_dir), args.prompt_len, args.num_prompts)
    report, mismatches = benchmark(mtp, params, prompts, args.new_tokens, sizes)
    for m in mismatches:
        print(f"MISMATCH: {m}", file=sys.stderr)
    print(json.dumps({"run_dir": str(args.run_dir), "device": jax.devices()[0].device_kind, "prompt_source": source,
                      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "num_prompts": args.num_prompts,
                      "heads": mtp.cfg.mtp_heads, "results": report, "mismatches": mismatches}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
