"""Acceptance statistics against brute force and a hand-worked replay."""

from __future__ import annotations

import numpy as np
import pytest

from mtp_jax.decode.acceptance import repeated_ngram_fraction, replay


def brute_repeated(tokens: list[int], n: int) -> float:
    """Token t counts if some window of n tokens covering it occurs at another offset too."""
    if len(tokens) < n:
        return 0.0
    windows = [tokens[i : i + n] for i in range(len(tokens) - n + 1)]
    inside = [any(windows[i] in windows[:i] + windows[i + 1 :] for i in range(max(0, t - n + 1), min(t, len(windows) - 1) + 1))
              for t in range(len(tokens))]
    return sum(inside) / len(tokens)


@pytest.mark.parametrize("seed", range(6))
def test_repeated_ngram_fraction_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 2 + seed, 40).tolist()  # small alphabets repeat, larger ones less
    assert repeated_ngram_fraction(tokens, 4) == pytest.approx(brute_repeated(tokens, 4))


def test_repeated_ngram_fraction_extremes():
    assert repeated_ngram_fraction([7] * 20) == 1.0
    assert repeated_ngram_fraction(list(range(20))) == 0.0
    assert repeated_ngram_fraction(list(range(5))) == 0.0  # shorter than one 8-gram
    assert repeated_ngram_fraction(list(range(8)) + [99] + list(range(8))) == pytest.approx(16 / 17)


def test_replay_by_hand():
    """Prompt [0, 1]; the prefill gives token 2. Pass 1 from length 3: drafts at position 1 are
    [3, 9] vs [3, 4]: head 2 accepted, head 3 rejected, 2 tokens. Pass 2 from length 5: drafts
    at position 3 are [5, 6] vs [5, 6]: both accepted, 3 tokens. Pass 3 from length 8: drafts at
    position 6 vs the one token left: head 2 rejected, head 3 not tried (past the end)."""
    sequence = list(range(9))
    drafts_TJ = np.full((9, 2), -1)
    drafts_TJ[1], drafts_TJ[3], drafts_TJ[6] = [3, 9], [5, 6], [0, 0]
    attempts, accepted, passes = replay(sequence, 2, drafts_TJ)
    assert passes == 3
    np.testing.assert_array_equal(attempts, [3, 2])
    np.testing.assert_array_equal(accepted, [2, 1])
