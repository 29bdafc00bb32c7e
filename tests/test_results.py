"""The evaluation-result schema: step-named records, atomic writes, non-finite metrics refused."""

from __future__ import annotations

import json

import pytest

from mtp_jax.errors import DivergenceError, UserError
from mtp_jax.evals.results import latest_results, make_record, read_results, result_path, write_result


def test_records_are_step_named_and_read_back_in_order(tmp_path) -> None:
    for step in (20, 3):
        write_result(tmp_path, make_record("heldout", step, {"loss": 1.0 / step}, {"heads": []}))
    write_result(tmp_path, make_record("mbpp", 20, {"pass@1": 0.25}))
    (tmp_path / "evals" / "mbpp" / "step_00000001.json").write_text("{not json")
    records = read_results(tmp_path)
    assert [(r["task"], r["step"]) for r in records] == [("heldout", 3), ("heldout", 20), ("mbpp", 20)]
    assert latest_results(tmp_path)["heldout"]["metrics"] == {"loss": 0.05}
    assert result_path(tmp_path, "mbpp", 20).name == "step_00000020.json"
    assert json.loads(result_path(tmp_path, "heldout", 3).read_text())["details"] == {"heads": []}
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_or_non_numeric_metrics_are_refused(value) -> None:
    with pytest.raises(DivergenceError, match="step 7"):
        make_record("heldout", 7, {"loss": value})


def test_task_names_cannot_escape_the_evals_folder() -> None:
    with pytest.raises(UserError, match="without '/'"):
        make_record("../x", 1, {})
