"""Shared builders for the model and step tests: a tiny validated config and a batch whose rows
hold several documents and padding (the cases where masks can go wrong)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

# One persistent XLA compilation cache per test session (set before JAX is imported), which the
# trainer subprocesses of the CLI tests inherit: they compile the same programs over and over
# (test_train.py + test_failures.py, paired runs: 0.75x the wall time). A cache the caller set is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtp_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import numpy as np
import pytest

# Test modules import each other's references (`from test_model import ref_block`) in every
# pytest import mode, importlib included, which does not put this folder on sys.path itself.
sys.path.insert(0, str(Path(__file__).parent))

from mtp_jax.config import Config, load_config

# Tiny shapes make XLA:CPU compile time dominate these tests. Skipping LLVM's optimisation of the
# generated code (results change only by round-off) halves a compile; set in XLA_FLAGS before JAX
# is imported, so the trainer subprocesses of the CLI tests inherit it too: tests/test_decode.py +
# tests/test_train.py in 0.85x the wall time (2 alternated rounds: 160 / 154 s against 185 / 185 s).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a child process with `devices` fake CPU devices, keeping the session's flags."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


TINY = {
    "model.vocab_size": 64,
    "model.d_model": 32,
    "model.n_layers": 4,
    "model.attn_heads": 4,
    "model.kv_heads": 2,  # GQA: two query heads per kv head
    "model.mtp_heads": 2,
    "train.batch_size": 4,
    "train.seq_len": 16,
    "optim.warmup_steps": 0,  # the default warmup starts at lr 0, which would make step 1 a no-op
}


def tiny_overrides(**kw: object) -> list[str]:
    """`section__field=value` keywords on top of TINY, as load_config override strings."""
    merged = dict(TINY)
    merged.update({k.replace("__", "."): v for k, v in kw.items()})
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items()]


def documents_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of 2-4 documents plus trailing padding (segment 0) on every other row pair.

    Rows 2k and 2k+1 share one segment layout, so any split of the rows by parity (the step's
    micro-batches) gives every micro-batch the same number of valid targets per head.
    """
    rng = np.random.default_rng(seed)
    segments = np.zeros((batch, length), np.int32)
    for pair in range(0, batch, 2):
        pad = rng.integers(length // 4, length // 2) if (pair // 2) % 2 else 0
        cuts = np.sort(rng.choice(np.arange(2, length - pad - 1), size=rng.integers(1, 4), replace=False))
        row = np.zeros(length, np.int32)
        row[: length - pad] = 1 + np.searchsorted(cuts, np.arange(length - pad), side="right")
        segments[pair : pair + 2] = row
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": segments}


@pytest.fixture(scope="session")
def tiny() -> Callable[..., Config]:
    """tiny(model__mtp_heads=3, ...) -> a validated Config."""
    return lambda **kw: load_config(None, tiny_overrides(**kw))


@pytest.fixture(scope="session")
def make_batch() -> Callable[..., dict[str, np.ndarray]]:
    """make_batch(batch, length, vocab, seed=0) -> documents_batch(...)."""
    return documents_batch


# Variables that tell a trainer it is one process of a cluster (mtp_jax/distributed.py joins one when it sees them).
CLUSTER_VARIABLES = ("MTP_COORDINATOR", "MTP_NUM_PROCESSES", "MTP_PROCESS_ID", "SLURM_", "TPU_WORKER_HOSTNAMES",
                     "TPU_PROCESS_ADDRESSES", "CLOUD_TPU_TASK_ID", "MEGASCALE_")
_SESSION_ENVIRONMENT = frozenset(os.environ)


@pytest.fixture(autouse=True)
def no_cluster_variables_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """One left in this process's environment by a test (or a library it ran) would make every later trainer
    subprocess try to join a cluster that is not there: removed after each test, and named in a warning."""
    yield
    for key in [k for k in os.environ if k.startswith(CLUSTER_VARIABLES) and k not in _SESSION_ENVIRONMENT]:
        del os.environ[key]
        warnings.warn(f"{request.node.nodeid} left {key} in the environment; removed")
