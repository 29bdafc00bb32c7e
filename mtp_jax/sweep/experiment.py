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
    report:                          # optional, for --report
      metric: induction/second_token_accuracy   # the verdict's metric (higher is better)
      compare:                       # treatment minus control, paired by seed, other axes equal
        - {treatment: {model.mtp_heads: 2}, control: {model.mtp_heads: 1}}

Each point is trained in RESULTS_DIR/<point name>, a name made of the axes' labels. The axis
whose values set train.seed is the seed axis: points that differ only in it are one
configuration's repetitions, and comparisons pair them by its label.
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

KEYS = {"name", "base", "results_dir", "tokens_per_point", "overrides", "grid", "cluster", "report"}


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
class Comparison:
    """Points labelled `treatment` against points labelled `control` (axis -> label)."""
    treatment: dict[str, str]
    control: dict[str, str]

    @property
    def name(self) -> str:
        side = lambda labels: ",".join(f"{_short(a)}={v}" for a, v in labels.items())
        return f"{side(self.treatment)} - {side(self.control)}"


@dataclasses.dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    base: Path
    results_dir: Path
    points: list[Point]
    cluster: dict[str, Any]
    axes: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)  # axis -> the config keys it sets
    metric: str | None = None  # report.metric: the verdict's metric
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)

    def config(self, point: Point) -> Config:
        return load_config(self.base, point.args())

    @property
    def seed_axis(self) -> str | None:
        return next((axis for axis, keys in self.axes.items() if "train.seed" in keys), None)

    def configuration(self, point: Point) -> str:
        """The point's name without the seed axis: what its seeds share."""
        return "_".join(f"{_short(a)}-{v}" for a, v in point.labels.items() if a != self.seed_axis) or "all"


def label_of(value: Any) -> str:
    """An axis value as it appears in point names and report.compare."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "", str(value)) or "x"


def _axis_values(axis: str, spec: Any) -> list[tuple[str, dict[str, Any]]]:
    """(label, {key: value}) for each value of one axis: a list for a config key, a mapping for a bundle."""
    if isinstance(spec, list) and spec:
        return [(label_of(v), {axis: v}) for v in spec]
    if isinstance(spec, dict) and spec and all(isinstance(v, dict) and v for v in spec.values()):
        return [(label_of(label), dict(values)) for label, values in spec.items()]
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
    keys = {axis: frozenset(k for _, values in vals for k in values) for axis, vals in axes}
    if sum("train.seed" in k for k in keys.values()) > 1:
        raise UserError(f"two grid axes of '{path}' set train.seed; put every seed in one axis")
    metric, comparisons = _report_spec(path, spec.get("report"), axes)
    experiment = Experiment(path, spec["name"], base, results_dir, points, spec.get("cluster") or {}, keys,
                            metric, comparisons)
    if budget is not None:
        experiment = _with_budget(experiment, budget)
    for point in experiment.points:
        experiment.config(point)  # one line naming an unknown key or a bad value
    return experiment


def _report_spec(path: Path, spec: Any, axes: list[tuple[str, list[tuple[str, dict]]]]) -> tuple[str | None, list[Comparison]]:
    """report: {metric: TASK/METRIC, compare: [{treatment: {axis: value}, control: {axis: value}}]}."""
    if spec is None:
        return None, []
    labels = {axis: [label for label, _ in values] for axis, values in axes}
    metric, compare = (spec.get("metric"), spec.get("compare") or []) if isinstance(spec, dict) else (None, None)
    if set(spec if isinstance(spec, dict) else ()) - {"metric", "compare"} or not isinstance(compare, list):
        raise UserError(f"'report' in '{path}' must be a mapping with 'metric' and a list 'compare'")
    if not isinstance(metric, str) or metric.count("/") < 1:
        raise UserError(f"report.metric in '{path}' must name a task metric as TASK/METRIC, e.g. "
                        f"induction/second_token_accuracy; got {metric!r}")

    def side(entry: Any, key: str) -> dict[str, str]:
        chosen = entry.get(key) if isinstance(entry, dict) else None
        if not isinstance(chosen, dict) or not chosen:
            raise UserError(f"each report.compare entry in '{path}' needs '{key}': {{axis: value}}; got {entry!r}")
        for axis, value in chosen.items():
            if label_of(value) not in labels.get(axis, []):
                raise UserError(f"report.compare in '{path}': {axis}={value} is not a label of a grid axis "
                                f"(axes: {', '.join(f'{a}: {v}' for a, v in labels.items())})")
        return {axis: label_of(value) for axis, value in chosen.items()}

    comparisons = [Comparison(side(entry, "treatment"), side(entry, "control")) for entry in compare]
    for c in comparisons:
        if set(c.treatment) != set(c.control):
            raise UserError(f"report.compare in '{path}': treatment and control must name the same axes ({c.name})")
    return metric, comparisons


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
