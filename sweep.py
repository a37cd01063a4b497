"""Sweeps: a grid of train.py runs that survives interruption and sessions, grouped in MLflow, with a report.

    python sweep.py configs/sweeps/synthetic.toml [--parallel N] [--launcher CMD] [--seeds 0,1,2,3] [--dry-run]
    python sweep.py configs/sweeps/synthetic.toml --report [--out DIR]   # rebuild report.md + plots/ from the
                                                      # ledger (and run directories); trains nothing
    python sweep.py --report OUT_DIR [--out DIR]      # the same for the sweep whose sweep.json is in OUT_DIR

The sweep file's format and its expansion into runs: grids.py. The ledger, the statistics and the report:
report.py. Here: running the grids in order (a pick_best bundle needs its source grid's results), launching
train.py `parallel` at a time, and the MLflow parent run.

A finished run (summary.json at its last step) is skipped; one with a checkpoint resumes (`--resume`); one without
restarts. A run directory whose config differs from the sweep's is an error, never silently reused.

Across sessions (run directories live under runs/, which git ignores, so a fresh checkout has none): each run is
recorded as it finishes in the ledger `<report_dir>/runs.jsonl` (report.py), committed with the report. A run
without a directory whose ledger entry matches its resolved config (grids.py: `Run.key`) is done and is not
trained again; a run whose config changed is trained again; a done run whose files a pending run reads (a
`{out_dir}/<run>/...` path in its overrides: rho1's reference, a fine-tuning start point) is trained again
first. To retrain a run after a code change, delete its line from the ledger.

One sweep per out_dir: a sweep holds `<out_dir>/.lock` while it runs; a second one stops with an error naming the
holder. Runs run in their own session, so a sweep killed with -9 leaves them training: a run directory whose run
lock is held is never deleted nor given a second trainer; the sweep adopts its trainer, waits for it to end
(stopping it on Ctrl-C / SIGTERM like its own runs), then continues the run if it is unfinished.

Credentials (`storage.endpoint_url`, the user:password of `tracking.uri`) reach the runs through the environment,
never argv; sweep.json, the logs, the ledger, the report and the MLflow artifacts are scrubbed.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config as C
import errors
import files
import report
import tracking
from errors import scrub
from grids import (
    GRID_KEYS,
    Row,
    Run,
    Sweep,
    canonical,
    check_parallel,
    credentials,
    expand,
    load_sweep,
    resolve,
    subst,
)
from report import SweepError, fmt_value


class Unfinished(SweepError):
    """A pick_best bundle's candidates have unfinished runs (the sweep runs them first; a report stops there)."""


# --------------------------------------------------------------------------- run state


def run_dir(sw: Sweep, name: str) -> Path:
    return sw.out_dir / name


def status(sw: Sweep, run: Run) -> str:
    """done (summary.json at the last step, or no directory and a ledger entry of this config) | resume (a
    checkpoint) | new. A directory holding a run with another config is an error: the sweep never mixes results
    of different configs under one name."""
    d = run_dir(sw, run.name)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        return "done" if sw.ledger.get(run.key) else "new"
    have = report.read_json(cfg_file, "run config", f"delete the run directory {d} to train it again")
    have = canonical(have) if isinstance(have, dict) else {}
    if have != run.config:
        diff = sorted(k for k in set(have) | set(run.config) if have.get(k) != run.config.get(k))
        raise SweepError(
            f"{d}: holds a run with another config than the sweep's (differs in {', '.join(diff[:6])}): "
            "delete that directory or give the sweep another out_dir"
        )
    summary = d / "summary.json"
    if summary.is_file():
        s = report.read_json(summary, "run summary", "delete it to continue the run from its checkpoint")
        if isinstance(s, dict) and s.get("steps") == run.steps:
            return "done"
    # here, not at the top: checkpoint.py imports torch, which the sweep itself never needs
    from checkpoint import find_resume

    return "resume" if find_resume(d / "checkpoints") is not None else "new"


def _named(sw: Sweep) -> set[str]:
    """The metrics a table or a pick of this sweep reads: what the ledger keeps of each summary."""
    return {sw.primary, *sw.metrics, *(m for g in sw.grids for m in g.get("metrics", []))}


def _entry(sw: Sweep, run: Run, state: dict) -> dict:
    """The run's ledger line, from its summary.json."""
    info = state["runs"].get(run.name, {})
    identity = {
        "run": run.name,
        "grid": run.grid,
        "values": run.values,
        "seed": run.seed,
        "config": run.key,
        "commit": info.get("commit", "unknown"),
        "seconds": round(info.get("seconds", 0.0), 1),
    }
    path = run_dir(sw, run.name) / "summary.json"
    summary = report.read_json(path, "run summary", "delete it to continue the run from its checkpoint")
    return report.ledger_entry(identity, summary if isinstance(summary, dict) else {}, _named(sw))


def results(sw: Sweep, runs: dict[str, Run], state: dict, save: bool = False) -> dict[str, dict]:
    """{run name: ledger entry} of the finished runs: the ledger's, and for a finished run directory that it
    lacks, an entry made from its summary.json (written into the ledger when `save`)."""
    out = {}
    for run in runs.values():
        entry = sw.ledger.get(run.key)
        if entry is None and (run_dir(sw, run.name) / "summary.json").is_file() and status(sw, run) == "done":
            entry = _entry(sw, run, state)
            if save:
                sw.ledger.record(entry)
        if entry is not None:
            out[run.name] = entry
    return out


def command(sw: Sweep, run: Run, launcher: str, parent: str | None, resume: bool) -> list[str]:
    exe = [sys.executable] if launcher == "python" else shlex.split(launcher)
    ov = {
        **run.overrides,
        "train.out_dir": str(sw.out_dir),
        "train.run_name": run.name,
        "tracking.experiment": f"sweep/{sw.name}",
        "tracking.tags": [f"{k}={v}" for k, v in run.tags.items()],
    }
    if parent:
        ov["tracking.parent_run"] = parent
    train = str(C.REPO / "train.py")  # run in the sweep's directory: relative paths mean the same to both
    return [*exe, train, run.base, *(f"--{k}={json.dumps(v)}" for k, v in ov.items())] + (
        ["--resume"] if resume else []
    )


def git_commit(ignore: Path | None = None) -> str:
    """HEAD, with "+dirty" when tracked files differ from it; `ignore` (the sweep's report_dir, where it writes the
    report and the ledger as it goes) does not count."""
    commit = tracking._git_commit()
    here = Path(ignore or ".").resolve()
    spec = ["--", ".", f":(exclude){here}"] if ignore and here.is_relative_to(C.REPO) else []
    try:
        cmd = ["git", "status", "--porcelain", "--untracked-files=no", *spec]
        dirty = subprocess.run(cmd, cwd=C.REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------- launching


@dataclass
class Job:
    """A trainer of one run: started by this sweep (`proc`), or adopted (`pid`: the holder of the run's lock, left
    training by an earlier sweep; it has ended when its lock is free)."""

    run: Run
    t0: float
    proc: subprocess.Popen | None = None
    log: Any = None
    pid: int | None = None

    def ended(self, sw: Sweep) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        return (
            files.lock_holder(run_dir(sw, self.run.name)) is None
        )  # the kernel frees it when the holder dies

    def signal(self, sig: int) -> None:
        """Signal the trainer's process group (torchrun and its workers), never this sweep's own group."""
        pid = self.proc.pid if self.proc is not None else self.pid
        try:
            group = os.getpgid(pid) if pid else None
            if group is not None and group != os.getpgrp():
                os.killpg(group, sig)
            elif pid:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _needs(sw: Sweep, run: Run, runs: dict[str, Run]) -> dict[str, list[Path]]:
    """The runs whose files this run reads ({out_dir}/<run>/... paths in its overrides) and those paths."""
    out: dict[str, list[Path]] = {}
    for v in (v for v in run.overrides.values() if isinstance(v, str)):
        for name in runs:
            d = str(run_dir(sw, name))
            if name != run.name and (v == d or v.startswith(d + "/")):
                out.setdefault(name, []).append(Path(v))
    return out


def _todo(sw: Sweep, runs: list[Run], everything: dict[str, Run]) -> list[tuple[Run, str]]:
    """What to launch: the runs not done, each after any done run whose files it needs and which are not here (a
    fresh checkout has the ledger, not the run directories): that one is trained again first."""
    out, queued = [], set()
    for run in runs:
        st = status(sw, run)
        if st == "done":
            continue
        for dep, paths in _needs(sw, run, everything).items():
            if dep in queued or all(p.exists() for p in paths):
                continue
            dst = status(sw, everything[dep])
            if dst == "done" and (run_dir(sw, dep) / "config.json").is_file():
                raise SweepError(
                    f"run {run.name} needs {paths[0]}, which is missing although run {dep} finished: delete "
                    f"{run_dir(sw, dep)} to train it again"
                )
            if dst == "done":
                print(
                    f"sweep: {dep} is done (ledger) but {run.name} needs its files: training it again",
                    flush=True,
                )
            out.append((everything[dep], "new" if dst == "done" else dst))
            queued.add(dep)
        if run.name not in queued:
            out.append((run, st))
            queued.add(run.name)
    return out


def _start(sw: Sweep, run: Run, st: str, how: dict, state: dict) -> Job:
    """Adopt the run's trainer if one still holds its run lock (left running by a sweep killed with -9), else
    launch train.py; a new run's leftover directory (whose lock no one holds) is removed first."""
    holder = files.lock_holder(run_dir(sw, run.name))
    if holder is not None:
        here = holder.get("host") == socket.gethostname()
        print(
            f"sweep: adopt {run.name}: its trainer (host {holder.get('host')}, pid {holder.get('pid')}), left "
            "running by an earlier sweep, holds its lock; waiting for it to end",
            flush=True,
        )
        return Job(run, time.time(), pid=holder.get("pid") if here else None)
    if st == "new" and run_dir(sw, run.name).exists():
        shutil.rmtree(run_dir(sw, run.name))  # crashed before its first checkpoint: start over
    _close_stale(sw, run, how["parent"])
    cmd = command(sw, run, how["launcher"], how["parent"], resume=st == "resume")
    log = open(sw.out_dir / "logs" / f"{run.name}.log", "a")  # noqa: SIM115 (closed when the run ends)
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {scrub(shlex.join(cmd))}\n")
    log.flush()
    env = {**how["env"], **run.env}
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"sweep: start {run.name} ({'resume' if st == 'resume' else 'new'})", flush=True)
    return Job(run, time.time(), proc=p, log=log)


def _ended(sw: Sweep, job: Job, state: dict) -> str:
    """Book a trainer that ended: its time, its status now, its ledger line when it finished."""
    if job.log is not None:
        job.log.close()
    entry = state["runs"].setdefault(job.run.name, {})
    entry["seconds"] = entry.get("seconds", 0.0) + time.time() - job.t0
    entry["commit"] = state["commit"] if job.proc is not None else entry.get("commit", "unknown")
    st = status(sw, job.run)
    if st == "done":
        sw.ledger.record(_entry(sw, job.run, state))
    _save_state(sw, state)
    return st


def _stop(sw: Sweep, active: list[Job]) -> None:
    """Ctrl-C / SIGTERM: every trainer (started or adopted) stops at a checkpoint; SIGKILL after 30 s."""
    for job in active:
        job.signal(signal.SIGTERM)
    deadline = time.time() + 30
    while time.time() < deadline and not all(job.ended(sw) for job in active):
        time.sleep(0.2)
    for job in active:
        if not job.ended(sw):
            job.signal(signal.SIGKILL)
        if job.proc is not None:
            job.proc.wait()


def launch_all(sw: Sweep, runs: list[Run], state: dict, how: dict, everything: dict[str, Run]) -> list[str]:
    """Run what is not done, `how["parallel"]` at a time, a run after the runs whose files it needs; returns the
    names of runs that failed. Ctrl-C stops every trainer and leaves resumable checkpoints behind."""
    results(
        sw, {r.name: r for r in runs}, state, save=True
    )  # finished before this sweep: into the ledger now
    todo = _todo(sw, runs, everything)
    needs = {r.name: set(_needs(sw, r, everything)) for r, _ in todo}
    (sw.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    active: list[Job] = []
    failed: list[str] = []
    total, done = len(todo), 0
    try:
        while todo or active:
            pending = {r.name for r, _ in todo} | {j.run.name for j in active}
            ready = [i for i, (r, _) in enumerate(todo) if not needs[r.name] & pending]
            if ready and len(active) < how["parallel"]:
                active.append(_start(sw, *todo.pop(ready[0]), how, state))
                continue
            if not active:
                raise SweepError(
                    f"{sw.path}: runs that need each other's files: {', '.join(sorted(pending))}"
                )
            time.sleep(0.2)
            for job in [j for j in active if j.ended(sw)]:
                active.remove(job)
                st = _ended(sw, job, state)
                if job.proc is None and st != "done":  # an adopted trainer stopped short: continue its run
                    print(f"sweep: adopted {job.run.name} ended unfinished; continuing it ({st})", flush=True)
                    todo.insert(0, (job.run, st))
                    continue
                done += 1
                ok = st == "done" and (job.proc is None or job.proc.returncode == 0)
                failed += [] if ok else [job.run.name]
                code = job.proc.returncode if job.proc is not None else "?"
                log = sw.out_dir / "logs" / f"{job.run.name}.log"
                print(
                    f"sweep: {'done' if ok else f'FAILED (exit {code})'} {job.run.name} in "
                    f"{time.time() - job.t0:.0f}s [{done}/{total}]" + ("" if ok else f": see {log}"),
                    flush=True,
                )
    except KeyboardInterrupt:
        _stop(sw, active)
        print("sweep: interrupted; rerun the same command to resume", file=sys.stderr)
        raise
    return failed


# --------------------------------------------------------------------------- MLflow: one parent run per sweep


def _client(sw: Sweep):
    from mlflow import MlflowClient  # here: mlflow is slow to import and only needed when tracking is on

    ov, env = credentials({k: subst(v, sw.out_dir) for k, v in sw.set.items()}, f"{sw.path}: [set]")
    cfg = resolve(sw, sw.base, ov, "base config")
    if not cfg.tracking.enabled:
        return None, None
    os.environ.update({k: v for k, v in env.items() if k.startswith("MLFLOW_")})  # the parent run's client
    uri = tracking.check_uri(cfg.tracking.uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def parent_run(sw: Sweep, state: dict) -> str | None:
    """The sweep's parent run (created once, its id kept in sweep.json); None when tracking is off or down."""
    try:
        client, uri = _client(sw)
        if client is None:
            return None
        if state.get("parent_run"):
            try:
                if client.get_run(state["parent_run"]).info.lifecycle_stage == "active":
                    return state["parent_run"]
            except Exception:  # deleted, or another store: make a new one
                pass
        experiment = f"sweep/{sw.name}"
        exp = client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(experiment, tracking._artifact_root(uri, experiment))
        )
        tags = {
            "sweep": sw.name,
            "sweep.file": str(sw.path),
            "git_commit": state["commit"],
            "host": socket.gethostname(),
        }
        run = client.create_run(exp_id, tags=tags, run_name=sw.name)
        client.log_text(run.info.run_id, scrub(sw.text), "reports/sweep.toml")
        state["parent_run"] = run.info.run_id
        return run.info.run_id
    except SweepError:
        raise
    except Exception as e:  # tracking must never stop a sweep
        print(
            f"sweep: MLflow parent run unavailable ({type(e).__name__}: {scrub(str(e))}); runs are tracked unnested",
            file=sys.stderr,
        )
        return None


def _close_stale(sw: Sweep, run: Run, parent: str | None) -> None:
    """Mark earlier unfinished MLflow runs of this sweep run KILLED before it is relaunched (compare views can
    then keep FINISHED runs only)."""
    if not parent:
        return
    try:
        client, _ = _client(sw)
        exp = client.get_experiment_by_name(f"sweep/{sw.name}")
        stale = client.search_runs(
            [exp.experiment_id], f"tags.`sweep.run` = '{run.name}' and attributes.status = 'RUNNING'"
        )
        for r in stale:
            tracking.set_terminated(client, r.info.run_id, "KILLED")
    except Exception:
        pass


def finish_parent(sw: Sweep, parent: str | None, out: Path, failed: list[str]) -> None:
    if not parent:
        return
    try:
        client, _ = _client(sw)
        client.log_artifact(parent, str(out), "reports")
        plots = out.parent / "plots"
        if plots.is_dir():
            client.log_artifacts(parent, str(plots), "plots")
        tracking.set_terminated(client, parent, "FAILED" if failed else "FINISHED")
    except Exception as e:
        print(
            f"sweep: could not close the MLflow parent run ({type(e).__name__}: {scrub(str(e))})",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- state file, lock, the grids in order


def _save_state(sw: Sweep, state: dict) -> None:
    files.atomic_write_text(sw.out_dir / "sweep.json", scrub(json.dumps(state, indent=2, default=str)))


def _load_state(sw: Sweep) -> dict:
    path = sw.out_dir / "sweep.json"
    hint = "delete it: the run directories and the ledger are kept, the sweep rebuilds the rest"
    state = report.read_json(path, "sweep state", hint) if path.is_file() else {}
    if not isinstance(state, dict) or not isinstance(state.get("runs", {}), dict):
        raise SweepError(f"{path}: corrupt sweep state (not the table a sweep writes): {hint}")
    state.update(
        {"name": sw.name, "file": str(sw.path), "text": sw.text, "commit": git_commit(sw.report_dir)}
    )
    state.update({"description": sw.description, "notes": sw.notes, "report_dir": str(sw.report_dir)})
    state.setdefault("runs", {})
    names = [g["name"] for g in sw.grids]  # a rerun keeps the earlier expansion of grids it has not reached
    state["grids"] = [g for g in state.get("grids", []) if isinstance(g, dict) and g.get("name") in names]
    return state


def _lock(sw: Sweep) -> files.RunLock:
    """One sweep per out_dir: the second one stops here, naming the first."""
    lock = files.RunLock(sw.out_dir)
    try:
        lock.acquire()
    except files.LockError:
        h = files.lock_holder(sw.out_dir) or {}
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("since", 0)))
        raise SweepError(
            f"{sw.out_dir} is in use by another sweep (host {h.get('host', '?')}, pid {h.get('pid', '?')}, since "
            f"{since}): wait for it to end or stop it; two sweeps never share an out_dir"
        ) from None
    return lock


def _grid_state(sw: Sweep, grid: dict, rows: list[Row], picks: dict[str, str], state: dict) -> dict:
    axes = [a for a in grid if a not in GRID_KEYS]
    picked = {f"{a}.{v}": picks[f"{a}.{v}"] for a in axes for v in grid[a] if f"{a}.{v}" in picks}
    return {
        "name": grid["name"],
        "title": grid.get("title", grid["name"]),
        "report": grid.get("report", True),
        "metrics": grid.get("metrics", sw.metrics),
        "axes": axes,
        "picked": picked,
        "pick_notes": {k: state.get("pick_notes", {}).get(k, "") for k in picked},
        "baseline_values": grid.get("baseline"),
        "rows": [{"values": r.values, "runs": r.runs} for r in rows],
        "primary": sw.primary,
        "goal": sw.goal,
        "baseline": sw.baseline,
    }


def _warn_identical(sw: Sweep, grid: dict, rows: list[Row], done: dict[str, dict]) -> None:
    metrics = {n: e["metrics"] for n, e in done.items()}
    for row in (r for r in rows if report.identical_seeds(metrics, r.runs)):
        print(
            f"sweep: WARNING: grid {grid['name']!r}, row {report.row_label(row.values)}: its seeds gave identical "
            f"results, so they replicate nothing (do seed_keys {grid.get('seed_keys', sw.seed_keys)} change these "
            "runs?); the report gives this row no interval",
            file=sys.stderr,
            flush=True,
        )


def walk(sw: Sweep, state: dict, how: dict | None = None) -> tuple[dict[str, Run], list[str]]:
    """Expand the grids in order into `state` (a pick_best bundle needs its source grid's results); with `how`
    (launcher, parallel, parent, env), run each grid before the next. Returns every run and the failed ones."""
    runs: dict[str, Run] = {}
    picks: dict[str, str] = {}
    failed: list[str] = []
    order = {g["name"]: i for i, g in enumerate(sw.grids)}
    for grid in sw.grids:
        try:
            picks.update(pick(sw, grid, state, runs))
        except Unfinished as e:
            if how is not None:
                raise
            print(f"sweep: the report stops before grid {grid['name']!r}: {e}", file=sys.stderr)
            break
        rows = expand(sw, grid, picks, runs)
        others = [g for g in state["grids"] if g["name"] != grid["name"]]
        new = _grid_state(sw, grid, rows, picks, state)
        state["grids"] = sorted([*others, new], key=lambda g: order[g["name"]])
        for r in runs.values():
            info = {"overrides": r.overrides, "base": r.base, "steps": r.steps, "config": r.key}
            state["runs"].setdefault(r.name, {}).update(info)
        if how is None:
            continue
        _save_state(sw, state)
        names = list(dict.fromkeys(n for row in rows for n in row.runs))
        print(f"sweep: grid {grid['name']!r}: {len(rows)} rows, {len(names)} runs", flush=True)
        failed += launch_all(sw, [runs[n] for n in names], state, how, runs)
        _warn_identical(sw, grid, rows, results(sw, runs, state, save=True))
        if failed:
            print(
                f"sweep: stopping after grid {grid['name']!r}: {len(failed)} failed run(s): {', '.join(failed)}"
            )
            break
    return runs, failed


def run_sweep(sw: Sweep, launcher: str, parallel: int) -> int:
    """Every grid in order under the sweep's lock, then the report."""
    lock = _lock(sw)
    try:
        state = _load_state(sw)
        env = dict(os.environ)
        if parallel > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
        parent = parent_run(sw, state)
        how = {"launcher": launcher, "parallel": parallel, "parent": parent, "env": env}
        runs, failed = walk(sw, state, how)
        _save_state(sw, state)
        out = report.write_report(state, results(sw, runs, state, save=True), sw.report_dir)
        finish_parent(sw, parent, out, failed)
        print(f"sweep: report {out}")
        return 1 if failed else 0
    finally:
        lock.release()


def rebuild_report(sw: Sweep, out: str | None) -> Path:
    """The report from the ledger (and any finished run directories), training nothing and writing nothing else:
    works in a fresh clone, and beside a running sweep."""
    state = _load_state(sw)
    runs, _ = walk(sw, state)
    return report.write_report(state, results(sw, runs, state), out or sw.report_dir)


def pick(sw: Sweep, grid: dict, state: dict, runs: dict[str, Run]) -> dict[str, str]:
    """Resolve the pick_best bundles this grid uses from the finished results of their source grid, by the
    report's finite-value rule (`report.choose`); a candidate with a non-finite seed is named, never quietly
    ranked on its other seeds."""
    out = {}
    done = {n: e["metrics"] for n, e in results(sw, runs, state).items()}
    for axis in (a for a in grid if a in sw.bundles):
        for v in (v for v in grid[axis] if "pick_best" in sw.bundles[axis][v]):
            table = sw.bundles[axis][v]
            src = next((g for g in state["grids"] if g["name"] == table["from_grid"]), None)
            if src is None:
                raise SweepError(
                    f"{sw.path}: [{axis}.{v}] picks from grid {table['from_grid']!r}, which must come first"
                )
            stats = {}
            for row in (r for r in src["rows"] if r["values"].get(axis) in table["pick_best"]):
                cand = row["values"][axis]
                if any(n not in done for n in row["runs"]):
                    raise Unfinished(
                        f"{sw.path}: [{axis}.{v}]: {cand} has unfinished runs in grid {src['name']!r}"
                    )
                stats[cand] = report.row_stats(done, row["runs"], sw.primary)
            missing = [c for c in table["pick_best"] if c not in stats]
            if missing:
                raise SweepError(f"{sw.path}: [{axis}.{v}]: grid {src['name']!r} has no rows for {missing}")
            best, note = report.choose(stats, sw.goal)
            if best is None:
                raise SweepError(f"{sw.path}: [{axis}.{v}]: no candidate has a finite {sw.primary}: {note}")
            print(f"sweep: {axis} {v} = {best} ({sw.primary} {stats[best].mean:.4g}, best of {len(stats)})")
            if note:
                print(f"sweep: {axis} {v}: {note}", file=sys.stderr)
            out[f"{axis}.{v}"] = best
            state.setdefault("pick_notes", {})[f"{axis}.{v}"] = note
    return out


def _counts(c: collections.Counter) -> str:
    parts = [f"{c[k]} {w}" for k, w in (("new", "new"), ("resume", "to resume"), ("done", "done")) if c[k]]
    return ", ".join(parts) or "none"


def dry_run(sw: Sweep, launcher: str) -> int:
    """Expand every grid and check every run's config, listing each run, its status (new / resume / done) and the
    command that would start it with `launcher` (a multi-node one included; the MLflow parent run is added at
    launch). A grid that uses a pick_best bundle is expanded with each candidate (its runs named
    `bundle=candidate`); the sweep itself will run the picked candidate's only."""
    runs: dict[str, Run] = {}
    total: collections.Counter = collections.Counter()
    for grid in sw.grids:
        choices = [
            [(f"{a}.{v}", c) for c in sw.bundles[a][v]["pick_best"]]
            for a in grid
            if a in sw.bundles
            for v in grid[a]
            if "pick_best" in sw.bundles[a][v]
        ]
        added = []
        for combo in itertools.product(*choices):
            before = set(runs)
            rows = expand(sw, grid, dict(combo), runs, dry=True)
            added.append([r for n, r in runs.items() if n not in before])
        states = {r.name: status(sw, r) for new in added for r in new}
        first = collections.Counter(states[r.name] for r in added[0])
        total += first
        each = f" per candidate of {', '.join(c[0][0] for c in choices)}" if choices else ""
        seeds = len(grid.get("seeds", sw.seeds))
        print(
            f"grid {grid['name']}: {len(rows)} rows x {seeds} seeds, {len(added[0])} runs not in an earlier grid"
            f"{each} ({_counts(first)})"
        )
        for r in (r for new in added for r in new):
            shown = "".join(f" {k}={fmt_value(v)}" for k, v in r.overrides.items() if k not in sw.set)
            print(f"  {states[r.name]:<6} {r.name}  ({r.base}{shown})")
            if states[r.name] != "done":
                print(
                    f"         $ {scrub(shlex.join(command(sw, r, launcher, None, states[r.name] == 'resume')))}"
                )
    print(
        f"dry run: every config is valid (nothing was run); the sweep has {sum(total.values())} runs: "
        f"{_counts(total)}"
    )
    return 0


# --------------------------------------------------------------------------- CLI


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the sweep is, so that `launch_all` stops its runs as on Ctrl-C: a run left alone
    would go on writing into a directory that the next sweep resumes."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated


def _sweep_of(target: str) -> Sweep:
    """A sweep file, or a sweep's out_dir (its sweep.json names the file; the runs are read from that dir)."""
    path = Path(target)
    if not path.is_dir():
        return load_sweep(path)
    state_file = path / "sweep.json"
    if not state_file.is_file():
        raise SweepError(f"{path}: no sweep.json (not a sweep directory, or the sweep never started)")
    state = report.read_json(
        state_file, "sweep state", "give the sweep file instead: python sweep.py FILE --report"
    )
    if not isinstance(state, dict) or not isinstance(state.get("file"), str):
        raise SweepError(f"{state_file}: names no sweep file: give it instead: python sweep.py FILE --report")
    sw = load_sweep(state["file"])
    sw.out_dir = path
    return sw


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n")[0])
    ap.add_argument("sweep", nargs="?", help="sweep file (TOML)")
    ap.add_argument(
        "--report", nargs="?", const="", metavar="DIR", help="rebuild report.md + plots; train nothing"
    )
    ap.add_argument("--out", metavar="DIR", help="where --report writes (default: the sweep's report_dir)")
    ap.add_argument("--dry-run", action="store_true", help="expand and check every run's config; run nothing")
    ap.add_argument("--parallel", type=int, help="runs at once (default: the sweep file's `parallel`)")
    ap.add_argument("--launcher", help='e.g. "python" or "torchrun --standalone --nproc_per_node=4"')
    ap.add_argument("--seeds", help="comma-separated seeds for the grids without their own (e.g. more seeds)")
    a = ap.parse_args(argv)
    if a.report is not None:
        if a.sweep and a.report:
            ap.error("--report: give the sweep file or a sweep's out_dir, not both")
        if not (a.sweep or a.report):
            ap.error("--report: give the sweep file (python sweep.py FILE --report) or a sweep's out_dir")
        print(f"sweep: report {rebuild_report(_sweep_of(a.sweep or a.report), a.out)}")
        return 0
    if not a.sweep:
        ap.error("give a sweep file, or --report DIR")
    sw = load_sweep(a.sweep)
    if a.seeds:
        try:
            sw.seeds = [int(x) for x in a.seeds.split(",")]
        except ValueError:
            raise SweepError(f"--seeds {a.seeds!r}: expected comma-separated integers") from None
    parallel = check_parallel(a.parallel if a.parallel is not None else sw.parallel, "--parallel")
    if a.dry_run:
        return dry_run(sw, a.launcher or sw.launcher)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return run_sweep(sw, a.launcher or sw.launcher, parallel)
    except Terminated:
        return 75  # as train.py: preempted, resumable
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str]) -> int:
    """Expected failures (a bad sweep file, a run directory with another config) print `error: ...`, exit 2."""
    return errors.main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
