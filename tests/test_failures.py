"""Failure modes through the real commands: divergence, two trainers, validate-then-write, read-only
evaluation, and every bad input as one `error:` line with exit status 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import ROOT, TINY, checkpoint_steps, finish, mtp_train

from mtp_jax import lock
from mtp_jax.errors import EXIT_DIVERGED, EXIT_USER, DivergenceError, UserError
from mtp_jax.metrics import DivergenceGuard
from mtp_jax.run import build, resolve_vocab
from mtp_jax.step import keep_if_finite

QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
# A run that trains well to step 4 at optim.lr=3e-3 (GOOD), then resumes at optim.lr=1e6 and diverges.
GOOD = ["optim.lr=3e-3", "train.steps=4"]
DIVERGING = ["optim.lr=1e6", "optim.warmup_steps=50", "train.log_every=10", "train.checkpoint_every=2",
             "train.steps=20", "train.tensorboard=false"]


def command(*args: str | bytes, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mtp_jax.cli", *args], capture_output=True, timeout=300, cwd=cwd,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tree_listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def diverged(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("diverged") / "run"
    code, _, err = finish(mtp_train(run_dir, *DIVERGING, *GOOD))
    assert code == 0, err[-3000:]
    code, out, err = finish(mtp_train(run_dir, *DIVERGING))
    return run_dir, subprocess.CompletedProcess([], code, out, err)


@pytest.mark.slow
def test_divergence_stops_and_keeps_every_good_checkpoint(diverged) -> None:
    run_dir, done = diverged
    assert done.returncode == EXIT_DIVERGED, done.stderr[-2000:]
    [line] = error_lines(done.stderr)
    assert "Traceback" not in done.stderr and "diverged at step" in line
    assert "warning: optim.warmup_steps=50 is longer than train.steps=20" in done.stderr  # said, not refused
    bad_step = int(line.split("diverged at step ")[1].split(":")[0])
    steps = checkpoint_steps(run_dir)
    assert steps == [2, 4] and bad_step > 4, (steps, line)
    assert "the newest checkpoint, step 4, is from before it; rerun with optim.lr=0.003" in line
    for step in steps:  # an independent read of every checkpoint: no NaN or inf anywhere
        state = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)), step
    assert not list((run_dir / "checkpoints").glob("*tmp*"))


@pytest.mark.slow
def test_guard_keeps_old_state_on_a_non_finite_step(tiny) -> None:
    """The jitted guard alone: a non-finite loss leaves params and optimizer state bit-identical."""
    cfg = resolve_vocab(tiny(), 64)
    fns = build(cfg, jax.devices()[:1]).fns
    old = fns.init(jax.random.key(0))
    new = jax.tree.map(lambda x: x + 1, {k: old[k] for k in ("params", "opt_state")})
    for loss, skipped in ((jnp.float32(1.0), 0.0), (jnp.float32(np.nan), 1.0), (jnp.float32(np.inf), 1.0)):
        kept, metrics = keep_if_finite(new, old, {"loss": loss, "grad_norm": jnp.float32(2.0)})
        chex.assert_trees_all_equal(kept, new if skipped == 0 else {k: old[k] for k in kept})
        assert float(metrics["skipped"]) == skipped
    poisoned = jax.tree.map(lambda x: x, new)
    first = jax.tree.leaves(poisoned["params"])[0]
    poisoned["params"] = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x is first else x, poisoned["params"])
    kept, metrics = keep_if_finite(poisoned, old, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)})
    chex.assert_trees_all_equal(kept["params"], old["params"])
    assert float(metrics["skipped"]) == 1.0


@pytest.mark.slow
def test_a_second_trainer_is_refused_at_once(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MTP_PAUSE_AT": "startup", "MTP_PAUSE_FILE": str(marker)}
    first = subprocess.Popen([sys.executable, "-m", "mtp_jax.cli", "train", QUICKSTART, *TINY, f"train.run_dir={run_dir}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), first.communicate()[1][-2000:]
        second = command("train", QUICKSTART, *TINY, f"train.run_dir={run_dir}", "train.steps=4")
        assert second.returncode == EXIT_USER
        assert error_lines(second.stderr) == second.stderr.strip().splitlines()
        assert f"pid {first.pid} on host" in second.stderr and "in use by another trainer" in second.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    lock.acquire(run_dir)  # the OS released the dead trainer's lock: its resume is not blocked


@pytest.mark.slow
def test_failed_first_run_does_not_block_the_corrected_retry(tmp_path: Path) -> None:
    run_dir, corpus = tmp_path / "run", tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 40)
    typo = command("train", QUICKSTART, *TINY, f"train.run_dir={run_dir}", "data.source=files",
                   f"data.path={corpus}-typo", "data.tokenizer=bytes")
    assert typo.returncode == EXIT_USER and "does not exist" in typo.stderr
    retry = command("train", QUICKSTART, *TINY, f"train.run_dir={run_dir}", "data.source=files", f"data.path={corpus}",
                    "data.tokenizer=bpe", "data.bpe_vocab_size=300", "train.steps=2", "train.eval_every=1", "train.eval_batches=1",
                    "train.batch_size=2", "train.tensorboard=false")
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["name"] == "bpe-300"
    evaluated = sorted(r.name for r in (run_dir / "evals" / "heldout").iterdir())  # train.eval_every=1
    assert evaluated == ["step_00000001.json", "step_00000002.json"]


def copy_run(diverged, tmp: Path) -> Path:
    """A private copy of the diverged run (good checkpoints 2..), for cases that change it."""
    return Path(shutil.copytree(diverged[0], tmp / "run"))


def train_args(run: Path, *overrides: str) -> list[str]:
    return ["train", QUICKSTART, *TINY, *DIVERGING, f"train.run_dir={run}", *overrides]


def yaml_file(tmp: Path, text: str) -> str:
    (tmp / "base.yaml").write_text("train:\n  steps: 3\n")
    (tmp / "exp.yaml").write_text(text)
    return str(tmp / "exp.yaml")


def file_at(tmp: Path) -> Path:
    (tmp / "f").write_text("x")
    return tmp / "f"


# (setup(tmp, diverged) -> command line, words the one error line must hold: the value and the fix)
BAD_INPUTS = {
    "run_dir is a file": (lambda t, d: train_args(file_at(t)), ["is a file", "choose another train.run_dir"]),
    "run_dir below a file": (lambda t, d: train_args(file_at(t) / "sub"), ["below a file", "choose a path"]),
    "override that YAML misreads as a list": (lambda t, d: train_args(t / "r", "train.loss_weights=[1,"),
                                              ["train.loss_weights='[1,'", "write it as"]),
    "override that YAML misreads as an alias": (
        lambda t, d: train_args(t / "r", "data.source=files", "data.path=*.txt"), ["'*.txt'", "matches no files"]),
    "include is a list": (lambda t, d: ["train", yaml_file(t, "include: [base.yaml]\n")],
                          ["include: ['base.yaml']", "give one file name"]),
    "include is a number": (lambda t, d: ["train", yaml_file(t, "include: 3\n")], ["include: 3", "give one file name"]),
    "negative kv_heads": (lambda t, d: train_args(t / "r", "model.kv_heads=-1"), ["model.kv_heads=-1", ">= 0"]),
    "negative head_dim": (lambda t, d: train_args(t / "r", "model.head_dim=-2"), ["model.head_dim=-2", ">= 0"]),
    "negative d_ff": (lambda t, d: train_args(t / "r", "model.d_ff=-3"), ["model.d_ff=-3", ">= 0"]),
    "negative loss weight": (lambda t, d: train_args(t / "r", "train.loss_weights=[1,-1]"),
                             ["train.loss_weights=[1, -1]", ">= 0", "e.g. [1, 0.5]"]),
    "negative clip_norm": (lambda t, d: train_args(t / "r", "optim.clip_norm=-1"), ["optim.clip_norm=-1.0", "> 0"]),
    "b1 above 1": (lambda t, d: train_args(t / "r", "optim.b1=1.5"), ["optim.b1=1.5", "[0, 1)"]),
    "negative eval batches": (lambda t, d: ["eval", str(d[0]), "--batches", "-3"], ["--batches -3", ">= 0"]),
    "prompt not UTF-8": (lambda t, d: ["generate", str(d[0]), b"--prompt", b"ab\xff\xfe"],
                         ["--prompt is not valid UTF-8", "b'\\xff", "UTF-8"]),
    "new tokens beyond memory": (lambda t, d: ["generate", str(d[0]), "--max-new-tokens", "1000000000"],
                                 ["--max-new-tokens 1000000000", "GiB", "lower --max-new-tokens"]),
    "resume with another model": (lambda t, d: train_args(copy_run(d, t), "model.d_model=64"),
                                  ["does not match this model", "same model config"]),
    "resume with another data source": (lambda t, d: train_args(copy_run(d, t), "data.max_bytes=200000"),
                                        ["data.max_bytes 300000 -> 200000", "train.allow_data_change=true"]),
    "resume without tokenizer/": (
        lambda t, d: train_args(shutil.rmtree(copy_run(d, t) / "tokenizer") or t / "run"), ["no tokenizer/", "backup"]),
    "sequence that cannot fit in memory": (lambda t, d: train_args(t / "r", "train.seq_len=1000000000"),
                                           ["train.seq_len=1000000000", "GiB is free", "lower train.seq_len"]),
    "corrupt tokenizer.json": (
        lambda t, d: ["eval", str((lambda r: (r / "tokenizer" / "tokenizer.json").write_text("{not json") and r)(
            copy_run(d, t)))], ["tokenizer", "is unreadable", "restore tokenizer/"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case: str, diverged, tmp_path: Path) -> None:
    setup, words = BAD_INPUTS[case]
    before = tree_listing(diverged[0])
    done = command(*setup(tmp_path, diverged), cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if not line.startswith(("warning:", "note:", "mesh "))]
    assert done.returncode == EXIT_USER and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert all(w in lines[0] for w in words), (lines[0], words)
    assert tree_listing(diverged[0]) == before  # nothing in the shared run changed


@pytest.mark.slow
def test_refused_resume_leaves_the_run_directory_as_it_was(diverged, tmp_path: Path) -> None:
    run = copy_run(diverged, tmp_path)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    done = command(*train_args(run, "model.d_model=64"))
    assert done.returncode == EXIT_USER
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files


@pytest.mark.slow
def test_eval_is_read_only_and_records_its_step(diverged, tmp_path: Path) -> None:
    """A damaged newer checkpoint: mtp-eval falls back to the newest good step, renames nothing, and writes
    only the step-named result."""
    run = copy_run(diverged, tmp_path)
    shutil.rmtree(run / "evals")  # what the good first run's final evaluation wrote
    (run / "eval.json").unlink()
    newest = max(checkpoint_steps(run))
    shutil.copytree(run / "checkpoints" / str(newest), run / "checkpoints" / "100")
    for f in (run / "checkpoints" / "100" / "state").rglob("*"):
        if f.is_file() and "manifest" not in f.name and f.stat().st_size > 100:
            f.write_bytes(b"\0" * f.stat().st_size)
    before = tree_listing(run)
    done = command("eval", str(run), "--batches", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"falling back to step {newest}" in done.stderr
    after = tree_listing(run)
    assert set(after) - set(before) == {"evals", "evals/heldout", f"evals/heldout/step_{newest:08d}.json"}
    assert set(before) <= set(after) and not (run / "eval.json").exists()
    assert json.loads((run / "evals" / "heldout" / f"step_{newest:08d}.json").read_text())["step"] == newest


def non_finite_step(run: Path) -> Path:
    """Adds step 100: the newest good step with one parameter set to NaN (what a version without the divergence
    guard saved), written with Orbax directly."""
    folder = run / "checkpoints"
    newest = folder / str(max(checkpoint_steps(run)))
    state = ocp.StandardCheckpointer().restore(newest / "state")
    first = jax.tree.leaves(state["params"])[0]
    state["params"] = jax.tree.map(lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x)
                                   if x is first else x, state["params"])
    with ocp.StandardCheckpointer() as writer:
        writer.save(folder / "100" / "state", state)
    shutil.copytree(newest / "data", folder / "100" / "data")
    for name in os.listdir(newest):
        if not (folder / "100" / name).exists():
            shutil.copy(newest / name, folder / "100" / name)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("cmd", [["eval", "--batches", "1"], ["generate", "--max-new-tokens", "4"]])
def test_read_only_commands_refuse_non_finite_weights(cmd: list[str], diverged, tmp_path: Path) -> None:
    run = non_finite_step(copy_run(diverged, tmp_path))
    before = tree_listing(run)
    done = command(cmd[0], str(run), *cmd[1:])
    assert done.returncode == EXIT_DIVERGED and error_lines(done.stderr) == [
        f"error: checkpoint step 100 in {run} holds non-finite weights (the run diverged); move that step's folder "
        f"away to use the one before it"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stdout == "" and tree_listing(run) == before


@pytest.mark.slow
def test_resume_lists_changed_settings_and_recovers_from_the_kept_checkpoint(diverged, tmp_path: Path) -> None:
    """The kept checkpoint predates the divergence (no checkpoint of the lr 1e6 steps exists): the resume warns
    about the changed settings (a changed data source too, as train.allow_data_change=true overrides its refusal)
    and trains on from it."""
    run = copy_run(diverged, tmp_path)
    before = checkpoint_steps(run)
    done = command(*train_args(run, "optim.lr=1e-3", "train.seq_len=16", "data.max_bytes=200000",
                               "train.allow_data_change=true"))
    [warning] = [line for line in done.stderr.splitlines() if "resuming with changed settings" in line]
    assert "optim.lr 1000000.0 -> 0.001" in warning and "train.seq_len 32 -> 16" in warning
    assert "data.max_bytes 300000 -> 200000" in warning and "error:" not in done.stderr.replace("error: training", "")
    assert f"resumed from step {max(before)}" in done.stderr
    assert done.returncode == 0 and checkpoint_steps(run)[-1] == 20 and before == [2, 4]


def test_guard_counts_skipped_steps_up_to_the_checked_one() -> None:
    """train.max_skipped_steps: bad steps are tolerated up to the bound; flags after `upto` wait for later."""
    guard = DivergenceGuard(allowed=2)
    for step, flag in enumerate([0.0, 1.0, 0.0, 0.0, 0.0, 1.0], start=1):
        guard.add(step, np.float32(flag))
    guard.check(5, last_good=4)  # step 6 not counted yet: one skipped
    guard.check(6, last_good=4)  # two skipped: still within the bound
    guard.add(7, np.float32(1.0))
    with pytest.raises(DivergenceError, match=r"diverged at step 2: .*3 step\(s\) skipped.*step 4, is from before"):
        guard.check(7, last_good=4)


def test_override_values_are_parsed_by_the_field_type() -> None:
    from mtp_jax.config import load_config

    cfg = load_config(None, ["data.path=*.txt", "train.run_dir=null", "data.text_field=yes", "train.tensorboard=no",
                             "train.loss_weights=[1, 0.5, 0.25, 0.125]", "optim.lr=3e-4", "data.source='files'"])
    assert (cfg.data.path, cfg.train.run_dir, cfg.data.text_field, cfg.data.source) == ("*.txt", "null", "yes", "files")
    assert cfg.train.tensorboard is False and cfg.train.loss_weights == [1, 0.5, 0.25, 0.125] and cfg.optim.lr == 3e-4


def file_bytes(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder): what "unchanged" compares."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


@pytest.mark.slow
def test_a_refused_start_changes_nothing_and_foreign_files_are_refused(diverged, tmp_path: Path) -> None:
    """Three refused starts: a directory of someone else's files, a new directory, and the leftovers of our own
    failed start (which the start sets aside and must put back): each is byte-for-byte what it was."""
    foreign, ours = tmp_path / "P", tmp_path / "ours"
    (foreign / "tokenizer").mkdir(parents=True)
    (foreign / "config.yaml").write_text("mine\n")
    (foreign / "metrics.jsonl").write_text("x\n")
    ours.mkdir()
    for name in ("config.yaml", "versions.json", "tokenizer", "data_manifest.json", "metrics.jsonl"):
        copy = shutil.copytree if (diverged[0] / name).is_dir() else shutil.copy
        copy(diverged[0] / name, ours / name)
    bad_data = ["data.source=files", f"data.path={tmp_path / 'nonexistent'}"]
    for run, words in ((foreign, ["config.yaml, metrics.jsonl", "did not write", "choose a new or empty"]),
                       (tmp_path / "new" / "run", ["does not exist"]), (ours, ["does not exist"])):
        before = file_bytes(run) if run.exists() else None
        done = command(*train_args(run, *bad_data))
        assert done.returncode == EXIT_USER and "Traceback" not in done.stderr, done.stderr[-3000:]
        [line] = error_lines(done.stderr)
        assert all(w in line for w in words), (line, words)
        if before is None:
            assert not (tmp_path / "new").exists()
        else:
            assert file_bytes(run) == before, run


@pytest.mark.slow
def test_the_advised_rerun_recovers(diverged, tmp_path: Path) -> None:
    """The stop line's advice, followed literally, resumes from the kept checkpoint and finishes with a loss below
    the uniform distribution's."""
    run = copy_run(diverged, tmp_path)
    [line] = error_lines(diverged[1].stderr)
    advised = line.split("rerun with ")[1].split(" ")[0]
    assert advised == "optim.lr=0.003", line
    done = command(*train_args(run, advised))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 4" in done.stderr and checkpoint_steps(run)[-1] == 20
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r["train/loss"] for r in rows if "train/loss" in r and r["step"] > 4][-1]
    assert last < 2 * np.log(384), last  # two heads, weights 1: uniform over the 384-token padded vocabulary


def test_guard_thresholds_by_loss_and_norm() -> None:
    """Each rule fires at its documented threshold and not below it."""
    from mtp_jax import metrics

    def run(losses: list[float], warmup: int = 0) -> str | None:
        guard = DivergenceGuard(allowed=0, uniform_loss=5.0, warmup_steps=warmup, advised_lr=1e-3)
        try:
            for step, loss in enumerate(losses, start=1):
                guard.add(step, np.float32(0.0), np.float32(loss))
                guard.check(step, last_good=None)
        except DivergenceError as err:
            return str(err)
        return None

    calm = [4.0] * metrics.UNIFORM_AFTER
    assert run(calm + [4.99]) is None and "at step 21: loss 5 is at or above" in run(calm + [5.0])
    assert run([6.0] * metrics.UNIFORM_AFTER) is None  # a fresh model sits near uniform: not yet divergence
    assert run([6.0] * 30, warmup=40) is None  # nor during warm-up
    spike = [1.0] * metrics.SPIKE_MIN
    assert run(spike + [4.0]) is None
    assert "loss 4.01 is over 4x its recent mean 1" in run(spike + [4.01])
    assert "rerun with optim.lr=0.001 (or a larger optim.warmup_steps) to start afresh" in run(spike + [4.01])
    guard = DivergenceGuard(allowed=0)
    guard.check_norm(0, 2.0, None)
    guard.check_norm(10, 200.0, 8)
    with pytest.raises(DivergenceError, match=r"at step 12: parameter norm 201 is over 100x its 2 .*step 8, is from"):
        guard.check_norm(12, 201.0, 8)


@pytest.mark.parametrize("override, words", [
    ("data.worker_count=-1", "data.worker_count=-1 must be >= 0"), ("data.shuffle_seed=-1", "must be >= 0"),
    ("model.init_std=nan", "model.init_std=nan must be a finite number"), ("model.rope_theta=0", "must be > 0"),
    ("model.norm_eps=-1", "model.norm_eps=-1.0 must be > 0"), ("optim.lr=inf", "optim.lr=inf must be a finite"),
    ("distributed.heartbeat_timeout=0", "must be >= 1"), ("mesh.fsdp=-2", "mesh.fsdp=-2 must be >= -1"),
])
def test_every_number_is_range_checked_at_load_time(override: str, words: str) -> None:
    from mtp_jax.config import load_config

    with pytest.raises(UserError, match=re.escape(words)):
        load_config(None, [override])


def test_a_sweep_trainer_dies_with_its_driver(tmp_path: Path) -> None:
    """The sweep starts trainers with `_die_with_parent`: a driver killed with -9 takes its trainer along."""
    driver = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys\nfrom mtp_jax.sweep.local import _die_with_parent\n"
        "child = subprocess.Popen(['sleep', '300'], preexec_fn=_die_with_parent)\n"
        "print(child.pid, flush=True)\nchild.wait()\n")], stdout=subprocess.PIPE, text=True)
    trainer = int(driver.stdout.readline())
    driver.kill()
    driver.wait()
    deadline = time.time() + 30
    while Path(f"/proc/{trainer}").exists() and time.time() < deadline:
        if Path(f"/proc/{trainer}/stat").read_text().split()[2] == "Z":  # dead, waiting to be reaped by init
            break
        time.sleep(0.05)
    gone = not Path(f"/proc/{trainer}").exists() or Path(f"/proc/{trainer}/stat").read_text().split()[2] == "Z"
    assert gone, "the trainer outlived its driver"


@pytest.mark.slow
def test_eval_beside_a_live_trainer_reads_the_step_committed_meanwhile(tmp_path: Path) -> None:
    """train.keep_checkpoints=1 and a save every step: mtp-eval lists step 3 and is held before reading it
    (`pause_point("restore", 3)`) while the trainer goes on to step 6, rotating step 3 out. The reader then evaluates
    step 6 instead of giving up (or advising to move a live run's directory away)."""
    run_dir, held_trainer, held_reader = tmp_path / "run", tmp_path / "trainer", tmp_path / "reader"
    trainer = mtp_train(run_dir, "train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=1",
                        "train.tensorboard=false", env_extra={"MTP_PAUSE_AT": "step:3", "MTP_PAUSE_FILE": str(held_trainer)})
    deadline = time.time() + 300
    while not (held_trainer.exists() and (run_dir / "checkpoints" / "3").is_dir()) and time.time() < deadline:
        assert trainer.poll() is None, trainer.communicate()[1][-3000:]
        time.sleep(0.1)
    reader = subprocess.Popen([sys.executable, "-m", "mtp_jax.cli", "eval", str(run_dir), "--batches", "1"],
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "MTP_PAUSE_AT": "restore:3",
                                   "MTP_PAUSE_FILE": str(held_reader)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    while not held_reader.exists() and time.time() < deadline:
        assert reader.poll() is None, reader.communicate()[1][-3000:]
        time.sleep(0.1)
    held_trainer.unlink()
    code, _, err = finish(trainer)
    assert code == 0 and checkpoint_steps(run_dir) == [6], err[-3000:]
    held_reader.unlink()
    code, out, err = finish(reader)
    assert code == 0 and error_lines(err) == [], err[-3000:]
    assert json.loads(out.splitlines()[-1])["step"] == 6
    assert "a trainer committed step 6 meanwhile" in err and "move that directory away" not in err
