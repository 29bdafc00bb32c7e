"""Ahead-of-time compilation for a TPU topology on this CPU host (`mtp-compile`, mtp_jax/aot.py):
per-device memory against a hand count of the parameter, optimizer, batch and cache bytes; the
one-line refusals; a quiet start on a host with libtpu but no TPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtp_jax import aot, platforms
from mtp_jax.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# d 512 over 4 chips leaves 128-wide local minor dimensions: TPU layouts tile the last dimension by
# 128 lanes, so narrower shards would be padded and the byte counts would measure the padding.
D, LAYERS, HEADS, V, F = 512, 3, 2, 384, 1408  # F: SwiGLU width 8/3 x 512 rounded up to a multiple of 64
B, T, CONTEXT, DECODE_B = 8, 128, 256, 4
TINY = [f"model.vocab_size={V}", f"model.d_model={D}", f"model.n_layers={LAYERS}", "model.attn_heads=4",
        f"model.mtp_heads={HEADS}", f"train.batch_size={B}", f"train.seq_len={T}", "train.ce_chunk=128",
        "mesh.data=1", "mesh.fsdp=-1"]


def hand_matrix_params() -> int:
    """Embedding and unembedding (V x d) and every block's matrices (trunk and heads alike): q, k, v, o
    (d x d each) and three SwiGLU matrices (d x F). Each has a d_model axis, which FSDP shards."""
    return 2 * V * D + LAYERS * (4 * D * D + 3 * D * F)


def hand_norm_params() -> int:
    """The final norm and two norm scales per block: no rule names their axis, so every chip holds them whole."""
    return D + LAYERS * 2 * D


def within(measured: int, expected: float, slack: float = 0.02) -> bool:
    """TPU layouts pad small arrays to whole tiles: measured may exceed the count by a little, never fall short."""
    return expected <= measured <= expected * (1 + slack)


@pytest.fixture(scope="module")
def reports():
    cfg = load_config(None, TINY)
    return {r.program: r for r in aot.run(cfg, "v5p:2x2x1", decode=(DECODE_B, CONTEXT))}


def test_train_step_bytes_match_the_hand_count(reports):
    train = reports["train"]
    assert (train.devices, train.device_kind) == (4, "TPU v5")
    # fp32 parameters and AdamW's two moments, every leaf FSDP-sharded over the 4 chips along d_model;
    # the batch (tokens and segment ids, T + n wide) split over the same 4 chips.
    state = 3 * 4 * (hand_matrix_params() / 4 + hand_norm_params())
    batch = 2 * B * (T + HEADS) * 4 / 4
    assert within(train.memory["argument"], state + batch)
    assert within(train.memory["alias"], state)  # the donated state is the new state's buffer
    assert train.fits and train.memory["total"] < 2**30
    assert train.compiler_flops > 0 and train.compiler_estimate_s > 0


def test_decode_passes_bytes_match_the_hand_count(reports):
    params = 2 * (hand_matrix_params() / 4 + hand_norm_params())  # bfloat16, sharded as in training
    # keys and values of every block (1 trunk + 2 heads), bfloat16, decode batch split over the 4 chips
    cache = 2 * LAYERS * DECODE_B * CONTEXT * D * 2 / 4
    for name in ("plain", "verify"):
        r = reports[name]
        assert within(r.memory["argument"] - r.memory["alias"], params, slack=0.05), name
        assert within(r.memory["alias"], cache), name


def compile_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtp_jax.aot", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_bad_topology_is_one_line():
    for name in ("v9x:2x2", "v5p:3x3x3"):
        proc = compile_cli("experiments/quickstart.yaml", "--topology", name)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], proc.stderr


def test_a_config_that_cannot_fit_is_refused_in_one_line():
    # 2 blocks, d 8192, vocab 262144: 4.3e9 parameters, x 16 bytes with AdamW, over 4 chips of 16 GiB
    proc = compile_cli("experiments/quickstart.yaml", "--topology", "v5e:2x2", "model.d_model=8192",
                       "model.n_layers=2", "model.attn_heads=64", "model.mtp_heads=1", "model.vocab_size=262144",
                       "train.batch_size=4", "train.seq_len=128", "mesh.data=1", "mesh.fsdp=-1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GiB per device" in lines[0] and "16 GiB" in lines[0], proc.stderr
    assert '"fits": false' in proc.stdout


def test_cpu_host_with_libtpu_starts_quietly():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, "-c", "import mtp_jax, jax; print(jax.default_backend())"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu"
    assert proc.stderr == "", proc.stderr


def test_trainers_started_after_a_tpu_compile_run_alone():
    """libtpu writes a warning sentence into CLOUD_TPU_TASK_ID of the compiling process (below Python's
    os.environ, so every child inherits it): a trainer started from such a process must not go looking
    for a cluster."""
    script = textwrap.dedent("""
        import subprocess, sys
        from jax.experimental import topologies
        topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
        child = ("import os; from mtp_jax import distributed; from mtp_jax.config import DistributedConfig;"
                 "print(repr(os.environ.get('CLOUD_TPU_TASK_ID')), distributed.init_args(DistributedConfig()))")
        print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(" None"), proc.stdout  # what libtpu left (if anything), then no cluster


@pytest.mark.skipif(not platforms.has_cuda_plugin(),
                    reason="deviceless GPU compilation needs JAX's CUDA plugin (the gpu extra)")
def test_gpu_host_compiles_without_a_gpu():
    proc = compile_cli("experiments/quickstart.yaml", "--topology", "h100:8", *TINY[:6], "model.dtype=bfloat16",
                       "mesh.data=1", "mesh.fsdp=-1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    train = json.loads(proc.stdout.strip().splitlines()[-1])["reports"][0]
    assert train["devices"] == 8 and "H100" in train["device_kind"]
    state = 3 * 4 * (hand_matrix_params() / 8 + hand_norm_params())  # GPU layouts do not pad to 128 lanes
    assert within(train["memory"]["argument"], state + 2 * B * (T + HEADS) * 4 / 8)
