"""`mtp-sweep EXPERIMENT --report`: every point's results in RESULTS_DIR/results.csv and plots.

One row per point: point name, status (done / failed / pending), the grid's config keys,
parameters and non-embedding parameters, tokens seen, and every metric of every task's newest
result (`<task>/<metric>`), the headline columns as results.md. Plots (PNG and SVG, RESULTS_DIR/plots/): held-out loss per head and
each task's headline metrics against non-embedding parameters, one line per n; polynomial
accuracy against m; task metrics against training steps. Points that differ only in what is not
the size or n (the seeds) are averaged, with their standard deviation as error bars.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from mtp_jax.evals.results import latest_results, read_results
from mtp_jax.sweep.experiment import Experiment, Point
from mtp_jax.sweep.local import claim_results_dir, status

HEADLINE = {
    "induction": ("second_token_accuracy", "first_token_accuracy"),
    "polynomial": ("exact_match/in_domain", "exact_match/out_of_domain", "coefficient_accuracy/in_domain",
                   "answer_loss/in_domain"),
}


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
    row: dict[str, Any] = {"point": point.name, "status": status(experiment, point)}
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
    return row


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(rows: list[dict[str, Any]], path: Path) -> None:
    """The headline columns as a Markdown table (what a README shows)."""
    columns = ["point", "status", "mtp_heads", "non_embedding_params", "tokens_seen", "heldout/loss/head_1"]
    columns += [f"{task}/{m}" for task, metrics in HEADLINE.items() for m in metrics if any(f"{task}/{m}" in r for r in rows)]
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _groups(rows: list[dict[str, Any]], metric: str) -> dict[tuple[int, int], list[float]]:
    """(n, non-embedding params) -> the metric's values (one per seed)."""
    out: dict[tuple[int, int], list[float]] = defaultdict(list)
    for row in rows:
        if row["status"] == "done" and metric in row:
            out[(row["mtp_heads"], row["non_embedding_params"])].append(row[metric])
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet: no lines, no legend
        ax.legend(fontsize=8)


def _save(fig: Any, folder: Path, name: str) -> list[Path]:
    paths = [folder / f"{name}.{ext}" for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=120)
    return paths


def _against_params(rows: list[dict[str, Any]], metrics: list[str], title: str) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        by_n: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
        for (n, params), values in sorted(_groups(rows, metric).items()):
            by_n[n].append((params, *_mean_std(values)))
        for n, pts in sorted(by_n.items()):
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"n={n}")
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_title(metric, fontsize=9)
        _legend(ax)
    fig.suptitle(title, fontsize=10)
    return fig


def _against_m(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ms = sorted({int(c.rsplit("_", 1)[1]) for r in rows for c in r if c.startswith(f"polynomial/{key}/m_")})
        lines: dict[tuple[int, int], list[tuple[int, float, float]]] = defaultdict(list)
        for m in ms:
            for group, values in _groups(rows, f"polynomial/{key}/m_{m}").items():
                lines[group].append((m, *_mean_std(values)))
        for (n, params), pts in sorted(lines.items()):
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"n={n}, {params / 1e6:.1f}M")
        ax.set_xlabel("operations m (trained on 1..5)")
        ax.set_title(f"polynomial {key}", fontsize=9)
        _legend(ax)
    return fig


def _curves(experiment: Experiment, rows: list[dict[str, Any]], task: str) -> Any:
    """The task's headline metrics against training steps, mean over seeds per (n, size)."""
    import matplotlib.pyplot as plt

    metrics = HEADLINE[task]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        series: dict[tuple[int, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for point, row in zip(experiment.points, rows):
            if row["status"] != "done":
                continue
            for record in read_results(point.overrides["train.run_dir"], task):
                if metric in record["metrics"]:
                    series[(row["mtp_heads"], row["non_embedding_params"])][record["step"]].append(record["metrics"][metric])
        for (n, params), by_step in sorted(series.items()):
            steps = sorted(by_step)
            stats = [_mean_std(by_step[s]) for s in steps]
            ax.errorbar(steps, [s[0] for s in stats], yerr=[s[1] for s in stats], marker=".", capsize=2,
                        label=f"n={n}, {params / 1e6:.1f}M")
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
    figures = {"loss_per_head": _against_params(rows, heads, "held-out loss per head") if heads else None}
    for task, metrics in HEADLINE.items():
        present = [f"{task}/{m}" for m in metrics if any(f"{task}/{m}" in r for r in rows)]
        if present:
            figures[f"{task}_vs_params"] = _against_params(rows, present, f"{task} against size")
            figures[f"{task}_vs_step"] = _curves(experiment, rows, task)
    if any(c.startswith("polynomial/exact_match/m_") for r in rows for c in r):
        figures["polynomial_vs_m"] = _against_m(rows, ("exact_match", "coefficient_accuracy"))
    for name, fig in figures.items():
        if fig is not None:
            paths += _save(fig, folder, name)
            plt.close(fig)
    return paths


def report(experiment: Experiment) -> Path:
    """Writes results.csv and the plots; prints one line per point and the files written."""
    claim_results_dir(experiment)
    rows = [point_row(experiment, p) for p in experiment.points]
    path = experiment.results_dir / "results.csv"
    write_csv(rows, path)
    write_markdown(rows, experiment.results_dir / "results.md")
    for row in rows:
        print(f"{row['point']}: {row['status']}")
    plots = plot(experiment, rows, experiment.results_dir / "plots")
    print(f"wrote {path}, results.md and {len(plots)} plot files in {experiment.results_dir / 'plots'}")
    return path
