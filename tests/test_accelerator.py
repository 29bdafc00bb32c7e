"""The accelerator check script runs end to end on CPU at toy shapes, so it works the day an
accelerator is at hand, and its JSON holds every figure the README asks for."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # compiles three training steps, four memory sweeps and the decode passes
def test_accelerator_script_tiny_on_cpu():
    out = subprocess.run(
        [str(ROOT / "benchmarks" / "accelerator.sh"), "--platform", "cpu", "--tiny"],
        capture_output=True, text=True, timeout=470, check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    summary = result["summary"]
    assert result["platform"] == "cpu"
    assert summary["tokens_per_s_n1"] > 0 and summary["tokens_per_s_n4"] > 0
    assert summary["attention"] == {"128": "xla", "256": "blockwise"}  # auto keeps XLA up to T = 128 on CPU
    assert set(summary["attention_temp_bytes"]) == {"128", "256"}
    costs = result["decode_pass_costs"]["batch1"]["cost_over_plain_pass"]
    assert costs["w1_heads1"] == 1.0 and set(costs) == {"w1_heads1", "w1_heads4", "w2_heads4", "w3_heads4", "w4_heads4"}
