"""An experiment file: a grid of config overrides on top of a base config.

    name: induction-cpu              # identifies the results directory's owner
    base: base.yaml                  # relative to this file
    results_dir: runs/sweeps/induction
    tokens_per_point: 2000000        # optional fixed token budget: train.steps = budget / (batch x seq_len)
    overrides: {train.eval_every: 50}   # optional, every point
    grid:                            # the cross product of the axes, in this order
      size:                          # a named bundle: keys that move together
        1m: {model.d_model: 128, model.n_layers: 5, model.attn_heads: 4}
        3m: {model.d_model: 256, model.n_layers: 4, model.attn_heads: 8}
      model.mtp_heads: [1, 2]        # a plain axis: one config key, a list of values
      seed:
        s0: {train.seed: 0, data.task_seed: 0}
        s1: {train.seed: 1, data.task_seed: 1}
    cluster: {nodes: 1, time: "04:00:00", overrides: {mesh.data: -1}}   # optional, --emit only

Each point is trained in RESULTS_DIR/<point name>, a name made of the axes' labels.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml

from mtp_jax.config import Config, load_config
from mtp_jax.errors import UserError

KEYS = {"name", "base", "results_dir", "tokens_per_point", "overrides", "grid", "cluster"}


@dataclasses.dataclass(frozen=True)
class Point:
    index: int
    name: str
    labels: dict[str, str]  # axis -> the label of this point's value
    overrides: dict[str, Any]  # dotted config key -> value (fixed keys, grid keys, run_dir, steps)

    def args(self) -> list[str]:
        """The overrides as `key=value` arguments of mtp-train."""
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    base: Path
    results_dir: Path
    points: list[Point]
    cluster: dict[str, Any]

    def config(self, point: Point) -> Config:
        return load_config(self.base, point.args())


def _label(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "", str(value)) or "x"


def _axis_values(axis: str, spec: Any) -> list[tuple[str, dict[str, Any]]]:
    """(label, {key: value}) for each value of one axis: a list for a config key, a mapping for a bundle."""
    if isinstance(spec, list) and spec:
        return [(_label(v), {axis: v}) for v in spec]
    if isinstance(spec, dict) and spec and all(isinstance(v, dict) and v for v in spec.values()):
        return [(_label(label), dict(values)) for label, values in spec.items()]
    raise UserError(f"grid axis {axis!r} must be a non-empty list of values or a mapping of labels to "
                    f"{{key: value}} bundles, got {spec!r}")


def _short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def load_experiment(path: str | Path) -> Experiment:
    """Reads and checks an experiment file; every point's config is validated before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file '{path}' does not exist; pass e.g. experiments/induction/sweep.yaml")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"experiment file '{path}' is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"experiment file '{path}' must be a mapping with name, base, results_dir and grid")
    unknown = set(spec) - KEYS
    if unknown:
        raise UserError(f"experiment file '{path}' has unknown keys {sorted(unknown)}; known: {', '.join(sorted(KEYS))}")
    for key in ("name", "base", "results_dir"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise UserError(f"experiment file '{path}' needs a string '{key}'")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"experiment file '{path}' has an empty grid; give at least one axis under 'grid:'")
    fixed = spec.get("overrides") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"'overrides' in '{path}' must be a mapping of dotted keys to values")
    axes = [(axis, _axis_values(axis, values)) for axis, values in grid.items()]
    base = path.parent / spec["base"]
    results_dir = Path(spec["results_dir"])
    budget = spec.get("tokens_per_point")
    points = []
    for index, combo in enumerate(itertools.product(*(values for _, values in axes))):
        labels = {axis: label for (axis, _), (label, _) in zip(axes, combo)}
        name = "_".join(f"{_short(axis)}-{label}" for axis, label in labels.items())
        overrides = {**fixed, **{k: v for _, values in combo for k, v in values.items()}}
        overrides["train.run_dir"] = str(results_dir / name)
        points.append(Point(index, name, labels, overrides))
    if len({p.name for p in points}) != len(points):
        raise UserError(f"grid axes of '{path}' give two points the same name; make the labels distinct")
    experiment = Experiment(path, spec["name"], base, results_dir, points, spec.get("cluster") or {})
    if budget is not None:
        experiment = _with_budget(experiment, budget)
    for point in experiment.points:
        experiment.config(point)  # one line naming an unknown key or a bad value
    return experiment


def _with_budget(experiment: Experiment, budget: Any) -> Experiment:
    """Sets train.steps so every point trains on the same number of tokens."""
    if not isinstance(budget, int) or budget < 1:
        raise UserError(f"tokens_per_point={budget!r} must be a positive whole number of tokens")
    points = []
    for point in experiment.points:
        train = experiment.config(point).train
        steps = budget // (train.batch_size * train.seq_len)
        if steps < 1:
            raise UserError(f"tokens_per_point={budget} is less than one step of point {point.name} "
                            f"({train.batch_size} x {train.seq_len} tokens); raise it")
        points.append(dataclasses.replace(point, overrides={**point.overrides, "train.steps": steps}))
    return dataclasses.replace(experiment, points=points)
