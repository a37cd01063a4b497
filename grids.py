"""Sweep files: their format, their checks, and their expansion into runs (a grid's rows x seeds).

A sweep file (TOML) names a base config, named bundles of overrides, and grids over them:

    name = "synthetic"                     # MLflow experiment "sweep/<name>"; one parent run per sweep
    base = "configs/synthetic.toml"        # every run starts from this config (a bundle may switch it)
    out_dir = "runs/research/synthetic"    # run directories <out_dir>/<run>/, sweep.json, logs/
    report_dir = "docs/results/synthetic"  # report.md + plots/ + the ledger runs.jsonl (default: out_dir)
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

Runs whose resolved configs are equal are one run (the name of its first occurrence: `arm--key=value--s0`), so a
grid around the defaults reuses the arms grid's runs. Two seeds of a row that resolve to one run are refused:
their seed_keys change nothing, so they would replicate nothing. A run's identity (`Run.key`, the ledger's key)
is a digest of its resolved config as train.py writes it to config.json: credentials scrubbed, the keys that only
name it (RUN_KEYS) and the tracking / storage sections left out, paths inside the repository relative, so that it
holds in any clone. Credentials in overrides (`storage.endpoint_url`, the user:password of
`tracking.uri`) go to the run's environment (`Run.env`), never to its command line; any other is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config as C
import report
from errors import scrub
from report import SweepError, fmt_value

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
GRID_KEYS = {
    "name": str,
    "title": str,
    "seeds": list,
    "seed_keys": list,
    "metrics": list,
    "report": bool,
    "baseline": (str, dict),
}
BUNDLE_META = {"base", "pick_best", "from_grid"}
# keys that name a run, sections that say where it is logged and where its files live, and keys that say how a
# result is computed, not what (`model.ce_chunk`: the head CE in chunks of positions, equal to the unchunked CE to
# 1e-6 in float64, tests/test_model.py): not part of a run's identity (equal configs up to these are one run, in any
# clone, on any machine, so a ledger written before such a key existed still counts its runs done)
RUN_KEYS = ("train.out_dir", "train.run_name")
NOT_IDENTITY = ("tracking.", "storage.", "model.ce_chunk")


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
    ledger: report.Ledger = field(repr=False, default=None)  # <report_dir>/runs.jsonl


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(type(s) is int for s in value):
        raise SweepError(
            f"{where}: 'seeds' must be a non-empty list of integers, e.g. [0, 1, 2]; got {value!r}"
        )
    return list(value)


def _seed_keys(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(k, str) and "." in k for k in value):
        raise SweepError(
            f"{where}: 'seed_keys' must be a list of dotted config keys, e.g. [\"train.seed\"]; got {value!r}"
        )
    return list(value)


def check_parallel(value: Any, where: str) -> int:
    if type(value) is not int or value < 1:
        raise SweepError(f"{where}: 'parallel' must be an integer >= 1 (runs at once), got {value!r}")
    return value


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep file (types, names, axes, seeds); configs are checked by `expand`."""
    path = Path(path)
    text, spec = C.read_toml(path, "sweep file")  # a file that is not UTF-8 or TOML: one line
    bundles = {k: v for k, v in spec.items() if k not in TOP_KEYS}
    for key, tp in TOP_KEYS.items():
        if key in spec and not isinstance(spec[key], tp) and key not in ("seeds", "seed_keys", "parallel"):
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
        seeds=_seeds(spec.get("seeds", [0]), str(path)),
        seed_keys=_seed_keys(spec.get("seed_keys", ["train.seed"]), str(path)),
        launcher=spec.get("launcher", "python"),
        parallel=check_parallel(spec.get("parallel", 1), str(path)),
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
    _check_bundles(sw)
    sw.ledger = report.Ledger(sw.report_dir / report.LEDGER)
    return sw


def _check_grids(sw: Sweep) -> None:
    names = set()
    for i, g in enumerate(sw.grids):
        where = f"{sw.path}: grid {i + 1}"
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not g["name"]:
            raise SweepError(f"{where}: needs a name")
        if g["name"] in names:
            raise SweepError(f"{where}: duplicate grid name {g['name']!r}")
        names.add(g["name"])
        where = f"{where} ({g['name']})"
        for axis, values in g.items():
            if axis in GRID_KEYS:
                tp = GRID_KEYS[axis]
                if axis not in ("seeds", "seed_keys") and not isinstance(values, tp):
                    want = " or ".join(t.__name__ for t in tp) if isinstance(tp, tuple) else tp.__name__
                    raise SweepError(f"{where}: '{axis}' must be {want}, got {values!r}")
                continue
            if not isinstance(values, list) or not values:
                raise SweepError(f"{where}: axis '{axis}' must be a non-empty list of values")
            if "." not in axis and axis not in sw.bundles:
                raise SweepError(
                    f"{where}: axis '{axis}' is neither a dotted config key nor a bundle table [{axis}.<name>]"
                )
            for v in values if axis in sw.bundles else []:
                if v not in sw.bundles[axis]:
                    raise SweepError(
                        f"{where}: {axis} = {v!r} has no table [{axis}.{v}] (known: {', '.join(sw.bundles[axis])})"
                    )
        _seeds(g.get("seeds", sw.seeds), where)
        _seed_keys(g.get("seed_keys", sw.seed_keys), where)


def _check_bundles(sw: Sweep) -> None:
    names = {g["name"] for g in sw.grids}
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
    overrides: dict[str, Any]  # as on the command line: credentials are in `env`
    key: str  # digest of the resolved config without RUN_KEYS / NOT_IDENTITY (the ledger's key)
    tags: dict[str, str]
    steps: int
    config: dict = field(repr=False, default_factory=dict)
    env: dict[str, str] = field(repr=False, default_factory=dict)  # credentials, passed in the environment
    grid: str = ""
    seed: int = 0
    values: dict[str, str] = field(default_factory=dict)


@dataclass
class Row:
    """One line of a grid's table: a combination of its axis values, one run per seed."""

    values: dict[str, str]
    runs: list[str]


def subst(v: Any, out_dir: Path) -> Any:
    return v.replace("{out_dir}", str(out_dir)) if isinstance(v, str) else v


def canonical(d: dict) -> dict:
    """A config as train.py writes it to config.json (credentials scrubbed), flat, without RUN_KEYS and the
    NOT_IDENTITY sections, paths inside the repository relative: what makes two runs one run."""
    flat = C.flatten(json.loads(scrub(json.dumps(d))))
    root = f"{C.REPO}/"
    return {
        k: v.replace(root, "") if isinstance(v, str) else v
        for k, v in flat.items()
        if k not in RUN_KEYS and not k.startswith(NOT_IDENTITY) and k != "source"
    }


def digest(canonical: dict) -> str:
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()[:16]


def credentials(ov: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(overrides for the command line, environment for the run): a credential travels to the run in the
    environment variable that train.py and MLflow already read for it, never in argv (ps, logs, sweep.json)."""
    ov, env = dict(ov), {}
    uri = ov.get("tracking.uri")
    if isinstance(uri, str) and scrub(uri) != uri:
        u = urllib.parse.urlsplit(uri)
        if not u.username or u.password is None:
            raise SweepError(
                f"{where}: 'tracking.uri' holds a credential other than user:password@: set MLFLOW_TRACKING_TOKEN "
                "(or MLFLOW_TRACKING_USERNAME / _PASSWORD) in the environment instead"
            )
        env["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(u.username)
        env["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(u.password)
        ov["tracking.uri"] = urllib.parse.urlunsplit(u._replace(netloc=u.netloc.rpartition("@")[2]))
    url = ov.get("storage.endpoint_url")
    if isinstance(url, str) and scrub(url) != url:
        env["AWS_ENDPOINT_URL"], ov["storage.endpoint_url"] = url, ""  # train.py's fallback for an empty one
    for k, v in ov.items():
        if scrub(json.dumps(v)) != json.dumps(v):
            raise SweepError(
                f"{where}: '{k}' holds a credential; a sweep passes credentials to its runs only through the "
                "environment: set it there (AWS_*, MLFLOW_TRACKING_*, HF_TOKEN) instead of in the sweep file"
            )
    return ov, env


def resolve(sw: Sweep, base: str, overrides: dict[str, Any], where: str) -> C.Config:
    """The run's config: base file + overrides, checked by config.py (errors name the sweep file and run)."""
    args = [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]
    try:
        return C.load_config(base, args)
    except C.ConfigError as e:
        raise SweepError(f"{sw.path}: {where}: {e}") from None
    except UnicodeDecodeError as e:
        raise SweepError(f"{sw.path}: {where}: base config {base}: not UTF-8 text ({e})") from None


def _bundle(sw: Sweep, axis: str, value: str, picks: dict[str, str]) -> tuple[str | None, dict[str, Any]]:
    """(base or None, overrides) of a bundle; a pick_best bundle is its picked candidate plus its own keys."""
    table = sw.bundles[axis][value]
    base, overrides = None, {}
    if "pick_best" in table:
        base, overrides = _bundle(sw, axis, picks[f"{axis}.{value}"], picks)
    base = table.get("base", base)
    overrides.update({k: subst(v, sw.out_dir) for k, v in table.items() if k not in BUNDLE_META})
    return base, overrides


def _combo(sw: Sweep, axes: list, combo: tuple, picks: dict[str, str], dry: bool) -> tuple:
    """(base, overrides, name parts, axis values) of one combination of a grid's axis values."""
    base, overrides = sw.base, {k: subst(v, sw.out_dir) for k, v in sw.set.items()}
    label, values = [], {}
    for (axis, _), v in zip(axes, combo, strict=True):
        if axis in sw.bundles:
            b, extra = _bundle(sw, axis, v, picks)
            base = b or base
            overrides.update(extra)
            label.append(f"{v}={picks[f'{axis}.{v}']}" if dry and f"{axis}.{v}" in picks else str(v))
        else:
            overrides[axis] = subst(v, sw.out_dir)
            label.append(f"{axis}={fmt_value(v)}")
        values[axis] = scrub(fmt_value(v))
    return base, overrides, label, values


def _new_run(sw: Sweep, grid: str, name: str, base: str, ov: dict, seed: int, values: dict) -> Run:
    ov, env = credentials(ov, f"{sw.path}: run {name}")
    cfg = resolve(sw, base, ov, f"run {name}")
    canon = canonical(C.to_dict(cfg))
    tags = {"sweep": sw.name, "sweep.run": name, "sweep.grid": grid, "seed": str(seed), **values}
    return Run(name, base, ov, digest(canon), tags, cfg.train.steps, canon, env, grid, seed, values)


def expand(
    sw: Sweep, grid: dict[str, Any], picks: dict[str, str], runs: dict[str, Run], dry: bool = False
) -> list[Row]:
    """The rows of one grid; new runs are added to `runs` (by name), equal configs share one run. `dry` names a
    picked bundle's runs after the candidate too (the dry run expands every candidate)."""
    axes = [(a, v) for a, v in grid.items() if a not in GRID_KEYS]
    seed_keys = grid.get("seed_keys", sw.seed_keys)
    by_key = {r.key: r for r in runs.values()}
    rows = []
    for combo in itertools.product(*(values for _, values in axes)):
        base, overrides, label, values = _combo(sw, axes, combo, picks, dry)
        row = Row(values, [])
        for seed in grid.get("seeds", sw.seeds):
            name = "--".join([*label, f"s{seed}"]).replace("/", "_")
            run = _new_run(
                sw, grid["name"], name, base, {**overrides, **dict.fromkeys(seed_keys, seed)}, seed, values
            )
            if run.key in by_key:
                run = by_key[run.key]
            elif name in runs:
                raise SweepError(
                    f"{sw.path}: grid {grid['name']!r}: run name {name!r} is used by two different configs "
                    "(a picked bundle and another with the same name?)"
                )
            runs.setdefault(run.name, run)
            by_key.setdefault(run.key, run)
            if run.name in row.runs:
                raise SweepError(
                    f"{sw.path}: grid {grid['name']!r}: seed {seed} of {'--'.join(label) or 'the row'} resolves to "
                    f"the same run as an earlier seed ({run.name}): seed_keys {seed_keys} change nothing in it, "
                    "so its seeds would replicate nothing; give seed_keys that these runs use, or one seed"
                )
            row.runs.append(run.name)
        rows.append(row)
    return rows
