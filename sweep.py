"""Sweeps: a grid of train.py runs that survives interruption, grouped in MLflow, and a report computed from them.

    python sweep.py configs/sweeps/synthetic.toml [--parallel N] [--launcher CMD] [--seeds 0,1,2,3] [--dry-run]
    python sweep.py --report DIR [--out DIR]          # rebuild report.md + plots/ from DIR's finished runs
                                                      # (in the sweep's report_dir unless --out)

A sweep file (TOML) names a base config, named bundles of overrides, and grids over them:

    name = "synthetic"                     # MLflow experiment "sweep/<name>"; one parent run per sweep
    base = "configs/synthetic.toml"        # every run starts from this config (a bundle may switch it)
    out_dir = "runs/research/synthetic"    # run directories <out_dir>/<run>/, sweep.json, logs/
    report_dir = "docs/results/synthetic"  # report.md + plots/ (default: out_dir)
    seeds = [0, 1, 2]                      # each run once per seed; a seed sets every key of seed_keys
    seed_keys = ["train.seed", "data.seed"]
    launcher = "python"                    # or "torchrun --standalone --nproc_per_node=4"
    parallel = 1                           # runs at once
    primary = "synth/ce_learnable_head1"   # the metric the conclusions rank by (a key of summary.json)
    goal = "min"                           # or "max"
    baseline = "uniform"                   # the arm the conclusions compare with
    metrics = ["synth/ce_learnable_head1", "synth/exact_match"]   # table columns and plots
    description = "..."                    # markdown under the report's title
    notes = "docs/results/synthetic/notes.md"   # optional: a hand-written note appended to the report

    [set]                                  # overrides for every run ("{out_dir}" in a string is replaced)
    "train.steps" = 400

    [arm.uniform]                          # a bundle: axis "arm", value "uniform" (any table name is an axis)
    "loss.scorer" = "uniform"
    [arm.rho1_best]                        # a bundle picked from results: the best of `pick_best` on the
    pick_best = ["rho1_a", "rho1_b"]       # primary metric in grid `from_grid` (grids run in order), plus
    from_grid = "arms"                     # its own overrides
    [arm.critic]
    base = "configs/critic_mbpp.toml"      # a bundle may switch the base config

    [[grid]]                               # the runs: the product of the grid's axes x seeds; the sweep runs
    name = "arms"                          # its grids in order, each to the end before the next
    arm = ["uniform", "rho1_a", "rho1_b"]  # a bundle axis: names of its tables
    "loss.lam" = [0.1, 0.3]                # a config axis: a dotted key and its values
    # optional: title, seeds, seed_keys, metrics, report = false (prerequisite runs without a table), and
    # baseline = {arm = "uniform", method = "full"}: the row this grid's conclusion compares with (default: the
    # first row, in any grid, whose only axis value is the sweep's `baseline`)

Runs whose resolved configs are equal are one run (the name of its first occurrence: `arm--key=value--s0`), so
a grid around the defaults reuses the arms grid's runs. A finished run (summary.json at its last step) is skipped;
one with a checkpoint resumes (`--resume`); one without restarts. A run directory whose config differs from the
sweep's is an error, never silently reused. The report's numbers are computed from the runs' summary.json files:
mean and 95% t-interval over seeds per row, one table and one plot per grid, and a conclusion per grid.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config as C
import errors
import files

TOP_KEYS = {
    "name": str,
    "base": str,
    "out_dir": str,
    "report_dir": str,
    "seeds": list,
    "seed_keys": list,
    "launcher": str,
    "parallel": int,
    "primary": str,
    "goal": str,
    "baseline": str,
    "metrics": list,
    "set": dict,
    "grid": list,
    "description": str,
    "notes": str,
}
GRID_KEYS = {"name", "title", "seeds", "seed_keys", "metrics", "report", "baseline"}
BUNDLE_META = {"base", "pick_best", "from_grid"}
# keys that name a run rather than describe it: equal configs up to these are the same run
RUN_KEYS = ("train.out_dir", "train.run_name", "tracking.experiment", "tracking.parent_run", "tracking.tags")


class SweepError(errors.UserError, ValueError):
    """A problem with a sweep file or its runs: the message names the file / key / run and what was expected."""


# --------------------------------------------------------------------------- the sweep file


@dataclass
class Sweep:
    path: Path
    name: str
    base: str
    out_dir: Path
    report_dir: Path
    seeds: list[int]
    seed_keys: list[str]
    launcher: str
    parallel: int
    primary: str
    goal: str
    baseline: str
    metrics: list[str]
    set: dict[str, Any]
    bundles: dict[str, dict[str, dict[str, Any]]]  # axis -> value -> table
    grids: list[dict[str, Any]]
    text: str = ""
    description: str = ""
    notes: str = ""


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep file (types, names, axes); configs are checked by `expand`."""
    path = Path(path)
    text, spec = C.read_toml(path, "sweep file")
    bundles = {k: v for k, v in spec.items() if k not in TOP_KEYS}
    for key, tp in TOP_KEYS.items():
        if key in spec and not isinstance(spec[key], tp):
            raise SweepError(f"{path}: '{key}' must be {tp.__name__}, got {spec[key]!r}")
    for axis, values in bundles.items():
        if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
            raise SweepError(
                f"{path}: unknown key '{axis}' (expected one of {', '.join(sorted(TOP_KEYS))}, or a table of "
                f"bundles [{axis}.<name>])"
            )
    for key in ("name", "base"):
        if key not in spec:
            raise SweepError(f"{path}: missing '{key}'")
    if spec.get("goal", "min") not in ("min", "max"):
        raise SweepError(f"{path}: 'goal' must be 'min' or 'max', got {spec['goal']!r}")
    if not spec.get("grid"):
        raise SweepError(f"{path}: no [[grid]]: a sweep needs at least one grid of runs")
    out_dir = Path(spec.get("out_dir", f"runs/sweeps/{spec['name']}"))
    sw = Sweep(
        path=path,
        name=spec["name"],
        base=spec["base"],
        out_dir=out_dir,
        report_dir=Path(spec.get("report_dir", str(out_dir))),
        seeds=[int(s) for s in spec.get("seeds", [0])],
        seed_keys=list(spec.get("seed_keys", ["train.seed"])),
        launcher=spec.get("launcher", "python"),
        parallel=int(spec.get("parallel", 1)),
        primary=spec.get("primary", "final_val_loss"),
        goal=spec.get("goal", "min"),
        baseline=spec.get("baseline", ""),
        metrics=list(spec.get("metrics", [])),
        set=dict(spec.get("set", {})),
        bundles=bundles,
        grids=list(spec["grid"]),
        text=text,
        description=spec.get("description", ""),
        notes=spec.get("notes", ""),
    )
    if sw.primary not in sw.metrics:
        sw.metrics.insert(0, sw.primary)
    _check_grids(sw)
    return sw


def _check_grids(sw: Sweep) -> None:
    names = set()
    for i, g in enumerate(sw.grids):
        where = f"{sw.path}: grid {i + 1}"
        if not isinstance(g.get("name"), str) or not g["name"]:
            raise SweepError(f"{where}: needs a name")
        if g["name"] in names:
            raise SweepError(f"{where}: duplicate grid name {g['name']!r}")
        names.add(g["name"])
        for axis, values in g.items():
            if axis in GRID_KEYS:
                continue
            if not isinstance(values, list) or not values:
                raise SweepError(f"{where} ({g['name']}): axis '{axis}' must be a non-empty list of values")
            if "." not in axis and axis not in sw.bundles:
                raise SweepError(
                    f"{where} ({g['name']}): axis '{axis}' is neither a dotted config key nor a bundle table "
                    f"[{axis}.<name>]"
                )
            for v in values if axis in sw.bundles else []:
                if v not in sw.bundles[axis]:
                    raise SweepError(
                        f"{where} ({g['name']}): {axis} = {v!r} has no table [{axis}.{v}] "
                        f"(known: {', '.join(sw.bundles[axis])})"
                    )
    for axis, values in sw.bundles.items():
        for v, table in values.items():
            if "pick_best" in table:
                src = table.get("from_grid")
                if src not in names:
                    raise SweepError(
                        f"{sw.path}: [{axis}.{v}] 'from_grid' = {src!r} is not a grid of this sweep"
                    )
                bad = [c for c in table["pick_best"] if c not in values or "pick_best" in values[c]]
                if bad:
                    raise SweepError(
                        f"{sw.path}: [{axis}.{v}] pick_best names {bad}: not plain [{axis}.*] tables"
                    )
            for k in table:
                if "." not in k and k not in BUNDLE_META:
                    raise SweepError(
                        f"{sw.path}: [{axis}.{v}] key '{k}': expected a dotted config key or one of "
                        f"{', '.join(sorted(BUNDLE_META))}"
                    )


# --------------------------------------------------------------------------- expansion into runs


@dataclass
class Run:
    name: str
    base: str
    overrides: dict[str, Any]
    key: str  # hash of the resolved config without RUN_KEYS
    tags: dict[str, str]
    steps: int
    config: dict = field(repr=False, default_factory=dict)


@dataclass
class Row:
    """One line of a grid's table: a combination of its axis values, one run per seed."""

    values: dict[str, str]
    runs: list[str]


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _subst(v: Any, out_dir: Path) -> Any:
    return v.replace("{out_dir}", str(out_dir)) if isinstance(v, str) else v


def _canonical(d: dict) -> dict:
    """A config as train.py writes it to config.json (credentials scrubbed), flat, without RUN_KEYS."""
    flat = C.flatten(json.loads(errors.scrub(json.dumps(d))))
    return {k: v for k, v in flat.items() if k not in RUN_KEYS and k != "source"}


def resolve(sw: Sweep, base: str, overrides: dict[str, Any], where: str) -> C.Config:
    """The run's config: base file + overrides, checked by config.py (errors name the sweep file and run)."""
    args = [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]
    try:
        return C.load_config(base, args)
    except C.ConfigError as e:
        raise SweepError(f"{sw.path}: {where}: {e}") from None


def _bundle(sw: Sweep, axis: str, value: str, picks: dict[str, str]) -> tuple[str | None, dict[str, Any]]:
    """(base or None, overrides) of a bundle; a pick_best bundle is its picked candidate plus its own keys."""
    table = sw.bundles[axis][value]
    base, overrides = None, {}
    if "pick_best" in table:
        base, overrides = _bundle(sw, axis, picks[f"{axis}.{value}"], picks)
    base = table.get("base", base)
    overrides.update({k: _subst(v, sw.out_dir) for k, v in table.items() if k not in BUNDLE_META})
    return base, overrides


def expand(
    sw: Sweep, grid: dict[str, Any], picks: dict[str, str], runs: dict[str, Run], dry: bool = False
) -> list[Row]:
    """The rows of one grid; new runs are added to `runs` (by name), equal configs share one run. `dry` names a
    picked bundle's runs after the candidate too (the dry run expands every candidate)."""
    axes = [(a, v) for a, v in grid.items() if a not in GRID_KEYS]
    seeds = [int(s) for s in grid.get("seeds", sw.seeds)]
    seed_keys = grid.get("seed_keys", sw.seed_keys)
    by_key = {r.key: r for r in runs.values()}
    rows = []
    for combo in itertools.product(*(values for _, values in axes)):
        base, overrides = sw.base, {k: _subst(v, sw.out_dir) for k, v in sw.set.items()}
        label, values = [], {}
        for (axis, _), v in zip(axes, combo, strict=True):
            if axis in sw.bundles:
                b, extra = _bundle(sw, axis, v, picks)
                base = b or base
                overrides.update(extra)
                label.append(f"{v}={picks[f'{axis}.{v}']}" if dry and f"{axis}.{v}" in picks else str(v))
            else:
                overrides[axis] = _subst(v, sw.out_dir)
                label.append(f"{axis}={_fmt(v)}")
            values[axis] = _fmt(v)
        row = Row(values, [])
        for seed in seeds:
            ov = {**overrides, **{k: seed for k in seed_keys}}
            name = "--".join([*label, f"s{seed}"]).replace("/", "_")
            cfg = resolve(sw, base, ov, f"run {name}")
            canon = _canonical(C.to_dict(cfg))
            key = hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:16]
            if key in by_key:
                row.runs.append(by_key[key].name)
                continue
            if name in runs:
                raise SweepError(
                    f"{sw.path}: grid {grid['name']!r}: run name {name!r} is used by two different configs "
                    "(a picked bundle and another with the same name?)"
                )
            tags = {
                "sweep": sw.name,
                "sweep.run": name,
                "sweep.grid": grid["name"],
                "seed": str(seed),
                **values,
            }
            run = Run(name, base, ov, key, tags, cfg.train.steps, canon)
            runs[name] = by_key[key] = run
            row.runs.append(name)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- run state and launching


def run_dir(sw: Sweep, name: str) -> Path:
    return sw.out_dir / name


def status(sw: Sweep, run: Run) -> str:
    """done (summary.json at the last step) | resume (a checkpoint) | new. A directory holding a run with
    another config is an error: the sweep never mixes results of different configs under one name."""
    d = run_dir(sw, run.name)
    cfg_file = d / "config.json"
    if cfg_file.is_file():
        have = _canonical(json.loads(cfg_file.read_text()))
        if have != run.config:
            diff = sorted(k for k in set(have) | set(run.config) if have.get(k) != run.config.get(k))
            raise SweepError(
                f"{d}: holds a run with another config than the sweep's (differs in {', '.join(diff[:6])}): "
                "delete that directory or give the sweep another out_dir"
            )
    summary = d / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("steps") == run.steps:
        return "done"
    from checkpoint import find_resume  # what `train.py --resume` would continue from

    return "resume" if find_resume(d / "checkpoints") is not None else "new"


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


def git_commit() -> str:
    import tracking

    commit = tracking._git_commit()
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=C.REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("+dirty" if dirty else "")


def launch_all(
    sw: Sweep, runs: list[Run], state: dict, launcher: str, parallel: int, parent: str | None
) -> list[str]:
    """Run what is not done, `parallel` at a time; returns the names of runs that failed. Ctrl-C stops every
    child (its process group) and leaves resumable checkpoints behind."""
    todo = [(r, st) for r in runs if (st := status(sw, r)) != "done"]
    logs = sw.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    active: dict[subprocess.Popen, tuple[Run, float, Any]] = {}
    failed: list[str] = []
    total, done = len(todo), 0
    try:
        while todo or active:
            while todo and len(active) < parallel:
                run, st = todo.pop(0)
                if st == "new" and run_dir(sw, run.name).exists():
                    shutil.rmtree(run_dir(sw, run.name))  # crashed before its first checkpoint: start over
                _close_stale(sw, run, parent)
                cmd = command(sw, run, launcher, parent, resume=st == "resume")
                log = open(logs / f"{run.name}.log", "a")  # noqa: SIM115 (closed when the run ends)
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
                log.flush()
                p = subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
                active[p] = (run, time.time(), log)
                print(f"sweep: start {run.name} ({'resume' if st == 'resume' else 'new'})", flush=True)
            time.sleep(0.2)
            for p in [p for p in active if p.poll() is not None]:
                run, t0, log = active.pop(p)
                log.close()
                done += 1
                seconds = time.time() - t0
                entry = state["runs"].setdefault(run.name, {})
                entry["seconds"] = entry.get("seconds", 0.0) + seconds
                entry["commit"] = state["commit"]
                ok = p.returncode == 0 and status(sw, run) == "done"
                if not ok:
                    failed.append(run.name)
                _save_state(sw, state)
                print(
                    f"sweep: {'done' if ok else f'FAILED (exit {p.returncode})'} {run.name} in {seconds:.0f}s "
                    f"[{done}/{total}]" + ("" if ok else f": see {logs / (run.name + '.log')}"),
                    flush=True,
                )
    except KeyboardInterrupt:
        for p in active:
            os.killpg(p.pid, signal.SIGTERM)
        for p in active:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        print("sweep: interrupted; rerun the same command to resume", file=sys.stderr)
        raise
    return failed


# --------------------------------------------------------------------------- MLflow: one parent run per sweep


def _client(sw: Sweep):
    from mlflow import MlflowClient

    import tracking

    cfg = resolve(sw, sw.base, {k: _subst(v, sw.out_dir) for k, v in sw.set.items()}, "base config")
    if not cfg.tracking.enabled:
        return None, None
    uri = tracking.check_uri(cfg.tracking.uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def parent_run(sw: Sweep, state: dict) -> str | None:
    """The sweep's parent run (created once, its id kept in sweep.json); None when tracking is off or down."""
    import tracking

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
        client.log_text(run.info.run_id, sw.text, "reports/sweep.toml")
        state["parent_run"] = run.info.run_id
        return run.info.run_id
    except Exception as e:  # tracking must never stop a sweep
        print(
            f"sweep: MLflow parent run unavailable ({type(e).__name__}: {e}); runs are tracked unnested",
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
            client.set_terminated(r.info.run_id, "KILLED")
    except Exception:
        pass


def finish_parent(sw: Sweep, parent: str | None, report: Path, failed: list[str]) -> None:
    if not parent:
        return
    try:
        client, _ = _client(sw)
        client.log_artifact(parent, str(report), "reports")
        plots = report.parent / "plots"
        if plots.is_dir():
            client.log_artifacts(parent, str(plots), "plots")
        client.set_terminated(parent, "FAILED" if failed else "FINISHED")
    except Exception as e:
        print(f"sweep: could not close the MLflow parent run ({type(e).__name__}: {e})", file=sys.stderr)


# --------------------------------------------------------------------------- state file


def _save_state(sw: Sweep, state: dict) -> None:
    files.atomic_write_text(sw.out_dir / "sweep.json", json.dumps(state, indent=2, default=str))


def _load_state(sw: Sweep) -> dict:
    path = sw.out_dir / "sweep.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    state.update({"name": sw.name, "file": str(sw.path), "text": sw.text, "commit": git_commit()})
    state.update({"description": sw.description, "notes": sw.notes, "report_dir": str(sw.report_dir)})
    state.setdefault("runs", {})
    names = [
        g["name"] for g in sw.grids
    ]  # a rerun keeps the earlier expansion of the grids it has not reached
    state["grids"] = [g for g in state.get("grids", []) if g["name"] in names]
    return state


def run_sweep(sw: Sweep, launcher: str, parallel: int) -> int:
    """Every grid in order (a pick_best bundle needs its grid's results), then the report."""
    state = _load_state(sw)
    sw.out_dir.mkdir(parents=True, exist_ok=True)
    parent = parent_run(sw, state)
    runs: dict[str, Run] = {}
    picks: dict[str, str] = {}
    failed: list[str] = []
    order = {g["name"]: i for i, g in enumerate(sw.grids)}
    for grid in sw.grids:
        picks.update(pick(sw, grid, state, runs))
        rows = expand(sw, grid, picks, runs)
        others = [g for g in state["grids"] if g["name"] != grid["name"]]
        state["grids"] = sorted([*others, _grid_state(sw, grid, rows, picks)], key=lambda g: order[g["name"]])
        for r in runs.values():
            state["runs"].setdefault(r.name, {}).update(
                {"overrides": r.overrides, "base": r.base, "steps": r.steps}
            )
        _save_state(sw, state)
        names = list(dict.fromkeys(n for row in rows for n in row.runs))
        print(f"sweep: grid {grid['name']!r}: {len(rows)} rows, {len(names)} runs", flush=True)
        failed += launch_all(sw, [runs[n] for n in names], state, launcher, parallel, parent)
        if failed:
            print(
                f"sweep: stopping after grid {grid['name']!r}: {len(failed)} failed run(s): {', '.join(failed)}"
            )
            break
    report = write_report(sw.out_dir, sw.report_dir)
    finish_parent(sw, parent, report, failed)
    print(f"sweep: report {report}")
    return 1 if failed else 0


def _grid_state(sw: Sweep, grid: dict, rows: list[Row], picks: dict[str, str]) -> dict:
    axes = [a for a in grid if a not in GRID_KEYS]
    return {
        "name": grid["name"],
        "title": grid.get("title", grid["name"]),
        "report": grid.get("report", True),
        "metrics": grid.get("metrics", sw.metrics),
        "axes": axes,
        "picked": {f"{a}.{v}": picks[f"{a}.{v}"] for a in axes for v in grid[a] if f"{a}.{v}" in picks},
        "baseline_values": grid.get("baseline"),
        "rows": [{"values": r.values, "runs": r.runs} for r in rows],
        "primary": sw.primary,
        "goal": sw.goal,
        "baseline": sw.baseline,
    }


def pick(sw: Sweep, grid: dict, state: dict, runs: dict[str, Run]) -> dict[str, str]:
    """Resolve the pick_best bundles this grid uses from the finished results of their source grid."""
    out = {}
    for axis in (a for a in grid if a in sw.bundles):
        for v in grid[axis]:
            table = sw.bundles[axis][v]
            if "pick_best" not in table:
                continue
            src = next((g for g in state["grids"] if g["name"] == table["from_grid"]), None)
            if src is None:
                raise SweepError(
                    f"{sw.path}: [{axis}.{v}] picks from grid {table['from_grid']!r}, which must come first"
                )
            metrics = load_metrics(sw.out_dir)
            scores = {}
            for row in src["rows"]:
                cand = row["values"].get(axis)
                if cand in table["pick_best"]:
                    vals = _values(metrics, row["runs"], sw.primary)
                    if any(x is None for x in vals):
                        raise SweepError(
                            f"{sw.path}: [{axis}.{v}]: {cand} has unfinished runs in grid {src['name']!r}"
                        )
                    scores[cand] = sum(vals) / len(vals)
            missing = [c for c in table["pick_best"] if c not in scores]
            if missing:
                raise SweepError(f"{sw.path}: [{axis}.{v}]: grid {src['name']!r} has no rows for {missing}")
            best = (min if sw.goal == "min" else max)(scores, key=scores.get)
            print(f"sweep: {axis} {v} = {best} ({sw.primary} {scores[best]:.4g}, best of {len(scores)})")
            out[f"{axis}.{v}"] = best
    return out


def dry_run(sw: Sweep) -> int:
    """Expand every grid and check every run's config, listing each run and whether it is done. A grid that uses
    a pick_best bundle is expanded with each candidate (its runs named `bundle=candidate`); the sweep itself will
    run the picked candidate's only."""
    runs: dict[str, Run] = {}
    expected = 0
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
        expected += len(added[0])
        each = f" per candidate of {', '.join(c[0][0] for c in choices)}" if choices else ""
        print(
            f"grid {grid['name']}: {len(rows)} rows x {len(grid.get('seeds', sw.seeds))} seeds, {len(added[0])} new runs{each}"
        )
        for r in (r for new in added for r in new):
            shown = "".join(f" {k}={_fmt(v)}" for k, v in r.overrides.items() if k not in sw.set)
            print(f"  {status(sw, r):<6} {r.name}  ({r.base}{shown})")
    print(f"dry run: every config is valid (nothing was run); the sweep runs {expected} runs")
    return 0


# --------------------------------------------------------------------------- statistics


def _t_abs_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer df (closed form, Abramowitz & Stegun 26.7.3-4)."""
    th = math.atan(t / math.sqrt(df))
    c, s = math.cos(th), math.sin(th)
    if df % 2 == 1:
        if df == 1:
            return 2 * th / math.pi
        term = total = c
        for k in range(1, (df - 3) // 2 + 1):
            term *= c * c * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (th + s * total)
    term = total = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c * c * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(df: int, level: float = 0.95) -> float:
    """The t with P(|T| <= t) = level (two-sided), by bisection."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_abs_cdf(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _var(xs: list[float], m: float) -> float:
    """The sample variance (n - 1) of at least two values with mean m."""
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the t-interval, n) of the finite values; half-width nan with fewer than 2."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(xs) / n
    if n < 2:
        return m, float("nan"), n
    return m, t_quantile(n - 1, level) * math.sqrt(_var(xs, m) / n), n


def diff_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean(a) - mean(b), half-width of its Welch t-interval, df) over the finite values. The df is Welch-
    Satterthwaite's rounded down (the interval is if anything too wide); half-width nan with fewer than 2 a side.
    Sharper than asking whether two intervals overlap, which they can while the difference is resolved."""
    xs, ys = _finite(a), _finite(b)
    if not xs or not ys:
        return float("nan"), float("nan"), 0
    na, nb = len(xs), len(ys)
    ma, mb = sum(xs) / na, sum(ys) / nb
    if na < 2 or nb < 2:
        return ma - mb, float("nan"), 0
    va, vb = _var(xs, ma) / na, _var(ys, mb) / nb
    if va + vb == 0:
        return ma - mb, 0.0, na + nb - 2
    df = max(1, math.floor((va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))))
    return ma - mb, t_quantile(df, level) * math.sqrt(va + vb), df


# --------------------------------------------------------------------------- the report


def run_metrics(summary: dict) -> dict[str, float]:
    """summary.json as flat numbers: top-level values and the entries of its sections (synthetic, eval, cost)."""
    out = {}
    for k, v in summary.items():
        items = v.items() if isinstance(v, dict) else [(k, v)]
        for kk, vv in items:
            if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                out[kk] = float(vv)
    return out


def load_metrics(out_dir: Path) -> dict[str, dict[str, float]]:
    """{run name: flat metrics} for every finished run (summary.json) under `out_dir`."""
    return {
        p.parent.name: run_metrics(json.loads(p.read_text()))
        for p in sorted(Path(out_dir).glob("*/summary.json"))
    }


def _cell(m: float, hw: float, n: int) -> str:
    if n == 0:
        return "–"
    digits = lambda x: f"{x:.4g}"  # noqa: E731
    return digits(m) if not math.isfinite(hw) else f"{digits(m)} ± {digits(hw)}"


def _row_label(values: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _values(metrics: dict, runs: list[str], key: str) -> list[float | None]:
    return [metrics.get(n, {}).get(key) for n in runs]


def _stats(metrics: dict, runs: list[str], key: str) -> tuple[float, float, int]:
    return mean_ci(_values(metrics, runs, key))


def conclusion(grid: dict, metrics: dict, baseline_runs: list[str] | None) -> str:
    """The best row on the primary metric, by how much it beats the baseline, and whether the intervals overlap."""
    key, goal = grid["primary"], grid["goal"]
    rows = [(r, _stats(metrics, r["runs"], key)) for r in grid["rows"]]
    rows = [(r, s) for r, s in rows if s[2] > 0]
    if not rows:
        return f"No finished runs with `{key}` yet."
    best, (m, hw, n) = (min if goal == "min" else max)(rows, key=lambda x: x[1][0])
    better = "lower" if goal == "min" else "higher"
    text = (
        f"Best on `{key}` ({better} is better): **{_row_label(best['values'])}**, {_cell(m, hw, n)} (n={n})."
    )
    if not baseline_runs:
        return text + f" The baseline ({grid['baseline'] or 'none'}) has no finished runs in this sweep."
    bm, bhw, bn = _stats(metrics, baseline_runs, key)
    if set(best["runs"]) == set(baseline_runs):
        return text + " That is the baseline itself: no row beats it."
    diff = m - bm
    rel = f" ({diff / abs(bm) * 100:+.1f}%)" if bm else ""
    label = (
        _row_label({k: _fmt(v) for k, v in want.items()}) if (want := grid.get("baseline_values")) else None
    )
    text += (
        f" Baseline {label or grid['baseline']}: {_cell(bm, bhw, bn)} (n={bn}); difference {diff:+.4g}{rel}."
    )
    if math.isfinite(hw) and math.isfinite(bhw):
        overlap = (m - hw) <= (bm + bhw) and (bm - bhw) <= (m + hw)
        wins = (diff < 0) == (goal == "min") and diff != 0
        text += (
            " The 95% intervals overlap: the difference is not resolved by these seeds."
            if overlap
            else f" The 95% intervals do not overlap: the best row is {'better' if wins else 'worse'} than the baseline."
        )
        d, dhw, df = diff_ci(_values(metrics, best["runs"], key), _values(metrics, baseline_runs, key))
        resolved = d - dhw > 0 or d + dhw < 0
        text += f" 95% interval of the difference (Welch, df {df}): [{d - dhw:+.4g}, {d + dhw:+.4g}], " + (
            f"excluding 0: the best row is {'better' if wins else 'worse'} than the baseline."
            if resolved
            else "including 0: not resolved."
        )
    else:
        text += " (No interval: fewer than 2 seeds.)"
    return text


def _plot(grid: dict, metrics: dict, baseline_runs: list[str] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = grid["metrics"]
    cols = min(4, len(keys))  # panels wrap after four, so that a report page stays readable
    rows = -(-len(keys) // cols)
    width = max(4.5, 0.45 * len(grid["rows"]) + 2)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    numeric = [a for a in grid["axes"] if "." in a]
    for ax, key in zip(axes.flat, keys, strict=False):
        stats = [_stats(metrics, r["runs"], key) for r in grid["rows"]]
        if len(numeric) == 1 and all(_is_number(r["values"][numeric[0]]) for r in grid["rows"]):
            x_axis = numeric[0]
            groups: dict[str, list] = {}
            for r, s in zip(grid["rows"], stats, strict=True):
                rest = _row_label({k: v for k, v in r["values"].items() if k != x_axis}) or key
                groups.setdefault(rest, []).append((float(r["values"][x_axis]), s))
            for label, pts in groups.items():
                pts.sort()
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1][0] for p in pts],
                    yerr=[_nz(p[1][1]) for p in pts],
                    marker="o",
                    capsize=3,
                    label=label,
                )
            ax.set_xlabel(x_axis)
            ax.legend(fontsize=7)
        else:
            one = len(grid["axes"]) == 1  # a single axis: its values are the labels
            labels = [
                next(iter(r["values"].values())) if one else _row_label(r["values"]) for r in grid["rows"]
            ]
            ax.bar(
                range(len(labels)),
                [s[0] for s in stats],
                yerr=[_nz(s[1]) for s in stats],
                capsize=3,
                color="tab:blue",
            )
            ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        if baseline_runs:
            bm, bhw, _ = _stats(metrics, baseline_runs, key)
            if math.isfinite(bm):
                ax.axhline(bm, color="gray", ls="--", lw=1, label="baseline")
                if math.isfinite(bhw):
                    ax.axhspan(bm - bhw, bm + bhw, color="gray", alpha=0.15)
        ax.set_title(key, fontsize=9)
    fig.suptitle(f"{grid['title']}: mean and 95% t-interval over seeds", fontsize=10)
    fig.tight_layout()
    try:
        files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    finally:
        plt.close(fig)


def _nz(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _baseline_runs(state: dict, grid: dict) -> list[str] | None:
    """The runs a grid's conclusion compares with: its `baseline` row (axis values), else the first row of any
    grid whose only axis value is the sweep's baseline bundle (e.g. arm = uniform, nothing else varied)."""
    want = grid.get("baseline_values")
    if want:
        return next(
            (r["runs"] for r in grid["rows"] if r["values"] == {k: _fmt(v) for k, v in want.items()}), None
        )
    for g in state["grids"]:
        for r in g["rows"]:
            if list(r["values"].values()) == [grid["baseline"]]:
                return r["runs"]
    return None


def write_report(out_dir: str | os.PathLike, report_dir: str | os.PathLike | None = None) -> Path:
    """report.md + plots/<grid>.png from sweep.json and the finished runs' summary.json files, in `report_dir`
    (default: the sweep file's report_dir, recorded in sweep.json)."""
    out_dir = Path(out_dir)
    path = out_dir / "sweep.json"
    if not path.is_file():
        raise SweepError(f"{out_dir}: no sweep.json (not a sweep directory, or the sweep never started)")
    state = json.loads(path.read_text())
    report_dir = Path(report_dir or state.get("report_dir") or out_dir)
    metrics = load_metrics(out_dir)
    all_runs = list(dict.fromkeys(n for g in state["grids"] for r in g["rows"] for n in r["runs"]))
    finished = [n for n in all_runs if n in metrics]
    hours = sum(state["runs"].get(n, {}).get("seconds", 0.0) for n in all_runs) / 3600
    commits = sorted({state["runs"].get(n, {}).get("commit", "?") for n in finished}) or [
        state.get("commit", "?")
    ]
    lines = [
        f"# Sweep report: {state['name']}",
        "",
        f"- sweep file: `{state['file']}`; runs in `{out_dir}`: {len(finished)} of {len(all_runs)} finished",
        f"- code: commit {', '.join(f'`{c}`' for c in commits)}",
        f"- reproduce: `python sweep.py {state['file']}` (rebuild this report: `python sweep.py --report {out_dir}`)",
        f"- generated {time.strftime('%Y-%m-%d %H:%M')} on {socket.gethostname()} ({os.cpu_count()} cores); "
        f"run time of the runs: {hours:.2f} h (wall clock, while the machine was shared)",
    ]
    if state.get("parent_run"):
        lines.append(f"- MLflow: experiment `sweep/{state['name']}`, parent run `{state['parent_run']}`")
    lines += [
        "",
        "Every number is the mean over seeds ± the half-width of its 95% t-interval (n - 1 degrees of freedom), "
        "computed from the runs' `summary.json`; the conclusions below are generated from the same numbers.",
    ]
    if state.get("description"):
        lines += ["", state["description"].strip()]
    for g in state["grids"]:
        if not g.get("report", True):
            continue
        lines += ["", f"## {g['title']}", ""]
        for axis_value, cand in g.get("picked", {}).items():
            lines.append(f"- `{axis_value}` is **{cand}**: the best of its candidates on `{g['primary']}`.")
        if g.get("picked"):
            lines.append("")  # a table right under a list item renders as part of the list
        head = [*g["axes"], "n", *g["metrics"]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in g["rows"]:
            cells = [_cell(*_stats(metrics, r["runs"], k)) for k in g["metrics"]]
            n = sum(1 for x in r["runs"] if x in metrics)
            lines.append("| " + " | ".join([*(r["values"][a] for a in g["axes"]), str(n), *cells]) + " |")
        plot = report_dir / "plots" / f"{g['name']}.png"
        baseline = _baseline_runs(state, g)
        _plot(g, metrics, baseline, plot)
        lines += [
            "",
            f"![{g['name']}](plots/{plot.name})",
            "",
            "**Conclusion (computed).** " + conclusion(g, metrics, baseline),
        ]
    lines += ["", "## Runs", "", "| run | seconds | " + state["grids"][0]["primary"] + " |", "|---|---|---|"]
    for n in all_runs:
        sec = state["runs"].get(n, {}).get("seconds")
        val = metrics.get(n, {}).get(state["grids"][0]["primary"])
        lines.append(f"| {n} | {sec:.0f} | {val:.4g} |" if sec and val is not None else f"| {n} | – | – |")
    notes = Path(state.get("notes") or "")
    if state.get("notes") and notes.is_file():
        lines += [
            "",
            "## Notes (written by hand after reading the results above)",
            "",
            notes.read_text().strip(),
        ]
    out = report_dir / "report.md"
    files.atomic_write_text(out, "\n".join(lines) + "\n")
    return out


# --------------------------------------------------------------------------- CLI


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the sweep is, so that `launch_all` stops its runs as on Ctrl-C: a run left alone
    would go on writing into a directory that the next sweep resumes."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n")[0])
    ap.add_argument("sweep", nargs="?", help="sweep file (TOML)")
    ap.add_argument("--report", metavar="DIR", help="rebuild report.md + plots from DIR's finished runs")
    ap.add_argument("--out", metavar="DIR", help="where --report writes (default: the sweep's report_dir)")
    ap.add_argument("--dry-run", action="store_true", help="expand and check every run's config; run nothing")
    ap.add_argument("--parallel", type=int, help="runs at once (default: the sweep file's `parallel`)")
    ap.add_argument("--launcher", help='e.g. "python" or "torchrun --standalone --nproc_per_node=4"')
    ap.add_argument("--seeds", help="comma-separated seeds for the grids without their own (e.g. more seeds)")
    a = ap.parse_args(argv)
    if a.report:
        print(f"sweep: report {write_report(a.report, a.out)}")
        return 0
    if not a.sweep:
        ap.error("give a sweep file, or --report DIR")
    sw = load_sweep(a.sweep)
    if a.seeds:
        try:
            sw.seeds = [int(x) for x in a.seeds.split(",")]
        except ValueError:
            raise SweepError(f"--seeds {a.seeds!r}: expected comma-separated integers") from None
    if a.dry_run:
        return dry_run(sw)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return run_sweep(sw, a.launcher or sw.launcher, a.parallel or sw.parallel)
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
