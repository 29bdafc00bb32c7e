"""A run directory and the objects built from its config.

RUN_DIR/
  config.yaml        resolved config (vocab size filled in from the tokenizer)
  versions.json      software and device versions
  tokenizer/         the tokenizer every later command loads
  data_manifest.json files and bytes of the corpus
  checkpoints/       Orbax checkpoints (train state + data iterator state)
  metrics.jsonl, tensorboard/
  eval.json          training's final held-out evaluation (an evals/results.py record)
  evals/<task>/step_<step>.json   every evaluation, one record schema for every task
"""

from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import jax
import yaml

from mtp_jax import sharding
from mtp_jax.config import Config, ConfigError, from_dict, to_yaml
from mtp_jax.model.transformer import MTP
from mtp_jax.optim import make_optimizer
from mtp_jax.step import StepFns


VOCAB_MULTIPLE = 128


class Built(NamedTuple):
    cfg: Config
    mtp: MTP
    fns: StepFns


class Restored(NamedTuple):
    built: Built
    tokenizer: Any
    params: Any
    step: int  # the checkpoint step the parameters come from


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> Config:
    """Fills model.vocab_size from the tokenizer (padded to a multiple of 128, so it shards over any
    usual tensor-parallel size and tiles well), or refuses one too small for it."""
    vocab = cfg.model.vocab_size
    if vocab == 0:
        vocab = -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif vocab < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab} tokens; "
            f"set model.vocab_size=0 (automatic) or >= {tokenizer_vocab}"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def build(cfg: Config, devices: list | None = None) -> Built:
    """Model, optimizer, mesh and jitted steps for a config whose vocab size is resolved."""
    mtp = MTP(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.train.steps, mtp.logical_axes())
    mesh = sharding.make_mesh(cfg.mesh, devices)
    fns = StepFns(mtp, tx, cfg.train, mesh, sharding.rules_dict(cfg.mesh.rules))
    return Built(cfg, mtp, fns)


def write_run_files(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    packages = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "tokenizers"]
    versions: dict[str, Any] = {p: _version(p) for p in packages}
    versions.update(python=platform.python_version(), backend=jax.default_backend(),
                    device_kind=jax.devices()[0].device_kind, devices=jax.device_count(),
                    processes=jax.process_count())
    (run_dir / "versions.json").write_text(json.dumps(versions, indent=2))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def read_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (no config.yaml); pass the train.run_dir of a training run")
    return from_dict(yaml.safe_load(path.read_text()))


def restore_run(run_dir: str | Path, step: int | None = None) -> Restored:
    """Built objects, tokenizer, params and step of a run's newest (or given) checkpoint, on one local device.
    Reads the parameters only (no optimizer state): what evaluation and decoding need."""
    from mtp_jax.checkpoint import Checkpointer
    from mtp_jax.data.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    built = build(cfg, jax.local_devices()[:1])
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints, save_every=1, async_save=False)
    try:
        restored = ckpt.restore({"params": built.fns.abstract_state["params"]}, step=step, partial=True)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"run directory '{run_dir}' has no checkpoint yet; train first (mtp-train ... train.run_dir={run_dir})")
    return Restored(built, tokenizer, restored[1]["params"], restored[0])


def load_run(run_dir: str | Path, step: int | None = None) -> tuple[Config, Any, MTP, Any]:
    """(config, tokenizer, model, params): what decoding needs from a run."""
    run = restore_run(run_dir, step)
    return run.built.cfg, run.tokenizer, run.built.mtp, run.params
