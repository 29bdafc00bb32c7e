"""The jitted train and eval steps: pure functions of a state pytree, with explicit shardings.

State = {"step": int32, "params": ..., "opt_state": ...}. The train step splits the global
batch into micro-batches (gradient accumulation), computes the MTP loss and gradient (memory
flat in n, see `loss.py`), applies AdamW and donates the old state; a step whose loss, gradient
norm or new parameters are not finite keeps the old state (`keep_if_finite`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtp_jax import sharding
from mtp_jax.config import TrainConfig
from mtp_jax.loss import as_metrics, head_counts, loss_weights, mtp_loss
from mtp_jax.loss_schedule import LossSchedule
from mtp_jax.model.transformer import MTP

State = dict[str, Any]


def keep_if_finite(new: State, old: State, metrics: dict) -> tuple[State, dict]:
    """The divergence guard: a step whose loss, gradient norm or new parameters are not finite keeps the
    old parameters and optimizer state and reports `skipped` = 1, which the loop counts before every save."""
    finite = lambda tree: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & finite(new["params"])
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, {k: old[k] for k in new})
    return kept, {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}


class StepFns:
    """Builds state shardings once and the jitted init/train/eval functions over one mesh."""

    def __init__(self, mtp: MTP, tx: optax.GradientTransformation, tcfg: TrainConfig, mesh: Mesh, rules: dict):
        self.mtp, self.tx, self.tcfg, self.mesh, self.rules = mtp, tx, tcfg, mesh, rules
        self.weights = loss_weights(mtp.cfg.mtp_heads, tcfg.loss_weights)  # evaluation
        self.schedule = LossSchedule(mtp.cfg.mtp_heads, tcfg)  # training: per-step weights
        abstract_params = mtp.abstract_params()
        param_sh = sharding.param_shardings(abstract_params, mtp.logical_axes(), mesh, rules)
        replicated = NamedSharding(mesh, P())
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_sh = optax.tree_map_params(
            tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: replicated
        )
        self.state_shardings: State = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
        self.abstract_state: State = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt},
            self.state_shardings,
        )
        self.batch_sharding = sharding.batch_sharding(mesh, rules)
        self.replicated = replicated
        sharding.check_batch(tcfg.batch_size // tcfg.micro_batches, mesh, rules)

    def init(self, key: jax.Array) -> State:
        def make(k):
            params = self.mtp.init(k)
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

        return jax.jit(make, out_shardings=self.state_shardings)(key)

    def _loss(self, params, batch, counts_N=None, weights_N=None):
        weights_N = self.weights if weights_N is None else weights_N
        return mtp_loss(self.mtp, params, batch, weights_N, self.tcfg.ce_chunk, self.tcfg.step_impl, counts_N)

    def _train(self, state: State, batch: dict) -> tuple[State, dict]:
        m = self.tcfg.micro_batches
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)

        def micro(b):  # (B, L) -> (M, B/M, L): micro-batch j = rows j, j+M, ... so every device keeps its share
            b = b.reshape(b.shape[0] // m, m, b.shape[1]).swapaxes(0, 1)
            return sharding.constrain(b, (None, "batch", None))

        # Token-weighted: every micro-batch divides by the whole batch's valid-target counts, so the
        # summed losses and gradients equal the whole batch's even when micro-batches differ in size.
        counts_N = head_counts(batch["segment_ids"], self.mtp.cfg.mtp_heads)
        weights_N = self.schedule.weights_at(state["step"])

        def gradient(mb):
            (loss, aux), grads = grad_fn(state["params"], mb, counts_N, weights_N)
            return grads, as_metrics(loss, aux)

        def accumulate(carry, mb):
            add = lambda a, g: a + g.astype(jnp.float32)
            return jax.tree.map(add, carry, gradient(mb)), None

        if m == 1:  # the gradient as it comes: no zeroed float32 accumulator, no pass adding into it
            grads, metrics = gradient(batch)
        else:
            zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
            micro_batches = jax.tree.map(micro, batch)
            first = jax.tree.map(lambda b: b[0], micro_batches)
            metrics_shape = jax.eval_shape(lambda p, b: as_metrics(*self._loss(p, b)), state["params"], first)
            (grads, metrics), _ = jax.lax.scan(accumulate, (zeros(state["params"]), zeros(metrics_shape)),
                                               micro_batches)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        kept, metrics = keep_if_finite({"params": params, "opt_state": opt_state}, state, metrics)
        return {"step": state["step"] + 1, **kept}, metrics

    @functools.cached_property
    def train_step(self) -> Callable[[State, dict], tuple[State, dict]]:
        def step(state, batch):
            with sharding.activate(self.mesh, self.rules):
                return self._train(state, batch)

        return jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )

    @functools.cached_property
    def param_norm(self) -> Callable[[Any], jax.Array]:
        """The parameters' global norm as one compiled program that every process runs (op-by-op
        arithmetic on arrays spread over several processes can leave them waiting on each other)."""
        return jax.jit(optax.global_norm, in_shardings=(self.state_shardings["params"],),
                       out_shardings=self.replicated)

    @functools.cached_property
    def eval_step(self) -> Callable[[dict, dict], dict]:
        """Forward-only per-head loss and accuracy of one batch (no gradients, memory flat)."""

        def step(params, batch):
            with sharding.activate(self.mesh, self.rules):
                loss, aux = mtp_loss(self.mtp, params, batch, self.weights, self.tcfg.ce_chunk, "flat")
                return as_metrics(loss, aux)

        return jax.jit(
            step, in_shardings=(self.state_shardings["params"], self.batch_sharding), out_shardings=self.replicated
        )
