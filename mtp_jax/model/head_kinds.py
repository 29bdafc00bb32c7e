"""The registry of head kinds: every kind's name and properties, in one table without JAX.

Config validation (`config.py`), FLOP counting (`flops.py`), the model (`heads.py`,
`transformer.py`), the loss and decoding all ask this table; none of them lists kinds or their
properties itself. It imports nothing heavy so that loading a config stays cheap.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class HeadKindSpec:
    """What a head kind is, as the rest of the code needs to know it.

    `block`: each head is (or ends in) one transformer block, taken from `model.n_layers`, with a
    KV cache in decoding. `chained`: head i reads the output of the head processed before it.
    `reverse`: heads run from the farthest to head 1 (anticausal). `reads_tokens`: head i also
    reads Emb(x_{t+i-1}) (sequential). `own_unembedding`: head i holds its own (D, V) unembedding.
    `projection_in`: head i multiplies a (projection_in * d_model)-wide input by a matrix to
    d_model before its block, if any (0: none); FLOP counting adds those matmuls.
    `impl`: the class in `mtp_jax.model.heads` that implements the kind.
    """

    name: str
    impl: str
    block: bool
    chained: bool = False
    reverse: bool = False
    reads_tokens: bool = False
    own_unembedding: bool = False
    projection_in: int = 0


HEAD_KINDS: dict[str, HeadKindSpec] = {
    spec.name: spec
    for spec in (
        HeadKindSpec("transformer", "TransformerHeads", block=True),  # the paper's parallel heads
        HeadKindSpec("linear", "LinearHeads", block=False, projection_in=1),  # a d x d map per head
        HeadKindSpec("causal", "ChainedHeads", block=True, chained=True),
        HeadKindSpec("anticausal", "ChainedHeads", block=True, chained=True, reverse=True),
        HeadKindSpec("sequential", "SequentialHeads", block=True, chained=True, reads_tokens=True, projection_in=2),
        HeadKindSpec("replicated", "ReplicatedHeads", block=False, own_unembedding=True),
    )
}


def head_kind(name: str) -> HeadKindSpec:
    """The spec of `model.head_type` (config validation has already refused unknown names)."""
    return HEAD_KINDS[name]


def processing_order(spec: HeadKindSpec, n: int) -> list[int]:
    """The 0-based head indices in the order heads run: chained kinds feed each head's output to
    the next one processed, so an anticausal kind starts at the farthest head."""
    return list(range(n))[::-1] if spec.reverse else list(range(n))
