"""The FLOPs formula against an independent count, for every kind in the head-kind registry:
every matrix multiply in the traced forward pass of the training loss over all heads (the
`naive` path, which feeds sequential heads the true tokens as training does), 2 x output size x
contracted size per dot_general, scan bodies counted once per iteration. The count is linear in T per token, a + b T: `a` is the
matmuls (projections, MLPs, one unembedding per head), `b` the attention scores and values.
Training is 3x the forward, and the formula counts the causal half of attention, which the
dense forward computes in full: formula = 3a + 3 (b / 2) T.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from mtp_jax.flops import model_flops_per_token
from mtp_jax.loss import loss_weights, mtp_loss
from mtp_jax.model.head_kinds import HEAD_KINDS
from mtp_jax.model.transformer import MTP


def dot_flops(jaxpr: jax.extend.core.Jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        total += times * sum(dot_flops(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return total


def forward_flops_per_token(mtp: MTP, seq_len: int) -> float:
    window = jax.ShapeDtypeStruct((1, seq_len + mtp.cfg.mtp_heads), jnp.int32)
    loss = lambda p, b: mtp_loss(mtp, p, b, loss_weights(mtp.cfg.mtp_heads), impl="naive")[0]
    batch = {"tokens": window, "segment_ids": window}
    return dot_flops(jax.make_jaxpr(loss)(mtp.abstract_params(), batch).jaxpr) / seq_len


CASES = [(1, "transformer", False), (4, "transformer", True)] + [(2, k, False) for k in HEAD_KINDS if k != "transformer"]


@pytest.mark.parametrize("n,head_type,tie", CASES)
def test_flops_match_the_matmuls_of_the_traced_forward(tiny, n: int, head_type: str, tie: bool) -> None:
    cfg = tiny(model__mtp_heads=n, model__n_layers=6, model__head_type=head_type, model__tie_embeddings=tie).model
    mtp = MTP(cfg)
    t1, t2 = 16, 32
    f1, f2 = forward_flops_per_token(mtp, t1), forward_flops_per_token(mtp, t2)
    b = (f2 - f1) / (t2 - t1)
    a = f1 - b * t1
    assert a > 0 and b > 0
    for t in (t1, t2, 4096):
        assert model_flops_per_token(cfg, t) == pytest.approx(3 * a + 3 * (b / 2) * t, rel=1e-9), t
