"""What a greedy speculative decode accepted, replayed on its output, and how repetitive it is.

Greedy blockwise decoding is deterministic given the output: at each pass the drafts are heads
2..k's argmax at the last accepted position, accepted while they equal the output. Replaying
that on the output with the drafts of one no-cache forward gives per-head acceptance rates
without instrumenting the decoder (tests check the replay's pass counts against the decoder's).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np


def repeated_ngram_fraction(tokens: Sequence[int], n: int = 8) -> float:
    """Fraction of tokens inside an n-gram that occurs at least twice in `tokens`: degenerate,
    looping completions score near 1 and inflate tokens per pass (every head predicts a loop)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    covered = np.zeros(len(tokens), bool)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = True
    return float(covered.mean())


def replay(sequence: Sequence[int], prompt_len: int, drafts_TJ: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(attempts, accepted) per drafting head 2..J+1 and the decoding passes (prefill excluded)
    of greedy blockwise decoding that produced `sequence` from its first `prompt_len` tokens.

    drafts_TJ[t, j]: head j+2's argmax at position t (a draft for token t + j + 2). Head j+2 is
    attempted when heads before it were accepted and its token lies inside the sequence.
    """
    j_count = drafts_TJ.shape[1]
    attempts, accepted = np.zeros(j_count, np.int64), np.zeros(j_count, np.int64)
    length, passes = prompt_len + 1, 0  # the prefill gave the first token
    while length < len(sequence):
        ahead = np.asarray(sequence[length : length + j_count])
        ok = np.cumprod(drafts_TJ[length - 2, : len(ahead)] == ahead)
        tried = np.concatenate([[1], ok[:-1]])[: len(ahead)]
        attempts[: len(ahead)] += tried
        accepted[: len(ahead)] += ok
        length += int(ok.sum()) + 1
        passes += 1
    return attempts, accepted, passes
