"""End-to-end training job: the CLI, the run directory, kill -9 resume, SIGTERM, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.d_model=32", "model.n_layers=3", "model.attn_heads=2", "model.mtp_heads=2",
    "data.tokenizer=bytes", "data.max_bytes=300000", "data.val_fraction=0.3", "train.batch_size=4", "train.seq_len=32",
    "train.log_every=1", "train.eval_batches=2", "train.tensorboard=true", "train.progress=false",
    "optim.warmup_steps=2",
]


def mtp_train(run_dir: Path, *overrides: str, env_extra: dict | None = None, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mtp_jax.cli", "train", str(ROOT / "experiments" / "quickstart.yaml"),
           *TINY, f"train.run_dir={run_dir}", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss; a step logged twice (before a kill and after resuming) keeps the later value."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 12-step run, shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("reference")
    code, out, err = finish(mtp_train(run_dir, "train.steps=12", "train.checkpoint_every=4"))
    assert code == 0, err[-3000:]
    return run_dir


@pytest.mark.slow
def test_run_directory_and_final_table(reference: Path) -> None:
    for name in ("config.yaml", "versions.json", "tokenizer", "data_manifest.json", "metrics.jsonl", "eval.json"):
        assert (reference / name).exists(), name
    assert list((reference / "tensorboard").glob("events.*"))
    assert checkpoint_steps(reference)[-1] == 12
    record = json.loads((reference / "eval.json").read_text())
    assert record["task"] == "heldout" and record["step"] == 12 and record["schema"] == 1
    result = record["details"]
    assert [h["head"] for h in result["heads"]] == [1, 2] and result["unigram_baseline"] > 0
    assert record["metrics"]["loss/head_2"] == result["heads"][1]["loss"]
    assert json.loads((reference / "evals" / "heldout" / "step_00000012.json").read_text()) == record
    assert len(losses(reference)) == 12


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_identical(reference: Path, tmp_path: Path) -> None:
    """The run pauses right after saving step 4 (hook `pause_point("step", 4)`), is killed with -9
    there, and resumes: no race between the kill and the end of the run."""
    run_dir, marker = tmp_path / "killed", tmp_path / "paused"
    args = ("train.steps=12", "train.checkpoint_every=4", "train.async_checkpoint=false")
    proc = mtp_train(run_dir, *args, env_extra={"MTP_PAUSE_AT": "step:4", "MTP_PAUSE_FILE": str(marker)})
    deadline = time.time() + 240
    while time.time() < deadline and not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    assert marker.read_text().strip() == "step:4"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert checkpoint_steps(run_dir) == [4]
    code, _, err = finish(mtp_train(run_dir, *args))
    assert code == 0, err[-3000:]
    assert "resumed from step 4" in err
    want, got = losses(reference), losses(run_dir)
    assert all(got[s] == want[s] for s in range(5, 13)), {s: (got.get(s), want[s]) for s in range(5, 13)}


@pytest.mark.slow
def test_sigterm_saves_its_step_with_its_metrics_line_and_exits_zero(tmp_path: Path) -> None:
    """SIGTERM while the trainer pauses after step 3 (`pause_point("step", 3)`): it stops at its next check (step 3
    or 4, neither a log step nor a save step), saves that step and writes its metrics line."""
    run_dir, marker = tmp_path / "preempted", tmp_path / "paused"
    proc = mtp_train(run_dir, "train.steps=100000", "train.checkpoint_every=100000", "train.log_every=5",
                     env_extra={"MTP_PAUSE_AT": "step:3", "MTP_PAUSE_FILE": str(marker)})
    deadline = time.time() + 240
    while time.time() < deadline and not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    marker.unlink()  # pause_point goes on; the flag is read at the next step
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("SIGTERM: saving step ")]
    step = int(line.split()[3])
    assert step in (3, 4) and checkpoint_steps(run_dir) == [step] and sorted(losses(run_dir)) == [step]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.d_modle=64"], "unknown config key 'model.d_modle' (did you mean 'd_model'?)"),
        (["train.steps=ten"], "train.steps='ten' is not an integer"),
        (["train.seq_len=3"], "train.seq_len=3 is too short for model.mtp_heads=2"),
        (["data.source=files", "data.path=/no/such/folder"], "/no/such/folder"),
        (["data.source=jsonl", "data.path="], "data.path is empty"),
        (["mesh.data=3"], "mesh data=3 x fsdp=1 x tensor=1 needs 3 devices but 1 are available"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    code, out, err = finish(mtp_train(tmp_path / "bad", "train.steps=2", *overrides), timeout=120)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "Deprecat" not in line]
    assert lines[-1].startswith("error: ") and message in lines[-1], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.slow
def test_non_utf8_input_is_counted(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_bytes(("def f(x):\n    return x + %d\n" % i).encode() * 20)
    (corpus / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1") * 200)
    code, _, err = finish(mtp_train(tmp_path / "run", "train.steps=2", "data.source=files", f"data.path={corpus}",
                                    "data.val_fraction=0.2"))
    assert code == 0, err[-3000:]
    assert "1 of 41 documents were not valid UTF-8" in err


@pytest.mark.slow
def test_mtp_eval_reproduces_the_final_evaluation(reference: Path) -> None:
    """mtp-eval restores the newest checkpoint on one device and recomputes the training run's table."""
    final = json.loads((reference / "eval.json").read_text())["details"]
    done = subprocess.run([sys.executable, "-m", "mtp_jax.cli", "eval", str(reference)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert [h["loss"] for h in again["heads"]] == pytest.approx([h["loss"] for h in final["heads"]], rel=1e-6)
    assert "unigram baseline" in done.stdout
    assert json.loads((reference / "eval.json").read_text())["details"] == final  # mtp-eval leaves it alone
