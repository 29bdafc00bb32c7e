"""`mtp-sweep EXPERIMENT --report`: every point's results, the configurations' seed statistics,
the paired comparisons with their verdicts, and plots, in RESULTS_DIR.

- results.csv: one row per point: name, configuration (the name without the seed axis), status,
  the grid's config keys, parameters, non-embedding parameters, tokens seen, every metric of every
  task's newest result (`<task>/<metric>`, the final value) and, for the headline metrics, the
  best value over training's evaluations (`best/<task>/<metric>`, `best_step/...`).
- summary.csv: one row per configuration (points equal on every grid axis but the seed axis):
  seeds finished, mean and standard error over seeds of each headline metric, final and best.
- comparisons.csv: per `report.compare` entry and context (the other axes' labels), treatment
  minus control of `report.metric` paired by seed, mean and 90% t interval, best and final,
  and the verdict on the best-over-training values (sweep/stats.py states the rule).
- results.md: the three as Markdown tables; plots/*.{png,svg}: held-out loss per head and task
  metrics against non-embedding parameters, polynomial accuracy against m, task metrics against
  training steps, each configuration's mean over seeds with standard-error bars.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from mtp_jax.evals.results import latest_results, read_results
from mtp_jax.sweep.experiment import Comparison, Experiment, Point, label_of
from mtp_jax.sweep.local import claim_results_dir, status
from mtp_jax.sweep.stats import LEVEL, mean_se, paired_difference

HEADLINE = {
    "induction": ("second_token_accuracy", "first_token_accuracy"),
    "polynomial": ("exact_match/in_domain", "exact_match/out_of_domain", "coefficient_accuracy/in_domain",
                   "answer_loss/in_domain"),
}


SIZE_KEYS = {"model.d_model", "model.n_layers", "model.attn_heads", "model.d_ff", "model.kv_heads", "model.head_dim"}


def best_over_training(records: list[dict], metric: str) -> tuple[int, float] | None:
    """(step, value) of the best evaluation of `metric` (lowest for a loss, else highest), the
    paper's checkpoint choice; the earliest step wins a tie."""
    sign = 1 if "loss" in metric else -1
    found = [(sign * r["metrics"][metric], r["step"]) for r in records if metric in r["metrics"]]
    if not found:
        return None
    value, step = min(found)
    return step, sign * value


def parameter_counts(cfg: Any) -> tuple[int, int]:
    """(all parameters, non-embedding parameters: without the embedding and unembedding tables)."""
    import jax

    from mtp_jax.model.transformer import MTP

    params = MTP(cfg.model).abstract_params()
    total = sum(x.size for x in jax.tree.leaves(params))
    tables = sum(x.size for k in ("embed", "unembed") if k in params for x in jax.tree.leaves(params[k]))
    return int(total), int(total - tables)


def point_row(experiment: Experiment, point: Point) -> dict[str, Any]:
    from mtp_jax.run import read_config

    run_dir = Path(point.overrides["train.run_dir"])
    row: dict[str, Any] = {"point": point.name, "configuration": experiment.configuration(point),
                           "status": status(experiment, point)}
    row.update(point.labels)
    row.update({k: v for k, v in point.overrides.items() if k != "train.run_dir"})
    if (run_dir / "config.yaml").is_file():  # written once training starts, vocabulary resolved
        cfg = read_config(run_dir)
        row["params"], row["non_embedding_params"] = parameter_counts(cfg)
        row["mtp_heads"] = cfg.model.mtp_heads
        results = latest_results(run_dir)
        if "heldout" in results:
            row["tokens_seen"] = results["heldout"]["step"] * cfg.train.batch_size * cfg.train.seq_len
        for task, record in sorted(results.items()):
            row.update({f"{task}/{k}": v for k, v in record["metrics"].items()})
        for task, metrics in HEADLINE.items():
            records = read_results(run_dir, task)
            for metric in metrics:
                best = best_over_training(records, metric)
                if best is not None:
                    row[f"best_step/{task}/{metric}"], row[f"best/{task}/{metric}"] = best
    return row


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]) + "\n"


def headline_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """`<task>/<metric>` of the headline metrics some row has."""
    return [f"{task}/{m}" for task, metrics in HEADLINE.items() for m in metrics if any(f"{task}/{m}" in r for r in rows)]


def _done(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "done"]


def summary_rows(experiment: Experiment, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: mean and standard error over its finished seeds."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _done(rows):
        groups[row["configuration"]].append(row)
    out = []
    for name, members in groups.items():
        first = members[0]
        summary = {"configuration": name, "seeds": len(members), "mtp_heads": first["mtp_heads"],
                   "non_embedding_params": first["non_embedding_params"]}
        summary.update({a: first[a] for a in experiment.axes if a != experiment.seed_axis})
        for metric in ["heldout/loss/head_1", *headline_metrics(members)]:
            for prefix in ("", "best/"):
                values = [r[prefix + metric] for r in members if prefix + metric in r]
                if values:
                    summary[prefix + metric], summary[f"{prefix}{metric}/se"] = mean_se(values)
        out.append(summary)
    return out


def _pairs(experiment: Experiment, comparison: Comparison, rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple]]:
    """context -> seed label -> (treatment row, control row), finished points only."""
    seed = experiment.seed_axis
    # a plain axis's rows hold the config value (2), a comparison its label ("2")
    by_labels = {tuple((a, label_of(r[a])) for a in experiment.axes): r for r in _done(rows)}
    out: dict[str, dict[str, tuple]] = defaultdict(dict)
    for key, control in by_labels.items():
        labels = dict(key)
        if any(labels[a] != v for a, v in comparison.control.items()):
            continue
        treatment = by_labels.get(tuple((a, comparison.treatment.get(a, v)) for a, v in key))
        if treatment is not None:
            context = ",".join(f"{a}={v}" for a, v in labels.items() if a != seed and a not in comparison.control)
            out[context][labels.get(seed, "")] = (treatment, control)
    return out


def comparison_rows(experiment: Experiment, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Treatment minus control of report.metric, paired by seed: best over training (the verdict's)
    and final values."""
    metric = experiment.metric
    out = []
    for comparison in experiment.comparisons:
        for context, pairs in sorted(_pairs(experiment, comparison, rows).items()):
            row: dict[str, Any] = {"comparison": comparison.name, "context": context or "-", "metric": metric}
            for prefix, name in (("best/", "best"), ("", "final")):
                both = [(t[prefix + metric], c[prefix + metric]) for t, c in pairs.values()
                        if prefix + metric in t and prefix + metric in c]
                if both:
                    diff = paired_difference([t for t, _ in both], [c for _, c in both])
                    row.update({"pairs": diff.pairs, f"{name}_diff": diff.mean, f"{name}_low": diff.low,
                                f"{name}_high": diff.high})
                    if name == "best":
                        row["verdict"] = diff.verdict
            out.append(row)
    return out


def write_markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]], comparisons: list[dict[str, Any]],
                   path: Path) -> None:
    """Comparisons with verdicts, configurations (mean and standard error over seeds), points."""
    metrics = headline_metrics(rows)
    parts = []
    if comparisons:
        parts.append(f"**Comparisons** (treatment minus control, paired by seed; {LEVEL:.0%} t interval; "
                     f"verdict on the best-over-training values)\n\n" + markdown_table(comparisons, [
                         "comparison", "context", "metric", "pairs", "best_diff", "best_low", "best_high", "verdict",
                         "final_diff", "final_low", "final_high"]))
    stats = [c for m in ["heldout/loss/head_1", *metrics] for c in (m, f"{m}/se")]
    stats += [c for m in metrics for c in (f"best/{m}", f"best/{m}/se")]
    parts.append("**Configurations** (mean and standard error over seeds; best/ = best over training)\n\n"
                 + markdown_table(summary, ["configuration", "seeds", "mtp_heads", "non_embedding_params",
                                            *[c for c in stats if any(c in s for s in summary)]]))
    columns = ["point", "status", "mtp_heads", "non_embedding_params", "tokens_seen", "heldout/loss/head_1"]
    columns += [c for m in metrics for c in (m, f"best/{m}")]
    parts.append("**Points** (final and best over training)\n\n" + markdown_table(rows, columns))
    path.write_text("\n".join(parts))


def _line(values: list[float]) -> tuple[float, float]:
    mean, se = mean_se(values)
    return mean, 0.0 if math.isnan(se) else se


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet: no lines, no legend
        ax.legend(fontsize=8)


def _save(fig: Any, folder: Path, name: str) -> list[Path]:
    paths = [folder / f"{name}.{ext}" for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=120)
    return paths


def _size_line(experiment: Experiment, row: dict[str, Any]) -> str:
    """A line of a plot against size: n and the labels of the axes that neither set the size nor
    the seed nor n."""
    other = [f"{a}={row[a]}" for a, keys in experiment.axes.items()
             if a != experiment.seed_axis and not keys & (SIZE_KEYS | {"model.mtp_heads"})]
    return ", ".join([f"n={row['mtp_heads']}", *other])


def _against_params(experiment: Experiment, rows: list[dict[str, Any]], metrics: list[str], title: str) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        lines: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in _done(rows):
            if metric in row:
                lines[_size_line(experiment, row)][row["non_embedding_params"]].append(row[metric])
        for label, by_size in sorted(lines.items()):
            sizes = sorted(by_size)
            stats = [_line(by_size[x]) for x in sizes]
            ax.errorbar(sizes, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_title(metric, fontsize=9)
        _legend(ax)
    fig.suptitle(title, fontsize=10)
    return fig


def _per_configuration(rows: list[dict[str, Any]], metric: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for row in _done(rows):
        if metric in row:
            out[row["configuration"]].append(row[metric])
    return out


def _against_m(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ms = sorted({int(c.rsplit("_", 1)[1]) for r in rows for c in r if c.startswith(f"polynomial/{key}/m_")})
        lines: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for m in ms:
            for name, values in _per_configuration(rows, f"polynomial/{key}/m_{m}").items():
                lines[name].append((m, *_line(values)))
        for name, pts in sorted(lines.items()):
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
        ax.set_xlabel("operations m (trained on 1..5)")
        ax.set_title(f"polynomial {key} (final)", fontsize=9)
        _legend(ax)
    return fig


def _curves(experiment: Experiment, rows: list[dict[str, Any]], task: str) -> Any:
    """The task's headline metrics against training steps, mean over seeds per configuration."""
    import matplotlib.pyplot as plt

    metrics = HEADLINE[task]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for point, row in zip(experiment.points, rows):
            if row["status"] != "done":
                continue
            for record in read_results(point.overrides["train.run_dir"], task):
                if metric in record["metrics"]:
                    series[row["configuration"]][record["step"]].append(record["metrics"][metric])
        for name, by_step in sorted(series.items()):
            steps = sorted(by_step)
            stats = [_line(by_step[s]) for s in steps]
            ax.errorbar(steps, [s[0] for s in stats], yerr=[s[1] for s in stats], marker=".", capsize=2, label=name)
        ax.set_xlabel("training step")
        ax.set_title(f"{task} {metric}", fontsize=9)
        _legend(ax)
    return fig


def plot(experiment: Experiment, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    heads = sorted({c for r in rows for c in r if c.startswith("heldout/loss/head_")})
    figures = {"loss_per_head": _against_params(experiment, rows, heads, "held-out loss per head") if heads else None}
    for task, metrics in HEADLINE.items():
        present = [f"{task}/{m}" for m in metrics if any(f"{task}/{m}" in r for r in rows)]
        if present:
            figures[f"{task}_vs_params"] = _against_params(experiment, rows, present, f"{task} against size")
            figures[f"{task}_vs_step"] = _curves(experiment, rows, task)
    if any(c.startswith("polynomial/exact_match/m_") for r in rows for c in r):
        figures["polynomial_vs_m"] = _against_m(rows, ("exact_match", "coefficient_accuracy"))
    for name, fig in figures.items():
        if fig is not None:
            paths += _save(fig, folder, name)
            plt.close(fig)
    return paths


def report(experiment: Experiment) -> Path:
    """Writes the tables and plots; prints one line per point, configuration and comparison."""
    claim_results_dir(experiment)
    rows = [point_row(experiment, p) for p in experiment.points]
    summary, comparisons = summary_rows(experiment, rows), comparison_rows(experiment, rows)
    folder = experiment.results_dir
    for name, table in (("results", rows), ("summary", summary), ("comparisons", comparisons)):
        write_csv(table, folder / f"{name}.csv")
    write_markdown(rows, summary, comparisons, folder / "results.md")
    for row in rows:
        print(f"{row['point']}: {row['status']}")
    metric = experiment.metric
    for row in summary:
        if metric and f"best/{metric}" in row:
            print(f"{row['configuration']}: {metric} best {row[f'best/{metric}']:.4f} +- {_cell(row[f'best/{metric}/se']) or '-'}"
                  f", final {row[metric]:.4f} +- {_cell(row[f'{metric}/se']) or '-'} ({row['seeds']} seeds)")
    for row in comparisons:
        if "verdict" in row:
            print(f"{row['comparison']} [{row['context']}]: best {row['best_diff']:+.4f} ({LEVEL:.0%} interval "
                  f"{_cell(row['best_low']) or '-'} .. {_cell(row['best_high']) or '-'}, {row['pairs']} seeds): {row['verdict']}")
    plots = plot(experiment, rows, folder / "plots")
    print(f"wrote {folder / 'results.csv'}, summary.csv, comparisons.csv, results.md and {len(plots)} plot files "
          f"in {folder / 'plots'}")
    return folder / "results.csv"
