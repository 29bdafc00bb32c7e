"""The optimizer against AdamW written here in NumPy: clipping, warmup and cosine end points,
betas and bias correction, decoupled weight decay and which parameters it spares.

The reference follows the paper's recipe (AdamW, linear warmup from 0, cosine to
`final_lr_ratio` x peak, global-norm clipping, no decay on norm scales), not optax's code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.config import OptimConfig
from mtp_jax.model.transformer import MTP
from mtp_jax.optim import decay_mask, make_optimizer, schedule

OCFG = OptimConfig(lr=0.05, warmup_steps=3, final_lr_ratio=0.1, b1=0.8, b2=0.9, eps=1e-3, weight_decay=0.5,
                   clip_norm=1.0)
TOTAL = 9


def np_lr(step: int, o: OptimConfig = OCFG, total: int = TOTAL) -> float:
    """Learning rate of update number step + 1: 0 -> peak over warmup, then cosine to the floor."""
    if step < o.warmup_steps:
        return o.lr * step / o.warmup_steps
    frac = min(step - o.warmup_steps, total - o.warmup_steps) / (total - o.warmup_steps)
    end = o.lr * o.final_lr_ratio
    return end + (o.lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


def np_adamw(params: dict, grads_steps: list[dict], decayed: dict, o: OptimConfig = OCFG) -> list[dict]:
    """Parameters after each update."""
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    p, out = {k: x.astype(np.float64) for k, x in params.items()}, []
    for t, grads in enumerate(grads_steps, start=1):
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        clip = min(1.0, o.clip_norm / norm)
        lr = np_lr(t - 1, o)
        for k in p:
            g = grads[k] * clip
            m[k] = o.b1 * m[k] + (1 - o.b1) * g
            v[k] = o.b2 * v[k] + (1 - o.b2) * g * g
            update = (m[k] / (1 - o.b1**t)) / (np.sqrt(v[k] / (1 - o.b2**t)) + o.eps)
            p[k] = p[k] - lr * (update + (o.weight_decay * p[k] if decayed[k] else 0.0))
        out.append(dict(p))
    return out


@pytest.fixture(scope="module")
def model_tree(tiny) -> tuple[dict, dict]:
    """(logical axes, abstract parameters) of a tiny model with transformer heads, untied."""
    mtp = MTP(tiny(model__tie_embeddings=False).model)
    return mtp.logical_axes(), mtp.abstract_params()


def flat(tree: dict) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, tuple))[0]}


def test_schedule_end_points() -> None:
    lr = schedule(OCFG, TOTAL)
    got = [float(lr(s)) for s in range(TOTAL + 3)]
    np.testing.assert_allclose(got, [np_lr(s) for s in range(TOTAL + 3)], rtol=1e-6, atol=1e-9)
    assert got[0] == 0 and got[OCFG.warmup_steps] == pytest.approx(OCFG.lr)
    assert got[TOTAL] == got[-1] == pytest.approx(OCFG.lr * OCFG.final_lr_ratio)


def test_decay_spares_exactly_the_norm_scales(model_tree) -> None:
    """Every matrix (embeddings, attention, MLP, unembedding, per block and per head) decays;
    the norm scales (per block, per head and the shared final norm) do not."""
    axes, _ = model_tree
    mask = flat(decay_mask(axes))
    spared = sorted(k for k, decays in mask.items() if not decays)
    assert spared and all(k.endswith("['scale']") for k in spared), spared
    assert {k for k in mask if k.endswith("['scale']")} == set(spared)
    assert any("heads" in k for k in spared) and any("trunk" in k for k in spared) and "['norm']['scale']" in spared
    assert mask["['unembed']['kernel']"] and mask["['embed']['embedding']"]


def test_adamw_matches_numpy_reference(model_tree) -> None:
    """Nine updates of the real model's parameter tree: steps 1-3 warm up, step 5's gradient is
    large enough to be clipped, the others are not; weights and scales both move."""
    axes, abstract = model_tree
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(x.shape).astype(np.float32) for k, x in flat(abstract).items()}
    size = sum(x.size for x in params.values())
    grads_steps = []
    for t in range(TOTAL):
        scale = 10.0 if t == 4 else 0.3
        grads_steps.append({k: (scale / math.sqrt(size) * rng.standard_normal(x.shape)).astype(np.float32)
                            for k, x in params.items()})
    norms = [math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in gs.values())) for gs in grads_steps]
    assert norms[4] > OCFG.clip_norm > max(norms[:4] + norms[5:])
    want = np_adamw(params, grads_steps, flat(decay_mask(axes)))

    unflat = lambda d: jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(d[jax.tree_util.keystr(p)]), abstract)
    tx = make_optimizer(OCFG, TOTAL, axes)

    @jax.jit
    def update(p, state, g):
        updates, state = tx.update(g, state, p)
        return jax.tree.map(jnp.add, p, updates), state

    p, state = unflat(params), tx.init(unflat(params))
    for t, grads in enumerate(grads_steps):
        p, state = update(p, state, unflat(grads))
        got = flat(jax.device_get(p))
        for k in params:
            np.testing.assert_allclose(got[k], want[t][k], rtol=2e-5, atol=2e-6, err_msg=f"update {t + 1} {k}")
    moved = {k: float(np.abs(got[k] - params[k]).max()) for k in params}
    assert min(moved.values()) > 1e-3, moved
