"""sandbox.py: verdicts, isolation layers, and hostile programs that must fail without harming the machine.

The isolation tests (@needs_root) need root and namespaces (uid drop, mount/pid/net namespaces), as on the dev
machines and in CI's privileged root container. Without them they skip locally, and FAIL when $CI is set: a CI that
cannot isolate would otherwise go green while judging ran unisolated.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import evaluate
import sandbox
from config import REPO

UID_FLOOR = 100_000  # sandbox.run_program draws run uids above this


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def isolation_problem(euid: int, layers: dict[str, bool]) -> str:
    """Why the sandbox cannot isolate programs here ('' when every layer holds); `layers` as RunResult.isolation."""
    if euid != 0:
        return f"the tests run as uid {euid}, not root, so the sandbox has no namespaces and no uid drop"
    refused = [name for name, held in layers.items() if not held]
    if not refused:
        return ""
    return (
        f"the OS refused isolation layer(s) {', '.join(refused)} to root (a container without --privileged?)"
    )


@functools.cache
def _problem_here() -> str:
    euid = os.geteuid()
    return isolation_problem(euid, sandbox.run_program("pass").isolation if euid == 0 else {})


def needs_root(test):
    """Run `test` only where every isolation layer holds: skip elsewhere, fail on CI (saying why)."""

    @functools.wraps(test)
    def guarded(*args, **kwargs):
        problem = _problem_here()
        if problem and on_ci():
            pytest.fail(
                f"CI must run the sandbox isolation tests, but {problem}. Run the job as root with namespaces "
                "allowed (.github/workflows/ci.yml: a --privileged root container)",
                pytrace=False,
            )
        if problem:
            pytest.skip(f"isolation layers unavailable: {problem} (with $CI set this fails)")
        return test(*args, **kwargs)

    return guarded


def bound_here(memory_mb: int = 1024, nproc: int = 32) -> str:
    """RunResult.memory_bound on this machine: cgroup v2 where the harness found one, rlimits otherwise."""
    cgroup = bool(sandbox.cgroup_parent())
    return sandbox.memory_bound(cgroup, memory_mb, nproc if cgroup else min(nproc, sandbox.FALLBACK_TASKS))


def run(src: str, **kw) -> sandbox.RunResult:
    kw.setdefault("timeout", 10.0)
    return sandbox.run_program(src, **kw)


def sandbox_procs() -> list[int]:
    """Pids of live processes owned by a sandbox run uid."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            if os.stat(d).st_uid >= UID_FLOOR:
                pids.append(int(d[6:]))
        except OSError:
            pass
    return pids


# --------------------------------------------------------------------------- verdicts


def test_passing_program_is_ok_and_proven():
    r = run("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('done')")
    assert (r.status, r.passed, r.returncode, r.stdout) == ("ok", True, 0, "done\n")


@pytest.mark.parametrize(
    "src, kind",
    [
        ("assert 1 == 2", "wrong_answer"),
        ("def f(:\n  pass", "syntax"),
        ("raise ValueError('x')", "runtime_error"),
        ("import nonexistent_module_xyz", "runtime_error"),
        ("def f(n):\n    return f(n + 1)\nf(0)", "runtime_error"),
    ],
)
def test_failure_kinds(src, kind):
    r = run(src)
    assert not r.passed and r.status == kind, (r.status, r.detail, r.stderr[-300:])


def test_io_mode_stdin_stdout_exit_and_threads():
    assert run("print(int(input()) * 2)", stdin="21\n", mode="io").stdout == "42\n"
    r = run("print('a')\nexit()\nprint('b')", mode="io")  # `exit` exists although site is skipped
    assert (r.status, r.stdout) == ("ok", "a\n")
    r = run("import sys\nprint('a')\nsys.exit(3)", mode="io")
    assert r.status == "runtime_error" and r.returncode == 3
    src = "import threading, time\ndef main():\n    time.sleep(0.2)\n    print('late')\nthreading.Thread(target=main).start()"
    assert run(src, mode="io").stdout == "late\n"  # non-daemon threads finish before the run ends


def test_fresh_private_cwd_deleted_afterwards(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run directories go here (other jobs share /tmp)
    os.chmod(tmp_path, 0o711)  # a run uid may have to enter its directory (where no jail can be built)
    src = "import os\nprint(os.getcwd(), sorted(os.listdir('.')), os.stat('.').st_uid == os.getuid())\nopen('f', 'w').write('x')"
    first = run(src, mode="io").stdout.split()
    second = run(src, mode="io").stdout.split()
    assert first[1:] == ["[]", "True"] and second[1:] == [
        "[]",
        "True",
    ]  # empty each time, owned by the run's user
    assert os.listdir(tmp_path) == []  # every run directory was removed


def test_minimal_environment():
    r = run("import os\nprint(sorted(os.environ))", mode="io")
    assert r.stdout.strip() == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']"


def test_map_parallel_keeps_order():
    jobs = [{"source": f"print({i})", "mode": "io"} for i in range(6)]
    assert [r.stdout for r in sandbox.map_parallel(lambda j: sandbox.run_program(**j), jobs, workers=2)] == [
        f"{i}\n" for i in range(6)
    ]


@needs_root
def test_all_isolation_layers_hold_as_root():
    r = run("import os\nprint(os.getuid(), os.getgid(), os.getgroups(), os.getpid())", mode="io")
    uid, gid, groups, pid = r.stdout.split(maxsplit=3)
    assert r.isolation == {"mount": True, "pid": True, "net": True, "user": True}
    assert int(uid) >= UID_FLOOR and uid == gid and groups.startswith("[]")
    assert pid.strip() == "2"  # a new pid namespace, whose init (pid 1) is the supervisor


def test_isolation_problem_names_what_is_missing():
    assert isolation_problem(0, {"mount": True, "pid": True, "net": True, "user": True}) == ""
    assert isolation_problem(0, {"mount": False, "pid": True, "net": False, "user": True}).startswith(
        "the OS refused isolation layer(s) mount, net to root"
    )
    assert "uid 1000, not root" in isolation_problem(1000, {})


ONE_MBPP = {"task_id": 1, "text": "", "code": "", "test_list": ["assert f() == 1"], "test_setup_code": ""}
FORGE_FRAME = (  # issue 20: read the launcher's locals (main let this score a pass without defining anything)
    "import os, sys\nf = sys._getframe(1)\n"
    "os.write(f.f_locals['result_fd'], ('nonce ' + f.f_locals['nonce'] + '\\n').encode())\nos._exit(0)"
)
FORGE_CHANNEL = (  # connect to the supervisor's completion channel itself (its name is in sys.orig_argv)
    "import os, socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
    "s.connect('\\0' + sys.orig_argv[-1])\ns.sendall(b'done')\ns.close()\nos._exit(0)"
)
JUDGE_ONE = f"""import json, evaluate
completions = ["def f():\\n    return 1", {FORGE_FRAME!r}, {FORGE_CHANNEL!r}]
m = evaluate.judge("mbpp", {{1: {ONE_MBPP!r}}}, {{1: completions}}, workers=1)
print(json.dumps([m["pass@1"], m["network_isolated"], m["isolation"], m["memory_bound"]]))
"""


@needs_root
def test_without_root_isolation_tests_skip_locally_fail_on_ci_and_metrics_say_so():
    """As uid 65534 (a new user namespace with no uid map: `unshare --user`; files stay readable), the isolation
    tests skip without $CI and fail with it, the judge's metrics report every layer missing and the rlimits
    bound, and a pass still cannot be forged (the runner's audit hook does not need root)."""
    nobody = ["unshare", "--user", sys.executable]
    tests = [f"{__file__}::test_all_isolation_layers_hold_as_root", f"{__file__}::test_network_is_cut_off"]
    pytest_cmd = [*nobody, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--noconftest", *tests]
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # hypothesis' plugin alone costs seconds of start-up
    pipe = {"cwd": REPO, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = [
        subprocess.Popen(pytest_cmd, env=env, **pipe),
        subprocess.Popen(pytest_cmd, env={**env, "CI": "true"}, **pipe),
        subprocess.Popen([*nobody, "-c", JUDGE_ONE], env=env, **pipe),
    ]
    local, ci, judged = (p.communicate(timeout=120)[0] for p in procs)
    assert [p.returncode for p in procs] == [0, 1, 0], local + ci + judged
    assert (
        "2 skipped" in local and "isolation layers unavailable: the tests run as uid 65534, not root" in local
    )
    assert "2 failed" in ci
    assert ci.count("Failed: CI must run the sandbox isolation tests, but the tests run as uid 65534") == 2
    missing = {"net": False, "pid": False, "mount": False, "user": False}
    bound = sandbox.memory_bound(
        False, 1024, 32, root=False
    )  # RLIMIT_NPROC counts the user's tasks: not lowered
    pass_at_1, *rest = json.loads(judged.splitlines()[-1])
    assert pass_at_1 == pytest.approx(1 / 3) and rest == [
        False,
        missing,
        bound,
    ]  # only the real solution passes
    m = evaluate.judge("mbpp", {1: ONE_MBPP}, {1: ["def f():\n    return 1"]}, workers=1)  # here, as root
    assert [m["pass@1"], m["network_isolated"], m["isolation"]] == [1.0, True, dict.fromkeys(missing, True)]
    assert m["memory_bound"] == bound_here()


# --------------------------------------------------------------------------- hostile programs


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run("while True:\n    pass", timeout=1.5)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t0 < 8


@needs_root
def test_fork_bomb_is_bounded_and_cleaned():
    src = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)"
    deadline = time.monotonic() + 10  # let stragglers of earlier sandbox runs exit
    while sandbox_procs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_procs()
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], len(sandbox_procs()))
            time.sleep(0.05)

    w = threading.Thread(target=watch)
    w.start()
    try:
        r = run(src, timeout=3, nproc=16)
    finally:
        done.set()
        w.join()
    assert not r.passed and r.status == "timeout"
    assert 2 <= peak[0] <= 16, peak[0]  # it did fork, and no more than RLIMIT_NPROC processes existed
    deadline = time.monotonic() + 5
    while sandbox_procs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_procs()  # everything is gone


def test_memory_hog_fails_with_memory():
    r = run("x = []\nwhile True:\n    x.append(bytearray(50 << 20))", memory_mb=512)
    assert not r.passed and r.status == "memory", (r.status, r.detail)


def test_huge_file_write_is_stopped():
    src = "f = open('big', 'wb')\nchunk = b'x' * (1 << 20)\nfor _ in range(1000):\n    f.write(chunk)\nf.close()"
    free = os.statvfs(tempfile.gettempdir())
    r = run(src, fsize_mb=8)
    assert not r.passed and r.status == "sandbox_violation", (r.status, r.detail)
    after = os.statvfs(tempfile.gettempdir())
    assert (free.f_bavail - after.f_bavail) * after.f_frsize < 200 << 20  # no GB-sized leftovers


@needs_root
def test_cannot_delete_files_outside_its_directory(tmp_path):
    canaries = [tmp_path / "canary.txt"]
    outside = REPO / ".cache" / f"sbx-canary-{secrets.token_hex(4)}"  # outside /tmp, in a world-readable dir
    outside.mkdir(parents=True, mode=0o755)
    os.chmod(outside, 0o755)
    canaries.append(outside / "canary.txt")
    try:
        for c in canaries:
            c.write_text("alive")
            os.chmod(c, 0o666)  # even writable by all: only ownership of the directory protects it
        # the hostile program tries rmtree on the parent, then insists on removing the file itself: whether the
        # file is protected (permission) or not even visible (a fresh /tmp), the removal raises and the run fails
        src = "import os, shutil\n" + "".join(
            f"shutil.rmtree({str(c.parent)!r}, ignore_errors=True)\nos.remove({str(c)!r})\n" for c in canaries
        )
        r = run(src)
        assert not r.passed and r.status in ("runtime_error", "sandbox_violation"), r
        assert all(c.read_text() == "alive" for c in canaries)
    finally:
        for c in canaries:
            c.unlink(missing_ok=True)
        outside.rmdir()


@needs_root
def test_parent_secrets_are_invisible(monkeypatch):
    secret = "fake-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    src = f"""
import os
print(dict(os.environ))
for p in ['/proc/{os.getpid()}/environ', '/proc/self/environ', '/proc/1/environ'] + [
        f'/proc/{{d}}/environ' for d in (os.listdir('/proc') if os.path.isdir('/proc') else []) if d.isdigit()]:
    try:
        print(p, open(p, 'rb').read())
    except OSError as e:
        print(p, e)
for d in ['/root', os.path.expanduser('~'), '/proc/{os.getppid()}']:
    try:
        print(d, os.listdir(d))
    except OSError as e:
        print(d, e)
"""
    r = run(src, mode="io")
    assert r.status == "ok" and "/proc/self/environ" in r.stdout  # it really looked
    assert secret not in r.stdout + r.stderr
    assert "AWS_" not in r.stdout and "MLFLOW_" not in r.stdout


@needs_root
def test_network_is_cut_off():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        src = (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')"
        )
        r = run(src)
        assert not r.passed and r.status == "sandbox_violation", (r.status, r.detail)
        assert r.isolation["net"]
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


TESTS = "\nassert add(1, 2) == 4\n"  # the completion below is wrong: these asserts would fail


@pytest.mark.parametrize(
    "completion",
    [
        "import os\ndef add(a, b):\n    return a + b\nos._exit(0)",
        "import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)",
        "def add(a, b):\n    return a + b\ntry:\n    pass\nfinally:\n    raise SystemExit(0)",
        "def add(a, b):\n    try:\n        return a + b\n    finally:\n        raise SystemExit(0)",
        "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    return a + b",
    ],
    ids=["os_exit", "sys_exit", "systemexit_finally_module", "systemexit_finally_in_call", "atexit"],
)
def test_early_exit_never_passes(completion):
    r = run(completion + TESTS)
    assert not r.passed and r.status != "ok", (r.status, r.detail)


def test_killing_its_parent_fails_and_harness_survives():
    me = os.getpid()
    src = f"import os, signal\nfor p in (os.getppid(), {me}, 1, -1, 0):\n    try:\n        os.kill(p, signal.SIGKILL)\n    except OSError:\n        pass\nassert False"
    r = run(src)
    assert not r.passed and r.status != "ok"
    os.kill(me, 0)  # still here
    assert sandbox.run_program("x = 1").passed  # and the harness still works


def test_fake_success_marker_never_passes():
    src = (
        "import os, sys\n"
        "print('nonce ' + '0' * 32)\nprint('ok')\nprint('PASSED')\n"
        "for fd in range(3, 1024):\n"
        "    try:\n        os.write(fd, b'nonce ' + b'0' * 32 + b'\\nexit 0\\n')\n    except OSError:\n        pass\n"
        "sys.stdout.flush()\nos._exit(0)\nassert False"
    )
    r = run(src)
    assert not r.passed and r.status != "ok", (
        r.status,
        r.detail,
    )  # forged report lines can only change the kind


@needs_root
def test_the_program_sees_a_minimal_read_only_root():
    """No host file beyond the system's binaries and libraries (not the repo, the data, /etc, /proc, /run), all
    read-only, and one private writable /tmp that /dev/shm points into."""
    hidden = ["/proc/self", "/sys/kernel", "/run/lock", "/var/tmp", "/etc/passwd", "/root/.ssh"]
    hidden += [str(REPO), os.environ.get("WMTP_DATA_DIR", "/work/shared/data")]
    src = f"""import json, os
seen = {{d: sorted(os.listdir(d)) for d in ("/", "/etc", "/dev")}}
hidden = [p for p in {hidden!r} if os.path.exists(p)]
errnos = {{}}
for d in ("/", "/usr", "/etc", "/dev", "/usr/lib", "{sys.base_prefix}"):
    try:
        open(d + "/x", "w")
    except OSError as e:
        errnos[d] = e.errno
open("/tmp/x", "w").write("private")
open("/dev/shm/y", "w").write("private")
print(json.dumps([seen, hidden, errnos, sorted(os.listdir("/tmp"))]))
"""
    r = run(src, mode="io")
    assert r.status == "ok", r.stderr
    seen, hidden_seen, errnos, tmp = json.loads(r.stdout)
    system = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "tmp"}
    assert set(seen["/"]) <= system | {sys.base_prefix.split("/")[1]}, seen
    assert set(seen["/etc"]) <= {"ld.so.cache", "localtime"}
    assert seen["/dev"] == ["full", "null", "random", "shm", "urandom", "zero"]
    assert hidden_seen == []
    assert errnos == dict.fromkeys(["/", "/usr", "/etc", "/dev", "/usr/lib", sys.base_prefix], 30)  # EROFS
    assert tmp == ["sandbox", "x", "y"]


# --------------------------------------------------------------------------- hostile completions, end to end
# Issue 20, item 3: each escape as the completion a model could emit, judged by `evaluate.py judge` as a user
# runs it; the host is checked from outside, during and after the run.

TAG = secrets.token_hex(4)
HOST_DIRS = ("/run/lock", "/dev/shm", "/var/tmp", "/tmp")
FILL_HOST = f"""
import os
for d in {HOST_DIRS!r}:
    try:
        with open(d + "/wmtp-{TAG}-big", "wb") as f:
            f.write(b"x" * (60 << 20))
    except OSError:
        pass
    for i in range(2000):
        try:
            open(d + "/wmtp-{TAG}-%d" % i, "w").close()
        except OSError:
            break
"""
HOG_MB = 300
HOG = f"""
import os, time
kids = []
for _ in range(7):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        try:
            x = b"x" * ({HOG_MB} << 20)
            time.sleep(2)
        finally:
            os._exit(0)
    kids.append(pid)
try:
    x = b"x" * ({HOG_MB} << 20)
except MemoryError:
    pass
time.sleep(2)
for pid in kids:
    os.waitpid(pid, 0)
"""
SOCKET_PATHS = [f"{d}/wmtp-{TAG}.sock" for d in HOST_DIRS]
KNOCK = f"""
import socket
for path in {SOCKET_PATHS!r} + ["\\0wmtp-{TAG}"]:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(path)
        s.sendall(b"escaped")
        s.close()
    except OSError:
        pass
"""
FORGERIES = {  # MBPP task 11 completions that define nothing useful and try to be scored as a pass anyway
    "frame_locals": FORGE_FRAME,
    "channel": FORGE_CHANNEL,
    "channel_from_a_thread": (
        "import os, socket, sys, threading\ndef go():\n    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect('\\0' + sys.orig_argv[-1])\n    s.sendall(b'done')\n"
        "t = threading.Thread(target=go)\nt.start()\nt.join()\nos._exit(0)"
    ),
    "channel_from_a_signal_handler": (
        "import os, signal, socket, sys\ndef go(n, frame):\n    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect('\\0' + sys.orig_argv[-1])\n    s.sendall(b'done')\n    os._exit(0)\n"
        "signal.signal(signal.SIGUSR1, go)\nos.kill(os.getpid(), signal.SIGUSR1)"
    ),
    "channel_from_a_new_image": (
        'import os, sys\nc = "import socket, sys; s = socket.socket(socket.AF_UNIX); '
        "s.connect(chr(0) + sys.argv[1]); s.sendall(b'done')\"\n"
        "os.execv(sys.executable, [sys.executable, '-c', c, sys.orig_argv[-1]])"
    ),
    "trace_jump_over_the_asserts": (
        "import sys\ndef t(frame, event, arg):\n    if event == 'line' and frame.f_code.co_filename == 'program.py':\n"
        "        frame.f_lineno = 12\n    return t\nsys.settrace(t)\nsys._getframe().f_trace = t\n"
        "\n\n\n\n\npass"
    ),
    "rebind_the_hook": (
        "import gc, sys\nme = sys._getframe()\n"
        "for f in gc.get_objects():\n    if getattr(f, '__name__', '') == 'hook':\n"
        "        f.__closure__[-1].cell_contents = me"
    ),
    "ctypes": "import ctypes\nctypes.memmove(0, 0, 1)",
    "subinterpreter": "import _xxsubinterpreters as i\ni.run_string(i.create(), 'pass')",
    "replace_the_runner": (
        "import sys\nmain = sys.modules['__main__']\nmain._report = lambda *a: None\n"
        "main._end_like_the_interpreter = lambda: None\nraise SystemExit(0)"
    ),
    "proof_lines_on_every_fd": (
        "import os\nfor fd in range(64):\n    try:\n"
        "        os.write(fd, b'proof ' + b'0' * 32 + b'\\nexit 0\\nnonce ' + b'0' * 32 + b'\\n')\n"
        "    except OSError:\n        pass\nos._exit(0)"
    ),
}


def _host_leftovers() -> list[str]:
    return [p for d in HOST_DIRS for p in glob.glob(f"{d}/wmtp-{TAG}-*")]


def _watch_run_uids(peaks: dict[int, list[int]], done: threading.Event) -> None:
    """Per sandbox run uid, the most processes and the most private resident memory (MB) seen at once."""
    page = os.sysconf("SC_PAGE_SIZE")
    while not done.is_set():
        now: dict[int, list[int]] = {}
        for d in glob.glob("/proc/[0-9]*"):
            try:
                uid = os.stat(d).st_uid
                if uid < UID_FLOOR:
                    continue
                with open(d + "/statm") as f:
                    _, resident, shared = (int(x) for x in f.read().split()[:3])
            except (OSError, ValueError):
                continue
            n = now.setdefault(uid, [0, 0])
            n[0] += 1
            n[1] += (resident - shared) * page >> 20
        for uid, (procs, mb) in now.items():
            p = peaks.setdefault(uid, [0, 0])
            p[0], p[1] = max(p[0], procs), max(p[1], mb)
        time.sleep(0.02)


def _judge_cli(tmp: str, dataset: str, task, completions: list[str]) -> dict:
    pred, out = os.path.join(tmp, f"{dataset}.jsonl"), os.path.join(tmp, f"{dataset}.json")
    with open(pred, "w") as f:
        f.write(json.dumps({"task_id": task, "completions": completions}) + "\n")
    cmd = [sys.executable, str(REPO / "evaluate.py"), "judge", "--dataset", dataset, "--predictions", pred]
    r = subprocess.run([*cmd, "--out", out, "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Judge every hostile completion once (two CLI runs: MBPP in assert mode, CodeContests in io mode, where
    no audit hook runs and only the OS layers stand), with host sockets listening and run uids watched."""
    if _problem_here():
        pytest.skip("needs every isolation layer (see needs_root)")
    tmp = str(tmp_path_factory.mktemp("hostile"))
    mbpp = evaluate.load_problems("mbpp", os.environ.get("WMTP_DATA_DIR", "/work/shared/data"))
    cc = evaluate.load_problems("codecontests", os.environ.get("WMTP_DATA_DIR", "/work/shared/data"))
    listeners = []
    for path in [*SOCKET_PATHS, "\0wmtp-" + TAG]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        if not path.startswith("\0"):
            os.chmod(path, 0o777)  # anyone who can reach it may connect
        s.listen(8)
        listeners.append(s)
    peaks: dict[int, list[int]] = {}
    done = threading.Event()
    watcher = threading.Thread(target=_watch_run_uids, args=(peaks, done))
    watcher.start()
    try:
        ref = mbpp[11]["code"]
        completions = [ref, ref + FILL_HOST, ref + HOG, *FORGERIES.values()]
        m = _judge_cli(tmp, "mbpp", 11, completions)
        done.set()
        watcher.join()
        cc_m = _judge_cli(tmp, "codecontests", next(iter(cc)), [KNOCK])
        knocked = []
        for s in listeners:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                conn, _ = s.accept()
                conn.settimeout(1)
                knocked.append((s.getsockname(), conn.recv(16)))
        yield {
            "mbpp": m,
            "codecontests": cc_m,
            "peaks": peaks,
            "knocked": knocked,
            "leftovers": _host_leftovers(),
        }
    finally:
        done.set()
        for s in listeners:
            s.close()
        for p in [*_host_leftovers(), *SOCKET_PATHS]:
            with contextlib.suppress(OSError):
                os.remove(p)


def test_hostile_files_never_reach_the_host(hostile):
    """Item 3a: 60 MB files and thousands of small ones in /run/lock, /dev/shm, /var/tmp, /tmp stayed on the host."""
    assert hostile["leftovers"] == []
    assert 1 not in [f["sample"] for f in hostile["mbpp"]["problems"]["11"]["failures"]]  # it ran to its end


def test_host_unix_sockets_are_unreachable(hostile):
    """Item 3b: a filesystem socket in /run/lock accepted a connection from inside the network namespace."""
    assert hostile["knocked"] == []
    assert hostile["codecontests"]["failure_kinds"] == {"wrong_answer": 1}  # it ran (and printed nothing)


def test_the_whole_program_memory_is_bounded(hostile):
    """Item 3c: parent + 7 forks each touching 300 MB; the program as a whole stays within the bound in force,
    which metrics.json states."""
    stated = hostile["mbpp"]["memory_bound"]
    assert stated == bound_here()
    bound_mb = int(re.findall(r"(\d+) MB", stated)[-1])  # "... = 2048 MB for ..." or "memory.max 1024 MB"
    _, hog_mb = max(hostile["peaks"].values(), key=lambda p: p[1])
    assert hog_mb >= HOG_MB - 10, hostile["peaks"]  # the watcher saw the hog
    assert hog_mb <= bound_mb, (hog_mb, stated)
    if stated.startswith("rlimits"):
        assert max(p[0] for p in hostile["peaks"].values()) <= sandbox.FALLBACK_TASKS


def test_success_cannot_be_forged(hostile):
    """Item 3d: a completion that defines nothing cannot make the judge count a pass, however it tries."""
    p = hostile["mbpp"]["problems"]["11"]
    failed = {f["sample"]: f["kind"] for f in p["failures"]}
    forged = {name: 3 + i for i, name in enumerate(FORGERIES)}
    assert {name: failed.get(i, "PASSED") != "PASSED" for name, i in forged.items()} == dict.fromkeys(
        forged, True
    )
    assert 0 not in failed  # the reference, judged in the same run, passes


def test_a_bad_explicit_cgroup_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("WMTP_SANDBOX_CGROUP", str(tmp_path))  # a directory, but no cgroup
    with pytest.raises(
        sandbox.SandboxError, match=f"WMTP_SANDBOX_CGROUP={tmp_path}: not a cgroup v2 directory"
    ):
        sandbox.cgroup_parent.__wrapped__()


@needs_root
def test_a_cgroup_bounds_the_program_as_a_whole():
    """Where cgroup v2 gives us the memory controller (checked on a cgroup v2 host with WMTP_SANDBOX_CGROUP), 8
    processes of 300 MB each are OOM-killed together at memory.max, and 4 of 200 MB fit under it."""
    if not sandbox.cgroup_parent():
        pytest.skip(
            "no cgroup v2 memory controller for us here: rlimits bound memory (see test_the_whole_program...)"
        )
    hog = HOG.replace("time.sleep(2)", "time.sleep(0.5)")
    r = run(hog, timeout=20)
    assert (r.status, r.detail) == ("memory", "the cgroup's memory.max was reached (OOM kill)")
    r = run(hog.replace("range(7)", "range(3)").replace(f"{HOG_MB} <<", "200 <<"), timeout=20)
    assert r.status == "ok" and r.memory_bound == bound_here(), (r.status, r.detail, r.stderr[-300:])
