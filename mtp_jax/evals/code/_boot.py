"""The sandbox's first process: sets the cage up, then execs the untrusted program.

Run by `sandbox.py` as `python -I -S -B _boot.py SPEC_JSON`, standard library only, as the
harness's user; when the harness is root and namespaces are on, it runs as pid 1 of fresh pid,
network, mount, IPC and UTS namespaces made by util-linux `unshare`. In order it:

1. (cgroup v2) moves itself into the program's cgroup, which bounds the whole process tree;
2. (namespaces) mounts private tmpfs over /tmp and read-only empty tmpfs over the other
   world-writable directories, copies the program to /tmp/program.py and makes /tmp/work;
3. sets the resource limits (CPU time, address space, processes, file size, open files, core);
4. (root) sets no_new_privs and drops to the slot's unprivileged uid/gid with no groups;
5. closes the status pipe on exec (close-on-exec) and execs the interpreter on the program
   (isolated mode, unbuffered, so output order is what the program wrote).

Anything that fails before the exec is written to the status pipe, so the harness can tell a
broken sandbox (its own error, raised) from a broken program (a result).
"""

import ctypes
import json
import os
import resource
import shutil
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
PR_SET_NO_NEW_PRIVS = 38
READ_ONLY_TMPFS = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")


def mount_tmpfs(libc, target, options, flags=MS_NOSUID | MS_NODEV):
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", flags, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def build_cage(spec, libc):
    """Private /tmp holding program.py and an empty work/; returns (program path, work dir)."""
    source = open(spec["program"], "rb").read()
    mount_tmpfs(libc, "/tmp", f"size={spec['tmpfs_bytes']},mode=0755")
    for path in READ_ONLY_TMPFS:
        if os.path.isdir(path) and not os.path.islink(path):
            mount_tmpfs(libc, path, "size=4k,mode=0755", MS_RDONLY | MS_NOSUID | MS_NODEV)
    program, work = "/tmp/program.py", "/tmp/work"
    with open(program, "wb") as f:
        f.write(source)
    os.chmod(program, 0o444)
    os.mkdir(work, 0o700)
    if os.getuid() == 0:
        os.chown(work, spec["uid"], spec["uid"])
    return program, work


def set_limits(spec):
    cpu = spec["cpu_s"]
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.RLIMIT_AS: (spec["memory_bytes"],) * 2,
        resource.RLIMIT_NPROC: (spec["processes"],) * 2,  # processes and threads of the uid
        resource.RLIMIT_FSIZE: (spec["file_bytes"],) * 2,  # stdout and stderr are files too
        resource.RLIMIT_NOFILE: (spec["open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, value in limits.items():
        resource.setrlimit(which, value)


def drop_privileges(spec, libc):
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    uid = spec["uid"]
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
        raise OSError(f"still uid {os.getuid()}/{os.geteuid()} gid {os.getgid()} after dropping to {uid}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError("could regain root after dropping privileges")


def kill_uid(uid):
    """Kills every process of `uid` (what escaped the process group), then exits."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    try:
        os.kill(-1, 9)  # every process this uid may signal, i.e. its own, except this one
    except ProcessLookupError:
        pass


def wait_for_program(python: str, program: str, env: dict) -> None:
    """As the namespace's first process, runs the program as a child and exits with its status,
    128 + N for signal N: `unshare` cannot re-raise a CPU-limit SIGXCPU on itself (it exits 1
    instead), so the harness would see an error where the program ran out of time."""
    pid = os.fork()
    if pid == 0:
        os.execve(python, [python, "-I", "-B", "-u", program], env)
    _, status = os.waitpid(pid, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def main():
    if sys.argv[1] == "--kill-uid":
        kill_uid(int(sys.argv[2]))
        return
    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    try:
        if spec["cgroup"]:  # first: every process the program starts is born inside it
            with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as procs:
                procs.write("0")  # 0: the writing process, whatever its pid in a new pid namespace
        libc = ctypes.CDLL(None, use_errno=True)
        if spec["namespaces"]:
            program, work = build_cage(spec, libc)
        else:
            program, work = spec["program"], spec["work"]
        set_limits(spec)
        if spec["drop_privileges"]:
            drop_privileges(spec, libc)
        os.chdir(work)
        python = shutil.which(spec["python"]) or spec["python"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0"}
        os.set_inheritable(status_fd, False)
        if spec["namespaces"]:
            wait_for_program(python, program, env)
        os.execve(python, [python, "-I", "-B", "-u", program], env)
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the harness
        os.write(status_fd, f"{type(err).__name__}: {err}".encode()[:4000])
        os._exit(125)


if __name__ == "__main__":
    main()
