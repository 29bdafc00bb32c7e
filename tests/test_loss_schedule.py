"""Per-head loss weight schedules and n-curricula: the weights per step against a NumPy reference
written from the definitions, the train step's loss and gradients using them, and mtp-train's
logged loss equal to the scheduled sum of its logged per-head losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtp_jax import sharding
from mtp_jax.config import ConfigError, MeshConfig, load_config
from mtp_jax.loss_schedule import LossSchedule
from mtp_jax.model.transformer import MTP
from mtp_jax.step import StepFns

ROOT = Path(__file__).resolve().parents[1]


def reference_weights(n: int, step: int, base=(), schedule="constant", lam=(0.3, 0.1), lam_step=0,
                      curriculum="none", every=100) -> np.ndarray:
    """Plain Python, head by head (1-based)."""
    out = []
    for i in range(1, n + 1):
        w = float(base[i - 1]) if base else 1.0
        if schedule == "linear":
            w *= (n - i + 1) / n
        elif schedule == "deepseek" and i > 1:
            w *= (lam[1] if 0 < lam_step <= step else lam[0]) / (n - 1)
        if curriculum == "forward" and i > 1 + step // every:
            w = 0.0
        if curriculum == "reverse" and i > max(1, n - step // every):
            w = 0.0
        out.append(w)
    return np.array(out, np.float32)


CASES = [
    ({}, {}),
    ({"train.loss_schedule": "linear"}, {"schedule": "linear"}),
    ({"train.loss_schedule": "linear", "train.loss_weights": "[2, 1, 1, 0.5]"},
     {"schedule": "linear", "base": (2, 1, 1, .5)}),
    ({"train.loss_schedule": "deepseek", "train.loss_lambda_step": 7}, {"schedule": "deepseek", "lam_step": 7}),
    ({"train.loss_schedule": "deepseek"}, {"schedule": "deepseek"}),
    ({"train.loss_schedule": "deepseek", "train.loss_lambda_start": 0.5, "train.loss_lambda_end": 0.2,
      "train.loss_lambda_step": 3}, {"schedule": "deepseek", "lam": (0.5, 0.2), "lam_step": 3}),
    ({"train.n_curriculum": "forward", "train.curriculum_every": 4}, {"curriculum": "forward", "every": 4}),
    ({"train.n_curriculum": "reverse", "train.curriculum_every": 3, "train.loss_schedule": "linear"},
     {"curriculum": "reverse", "every": 3, "schedule": "linear"}),
]


@pytest.mark.parametrize("overrides, ref", CASES)
def test_weights_per_step_match_reference(overrides, ref):
    cfg = load_config(None, ["model.mtp_heads=4", *(f"{k}={v}" for k, v in overrides.items())])
    schedule = LossSchedule(4, cfg.train)
    jitted = jax.jit(schedule.weights_at)
    for step in range(0, 20):
        want = reference_weights(4, step, **ref)
        np.testing.assert_allclose(np.asarray(jitted(step)), want, rtol=1e-6, err_msg=f"step {step}")


def test_bad_schedule_settings_are_one_line():
    with pytest.raises(ConfigError, match="train.loss_schedule='cosine' is not one of"):
        load_config(None, ["train.loss_schedule=cosine"])
    with pytest.raises(ConfigError, match="train.curriculum_every=0 must be >= 1"):
        load_config(None, ["train.curriculum_every=0"])


@pytest.mark.slow
def test_train_step_uses_the_weights_of_its_step():
    """One SGD step at state step 1 (deepseek lambda 0.3 until step 3; forward curriculum, 2 steps per
    stage: head 1 only): the reported loss is sum_i w_i(1) L_i and the inactive heads get no update."""
    cfg = load_config(None, ["model.mtp_heads=3", "model.n_layers=4", "model.d_model=16", "model.attn_heads=2",
                             "model.vocab_size=32", "model.dtype=float32", "train.batch_size=2", "train.seq_len=8",
                             "train.loss_schedule=deepseek", "train.loss_lambda_step=3", "train.n_curriculum=forward",
                             "train.curriculum_every=2", "train.loss_weights=[1, 2, 1]"])
    mtp = MTP(cfg.model)
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    fns = StepFns(mtp, optax.sgd(1.0), cfg.train, mesh, sharding.rules_dict(cfg.mesh.rules))
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 32, (2, 11)), jnp.int32),
             "segment_ids": jnp.ones((2, 11), jnp.int32)}
    state = fns.init(jax.random.key(0))
    old = jax.device_get(state["params"]["heads"])
    state = {**state, "step": jnp.asarray(1, jnp.int32)}
    new, metrics = fns.train_step(state, batch)
    w = reference_weights(3, 1, base=(1, 2, 1), schedule="deepseek", lam_step=3, curriculum="forward", every=2)
    assert w[0] == 1 and w[1] == w[2] == 0
    losses = np.array([float(metrics[f"loss/head_{i}"]) for i in (1, 2, 3)])
    np.testing.assert_allclose(float(metrics["loss"]), float(np.dot(w, losses)), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(jax.device_get(new["params"]["heads"]))):
        assert not np.array_equal(a[0], b[0]) and np.array_equal(a[1:], b[1:])


@pytest.mark.slow
def test_mtp_train_logs_the_scheduled_loss(tmp_path: Path):
    run_dir = tmp_path / "run"
    args = ["model.d_model=32", "model.n_layers=4", "model.attn_heads=2", "model.mtp_heads=3", "data.tokenizer=bytes",
            "data.max_bytes=200000", "data.val_fraction=0.3", "train.batch_size=4", "train.seq_len=32", "train.log_every=1",
            "train.steps=6",
            "train.eval_batches=1", "train.tensorboard=false", "train.progress=false", "optim.warmup_steps=1",
            "train.loss_schedule=deepseek", "train.loss_lambda_step=4", "train.n_curriculum=reverse",
            "train.curriculum_every=2", f"train.run_dir={run_dir}"]
    done = subprocess.run([sys.executable, "-m", "mtp_jax.cli", "train", str(ROOT / "experiments" / "quickstart.yaml"),
                           *args], capture_output=True, text=True, timeout=600, env={"JAX_PLATFORMS": "cpu",
                                                                                       **__import__("os").environ})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        w = reference_weights(3, r["step"] - 1, schedule="deepseek", lam_step=4, curriculum="reverse", every=2)
        losses = np.array([r[f"train/loss/head_{i}"] for i in (1, 2, 3)])
        np.testing.assert_allclose(r["train/loss"], np.dot(w, losses), rtol=1e-5, err_msg=str(r))
