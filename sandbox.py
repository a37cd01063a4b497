"""Running untrusted programs: process group, rlimits, unprivileged user, no network, nonce-proven success.

Design (Linux; each layer degrades cleanly when the OS refuses it, and the result says which layers held):

    harness (run_program)  --Popen, new session, minimal env-->  launcher ("outer", root, this file as a script)
        outer: unshare(mount, net, pid namespaces) -> fork -> waits, reports the child's fate on a status fd
        inner (pid 1 of the new pid namespace): private mounts (fresh tmpfs on /tmp, /var/tmp, /dev/shm; the
        interpreter re-exposed read-only if it lives under a directory others cannot enter, e.g. /root), fresh
        /proc, rlimits, setgroups([]) + setgid + setuid to a random unprivileged uid, no_new_privs,
        parent-death SIGKILL, cwd = an empty directory it owns; then `exec` of the program in this interpreter.

Why each layer:
- Own session/process group and a wall timeout that `killpg`s it; the pid namespace makes the kernel kill every
  descendant (also ones that called setsid) when the inner process dies, and the inner gets SIGKILL when the
  outer dies (PR_SET_PDEATHSIG), so nothing outlives a run. Without a pid namespace the outer kills every process
  of the run's uid (`kill(-1)` as that uid) after the run.
- A random uid per run (not shared `nobody`): RLIMIT_NPROC, which does not bind root, then bounds a fork bomb per
  run, runs cannot signal each other, and the program owns no file outside its directory.
- The environment is built from scratch (PATH, LANG, HOME, TMPDIR): no credentials are ever passed. The harness
  process is in another pid namespace (invisible) and another uid (its /proc/<pid>/environ is unreadable).
- A network namespace with only a down loopback: every connect() fails.

Why success cannot be forged (assert mode: MBPP / HumanEval): the harness draws a fresh random nonce per run and
puts it in a pipe; the outer launcher reads and closes the pipe before any untrusted code exists, so the nonce is
in no file, argv, environment or fd the program can reach (its source file is also root-only and hidden by the
private /tmp). After `exec(program + tests)` returns normally, the launcher (holding its own references to
os.write) writes the nonce to a result fd. A pass needs exit status 0 AND that exact nonce:
- os._exit(0) / killing itself before the asserts: status 0 or a signal, but no nonce -> failure.
- sys.exit(0), SystemExit raised in a finally: the launcher catches SystemExit; in assert mode that means the
  tests did not all run -> failure (no nonce written).
- killing its parent: the outer launcher runs as root in another pid namespace (EPERM / not visible); if it died
  anyway the run has no nonce -> failure. The harness itself is never the program's parent.
- printing a fake success marker: success is not read from stdout, and the nonce is unknown to the program.
What this does not stop: code that deliberately walks the interpreter's own memory (gc, frames, ctypes) to find
the nonce while it runs in the same process, or that returns objects whose __eq__ is always True. Those are
attacks on the benchmark, not escapes from the sandbox; nothing that shares an interpreter with the tests can
rule them out.

In io mode (CodeContests) the program's stdout is the proof: a run is "ok" when it exits with status 0 (also via
sys.exit(0)), and the caller compares the output with the expected one.
"""

from __future__ import annotations

import contextlib
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
    passed: bool  # assert mode: ran to the end with the nonce; io mode: exited 0 (the caller checks output)
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    detail: str = ""
    isolation: dict = field(default_factory=dict)  # which layers held: net, pid, mount, user


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

    mode "assert": passes only when the whole source runs to its end (proof: the per-run nonce).
    mode "io": stdin is fed from `stdin`; status "ok" when it exits 0; the caller compares `stdout`.
    """
    if mode not in ("assert", "io"):
        raise ValueError(f"run_program: mode must be 'assert' or 'io', got {mode!r}")
    run_dir = tempfile.mkdtemp(prefix="wmtp-sbx-")
    is_root = os.geteuid() == 0
    uid = 100_000 + secrets.randbelow(1 << 30) if is_root else os.geteuid()
    nonce = secrets.token_hex(16)
    try:
        src_path = os.path.join(run_dir, "program.py")
        with open(os.open(src_path, os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="utf-8") as f:
            f.write(source)
        in_path = os.path.join(run_dir, "stdin")
        with open(in_path, "w", encoding="utf-8") as f:
            f.write(stdin)
        workdir = os.path.join(run_dir, "work")  # used only where no private /tmp could be mounted
        os.mkdir(workdir, 0o700)
        if is_root:
            os.chown(workdir, uid, uid)
            os.chmod(run_dir, 0o711)  # the user may enter (to reach work/), not list or read
        fds = {
            n: os.open(os.path.join(run_dir, n), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            for n in ("status", "result")
        }
        out_fd = os.open(os.path.join(run_dir, "stdout"), os.O_WRONLY | os.O_CREAT, 0o600)
        err_fd = os.open(os.path.join(run_dir, "stderr"), os.O_WRONLY | os.O_CREAT, 0o600)
        in_fd = os.open(in_path, os.O_RDONLY)
        nonce_r, nonce_w = os.pipe()
        os.write(nonce_w, nonce.encode())
        os.close(nonce_w)
        interp = _interpreter()
        cfg = {
            "src": src_path,
            "mode": mode,
            "uid": uid if is_root else "",
            "cpu_s": int(timeout) + 1,
            "mem_mb": memory_mb,
            "fsize_mb": fsize_mb,
            "nproc": nproc,
            "nofile": nofile,
            "tmpfs_mb": tmpfs_mb,
            "workdir": workdir,
            "prefix": sys.base_prefix,
            "closed": _closed_ancestor(sys.base_prefix) if is_root else "",
            "nonce_fd": nonce_r,
            "status_fd": fds["status"],
            "result_fd": fds["result"],
        }
        t0 = time.monotonic()
        timed_out = False
        try:
            proc = subprocess.Popen(
                [interp, "-I", "-S", "-c", _LAUNCHER, *(f"{k}={v}" for k, v in cfg.items())],
                stdin=in_fd,
                stdout=out_fd,
                stderr=err_fd,
                pass_fds=(nonce_r, fds["status"], fds["result"]),
                start_new_session=True,
                env=_minimal_env(),
                cwd=run_dir,
            )
        finally:
            for fd in (nonce_r, in_fd, out_fd, err_fd, *fds.values()):
                os.close(fd)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _killpg(proc.pid)
            proc.wait()
        wall = time.monotonic() - t0
        read = lambda n: _read(os.path.join(run_dir, n), max_output_bytes)  # noqa: E731
        return _classify(
            mode,
            nonce,
            proc.returncode,
            timed_out,
            wall,
            read("stdout"),
            read("stderr"),
            read("status"),
            read("result"),
        )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


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
) -> RunResult:
    """Turn what the launcher reported into a verdict. Only the status fd (never held by the program) and the nonce
    are trusted; the program's own exception report on the result fd is used for the failure kind only."""
    iso, fate = {}, ""
    for line in status.splitlines():
        key, _, val = line.partition(" ")
        if key == "iso" and not iso:
            iso = {k: v == "1" for k, v in (kv.split("=") for kv in val.split())}
        elif key in ("exit", "signal", "setup") and not fate:
            fate = line
    if fate.startswith("setup"):
        raise SandboxError(f"sandbox setup failed: {fate[6:]}")
    proven = any(line == f"nonce {nonce}" for line in result.splitlines())
    report = next((ln for ln in result.splitlines() if ln.startswith(("exc ", "exit ", "syntax"))), "")
    mk = lambda status, detail="": RunResult(  # noqa: E731
        status, status == "ok", rc, out, err, wall, detail, iso
    )
    if timed_out:
        return mk("timeout", f"wall time over the limit ({wall:.1f} s)")
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
    if rc == 0 and (proven or mode == "io"):
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
        if name in ("RecursionError",):
            return mk("runtime_error", name)
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


# --------------------------------------------------------------------------- the launcher
# Everything between the two marker lines runs as `python -I -S -c <this text> key=value ...` in the sandboxed
# process: self-contained, stdlib only, and importing as little as possible (start-up time is most of a run).
# >>> launcher
import os  # noqa: E402, F811, I001  (again: this part also runs on its own)
import signal  # noqa: E402, F811
import sys  # noqa: E402, F811

_SETUP_FAILED = 121  # the launcher's exit code when it could not build the sandbox


CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _sys(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _unshare(libc) -> dict:
    """Enter new mount/pid/net namespaces, each separately so a refusal of one keeps the others."""
    iso = {}
    for name, flag in (("mount", CLONE_NEWNS), ("pid", CLONE_NEWPID), ("net", CLONE_NEWNET)):
        iso[name] = libc.unshare(flag) == 0
    return iso


def _mounts(libc, cfg: dict, iso: dict, uid: int | None) -> str:
    """Private /tmp, /var/tmp, /dev/shm; the interpreter re-exposed when it sits under a closed dir; fresh /proc.
    Returns the working directory."""
    m = lambda src, dst, fs, flags, data=None: _sys(  # noqa: E731
        libc.mount(src and src.encode(), dst.encode(), fs and fs.encode(), flags, data and data.encode()),
        f"mount {dst}",
    )
    m(None, "/", None, MS_REC | MS_PRIVATE)
    prefix = cfg["prefix"]
    pfd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
    before = os.fstat(pfd)
    size = f"size={cfg['tmpfs_mb']}m"
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            m("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,{size}")
    if cfg["closed"]:
        m("tmpfs", cfg["closed"], "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    try:
        st = os.stat(prefix)
        same = (st.st_dev, st.st_ino) == (before.st_dev, before.st_ino)
    except OSError:
        same = False
    if not same:
        os.makedirs(prefix, 0o755, exist_ok=True)
        m(f"/proc/self/fd/{pfd}", prefix, None, MS_BIND | MS_REC)
        m(None, prefix, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.close(pfd)
    if iso["pid"]:
        m("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    work = "/tmp/sandbox"
    os.mkdir(work, 0o700)
    if uid is not None:
        os.chown(work, uid, uid)
    return work


def _limits(cfg: dict) -> None:
    import resource as r

    mb = 1 << 20
    for lim, val in (
        (r.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)),
        (r.RLIMIT_AS, (cfg["mem_mb"] * mb,) * 2),
        (r.RLIMIT_FSIZE, (cfg["fsize_mb"] * mb,) * 2),
        (r.RLIMIT_NOFILE, (cfg["nofile"],) * 2),
        (r.RLIMIT_NPROC, (cfg["nproc"],) * 2),
        (r.RLIMIT_CORE, (0, 0)),
    ):
        r.setrlimit(lim, val)


def _inner(cfg: dict, iso: dict, source: str, nonce: str, libc) -> None:
    """Pid 1 of the run: build the jail, drop to the run's uid, then run the program. Never returns."""
    import builtins
    import traceback

    status_fd, result_fd, uid = cfg["status_fd"], cfg["result_fd"], cfg["uid"]
    write = os.write
    try:
        os.umask(0o022)
        work = _mounts(libc, cfg, iso, uid) if iso["mount"] else cfg["workdir"]
        os.chdir(work)
        os.environ.update(HOME=work, TMPDIR=work)
        _limits(cfg)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _sys(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _sys(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # after setuid: it resets it
    except Exception as e:
        write(status_fd, f"setup {type(e).__name__}: {e}\n".encode())
        os._exit(_SETUP_FAILED)
    os.close(status_fd)  # from here on the program could write anything: it must not hold this fd
    os.set_inheritable(result_fd, False)
    try:
        code = compile(source, "program.py", "exec")
    except (SyntaxError, ValueError) as e:
        traceback.print_exc()
        write(result_fd, f"syntax {type(e).__name__}: {e}\n".encode())
        os._exit(1)
    builtins.exit = builtins.quit = sys.exit  # what `site` would add (-S skips it); programs call exit()
    sys.argv = ["program.py"]
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
        if "threading" in sys.modules:  # like interpreter shutdown: wait for non-daemon threads
            threading = sys.modules["threading"]
            for t in threading.enumerate():
                if t is not threading.main_thread() and not t.daemon:
                    t.join()
        sys.stdout.flush()
        sys.stderr.flush()
    except SystemExit as e:
        if cfg["mode"] == "io" and e.code in (None, 0):
            try:
                sys.stdout.flush()
            finally:
                os._exit(0)
        write(result_fd, f"exit {e.code!r}\n".encode())
        os._exit(e.code if isinstance(e.code, int) and 0 < e.code < 256 else 1)
    except BaseException as e:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
        errno = getattr(e, "errno", None)
        write(result_fd, f"exc {type(e).__name__} {errno if errno is not None else ''}\n".encode())
        os._exit(1)
    write(result_fd, f"nonce {nonce}\n".encode())
    os._exit(0)


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
    """The outer launcher: namespaces, fork, wait, report the child's fate on the status fd."""
    cfg: dict = dict(a.split("=", 1) for a in argv)
    for k in (
        "cpu_s",
        "mem_mb",
        "fsize_mb",
        "nproc",
        "nofile",
        "tmpfs_mb",
        "nonce_fd",
        "status_fd",
        "result_fd",
    ):
        cfg[k] = int(cfg[k])
    cfg["uid"] = int(cfg["uid"]) if cfg["uid"] else None
    libc = _libc()
    with open(cfg["src"], encoding="utf-8") as f:
        source = f.read()
    nonce = os.read(cfg["nonce_fd"], 64).decode()
    os.close(cfg["nonce_fd"])
    iso = _unshare(libc) if cfg["uid"] is not None else {"mount": False, "pid": False, "net": False}
    iso["user"] = cfg["uid"] is not None and (cfg["closed"] == "" or iso["mount"])
    if not iso["user"]:
        cfg["uid"] = None  # the interpreter would be unreachable for another uid: keep running as we are
    os.write(cfg["status_fd"], ("iso " + " ".join(f"{k}={int(v)}" for k, v in iso.items()) + "\n").encode())
    pid = os.fork()
    if pid == 0:
        _inner(cfg, iso, source, nonce, libc)
    os.close(cfg["result_fd"])
    _, st = os.waitpid(pid, 0)
    if cfg["uid"] is not None and not iso["pid"]:
        _sweep_uid(cfg["uid"])
    if os.WIFSIGNALED(st):
        os.write(cfg["status_fd"], f"signal {os.WTERMSIG(st)}\n".encode())
        os._exit(128 + os.WTERMSIG(st))
    code = os.WEXITSTATUS(st)
    if code != _SETUP_FAILED:
        os.write(cfg["status_fd"], f"exit {code}\n".encode())
    os._exit(code)


# <<< launcher
with open(__file__, encoding="utf-8") as _f:
    _LAUNCHER = (
        _f.read().split("# >>> launcher\n")[1].split("# <<< launcher\n")[0] + "_launch(sys.argv[1:])\n"
    )
