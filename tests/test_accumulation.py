"""Token-weighted gradient accumulation: micro-batches with very different numbers of valid
targets give the whole batch's loss and gradient (one SGD step's parameter change is the
gradient itself), not the mean of per-micro-batch means."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtp_jax import sharding
from mtp_jax.config import MeshConfig
from mtp_jax.model.transformer import MTP
from mtp_jax.step import StepFns

LR = 0.5


def one_step(cfg, params, batch, micro: int):
    cfg.train.micro_batches = micro
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    fns = StepFns(MTP(cfg.model), optax.sgd(LR), cfg.train, mesh, sharding.rules_dict(cfg.mesh.rules))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": fns.tx.init(params)}
    state = jax.device_put(state, fns.state_shardings)
    state, metrics = fns.train_step(state, batch)
    return jax.device_get(metrics), jax.device_get(state["params"])


@pytest.mark.slow  # three train-step compiles
def test_unequal_micro_batches_match_the_whole_batch(tiny, make_batch):
    cfg = tiny(model__mtp_heads=2, model__n_layers=3, train__batch_size=4, train__seq_len=16, train__ce_chunk=8)
    batch = make_batch(4, 18, cfg.model.vocab_size, seed=1)
    # Micro-batch j holds rows j and j + 2: give micro-batch 1 (rows 1, 3) mostly padding.
    batch["segment_ids"][1, 5:] = 0
    batch["segment_ids"][3, 3:] = 0
    valid = [(batch["segment_ids"][r, 1:17] != 0).sum() for r in range(4)]
    assert valid[0] + valid[2] > 3 * (valid[1] + valid[3]), "premise: unequal valid targets per micro-batch"
    params = jax.device_get(jax.jit(MTP(cfg.model).init)(jax.random.key(0)))

    whole_m, whole_p = one_step(cfg, params, batch, 1)
    micro_m, micro_p = one_step(cfg, params, batch, 2)
    for key in ("loss", "loss/head_1", "loss/head_2", "accuracy/head_2", "grad_norm"):
        np.testing.assert_allclose(micro_m[key], whole_m[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), micro_p, whole_p)

    _, four_p = one_step(cfg, params, batch, 4)  # one row per micro-batch: 2 to 16 valid targets each
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), four_p, whole_p)
