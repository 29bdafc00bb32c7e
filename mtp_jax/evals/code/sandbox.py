"""Runs untrusted Python programs (model-written code plus its tests), each in its own cage.

Every program gets its own process, its own empty working directory, a wall-clock timeout and
a CPU-time limit, an address-space limit, a process/thread limit, a file-size limit, a clean
environment (PATH, LANG, HOME, TMPDIR, PYTHONHASHSEED only), stdin from /dev/null, and its own
session, killed as a whole when it ends or times out.

Memory: where this process may create cgroup v2 cgroups with the memory and pids controllers (the
host's root cgroup as root, or a delegated subtree, e.g. `systemd-run --scope -p Delegate=yes`),
each program runs in its own cgroup: all its processes together get `Limits.memory_bytes` of RAM
(memory.max, no swap; going over is an "out of memory" error) and `Limits.processes` tasks
(pids.max). Elsewhere (cgroup v1 hosts, undelegated cgroups) only the per-process limits hold:
each process `memory_bytes` of address space, and at most `processes` processes and threads (the
slot's uid), so a program that forks can hold up to processes x memory_bytes in all (64 GiB with
the defaults). `describe()["memory_bound"]` records which bound held ("program" or "process").

On top of that, by isolation level:

- "namespaces" (running as root, `unshare` works; CI and this machine): fresh pid, network,
  mount, IPC and UTS namespaces; a private tmpfs /tmp (the working directory is /tmp/work) and
  read-only empty tmpfs over /var/tmp, /dev/shm, /run/lock; an unprivileged uid per worker slot
  (so one program's fork bomb cannot starve another of processes; each sandbox takes a random
  block of uids, so concurrent evaluations share none) with no_new_privs. When the
  namespace's first process exits, the kernel kills everything left in it.
- "uid" (root without namespaces): the unprivileged uid per slot, and after each program every
  process of that uid is killed; the program shares the host's network and can write only
  world-writable places (/tmp, /var/tmp, /dev/shm).
- "none" (not root): limits, session and clean environment only. The program runs as you: it
  can read and write your files, signal your processes and open network connections.

A pass is a random nonce printed after the tests' last statement, never an exit status, so a
program that exits early (`os._exit(0)`, `sys.exit(0)`) fails. Not protected at any level:
reading world-readable files (including the benchmark's own test data, so a model could in
principle look its answers up), burning its CPU and wall-clock budget, and defeating its own
tests from inside the same interpreter (redefining `check`, patching `__eq__`, reading its own
source to print the nonce): the sandbox protects the machine from the program, not the score
from a program written to cheat. It is no defence against kernel exploits either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal, Sequence

BOOT = Path(__file__).with_name("_boot.py")
UNSHARE = ["--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc", "--uts", "--propagation", "private"]
Level = Literal["namespaces", "uid", "none"]
Status = Literal["pass", "fail", "timeout", "error"]
UID_FIRST = 1_500_000_000  # sandbox uids: 1.5e9 .. 2.04e9, far above any real account
KEEP_BYTES = 4096  # of each stream, kept in the outcome (the nonce is searched in all of stdout)


class SandboxError(RuntimeError):
    """The sandbox itself could not start a program (not the program's fault)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 30.0  # wall clock, from start to exit (generous: a loaded machine stretches it)
    cpu_s: int = 10
    memory_bytes: int = 2 << 30  # the whole program's RAM with a cgroup, else each process's address space
    processes: int = 32  # processes and threads of the slot's uid (uid levels only)
    file_bytes: int = 16 << 20  # any one file, stdout and stderr included
    open_files: int = 64
    tmpfs_bytes: int = 32 << 20  # the private /tmp ("namespaces" level)


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: Status
    error_type: str  # exception type, "exit 0" (ended before its tests finished), "signal SIGSEGV", "timeout"; "" on pass
    stdout: str
    stderr: str


def classify(stdout: str, stderr: str, returncode: int, timed_out: bool, nonce: str,
             out_of_memory: bool = False) -> Outcome:
    """pass / fail / timeout / error from what a finished program left; `out_of_memory`: its cgroup killed one of its
    processes for going over the program's memory (an error, even after a pass: the bound is part of the task)."""
    if returncode > 128:  # the namespace's first process reports a signal N as 128 + N (_boot.py)
        returncode = 128 - returncode
    if out_of_memory:
        return Outcome("error", "out of memory", stdout, stderr)
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome("timeout", "timeout", stdout, stderr)
    if nonce in stdout.splitlines():
        return Outcome("pass", "", stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    match = re.match(r"^([A-Za-z_][\w.]*)(:|$)", lines[-1]) if lines else None
    if match:
        error_type = match.group(1)
        return Outcome("fail" if error_type == "AssertionError" else "error", error_type, stdout, stderr)
    if returncode < 0:
        return Outcome("error", f"signal {signal.Signals(-returncode).name}", stdout, stderr)
    return Outcome("fail", f"exit {returncode}", stdout, stderr)


def with_nonce(program: str, nonce: str) -> str:
    """The program followed by the nonce print: reached only if every test before it ran."""
    return f"{program}\n\n__import__('os').write(1, b'\\n{nonce}\\n')\n"


class Sandbox:
    """Runs programs at the strongest isolation level the machine offers (`level`).

    `level=None` probes: namespaces, then uid (both need root), then none. `python` is the
    interpreter programs run with; by default the first of this one, the base one and python3
    on PATH that the unprivileged uid can start.
    """

    def __init__(self, limits: Limits = Limits(), workers: int | None = None, level: Level | None = None,
                 python: str | None = None, uid_base: int | None = None):
        self.limits = limits
        self.workers = workers or len(os.sched_getaffinity(0))
        # A random block of 1024 uids per sandbox: concurrent evaluations never share a uid (its
        # process limit, or the "uid" level's kill-everything-of-this-uid cleanup).
        self.uid_base = uid_base or UID_FIRST + 1024 * secrets.randbelow(1 << 19)
        if self.workers > 1024:
            raise ValueError(f"at most 1024 sandbox workers, got {self.workers}")
        self.root = Path(tempfile.mkdtemp(prefix="mtp-sandbox-"))
        os.chmod(self.root, 0o711)
        levels: list[Level] = [level] if level else (["namespaces", "uid"] if os.geteuid() == 0 else ["none"])
        pythons = [python] if python else list(dict.fromkeys(
            p for p in (sys.executable, getattr(sys, "_base_executable", None), shutil.which("python3", path="/usr/bin:/bin"))
            if p))
        self.cgroups = cgroup_parent()  # None: the memory bound holds per process only
        self.level, self.python, self.python_version = self._probe(levels, pythons)

    def _probe(self, levels: list[Level], pythons: list[str]) -> tuple[Level, str, str]:
        failures = []
        for level in levels:
            if level == "namespaces" and not shutil.which("unshare"):
                failures.append("namespaces: no unshare binary (util-linux)")
                continue
            for python in pythons:
                self.level, self.python = level, python
                try:
                    out = self.run("import sys; print('.'.join(map(str, sys.version_info[:3])))")
                except SandboxError as err:
                    failures.append(f"{level} with {python}: {err}")
                    continue
                if out.status == "pass":
                    return level, python, out.stdout.split()[0]
                failures.append(f"{level} with {python}: {out.status} {out.error_type} {out.stderr[-300:]}")
        raise SandboxError("no sandbox level works here: " + "; ".join(failures))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, program: str, slot: int = 0) -> Outcome:
        """Runs one program to its outcome (a pass needs the nonce this appends)."""
        nonce = f"MTP-SANDBOX-PASS-{secrets.token_hex(16)}"
        box = Path(tempfile.mkdtemp(dir=self.root))
        try:
            return self._run_in(box, with_nonce(program, nonce), nonce, slot)
        finally:
            shutil.rmtree(box, ignore_errors=True)

    def _run_in(self, box: Path, source: str, nonce: str, slot: int) -> Outcome:
        root = os.geteuid() == 0
        uid = self.uid_base + slot
        program, work = box / "program.py", box / "work"
        program.write_text(source)
        if self.level != "namespaces":
            os.chmod(box, 0o711)
            os.chmod(program, 0o444)
            work.mkdir(mode=0o700)
            if root:
                os.chown(work, uid, uid)
        lim = self.limits
        spec = dict(program=str(program), work=str(work), python=self.python, uid=uid, namespaces=self.level == "namespaces",
                    drop_privileges=root and self.level != "none", cpu_s=lim.cpu_s, memory_bytes=lim.memory_bytes,
                    processes=lim.processes, file_bytes=lim.file_bytes, open_files=lim.open_files,
                    tmpfs_bytes=lim.tmpfs_bytes, cgroup=str(box_cgroup(self.cgroups, lim)) if self.cgroups else "")
        status_r, status_w = os.pipe()
        spec["status_fd"] = status_w
        prefix = ["unshare", *UNSHARE, "--"] if self.level == "namespaces" else []
        command = [*prefix, sys.executable, "-I", "-S", "-B", str(BOOT), json.dumps(spec)]
        timed_out = False
        try:
            private = lambda path: open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
            with private(box / "stdout") as out, private(box / "stderr") as err:
                proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=box,
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
                                        pass_fds=(status_w,))
            os.close(status_w)
            try:
                proc.wait(timeout=lim.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            self._kill(proc, uid if root and self.level == "uid" else None)
            boot_error = _read_all(status_r)
        finally:
            os.close(status_r)
            out_of_memory = bool(spec["cgroup"]) and close_cgroup(Path(spec["cgroup"]))
        if boot_error:
            raise SandboxError(boot_error)
        outcome = classify(_read(box / "stdout"), _read(box / "stderr"), proc.returncode, timed_out, nonce,
                           out_of_memory)
        return dataclasses.replace(outcome, stdout=outcome.stdout[-KEEP_BYTES:], stderr=outcome.stderr[-KEEP_BYTES:])

    def _kill(self, proc: subprocess.Popen, uid: int | None) -> None:
        """Kills what is left of the program and waits for it: the namespace's first process (the
        kernel kills and reaps the rest of the namespace before `unshare` sees it exit), the
        session, and at the "uid" level every process of the uid."""
        if self.level == "namespaces":
            for child in _children(proc.pid):
                _signal(os.kill, child)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _signal(os.killpg, proc.pid)
        proc.wait()
        if uid is not None:
            subprocess.run([sys.executable, "-I", "-S", "-B", str(BOOT), "--kill-uid", str(uid)], check=True,
                           env={}, stdin=subprocess.DEVNULL)

    def run_many(self, programs: Sequence[str], progress: Callable[[], None] | None = None) -> list[Outcome]:
        """Runs programs `workers` at a time, each worker slot with its own uid; results in order."""
        slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            slots.put(slot)

        def one(program: str) -> Outcome:
            slot = slots.get()
            try:
                return self.run(program, slot)
            finally:
                slots.put(slot)
                if progress:
                    progress()

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, programs))

    def describe(self) -> dict:
        """What the results were measured under (stored with every evaluation)."""
        return {"level": self.level, "python": self.python, "python_version": self.python_version,
                "workers": self.workers, "memory_bound": "program" if self.cgroups else "process",
                **dataclasses.asdict(self.limits)}


TREE_CONTROLLERS = {"memory", "pids"}


def own_cgroup(mounts: str, membership: str) -> Path | None:
    """This process's cgroup v2 folder, from /proc/self/mounts and /proc/self/cgroup ("0::/path"); None without one."""
    root = next((Path(f[1]) for f in map(str.split, mounts.splitlines()) if len(f) > 2 and f[2] == "cgroup2"), None)
    path = next((line[3:] for line in membership.splitlines() if line.startswith("0::")), None)
    return None if root is None or path is None else root / path.lstrip("/")


def cgroup_parent() -> Path | None:
    """A cgroup v2 folder where each program can get a cgroup bounding its whole process tree, or None. Enables the
    memory and pids controllers for its children if needed; a process alone in its cgroup first moves into a leaf
    below it, as the owner of a delegated cgroup does (a cgroup with processes cannot pass controllers on)."""
    try:
        folder = own_cgroup(Path("/proc/self/mounts").read_text(), Path("/proc/self/cgroup").read_text())
        if folder is None or not TREE_CONTROLLERS <= set((folder / "cgroup.controllers").read_text().split()):
            return None
        control = folder / "cgroup.subtree_control"
        if not TREE_CONTROLLERS <= set(control.read_text().split()):
            if (folder / "cgroup.procs").read_text().split() == [str(os.getpid())]:
                (folder / "mtp-harness").mkdir(exist_ok=True)
                (folder / "mtp-harness" / "cgroup.procs").write_text(str(os.getpid()))
            control.write_text(" ".join(f"+{c}" for c in sorted(TREE_CONTROLLERS)))
        box_cgroup(folder, Limits()).rmdir()  # creating one is what the sandbox needs
    except OSError:
        return None
    return folder


def box_cgroup(parent: Path, limits: Limits) -> Path:
    """A fresh cgroup for one program: its processes together get limits.memory_bytes of RAM and no swap, and
    limits.processes tasks. `_boot.py` moves the program's first process into it."""
    folder = parent / f"mtp-sandbox-{secrets.token_hex(8)}"
    folder.mkdir()
    for name, value in (("memory.max", limits.memory_bytes), ("memory.swap.max", 0), ("pids.max", limits.processes)):
        if (folder / name).exists():  # memory.swap.max is absent without swap accounting
            (folder / name).write_text(str(value))
    return folder


def close_cgroup(folder: Path) -> bool:
    """Kills whatever of the program is left in its cgroup, removes the cgroup; True if it went over its memory."""
    killer = folder / "cgroup.kill"  # Linux 5.14+; before that, each process one by one
    for _ in range(100):
        procs = (folder / "cgroup.procs").read_text().split()
        if not procs:
            break
        if killer.exists():
            killer.write_text("1")
        else:
            for pid in procs:
                _signal(os.kill, int(pid))
        time.sleep(0.05)
    events = dict(line.split() for line in (folder / "memory.events").read_text().splitlines())
    with contextlib.suppress(OSError):
        folder.rmdir()
    return int(events.get("oom_kill", 0)) > 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _signal(kill: Callable[[int, int], None], target: int) -> None:
    try:
        kill(target, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")  # at most Limits.file_bytes


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")
