"""The code sandbox against real and hostile programs: each hostile program tries to do harm and
the test checks from OUTSIDE (host files, a victim process, a listening socket, the process
table) that it could not. Run at the strongest level this machine offers (namespaces as root);
the fallback levels are checked for what they promise."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mtp_jax.evals.code.sandbox import Limits, Sandbox, classify, own_cgroup

QUICK = Limits(timeout_s=4.0, cpu_s=2)
SECRET = "MTP-I9-SECRET-do-not-leak"


@pytest.fixture(scope="module")
def box():
    os.environ["MTP_TEST_SECRET"] = SECRET  # in the harness's environment and /proc/<pid>/environ
    sandbox = Sandbox(QUICK, workers=2)
    yield sandbox
    sandbox.close()
    del os.environ["MTP_TEST_SECRET"]


def processes_of(uids: range) -> list[int]:
    """Live pids whose real uid is in `uids`, read from the host's /proc. Zombies are skipped: they
    are dead, hold nothing but a pid, and host init reaps those whose parent was killed."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        uid_line = next((line for line in status.splitlines() if line.startswith("Uid:")), "")
        if uid_line and int(uid_line.split()[1]) in uids and "\nState:\tZ" not in status:
            pids.append(int(entry.name))
    return pids


def slot_uids(sandbox: Sandbox) -> range:
    return range(sandbox.uid_base, sandbox.uid_base + sandbox.workers)


def test_strongest_level_is_used_as_root(box):
    if os.geteuid() == 0:
        assert box.level == "namespaces", "root with util-linux unshare must get namespaces"
    assert box.python_version.count(".") == 2


def test_classification_of_ordinary_programs(box):
    outcomes = box.run_many(["assert 1 + 1 == 2", "assert 1 + 1 == 3", "1 / 0", "def f(:\n  pass",
                             "import sys\nsys.exit(0)\nassert False", "print('hi')"])
    got = [(o.status, o.error_type) for o in outcomes]
    assert got == [("pass", ""), ("fail", "AssertionError"), ("error", "ZeroDivisionError"), ("error", "SyntaxError"),
                   ("fail", "exit 0"), ("pass", "")]
    assert outcomes[5].stdout.splitlines()[0] == "hi"  # unbuffered: the program's output comes first


def test_classify_signals_and_timeouts():
    assert classify("", "", -signal.SIGSEGV, False, "N").error_type == "signal SIGSEGV"
    assert classify("N\n", "", -signal.SIGXCPU, False, "N").status == "timeout"  # CPU limit: not a pass
    assert classify("N\n", "", 128 + signal.SIGXCPU, False, "N").status == "timeout"  # as the namespace init reports it
    assert classify("", "", 128 + signal.SIGSEGV, False, "N").error_type == "signal SIGSEGV"
    assert classify("N\n", "", 0, True, "N").status == "timeout"
    assert classify("xN\n", "", 0, False, "N").status == "fail"  # the nonce must be a whole line
    # the cgroup's out-of-memory kill is a SIGKILL, not the CPU limit's; an error even after the nonce
    killed = classify("N\n", "", -signal.SIGKILL, False, "N", out_of_memory=True)
    assert (killed.status, killed.error_type) == ("error", "out of memory")


def test_infinite_loop_hits_the_cpu_limit(box):
    start = time.monotonic()
    outcome = box.run("while True:\n    pass")
    assert outcome.status == "timeout" and time.monotonic() - start < QUICK.timeout_s + 2


@pytest.mark.slow
def test_sleeping_hits_the_wall_clock_limit(box):
    start = time.monotonic()
    assert box.run("import time\ntime.sleep(1000)").status == "timeout"
    assert time.monotonic() - start < QUICK.timeout_s + 2


@pytest.mark.slow
def test_sleeping_after_printing_a_pass_is_no_pass(box):
    program = "print('PASS')\nprint('ok')\nimport time\ntime.sleep(1000)"
    assert box.run(program).status == "timeout"


def test_exit_before_the_asserts_is_no_pass(box):
    outcome = box.run("import os\nos._exit(0)\nassert False")
    assert (outcome.status, outcome.error_type) == ("fail", "exit 0")


@pytest.mark.slow
def test_fork_bomb_is_contained_and_cleaned_up(box):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    assert box.run(program).status in ("timeout", "fail")
    assert time.monotonic() - start < QUICK.timeout_s + 5
    assert processes_of(slot_uids(box)) == []


def test_background_child_does_not_outlive_the_program(box):
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"
    assert box.run(program).status == "pass"
    assert processes_of(slot_uids(box)) == []


def test_huge_allocation_fails_inside_the_program(box):
    outcome = box.run("x = bytearray(100 * 2**30)")
    assert (outcome.status, outcome.error_type) == ("error", "MemoryError")


def test_writes_outside_its_directory_do_not_land(box, tmp_path):
    open_dir = tmp_path / "reachable"
    open_dir.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    targets = [open_dir / "escape.txt", Path("/tmp") / f"mtp-i9-escape-{os.getpid()}.txt",
               Path("/var/tmp") / f"mtp-i9-escape-{os.getpid()}.txt", Path("/dev/shm") / f"mtp-i9-{os.getpid()}"]
    program = "wrote = []\n" + "".join(
        f"try:\n    open({str(t)!r}, 'w').write('x')\n    wrote.append({str(t)!r})\nexcept OSError:\n    pass\n"
        for t in targets) + "open('inside.txt', 'w').write('x')\nprint('wrote', wrote)"
    outcome = box.run(program)
    assert outcome.status == "pass", outcome.stderr  # writing its own directory works
    assert [t for t in targets if t.exists()] == []


def test_deleting_reachable_files_fails(box, tmp_path):
    os.chmod(tmp_path, 0o755)
    victims = [tmp_path / "keep.txt", Path("/tmp") / f"mtp-i9-keep-{os.getpid()}.txt"]
    for v in victims:
        v.write_text("precious")
        os.chmod(v, 0o666)
    program = "import os, shutil\n" + "".join(
        f"for f in (lambda: os.remove({str(v)!r}), lambda: shutil.rmtree({str(v.parent)!r})):\n"
        f"    try:\n        f()\n    except OSError:\n        pass\n" for v in victims)
    try:
        assert box.run(program).status == "pass"
        assert [v.read_text() for v in victims] == ["precious"] * 2
    finally:
        victims[1].unlink()


def test_environment_is_clean(box):
    program = "import os\nprint(dict(os.environ))\nprint(open('/proc/self/environ').read())"
    outcome = box.run(program)
    assert outcome.status == "pass" and SECRET not in outcome.stdout and "MTP_TEST_SECRET" not in outcome.stdout


def test_parent_environ_is_unreadable(box):
    program = (f"import os\nfor pid in ({os.getpid()}, os.getppid(), 1):\n    try:\n"
               f"        print(open(f'/proc/{{pid}}/environ').read())\n    except OSError as e:\n        print(e)")
    outcome = box.run(program)
    assert outcome.status == "pass" and SECRET not in outcome.stdout


def test_killing_the_parent_process_group_and_others_fails(box):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        program = (
            "import os, signal\n"
            f"for kill, target in ((os.killpg, os.getpgid(os.getppid())), (os.killpg, {os.getpgid(0)}), "
            f"(os.kill, {os.getpid()}), (os.kill, {victim.pid}), (os.killpg, {victim.pid}), (os.kill, -1)):\n"
            "    try:\n        kill(target, signal.SIGKILL)\n    except OSError as e:\n        print(e)\n"
        )
        box.run(program)
        assert victim.poll() is None, "the sandboxed program killed a process outside it"
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.slow
def test_network_connections_fail(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    got = []

    def accept():
        deadline = time.monotonic() + QUICK.timeout_s + 1
        while time.monotonic() < deadline:
            try:
                got.append(server.accept())
            except socket.timeout:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    port = server.getsockname()[1]
    program = (f"import socket\nfor host in ('127.0.0.1', '10.0.0.1', '1.1.1.1'):\n    try:\n"
               f"        s = socket.create_connection((host, {port}), timeout=1)\n        s.sendall(b'leak')\n"
               f"        print('connected', host)\n    except OSError as e:\n        print('refused', host, e)")
    outcome = box.run(program)
    thread.join()
    server.close()
    assert got == [] and "connected" not in outcome.stdout


def test_each_worker_slot_has_its_own_uid(box):
    outcomes = box.run_many(["import os, time\ntime.sleep(0.5)\nprint('uid', os.getuid())"] * 4)
    uids = {int(o.stdout.split("uid ")[1].split()[0]) for o in outcomes}
    if box.level != "none":
        assert len(uids) == 2 and uids <= set(slot_uids(box))


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the uid level needs root")
def test_uid_level_without_namespaces():
    with Sandbox(QUICK, workers=1, level="uid") as sandbox:
        assert sandbox.run(f"import os\nassert os.getuid() == {sandbox.uid_base}").status == "pass"
        program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\ntime.sleep(1000)"
        assert sandbox.run(program).status == "timeout"
        assert processes_of(slot_uids(sandbox)) == []  # the escaped session was killed by uid


@pytest.mark.slow
def test_unprotected_level_still_limits_time_and_memory():
    with Sandbox(QUICK, workers=1, level="none") as sandbox:
        assert [sandbox.run(p).status for p in ("assert True", "while True: pass", "x = bytearray(100 * 2**30)")] == [
            "pass", "timeout", "error"]


def test_own_cgroup_on_pure_and_hybrid_hierarchies():
    """The cgroup v2 folder the sandbox creates program cgroups under, from the two /proc files it reads."""
    pure = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n"
    hybrid = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    assert own_cgroup(pure, "0::/user.slice/run.scope\n") == Path("/sys/fs/cgroup/user.slice/run.scope")
    assert own_cgroup(hybrid, "4:memory:/job\n0::/\n") == Path("/sys/fs/cgroup/unified")
    assert own_cgroup("cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n", "4:memory:/job\n") is None


FORKS = """
import subprocess, sys
child = "data = b'x' * (100 << 20); import time; time.sleep(2)"
children = [subprocess.Popen([sys.executable, "-c", child]) for _ in range(4)]
assert [c.wait() for c in children] == [0] * 4
"""


def test_memory_bound_is_the_one_describe_names():
    """Four children of 100 MiB each against a 256 MiB bound: over it as a whole program, under it per process.
    With a cgroup ("program") the program is out of memory; without one ("process", as documented) it passes,
    while one process over the bound fails either way."""
    with Sandbox(Limits(timeout_s=60, cpu_s=20, memory_bytes=256 << 20), workers=1) as sandbox:
        bound = sandbox.describe()["memory_bound"]
        outcome = sandbox.run(FORKS)
        alone = sandbox.run("data = b'x' * (300 << 20)")
    assert (outcome.status, outcome.error_type) == (("error", "out of memory") if bound == "program" else ("pass", ""))
    assert alone.status == "error", alone
