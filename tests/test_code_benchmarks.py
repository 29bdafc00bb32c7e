"""HumanEval and MBPP data, prompts pinned by golden strings, stop-string cuts, the pass@k
estimator against brute-force enumeration, and (slow) every reference solution in the sandbox."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mtp_jax.evals.code import benchmarks
from mtp_jax.evals.code.passk import bootstrap_ci, pass_at_k
from mtp_jax.evals.code.sandbox import Sandbox

GOLDEN = Path(__file__).parent / "golden" / "code"


def test_problem_counts_and_ids():
    he, mb = benchmarks.load("humaneval"), benchmarks.load("mbpp")
    assert len(he) == 164 and he[0].task_id == "HumanEval/0" and he[-1].task_id == "HumanEval/163"
    assert len(mb) == 500 and mb[0].task_id == "mbpp/11" and mb[-1].task_id == "mbpp/510"
    assert len(benchmarks.load("mbpp", limit=3)) == 3


def test_humaneval_prompt_is_the_signature_and_docstring():
    problem = benchmarks.load("humaneval", 1)[0]
    assert problem.prompt == (GOLDEN / "humaneval_0_prompt.txt").read_text()
    assert problem.prompt.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert problem.prompt.endswith('    True\n    """\n')


def test_mbpp_prompt_is_the_3_shot_template():
    problem = benchmarks.load("mbpp", 1)[0]
    assert problem.prompt == (GOLDEN / "mbpp_11_prompt.txt").read_text()
    header = "You are an expert Python programmer, and here is your task: "
    assert problem.prompt.count(header) == 4 and problem.prompt.count("[BEGIN]\n") == 4
    assert problem.prompt.count("\n[DONE]\n\n") == 3 and "\r" not in problem.prompt
    shots = [header + t for t in problem.prompt.split(header)[1:]]
    assert [s.split(" Your code")[0][len(header):] for s in shots] == [
        "Write a function to find the similar elements from the given two tuple lists.",
        "Write a python function to identify non-prime numbers.",
        "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
        "Write a python function to remove first and last occurrence of a given character from the string.",
    ]
    assert shots[-1].endswith('assert remove_Occ("PHP","P") == "H"\n[BEGIN]\n')


@pytest.mark.parametrize("text, stops, want", [
    ("    return x\n\ndef junk():", benchmarks.HUMANEVAL_STOPS, "    return x\n"),
    ("    return x\nif __name__ == '__main__':\n    print(1)", benchmarks.HUMANEVAL_STOPS, "    return x"),
    ("    return x\n# test\nprint(f(1))", benchmarks.HUMANEVAL_STOPS, "    return x"),
    ("    y = 1\n    # inner comment\n    def g():\n        return y", benchmarks.HUMANEVAL_STOPS,
     "    y = 1\n    # inner comment\n    def g():\n        return y"),  # indented: not a top-level stop
    ("def f(x):\n  return x\n[DONE]\n\nYou are", benchmarks.MBPP_STOPS, "def f(x):\n  return x\n"),
    ("no stop here", benchmarks.MBPP_STOPS, "no stop here"),
])
def test_cut_at_the_first_stop_string(text, stops, want):
    assert benchmarks.cut(text, stops) == want


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of all k-subsets of n samples (c of them passing) holding a pass."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_finite_and_exact():
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        pass_at_k(10, 1, 11)


def test_bootstrap_interval_matches_the_binomial_for_pass_fail_problems():
    """Resampling 30 problems of which 12 pass: the mean is Binomial(30, 0.4) / 30, whose 5% and
    95% quantiles the percentile interval must hit (within one problem)."""
    values = np.array([1.0] * 12 + [0.0] * 18)
    low, high = bootstrap_ci(values, resamples=20000)
    cdf = np.cumsum([math.comb(30, j) * 0.4**j * 0.6 ** (30 - j) for j in range(31)])
    q05, q95 = np.searchsorted(cdf, 0.05) / 30, np.searchsorted(cdf, 0.95) / 30
    assert abs(low - q05) <= 1 / 30 + 1e-9 and abs(high - q95) <= 1 / 30 + 1e-9
    assert bootstrap_ci(np.full(7, 0.25)) == (0.25, 0.25)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as box:
        yield box


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(sandbox):
    problems = benchmarks.load("humaneval")
    outcomes = sandbox.run_many([p.program(p.reference) for p in problems])
    assert [(p.task_id, o.status, o.stderr[-300:]) for p, o in zip(problems, outcomes) if o.status != "pass"] == []


@pytest.mark.slow
def test_mbpp_reference_solutions_pass_but_the_known_broken(sandbox):
    problems = benchmarks.load("mbpp")
    outcomes = sandbox.run_many([p.program(p.reference) for p in problems])
    failing = {p.task_id: (o.status, o.error_type) for p, o in zip(problems, outcomes) if o.status != "pass"}
    assert failing == {t: ("fail", "AssertionError") for t in benchmarks.MBPP_BROKEN_REFERENCES}, Counter(failing.values())


def test_a_wrong_completion_fails_its_tests(sandbox):
    he, mb = benchmarks.load("humaneval", 1)[0], benchmarks.load("mbpp", 1)[0]
    outcomes = sandbox.run_many([he.program("    return None\n"), mb.program("def remove_Occ(s, ch):\n    return s\n")])
    assert [(o.status, o.error_type) for o in outcomes] == [("fail", "AssertionError")] * 2
