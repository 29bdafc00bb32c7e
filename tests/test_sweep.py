"""mtp-sweep: grids and bundles, bad input in one line, failed points as rows, cluster jobs through
launch/ (the SLURM array task runs exactly its point), and a real tiny grid that is interrupted,
resumed, skipped when finished and reported."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtp_jax.errors import UserError
from mtp_jax.evals.results import latest_results
from mtp_jax.sweep.cli import main
from mtp_jax.sweep.experiment import load_experiment
from mtp_jax.sweep.local import run_local, status
from mtp_jax.sweep.report import best_over_training, comparison_rows, report, summary_rows
from mtp_jax.sweep.stats import paired_difference

ROOT = Path(__file__).resolve().parents[1]
BASE = """
model: {d_model: 32, n_layers: 3, attn_heads: 2, mtp_heads: 1}
data: {source: polynomial, tokenizer: bytes, task_train_examples: 300, task_test_examples: 3, task_test_ops: 6}
train: {steps: 4, batch_size: 4, seq_len: 32, ce_chunk: 32, log_every: 2, checkpoint_every: 2, eval_every: 2,
        eval_batches: 1, progress: false, tensorboard: false}
optim: {lr: 3.0e-3, warmup_steps: 0}
"""


def write_experiment(tmp_path: Path, grid: dict, name: str = "tiny", **extra) -> Path:
    (tmp_path / "base.yaml").write_text(BASE)
    spec = {"name": name, "base": "base.yaml", "results_dir": str(tmp_path / "results"), "grid": grid, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


GRID = {"size": {"a": {"model.d_model": 32}, "b": {"model.d_model": 48}}, "model.mtp_heads": [1, 2]}


def test_grid_bundles_and_token_budget(tmp_path: Path) -> None:
    exp = load_experiment(write_experiment(tmp_path, GRID, tokens_per_point=1024, overrides={"train.seed": 3}))
    assert [p.name for p in exp.points] == ["size-a_mtp_heads-1", "size-a_mtp_heads-2",
                                            "size-b_mtp_heads-1", "size-b_mtp_heads-2"]
    cfg = exp.config(exp.points[3])
    assert (cfg.model.d_model, cfg.model.mtp_heads, cfg.train.seed, cfg.train.steps) == (48, 2, 3, 1024 // (4 * 32))
    assert cfg.train.run_dir == str(tmp_path / "results" / "size-b_mtp_heads-2")


@pytest.mark.parametrize("grid, extra, message", [
    ({"model.no_such_key": [1, 2]}, {}, "unknown config key 'model.no_such_key'"),
    ({}, {}, "empty grid"),
    ({"model.mtp_heads": []}, {}, "must be a non-empty list"),
    ({"model.mtp_heads": [1]}, {"tokens_per_point": 10}, "less than one step"),
    ({"model.mtp_heads": [1]}, {"colour": 1}, "unknown keys"),
    ({"model.mtp_heads": [1, 2]}, {"report": {"metric": "polynomial/exact_match/in_domain",
                                              "compare": [{"treatment": {"model.mtp_heads": 4},
                                                           "control": {"model.mtp_heads": 1}}]}},
     "model.mtp_heads=4 is not a label of a grid axis"),
    ({"model.mtp_heads": [1, 2]}, {"report": {"metric": "accuracy"}}, "must name a task metric as TASK/METRIC"),
])
def test_bad_experiment_is_one_line(tmp_path: Path, capsys, grid: dict, extra: dict, message: str) -> None:
    path = write_experiment(tmp_path, grid, **extra)
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1


# t quantiles from a printed table (two-sided 90%: the 0.95 quantile), not from the code under test
T95 = {1: 6.313752, 2: 2.919986, 3: 2.353363}


@pytest.mark.parametrize("treatment, control, verdict", [
    ([0.50, 0.46, 0.61], [0.40, 0.41, 0.47], "reproduces"),
    ([0.30, 0.36, 0.31], [0.40, 0.41, 0.47], "opposite"),
    ([0.50, 0.36, 0.61], [0.40, 0.41, 0.47], "inconclusive"),
    ([0.50, 0.46], [0.40, 0.41], "inconclusive"),  # the same sign twice, but t(1) is wide
    ([0.50, 0.50], [0.40, 0.41], "reproduces"),
])
def test_paired_interval_and_verdict_by_hand(treatment: list, control: list, verdict: str) -> None:
    diffs = np.subtract(treatment, control)
    half = T95[len(diffs) - 1] * diffs.std(ddof=1) / np.sqrt(len(diffs))
    got = paired_difference(treatment, control)
    assert got.pairs == len(diffs) and got.mean == pytest.approx(diffs.mean())
    assert (got.low, got.high) == pytest.approx((diffs.mean() - half, diffs.mean() + half), rel=1e-5)
    assert got.verdict == verdict


def test_one_pair_is_inconclusive() -> None:
    got = paired_difference([0.9], [0.1])
    assert got.mean == pytest.approx(0.8) and np.isnan(got.low) and got.verdict == "inconclusive"


def test_best_over_training_is_the_best_evaluation() -> None:
    records = [{"step": s, "metrics": {"acc": a, "answer_loss": l}}
               for s, a, l in [(10, 0.1, 3.0), (20, 0.5, 1.0), (30, 0.5, 1.5), (40, 0.4, 0.9)]]
    assert best_over_training(records, "acc") == (20, 0.5)  # a tie goes to the earlier step
    assert best_over_training(records, "answer_loss") == (40, 0.9)  # a loss: the lowest
    assert best_over_training(records, "missing") is None


def test_report_groups_by_every_non_seed_key_and_pairs_by_seed(tmp_path: Path) -> None:
    """A grid over seed x head_type x n: four configurations of three seeds each (head types at
    equal size are not averaged together), and n=2 - n=1 paired per seed within each head type."""
    grid = {"seed": {f"s{i}": {"train.seed": i} for i in range(3)},
            "model.head_type": ["transformer", "linear"], "model.mtp_heads": [1, 2]}
    spec = {"metric": "polynomial/coefficient_accuracy/in_domain",
            "compare": [{"treatment": {"model.mtp_heads": 2}, "control": {"model.mtp_heads": 1}}]}
    exp = load_experiment(write_experiment(tmp_path, grid, report=spec))
    assert exp.seed_axis == "seed" and exp.configuration(exp.points[0]) == "head_type-transformer_mtp_heads-1"
    rng = np.random.default_rng(0)
    value = {}
    rows = []
    for point in exp.points:
        best, final = rng.uniform(0.3, 0.6), rng.uniform(0.1, 0.3)
        value[point.name] = (best, final)
        rows.append({"point": point.name, "configuration": exp.configuration(point), "status": "done",
                     **point.labels, "model.mtp_heads": int(point.labels["model.mtp_heads"]),  # as point_row: the value
                     "mtp_heads": int(point.labels["model.mtp_heads"]), "non_embedding_params": 1000,
                     exp.metric: final, f"best/{exp.metric}": best})
    summary = {r["configuration"]: r for r in summary_rows(exp, rows)}
    assert len(summary) == 4
    for name, row in summary.items():
        finals = np.array([value[f"seed-s{i}_{name}"][1] for i in range(3)])
        assert row["seeds"] == 3 and row[exp.metric] == pytest.approx(finals.mean())
        assert row[f"{exp.metric}/se"] == pytest.approx(finals.std(ddof=1) / np.sqrt(3))
    comparisons = comparison_rows(exp, rows)
    assert [c["context"] for c in comparisons] == ["model.head_type=linear", "model.head_type=transformer"]
    for row in comparisons:
        head = row["context"].split("=")[1]
        diffs = np.array([value[f"seed-s{i}_head_type-{head}_mtp_heads-2"][0] - value[f"seed-s{i}_head_type-{head}_mtp_heads-1"][0]
                          for i in range(3)])
        half = T95[2] * diffs.std(ddof=1) / np.sqrt(3)
        assert row["pairs"] == 3 and row["best_diff"] == pytest.approx(diffs.mean())
        assert (row["best_low"], row["best_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half), rel=1e-5)
    # a point that did not finish drops its seed's pair only
    rows[0]["status"] = "failed"
    assert [c["pairs"] for c in comparison_rows(exp, rows)] == [3, 2]


def test_results_dir_of_another_experiment_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MTP_TRAIN_CMD", "true")
    run_local(load_experiment(write_experiment(tmp_path, {"model.mtp_heads": [1]}, name="first")), out=open(os.devnull, "w"))
    owner = (tmp_path / "results" / "sweep.json").read_text()
    other = load_experiment(write_experiment(tmp_path, {"model.mtp_heads": [1]}, name="second"))
    with pytest.raises(UserError, match="belongs to experiment 'first'"):
        run_local(other)
    with pytest.raises(UserError, match="belongs to experiment 'first'"):
        report(other)
    assert (tmp_path / "results" / "sweep.json").read_text() == owner  # nothing overwritten


def test_failed_points_are_rows_and_the_sweep_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MTP_TRAIN_CMD", "false")
    exp = load_experiment(write_experiment(tmp_path, {"model.mtp_heads": [1, 2]}))
    assert run_local(exp) == 2
    out = capsys.readouterr().out
    assert "[1/2] mtp_heads-1: FAILED (exit 1)" in out and "[2/2] mtp_heads-2: FAILED (exit 1)" in out
    report(exp)
    rows = list(csv.DictReader(open(tmp_path / "results" / "results.csv")))
    assert [(r["point"], r["status"]) for r in rows] == [("mtp_heads-1", "failed"), ("mtp_heads-2", "failed")]


def test_a_point_trained_by_another_sweep_process_is_left_alone(tmp_path: Path, monkeypatch, capsys) -> None:
    import fcntl

    monkeypatch.setenv("MTP_TRAIN_CMD", "false")
    exp = load_experiment(write_experiment(tmp_path, {"model.mtp_heads": [1, 2]}))
    run_dir = Path(exp.points[0].overrides["train.run_dir"])
    run_dir.mkdir(parents=True)
    with open(run_dir / ".sweep.lock", "w") as held:  # another process holds point 1
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run_local(exp) == 1
    out = capsys.readouterr().out
    assert "[1/2] mtp_heads-1: being trained by another sweep process, skipped" in out
    assert "[2/2] mtp_heads-2: FAILED" in out and not (run_dir / "train.log").exists()


def test_sigterm_reaches_the_training_run_and_stops_the_sweep(tmp_path: Path) -> None:
    """A preempted sweep driver passes SIGTERM to mtp-train (which checkpoints) and starts nothing more."""
    stand_in = _executable(tmp_path / "train.py", f"#!{sys.executable}\nimport signal, sys, time\n"
                           f"signal.signal(signal.SIGTERM, lambda *_: (open({str(tmp_path / 'got')!r}, 'w').write('TERM'), sys.exit(0)))\n"
                           f"open({str(tmp_path / 'started')!r}, 'w').close()\ntime.sleep(60)\n")
    exp = write_experiment(tmp_path, {"model.mtp_heads": [1, 2]})
    sweep = subprocess.Popen([sys.executable, "-m", "mtp_jax.sweep.cli", str(exp)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "MTP_TRAIN_CMD": str(stand_in)})
    for _ in range(600):
        if (tmp_path / "started").exists():
            break
        time.sleep(0.1)
    sweep.terminate()
    out, _ = sweep.communicate(timeout=60)
    assert (tmp_path / "got").read_text() == "TERM"
    assert "stopped by SIGTERM" in out and "[2/2]" not in out


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_emitted_slurm_array_runs_exactly_its_point(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    exp = load_experiment(write_experiment(tmp_path, GRID, cluster={"nodes": 2, "overrides": {"mesh.dcn_data": 2}}))
    assert main([str(exp.path), "--emit", "slurm", "--dry-run"]) == 0
    script = tmp_path / "results" / "sweep.sbatch"
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck:
        done = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout
    # Stand-ins: srun runs its command once (options dropped); the training command records its arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    record = tmp_path / "args.json"
    recorder = _executable(tmp_path / "train.py", f"#!{sys.executable}\nimport json, os, sys\n"
                           f"json.dump({{'args': sys.argv[1:], 'id': os.environ['MTP_PROCESS_ID']}}, open({str(record)!r}, 'w'))\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77", "SLURM_PROCID": "0",
           "SLURM_SUBMIT_DIR": str(ROOT), "MTP_TRAIN_CMD": str(recorder)}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    point = exp.points[2]
    assert json.loads(record.read_text()) == {"args": [str(exp.base), *point.args(), "mesh.dcn_data=2"], "id": "0"}
    bad = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "9"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "no point 9" in bad.stderr


def test_emitted_gke_manifests_parse(tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.chdir(ROOT)
    exp = load_experiment(write_experiment(tmp_path, {"model.mtp_heads": [1, 2]}))
    assert main([str(exp.path), "--emit", "gke", "--dry-run"]) == 0
    out = capfd.readouterr()
    manifests = sorted((tmp_path / "results" / "gke").glob("*.yaml"))
    assert [m.name for m in manifests] == ["mtp-tiny-0.yaml", "mtp-tiny-1.yaml"]
    for manifest, point in zip(manifests, exp.points):
        docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
        assert docs and all(isinstance(d, dict) for d in docs)
        assert f"train.run_dir={point.overrides['train.run_dir']}" in manifest.read_text()
        assert f"+ kubectl apply -f {manifest}" in out.out + out.err


@pytest.mark.slow
def test_tiny_grid_resumes_skips_finished_points_and_reports(tmp_path: Path, capsys) -> None:
    """Point 2 is interrupted after its step-2 checkpoint; the sweep trains point 1, resumes point 2,
    and a second sweep skips both. The report's cells are the points' result files."""
    exp = load_experiment(write_experiment(tmp_path, {"model.mtp_heads": [1, 2]}))
    first, second = exp.points
    cmd = [sys.executable, "-m", "mtp_jax.cli", "train", str(exp.base)]
    cut = subprocess.run([*cmd, *second.args(), "train.steps=2"], capture_output=True, text=True)  # a point cut short
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert status(exp, second) == "pending"
    assert run_local(exp) == 0
    log = Path(second.overrides["train.run_dir"], "train.log").read_text()
    assert "resumed from step 2" in log
    assert status(exp, first) == status(exp, second) == "done"
    stamps = [os.stat(Path(p.overrides["train.run_dir"], "eval.json")).st_mtime_ns for p in exp.points]
    capsys.readouterr()
    assert run_local(exp) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert stamps == [os.stat(Path(p.overrides["train.run_dir"], "eval.json")).st_mtime_ns for p in exp.points]

    report(exp)
    rows = list(csv.DictReader(open(tmp_path / "results" / "results.csv")))
    for row, point in zip(rows, exp.points):
        results = latest_results(point.overrides["train.run_dir"])
        assert set(results) == {"heldout", "polynomial"} and results["polynomial"]["step"] == 4
        for task, record in results.items():
            for key, value in record["metrics"].items():
                assert float(row[f"{task}/{key}"]) == value
        assert row["status"] == "done" and int(row["tokens_seen"]) == 4 * 4 * 32
        assert int(row["mtp_heads"]) == int(point.overrides["model.mtp_heads"])
    assert int(rows[0]["non_embedding_params"]) < int(rows[0]["params"])
    plots = {p.name for p in (tmp_path / "results" / "plots").iterdir()}
    assert {"loss_per_head.png", "polynomial_vs_params.svg", "polynomial_vs_m.png", "polynomial_vs_step.png"} <= plots

    # mtp-eval --task on the finished point reproduces training's final task evaluation
    from mtp_jax.evals.tasks import evaluate_run_task

    again = evaluate_run_task(first.overrides["train.run_dir"], "polynomial")
    assert again["metrics"] == latest_results(first.overrides["train.run_dir"])["polynomial"]["metrics"]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").rglob("sweep*.yaml")), ids=lambda p: p.parent.name)
def test_shipped_sweeps_load(path: Path) -> None:
    exp = load_experiment(path)
    assert len({p.name for p in exp.points}) == len(exp.points) >= 6
    if path.parent.name in ("induction", "polynomial"):  # the reproductions: seeds, a verdict metric, comparisons
        assert len({p.labels[exp.seed_axis] for p in exp.points}) >= 3
        assert exp.metric.startswith(f"{path.parent.name}/") and exp.comparisons


def test_paper_scaling_grid_is_the_paper_configs() -> None:
    """Every point of the cluster grid trains what experiments/paper/<size>_n<n>.yaml pins (Table S13)."""
    from mtp_jax.config import load_config

    exp = load_experiment(ROOT / "experiments" / "paper" / "sweep_scaling.yaml")
    assert len(exp.points) == 18
    for point in exp.points:
        size, n = point.labels["size"], point.labels["model.mtp_heads"]
        got, want = exp.config(point), load_config(ROOT / "experiments" / "paper" / f"{size}_n{n}.yaml")
        assert (got.model, got.optim, got.data) == (want.model, want.optim, want.data)
        assert (got.train.steps, got.train.batch_size, got.train.seq_len) == (want.train.steps, want.train.batch_size, want.train.seq_len)
    steps = {p.labels["size"]: (exp.config(p).train.steps, exp.config(p).optim.warmup_steps) for p in exp.points}
    assert steps == {"0.3b": (10850, 1000), "0.6b": (10850, 1000), "1.3b": (10850, 1000), "3b": (10850, 1000),
                     "6.7b": (25000, 2000), "13b": (25000, 1000)}
