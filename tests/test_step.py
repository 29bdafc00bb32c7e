"""The jitted train step: sharded over 8 fake devices it matches one device, gradient
accumulation matches one big batch, a tiny model memorises a batch, bf16 compute works, and
bad meshes/shapes fail early with one-line ConfigErrors.

Equivalence checks train with plain SGD: Adam's first update is about lr * sign(g), which would
hide a wrong gradient; SGD's update is the gradient itself.

Run as a script (`python tests/test_step.py DIR`), this file is the 8-device worker that the
sharding test starts in a fresh process, since the pytest process has already chosen 1 device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from conftest import xla_flags
from jax.sharding import AbstractMesh

from mtp_jax import sharding
from mtp_jax.config import Config, ConfigError, MeshConfig, from_dict, to_yaml
from mtp_jax.loss import loss_weights, mtp_loss
from mtp_jax.model.transformer import MTP
from mtp_jax.optim import make_optimizer
from mtp_jax.step import StepFns

ROOT = Path(__file__).resolve().parents[1]
SGD_LR = 0.5
STEPS = 2  # step 2's loss sees step 1's update
# fp32; sharding and accumulation only reorder sums.
RTOL, ATOL = 1e-5, 1e-6


def one_device_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])


class Runner:
    """A StepFns over one mesh and its train step."""

    def __init__(self, cfg: Config, mesh: Any, tx: optax.GradientTransformation | None = None):
        mtp = MTP(cfg.model)
        self.fns = StepFns(mtp, tx or optax.sgd(SGD_LR), cfg.train, mesh, sharding.rules_dict(cfg.mesh.rules))

    def run(self, params: Any, batch: dict, steps: int = STEPS) -> tuple[dict[str, np.ndarray], Any]:
        """From host params: (loss per step, last step's metrics, parameter change; final state)."""
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.fns.tx.init(params)}
        state = jax.device_put(state, self.fns.state_shardings)
        out: dict[str, np.ndarray] = {}
        for s in range(steps):
            state, metrics = self.fns.train_step(state, batch)
            out[f"loss/step_{s}"] = np.asarray(metrics["loss"])
        out.update({f"metric/{k}": np.asarray(v) for k, v in metrics.items()})
        end = flat(jax.device_get(state["params"]))
        out.update({f"delta{k}": end[k] - v for k, v in flat(params).items()})
        return out, state


def with_train(cfg: Config, **fields: Any) -> Config:
    """A copy of cfg with some train.* fields changed (configs are mutable dataclasses)."""
    out = from_dict(yaml.safe_load(to_yaml(cfg)))
    for k, v in fields.items():
        setattr(out.train, k, v)
    return out


def flat(tree: Any) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflat(flat_tree: dict[str, np.ndarray], like: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: flat_tree[jax.tree_util.keystr(p)], like)


def assert_results_close(actual: dict, expected: dict, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol, err_msg=f"{what}: {key}")


# --- shared runs -----------------------------------------------------------------------------
class SingleDevice(NamedTuple):
    params: Any  # the model's initial parameters (host copy)
    runners: dict[int, Runner]  # by micro_batches, train steps compiled
    runs: dict[int, dict[str, np.ndarray]]  # Runner.run results by micro_batches


@pytest.fixture(scope="module")
def step_cfg(tiny) -> Config:
    """3 heads with weights, 8 sequences of 2-4 documents and padding."""
    return tiny(model__mtp_heads=3, model__n_layers=5, train__batch_size=8, train__seq_len=16, train__ce_chunk=6,
                train__loss_weights="[1.0, 0.5, 0.5]")


@pytest.fixture(scope="module")
def step_batch(step_cfg, make_batch) -> dict[str, np.ndarray]:
    return make_batch(8, 16 + 3, step_cfg.model.vocab_size, seed=4)


@pytest.fixture(scope="module")
def single_device(step_cfg, step_batch) -> SingleDevice:
    """One-device references for micro_batches 1 and 2, from the model's init compiled once."""
    key = jax.random.key(0)
    params = jax.device_get(jax.jit(MTP(step_cfg.model).init)(key))
    runners = {m: Runner(with_train(step_cfg, micro_batches=m), one_device_mesh()) for m in (1, 2)}
    return SingleDevice(params, runners, {m: r.run(params, step_batch)[0] for m, r in runners.items()})


# --- tests -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_gradient_accumulation_matches_one_batch(single_device, step_batch) -> None:
    """micro_batches=2 averages two micro-batch means; equal to the full-batch mean when both
    micro-batches (rows of even and of odd index) have the same number of valid targets."""
    seg = step_batch["segment_ids"]
    for i in (1, 2, 3):
        valid = (seg[:, :16] == seg[:, i : i + 16]) & (seg[:, i : i + 16] != 0)
        assert valid[0::2].sum() == valid[1::2].sum(), "premise: equal valid targets per micro-batch"
    runs = single_device.runs
    assert np.abs(runs[1]["delta['heads']['mlp']['w_up']"]).max() > 1e-4  # the step did move
    assert_results_close(runs[2], runs[1], "micro_batches 2 vs 1")


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path: Path, step_cfg, step_batch, single_device) -> None:
    """data 2 x fsdp 2 x tensor 2 on 8 fake CPU devices, micro_batches 1 and 2."""
    np.savez(tmp_path / "batch.npz", **step_batch)
    np.savez(tmp_path / "params.npz", **flat(single_device.params))
    (tmp_path / "config.yaml").write_text(to_yaml(step_cfg))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu", PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for micro in (1, 2):
        with np.load(tmp_path / f"micro{micro}.npz") as f:
            assert_results_close(dict(f), single_device.runs[micro], f"8 devices vs 1, micro_batches={micro}")
    info = json.loads((tmp_path / "shardings.json").read_text())
    # trunk MLP up-projection (layers, embed, mlp): embed over fsdp, mlp over tensor, in params and Adam moments.
    assert info["w_up_spec"] == info["w_up_mu_spec"] == [None, "fsdp", "tensor"]
    layers, d, f = info["w_up_shape"]
    assert info["w_up_shard_shape"] == [layers, d // 2, f // 2]
    assert info["w_up_distinct_shards"] == 4  # replicated only over data
    assert info["unsharded_fraction"] < 0.05


def _worker(out_dir: Path) -> None:
    """The 8-device side of test_eight_devices_match_one_device (runs in a fresh process)."""
    assert jax.device_count() == 8, jax.devices()
    cfg = from_dict(yaml.safe_load((out_dir / "config.yaml").read_text()))
    with np.load(out_dir / "batch.npz") as f:
        batch = dict(f)
    mtp = MTP(cfg.model)
    with np.load(out_dir / "params.npz") as f:
        params = unflat(dict(f), mtp.abstract_params())
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    for micro in (1, 2):
        out, state = Runner(with_train(cfg, micro_batches=micro), mesh).run(params, batch)
        np.savez(out_dir / f"micro{micro}.npz", **out)
    w_up = state["params"]["trunk"]["mlp"]["w_up"]
    adam = StepFns(mtp, make_optimizer(cfg.optim, 10, mtp.logical_axes()), cfg.train, mesh, sharding.rules_dict(cfg.mesh.rules))
    mu = optax.tree_utils.tree_get(adam.state_shardings["opt_state"], "mu")
    spec = lambda s: [a if a is None or isinstance(a, str) else list(a) for a in s.spec]
    info = {
        "w_up_spec": spec(w_up.sharding),
        "w_up_mu_spec": spec(mu["trunk"]["mlp"]["w_up"]),
        "w_up_shape": list(w_up.shape),
        "w_up_shard_shape": list(w_up.addressable_shards[0].data.shape),
        "w_up_distinct_shards": len({str(s.index) for s in w_up.addressable_shards}),
        "unsharded_fraction": sharding.unsharded_fraction(adam.state_shardings["params"], mtp.abstract_params()),
    }
    (out_dir / "shardings.json").write_text(json.dumps(info))


def test_tiny_model_overfits_one_batch(single_device, step_batch) -> None:
    """250 SGD steps on one batch (reusing the compiled one-device step) take the loss below 10%."""
    out, _ = single_device.runners[1].run(single_device.params, step_batch, steps=250)
    losses = [float(out[f"loss/step_{s}"]) for s in range(250)]
    assert losses[-1] < 0.1 * losses[0], losses[::25]


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params_and_close_loss(step_cfg, step_batch, single_device) -> None:
    """model.dtype=bfloat16 is compute only: master parameters and their updates stay float32."""
    cfg = with_train(step_cfg)
    cfg.model.dtype = "bfloat16"
    out, state = Runner(cfg, one_device_mesh()).run(single_device.params, step_batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    assert all(np.isfinite(v).all() for v in out.values())
    for s in range(STEPS):
        np.testing.assert_allclose(out[f"loss/step_{s}"], single_device.runs[1][f"loss/step_{s}"], rtol=2e-2)
    mtp = MTP(cfg.model)
    jaxpr = jax.make_jaxpr(lambda p, b: mtp_loss(mtp, p, b, loss_weights(3)))(mtp.abstract_params(), step_batch)
    assert "bf16" in str(jaxpr)  # the compute really runs in bfloat16


# --- configuration errors --------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model__n_layers": 4, "model__mtp_heads": 4}, r"model\.n_layers=4 leaves no trunk for model\.mtp_heads=4.*n_layers >= 5"),
        ({"train__seq_len": 5, "model__mtp_heads": 3}, r"train\.seq_len=5 is too short for model\.mtp_heads=3"),
        ({"model__d_model": 30}, r"model\.d_model=30 is not divisible by model\.attn_heads=4"),
        ({"model__kv_heads": 3}, r"model\.attn_heads=4 is not a multiple of model\.kv_heads=3"),
        ({"model__d_modle": 32}, r"unknown config key 'model\.d_modle' \(did you mean 'd_model'\?\)"),
        ({"model__d_model": "abc"}, r"model\.d_model='abc' is not an integer"),
        ({"train__tensorboard": "maybe"}, r"train\.tensorboard='maybe' is not a boolean"),
        ({"model__head_type": "conv"}, r"model\.head_type='conv' is not one of transformer, linear"),
        ({"train__batch_size": 6, "train__micro_batches": 4}, r"train\.batch_size=6 is not divisible by train\.micro_batches=4"),
    ],
)
def test_bad_config_is_one_line_error(tiny, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        tiny(**overrides)
    _one_line(err)


@pytest.mark.parametrize(
    "mesh,devices,message",
    [
        (MeshConfig(data=2, fsdp=2, tensor=3), 8, r"mesh data=2 x fsdp=2 x tensor=3 needs 12 devices but 8 are available"),
        (MeshConfig(data=-1, fsdp=3), 8, r"cannot fill 8 devices \(8 is not divisible by 3\)"),
        (MeshConfig(data=-1, fsdp=-1), 8, r"only one mesh axis may be -1"),
        (MeshConfig(tensor=0), 8, r"mesh\.tensor=0 must be a positive size"),
    ],
)
def test_bad_mesh_shape_is_one_line_error(mesh: MeshConfig, devices: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        sharding.mesh_shape(mesh, devices)
    _one_line(err)


def test_mesh_larger_than_the_machine_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs 2 devices but 1 are available") as err:
        sharding.make_mesh(MeshConfig(data=2), jax.devices()[:1])
    _one_line(err)


@pytest.mark.parametrize(
    "overrides,mesh_shape,message",
    [
        ({"model__kv_heads": 1}, (1, 1, 2), r"heads/attn/wk dimension 'kv_heads'=1 is not divisible by mesh axes tensor of size 2"),
        ({"model__vocab_size": 63}, (1, 1, 2), r"embed/embedding dimension 'vocab'=63 is not divisible by mesh axes tensor of size 2"),
        ({"model__d_model": 36, "model__attn_heads": 2}, (1, 8, 1), r"dimension 'embed'=36 is not divisible by mesh axes fsdp of size 8"),
        ({"train__batch_size": 6}, (4, 1, 2), r"train\.batch_size=6 \(per micro-batch\) is not divisible by the 4 batch-parallel devices"),
        ({"train__batch_size": 8, "train__micro_batches": 2}, (2, 4, 1), r"train\.batch_size=4 \(per micro-batch\) is not divisible by the 8"),
    ],
)
def test_mesh_not_dividing_shapes_is_one_line_error(tiny, overrides: dict, mesh_shape: tuple, message: str) -> None:
    """Shardings are built from abstract shapes, so an AbstractMesh of any size checks them here, before compiling."""
    cfg = tiny(**overrides)
    mesh = AbstractMesh(mesh_shape, sharding.MESH_AXES)
    mtp = MTP(cfg.model)
    with pytest.raises(ConfigError, match=message) as err:
        StepFns(mtp, make_optimizer(cfg.optim, 10, mtp.logical_axes()), cfg.train, mesh, sharding.rules_dict(cfg.mesh.rules))
    _one_line(err)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
