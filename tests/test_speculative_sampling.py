"""Speculative sampling keeps the target distribution at every position of a long completion,
for every k, at temperature 1 and with top-p: bonus tokens, corrected tokens and drafts
re-proposed after a rejection included.

The model is a real MTP whose attention outputs are zero (`wo = 0`), so every head reads only
the current token: head 1 is a Markov chain with transition matrix P, and heads 2..k draft from
their own Q_i. The exact law of the output is then known in closed form: token j's marginal is
m_j = m_{j-1} P, and the pair (x_{j-1}, x_j) has law m_{j-1}(a) P(a, b). A chi-square test at
every position compares the decoder's samples with it. The same test, at the same sample size,
rejects a NumPy simulation of the classic bug (corrected tokens drawn from p, not from the
residual max(0, p - q)) and accepts the simulation of the correct rule: it has the power to
fail. P and Q come from `MTP.forward` (no cache) and NumPy top-p filtering, not the decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

import jax

from mtp_jax.decode import Sampling, speculative_generate
from mtp_jax.model.transformer import MTP

V, N, LENGTH, SAMPLES = 16, 3, 10, 3000
PROMPT = [3, 7]
ALPHA = 1e-4  # per-position p-value floor (fixed seeds: the outcome is deterministic)


def markov_params(mtp: MTP, seed: int = 0) -> dict:
    """Random weights with every attention output zeroed. A direction u shared by every token's
    embedding and favouring tokens 0..3 in the unembedding gives the rows of P a common core
    (drafts are often accepted, so bonus tokens are frequent) around token-specific noise;
    random head MLPs make heads 2..k imperfect drafters."""
    rng = np.random.default_rng(seed)
    u_D = rng.standard_normal(mtp.cfg.d_model)

    def leaf(path, x):
        name = path[-1].key
        if name == "scale":
            return np.ones(x.shape, np.float32)
        std = {"wo": 0.0, "kernel": 0.15, "w_down": 0.2, "w_up": 0.3, "w_gate": 0.3, "embedding": 1.0}.get(name, 0.02)
        w = std * rng.standard_normal(x.shape)
        if name == "embedding":
            w += 3.0 * u_D
        if name == "kernel":  # the unembedding (D, V)
            w[:, :4] += 2.0 * (u_D / np.linalg.norm(u_D))[:, None]
        return w.astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, mtp.abstract_params())


def np_top_p(probs_XV: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the most likely tokens until their mass reaches top_p (ties at the edge kept)."""
    if top_p >= 1:
        return probs_XV
    order = np.argsort(-probs_XV, axis=-1, kind="stable")
    desc = np.take_along_axis(probs_XV, order, -1)
    rank = np.sum(np.cumsum(desc, -1) - desc < top_p, axis=-1, keepdims=True)
    edge = np.take_along_axis(desc, rank - 1, -1)
    kept = np.where(probs_XV >= edge, probs_XV, 0.0)
    return kept / kept.sum(-1, keepdims=True)


def transitions(mtp: MTP, params: dict, top_p: float) -> np.ndarray:
    """(N, V, V): row a of head i is its distribution after token a, at temperature 1."""
    logits_NV1V = np.asarray(jax.jit(mtp.forward)(params, np.arange(V, dtype=np.int32)[:, None]), np.float64)
    probs = np.exp(logits_NV1V[:, :, 0] - logits_NV1V[:, :, 0].max(-1, keepdims=True))
    return np_top_p(probs / probs.sum(-1, keepdims=True), top_p)


def chi_square_p_values(x_BL: np.ndarray, P: np.ndarray, first: int) -> list[float]:
    """Per position j: chi-square p-value of the pairs (x_{j-1}, x_j) (x_0 = the prompt's last
    token) against m_{j-1}(a) P(a, b); cells expecting fewer than 5 are pooled."""
    b, length = x_BL.shape
    m = np.eye(V)[first]
    prev = np.full(b, first)
    out = []
    for j in range(length):
        expected = b * (m[:, None] * P).ravel()
        observed = np.bincount(prev * V + x_BL[:, j], minlength=V * V).astype(np.float64)
        small = expected < 5
        e = np.append(expected[~small], expected[small].sum())
        o = np.append(observed[~small], observed[small].sum())
        keep = e > 0
        assert np.all(o[~keep] == 0), f"position {j + 1}: a token of probability 0 was emitted"
        stat = float(np.sum((o[keep] - e[keep]) ** 2 / e[keep]))
        out.append(float(scipy.stats.chi2.sf(stat, max(keep.sum() - 1, 1))))
        m, prev = m @ P, x_BL[:, j]
    return out


def draw(probs_BV: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(probs_BV / probs_BV.sum(-1, keepdims=True), -1)
    return np.minimum((cdf < rng.random((len(probs_BV), 1))).sum(-1), V - 1)


def simulate(T: np.ndarray, k: int, rng: np.random.Generator, residual: bool) -> np.ndarray:
    """Blockwise speculative sampling on the Markov model in NumPy, as the decoder does it:
    drafts for positions L..L+k-2 from heads 2..k at the token of position L-2; accept with
    min(1, p/q); the first rejection is replaced by a draw from norm(max(0, p - q)) (from p
    itself when `residual` is False: the bug the control plants); all accepted: a bonus token.
    k >= 2."""
    P, rows, start = T[0], np.arange(SAMPLES), len(PROMPT)
    seq = np.zeros((SAMPLES, start + LENGTH + k), np.int64)
    seq[:, :start] = PROMPT
    seq[:, start] = draw(P[seq[:, start - 1]], rng)
    length = np.full(SAMPLES, start + 1)
    while length.min() < start + LENGTH:
        base, last = seq[rows, length - 2], seq[rows, length - 1]
        drafts = np.stack([draw(T[i][base], rng) for i in range(1, k)], 1)
        fed = np.concatenate([last[:, None], drafts], 1)
        ok = np.stack([rng.random(SAMPLES) < P[fed[:, i], drafts[:, i]] / T[i + 1][base, drafts[:, i]]
                       for i in range(k - 1)], 1)
        accepted = np.cumprod(ok, 1).sum(1)
        p = P[fed[rows, accepted]]
        q = np.stack([T[i + 1][base] for i in range(k - 1)] + [np.zeros((SAMPLES, V))], 1)[rows, accepted]
        res = np.maximum(p - q, 0)
        use_res = residual & (res.sum(-1) > 0)
        corrected = draw(np.where(use_res[:, None], res, p), rng)
        for i in range(k):
            write = i <= accepted
            value = np.where(i < accepted, drafts[:, min(i, k - 2)], corrected)
            seq[rows[write], length[write] + i] = value[write]
        length = np.minimum(length + accepted + 1, start + LENGTH)  # finished rows idle at the end
    return seq[:, start : start + LENGTH]


@pytest.fixture(scope="module")
def model(tiny) -> tuple[MTP, dict]:
    mtp = MTP(tiny(model__vocab_size=V, model__n_layers=5, model__mtp_heads=N).model)
    return mtp, markov_params(mtp)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_numpy_control_shows_the_test_can_fail(model, top_p) -> None:
    mtp, params = model
    T = transitions(mtp, params, top_p)
    assert 0.5 * np.abs(T[0] - T[1]).sum(-1).mean() > 0.15, "drafts too good: rejections would be rare"
    rng = np.random.default_rng(0)
    assert min(chi_square_p_values(simulate(T, N, rng, residual=True), T[0], PROMPT[-1])) > ALPHA
    assert min(chi_square_p_values(simulate(T, N, rng, residual=False), T[0], PROMPT[-1])) < ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_every_position_and_k_keeps_the_target_distribution(model, top_p) -> None:
    mtp, params = model
    T = transitions(mtp, params, top_p)
    for k in range(1, N + 1):
        out = speculative_generate(mtp, params, [PROMPT] * SAMPLES, k, LENGTH, Sampling(1.0, 0, top_p), seed=k)
        x = np.array(out.completions())
        assert x.shape == (SAMPLES, LENGTH)
        p_values = chi_square_p_values(x, T[0], PROMPT[-1])
        assert min(p_values) > ALPHA, (k, [round(p, 5) for p in p_values])
        # passes that emitted k tokens ended with a bonus token: they must be frequent
        assert out.stats.tokens_per_forward > 1 + 0.3 * (k - 1) or k == 1, (k, out.stats.tokens_per_forward)
