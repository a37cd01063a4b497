"""Running untrusted programs: a minimal read-only root, namespaces, a fresh uid, a memory bound for the whole
program, and a pass verdict the program cannot forge.

Process tree of one run (Linux; each layer degrades cleanly when the OS refuses it, and the result says which held):

    harness (run_program) --Popen, new session, empty environment--> launcher (root): unshare(mount, net, pid)
      supervisor (pid 1 of the new pid namespace): builds the jail, listens on the completion channel, forks
        the program, reaps, writes the verdict on the status fd (which the program never holds)
      program: joins the run's cgroup, chroot into the jail, rlimits, setgroups([]) + setgid + setuid to a random
        uid, no_new_privs, parent-death SIGKILL, execve of a FRESH `python -I -S -c <runner>`: nothing of the
        harness (the nonce included) is in its address space.

Layers, as root (the dev machines, CI's privileged container); README's sandbox section has the full account:
- mount: the program's root is a fresh tmpfs with read-only binds of /usr (+ the /bin /lib /lib64 /sbin links),
  the interpreter's prefix, /etc/ld.so.cache and /etc/localtime, the devices null zero full random urandom, and
  one size- and inode-limited tmpfs on /tmp (/dev/shm -> /tmp), the only writable place, gone with the run. No
  /proc, /sys, /run, /var, /home, /root or /work: no host file, secret or socket is reachable, nothing stays.
- pid: the program sees only its own processes; when the supervisor exits the kernel kills every one of them.
- net: only a down loopback: connect() fails; user: a random uid per run (RLIMIT_NPROC counts only this run).
- memory: a per-run cgroup v2 (memory.max = memory_mb for all its processes together, swap 0, pids.max,
  oom.group) under cgroup_parent() when there is one; otherwise RLIMIT_AS (memory_mb per process) x RLIMIT_NPROC
  (FALLBACK_TASKS; without root: nproc). `RunResult.memory_bound` and evaluate.py's metrics.json say which.
- always: rlimits (CPU, address space, file size, open files, tasks, no core), a wall timeout that kills the
  process group, an environment built from nothing (no credentials).

Without root (the Docker image runs as uid 1000): rlimits only (no namespaces, jail, uid switch or cgroup): the
program runs as the harness's user, sees its files, may use the network and signal its processes; launcher and
supervisor are non-dumpable. Every layer is reported missing.

Why a pass cannot be forged (assert mode: MBPP / HumanEval). The verdict comes from the supervisor, which the
program cannot reach (root, another uid; it alone holds the status fd). It counts a pass only when the program
exited 0 AND the runner connected to the supervisor's abstract UNIX socket after `exec(program)` returned
normally, i.e. after the last assert ran. Before any untrusted code exists the runner installs an audit hook
(PEP 578) that refuses every socket connect/send/bind whose calling frame is not the runner's own (by identity),
and what would get around that: tracing (a trace function can jump over the asserts), exec or spawn of another
image (no hook there), ctypes / _testcapi / subinterpreters, gc.get_objects/get_referrers (the hook's closure),
building code objects, and opening /proc. There is no secret in the program's process to steal: the nonce that
authenticates the supervisor's report stays in the harness and the supervisor. So os._exit(0), sys.exit(0),
SystemExit in a finally, killing itself or its parent, reading frames, or writing fake "proof" lines on any fd
all fail. Not stopped: code that corrupts the interpreter itself (crafted bytecode via marshal, a CPython memory
bug) to impersonate the runner's frame, or objects whose __eq__ is always True: attacks on the benchmark from
inside the process that runs the tests, which no in-process check rules out; not escapes from the sandbox.

In io mode (CodeContests) a run is "ok" when it exits 0 (sys.exit(0) too); the caller compares its stdout.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

T, R = TypeVar("T"), TypeVar("R")

FAILURE_KINDS = ("wrong_answer", "runtime_error", "timeout", "memory", "syntax", "sandbox_violation")
FALLBACK_TASKS = 2  # RLIMIT_NPROC without a cgroup: the main thread + one (the recursion-depth thread idiom)
_ERRNO_VIOLATION = {
    1,
    13,
    11,
    27,
    28,
    101,
    111,
    113,
    97,
    99,
    24,
}  # EPERM EACCES EAGAIN EFBIG ENOSPC net EMFILE


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a verdict about the program)."""


@dataclass
class RunResult:
    status: str  # "ok" or one of FAILURE_KINDS
    passed: (
        bool  # assert mode: ran to the end (the supervisor's proof); io mode: exited 0 (caller checks output)
    )
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    detail: str = ""
    isolation: dict = field(default_factory=dict)  # which layers held: net, pid, mount, user
    memory_bound: str = ""  # what bounds the memory of the program as a whole (cgroup or rlimits)


def _minimal_env() -> dict[str, str]:
    """Built from nothing: nothing of the harness's environment (tokens, keys, endpoints) can leak."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/"}


def _interpreter() -> str:
    """The base interpreter (not a venv wrapper): it is run with -I -S, so no site-packages either way."""
    exe = getattr(sys, "_base_executable", "") or sys.executable
    return os.path.realpath(exe)


def _closed_ancestor(path: str) -> str:
    """The highest ancestor of `path` that other users cannot enter ('' when all are open)."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i])
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return ""
    return ""


# --------------------------------------------------------------------------- cgroup v2


@functools.cache
def cgroup_parent() -> str:
    """The cgroup v2 directory in which per-run cgroups are made ('' when there is none: rlimits bound memory).

    $WMTP_SANDBOX_CGROUP names one explicitly (a cgroup delegated to the harness: systemd's Delegate=, or an admin's
    mkdir under a cgroup that lists memory in its cgroup.subtree_control); a bad one is an error. Otherwise our own
    cgroup, so that the programs stay within whatever bounds and accounts for the harness (a container, a unit, a
    job). Either way the memory controller is enabled for its children if it is not yet; the kernel refuses that
    while the cgroup holds processes of its own (the usual case for our own: then '').
    """
    explicit = os.environ.get("WMTP_SANDBOX_CGROUP", "")
    here = explicit or _own_cgroup()
    if here and _delegates_memory(here):
        return here
    if explicit:
        raise SandboxError(
            f"WMTP_SANDBOX_CGROUP={explicit}: not a cgroup v2 directory that can give its children the memory "
            "controller (it must exist, hold no processes, and its parent must list memory in cgroup.subtree_control)"
        )
    return ""


def _own_cgroup() -> str:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mounts = [line.split() for line in f]
        mnt = next(m[4] for m in mounts if "-" in m and m[m.index("-") + 1] == "cgroup2")
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            own = next(line[3:].strip() for line in f if line.startswith("0::"))
    except (OSError, StopIteration, IndexError):
        return ""
    return os.path.normpath(os.path.join(mnt, own.lstrip("/")))


def _delegates_memory(cgroup: str) -> bool:
    """Whether children of `cgroup` get the memory controller, enabling it (and pids) for them when it can."""

    def listed(name: str) -> list[str]:
        with open(os.path.join(cgroup, name), encoding="utf-8") as f:
            return f.read().split()

    try:
        for c in ("memory", "pids"):
            if c in listed("cgroup.controllers") and c not in listed("cgroup.subtree_control"):
                path = os.path.join(cgroup, "cgroup.subtree_control")
                with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as f:
                    f.write(f"+{c}")
        return "memory" in listed("cgroup.subtree_control")
    except OSError:
        return False


def _new_cgroup(memory_mb: int, nproc: int) -> str:
    """A fresh cgroup bounding the whole program ('' when cgroup v2 cannot be used here)."""
    parent = cgroup_parent()
    if not parent:
        return ""
    path = os.path.join(parent, f"wmtp-sbx-{os.getpid()}-{secrets.token_hex(6)}")
    settings = {"memory.max": memory_mb << 20, "memory.swap.max": 0, "memory.oom.group": 1, "pids.max": nproc}
    try:
        os.mkdir(path)
        for name, value in settings.items():
            if name == "memory.max" or os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), "w", encoding="utf-8") as f:
                    f.write(str(value))
    except OSError as e:
        _remove_cgroup(path)
        raise SandboxError(f"cgroup {path}: {e}") from None
    return path


def _cgroup_oom(path: str) -> bool:
    """Whether the kernel killed a process of the run's cgroup for memory."""
    try:
        with open(os.path.join(path, "memory.events"), encoding="utf-8") as f:
            return any(line.split()[:1] == ["oom_kill"] and line.split()[1] != "0" for line in f)
    except (OSError, IndexError):
        return False


def _remove_cgroup(path: str) -> None:
    """Kill what is left in it (nothing, normally: the pid namespace died with its init) and remove it."""
    with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.kill"), "w", encoding="utf-8") as f:
        f.write("1")
    for _ in range(300):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)  # the last tasks are still being torn down


def memory_bound(cgroup: bool, memory_mb: int, tasks: int, root: bool = True) -> str:
    """The sentence that says what bounds a program's memory (RunResult.memory_bound, metrics.json)."""
    if cgroup:
        return f"cgroup v2: memory.max {memory_mb} MB and pids.max {tasks} for the whole program"
    per = f"rlimits: {memory_mb} MB address space per process x {tasks} tasks"
    if root:
        return f"{per} (RLIMIT_NPROC) = {memory_mb * tasks} MB for the whole program at most"
    return f"{per} of the harness's user, its own included (RLIMIT_NPROC) = {memory_mb * tasks} MB at most"


# --------------------------------------------------------------------------- the harness


def run_program(
    source: str,
    stdin: str = "",
    timeout: float = 10.0,
    memory_mb: int = 1024,
    *,
    mode: str = "assert",
    fsize_mb: int = 64,
    nproc: int = 32,
    nofile: int = 64,
    tmpfs_mb: int = 128,
    max_output_bytes: int = 32 << 20,
) -> RunResult:
    """Run one Python program in the sandbox and classify the outcome (see the module docstring).

    mode "assert": passes only when the whole source ran to its end (the supervisor's proof).
    mode "io": stdin is fed from `stdin`; status "ok" when it exits 0; the caller compares `stdout`.
    `memory_mb` bounds the whole program under a cgroup, each process otherwise; `nproc` its tasks under a cgroup
    or without root (where RLIMIT_NPROC counts the harness's tasks too), FALLBACK_TASKS otherwise (see memory_bound).
    """
    if mode not in ("assert", "io"):
        raise ValueError(f"run_program: mode must be 'assert' or 'io', got {mode!r}")
    is_root, cgroup, run_dir = os.geteuid() == 0, "", tempfile.mkdtemp(prefix="wmtp-sbx-")
    try:
        cgroup = _new_cgroup(memory_mb, nproc) if is_root else ""
        tasks = nproc if cgroup or not is_root else min(nproc, FALLBACK_TASKS)  # see memory_bound
        uid = 100_000 + secrets.randbelow(1 << 30) if is_root else None
        nonce = secrets.token_hex(16)
        fds = _run_files(run_dir, source, stdin, uid)
        interp = _interpreter()
        cfg = {
            "mode": mode,
            "uid": uid if uid is not None else "",
            "cpu_s": int(timeout) + 1,
            "mem_mb": memory_mb,
            "fsize_mb": fsize_mb,
            "tasks": tasks,
            "nofile": nofile,
            "tmpfs_mb": tmpfs_mb,
            "src": os.path.join(run_dir, "program.py"),
            "root": os.path.join(run_dir, "root"),
            "workdir": os.path.join(run_dir, "work"),
            "interp": interp,
            "ro": ":".join(sorted({sys.base_prefix, os.path.dirname(os.path.dirname(interp))})),
            "closed": _closed_ancestor(sys.base_prefix) if is_root else "",
            "cgroup": cgroup,
        }
        rc, timed_out, wall = _launch_and_wait(cfg, fds, nonce, timeout)
        read = lambda n: _read(os.path.join(run_dir, n), max_output_bytes)  # noqa: E731
        outputs = (read("stdout"), read("stderr"), read("status"), read("result"))
        r = _classify(mode, nonce, rc, timed_out, wall, *outputs, oom=bool(cgroup) and _cgroup_oom(cgroup))
        r.memory_bound = memory_bound(bool(cgroup), memory_mb, tasks, is_root)
        return r
    finally:
        if cgroup:
            _remove_cgroup(cgroup)
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_files(run_dir: str, source: str, stdin: str, uid: int | None) -> dict[str, int]:
    """The run's files, root-only when we are root; returns the fds the launcher gets."""
    for name, text in (("program.py", source), ("stdin", stdin)):
        fd = os.open(os.path.join(run_dir, name), os.O_WRONLY | os.O_CREAT, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
    os.mkdir(os.path.join(run_dir, "root"), 0o700)  # the jail's mount point
    workdir = os.path.join(run_dir, "work")  # the cwd only where no jail could be built
    os.mkdir(workdir, 0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chmod(run_dir, 0o711)  # the user may enter (to reach work/), not list or read
    flags, names = os.O_WRONLY | os.O_CREAT | os.O_APPEND, ("status", "result", "stdout", "stderr")
    fds = {n: os.open(os.path.join(run_dir, n), flags, 0o600) for n in names}
    fds["stdin"] = os.open(os.path.join(run_dir, "stdin"), os.O_RDONLY)
    return fds


def _launch_and_wait(cfg: dict, fds: dict[str, int], nonce: str, timeout: float) -> tuple[int, bool, float]:
    """Start the launcher, wait at most `timeout` s, kill its process group; (exit code, timed out, wall s)."""
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce.encode())
    os.close(nonce_w)
    cfg = {**cfg, "nonce_fd": nonce_r, "status_fd": fds["status"], "result_fd": fds["result"]}
    t0 = time.monotonic()
    timed_out = False
    try:
        proc = subprocess.Popen(
            [cfg["interp"], "-I", "-S", "-c", _LAUNCHER, *(f"{k}={v}" for k, v in cfg.items())],
            stdin=fds["stdin"],
            stdout=fds["stdout"],
            stderr=fds["stderr"],
            pass_fds=(nonce_r, fds["status"], fds["result"]),
            start_new_session=True,
            env=_minimal_env(),
            cwd=os.path.dirname(cfg["src"]),
        )
    finally:
        for fd in (nonce_r, *fds.values()):
            os.close(fd)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _killpg(proc.pid)
        proc.wait()
    return proc.returncode, timed_out, time.monotonic() - t0


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _classify(
    mode: str,
    nonce: str,
    rc: int | None,
    timed_out: bool,
    wall: float,
    out: str,
    err: str,
    status: str,
    result: str,
    oom: bool = False,
) -> RunResult:
    """Turn what the launcher reported into a verdict. Only the status fd (never held by the program) is trusted,
    and a proof line there only with this run's nonce; the program's own report on the result fd names the
    failure kind only."""
    iso, fate = {}, ""
    for line in status.splitlines():
        key, _, val = line.partition(" ")
        if key == "iso" and not iso:
            iso = {k: v == "1" for k, v in (kv.split("=") for kv in val.split())}
        elif key in ("exit", "signal", "setup") and not fate:
            fate = line
    if fate.startswith("setup"):
        raise SandboxError(f"sandbox setup failed: {fate[6:]}")
    proven = f"proof {nonce}" in status.splitlines()
    report = next((ln for ln in result.splitlines() if ln.startswith(("exc ", "exit ", "syntax"))), "")
    mk = lambda status, detail="": RunResult(  # noqa: E731
        status, status == "ok", rc, out, err, wall, detail, iso
    )
    if timed_out:
        return mk("timeout", f"wall time over the limit ({wall:.1f} s)")
    if oom:
        return mk("memory", "the cgroup's memory.max was reached (OOM kill)")
    if fate.startswith("signal"):
        sig = int(fate.split()[1])
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            return mk("timeout", "CPU time limit (SIGXCPU)")
        if sig in (signal.SIGXFSZ, signal.SIGSYS):
            return mk("sandbox_violation", f"killed by {name}")
        if sig == signal.SIGKILL and "MemoryError" in err:
            return mk("memory", "killed by SIGKILL after MemoryError")
        return mk("runtime_error", f"killed by {name}")
    if rc == 0 and fate == "exit 0" and (proven or mode == "io"):
        return mk("ok")
    if report.startswith("syntax"):
        return mk("syntax", report[7:])
    if report.startswith("exc "):
        name, _, errno = report[4:].partition(" ")
        if name == "AssertionError":
            return mk("wrong_answer", "an assert failed")
        if name == "MemoryError":
            return mk("memory", "MemoryError")
        if errno.isdigit() and int(errno) in _ERRNO_VIOLATION:
            return mk("sandbox_violation", f"{name} errno {errno} (forbidden operation)")
        return mk("runtime_error", name)
    if report.startswith("exit "):
        return mk("runtime_error", f"SystemExit({report[5:]}) before the tests finished")
    if rc == 0:
        return mk("sandbox_violation", "exited with status 0 without the completion proof (early exit)")
    if "MemoryError" in err:
        return mk("memory", "MemoryError")
    return mk("runtime_error", f"exit status {rc}")


def map_parallel(fn: Callable[[T], R], items: list[T], workers: int = 0) -> list[R]:
    """[fn(x) for x in items], `workers` at a time (0: all cores), results in order. For functions that run
    sandboxed programs: the threads only wait (each program is its own process tree), so the GIL is no bottleneck."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


# --------------------------------------------------------------------------- the runner
# Everything between the two marker lines is the program's interpreter's `-c` text (`python -I -S -c <this>
# MODE CHANNEL`): self-contained, stdlib only. fd 3 holds the source, fd 4 takes the failure report.
# >>> runner
import os  # noqa: E402, F811, I001  (again: this part also runs on its own)
import sys  # noqa: E402, F811


def _guard(main):
    """The audit hook of an assert-mode program: only the frame `main` may use sockets (the completion channel);
    what would get around that is refused (see the module docstring)."""
    getframe, realpath = sys._getframe, os.path.realpath
    denied = {"sys.settrace", "sys.setprofile", "sys._settraceallthreads", "sys._setprofileallthreads"}
    denied |= {"sys.addaudithook", "sys.monitoring.register_callback", "code.__new__", "os.exec", "os.system"}
    denied |= {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.posix_spawn", "subprocess.Popen"}
    sockets = frozenset(("socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind"))
    modules = frozenset(("ctypes", "_ctypes", "_posixsubprocess"))
    prefixes = ("_test", "_xxsub", "_xxinterp", "_interp")

    def hook(event, args):
        if event in denied or (event in sockets and getframe(1) is not main):
            raise PermissionError(1, f"sandbox: {event} is not allowed while tests are judged")
        if event == "import":
            name = args[0]
            if type(name) is not str or name in modules or name.startswith(prefixes):
                raise PermissionError(1, f"sandbox: importing {name} is not allowed while tests are judged")
        elif event == "open" and type(args[0]) in (str, bytes):
            path = realpath(args[0])
            if (path if type(path) is str else path.decode(errors="replace")).startswith("/proc/"):
                raise PermissionError(1, f"sandbox: opening {path!r} is not allowed while tests are judged")

    return hook


def _run(mode, channel):
    """Compile and run the source; in assert mode connect to the supervisor only if it ran to its end."""
    import _socket
    import builtins

    write, exit_, sock, main = os.write, os._exit, _socket.socket, sys._getframe()
    unix, stream = _socket.AF_UNIX, _socket.SOCK_STREAM
    if mode == "assert":
        sys.addaudithook(_guard(main))
    chunks = []
    while chunk := os.read(3, 1 << 16):
        chunks.append(chunk)
    os.close(3)
    os.set_inheritable(4, False)
    try:
        code = compile(b"".join(chunks).decode("utf-8"), "program.py", "exec")
    except (SyntaxError, ValueError) as e:
        import traceback

        traceback.print_exc()
        write(4, f"syntax {type(e).__name__}: {e}\n".encode())
        exit_(1)
    builtins.exit = builtins.quit = sys.exit  # what `site` would add (-S skips it); programs call exit()
    sys.argv = ["program.py"]
    finished = False
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
        _end_like_the_interpreter()
        finished = True
    except BaseException as e:
        try:
            _report(e, mode, write, exit_)  # exits (a replaced _report is made to exit here)
        finally:
            exit_(1)
    if finished and mode == "assert":
        s = sock(unix, stream)
        s.connect("\0" + channel)  # abstract socket; the audit hook lets only this frame through
        s.sendall(b"done")
        s.close()
    exit_(0)


def _end_like_the_interpreter():
    """What interpreter shutdown would do: wait for non-daemon threads, flush the standard streams."""
    threading = sys.modules.get("threading")
    if threading is not None:
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
    sys.stdout.flush()
    sys.stderr.flush()


def _report(e, mode, write, exit_):
    """The program raised (or exited): say which kind on fd 4 (used for the failure kind only), then exit."""
    try:
        if isinstance(e, SystemExit):
            if mode == "io" and e.code in (None, 0):
                sys.stdout.flush()
                exit_(0)
            write(4, f"exit {e.code!r}\n".encode())
            exit_(e.code if type(e.code) is int and 0 < e.code < 256 else 1)
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        errno = getattr(e, "errno", None)
        write(4, f"exc {type(e).__name__} {errno if type(errno) is int else ''}\n".encode())
    finally:
        exit_(1)


# <<< runner
# --------------------------------------------------------------------------- the launcher
# Everything between the two marker lines runs as `python -I -S -c <this text> key=value ...`: the launcher, and
# (forked from it) the supervisor and the program until its execve. Self-contained, stdlib only, importing little.
# >>> launcher
import os  # noqa: E402, F811, I001  (again: this part also runs on its own)
import signal  # noqa: E402, F811
import sys  # noqa: E402, F811

_SETUP_FAILED = 121  # the exit code of a launcher that could not build the sandbox

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
TMP_INODES = 4096  # files + directories the program may create in its /tmp
DEVICES = ("null", "zero", "full", "random", "urandom")


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _sys(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _high(fd: int) -> int:
    """`fd` moved to a number >= 10, close-on-exec: the program's fds 3 and 4 are then free to be set."""
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def _unshare(libc) -> dict:
    """Enter new mount/pid/net namespaces, each separately so a refusal of one keeps the others."""
    iso = {}
    for name, flag in (("mount", CLONE_NEWNS), ("pid", CLONE_NEWPID), ("net", CLONE_NEWNET)):
        iso[name] = libc.unshare(flag) == 0
    return iso


def _jail(libc, cfg: dict) -> str:
    """Build the program's root (see the module docstring) on cfg["root"]; returns it."""

    def m(src, dst, fs, flags, data=None):
        enc = lambda s: s and s.encode()  # noqa: E731
        _sys(libc.mount(enc(src), enc(dst), enc(fs), flags, enc(data)), f"mount {dst}")

    def bind_ro(src, dst):
        m(src, dst, None, MS_BIND)
        m(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)

    root = cfg["root"]
    m(None, "/", None, MS_REC | MS_PRIVATE)
    m("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m,nr_inodes=1024")
    dirs = []
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr"):
        if os.path.islink("/" + top):
            os.symlink(os.readlink("/" + top), f"{root}/{top}")
        elif os.path.isdir("/" + top):
            dirs.append("/" + top)
    for d in [os.path.realpath(p) for p in cfg["ro"].split(":")]:
        if not any(d == b or d.startswith(b + "/") for b in dirs):
            dirs.append(d)
    for d in dirs:
        os.makedirs(root + d, 0o755)
        bind_ro(d, root + d)
    os.makedirs(f"{root}/etc", 0o755)
    for name in ("ld.so.cache", "localtime"):
        p = "/etc/" + name
        if os.path.islink(p):
            os.symlink(os.readlink(p), root + p)
        elif os.path.isfile(p):
            open(root + p, "w").close()
            bind_ro(p, root + p)
    os.mkdir(f"{root}/dev", 0o755)
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        m(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    os.symlink("/tmp", f"{root}/dev/shm")  # POSIX shared memory and semaphores live in the same private tmpfs
    os.mkdir(f"{root}/tmp", 0o755)
    tmp = f"mode=1777,size={cfg['tmpfs_mb']}m,nr_inodes={TMP_INODES}"
    m("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, tmp)
    os.mkdir(f"{root}/tmp/sandbox", 0o700)
    if cfg["uid"] is not None:
        os.chown(f"{root}/tmp/sandbox", cfg["uid"], cfg["uid"])
    m(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return root


def _limits(cfg: dict) -> None:
    import resource as r

    mb = 1 << 20
    for lim, val in (
        (r.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)),
        (r.RLIMIT_AS, (cfg["mem_mb"] * mb,) * 2),
        (r.RLIMIT_FSIZE, (cfg["fsize_mb"] * mb,) * 2),
        (r.RLIMIT_NOFILE, (cfg["nofile"],) * 2),
        (r.RLIMIT_NPROC, (cfg["tasks"],) * 2),
        (r.RLIMIT_CORE, (0, 0)),
    ):
        r.setrlimit(lim, val)


def _program(cfg: dict, jail: str, channel: str, src: int, procs: int, libc) -> None:
    """The program's process until its execve: cgroup, jail, limits, the run's uid, a fresh interpreter."""
    uid = cfg["uid"]
    try:
        if procs >= 0:
            os.write(procs, b"0")  # join the run's cgroup: every process of the program is in it
        if jail:
            os.chroot(jail)
        work = "/tmp/sandbox" if jail else cfg["workdir"]
        os.chdir(work)
        _limits(cfg)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _sys(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _sys(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # after setuid: it resets it
        os.dup2(src, 3)
        os.dup2(cfg["result_fd"], 4)
        env = dict(os.environ, HOME=work, TMPDIR=work)
        interp = cfg["interp"]
        os.execve(interp, [interp, "-I", "-S", "-c", _RUNNER, cfg["mode"], channel], env)
    except Exception as e:
        os.write(cfg["status_fd"], f"setup {type(e).__name__}: {e}\n".encode())
    os._exit(_SETUP_FAILED)


def _completed(listener, pid: int) -> bool:
    """Whether the program's own process `pid` connected and said it ran to the end (see _run)."""
    import _socket

    listener.setblocking(False)
    while True:
        try:
            fd, _ = listener._accept()
        except OSError:
            return False
        conn = _socket.socket(fileno=fd)
        try:
            cred = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            conn.setblocking(False)
            if int.from_bytes(cred[:4], sys.byteorder) == pid and conn.recv(8) == b"done":
                return True
        except OSError:
            pass
        finally:
            conn.close()


def _supervise(cfg: dict, iso: dict, nonce: str, libc) -> None:
    """Pid 1 of the run: build the jail, listen, fork the program, reap, report its fate. Never returns."""
    import _socket

    status = cfg["status_fd"]
    try:
        _sys(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        os.umask(0o022)
        jail = _jail(libc, cfg) if iso["mount"] else ""
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        channel = "wmtp-sbx-" + os.urandom(12).hex()
        listener.bind("\0" + channel)  # an abstract socket: no file, gone with the listener
        listener.listen(8)
        src = _high(os.open(cfg["src"], os.O_RDONLY))
        procs = _high(os.open(cfg["cgroup"] + "/cgroup.procs", os.O_WRONLY)) if cfg["cgroup"] else -1
    except Exception as e:
        os.write(status, f"setup {type(e).__name__}: {e}\n".encode())
        os._exit(_SETUP_FAILED)
    pid = os.fork()
    if pid == 0:
        _program(cfg, jail, channel, src, procs, libc)
    os.close(src)
    if procs >= 0:
        os.close(procs)
    while True:  # as init of the namespace, also reap what the program's own children leave
        reaped, st = os.waitpid(-1, 0)
        if reaped == pid:
            break
    if os.WIFSIGNALED(st):
        code, fate = 128 + os.WTERMSIG(st), f"signal {os.WTERMSIG(st)}"
    else:
        code, fate = os.WEXITSTATUS(st), f"exit {os.WEXITSTATUS(st)}"
    proof = cfg["mode"] == "assert" and code == 0 and _completed(listener, pid)
    os.write(status, (f"{fate}\n" + (f"proof {nonce}\n" if proof else "")).encode())
    os._exit(code)


def _sweep_uid(uid: int) -> None:
    """Kill every process of the run's uid (what a pid namespace would have done), from a child of that uid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _launch(argv: list[str]) -> None:
    """The launcher: namespaces, fork the supervisor, wait, report if the supervisor itself died."""
    cfg: dict = dict(a.split("=", 1) for a in argv)
    for k in ("cpu_s", "mem_mb", "fsize_mb", "tasks", "nofile", "tmpfs_mb"):
        cfg[k] = int(cfg[k])
    for k in ("nonce_fd", "status_fd", "result_fd"):
        cfg[k] = _high(int(cfg[k]))
    cfg["uid"] = int(cfg["uid"]) if cfg["uid"] else None
    libc = _libc()
    nonce = os.read(cfg["nonce_fd"], 64).decode()
    os.close(cfg["nonce_fd"])
    root = cfg["uid"] is not None
    iso = _unshare(libc) if root else {"mount": False, "pid": False, "net": False}
    iso["user"] = root and (cfg["closed"] == "" or iso["mount"])
    if not iso["user"]:
        cfg["uid"] = None  # the interpreter would be unreachable for another uid: keep running as we are
    if not root:
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # same uid as the program: keep it out of /proc/<pid>/mem
    os.write(cfg["status_fd"], ("iso " + " ".join(f"{k}={int(v)}" for k, v in iso.items()) + "\n").encode())
    pid = os.fork()
    if pid == 0:
        _supervise(cfg, iso, nonce, libc)
    os.close(cfg["result_fd"])
    _, st = os.waitpid(pid, 0)
    if cfg["uid"] is not None and not iso["pid"]:
        _sweep_uid(cfg["uid"])
    if os.WIFSIGNALED(st):
        os.write(cfg["status_fd"], f"signal {os.WTERMSIG(st)}\n".encode())
        os._exit(128 + os.WTERMSIG(st))
    os._exit(os.WEXITSTATUS(st))


# <<< launcher
def _section(text: str, name: str) -> str:
    return text.split(f"# >>> {name}\n")[1].split(f"# <<< {name}\n")[0]


with open(__file__, encoding="utf-8") as _f:
    _text = _f.read()
_RUNNER = _section(_text, "runner") + "_run(sys.argv[1], sys.argv[2])\n"
_LAUNCHER = _section(_text, "launcher") + f"_RUNNER = {_RUNNER!r}\n_launch(sys.argv[1:])\n"
del _text
