"""The inference memory plan (`decode/memory.py`): its byte count against a hand count at Llama 2 7B's
shape, the choice of devices, the one-line refusal through the real CLIs, and loading in a dtype."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mtp_jax.config import load_config
from mtp_jax.convert.cli import main as convert
from mtp_jax.capacity import host_available_bytes
from mtp_jax.decode.memory import DEVICE_MEMORY_ENV, GIB, make_plan, plan_bytes
from mtp_jax.errors import UserError
from mtp_jax.run import load_run

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"


def test_plan_bytes_equal_a_hand_count_at_the_7b_shape() -> None:
    """6.7B n = 4 (Llama 2 7B: 6,738,415,616 parameters, 32 blocks of 32 heads x 128, vocab 32000), a
    code-eval call of 33 rows, a 640-token prompt and 900 cache slots, in bfloat16."""
    cfg = load_config(str(ROOT / "experiments" / "paper" / "6.7b_n4.yaml"))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"))
    parts = plan_bytes(cfg, batch=33, prompt_len=640, slots=900, param_dtype="bfloat16")
    assert parts == {
        "parameters": 6_738_415_616 * 2,
        "kv_cache": 32 * 2 * 33 * 900 * 32 * 128 * 2,  # 28 trunk + 4 head blocks, k and v, bfloat16
        "logits": 33 * 4 * 4 * 32000 * 4,  # 4 heads at up to 4 fed positions, float32
        "prefill_attention": 33 * 32 * 640 * 900 * 4,
    }
    assert plan_bytes(cfg, 33, 640, 900, "float32")["parameters"] == 6_738_415_616 * 4


def test_plan_splits_parameters_over_the_fewest_devices_then_refuses() -> None:
    parts = {"parameters": 8 * GIB, "kv_cache": GIB, "logits": 0, "prefill_attention": 0}
    assert make_plan(parts, "bfloat16", 9 * GIB, 8, "fix").devices == 1
    assert make_plan(parts, "bfloat16", 3 * GIB, 8, "fix").devices == 4  # 2 + 1 GiB each; 2 devices need 5
    with pytest.raises(UserError) as err:
        make_plan(parts, "bfloat16", 3 * GIB, 1, "lower --rows")
    assert str(err.value) == ("decoding needs about 9.00 GiB per device (parameters 8.00 GiB, kv cache 1.00 GiB, "
                              "logits 0.00 GiB, prefill attention 0.00 GiB; parameters in bfloat16) but one device "
                              "with 3.00 GiB available; lower --rows")


def test_host_memory_is_what_is_available_not_the_total() -> None:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available, total = (int(info[k].split()[0]) * 1024 for k in ("MemAvailable", "MemTotal"))
    assert abs(host_available_bytes() - available) < 256 * 2**20 and host_available_bytes() < total


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("meta") / "run"
    convert(["from-meta", str(FIX / "meta_tiny"), str(run)])
    return run


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("command", [["generate", "--prompt", "def f():"],
                                     ["eval", "--task", "mbpp", "--limit", "2", "--samples", "2", "--k", "1"]])
def test_cli_refuses_a_plan_that_cannot_fit_in_one_line(command: list[str], converted: Path) -> None:
    before = listing(converted)
    done = subprocess.run([sys.executable, "-m", "mtp_jax.cli", command[0], str(converted), *command[1:]],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", DEVICE_MEMORY_ENV: "100000"})
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "decoding needs about" in errors[0] and "parameters in float32" in errors[0]
    assert "one device with 0.00 GiB available" in errors[0] and "--dtype bfloat16" in errors[0]
    assert done.stdout == "" and listing(converted) == before


def test_load_in_bfloat16_and_split_over_devices(converted: Path) -> None:
    """Default: the checkpoint's float32; --dtype bfloat16 rounds the same values; devices=2 (two fake CPU
    devices, in a child process) splits the parameters and keeps every value."""
    f32 = jax.tree.leaves(load_run(converted)[3])
    bf16 = jax.tree.leaves(load_run(converted, dtype="bfloat16")[3])
    assert {x.dtype.name for x in f32} == {"float32"} and {x.dtype.name for x in bf16} == {"bfloat16"}
    for a, b in zip(f32, bf16):
        np.testing.assert_array_equal(np.asarray(a).astype(jax.numpy.bfloat16), np.asarray(b))
    code = ("import sys, jax, numpy as np; from mtp_jax.run import load_run\n"
            "one, two = (jax.tree.leaves(load_run(sys.argv[1], devices=d)[3]) for d in (1, 2))\n"
            "assert all(np.array_equal(a, b) for a, b in zip(one, two))\n"
            "print(max(len(x.sharding.device_set) for x in two), sum(x.is_fully_replicated for x in two), len(two))")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    done = subprocess.run([sys.executable, "-c", code, str(converted)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags})
    assert done.returncode == 0, done.stderr[-2000:]
    devices, replicated, leaves = map(int, done.stdout.split())
    assert devices == 2 and replicated < leaves  # the large matrices are split, norms may stay whole


def test_past_the_trained_context_is_a_warning(tiny, capsys) -> None:
    from mtp_jax.decode.cli import warn_past_context

    warn_past_context(tiny(), 10, 6)  # train.seq_len=16: fits
    assert capsys.readouterr().err == ""
    warn_past_context(tiny(), 100, 28)
    assert "exceeds the trained context train.seq_len=16" in capsys.readouterr().err
