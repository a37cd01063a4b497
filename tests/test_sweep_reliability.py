"""Sweeps under stress (issue 20), with real sweep processes on tiny synthetic runs: two sweeps on one out_dir, a
sweep killed with -9 whose trainer lives on, credentials in a sweep file (and MLflow's own "View run" line),
seeds that replicate nothing, and one-line errors for bad sweep files, corrupt state files and a bad `parallel`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import config as C
import files
import grids
import sweep
import tracking
from config import REPO
from tests.test_sweep import ENV, run_sweep, write_sweep

SECRET = "hunter2-PW-9f3"  # a password in the sweep file's URLs: it must never reach a file, a log or stdout
LONG = '[[grid]]\nname = "arms"\narm = ["uniform"]\n"train.steps" = [100000]'


def _sweep(*args: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "sweep.py", *args],
        cwd=REPO,
        env=ENV,
        stdout=open(out, "w"),  # noqa: SIM115 (the child holds it)
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(cond, what: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the sweep exited (code {proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_one_sweep_per_out_dir_and_a_live_trainer_is_adopted(tmp_path, tiny_dir):
    """A second sweep on a busy out_dir stops with one line naming the first. After `kill -9` of the first, its
    trainer (own session) goes on training; the next sweep neither deletes its directory nor starts a second
    trainer there: it adopts it, and on SIGTERM stops it at a checkpoint like its own runs (exit 75)."""
    path = write_sweep(tmp_path, tiny_dir, LONG)
    run = tmp_path / "runs" / "uniform--train.steps=100000--s0"
    log = tmp_path / "runs" / "logs" / f"{run.name}.log"
    first = _sweep(str(path), "--seeds", "0", out=tmp_path / "first.out")
    third = None
    try:
        _wait(lambda: log.is_file() and re.search(r"step +2/", log.read_text()), "training", first)
        second = run_sweep(str(path), "--seeds", "0")
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert f"is in use by another sweep (host {os.uname().nodename}, pid {first.pid}," in second.stderr
        assert "sweep: start" not in second.stdout

        trainer = json.loads((run / ".lock").read_text())["pid"]
        first.kill()  # kill -9: no cleanup; the trainer runs in its own session and goes on
        first.wait()
        assert files.lock_holder(run)["pid"] == trainer
        before = len(_steps(run))
        third = _sweep(str(path), "--seeds", "0", out=tmp_path / "third.out")
        _wait(lambda: "sweep: adopt" in (tmp_path / "third.out").read_text(), "the adoption", third)
        _wait(lambda: len(_steps(run)) > before + 2, "more steps of the adopted trainer", third)
        third.terminate()
        assert third.wait(timeout=120) == 75, (tmp_path / "third.out").read_text()[-3000:]
        assert files.lock_holder(run) is None  # the adopted trainer was stopped with the sweep
    finally:
        for p in (first, third):
            if p is not None and p.poll() is None:
                p.kill()
        holder = files.lock_holder(run)
        if holder:
            os.killpg(holder["pid"], 9)
    text = log.read_text()
    assert text.count("\n=== ") == 1, text  # one trainer ever started for this run
    assert "checkpoint committed" in text
    steps = _steps(run)
    assert steps == sorted(set(steps)) and len(steps) > 4  # one writer: no step twice, none out of order


@pytest.fixture(scope="module")
def secret_sweep(tmp_path_factory, tiny_dir, mlflow_server):
    """A 2-run sweep whose [set] holds a tracking URI and an S3 endpoint with passwords, tracked on a real MLflow
    server; its seed key (critic.pretrain_steps) changes nothing for a uniform run."""
    tmp = tmp_path_factory.mktemp("secret")
    body = '[[grid]]\nname = "arms"\narm = ["uniform"]\nseed_keys = ["critic.pretrain_steps"]'
    path = write_sweep(tmp, tiny_dir, body)
    host = str(mlflow_server).split("://", 1)[1]
    text = path.read_text().replace(
        f'"tracking.uri" = "sqlite:///{tmp / "mlflow.db"}"',
        f'"tracking.uri" = "http://admin:{SECRET}@{host}"\n'
        f'"storage.endpoint_url" = "http://minio:{SECRET}@127.0.0.1:9"',
    )
    assert SECRET in text
    path.write_text(text)
    p = run_sweep(str(path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp, path, p


def test_credentials_reach_runs_only_through_the_environment(secret_sweep, mlflow_server):
    from mlflow import MlflowClient

    tmp, path, p = secret_sweep
    assert SECRET not in p.stdout + p.stderr
    written = [f for f in tmp.rglob("*") if f.is_file() and f != path]
    assert len(written) > 20 and not [f for f in written if SECRET.encode() in f.read_bytes()]
    log = (tmp / "runs" / "logs" / "uniform--s0.log").read_text()
    assert '--storage.endpoint_url=""' in log and f'--tracking.uri="http://{host_of(mlflow_server)}"' in log
    assert "View run" in log  # MLflow's own line, printed by the run (scrubbed: the password is in no log)
    state = json.loads((tmp / "runs" / "sweep.json").read_text())
    artifact = MlflowClient(str(mlflow_server)).download_artifacts(
        state["parent_run"], "reports/sweep.toml", str(tmp.parent / f"{tmp.name}-download")
    )
    toml = Path(artifact).read_text()
    assert SECRET not in toml and "http://***@" in toml
    sw = grids.load_sweep(path)
    runs: dict = {}
    grids.expand(sw, sw.grids[0], {}, runs)
    assert runs["uniform--s0"].env == {
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": SECRET,
        "AWS_ENDPOINT_URL": f"http://minio:{SECRET}@127.0.0.1:9",
    }


def host_of(url: str) -> str:
    return str(url).split("://", 1)[1]


def test_view_run_line_is_scrubbed(mlflow_server, capsys):
    """train.py's tracker with a tracking URI holding a password: MLflow prints `View run ... at: <URI>`."""
    cfg = C.Config()
    cfg.tracking.uri = f"http://admin:{SECRET}@{host_of(mlflow_server)}"
    tracker = tracking.Tracker(cfg)
    assert tracker.start(run_name="scrubbed")
    tracker.finish()
    out = capsys.readouterr()
    assert "View run scrubbed at: http://***@" in out.out and SECRET not in out.out + out.err


def test_seeds_that_replicate_nothing_are_reported(secret_sweep):
    """Seeds 0 and 1 of a key the runs do not use: identical results. The sweep says so loudly, the report gives
    the row no interval and its conclusion no verdict; two seeds resolving to one config are refused outright."""
    tmp, path, p = secret_sweep
    assert "its seeds gave identical results, so they replicate nothing" in p.stderr
    md = (tmp / "runs" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| uniform |"))
    assert row.startswith("| uniform | 2 | ") and "(seeds identical)" in row and "±" not in row
    assert (
        "Rows whose seeds gave identical results (they replicate nothing; no interval): **arm=uniform**" in md
    )

    sw = grids.load_sweep(path)
    sw.grids[0]["seed_keys"] = []
    with pytest.raises(
        sweep.SweepError, match=r"seed 1 of uniform resolves to the same run as an earlier seed"
    ):
        grids.expand(sw, sw.grids[0], {}, {})


def _bad(tmp: Path, tiny: Path, body: str, top: str = "") -> Path:
    path = write_sweep(tmp, tiny, body)
    if top:
        path.write_text(top + "\n" + path.read_text())
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("utf8", r"t.toml: not UTF-8 text \(byte 0xff at offset"),
        ("seeds", r"'seeds' must be a non-empty list of integers, e.g. \[0, 1, 2\]; got \['x'\]"),
        ("seed_keys", r"grid 1 \(g\): 'seed_keys' must be a list of dotted config keys.*got 'train.seed'"),
        ("parallel0", r"'parallel' must be an integer >= 1 \(runs at once\), got 0"),
        ("parallel-1", r"--parallel: 'parallel' must be an integer >= 1 \(runs at once\), got -1"),
        ("dry-parallel-1", r"--parallel: 'parallel' must be an integer >= 1"),
        ("sweep.json", r"sweep.json: corrupt sweep state \(JSONDecodeError: .*\): delete it"),
        (
            "config.json",
            r"uniform--s0/config.json: corrupt run config \(JSONDecodeError: .*\): delete the run",
        ),
        ("summary.json", r"uniform--s0/summary.json: corrupt run summary \(JSONDecodeError"),
        ("report-summary.json", r"uniform--s0/summary.json: corrupt run summary \(JSONDecodeError"),
        ("ledger", r"runs.jsonl:2: not a ledger entry \(JSONDecodeError: .*\): repair or delete that line"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_dir, capsys, case, message):
    grid = '[[grid]]\nname = "g"\narm = ["uniform"]\n'
    path = write_sweep(tmp_path, tiny_dir, grid)
    args = [str(path), "--dry-run"]
    runs = tmp_path / "runs"
    if case == "utf8":
        path.write_bytes(path.read_bytes().replace(b'name = "t"', b'name = "t\xff"'))
    elif case == "seeds":
        path.write_text(path.read_text().replace("seeds = [0, 1]", 'seeds = ["x"]'))
    elif case == "seed_keys":
        path.write_text(path.read_text() + 'seed_keys = "train.seed"\n')
    elif case == "parallel0":
        path.write_text(path.read_text().replace("parallel = 2", "parallel = 0"))
    elif case.endswith("parallel-1"):
        args = [str(path), "--parallel", "-1"] + (["--dry-run"] if case.startswith("dry") else [])
    elif case == "sweep.json":
        runs.mkdir()
        (runs / "sweep.json").write_text('{"runs": {')
        args = [str(path)]
    elif case == "ledger":
        runs.mkdir()
        (runs / "runs.jsonl").write_text('{"run": "a", "config": "k", "metrics": {}}\n{"run": \n')
    else:  # a run directory holding the run's real config, then the file of the case damaged
        sw = grids.load_sweep(path)
        done: dict = {}
        grids.expand(sw, sw.grids[0], {}, done)
        run = done["uniform--s0"]
        d = runs / run.name
        d.mkdir(parents=True)
        cfg = grids.resolve(sw, run.base, run.overrides, run.name)
        (d / "config.json").write_text("{" if case == "config.json" else json.dumps(C.to_dict(cfg)))
        (d / "summary.json").write_text('{"steps": 3, ')
        if case.startswith("report"):
            args = [str(path), "--report"]
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(message, err), err
