"""Self-speculative decoding split into its two factors: what a pass accepts, and what it costs.

    python -m mtp_jax.benchmarks.decode RUN_DIR [--prompt-len 64] [--new-tokens 48] [--num-prompts 8]
                                                [--ks 2,4] [--rounds 3] [--large]

Prompts are the first --prompt-len tokens of held-out (val) documents at least that long, so no
prompt crosses a document boundary (decoding masks none); if the data cannot be loaded, random
token prompts (the JSON says which). No stop tokens: every method generates --new-tokens.

- acceptance (batch 1, greedy, chain k in --ks): tokens per decoding pass with the prefill
  excluded (the paper's count) and included, per-head acceptance rates (head i's draft accepted
  given heads 2..i-1 were, replayed on the output with one no-cache forward), and each
  completion's fraction of tokens inside a repeated 8-gram (loops inflate acceptance).
- wall clock: plain greedy and speculative k on the same prompts at batch 1, alternated rounds,
  each prompt's fastest round; speedup over all prompts and over those whose completion has a
  repeated-8-gram fraction <= 0.2. Every speculative output is checked against plain greedy.
- tree: greedy tree verification (`--tree` widths, at most 64 nodes by default) on the same
  prompts: tokens per decoding pass and speedup beside the chain with the same heads.
- pass cost: one k-token verify pass (reduced: trunk + head 1 over k, heads 2..k write keys and
  values and run one query) and the full pass (every head over k) over a 1-token plain step, and
  the floor: trunk + head 1 over k tokens over the same over 1 token, all in one run with donated
  caches, at batch 1 and 8, for the trained model and random-initialised models of quickstart
  shape (and with --large, 59M and 270M parameters: CPU batch-1 decoding is memory-bound there).

The last line printed is one JSON object.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.config import ModelConfig
from mtp_jax.data.tokenizer import document_start
from mtp_jax.decode.acceptance import repeated_ngram_fraction, replay
from mtp_jax.decode.generate import generate, logits
from mtp_jax.decode.passes import forward_step, verify_pass
from mtp_jax.decode.prompts import document_starts
from mtp_jax.decode.speculative import speculative_generate
from mtp_jax.decode.tree import make_tree, tree_generate
from mtp_jax.errors import ArgParser, ConfigError, guarded
from mtp_jax.model.transformer import MTP

REPEAT_LIMIT = 0.2  # completions above this repeated-8-gram fraction are left out of the filtered speedup
# (trunk blocks, shape): with n = 4 heads, 59M and 270M parameters
LARGE = {"59M": (4, dict(d_model=512, attn_heads=8, vocab_size=32768)),
         "270M": (12, dict(d_model=1024, attn_heads=16, vocab_size=32768))}


def held_out_prompts(cfg: Any, tokenizer: Any, run_dir: Path, prompt_len: int, count: int) -> tuple[np.ndarray, str]:
    """(count, prompt_len) ids: the starts of held-out documents, and 'val' (or 'random')."""
    try:
        from mtp_jax.data.build import dataset_folder

        return document_starts(dataset_folder(cfg, tokenizer, run_dir), prompt_len, count), "val"
    except (ImportError, OSError) as err:
        print(f"held-out data unavailable ({type(err).__name__}: {err}); using random prompts", file=sys.stderr)
        ids = np.setdiff1d(np.arange(min(cfg.model.vocab_size, 256)), [tokenizer.eot_id])
        prompts = np.random.default_rng(0).choice(ids, (count, prompt_len)).astype(np.int32)
        start = document_start(tokenizer)  # a document opens as in training
        prompts[:, : len(start)] = start
        return prompts, "random"


def random_params(mtp: MTP, seed: int) -> dict:
    """N(0, 0.02) weights and unit norm scales, drawn with NumPy (fast for 300M parameters)."""
    rng = np.random.default_rng(seed)
    leaf = lambda path, x: np.ones(x.shape, np.float32) if path[-1].key == "scale" else (
        0.02 * rng.standard_normal(x.shape, np.float32))
    return jax.tree_util.tree_map_with_path(leaf, mtp.abstract_params())


# --- acceptance and wall clock ----------------------------------------------------------------
@functools.cache
def jitted_forward(mtp: MTP) -> Callable:
    return jax.jit(mtp.forward)


def acceptance(mtp: MTP, params: Any, prompts: np.ndarray, results: list, k: int) -> dict:
    """Tokens per pass and per-head acceptance of batch-1 greedy results, and their repetition."""
    sequences = np.stack([r.tokens[0] for r in results])
    known_B = np.full(len(sequences), prompts.shape[1], np.int32)  # sequential heads read the prompt's tokens
    drafts_NBTV = jitted_forward(mtp)(params, sequences, None, None, known_B)[1:k]
    drafts_BTJ = np.asarray(jnp.argmax(drafts_NBTV, axis=-1)).transpose(1, 2, 0)
    attempts, accepted, passes = np.zeros(k - 1), np.zeros(k - 1), 0
    for seq, drafts_TJ in zip(sequences, drafts_BTJ):
        a, ok, p = replay(seq.tolist(), prompts.shape[1], drafts_TJ)
        attempts, accepted, passes = attempts + a, accepted + ok, passes + p
    new = sum(r.stats.tokens_generated for r in results)
    assert passes == sum(int(r.passes[0]) - 1 for r in results), "replay disagrees with the decoder"
    return {"tokens_per_decoding_pass": round((new - len(results)) / max(passes, 1), 3),
            "tokens_per_pass_with_prefill": round(new / (passes + len(results)), 3),
            "head_acceptance": [round(float(x), 3) for x in accepted / np.maximum(attempts, 1)]}


def default_widths(heads: int, budget: int = 64) -> list[int]:
    """Children per depth of a tree of at most `budget` nodes, widened from the shallowest depth."""
    widths, grown = [1] * (heads - 1), True
    while grown:
        grown = False
        for d in range(heads - 1):
            wider = widths[:d] + [widths[d] + 1] + widths[d + 1 :]
            if len(make_tree(wider).depth) <= budget:
                widths, grown = wider, True
    return widths


def wall_clock(mtp: MTP, params: Any, prompts: np.ndarray, new_tokens: int, ks: list[int], rounds: int,
               widths: list[int]) -> dict:
    """Per-k acceptance, the tree's, and speedups over plain greedy, batch 1, alternated rounds."""
    rows = [[p.tolist()] for p in prompts]
    methods: dict[str, Callable] = {"greedy": lambda b: generate(mtp, params, b, new_tokens)}
    methods |= {f"k={k}": functools.partial(lambda b, k: speculative_generate(mtp, params, b, k, new_tokens), k=k)
                for k in ks}
    methods["tree"] = lambda b: tree_generate(mtp, params, b, widths, new_tokens)
    best = {(m, clock): [np.inf] * len(rows) for m in methods for clock in ("wall", "cpu")}
    last: dict[str, list] = {}
    for fn in methods.values():
        fn(rows[0])  # compile and warm up
    for _ in range(rounds):
        for name, fn in methods.items():
            last[name] = [fn(row) for row in rows]
            for clock in ("wall", "cpu"):
                seconds = [getattr(r.stats, f"{clock}_s") for r in last[name]]
                best[name, clock] = [min(b, x) for b, x in zip(best[name, clock], seconds)]
    reference = [r.completions()[0] for r in last["greedy"]]
    repeat = [repeated_ngram_fraction(c) for c in reference]
    keep = [i for i, x in enumerate(repeat) if x <= REPEAT_LIMIT]
    report = {"greedy_ms_per_token": round(1e3 * sum(best["greedy", "wall"]) / (len(rows) * new_tokens), 3),
              "repeated_8gram_fraction": [round(x, 3) for x in repeat], "prompts_kept": len(keep)}
    for name in methods:
        if name == "greedy":
            continue
        speedup = lambda idx, clock="wall": round(sum(best["greedy", clock][i] for i in idx) /
                                                  sum(best[name, clock][i] for i in idx), 3) if idx else None
        new, passes = sum(r.stats.tokens_generated for r in last[name]), sum(int(r.passes[0]) for r in last[name])
        figures = ({"widths": widths, "nodes": len(make_tree(widths).depth),
                    "tokens_per_decoding_pass": round((new - len(rows)) / (passes - len(rows)), 3),
                    "tokens_per_pass_with_prefill": round(new / passes, 3)} if name == "tree"
                   else acceptance(mtp, params, prompts, last[name], int(name[2:])))
        report[name] = {**figures, "speedup": speedup(range(len(rows))), "speedup_kept": speedup(keep),
                        "cpu_time_speedup": speedup(range(len(rows)), "cpu"),
                        "cpu_time_speedup_kept": speedup(keep, "cpu"),
                        "matches_greedy": [r.completions()[0] for r in last[name]] == reference}
        print(f"{name}: {report[name]}", file=sys.stderr)
    return report


# --- pass cost --------------------------------------------------------------------------------
def _plain(mtp, params, cache, tokens_BT, positions_BT):
    """Trunk + head 1 over the fed tokens and their argmax: a plain step when T = 1, the floor at T = k."""
    h_NBTD, cache = forward_step(mtp, params, cache, tokens_BT, positions_BT, 1)
    return jnp.argmax(logits(mtp, params, h_NBTD[0]), axis=-1), cache


def _verify(mtp, params, cache, tokens_BT, positions_BT, reduced):
    """A k-token verify pass: head 1's argmax at every fed position, heads 2..k's at the last."""
    logits_BTV, draft = verify_pass(mtp, params, cache, tokens_BT, positions_BT, tokens_BT.shape[1], reduced)
    logits_BJV, cache = draft(jnp.full(tokens_BT.shape[:1], tokens_BT.shape[1] - 1))
    return (jnp.argmax(logits_BTV, axis=-1), jnp.argmax(logits_BJV, axis=-1)), cache


PASSES = {name: jax.jit(fn, static_argnums=0, donate_argnums=2) for name, fn in
          [("plain", _plain), ("reduced", functools.partial(_verify, reduced=True)),
           ("wide", functools.partial(_verify, reduced=False))]}


def pass_cost(mtp: MTP, params: Any, batch: int, ks: list[int], rounds: int, calls: int = 5, slots: int = 128) -> dict:
    """ms per call of each pass, medians over alternated rounds, and the ratios to a plain step."""
    cases = {"plain": ("plain", 1)} | {f"{p}_k={k}": (p, k) for k in ks for p in ("reduced", "wide", "plain")}
    caches = {c: mtp.init_cache(batch, slots) for c in cases}
    times: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(rounds + 1):  # round 0 compiles and warms up
        for case, (name, k) in cases.items():
            tokens = np.ones((batch, k), np.int32)
            positions = np.broadcast_to(slots // 2 + np.arange(k), (batch, k)).astype(np.int32)
            t0 = time.perf_counter()
            for _ in range(calls):
                out, caches[case] = PASSES[name](mtp, params, caches[case], tokens, positions)
            jax.block_until_ready(out)
            if r:
                times[case].append((time.perf_counter() - t0) / calls)
    ms = {c: statistics.median(t) * 1e3 for c, t in times.items()}
    report: dict[str, Any] = {"plain_ms": round(ms["plain"], 3)}
    for k in ks:
        floor = ms[f"plain_k={k}"]
        report[f"k={k}"] = {"reduced": round(ms[f"reduced_k={k}"] / ms["plain"], 3),
                            "wide": round(ms[f"wide_k={k}"] / ms["plain"], 3),
                            "floor": round(floor / ms["plain"], 3),
                            "reduced_over_floor": round(ms[f"reduced_k={k}"] / floor, 3),
                            "wide_over_floor": round(ms[f"wide_k={k}"] / floor, 3)}
    return report


def cost_models(run_cfg: ModelConfig, large: bool) -> dict[str, ModelConfig]:
    """Random-initialised models with the run's head count: its own shape, and with --large 59M and 270M."""
    base = {f: getattr(run_cfg, f) for f in ("d_model", "n_layers", "attn_heads", "vocab_size", "mtp_heads")}
    big = {name: {**base, **s, "n_layers": trunk + base["mtp_heads"]} for name, (trunk, s) in LARGE.items()}
    shapes = {"random_run_shape": base} | (big if large else {})
    return {name: ModelConfig(**s) for name, s in shapes.items()}


def parse_ints(value: str, flag: str) -> list[int]:
    try:
        out = [int(s) for s in value.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {value!r} must be comma-separated integers, e.g. 2,4") from None
    if min(out) < 1:
        raise ConfigError(f"{flag} {value!r} must hold positive integers")
    return out


@guarded
def main(argv: list[str]) -> int:
    ap = ArgParser(prog="python -m mtp_jax.benchmarks.decode", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--ks", default="", help="chain lengths, comma-separated (default 2..n)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", default="", help="children per depth of the candidate tree, e.g. 4,3,3 "
                    "(default: widest with at most 64 nodes over heads 2..n)")
    ap.add_argument("--batch-sizes", default="1,8", help="batch sizes of the pass-cost part")
    ap.add_argument("--large", action="store_true", help="pass cost of random 59M and 270M models too (minutes)")
    ap.add_argument("--cost-only", action="store_true", help="skip the decoding part (acceptance, wall clock)")
    args = ap.parse_args(argv)
    sizes = parse_ints(args.batch_sizes, "--batch-sizes")
    if min(args.prompt_len, args.new_tokens, args.num_prompts, args.rounds) < 1:
        raise ConfigError("--prompt-len, --new-tokens, --num-prompts and --rounds must be positive integers")
    from mtp_jax.run import load_run, read_config

    heads = read_config(args.run_dir).model.mtp_heads
    ks = parse_ints(args.ks, "--ks") if args.ks else list(range(2, heads + 1))
    if max(ks) > heads or min(ks) < 2:
        raise ConfigError(f"--ks {args.ks} must lie in 2..{heads}, the run's heads")
    widths = parse_ints(args.tree, "--tree") if args.tree else default_widths(heads)
    if len(widths) > heads - 1:
        raise ConfigError(f"--tree {args.tree} has {len(widths)} depths; the run drafts with {heads - 1} heads")
    cfg, tokenizer, mtp, params = load_run(args.run_dir)
    prompts, source = held_out_prompts(cfg, tokenizer, Path(args.run_dir), args.prompt_len, args.num_prompts)
    report: dict[str, Any] = {"run_dir": str(args.run_dir), "device": jax.devices()[0].device_kind,
                              "prompt_source": source, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                              "num_prompts": args.num_prompts, "heads": heads, "ks": ks}
    if not args.cost_only:
        report["decoding"] = wall_clock(mtp, params, prompts, args.new_tokens, ks, args.rounds, widths)
    randoms = cost_models(cfg.model, args.large)
    models = {"trained": (mtp, params)} | {name: (MTP(c), None) for name, c in randoms.items()}
    report["pass_cost"] = {}
    for name, (model, weights) in models.items():
        weights = weights if weights is not None else random_params(model, 0)
        count = sum(x.size for x in jax.tree.leaves(weights))
        report["pass_cost"][name] = {"params": count} | {f"batch={b}": pass_cost(model, weights, b, ks, args.rounds)
                                                         for b in sizes}
        print(f"pass cost {name}: {report['pass_cost'][name]}", file=sys.stderr)
        del weights
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
