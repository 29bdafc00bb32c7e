"""A full disk and missing permissions, for real: the file-size limit (RLIMIT_FSIZE, whose writes fail
with EFBIG since Python ignores SIGXFSZ) fills the "disk" under Orbax's own async writer, /dev/full gives a real
ENOSPC, and a root test runner drops the capabilities that let root ignore file permissions."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from test_failures import QUICKSTART, command, error_lines
from test_train import TINY, checkpoint_steps, finish, mtp_train

from mtp_jax.checkpoint import Checkpointer, quiet_save_failures
from mtp_jax.errors import EXIT_USER, UserError, full_disk_errno, full_disk_error, guarded

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child must not load libraries


def free_gib(folder: Path) -> str:
    """Free space computed independently of errors.full_disk_error (statvfs, not shutil)."""
    st = os.statvfs(folder)
    return f"{st.f_bavail * st.f_frsize / 2**30:.2f} GiB free there"


def test_full_disk_errors_are_recognised_in_any_wrapping(tmp_path: Path) -> None:
    tensorstore = ValueError('OUT_OF_RANGE: Error writing "x" in OCDBT database: Failed to write 620986 bytes to '
                             "file 8: File too large [os_error_code='27']")
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    cases = [(OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC), (tensorstore, errno.EFBIG),
             (wrapped, errno.EDQUOT), (OSError(errno.EACCES, "Permission denied"), None),
             (ValueError("NOT_FOUND [os_error_code='2']"), None), (ValueError("bad value"), None)]
    assert [full_disk_errno(error) for error, _ in cases] == [want for _, want in cases]
    message = str(full_disk_error(errno.ENOSPC, tmp_path / "not" / "yet", "config.yaml"))
    assert f"cannot write config.yaml in {tmp_path / 'not' / 'yet'}: no space left on device" in message
    assert free_gib(tmp_path) in message and "choose another directory" in message


def test_every_command_reports_a_full_disk_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """errors.guarded (every command's wrapper): a real ENOSPC from /dev/full; other OSErrors keep their traceback."""
    monkeypatch.chdir(tmp_path)

    @guarded
    def command_writing(argv: list[str]) -> int:
        Path(argv[0]).write_text("x" * 10)  # the flush at close fails: an OSError without a file name
        return 0

    with pytest.raises(SystemExit) as exited:
        command_writing(["/dev/full"])
    assert exited.value.code == EXIT_USER
    assert capsys.readouterr().err == (f"error: cannot write a file in {tmp_path}: no space left on device "
                                       f"({free_gib(tmp_path)}); free space there, raise the quota or `ulimit -f`, "
                                       f"or choose another directory (train.run_dir); then rerun\n")
    with pytest.raises(FileNotFoundError):
        command_writing([str(tmp_path / "missing" / "file")])


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Lowers this process's file-size limit inside the block only, as a full disk would stop writes. Restored before
    the block ends, never in a fixture's teardown: pytest reports the test's result in between, and its own output
    (a file, under CI) is past the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_full_disk_mid_async_save_keeps_the_committed_checkpoint(tmp_path: Path) -> None:
    """Orbax's real async writer hits EFBIG: one UserError, no unfinished folder, the older step reads back intact."""
    state = {"w": np.arange(64 * 1024, dtype=np.float32).reshape(256, 256), "b": np.ones(7, np.float32)}
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3, save_every=1, async_save=True)
    with quiet_save_failures():
        assert ckpt.save(1, state, {"position": 1})
        ckpt.wait()
        with file_size_limit(64 * 1024), pytest.raises(UserError) as raised:  # the 256 KiB array no longer fits
            ckpt.save(2, {k: v + 1 for k, v in state.items()}, {"position": 2})
            ckpt.wait()
    message = str(raised.value)
    assert f"cannot write checkpoint step 2 in {tmp_path / 'ckpt'}: file too large" in message
    assert "files limited to 65536 bytes" in message and "the newest checkpoint is step 1" in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]  # no *.orbax-checkpoint-tmp left
    ckpt.close()
    step, restored, data = Checkpointer(tmp_path / "ckpt", 3, 1, read_only=True).restore(
        {k: np.zeros_like(v) for k, v in state.items()})
    assert step == 1 and data == {"position": 1}
    assert all(np.array_equal(restored[k], v) for k, v in state.items())


@pytest.mark.slow
def test_full_disk_mid_training_is_one_line_and_resumes(tmp_path: Path) -> None:
    """The trainer pauses at step 3 (step 2 committed), the test lowers its file-size limit below a checkpoint file's
    size and lets it go on: the step-4 async save fails. One line, exit 2, step 2 kept; the rerun resumes."""
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    args = ("train.steps=6", "train.checkpoint_every=2", "train.tensorboard=false")
    # no persistent compilation cache: an entry cut short by the file-size limit would be read by later tests
    proc = mtp_train(run_dir, *args, env_extra={"MTP_PAUSE_AT": "step:3", "MTP_PAUSE_FILE": str(marker),
                                                "JAX_ENABLE_COMPILATION_CACHE": "false"})
    deadline = time.time() + 300
    while not (marker.exists() and (run_dir / "checkpoints" / "2").is_dir()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    step2 = {p: p.read_bytes() for p in (run_dir / "checkpoints" / "2").rglob("*") if p.is_file()}
    # below the step-4 save's largest files (those of step 2 show their sizes; how TensorStore splits the arrays into
    # files varies from run to run), above metrics.jsonl
    limit = 16 * 1024
    assert max(map(len, step2.values())) > 4 * limit and (run_dir / "metrics.jsonl").stat().st_size < limit // 4
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    marker.unlink()  # pause_point goes on
    code, _, err = finish(proc)
    lines = [line for line in err.splitlines() if not line.startswith(("mesh ", "warning:"))]
    assert code == EXIT_USER and len(lines) == 1, err[-3000:]
    assert f"cannot write checkpoint step 4 in {run_dir / 'checkpoints'}: file too large" in lines[0]
    assert f"files limited to {limit} bytes" in lines[0] and "newest checkpoint is step 2" in lines[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]
    assert {p: p.read_bytes() for p in (run_dir / "checkpoints" / "2").rglob("*") if p.is_file()} == step2
    code, _, err = finish(mtp_train(run_dir, *args))
    assert code == 0, err[-3000:]
    assert "resumed from step 2" in err and checkpoint_steps(run_dir)[-1] == 6


def without_root_powers() -> None:
    """preexec_fn: drops the capabilities that let root read and write regardless of permissions (root cannot get
    them back after exec), so the child meets the file modes as any user would."""
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if PRCTL(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def as_a_user(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real CLI; under root, without the powers that bypass file permissions."""
    try:
        done = subprocess.run([sys.executable, "-m", "mtp_jax.cli", *args], capture_output=True, timeout=300, cwd=cwd,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"},
                              preexec_fn=without_root_powers if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as err:  # no CAP_SETPCAP (a restricted container): root cannot be tested
        pytest.skip(f"cannot drop root's file capabilities here: {err}")
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def corpus(tmp: Path) -> Path:
    folder = tmp / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    return folder


def read_only(folder: Path) -> Path:
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def unreadable(folder: Path) -> Path:
    (folder / "doc3.txt").chmod(0o000)
    return folder


TRAIN = ["train", QUICKSTART, *TINY, "train.steps=2"]
# (setup(tmp) -> command line, words the one error line must hold: the value and the fix)
DENIED = {
    "run_dir not writable": (lambda t: [*TRAIN, f"train.run_dir={read_only(t / 'run')}"],
                             ["is not writable", "fix its permissions"]),
    "run_dir in a read-only folder": (lambda t: [*TRAIN, f"train.run_dir={read_only(t / 'ro') / 'run'}"],
                                      ["cannot create train.run_dir=", "Permission denied", "choose a writable path"]),
    "data file unreadable": (lambda t: [*TRAIN, f"train.run_dir={t / 'run'}", "data.source=files",
                                        f"data.path={unreadable(corpus(t))}"],
                             ["cannot read", "doc3.txt (permission denied)", "fix its permissions or data.path"]),
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork")  # preexec_fn forks; it only calls prctl, which takes no lock
@pytest.mark.parametrize("case", list(DENIED))
def test_permission_denied_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    setup, words = DENIED[case]
    done = as_a_user(*setup(tmp_path), cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if not line.startswith(("warning:", "note:", "mesh "))]
    assert done.returncode == EXIT_USER and lines == error_lines(done.stderr) and len(lines) == 1, done.stderr[-3000:]
    assert all(w in lines[0] for w in words), (lines[0], words)


@pytest.mark.slow
def test_damaged_prepared_shard_is_one_line_exit_2(tmp_path: Path) -> None:
    """A truncated shard of mtp-prepare's store (ArrayRecord's successor): TensorStore cannot read it."""
    from test_prepare import write_corpus, yaml_for

    from mtp_jax.data import prepare

    write_corpus(tmp_path / "corpus", count=200)
    prepare.prepare(str(yaml_for(tmp_path, tmp_path / "corpus", tokenizer="bytes")), str(tmp_path / "out"),
                    progress=False)
    shard = tmp_path / "out" / "parts" / "00000-of-00001" / "train" / "tokens" / "c" / "0"
    shard.write_bytes(shard.read_bytes()[:1000])
    done = command(*TRAIN, f"train.run_dir={tmp_path / 'run'}", "data.source=prepared",
                     f"data.path={tmp_path / 'out'}", "data.tokenizer=bytes", cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if not line.startswith(("warning:", "note:", "mesh "))]
    assert done.returncode == EXIT_USER and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot read {shard} in data.path={tmp_path / 'out'}: it is damaged (")
    assert "prepare the data again (mtp-prepare)" in lines[0]


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path: Path) -> None:
    """write_atomic past the file-size limit: EFBIG, the old bytes intact, no temporary left; a truncated or
    foreign config.yaml is then an error, never defaults."""
    from mtp_jax.atomic import write_atomic
    from mtp_jax.run import read_config

    target = tmp_path / "config.yaml"
    target.write_text("model: {}\ntrain: {}\n")
    with file_size_limit(1000), pytest.raises(OSError) as caught:
        write_atomic(target, "x" * 5000)
    assert caught.value.errno == errno.EFBIG
    assert target.read_text() == "model: {}\ntrain: {}\n" and os.listdir(tmp_path) == ["config.yaml"]
    assert read_config(tmp_path).model.d_model > 0
    for damaged in ("model:\n  d_model: [1,\n", "mine\n", ""):
        target.write_text(damaged)
        with pytest.raises(UserError, match=r"config.yaml is damaged.*restore it from a backup"):
            read_config(tmp_path)


def test_metrics_lines_are_whole_on_a_full_disk(tmp_path: Path) -> None:
    """Appends past the file-size limit: EFBIG naming metrics.jsonl, and the file holds whole JSON lines only (half a
    line would glue onto the resumed run's first one)."""
    from mtp_jax.errors import write_error
    from mtp_jax.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    with file_size_limit(1000), pytest.raises(OSError) as caught:
        for step in range(1, 100):
            writer.write(step, {"loss": 1.0 / step, "grad_norm": 2.0})
    writer.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert caught.value.errno == errno.EFBIG and caught.value.filename == str(tmp_path / "metrics.jsonl")
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()] == list(range(1, step))
    assert str(write_error(caught.value, Path.cwd())).startswith(f"cannot write metrics.jsonl in {tmp_path}: file too")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run with checkpoints 2 and 4, its evaluation and metrics: what the permission cases resume."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    code, _, err = finish(mtp_train(run_dir, "train.steps=4", "train.checkpoint_every=2", "train.tensorboard=false"))
    assert code == 0, err[-3000:]
    return run_dir


def files_of(run_dir: Path) -> dict[str, bytes | None]:
    """Every path with its bytes (None for a folder), but the lock file, which holds the last holder's pid."""
    return {str(p.relative_to(run_dir)): None if p.is_dir() else p.read_bytes()
            for p in run_dir.rglob("*") if p.name != ".lock"}


# what is made read-only -> the names the one error line must hold
UNWRITABLE = {"checkpoints": "checkpoints/", "metrics.jsonl": "metrics.jsonl", "evals/heldout": "evals/heldout/"}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork")
@pytest.mark.parametrize("target", list(UNWRITABLE))
def test_resume_into_an_unwritable_part_is_refused_unchanged(target: str, trained: Path, tmp_path: Path) -> None:
    """Refused before anything changes (no 5-minute wait for Orbax's writer, no evaluation of a step never saved)."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    (run / target).chmod(0o555 if (run / target).is_dir() else 0o444)
    before = files_of(run)
    done = as_a_user(*TRAIN, f"train.run_dir={run}", "train.steps=6", "train.checkpoint_every=2",
                     "train.tensorboard=false", cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if not line.startswith(("warning:", "note:", "mesh "))]
    assert done.returncode == EXIT_USER and len(lines) == 1, done.stderr[-3000:]
    assert lines[0] == (f"error: cannot write {UNWRITABLE[target]} in {run}: permission denied (nothing there was "
                        f"changed); fix the permissions there (or choose another directory, train.run_dir for a run); "
                        f"then rerun")
    assert files_of(run) == before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork")
def test_checkpoints_made_unwritable_mid_run_stop_at_the_next_save(tmp_path: Path) -> None:
    """checkpoints/ loses its write permission while the trainer pauses at step 3: the step-4 save is refused at once
    in one line; step 2 stays the newest and no evaluation names a later step."""
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    proc = mtp_train(run_dir, "train.steps=6", "train.checkpoint_every=2", "train.tensorboard=false",
                     env_extra={"MTP_PAUSE_AT": "step:3", "MTP_PAUSE_FILE": str(marker)},
                     preexec_fn=without_root_powers if os.geteuid() == 0 else None)
    deadline = time.time() + 300
    while not (marker.exists() and (run_dir / "checkpoints" / "2").is_dir()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    (run_dir / "checkpoints").chmod(0o555)
    marker.unlink()
    try:
        code, _, err = finish(proc, timeout=120)  # no waiting on Orbax's writer
    finally:
        proc.kill()
    lines = [line for line in err.splitlines() if not line.startswith(("mesh ", "warning:"))]
    assert code == EXIT_USER and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: cannot write checkpoint step 4 in {run_dir / 'checkpoints'}: permission "
                               f"denied; the newest checkpoint is step 2; fix the permissions there")
    assert checkpoint_steps(run_dir) == [2] and not (run_dir / "eval.json").exists() and not (run_dir / "evals").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork")
def test_mtp_eval_into_an_unwritable_evals_folder_is_one_line(trained: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    (run / "evals" / "heldout").chmod(0o555)
    before = files_of(run)
    done = as_a_user("eval", str(run), "--batches", "1", cwd=tmp_path)
    assert done.returncode == EXIT_USER and error_lines(done.stderr) == [
        f"error: cannot use step_00000004.json in {run / 'evals' / 'heldout'}: permission denied; fix the permissions "
        f"there (or choose another directory, train.run_dir for a run); then rerun"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and files_of(run) == before


@pytest.mark.slow
def test_full_disk_at_the_last_save_evaluates_nothing(tmp_path: Path) -> None:
    """The final save (step 4) fails in Orbax's writer: one line, and neither eval.json nor an evaluation record
    names step 4, which was never saved."""
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    proc = mtp_train(run_dir, "train.steps=4", "train.checkpoint_every=2", "train.tensorboard=false",
                     env_extra={"MTP_PAUSE_AT": "save_begin:4", "MTP_PAUSE_FILE": str(marker),
                                "JAX_ENABLE_COMPILATION_CACHE": "false"})
    deadline = time.time() + 300
    while not (marker.exists() and (run_dir / "checkpoints" / "2").is_dir()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))
    marker.unlink()
    code, _, err = finish(proc)
    lines = [line for line in err.splitlines() if not line.startswith(("mesh ", "warning:"))]
    assert code == EXIT_USER and len(lines) == 1, err[-3000:]
    assert f"cannot write checkpoint step 4 in {run_dir / 'checkpoints'}: file too large" in lines[0]
    assert checkpoint_steps(run_dir) == [2] and not (run_dir / "eval.json").exists() and not (run_dir / "evals").exists()


def limited_files(limit: int) -> Callable[[], None]:
    """preexec_fn: the child's file-size limit, as a full disk stops writes."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork")
def test_full_disk_building_the_data_cache_is_one_line(tmp_path: Path) -> None:
    """The token cache of an on-the-fly source outgrows the file-size limit: one line naming data_cache/, and the new
    run directory is gone again (no half-built cache)."""
    run_dir = tmp_path / "run"
    proc = mtp_train(run_dir, "train.steps=2", env_extra={"JAX_ENABLE_COMPILATION_CACHE": "false"},
                     preexec_fn=limited_files(32 * 1024))
    code, _, err = finish(proc)
    assert code == EXIT_USER and error_lines(err) == err.strip().splitlines()[-1:], err[-3000:]
    assert error_lines(err)[0].startswith(f"error: cannot write the data cache in {run_dir / 'data_cache'}: file too "
                                          f"large for the file-size limit")
    assert "Traceback" not in err and not run_dir.exists()


def test_full_disk_in_mtp_prepare_is_one_line_and_resumes(tmp_path: Path, capsys) -> None:
    """mtp-prepare past the file-size limit: one line naming OUT_DIR and --resume, no manifest (nothing passed off as
    complete); --resume then finishes the same dataset as an uninterrupted preparation."""
    from test_prepare import write_corpus, yaml_for

    from mtp_jax.data import prepare, store

    write_corpus(tmp_path / "corpus", count=300)
    yaml, out = str(yaml_for(tmp_path, tmp_path / "corpus", tokenizer="bytes")), tmp_path / "out"
    with file_size_limit(16 * 1024), pytest.raises(SystemExit) as exited:
        prepare.main([yaml, str(out)])
    err = capsys.readouterr().err
    assert exited.value.code == EXIT_USER and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write the prepared data in {out}: file too large for the file-size limit")
    assert err.endswith("or choose another OUT_DIR; then rerun with --resume, which keeps the finished parts\n")
    assert not (out / store.MANIFEST_FILE).exists() and not list(out.rglob(store.PART_FILE))
    assert prepare.main([yaml, str(out), "--resume"]) == 0
    prepare.prepare(yaml, str(tmp_path / "reference"), progress=False)
    assert store.read_manifest(out) == store.read_manifest(tmp_path / "reference")


def test_prepare_resumes_a_start_cut_between_tokenizer_and_plan(tmp_path: Path, capsys) -> None:
    """What a kill between saving the tokenizer and writing the plan leaves (tokenizer/ alone): --resume starts over
    and finishes; a folder holding anything else is still refused, naming what it holds."""
    from test_prepare import write_corpus, yaml_for

    from mtp_jax.data import build, prepare, store

    write_corpus(tmp_path / "corpus")
    yaml, out = str(yaml_for(tmp_path, tmp_path / "corpus", tokenizer="bytes")), tmp_path / "out"
    assert prepare.main([yaml, str(out), "--tokenizer-only"]) == 0
    (out / build.PLAN_FILE).unlink()
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer"]
    assert prepare.main([yaml, str(out), "--resume"]) == 0
    prepare.prepare(yaml, str(tmp_path / "reference"), progress=False)
    assert store.read_manifest(out) == store.read_manifest(tmp_path / "reference")
    (tmp_path / "other" / "tokenizer").mkdir(parents=True)
    (tmp_path / "other" / "notes.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        prepare.main([yaml, str(tmp_path / "other"), "--resume"])
    assert capsys.readouterr().err == (f"error: OUT_DIR '{tmp_path / 'other'}' holds notes.txt, tokenizer but no "
                                       f"prepare.json, so no preparation was started there to resume; choose an "
                                       f"empty folder\n")
