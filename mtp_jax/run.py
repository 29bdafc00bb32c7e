"""A run directory and the objects built from its config.

RUN_DIR/
  .lock              held by the one trainer writing here (lock.py)
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
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import jax
import yaml

from mtp_jax import sharding
from mtp_jax.atomic import write_atomic
from mtp_jax.config import Config, ConfigError, from_dict, to_dict, to_yaml
from mtp_jax.errors import DivergenceError
from mtp_jax.model.transformer import MTP
from mtp_jax.optim import make_optimizer
from mtp_jax.step import StepFns


VOCAB_MULTIPLE = 128
# What a run that never saved a checkpoint leaves: a retry replaces it rather than tripping on it.
RUN_FILES = ("config.yaml", "versions.json", "data_manifest.json", "metrics.jsonl", "tokenizer")
# Keys whose change on resume says nothing about the run (where it runs, how it reports).
QUIET_KEYS = ("train.run_dir", "train.progress", "train.tensorboard", "train.log_every", "train.async_checkpoint",
              "train.peak_flops", "train.allow_data_change", "data.worker_count", "mesh.", "distributed.")


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
    write_atomic(run_dir / "config.yaml", to_yaml(cfg))
    packages = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "tokenizers"]
    versions: dict[str, Any] = {p: _version(p) for p in packages}
    versions.update(python=platform.python_version(), backend=jax.default_backend(),
                    device_kind=jax.devices()[0].device_kind, devices=jax.device_count(),
                    processes=jax.process_count())
    write_atomic(run_dir / "versions.json", json.dumps(versions, indent=2))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_resume(saved: Config, cfg: Config, allow_data_change: bool = False) -> list[str]:
    """Compares a resumed run's saved config with this one (vocab sizes resolved in both). A changed data
    source or tokenizer is refused unless train.allow_data_change=true (or `allow_data_change`: converted
    weights, which hold no data position): the data iterator's position and the checkpoint's embeddings
    belong to the old one. Returns the other changed keys as 'key old -> new'."""
    old, new = _flat(to_dict(saved)), _flat(to_dict(cfg))
    changed = [k for k in new if old.get(k) != new[k] and not k.startswith(QUIET_KEYS)]
    data = [k for k in changed if k.startswith("data.")]
    if data and not (cfg.train.allow_data_change or allow_data_change):
        what = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in data)
        raise ConfigError(f"resuming {cfg.train.run_dir} with a different data source or tokenizer ({what}); "
                          f"restore those values, use a new train.run_dir, or set train.allow_data_change=true")
    return [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in changed]


# Every name mtp-train (and mtp-sweep, around a point's trainer: sweep/local.py) writes at the top of a run
# directory; anything else there is someone else's.
OWN_NAMES = (".lock", "checkpoints", "data_cache", "tensorboard", "evals", "eval.json", *RUN_FILES,
             "train.log", ".sweep.lock", "sweep_failed.json")
_ASIDE = ".mtp-replaced-"  # a failed earlier start's files, moved aside until this start succeeds


def foreign_entries(run_dir: Path) -> list[str]:
    """What in a run directory without a checkpoint mtp-train did not write: unknown names, and our names holding
    something that does not read as ours (a config.yaml that is no config, JSON files that are not JSON)."""
    foreign = [p.name for p in run_dir.iterdir() if p.name not in OWN_NAMES and not p.name.startswith(_ASIDE)]
    checks = {"config.yaml": lambda p: read_config(p.parent), "versions.json": _json_object,
              "data_manifest.json": _json_object, "eval.json": _json_object,
              "metrics.jsonl": lambda p: [_json_object(p, line) for line in p.read_text().splitlines()],
              "tokenizer": lambda p: read_tokenizer(p) if any(p.iterdir()) else None}
    for name, check in checks.items():
        path = run_dir / name
        if not path.exists():
            continue
        try:
            check(path)
        except (ConfigError, OSError, ValueError):
            foreign.append(name)
    return sorted(foreign)


# What mtp-train adds files to or appends to in a run directory it resumes or restarts.
WRITTEN_INTO = ("checkpoints", "evals", "tensorboard", "data_cache", "metrics.jsonl")


def unwritable_entries(run_dir: Path) -> list[str]:
    """Those of WRITTEN_INTO (and the task folders of evals/) this process may not write: found before the start
    changes anything, not at the first save (Orbax's writer then waits minutes for the step folder it could not
    create) or after training (its final evaluation)."""
    paths = [run_dir / name for name in WRITTEN_INTO]
    paths += [p for p in (run_dir / "evals").glob("*") if p.is_dir()]
    writable = lambda p: os.access(p, os.W_OK | os.X_OK if p.is_dir() else os.W_OK)
    return sorted(f"{p.relative_to(run_dir)}{'/' * p.is_dir()}" for p in paths if p.exists() and not writable(p))


def _json_object(path: Path, text: str | None = None) -> dict:
    value = json.loads(path.read_text() if text is None else text)
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds no JSON object")
    return value


class StartUp:
    """Everything mtp-train changes in RUN_DIR before its first step, undone when the start is refused, so a refused
    run leaves the directory as it found it (one it created is removed). A failed earlier start's files that the
    new start replaces are moved aside, put back by `undo`, deleted by `commit`. checkpoints/ is only ever added to
    by a save, which comes after `commit`."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        missing = run_dir.absolute()
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent
        self._created = None if run_dir.exists() else missing  # the topmost folder this start creates
        self._before: set[str] = set()
        self._new_lock = not (run_dir / ".lock").exists()  # created by taking the lock, before `begin`
        self._aside: Path | None = None
        self.done = False

    def begin(self) -> None:
        """Records what RUN_DIR holds; call once its lock is held (no other trainer can add to it then)."""
        self._before = self._listing() - ({".lock"} if self._new_lock else set())

    def _listing(self) -> set[str]:
        """Relative paths of everything in RUN_DIR but inside checkpoints/ (a save is the only writer there)."""
        top = self.run_dir
        found = set()
        for path in top.rglob("*"):
            rel = path.relative_to(top)
            if rel.parts[0] != "checkpoints" or len(rel.parts) == 1:
                found.add(str(rel))
        return found

    def set_aside(self, names: list[str]) -> list[str]:
        """Moves a failed earlier start's `names` out of the way; returns those that were there."""
        present = [n for n in names if (self.run_dir / n).exists()]
        if present:
            self._aside = self.run_dir / f"{_ASIDE}{os.getpid()}"
            self._aside.mkdir()
            for name in present:
                os.rename(self.run_dir / name, self._aside / name)
        return present

    def commit(self) -> None:
        """The start succeeded: files set aside now (and by starts killed before) are deleted."""
        self.done = True
        for path in self.run_dir.glob(f"{_ASIDE}*"):
            shutil.rmtree(path, ignore_errors=True)

    def undo(self) -> None:
        """The start was refused: removes what it added and puts back what it set aside."""
        if self.done:
            return
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
            return
        if self._aside is not None:  # first put back what was set aside, then the rest is what this start added
            for path in self._aside.iterdir():
                _remove(self.run_dir / path.name)
                os.rename(path, self.run_dir / path.name)
            self._aside.rmdir()
        added = self._listing() - self._before
        for rel in sorted(added, key=lambda r: r.count("/"), reverse=True):
            _remove(self.run_dir / rel)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_tokenizer(folder: Path) -> Any:
    """A run's saved tokenizer, or one line saying it is damaged (the tokenizers library raises bare Exceptions)."""
    from mtp_jax.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(folder)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to parse these two files means a damaged tokenizer
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"the tokenizer in {folder} is unreadable ({reason}); restore tokenizer/ from a backup "
                          f"of the run") from None


def read_config(run_dir: str | Path) -> Config:
    """A run's saved config; a damaged one is an error, never defaults."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (no config.yaml); pass the train.run_dir of a training run")
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is damaged ({type(err).__name__}); restore it from a backup of the run") from None
    if not isinstance(saved, dict) or not {"model", "train"} <= saved.keys():
        raise ConfigError(f"{path} is damaged or not an mtp_jax config (no model: and train: sections); restore it "
                          f"from a backup of the run")
    return from_dict(saved)


def restore_run(run_dir: str | Path, step: int | None = None) -> Restored:
    """Built objects, tokenizer, params and step of a run's newest (or given) checkpoint, on one local device.
    Reads the parameters only (no optimizer state): what evaluation needs."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))
    tokenizer = read_tokenizer(run_dir / "tokenizer")
    built = build(cfg, jax.local_devices()[:1])
    step, params = _read_params(run_dir, cfg, built.fns.abstract_state["params"], step)
    return Restored(built, tokenizer, params, step)


class Loaded(NamedTuple):
    cfg: Config
    tokenizer: Any
    mtp: MTP
    params: Any
    step: int


def checkpoint_dtype(run_dir: str | Path) -> str:
    """The dtype the run's newest checkpoint holds its parameters in."""
    from mtp_jax.checkpoint import Checkpointer

    cfg = read_config(run_dir)
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", cfg.train.keep_checkpoints, 1, async_save=False, read_only=True)
    try:
        return ckpt.params_dtype()
    finally:
        ckpt.close()


def restore_inference(run_dir: str | Path, step: int | None = None, dtype: str | None = None,
                      devices: int = 1) -> Loaded:
    """What decoding needs from a run: the parameters in `dtype` (default: the checkpoint's), split over
    the first `devices` local devices (an fsdp mesh). A given `dtype` is the compute dtype too, so the
    KV cache is held in it."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
    tokenizer, mtp, stored = read_tokenizer(run_dir / "tokenizer"), MTP(cfg.model), dtype or checkpoint_dtype(run_dir)
    mesh = sharding.make_mesh(dataclasses.replace(cfg.mesh, data=1, fsdp=devices, tensor=1, dcn_data=1, dcn_fsdp=1),
                              jax.local_devices()[:devices])
    abstract = mtp.abstract_params()
    shardings = sharding.param_shardings(abstract, mtp.logical_axes(), mesh, sharding.rules_dict(cfg.mesh.rules))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, stored, sharding=s),
                          abstract, shardings)
    step, params = _read_params(run_dir, cfg, target, step)
    return Loaded(cfg, tokenizer, mtp, params, step)


def _read_params(run_dir: Path, cfg: Config, abstract_params: Any, step: int | None) -> tuple[int, Any]:
    """(step, params) of the newest (or given) checkpoint, read as `abstract_params` says (dtype, sharding);
    refuses non-finite weights."""
    from mtp_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints, 1, async_save=False, read_only=True)
    try:
        restored = ckpt.restore({"params": abstract_params}, step=step, partial=True)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"run directory '{run_dir}' has no checkpoint yet; train first (mtp-train ... train.run_dir={run_dir})")
    params = restored[1]["params"]
    if not all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(params)):
        raise DivergenceError(f"checkpoint step {restored[0]} in {run_dir} holds non-finite weights (the run diverged); "
                              f"move that step's folder away to use the one before it")
    return restored[0], params


def load_run(run_dir: str | Path, step: int | None = None, dtype: str | None = None,
             devices: int = 1) -> tuple[Config, Any, MTP, Any]:
    """(config, tokenizer, model, params): `restore_inference` without the step."""
    return restore_inference(run_dir, step, dtype, devices)[:4]
