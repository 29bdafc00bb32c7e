"""mtp_jax.distributed: how a process finds its peers, the global device grid, and what happens when a
peer dies. Multi-process tests run real CPU processes on 127.0.0.1 (through launch/local_multiprocess.sh
where the launcher's behaviour is wanted), so they exercise the same code path as a cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import xla_flags

from mtp_jax import distributed, sharding
from mtp_jax.config import ConfigError, DistributedConfig, MeshConfig
from mtp_jax.errors import EXIT_LOST_PEER

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 5  # the peer-loss tests' distributed.heartbeat_timeout

# One worker for every multi-process test: MODE is argv[1] (the CONFIG slot of local_multiprocess.sh).
WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mtp_jax import distributed, sharding
    from mtp_jax.config import DistributedConfig, MeshConfig

    mode = sys.argv[1]
    distributed.initialize(DistributedConfig(heartbeat_timeout=int(os.environ.get("HEARTBEAT", "60"))))
    me = jax.process_index()
    if mode == "mesh":
        grid = sharding.make_device_grid(MeshConfig(data=-1, dcn_data=2))
        mesh = Mesh(grid, ("data", "fsdp", "tensor"))
        local = np.arange(2, dtype=np.float32) + 2 * me  # process p holds [2p, 2p + 1]
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
        total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
        psum = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b.sum(), "data"), mesh=mesh,
                                     in_specs=P("data"), out_specs=P()))(x)
        print("RESULT " + json.dumps({
            "describe": distributed.describe(), "primary": distributed.is_primary(),
            "grid_processes": [d.process_index for d in grid.reshape(-1)],
            "grid_shape": list(grid.shape), "sum": float(total), "psum": float(psum),
        }), flush=True)
        sys.exit(0)
    multihost_utils.sync_global_devices("ready")
    victim = int(os.environ["VICTIM"])
    if me == victim and mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if me == victim and mode == "raise":
        raise RuntimeError("boom")
    multihost_utils.sync_global_devices("never completes")
    print("survivor returned from the barrier", flush=True)
    """
)


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTP_", "SLURM_", "TPU_", "MEGASCALE_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **extra}


# --- how a process finds its peers ---------------------------------------------------------------


def test_alone_without_cluster_environment() -> None:
    assert distributed.init_args(DistributedConfig(), env={}) is None
    assert distributed.init_args(DistributedConfig(), env={"SLURM_NTASKS": "1"}) is None


def test_explicit_from_environment_with_timeouts() -> None:
    env = {"MTP_COORDINATOR": "10.0.0.1:1234", "MTP_NUM_PROCESSES": "4", "MTP_PROCESS_ID": "3", "SLURM_NTASKS": "4"}
    args = distributed.init_args(DistributedConfig(initialization_timeout=120, heartbeat_timeout=60), env=env)
    assert args == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        # explicit settings must not let JAX's SLURM detection restrict each task to one GPU
        "cluster_detection_method": "deactivate",
        "initialization_timeout": 120,
        "heartbeat_timeout_seconds": 90,  # later than the watchdog's 60 s: the named message wins
    }


def test_config_fields_win_and_environment_fills_the_rest() -> None:
    dcfg = DistributedConfig(coordinator_address="head:999", process_id=1)
    env = {"MTP_COORDINATOR": "other:1", "MTP_NUM_PROCESSES": "2", "MTP_PROCESS_ID": "0"}
    args = distributed.init_args(dcfg, env=env)
    assert (args["coordinator_address"], args["num_processes"], args["process_id"]) == ("head:999", 2, 1)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"MTP_COORDINATOR": "10.0.0.1:1234"}, r"incomplete: coordinator_address=10\.0\.0\.1:1234 but "
                                               r"distributed\.num_processes, distributed\.process_id missing"),
        ({"MTP_NUM_PROCESSES": "2", "MTP_PROCESS_ID": "0"}, r"distributed\.coordinator_address missing"),
        ({"MTP_COORDINATOR": "10.0.0.1", "MTP_NUM_PROCESSES": "2", "MTP_PROCESS_ID": "0"}, r"must be host:port"),
        ({"MTP_COORDINATOR": "h:1", "MTP_NUM_PROCESSES": "2", "MTP_PROCESS_ID": "2"}, r"process_id=2 must be in \[0, 1\]"),
        ({"MTP_COORDINATOR": "h:1", "MTP_NUM_PROCESSES": "0", "MTP_PROCESS_ID": "0"}, r"num_processes=0 must be >= 1"),
        ({"MTP_COORDINATOR": "h:1", "MTP_NUM_PROCESSES": "two", "MTP_PROCESS_ID": "0"}, r"MTP_NUM_PROCESSES='two' is not an integer"),
    ],
)
def test_bad_explicit_settings_are_one_line_config_errors(env: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        distributed.init_args(DistributedConfig(), env=env)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "env",
    [{"SLURM_NTASKS": "8"}, {"TPU_WORKER_HOSTNAMES": "h0,h1"}, {"CLOUD_TPU_TASK_ID": "0"}, {"MEGASCALE_NUM_SLICES": "2"}],
)
def test_clusters_jax_detects_get_no_addresses(env: dict) -> None:
    args = distributed.init_args(DistributedConfig(heartbeat_timeout=40), env=env)
    assert args == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 60}


def test_libtpu_warning_in_the_task_id_is_no_cluster() -> None:
    env = {"CLOUD_TPU_TASK_ID": "WARNING: could not determine TPU worker number, please set env var `TPU_WORKER_ID`"}
    assert distributed.init_args(DistributedConfig(), env=env) is None


def test_announced_cluster_without_a_coordinator_is_one_line(tmp_path: Path) -> None:
    """A stray SLURM_NTASKS (a shell inside a multi-task allocation) makes JAX look for a coordinator that
    no one set: one line naming the variable, exit 2, nothing written."""
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mtp_jax.cli", "train", str(ROOT / "experiments" / "quickstart.yaml"),
                           f"train.run_dir={run_dir}"], env=cpu_env(SLURM_NTASKS="2"), capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("warning:")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: this process looks like one of a cluster (SLURM_NTASKS=2)")
    assert "unset those variables to run alone" in lines[0] and not run_dir.exists()


def test_initialize_alone_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("MTP_", "SLURM_", "TPU_", "MEGASCALE_", "CLOUD_TPU")):
            monkeypatch.delenv(key)
    distributed.initialize(DistributedConfig())
    assert not jax.distributed.is_initialized()
    with pytest.raises(ConfigError, match="heartbeat_timeout=0 must be >= 1"):
        distributed.initialize(DistributedConfig(heartbeat_timeout=0))


# --- the device grid ------------------------------------------------------------------------------


def fake_devices(processes: int, per_process: int, slices: int = 1) -> list[types.SimpleNamespace]:
    """Stand-ins with the attributes mesh_utils reads; CPU platform, so layouts are plain reshapes."""
    count = processes * per_process
    return [
        types.SimpleNamespace(id=i, process_index=i // per_process, slice_index=i * slices // count,
                              platform="cpu", device_kind="cpu")
        for i in range(count)
    ]


def grid_for(monkeypatch: pytest.MonkeyPatch, devices: list, **mesh: int) -> np.ndarray:
    monkeypatch.setattr(jax, "devices", lambda: devices)
    return sharding.make_device_grid(MeshConfig(**mesh))


def test_grid_single_process_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert grid_for(monkeypatch, fake_devices(1, 8), data=-1).shape == (8, 1, 1)
    assert grid_for(monkeypatch, fake_devices(1, 8), data=2, fsdp=2, tensor=2).shape == (2, 2, 2)
    assert grid_for(monkeypatch, fake_devices(1, 8), data=1, fsdp=-1, tensor=2).shape == (1, 4, 2)


def test_grid_dcn_axis_spans_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = grid_for(monkeypatch, fake_devices(2, 4), data=-1, fsdp=2, dcn_data=2)
    assert grid.shape == (4, 2, 1)
    processes = np.vectorize(lambda d: d.process_index)(grid)
    assert (processes[:2] == 0).all() and (processes[2:] == 1).all()  # only the data axis crosses DCN


def test_grid_dcn_axis_spans_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = grid_for(monkeypatch, fake_devices(4, 4, slices=2), data=1, fsdp=-1, dcn_fsdp=2)
    assert grid.shape == (1, 16, 1)
    slices = np.vectorize(lambda d: d.slice_index)(grid)[0, :, 0]
    assert (slices[:8] == 0).all() and (slices[8:] == 1).all()


def test_grid_groups_several_processes_per_dcn_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process per GPU: 4 processes on 2 nodes, dcn_data=2 groups processes {0,1} and {2,3}."""
    grid = grid_for(monkeypatch, fake_devices(4, 2), data=-1, fsdp=2, dcn_data=2)
    assert grid.shape == (4, 2, 1)
    processes = np.vectorize(lambda d: d.process_index)(grid)
    assert set(processes[:2].ravel()) == {0, 1} and set(processes[2:].ravel()) == {2, 3}
    assert sorted(d.id for d in grid.ravel()) == list(range(8))


@pytest.mark.parametrize(
    "processes, per_process, mesh, match",
    [
        (1, 8, {"dcn_data": 2}, r"dcn_data=2 x dcn_fsdp=1 = 2 does not divide the 1 processes of this run"),
        (3, 2, {"dcn_data": 2}, r"= 2 does not divide the 3 processes of this run; set .* to a divisor of 3"),
        (1, 8, {"data": 2, "fsdp": 2, "tensor": 4},
         r"mesh data=2 x fsdp=2 x tensor=4 needs 16 devices but 8 are available; set mesh\.data=-1"),
    ],
)
def test_grid_errors_name_sizes_and_devices(
    monkeypatch: pytest.MonkeyPatch, processes: int, per_process: int, mesh: dict, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        grid_for(monkeypatch, fake_devices(processes, per_process), **mesh)


def test_grid_on_eight_real_cpu_devices() -> None:
    """A fresh interpreter: this test process may already have started JAX with one device."""
    code = textwrap.dedent(
        """
        import json
        from mtp_jax.config import ConfigError, MeshConfig
        from mtp_jax.sharding import make_device_grid
        out = {"shapes": [list(make_device_grid(MeshConfig(**m)).shape)
                          for m in ({"data": -1}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": -1, "tensor": 4})]}
        try:
            make_device_grid(MeshConfig(data=2, fsdp=2, tensor=4))
        except ConfigError as err:
            out["error"] = str(err)
        print(json.dumps(out))
        """
    )
    env = cpu_env(XLA_FLAGS=xla_flags(8))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["shapes"] == [[8, 1, 1], [2, 2, 2], [2, 1, 4]]
    assert out["error"] == (
        "mesh data=2 x fsdp=2 x tensor=4 needs 16 devices but 8 are available; "
        "set mesh.data=-1 or sizes whose product is 8"
    )


# --- real processes -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_share_a_global_mesh(worker: Path, tmp_path: Path) -> None:
    """2 processes x 2 CPU devices via the launcher: a 4-device mesh, a cross-process sum and psum."""
    env = cpu_env(MTP_TRAIN_CMD=f"{sys.executable} {worker}", LOG_DIR=str(tmp_path / "logs"))
    cmd = ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "-n", "2", "-d", "2", "mesh"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [
        json.loads(line.split("RESULT ", 1)[1])
        for text in (done.stdout, (tmp_path / "logs" / "process_1.log").read_text())
        for line in text.splitlines()
        if line.startswith("RESULT ")
    ]
    assert [r["describe"]["process_index"] for r in results] == [0, 1]
    assert [r["primary"] for r in results] == [True, False]
    for r in results:
        assert r["describe"] | {"process_index": 0} == {
            "process_index": 0, "process_count": 2, "local_device_count": 2, "device_count": 4,
            "platform": "cpu", "device_kind": "cpu",
        }
        assert r["grid_shape"] == [4, 1, 1] and r["grid_processes"] == [0, 0, 1, 1]
        assert r["sum"] == r["psum"] == 0 + 1 + 2 + 3


def spawn_pair(worker: Path, mode: str, victim: int) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(worker), mode],
            env=cpu_env(
                XLA_FLAGS=xla_flags(2), MTP_COORDINATOR=f"127.0.0.1:{port}",
                MTP_NUM_PROCESSES="2", MTP_PROCESS_ID=str(i), HEARTBEAT=str(HEARTBEAT_S), VICTIM=str(victim),
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]


def outcome(procs: list[subprocess.Popen], victim: int) -> tuple[int, str, float]:
    """The survivor's exit code, its stderr, and how long it outlived the victim."""
    try:
        procs[victim].communicate(timeout=120)
        died = time.monotonic()
        _, err = procs[1 - victim].communicate(timeout=120)
        return procs[1 - victim].returncode, err, time.monotonic() - died
    finally:
        for p in procs:
            p.kill()


@pytest.mark.slow
def test_survivor_names_a_killed_peer(worker: Path) -> None:
    """Process 1 is SIGKILLed while process 0 waits in a barrier: process 0 exits with the watchdog's line."""
    code, err, after = outcome(spawn_pair(worker, "kill", victim=1), victim=1)
    assert code == EXIT_LOST_PEER, err
    assert f"error: lost contact with process 1 (no heartbeat for {HEARTBEAT_S} s" in err
    assert after < 4 * HEARTBEAT_S + 10


@pytest.mark.slow
def test_survivor_names_a_peer_that_raised(worker: Path) -> None:
    """Process 1 raises: process 0 stops too, naming process 1 and its error (either as a lost peer, or,
    when its own barrier already failed, as a process that stopped too)."""
    procs = spawn_pair(worker, "raise", victim=1)
    code, err, after = outcome(procs, victim=1)
    assert procs[1].returncode == 1
    assert code in (1, EXIT_LOST_PEER), err
    assert "process 1" in err and "RuntimeError: boom" in err.splitlines()[-1]
    assert after < 4 * HEARTBEAT_S + 10


@pytest.mark.slow
def test_losing_the_coordinator_ends_the_survivor(worker: Path) -> None:
    """Process 0 (the coordinator) is SIGKILLed: JAX's coordination client aborts the survivor
    (SIGABRT) within seconds, saying the distributed service failed."""
    code, err, after = outcome(spawn_pair(worker, "kill", victim=0), victim=0)
    assert code == -signal.SIGABRT, (code, err[-3000:])
    assert "Terminating process because the JAX distributed service detected fatal errors" in err, err[-3000:]
    assert after < 4 * HEARTBEAT_S + 10
