"""The results of a sweep: the ledger of its finished runs, statistics over seeds, and the report built from them.

The ledger, `<report_dir>/runs.jsonl`, is committed beside the report: one line per finished run with its name,
grid, axis values and seed, the digest of its resolved config (credentials scrubbed), the commit that ran it, its
run time and the summary metrics that the report and the picks read (every metric the sweep file names, the
losses and cost/*). sweep.py rewrites it atomically as each run finishes. Run directories live under runs/,
which git ignores, so in a fresh clone the ledger is what remains of a study: `python sweep.py FILE --report`
rebuilds the report from it, and a rerun of the sweep counts a run whose entry matches its config as done.

One finite-value rule for every number (`row_stats`, `rank`): a row's mean, interval and n are over its seeds'
finite values; a seed whose value is NaN or inf is counted apart, marked in the table (⚠) and named in the
conclusion, and its row ranks behind every row whose seeds are all finite, in the picks as in the conclusions.
Seeds whose results are all identical replicate nothing (a seed key that changes nothing in the run): such a row
gets no interval and the conclusion says so.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import errors
import files
from s3cache import scrub

LEDGER = "runs.jsonl"
ALWAYS = ("steps", "final_val_loss", "best_val_loss")  # kept in every ledger entry beside the named metrics


class SweepError(errors.UserError, ValueError):
    """A problem with a sweep file, its runs or its results: the message names the file / key / run and what was
    expected."""


def read_json(path: str | os.PathLike, what: str, hint: str) -> Any:
    """A JSON file that a sweep or a run wrote; a corrupt one is a one-line error naming it (and `hint`: what to do)."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SweepError(f"{path}: corrupt {what} ({type(e).__name__}: {e}): {hint}") from None


def fmt_value(v: Any) -> str:
    """An axis value as the tables and run names show it."""
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """The committed record of finished runs, one JSON object per line, keyed by the digest of the config."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}  # config digest -> entry, in the order the runs finished
        if not self.path.is_file():
            return
        try:
            lines = self.path.read_text().splitlines()
        except UnicodeDecodeError as e:
            raise SweepError(f"{self.path}: not UTF-8 text ({e})") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not (isinstance(entry["config"], str) and isinstance(entry["run"], str)):
                    raise TypeError("'config' and 'run' must be strings")
                if not isinstance(entry["metrics"], dict):
                    raise TypeError("'metrics' must be a table")
            except (ValueError, KeyError, TypeError) as e:
                raise SweepError(
                    f"{self.path}:{i}: not a ledger entry ({type(e).__name__}: {e}): repair or delete that line "
                    "(its run is then trained again)"
                ) from None
            self.entries[entry["config"]] = entry

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def record(self, entry: dict) -> None:
        """Add a finished run (replacing an earlier entry of its config or its name) and rewrite the file."""
        for k in [k for k, e in self.entries.items() if e["run"] == entry["run"] and k != entry["config"]]:
            del self.entries[
                k
            ]  # the run's config changed since: the old result no longer belongs to this sweep
        self.entries[entry["config"]] = entry
        text = "".join(scrub(json.dumps(e)) + "\n" for e in self.entries.values())
        files.atomic_write_text(self.path, text)


def run_metrics(summary: dict) -> dict[str, float]:
    """summary.json as flat numbers: top-level values and the entries of its sections (synthetic, eval, cost)."""
    out = {}
    for k, v in summary.items():
        items = v.items() if isinstance(v, dict) else [(k, v)]
        for kk, vv in items:
            if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                out[kk] = float(vv)
    return out


def ledger_entry(identity: dict, summary: dict, named: set[str]) -> dict:
    """A run's ledger line: `identity` (run, grid, values, seed, config, commit, seconds), when it finished, and
    the metrics of its summary that a report or a pick can read: the `named` ones, the losses and cost/*."""
    flat = run_metrics(summary)
    keep = {k: v for k, v in flat.items() if k in named or k in ALWAYS or k.startswith("cost/")}
    return {**identity, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": keep}


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


def seed_of(run: str) -> str | None:
    """The seed in a sweep run's name (`arm--key=value--s3` -> "3"), None if the name carries none."""
    m = re.search(r"--s(-?\d+)$", run)
    return m.group(1) if m else None


def paired_ci(metrics: dict, a_runs: list[str], b_runs: list[str], key: str) -> tuple[float, float, int]:
    """(mean, t half-width, n) of a - b over the seeds both rows ran, each with a finite value. A seed sets the
    corpus, its order and the initialisation alike in every row of a sweep, so the two runs of one seed differ only
    by the compared setting: pairing removes the seed-to-seed spread that Welch's interval has to carry."""
    a = {seed_of(r): metrics.get(r, {}).get(key) for r in a_runs}
    b = {seed_of(r): metrics.get(r, {}).get(key) for r in b_runs}
    diffs = [a[s] - b[s] for s in a if s is not None and s in b and _finite([a[s]]) and _finite([b[s]])]
    return mean_ci(diffs)


@dataclass
class Stats:
    """One row's numbers on one metric by the finite-value rule: mean, interval half-width and n over the finite
    values; `bad` names the runs whose value is NaN or inf; `identical`: its seeds replicated nothing."""

    mean: float = math.nan
    hw: float = math.nan
    n: int = 0
    bad: list[str] = field(default_factory=list)
    identical: bool = False


def _values(metrics: dict, runs: list[str], key: str) -> list[float | None]:
    return [metrics.get(n, {}).get(key) for n in runs]


def identical_seeds(metrics: dict, runs: list[str]) -> bool:
    """Two or more finished runs whose every recorded result (cost/* and steps aside) is equal: the seeds changed
    nothing in these runs (e.g. a seed key the run does not use), so they are one run counted several times."""
    got = [metrics[r] for r in dict.fromkeys(runs) if r in metrics]
    keys = {k for m in got for k in m if not k.startswith("cost/") and k != "steps"}
    return len(got) > 1 and bool(keys) and all(len({repr(m.get(k)) for m in got}) == 1 for k in keys)


def row_stats(metrics: dict, runs: list[str], key: str) -> Stats:
    """The finite-value rule, the one way every table cell, plot, pick and conclusion reads a row."""
    vals = [(r, v) for r, v in zip(runs, _values(metrics, runs, key), strict=True) if v is not None]
    m, hw, n = mean_ci([v for _, v in vals])
    same = identical_seeds(metrics, runs)
    return Stats(m, math.nan if same else hw, n, [r for r, v in vals if not math.isfinite(v)], same)


def rank(stats: dict[Any, Stats], goal: str) -> list[Any]:
    """The keys of `stats`, best first: rows with a finite value only; a row with a non-finite seed behind every
    row whose seeds are all finite (a diverged seed is a result, not a value to leave out); then by mean."""
    sign = 1.0 if goal == "min" else -1.0
    return sorted(
        (k for k, s in stats.items() if s.n), key=lambda k: (bool(stats[k].bad), sign * stats[k].mean)
    )


def choose(stats: dict[str, Stats], goal: str) -> tuple[str | None, str]:
    """(the best candidate by `rank`, a note naming the candidates with a non-finite seed) for a pick_best."""
    order = rank(stats, goal)
    flagged = [k for k, s in stats.items() if s.bad]
    if not flagged:
        return (order[0] if order else None), ""
    note = "a non-finite seed ranks a candidate behind those whose seeds are all finite: " + ", ".join(
        f"{k} ({', '.join(stats[k].bad)})" for k in flagged
    )
    if order and stats[order[0]].bad:
        note += f"; every candidate has one, so {order[0]} is picked on its {stats[order[0]].n} finite seeds"
    return (order[0] if order else None), note + "."


# --------------------------------------------------------------------------- the report


def cell(s: Stats) -> str:
    """`mean ± half-width` (mean alone without an interval), marked when a seed is non-finite or all are equal."""
    digits = lambda x: f"{x:.4g}"  # noqa: E731
    text = "–" if s.n == 0 else digits(s.mean) + (f" ± {digits(s.hw)}" if math.isfinite(s.hw) else "")
    if s.bad:
        text += f" ⚠ {len(s.bad)} non-finite"
    if s.identical and s.n:
        text += " (seeds identical)"
    return text


def row_label(values: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _rows_named(grid: dict, idx: list[int], what: str, detail=lambda i: "") -> str:
    names = "; ".join(f"**{row_label(grid['rows'][i]['values'])}**{detail(i)}" for i in idx)
    return f" {what}: {names}." if idx else ""


def _caveats(grid: dict, stats: dict[int, Stats], best: int) -> str:
    """What the ranking must say: rows with a non-finite seed, rows whose seeds replicated nothing."""
    bad = [i for i, s in stats.items() if s.bad]
    text = _rows_named(
        grid,
        bad,
        "Rows with a non-finite seed, ranked behind every row whose seeds are all finite (their numbers are over "
        "their finite seeds)",
        lambda i: f" ({', '.join(stats[i].bad)})",
    )
    if stats[best].bad:
        text += f" Every row has one: the best is ranked on its {stats[best].n} finite seeds only."
    same = [i for i, s in stats.items() if s.identical]
    return text + _rows_named(
        grid, same, "Rows whose seeds gave identical results (they replicate nothing; no interval)"
    )


def _intervals(
    grid: dict, metrics: dict, best_runs: list[str], baseline_runs: list[str], s: Stats, b: Stats
) -> str:
    key, goal = grid["primary"], grid["goal"]
    diff = s.mean - b.mean
    if not (math.isfinite(s.hw) and math.isfinite(b.hw)):
        why = (
            "the seeds of a compared row replicate nothing"
            if s.identical or b.identical
            else "fewer than 2 seeds"
        )
        return f" (No interval: {why}.)"
    overlap = (s.mean - s.hw) <= (b.mean + b.hw) and (b.mean - b.hw) <= (s.mean + s.hw)
    wins = (diff < 0) == (goal == "min") and diff != 0
    text = (
        " The 95% intervals overlap: the difference is not resolved by these seeds."
        if overlap
        else f" The 95% intervals do not overlap: the best row is {'better' if wins else 'worse'} than the baseline."
    )
    d, dhw, df = diff_ci(_values(metrics, best_runs, key), _values(metrics, baseline_runs, key))
    resolved = d - dhw > 0 or d + dhw < 0
    return (
        text
        + f" 95% interval of the difference (Welch, df {df}): [{d - dhw:+.4g}, {d + dhw:+.4g}], "
        + (
            f"excluding 0: the best row is {'better' if wins else 'worse'} than the baseline."
            if resolved
            else "including 0: not resolved."
        )
        + _paired(metrics, best_runs, baseline_runs, key, goal)
    )


def _paired(metrics: dict, best_runs: list[str], baseline_runs: list[str], key: str, goal: str) -> str:
    """The paired-by-seed interval of the difference, when at least two seeds ran on both sides."""
    m, hw, n = paired_ci(metrics, best_runs, baseline_runs, key)
    if n < 2 or not math.isfinite(hw):
        return ""
    wins = (m < 0) == (goal == "min")
    verdict = (
        f"excluding 0: the best row is {'better' if wins else 'worse'} than the baseline on the same seeds."
        if m - hw > 0 or m + hw < 0
        else "including 0: not resolved."
    )
    return f" Paired by seed ({n} seeds run by both rows): [{m - hw:+.4g}, {m + hw:+.4g}], {verdict}"


def conclusion(grid: dict, metrics: dict, baseline_runs: list[str] | None) -> str:
    """The best row on the primary metric (by `rank`), by how much it beats the baseline, and whether that is
    resolved; rows with a non-finite seed or identical seeds are named."""
    key, goal = grid["primary"], grid["goal"]
    stats = {i: row_stats(metrics, r["runs"], key) for i, r in enumerate(grid["rows"])}
    order = rank(stats, goal)
    if not order:
        bad = [r for s in stats.values() for r in s.bad]
        return f"No finished runs with a finite `{key}` yet" + (
            f" (non-finite: {', '.join(bad)})." if bad else "."
        )
    best, s = grid["rows"][order[0]], stats[order[0]]
    better = "lower" if goal == "min" else "higher"
    text = f"Best on `{key}` ({better} is better): **{row_label(best['values'])}**, {cell(s)} (n={s.n})."
    text += _caveats(grid, stats, order[0])
    if not baseline_runs:
        return text + f" The baseline ({grid['baseline'] or 'none'}) has no finished runs in this sweep."
    b = row_stats(metrics, baseline_runs, key)
    if set(best["runs"]) == set(baseline_runs):
        return text + " That is the baseline itself: no row beats it."
    diff = s.mean - b.mean
    rel = f" ({diff / abs(b.mean) * 100:+.1f}%)" if b.mean else ""
    want = grid.get("baseline_values")
    label = row_label({k: fmt_value(v) for k, v in want.items()}) if want else grid["baseline"]
    text += f" Baseline {label}: {cell(b)} (n={b.n}); difference {diff:+.4g}{rel}."
    if b.bad:
        text += f" The baseline has a non-finite seed ({', '.join(b.bad)}): its numbers are over its finite seeds."
    return text + _intervals(grid, metrics, best["runs"], baseline_runs, s, b)


def _bars(ax, grid: dict, stats: list[Stats]) -> None:
    one = len(grid["axes"]) == 1  # a single axis: its values are the labels
    labels = [next(iter(r["values"].values())) if one else row_label(r["values"]) for r in grid["rows"]]
    ax.bar(range(len(labels)), [s.mean for s in stats], yerr=[_nz(s.hw) for s in stats], capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)


def _lines(ax, grid: dict, stats: list[Stats], x_axis: str, key: str) -> None:
    groups: dict[str, list] = {}
    for r, s in zip(grid["rows"], stats, strict=True):
        rest = row_label({k: v for k, v in r["values"].items() if k != x_axis}) or key
        groups.setdefault(rest, []).append((float(r["values"][x_axis]), s))
    for label, pts in groups.items():
        pts.sort(key=lambda p: p[0])
        xs, ys, es = [p[0] for p in pts], [p[1].mean for p in pts], [_nz(p[1].hw) for p in pts]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.set_xlabel(x_axis)
    ax.legend(fontsize=7)


def _plot(grid: dict, metrics: dict, baseline_runs: list[str] | None, path: Path) -> None:
    import matplotlib  # here, not at the top: sweep.py's CLI stays light until a report is drawn

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
        stats = [row_stats(metrics, r["runs"], key) for r in grid["rows"]]
        if len(numeric) == 1 and all(_is_number(r["values"][numeric[0]]) for r in grid["rows"]):
            _lines(ax, grid, stats, numeric[0], key)
        else:
            _bars(ax, grid, stats)
        if baseline_runs:
            b = row_stats(metrics, baseline_runs, key)
            if math.isfinite(b.mean):
                ax.axhline(b.mean, color="gray", ls="--", lw=1, label="baseline")
                if math.isfinite(b.hw):
                    ax.axhspan(b.mean - b.hw, b.mean + b.hw, color="gray", alpha=0.15)
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


def baseline_runs(state: dict, grid: dict) -> list[str] | None:
    """The runs a grid's conclusion compares with: its `baseline` row (axis values), else the first row of any
    grid whose only axis value is the sweep's baseline bundle (e.g. arm = uniform, nothing else varied)."""
    want = grid.get("baseline_values")
    if want:
        want = {k: fmt_value(v) for k, v in want.items()}
        return next((r["runs"] for r in grid["rows"] if r["values"] == want), None)
    for g in state["grids"]:
        for r in g["rows"]:
            if list(r["values"].values()) == [grid["baseline"]]:
                return r["runs"]
    return None


def _header(state: dict, results: dict[str, dict], all_runs: list[str]) -> list[str]:
    finished = [n for n in all_runs if n in results]
    hours = sum(results[n].get("seconds", 0.0) for n in finished) / 3600
    commits = sorted({results[n].get("commit", "?") for n in finished}) or [state.get("commit", "?")]
    lines = [
        f"# Sweep report: {state['name']}",
        "",
        f"- sweep file: `{state['file']}`; {len(finished)} of {len(all_runs)} runs finished (ledger: "
        f"`{Path(state['report_dir']) / LEDGER}`)",
        f"- code: commit {', '.join(f'`{c}`' for c in commits)}",
        f"- reproduce: `python sweep.py {state['file']}` (rebuild this report from the ledger: "
        f"`python sweep.py {state['file']} --report`)",
        f"- generated {time.strftime('%Y-%m-%d %H:%M')} on {socket.gethostname()} ({os.cpu_count()} cores); "
        f"run time of the runs: {hours:.2f} h (wall clock, while the machine was shared)",
    ]
    if state.get("parent_run"):
        lines.append(f"- MLflow: experiment `sweep/{state['name']}`, parent run `{state['parent_run']}`")
    lines += [
        "",
        "Every number is the mean over seeds ± the half-width of its 95% t-interval (n - 1 degrees of freedom), "
        "over the seeds with a finite value (n; ⚠ marks a row with a NaN or inf seed), computed from the runs' "
        "summaries; the conclusions below are generated from the same numbers.",
    ]
    return lines + (["", state["description"].strip()] if state.get("description") else [])


def _grid_section(state: dict, g: dict, metrics: dict, report_dir: Path) -> list[str]:
    lines = ["", f"## {g['title']}", ""]
    for axis_value, cand in g.get("picked", {}).items():
        note = g.get("pick_notes", {}).get(axis_value)
        lines.append(
            f"- `{axis_value}` is **{cand}**: the best of its candidates on `{g['primary']}`"
            + (f"; {note}" if note else ".")
        )
    if g.get("picked"):
        lines.append("")  # a table right under a list item renders as part of the list
    head = [*g["axes"], "n", *g["metrics"]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in g["rows"]:
        p = row_stats(metrics, r["runs"], g["primary"])
        n = f"{p.n}" + (f" ⚠ +{len(p.bad)} non-finite" if p.bad else "")
        cells = [cell(row_stats(metrics, r["runs"], k)) for k in g["metrics"]]
        lines.append("| " + " | ".join([*(r["values"][a] for a in g["axes"]), n, *cells]) + " |")
    plot = report_dir / "plots" / f"{g['name']}.png"
    baseline = baseline_runs(state, g)
    _plot(g, metrics, baseline, plot)
    return lines + [
        "",
        f"![{g['name']}](plots/{plot.name})",
        "",
        "**Conclusion (computed).** " + conclusion(g, metrics, baseline),
    ]


def write_report(state: dict, results: dict[str, dict], report_dir: str | os.PathLike) -> Path:
    """report.md + plots/<grid>.png in `report_dir`, from the sweep's expansion (`state`: name, file, grids with
    their rows of runs) and `results`, {run name: ledger entry} of the finished runs."""
    report_dir = Path(report_dir)
    metrics = {n: e["metrics"] for n, e in results.items()}
    all_runs = list(dict.fromkeys(n for g in state["grids"] for r in g["rows"] for n in r["runs"]))
    lines = _header(state, results, all_runs)
    for g in state["grids"]:
        if g.get("report", True):
            lines += _grid_section(state, g, metrics, report_dir)
    primary = state["grids"][0]["primary"]
    lines += ["", "## Runs", "", f"| run | seconds | {primary} |", "|---|---|---|"]
    for n in all_runs:
        sec, val = results.get(n, {}).get("seconds"), metrics.get(n, {}).get(primary)
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
    files.atomic_write_text(out, scrub("\n".join(lines) + "\n"))
    return out
