"""Llama 2 shapes: FFN rounding, both RoPE layouts against NumPy complex rotation, the 6.7B count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax.config import ConfigError, load_config
from mtp_jax.model.layers import rope
from mtp_jax.model.transformer import MTP


def _meta_rope(x_BTHE: np.ndarray, theta: float) -> np.ndarray:
    """Meta's Llama code: consecutive (even, odd) pairs as complex numbers times e^{i t theta^(-2j/E)}."""
    e = x_BTHE.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, e, 2)[: e // 2] / e)
    t = np.arange(x_BTHE.shape[1])
    rot_TJ = np.exp(1j * np.outer(t, freqs))
    xc = x_BTHE.reshape(*x_BTHE.shape[:-1], e // 2, 2)
    out = (xc[..., 0] + 1j * xc[..., 1]) * rot_TJ[None, :, None, :]
    return np.stack([out.real, out.imag], axis=-1).reshape(x_BTHE.shape)


def test_rope_layouts_match_meta_complex_rotation():
    x = np.random.default_rng(0).normal(size=(2, 7, 3, 8)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    want = _meta_rope(x.astype(np.float64), 10000.0)
    np.testing.assert_allclose(np.asarray(rope(jnp.asarray(x), positions, 10000.0, "interleaved")), want, atol=1e-5)
    # Half layout = the same rotation after Hugging Face's permutation (evens first, then odds).
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
    half = np.asarray(rope(jnp.asarray(x[..., perm]), positions, 10000.0, "half"))
    np.testing.assert_allclose(half, want[..., perm], atol=1e-5)


@pytest.mark.parametrize("d, want", [(4096, 11008), (5120, 13824), (2048, 5632)])
def test_llama_ffn_rounding(d, want):
    cfg = load_config(None, [f"model.d_model={d}", "model.attn_heads=16", "model.ffn_multiple=256"])
    assert cfg.model.d_ff_ == want


def test_paper_6_7b_has_llama2_7b_parameter_count():
    """Counted leaf by leaf against Llama 2 7B's tensors: 32000 x 4096 embeddings and output,
    32 blocks of 4 x 4096^2 attention + 3 x 4096 x 11008 SwiGLU + 2 norms, a final norm."""
    d, f, v, layers = 4096, 11008, 32000, 32
    llama2_7b = 2 * v * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d
    assert llama2_7b == 6_738_415_616
    for n in (1, 4):
        cfg = load_config(f"experiments/paper/6.7b_n{n}.yaml")
        leaves = jax.tree.leaves(MTP(cfg.model).abstract_params())
        assert sum(int(np.prod(x.shape)) for x in leaves) == llama2_7b


def test_bad_rope_layout_is_one_line():
    with pytest.raises(ConfigError, match="model.rope_layout='pairs' is not one of half, interleaved"):
        load_config(None, ["model.rope_layout=pairs"])
