"""Task metrics from per-position predictions: pure NumPy, so they are tested on hand-made cases.

Positions follow the loss's convention: head i's prediction at position t is for token t + i.

Polynomial exact match is computed teacher-forced: the greedy answer equals the reference iff
head 1's argmax is right at every answer position given the right prefix (greedy decoding would
reproduce those argmaxes one by one, and departs at the first wrong one), so one forward pass
gives the greedy exact match without a decoding loop. Per-coefficient accuracy is the
teacher-forced accuracy of each answer digit, which keeps moving before exact match does.
"""

from __future__ import annotations

import numpy as np


def induction_counts(pred_NT: np.ndarray, tokens_T: np.ndarray, repeats: list[int]) -> dict[str, int]:
    """Correct counts at the repeated name occurrences starting at token positions `repeats`.

    second: head 1 at the name's first token predicts its second token (the paper's score);
    first: head 1 just before the name predicts its first token;
    second_head_2: head 2 just before the name predicts its second token (n >= 2 only).
    """
    out = {"repeats": len(repeats), "second": 0, "first": 0, "second_head_2": 0}
    for s in repeats:
        out["second"] += int(pred_NT[0, s] == tokens_T[s + 1])
        out["first"] += int(s >= 1 and pred_NT[0, s - 1] == tokens_T[s])
        out["second_head_2"] += int(pred_NT.shape[0] >= 2 and s >= 1 and pred_NT[1, s - 1] == tokens_T[s + 1])
    return out


def answer_scores(pred_T: np.ndarray, nll_T: np.ndarray, tokens_T: np.ndarray, start: int, length: int) -> tuple[bool, np.ndarray, float]:
    """(exact match, per-answer-token correctness, mean answer-token loss) of the answer occupying
    tokens [start, start + length): head 1's prediction at t - 1 is for token t."""
    positions = np.arange(start - 1, start - 1 + length)
    correct = pred_T[positions] == tokens_T[positions + 1]
    return bool(correct.all()), correct, float(nll_T[positions].mean())
