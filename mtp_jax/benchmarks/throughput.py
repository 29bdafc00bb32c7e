"""Training throughput of n = 4 against a parameter-matched n = 1, in model FLOP/s.

Both models have the same total depth (n = 4 turns 4 of the n_layers blocks into heads), so
n = 4 does more work per token only through its 3 extra unembeddings; FLOP/s (tokens/s x
`model_flops_per_token`) says whether that work runs as efficiently as the n = 1 step.
The n = 1 figure is the faster of
- `n1_mtp`: the framework's train step (`StepFns`) at mtp_heads = 1, the same code path as n = 4;
- `n1_plain`: an ordinary next-token step built from the same pieces: all n_layers blocks in
  one scan, final norm, unembedding, full-logits cross-entropy, plain autodiff, same AdamW.
Timed rounds alternate between the models (warm-up first, order reversed every round), so
slow drift hits all of them alike; each model's median round is reported. As a check on the
noise, the JSON also holds the median over rounds of the ratio within each round (the models
run back to back there). Runs on one device. Prints one JSON object as its
last line:
  {"n1": {...}, "n1_mtp": {...}, "n1_plain": {...}, "n4": {...}, "ratio_flops_per_s_n4_over_n1": x}

    python -m mtp_jax.benchmarks.throughput [--d-model 256] [--n-layers 6] [--seq 256] [--batch 4] ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtp_jax import sharding
from mtp_jax.config import MeshConfig, ModelConfig, OptimConfig, TrainConfig
from mtp_jax.flops import model_flops_per_token, peak_flops
from mtp_jax.model.transformer import MTP
from mtp_jax.optim import make_optimizer
from mtp_jax.step import StepFns

Step = Callable[[Any, dict], tuple[Any, dict]]


class Timed:
    """One model's jitted step, its state (donated and threaded through) and a fixed batch on device."""

    def __init__(self, name: str, step: Step, state: Any, batch: dict, tokens_per_step: int, flops_per_token: float):
        self.name, self.step, self.state, self.batch = name, step, state, batch
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.rounds: list[float] = []  # tokens/s of each timed round
        self.losses: list[float] = []  # loss of the last step of each run

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps, waiting for the last result."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        seconds = time.perf_counter() - start
        self.losses.append(float(metrics["loss"]))
        return seconds

    @property
    def tokens_per_s(self) -> float:
        """The median round: alternation spreads slow drift over every model, the median drops bursts."""
        return statistics.median(self.rounds)

    def summary(self, source: str, peak: float | None) -> dict:
        flops_per_s = self.tokens_per_s * self.flops_per_token
        return {
            "tokens_per_s": self.tokens_per_s,
            "flops_per_token": self.flops_per_token,
            "flops_per_s": flops_per_s,
            "source": source,
            "mfu": flops_per_s / peak if peak else None,
            "best_round_tokens_per_s": max(self.rounds),
            "rounds_tokens_per_s": [round(r, 1) for r in self.rounds],
        }


def random_batch(cfg: ModelConfig, tcfg: TrainConfig, seed: int) -> dict[str, np.ndarray]:
    """Uniform random windows of seq_len + n tokens, one document per row (throughput does not
    depend on the text)."""
    shape = (tcfg.batch_size, tcfg.seq_len + cfg.mtp_heads)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.ones(shape, np.int32)}


def mtp_model(name: str, cfg: ModelConfig, tcfg: TrainConfig, ocfg: OptimConfig, mesh: Any) -> Timed:
    """The framework's own train step (memory-flat heads, chunked cross-entropy)."""
    mtp = MTP(cfg)
    fns = StepFns(mtp, make_optimizer(ocfg, 1000, mtp.logical_axes()), tcfg, mesh, sharding.rules_dict(MeshConfig().rules))
    batch = jax.device_put(random_batch(cfg, tcfg, seed=0), fns.batch_sharding)
    tokens = tcfg.batch_size * tcfg.seq_len
    return Timed(name, fns.train_step, fns.init(jax.random.key(0)), batch, tokens, model_flops_per_token(cfg, tcfg.seq_len))


def without_heads(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "heads"}


def plain_model(cfg: ModelConfig, tcfg: TrainConfig, ocfg: OptimConfig, device: jax.Device) -> Timed:
    """An ordinary next-token step from the MTP pieces: an n = 1 model's head block appended to
    its trunk stack, all n_layers blocks in one scan, full (B, T, V) logits, optax's integer-label
    cross-entropy, plain autodiff."""
    assert cfg.mtp_heads == 1 and cfg.head_type == "transformer"
    mtp = MTP(cfg)
    tx = make_optimizer(ocfg, 1000, without_heads(mtp.logical_axes()))  # same axis names, same decay mask

    def loss_fn(params: dict, tokens: jax.Array) -> jax.Array:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
        h_BTD, _ = mtp.trunk(params, inputs, positions)  # scans params["trunk"]: all n_layers blocks
        logits_BTV = mtp.logits(mtp.shared(params), h_BTD)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets))

    def step(state: dict, tokens: jax.Array) -> tuple[dict, dict]:
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], tokens)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, {"loss": loss}

    def init(key: jax.Array) -> dict:
        params = mtp.init(key)
        blocks = jax.tree.map(lambda t, h: jnp.concatenate([t, h]), params["trunk"], params["heads"])
        params = {**without_heads(params), "trunk": blocks}
        return {"params": params, "opt_state": tx.init(params)}

    state = jax.device_put(jax.jit(init)(jax.random.key(0)), device)
    tokens = jax.device_put(random_batch(cfg, tcfg, seed=0)["tokens"], device)
    n_tokens = tcfg.batch_size * tcfg.seq_len
    return Timed("n1_plain", jax.jit(step, donate_argnums=0), state, tokens, n_tokens, model_flops_per_token(cfg, tcfg.seq_len))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=6, help="total depth of both models (trunk + head blocks)")
    ap.add_argument("--attn-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4, help="n of the multi-token model")
    ap.add_argument("--ce-chunk", type=int, default=TrainConfig.ce_chunk)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model after compiling")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed round")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain next-token step")
    args = ap.parse_args(argv)
    if args.heads < 2:
        ap.error(f"--heads={args.heads}: the multi-token model needs n >= 2 (n = 1 is always measured)")

    def model_cfg(n: int) -> ModelConfig:
        return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                           attn_heads=args.attn_heads, mtp_heads=n, dtype=args.dtype)

    tcfg = TrainConfig(batch_size=args.batch, seq_len=args.seq, ce_chunk=args.ce_chunk)
    ocfg = OptimConfig()
    device = jax.devices()[0]
    mesh = sharding.make_mesh(MeshConfig(data=1), [device])
    models = [mtp_model("n1_mtp", model_cfg(1), tcfg, ocfg, mesh), mtp_model(f"n{args.heads}", model_cfg(args.heads), tcfg, ocfg, mesh)]
    if not args.no_plain:
        models.append(plain_model(model_cfg(1), tcfg, ocfg, device))
    for m in models:
        start = time.perf_counter()
        m.run(1)  # compile; its loss is the initial loss
        m.run(args.warmup)
        print(f"{m.name:9s} compiled and warmed up in {time.perf_counter() - start:.1f} s", flush=True)
    for r in range(args.rounds):
        order = models if r % 2 == 0 else models[::-1]  # alternate, so drift hits every model alike
        for m in order:
            seconds = m.run(args.steps)
            m.rounds.append(m.tokens_per_step * args.steps / seconds)
            print(f"round {r + 1} {m.name:9s} {seconds / args.steps:.3f} s/step  {m.rounds[-1]:9.0f} tokens/s", flush=True)

    by_name = {m.name: m for m in models}
    n1_models = [m for m in models if m.name.startswith("n1_")]
    n1, nk = max(n1_models, key=lambda m: m.tokens_per_s), by_name[f"n{args.heads}"]
    peak = peak_flops(device)
    source = lambda m: m.name.removeprefix("n1_") if m.name.startswith("n1_") else "mtp"
    flops_ratio = lambda nk_tokens_per_s, n1_tokens_per_s: (nk_tokens_per_s * nk.flops_per_token) / (
        n1_tokens_per_s * n1.flops_per_token
    )
    result = {
        "n1": n1.summary(source(n1), peak),
        **{m.name: m.summary(source(m), peak) for m in models},
        f"ratio_flops_per_s_n{args.heads}_over_n1": flops_ratio(nk.tokens_per_s, n1.tokens_per_s),
        f"ratio_within_rounds_median_n{args.heads}_over_n1": statistics.median(
            flops_ratio(nk.rounds[r], max(m.rounds[r] for m in n1_models)) for r in range(args.rounds)
        ),
        # Same init, same tokens: the plain step must see the n = 1 model's initial loss.
        "n1_plain_minus_mtp_initial_loss": by_name["n1_plain"].losses[0] - by_name["n1_mtp"].losses[0] if not args.no_plain else None,
        "device": device.device_kind,
        "peak_flops": peak,
        "config": vars(args),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
