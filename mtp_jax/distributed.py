"""Joining a multi-process run and a watchdog that names a lost peer.

How a process learns its place (`initialize`), first match wins:
  1. explicit: distributed.{coordinator_address,num_processes,process_id}, or for any left empty the
     environment variables MTP_COORDINATOR, MTP_NUM_PROCESSES, MTP_PROCESS_ID (set by launch/*.sh);
  2. auto: a Cloud TPU VM/pod/multislice (TPU_WORKER_HOSTNAMES, CLOUD_TPU_TASK_ID, MEGASCALE_*, or TPU
     chips on this host) or a SLURM step with SLURM_NTASKS > 1: JAX detects everything itself (under
     SLURM on GPUs it then gives each task ONE GPU, so one-task-per-node launches use the explicit path);
  3. otherwise one process, and jax.distributed is not started at all.

What JAX 0.10 does by itself when a peer dies (measured with 2 CPU processes, one SIGKILLed):
  - the coordination service (in process 0) notices the missing heartbeats after
    `heartbeat_timeout_seconds` and pushes the error to every client, which LOG(FATAL)s: the survivor
    dies with SIGABRT (exit 134), a multi-line glog message and a C++ stack dump;
  - if process 0 itself dies, the others lose the coordinator connection and abort the same way within
    seconds ("Failed to send RPC to coordination service ... leader task"); nothing can pre-empt that;
  - a gloo (CPU) collective with a killed peer may fail at once with "Connection closed by peer",
    which names neither the process nor the cause;
  - a process that raises waits in JAX's shutdown barrier (300 s by default) while the others hang in
    their next collective until that barrier fails;
  - a Python callback cannot replace the abort: jaxlib's `missed_heartbeat_callback` cannot convert
    the absl::Status it passes (std::bad_cast).
So `_Watchdog` adds: every process beats through the coordinator's key-value store and watches the
next process in a ring. A peer silent for `heartbeat_timeout` seconds gets a verdict and every
survivor prints one line, e.g. `error: lost contact with process 1 (no heartbeat for 60 s: ...)`,
and exits with EXIT_LOST_PEER (3). A process that raises tells the others (they stop with the same
kind of line) instead of sitting in the shutdown barrier. JAX's heartbeat is set later than ours
and stays as the backstop.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax

from mtp_jax.config import ConfigError, DistributedConfig
from mtp_jax.errors import EXIT_LOST_PEER

ENV_COORDINATOR = "MTP_COORDINATOR"
ENV_NUM_PROCESSES = "MTP_NUM_PROCESSES"
ENV_PROCESS_ID = "MTP_PROCESS_ID"

_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "CLOUD_TPU_TASK_ID")
_KV = "mtp_watchdog"


def init_args(dcfg: DistributedConfig, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The jax.distributed.initialize arguments for this process, or None when it runs alone."""
    env = os.environ if env is None else env
    timeouts = {
        "initialization_timeout": dcfg.initialization_timeout,
        "heartbeat_timeout_seconds": _jax_heartbeat_timeout(dcfg.heartbeat_timeout),
    }
    explicit = _explicit_args(dcfg, env)
    if explicit is not None:
        # "deactivate": under SLURM, JAX's detection would otherwise still pick local_device_ids and
        # hide all but one GPU from a one-task-per-node process.
        return {**explicit, "cluster_detection_method": "deactivate", **timeouts}
    if _on_cloud_tpu(env) or _int_env(env, "SLURM_NTASKS", default=1) > 1:
        return timeouts
    return None


def initialize(dcfg: DistributedConfig) -> None:
    """Joins the other processes of the run (no-op alone or when already joined); call before any JAX use."""
    if dcfg.heartbeat_timeout < 1:
        raise ConfigError(f"distributed.heartbeat_timeout={dcfg.heartbeat_timeout} must be >= 1 second")
    args = init_args(dcfg)
    if args is None or jax.distributed.is_initialized():
        return
    # CPU processes run cross-process collectives through gloo; GPU/TPU runs never use the CPU client for them.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**args)
    except ValueError as err:  # JAX's detection found no cluster where the environment announced one
        raise ConfigError(f"this process looks like one of a cluster ({_cluster_clues(os.environ)}) but JAX found "
                          f"no coordinator ({err}); set distributed.coordinator_address, num_processes and "
                          f"process_id, or unset those variables to run alone") from None
    state = _distributed_state()
    if state.num_processes > 1:
        _Watchdog(state.client, state.process_id, state.num_processes, dcfg.heartbeat_timeout).start()


def is_primary() -> bool:
    """True on process 0, the one that writes shared files and logs."""
    return jax.process_index() == 0


def describe() -> dict[str, Any]:
    """Where this process sits in the run, for the run's log."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
    }


def _explicit_args(dcfg: DistributedConfig, env: Mapping[str, str]) -> dict[str, Any] | None:
    values = {
        "coordinator_address": dcfg.coordinator_address or env.get(ENV_COORDINATOR, ""),
        "num_processes": dcfg.num_processes if dcfg.num_processes != -1 else _int_env(env, ENV_NUM_PROCESSES),
        "process_id": dcfg.process_id if dcfg.process_id != -1 else _int_env(env, ENV_PROCESS_ID),
    }
    given = {k: v for k, v in values.items() if v not in ("", None)}
    if not given:
        return None
    missing = [k for k in values if k not in given]
    if missing:
        have = ", ".join(f"{k}={v}" for k, v in given.items())
        need = ", ".join(f"distributed.{k}" for k in missing)
        raise ConfigError(
            f"distributed settings are incomplete: {have} but {need} missing; set all three (or "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}) or none to auto-detect"
        )
    host, _, port = values["coordinator_address"].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"distributed.coordinator_address={values['coordinator_address']!r} must be host:port, e.g. 10.0.0.1:1234"
        )
    if values["num_processes"] < 1:
        raise ConfigError(f"distributed.num_processes={values['num_processes']} must be >= 1")
    if not 0 <= values["process_id"] < values["num_processes"]:
        raise ConfigError(
            f"distributed.process_id={values['process_id']} must be in [0, {values['num_processes'] - 1}] "
            f"for num_processes={values['num_processes']}"
        )
    return values


def _int_env(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def _cluster_clues(env: Mapping[str, str]) -> str:
    """The variables that made this process look like part of a cluster, for the error that names them."""
    clues = [f"{k}={env[k]}" for k in sorted(env) if _announces_tpu(env, k) or k == "SLURM_NTASKS"]
    return ", ".join(clues) or "TPU chips on this host"


def _announces_tpu(env: Mapping[str, str], key: str) -> bool:
    """libtpu, loaded for ahead-of-time compilation on a host without chips, writes a warning sentence into
    CLOUD_TPU_TASK_ID (C-level setenv, inherited by every child process): only a task number announces a task."""
    if key == "CLOUD_TPU_TASK_ID":
        return env[key].strip().isdigit()
    return (key in _TPU_ENV and bool(env[key])) or key.startswith("MEGASCALE_")


def _on_cloud_tpu(env: Mapping[str, str]) -> bool:
    """GKE/multislice TPUs announce themselves in the environment; a plain TPU VM only has its chips."""
    if any(_announces_tpu(env, k) for k in env):
        return True
    try:  # reads /sys, does not start a backend; private, so tolerate its absence
        from jax._src.hardware_utils import num_available_tpu_chips_and_device_id
    except ImportError:
        return False
    return num_available_tpu_chips_and_device_id()[0] > 0


def _jax_heartbeat_timeout(seconds: int) -> int:
    """JAX's own detection fires after ours, so the survivors print the watchdog's named line first."""
    return seconds + max(10, seconds // 2)


def _distributed_state() -> Any:
    # jax exposes no public handle on the distributed client (multihost_utils uses this one too).
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state


class _Watchdog(threading.Thread):
    """Beats through the coordinator's key-value store and watches the next process (a ring, so the
    coordinator's load stays proportional to the process count); a verdict is published so that every
    survivor stops with the same line.

    A process's state key holds a beat counter while it runs, then "done" (a clean exit may leave first)
    or "raised <error>" (an uncaught exception; see `_on_uncaught`).
    """

    def __init__(self, client: Any, me: int, count: int, timeout: int) -> None:
        super().__init__(name="mtp-peer-watchdog", daemon=True)
        self.client, self.me, self.count, self.timeout = client, me, count, timeout
        self.interval = min(5.0, max(0.5, timeout / 5))
        self.state = ""  # "" while running

    def start(self) -> None:
        super().start()
        atexit.register(self._mark, _DONE)  # registered after JAX's shutdown barrier, so it runs before it
        previous = sys.excepthook
        sys.excepthook = lambda *exc: self._on_uncaught(previous, *exc)

    def run(self) -> None:
        peer = (self.me + 1) % self.count
        beat, last, since, failing_since = 0, None, time.monotonic(), None
        while True:
            beat += 1
            now = time.monotonic()
            try:
                self._set(f"beat/{self.me}/state", self.state or str(beat))
                seen = self._states(f"{peer}/").get(peer)
                verdicts = self.client.key_value_dir_get(f"{_KV}/lost/")
                failing_since = None
            except jax.errors.JaxRuntimeError as err:  # the store lives in process 0; tolerate blips
                failing_since = failing_since or now
                if now - failing_since > self.timeout:
                    _stop(f"lost contact with process 0 (the coordinator did not answer for {self.timeout} s: {_first_line(err)})")
            else:
                for key, reason in verdicts:
                    if _index(key) != self.me:
                        _stop(f"lost contact with process {_index(key)} ({reason})")
                if seen != last or _stopped(seen):
                    last, since = seen, now
                elif now - since > self.timeout:
                    reason = f"no heartbeat for {self.timeout} s: it was killed, crashed, hangs or its host is unreachable; see its log"
                    self._try_set(f"lost/{peer}", reason)
                    _stop(f"lost contact with process {peer} ({reason})")
            time.sleep(self.interval)

    def _on_uncaught(self, previous: Any, kind: type, value: BaseException, tb: Any) -> None:
        """This process raised. If a lost peer broke our collective, the watchdog names it within the
        timeout. If the others raised too, they know; name one of them. Otherwise the fault is ours: tell
        the others, then leave instead of waiting in JAX's shutdown barrier for peers stuck in a collective."""
        previous(kind, value, tb)
        error = f"{kind.__name__}: {_first_line(value)}"
        self._mark(f"{_RAISED}{error}")
        deadline = time.monotonic() + self.timeout + 2 * self.interval
        while time.monotonic() < deadline:
            others = self._other_states()
            if others is not None and all(_stopped(v) for v in others.values()):
                raised = [i for i, v in others.items() if v.startswith(_RAISED)]
                if raised:
                    print(f"error: process {raised[0]} stopped too ({others[raised[0]]})", file=sys.stderr)
                self._leave()
            time.sleep(self.interval)
        self._try_set(f"lost/{self.me}", f"it raised {error}; see its log")
        self._leave()

    def _leave(self) -> None:
        if self.me == 0:  # process 0 holds the store: keep it up until the others have read it
            time.sleep(2 * self.interval)
        _exit(1)

    def _other_states(self) -> dict[int, str | None] | None:
        try:
            states = self._states("")
        except jax.errors.JaxRuntimeError:
            return None
        return {i: states.get(i) for i in range(self.count) if i != self.me}

    def _states(self, prefix: str) -> dict[int, str]:
        return {_index(key, -2): value for key, value in self.client.key_value_dir_get(f"{_KV}/beat/{prefix}")}

    def _mark(self, state: str) -> None:
        self.state = state
        self._try_set(f"beat/{self.me}/state", state)

    def _try_set(self, key: str, value: str) -> None:
        try:
            self._set(key, value)
        except jax.errors.JaxRuntimeError:
            pass  # the coordinator is gone; every survivor reaches its own verdict

    def _set(self, key: str, value: str) -> None:
        self.client.key_value_set(f"{_KV}/{key}", value, allow_overwrite=True)


_DONE, _RAISED = "done", "raised "


def _stopped(state: str | None) -> bool:
    return state is not None and (state == _DONE or state.startswith(_RAISED))


def _index(key: str, position: int = -1) -> int:
    return int(key.split("/")[position])


def _stop(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    _exit(EXIT_LOST_PEER)


def _exit(code: int) -> None:
    """os._exit: skips JAX's shutdown barrier, which would wait for processes that cannot arrive."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
