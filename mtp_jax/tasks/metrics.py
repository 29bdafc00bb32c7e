"""Task metrics from per-position predictions: pure NumPy, so they are tested on hand-made cases.

Positions follow the loss's convention: head i's prediction at position t is for token t + i.

Polynomial answers are scored on head 1's greedy answer (evals/tasks.py `greedy_answers`):
exact match of all five coefficients and the accuracy of each, as the paper's greedy evaluation.
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


def answer_scores(greedy_L: np.ndarray, reference_L: np.ndarray, nll_L: np.ndarray) -> tuple[bool, np.ndarray, float]:
    """(exact match, per-token correctness, mean loss on the reference answer) of one greedy answer."""
    correct = np.asarray(greedy_L) == np.asarray(reference_L)
    return bool(correct.all()), correct, float(np.mean(nll_L))
