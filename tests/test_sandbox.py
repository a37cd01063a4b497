"""sandbox.py: verdicts, isolation layers, and hostile programs that must fail without harming the machine.

The isolation tests (@needs_root) need root and namespaces (uid drop, mount/pid/net namespaces), as on the dev
machines and in CI's privileged root container. Without them they skip locally, and FAIL when $CI is set: a CI that
cannot isolate would otherwise go green while judging ran unisolated.
"""

from __future__ import annotations

import functools
import glob
import json
import os
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


def test_fresh_private_cwd_deleted_afterwards():
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "wmtp-sbx-*")))
    src = "import os\nprint(os.getcwd(), sorted(os.listdir('.')), os.stat('.').st_uid == os.getuid())\nopen('f', 'w').write('x')"
    first = run(src, mode="io").stdout.split()
    second = run(src, mode="io").stdout.split()
    assert first[1:] == ["[]", "True"] and second[1:] == [
        "[]",
        "True",
    ]  # empty each time, owned by the run's user
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "wmtp-sbx-*")))
    assert after <= before  # every run directory was removed


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
    assert int(uid) >= UID_FLOOR and uid == gid and groups.startswith("[]") and pid.strip() == "1"


def test_isolation_problem_names_what_is_missing():
    assert isolation_problem(0, {"mount": True, "pid": True, "net": True, "user": True}) == ""
    assert isolation_problem(0, {"mount": False, "pid": True, "net": False, "user": True}).startswith(
        "the OS refused isolation layer(s) mount, net to root"
    )
    assert "uid 1000, not root" in isolation_problem(1000, {})


ONE_MBPP = {"task_id": 1, "text": "", "code": "", "test_list": ["assert f() == 1"], "test_setup_code": ""}
JUDGE_ONE = f"""import json, evaluate
m = evaluate.judge("mbpp", {{1: {ONE_MBPP!r}}}, {{1: ["def f():\\n    return 1"]}}, workers=1)
print(json.dumps([m["pass@1"], m["network_isolated"], m["isolation"]]))
"""


@needs_root
def test_without_root_isolation_tests_skip_locally_fail_on_ci_and_metrics_say_so():
    """As uid 65534 (a new user namespace with no uid map: `unshare --user`; files stay readable), the isolation
    tests skip without $CI and fail with it, and the judge's metrics report every layer missing."""
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
    assert json.loads(judged.splitlines()[-1]) == [1.0, False, missing]
    m = evaluate.judge("mbpp", {1: ONE_MBPP}, {1: ["def f():\n    return 1"]}, workers=1)  # here, as root
    assert [m["pass@1"], m["network_isolated"], m["isolation"]] == [1.0, True, dict.fromkeys(missing, True)]


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
        f'/proc/{{d}}/environ' for d in os.listdir('/proc') if d.isdigit()]:
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
