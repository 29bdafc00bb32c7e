"""`MTP.init`, the one parameter source of real training (every correctness test uses NumPy
parameters): scales as the config says, and independent draws for every stacked block and head.

Expected scales, from the config: `init_std` for embeddings, q/k/v, gate/up, unembedding and
linear heads; `init_std / sqrt(2 n_layers)` for the two residual outputs (attention `wo`, MLP
`w_down`), GPT-2 style; norm scales start at 1.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from mtp_jax.model.transformer import MTP

RESIDUAL_OUT = ("wo", "w_down")


@pytest.fixture(scope="module")
def init(tiny) -> tuple:
    """(config, the jitted init, its parameters for key 0 flattened); one compile."""
    cfg = tiny(model__d_model=64, model__n_layers=6, model__mtp_heads=3, model__tie_embeddings=False,
               model__init_std=0.05).model
    jitted = jax.jit(MTP(cfg).init)
    params = jax.device_get(jitted(jax.random.key(0)))
    flat = {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    return cfg, jitted, flat


def slices(key: str, x: np.ndarray) -> list[np.ndarray]:
    """One array per block or head for stacked leaves, else the leaf itself."""
    return list(x) if key.startswith(("['trunk']", "['heads']")) else [x]


@pytest.mark.slow
def test_scales_follow_the_config(init) -> None:
    cfg, _, flat = init
    for key, x in flat.items():
        if key.endswith("['scale']"):
            assert np.all(x == 1.0), key
            continue
        name = key.rsplit("['", 1)[1].rstrip("']")
        want = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name in RESIDUAL_OUT else cfg.init_std
        for i, s in enumerate(slices(key, x)):
            n = s.size
            assert abs(s.mean()) < 5 * want / math.sqrt(n), (key, i, s.mean())
            assert abs(s.std() / want - 1) < 5 / math.sqrt(2 * n) + 0.02, (key, i, s.std(), want)


def test_stacked_blocks_and_heads_are_independent_draws(init) -> None:
    """No two blocks, heads or same-shaped matrices share a draw: every pair's correlation is
    what independent normals give (|r| < 5 / sqrt(size)). A shared key would give r = 1."""
    cfg, _, flat = init
    arrays = [(f"{k}[{i}]", s.ravel()) for k, x in flat.items() if not k.endswith("['scale']")
              for i, s in enumerate(slices(k, x))]
    assert sum(k.startswith("['heads']") for k, _ in arrays) == 3 * 7  # q, k, v, o, gate, up, down per head
    by_size: dict[int, list[tuple[str, np.ndarray]]] = {}
    for k, x in arrays:
        by_size.setdefault(x.size, []).append((k, x))
    for size, group in by_size.items():
        if len(group) < 2:
            continue
        r = np.corrcoef(np.stack([x for _, x in group])) - np.eye(len(group))
        a, b = np.unravel_index(np.abs(r).argmax(), r.shape)
        assert abs(r[a, b]) < 5 / math.sqrt(size), (group[a][0], group[b][0], r[a, b])


def test_init_depends_on_the_key_only(init) -> None:
    _, jitted, flat = init
    again, other = (jax.device_get(jitted(jax.random.key(seed))) for seed in (0, 1))
    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(again)[0], jax.tree.leaves(other)):
        key = jax.tree_util.keystr(p)
        np.testing.assert_array_equal(a, flat[key].astype(np.float32))
        if not key.endswith("['scale']"):
            assert not np.array_equal(a, b), key
