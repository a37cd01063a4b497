"""sweep.py: a 2-arm x 2-seed sweep end to end (runs, skip on rerun, resume / restart, MLflow parent run, report
with intervals), the grid expansion, the statistics and the computed conclusion, and --dry-run of the shipped
sweep files."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import config as C
import grids
import report
import sweep
from config import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("OMP_NUM_THREADS", None)  # the sweep sets 1 thread per run when it runs two at once


def write_sweep(tmp: Path, tiny: Path, body: str, name: str = "t") -> Path:
    text = f"""
name = "{name}"
base = "{REPO / "configs" / "synthetic.toml"}"
out_dir = "{tmp / "runs"}"
seeds = [0, 1]
seed_keys = ["train.seed", "data.seed"]
parallel = 2
primary = "synth/ce_learnable_head1"
baseline = "uniform"
metrics = ["synth/exact_match", "synth/auroc_clean_vs_noise"]

[set]
"model.path" = "{tiny / "synthetic_base"}"
"storage.cache_dir" = "{tmp / "cache"}"
"tracking.uri" = "sqlite:///{tmp / "mlflow.db"}"
"train.steps" = 3
"train.micro_batch_size" = 8
"train.val_batches" = 1
"train.log_every" = 1
"data.max_length" = 48
"data.synthetic.n_train" = 32
"data.synthetic.n_val" = 8
"data.synthetic.n_test" = 12
"critic.pretrain_steps" = 1

[arm.uniform]
"loss.scorer" = "uniform"

[arm.critic]
"loss.scorer" = "critic_delta_v1"
"critic.reward" = "dataset"
{body}
"""
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def run_sweep(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "sweep.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900
    )
    return p


ARMS = '[[grid]]\nname = "arms"\ntitle = "Arms"\narm = ["uniform", "critic"]'
NAMES = ["uniform--s0", "uniform--s1", "critic--s0", "critic--s1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dir):
    """A 2-arm x 2-seed sweep of 3-step runs, run once (4 at once) through the CLI."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = write_sweep(tmp, tiny_dir, ARMS)
    p = run_sweep(str(path), "--parallel", "4")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp, path


def test_sweep_end_to_end(finished, capsys):
    tmp, path = finished
    out = tmp / "runs"
    for n in NAMES:
        s = json.loads((out / n / "summary.json").read_text())
        assert s["steps"] == 3 and s["scorer"] == ("uniform" if n.startswith("u") else "critic_delta_v1")
        syn, sc = s["synthetic"], json.loads((out / n / "config.json").read_text())["data"]["synthetic"]
        share = [
            len(range(i, sc["n_test"], len(sc["tasks"]))) for i in range(len(sc["tasks"]))
        ]  # tasks in turn
        hits = sum(syn[f"synth/exact_match_{t}"] * k for t, k in zip(sc["tasks"], share, strict=True))
        assert syn["synth/exact_match"] == pytest.approx(hits / sc["n_test"])  # overall = pooled per task
        assert s["cost"]["cost/trainable_params"] == 1222272
    state = json.loads((out / "sweep.json").read_text())
    assert [r["runs"] for r in state["grids"][0]["rows"]] == [NAMES[:2], NAMES[2:]]

    # MLflow: one parent run, the four runs nested under it with their axis tags
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweep/t")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.run_id == state["parent_run"]
    assert parent[0].info.status == "FINISHED"
    assert "reports/report.md" in [a.path for a in client.list_artifacts(state["parent_run"], "reports")]
    children = {
        r.data.tags["sweep.run"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == state["parent_run"]
    }
    assert sorted(children) == sorted(NAMES)
    assert {n: r.data.tags["arm"] for n, r in children.items()} == {n: n.split("--")[0] for n in NAMES}
    assert all(r.info.status == "FINISHED" for r in children.values())

    # the report: a row per arm with mean ± t-interval half-width over the 2 seeds, and a computed conclusion
    md = (out / "report.md").read_text()
    metrics = {n: report.run_metrics(json.loads((out / n / "summary.json").read_text())) for n in NAMES}
    for arm in ("uniform", "critic"):
        vals = [metrics[f"{arm}--s{s}"]["synth/ce_learnable_head1"] for s in (0, 1)]
        m, hw, n = report.mean_ci(vals)
        assert n == 2 and f"| {arm} | 2 | {m:.4g} ± {hw:.4g} |" in md
    assert "**Conclusion (computed).** Best on `synth/ce_learnable_head1` (lower is better)" in md
    assert (out / "plots" / "arms.png").stat().st_size > 1000

    # rerun: everything is finished, nothing is launched
    before = {n: (out / n / "summary.json").stat().st_mtime_ns for n in NAMES}
    assert sweep.main([str(path)]) == 0
    assert "sweep: start" not in capsys.readouterr().out
    assert before == {n: (out / n / "summary.json").stat().st_mtime_ns for n in NAMES}

    # --report rebuilds the same tables from the run directories alone
    assert sweep.main(["--report", str(out), "--out", str(tmp / "rebuilt")]) == 0
    rebuilt = (tmp / "rebuilt" / "report.md").read_text()
    table = lambda t: [line for line in t.splitlines() if line.startswith("| uniform |")]  # noqa: E731
    assert table(rebuilt) == table(md) and table(rebuilt)


def test_sweep_run_states(finished, tmp_path):
    """done / resume (a checkpoint) / new (none); a directory holding another config is refused (exit 2)."""
    src, path = finished
    sw = grids.load_sweep(path)
    sw.out_dir = tmp_path / "runs"
    shutil.copytree(src / "runs", sw.out_dir)
    runs: dict = {}
    grids.expand(sw, sw.grids[0], {}, runs)
    assert {n: sweep.status(sw, r) for n, r in runs.items()} == dict.fromkeys(NAMES, "done")
    (sw.out_dir / "uniform--s0" / "summary.json").unlink()
    (sw.out_dir / "critic--s1" / "summary.json").unlink()
    shutil.rmtree(sw.out_dir / "critic--s1" / "checkpoints")
    assert sweep.status(sw, runs["uniform--s0"]) == "resume" and sweep.status(sw, runs["critic--s1"]) == "new"
    assert sweep.command(sw, runs["uniform--s0"], "python", None, resume=True)[-1] == "--resume"
    cmd = sweep.command(sw, runs["critic--s1"], "torchrun --standalone --nproc_per_node=4", "P", resume=False)
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc_per_node=4", str(REPO / "train.py")]
    assert cmd[4] == str(REPO / "configs" / "synthetic.toml") and "--resume" not in cmd
    assert '--tracking.parent_run="P"' in cmd and f'--train.out_dir="{sw.out_dir}"' in cmd
    # before a relaunch, the run's earlier MLflow runs still RUNNING (killed with the sweep) are marked KILLED
    from mlflow import MlflowClient

    shutil.copy(src / "mlflow.db", tmp_path / "mlflow.db")
    sw.set["tracking.uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(sw.set["tracking.uri"])
    exp = client.get_experiment_by_name("sweep/t").experiment_id
    stale, other = (
        client.create_run(exp, tags={"sweep.run": n}).info.run_id for n in ("uniform--s0", "critic--s1")
    )
    sweep._close_stale(sw, runs["uniform--s0"], parent="P")
    assert client.get_run(stale).info.status == "KILLED" and client.get_run(other).info.status == "RUNNING"
    cfg_file = sw.out_dir / "critic--s0" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["loss"]["lam"] = 0.9
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(
        sweep.SweepError, match=r"holds a run with another config than the sweep's \(differs in loss.lam\)"
    ):
        sweep.status(sw, runs["critic--s0"])


@pytest.mark.slow
def test_sweep_resumes_and_restarts(finished, tmp_path):
    """An interrupted run resumes from its checkpoint, one that never saved restarts; the rest is skipped."""
    src, _ = finished
    out = tmp_path / "runs"
    shutil.copytree(src / "runs", out)
    text = (src / "t.toml").read_text().replace(f'out_dir = "{src / "runs"}"', f'out_dir = "{out}"')
    path = tmp_path / "t.toml"
    path.write_text(text)
    (out / "uniform--s0" / "summary.json").unlink()
    (out / "critic--s1" / "summary.json").unlink()
    shutil.rmtree(out / "critic--s1" / "checkpoints")
    p = run_sweep(str(path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "start uniform--s0 (resume)" in p.stdout and "start critic--s1 (new)" in p.stdout
    assert p.stdout.count("sweep: start") == 2
    assert "resumed from" in (out / "logs" / "uniform--s0.log").read_text()
    assert all((out / n / "summary.json").is_file() for n in NAMES)


def test_expand_shares_equal_configs_and_picks(tmp_path, tiny_dir):
    body = """
[arm.best]
pick_best = ["uniform", "critic"]
from_grid = "arms"
"loss.temperature" = 1.5

[[grid]]
name = "arms"
arm = ["uniform", "critic"]

[[grid]]
name = "lambda"
arm = ["critic"]
"loss.lam" = [0.3, 0.6]

[[grid]]
name = "picked"
arm = ["best"]
"""
    sw = grids.load_sweep(write_sweep(tmp_path, tiny_dir, body))
    runs: dict = {}
    grids.expand(sw, sw.grids[0], {}, runs)
    rows = grids.expand(sw, sw.grids[1], {}, runs)
    # lam = 0.3 is critic's default: the lambda grid's first row is the arms grid's critic runs
    assert [r.runs for r in rows] == [
        ["critic--s0", "critic--s1"],
        ["critic--loss.lam=0.6--s0", "critic--loss.lam=0.6--s1"],
    ]
    assert rows[1].values == {"arm": "critic", "loss.lam": "0.6"}
    assert sorted(runs) == sorted(["uniform--s0", "uniform--s1", "critic--s0", "critic--s1", *rows[1].runs])
    picked = grids.expand(sw, sw.grids[2], {"arm.best": "critic"}, runs)
    r = runs[picked[0].runs[0]]
    assert r.overrides["loss.scorer"] == "critic_delta_v1" and r.overrides["loss.temperature"] == 1.5
    state = {"grids": [{"name": "arms", "rows": [{"values": {"arm": "uniform"}, "runs": ["a"]}]}]}
    with pytest.raises(sweep.SweepError, match="uniform has unfinished runs in grid 'arms'"):
        sweep.pick(sw, sw.grids[2], state, runs)


@pytest.mark.parametrize(
    "body, message",
    [
        ('[[grid]]\nname = "g"\narm = ["nope"]', r"arm = 'nope' has no table \[arm.nope\]"),
        ('[[grid]]\nname = "g"\nlam = [1]', r"axis 'lam' is neither a dotted config key nor a bundle"),
        (
            '[[grid]]\nname = "g"\n"loss.lam" = [2.0]',
            r"run loss.lam=2.0--s0: .*'loss.lam' = 2.0 is out of range",
        ),
        ('[[grid]]\nname = "g"\n"loss.nope" = [1]', r"unknown key 'loss.nope'"),
        (
            '[arm.b]\npick_best = ["uniform"]\nfrom_grid = "later"\n[[grid]]\nname = "g"\narm = ["b"]',
            "'from_grid' = 'later'",
        ),
    ],
)
def test_bad_sweep_files_name_the_problem(tmp_path, tiny_dir, body, message):
    path = write_sweep(tmp_path, tiny_dir, body)
    with pytest.raises(sweep.SweepError, match=message):
        sw = grids.load_sweep(path)
        grids.expand(sw, sw.grids[0], {}, {})


def test_statistics_and_conclusion():
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert report.t_quantile(df) == pytest.approx(t, abs=1e-4)
    m, hw, n = report.mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and hw == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(report.mean_ci([5.0])[1]) and report.mean_ci([])[2] == 0
    metrics = {
        f"{a}{s}": {"loss": v}
        for a, vals in (("u", (1.0, 1.2, 1.1)), ("w", (0.5, 0.6, 0.7)), ("z", (1.0, 1.3, 1.2)))
        for s, v in enumerate(vals)
    }
    grid = {
        "primary": "loss",
        "goal": "min",
        "baseline": "uniform",
        "rows": [{"values": {"arm": a}, "runs": [f"{a}{s}" for s in range(3)]} for a in ("u", "w", "z")],
    }
    text = report.conclusion(grid, metrics, ["u0", "u1", "u2"])
    hw = 4.302653 * 0.1 / math.sqrt(3)
    assert text.startswith(f"Best on `loss` (lower is better): **arm=w**, 0.6 ± {hw:.4g} (n=3).")
    assert "Baseline uniform: 1.1 ± " in text and "difference -0.5 (-45.5%)" in text
    named = report.conclusion({**grid, "baseline_values": {"arm": "u"}}, metrics, ["u0", "u1", "u2"])
    assert "Baseline arm=u: 1.1 ± " in named  # a grid's own baseline row is named by its axis values
    assert "The 95% intervals do not overlap: the best row is better than the baseline." in text
    hw = 2.776445 * math.sqrt(0.02 / 3)  # equal variances and n: Welch's df is 4
    assert text.endswith(
        f"95% interval of the difference (Welch, df 4): [{-0.5 - hw:+.4g}, {-0.5 + hw:+.4g}], excluding 0: the best "
        "row is better than the baseline."
    )
    # Welch by hand: var 1/3 and 5/2 over n 3 and 5, df 5.88 -> 5, t 2.570582
    d, dhw, df = report.diff_ci([1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, 6.0, 7.0, 8.0])
    assert (d, df) == (-4.0, 5) and dhw == pytest.approx(2.570582 * math.sqrt(1 / 3 + 1 / 2), rel=1e-6)
    assert math.isnan(report.diff_ci([1.0], [2.0, 3.0])[1]) and report.diff_ci([1.0, 1.0], [2.0, 2.0]) == (
        -1.0,
        0.0,
        2,
    )
    grid["goal"] = "max"
    assert "That is the baseline itself" in report.conclusion(
        {**grid, "rows": grid["rows"][:1]}, metrics, ["u0", "u1", "u2"]
    )
    text = report.conclusion(grid, metrics, ["u0", "u1", "u2"])  # z (1.17) vs u (1.1)
    assert "intervals overlap" in text and text.endswith("including 0: not resolved.")
    assert report.run_metrics(
        {"steps": 3, "cost": {"cost/x": 2}, "synthetic": {"synth/y": 0.5}, "algo": "a"}
    ) == {
        "steps": 3.0,
        "cost/x": 2.0,
        "synth/y": 0.5,
    }


@pytest.mark.parametrize("name", ["synthetic.toml", "mbpp_7b.toml", "mbpp_modern.toml"])
def test_shipped_sweep_files_dry_run(name, capsys):
    assert sweep.main([str(REPO / "configs" / "sweeps" / name), "--dry-run"]) == 0
    assert "every config is valid" in capsys.readouterr().out


def test_sigterm_stops_the_runs_and_leaves_them_resumable(tmp_path, tiny_dir):
    """`kill <sweep>` (a session ending, a scheduler) stops each run at a checkpoint and then the sweep, exit 75:
    no run goes on alone, writing into a directory that the next sweep would resume."""
    body = '[[grid]]\nname = "arms"\narm = ["uniform"]\n"train.steps" = [100000]'
    path = write_sweep(tmp_path, tiny_dir, body)
    log = tmp_path / "runs" / "logs" / "uniform--train.steps=100000--s0.log"
    p = subprocess.Popen(
        [sys.executable, "sweep.py", str(path), "--seeds", "0", "--parallel", "1"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):  # the run is training: it has logged a step
            if log.is_file() and re.search(r"step +2/", log.read_text()):
                break
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        lock = json.loads((tmp_path / "runs" / "uniform--train.steps=100000--s0" / ".lock").read_text())
        p.terminate()
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 75, out[-2000:] + err[-2000:]
    assert "rerun the same command to resume" in err
    assert "checkpoint committed" in log.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(lock["pid"], 0)


def test_dry_run_counts_done_runs(finished, capsys):
    """--dry-run of a finished sweep: 4 runs, all done (it said "4 new runs")."""
    _, path = finished
    assert sweep.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "grid arms: 2 rows x 2 seeds, 4 runs not in an earlier grid (4 done)" in out
    assert out.rstrip().endswith("the sweep has 4 runs: 4 done") and "new" not in out


# --------------------------------------------------------------------------- NaN and inf seeds (issue 23)

NAN, INF = float("nan"), float("inf")


def test_non_finite_seeds_one_rule_for_pick_table_and_conclusion():
    """A seed whose value is NaN or inf: n counts the finite values, the row is marked and named, and it ranks
    behind every row whose seeds are all finite: in the pick as in the conclusion."""
    vals = {"a": (NAN, 0.30, 0.31), "b": (0.10, 0.11, 0.12), "c": (INF, 0.01, 0.02)}
    metrics = {f"{a}{s}": {"loss": v} for a, vs in vals.items() for s, v in enumerate(vs)}
    runs = {a: [f"{a}{s}" for s in range(3)] for a in vals}
    stats = {a: report.row_stats(metrics, runs[a], "loss") for a in vals}
    assert (stats["a"].n, stats["a"].bad, stats["c"].bad) == (2, ["a0"], ["c0"])
    assert stats["a"].mean == pytest.approx(0.305) and math.isfinite(stats["a"].hw)
    assert report.cell(stats["a"]).endswith(" ⚠ 1 non-finite") and "⚠" not in report.cell(stats["b"])
    best, note = report.choose({a: stats[a] for a in "ab"}, "min")  # sweep.pick averaged raw values: a
    assert best == "b" and note.endswith("those whose seeds are all finite: a (a0).")
    assert report.choose(stats, "min")[0] == "b"  # c's finite seeds are the lowest, but c has an inf seed
    best, note = report.choose({a: stats[a] for a in "ac"}, "min")
    assert best == "c" and "every candidate has one, so c is picked on its 2 finite seeds" in note
    grid = {"primary": "loss", "goal": "min", "baseline": "b", "axes": ["arm"]}
    grid["rows"] = [{"values": {"arm": a}, "runs": runs[a]} for a in vals]
    text = report.conclusion(grid, metrics, runs["b"])
    assert text.startswith("Best on `loss` (lower is better): **arm=b**, 0.11 ± ")
    assert "ranked behind every row whose seeds are all finite" in text
    assert "**arm=a** (a0); **arm=c** (c0)." in text and "That is the baseline itself" in text
    only_bad = {**grid, "rows": grid["rows"][::2]}
    text = report.conclusion(only_bad, metrics, runs["b"])
    assert text.startswith("Best on `loss` (lower is better): **arm=c**, 0.015 ± ")
    assert "Every row has one: the best is ranked on its 2 finite seeds only." in text


def test_pick_and_report_of_runs_with_a_nan_seed(tmp_path, tiny_dir):
    """The issue's case through the sweep: candidate a = [nan, .30, .31], b = [.10, .11, .12]; the pick is b and
    says why; the report's table marks a (n = 2 finite) and its conclusion names a's NaN seed."""
    body = """
[arm.a]
"loss.lam" = 0.5
[arm.b]
"loss.lam" = 0.6
[arm.best]
pick_best = ["a", "b"]
from_grid = "arms"

[[grid]]
name = "arms"
arm = ["a", "b"]
seeds = [0, 1, 2]

[[grid]]
name = "picked"
arm = ["best"]
"""
    sw = grids.load_sweep(write_sweep(tmp_path, tiny_dir, body))
    runs: dict = {}
    rows = grids.expand(sw, sw.grids[0], {}, runs)
    for row, vals in zip(rows, ([NAN, 0.30, 0.31], [0.10, 0.11, 0.12]), strict=True):
        for name, v in zip(row.runs, vals, strict=True):  # finished run directories, as train.py leaves them
            d, run = sw.out_dir / name, runs[name]
            d.mkdir(parents=True)
            cfg = grids.resolve(sw, run.base, run.overrides, name)
            (d / "config.json").write_text(json.dumps(C.to_dict(cfg)))
            (d / "summary.json").write_text(json.dumps({"steps": run.steps, "synthetic": {sw.primary: v}}))
    state = {"runs": {}, "grids": [sweep._grid_state(sw, sw.grids[0], rows, {}, {})]}
    assert sweep.pick(sw, sw.grids[1], state, runs) == {"arm.best": "b"}
    assert state["pick_notes"]["arm.best"].endswith("all finite: a (a--s0).")
    state.update(name="t", file=str(sw.path), report_dir=str(tmp_path / "rep"))
    md = report.write_report(state, sweep.results(sw, runs, state), tmp_path / "rep").read_text()
    assert "| a | 2 ⚠ +1 non-finite | 0.305 ± " in md and " ⚠ 1 non-finite |" in md
    assert "Best on `synth/ce_learnable_head1` (lower is better): **arm=b**, 0.11 ± " in md
    assert "**arm=a** (a--s0)." in md


# --------------------------------------------------------------------------- a fresh checkout (the ledger)


def _fresh_checkout(src: Path, tmp: Path, edit=lambda text: text) -> Path:
    """The finished sweep as a new session sees it: the committed ledger in report_dir, no run directories."""
    text = (
        (src / "t.toml")
        .read_text()
        .replace(
            f'out_dir = "{src / "runs"}"', f'out_dir = "{tmp / "runs"}"\nreport_dir = "{tmp / "report"}"'
        )
    )
    (tmp / "report").mkdir()
    shutil.copy(src / "runs" / "runs.jsonl", tmp / "report" / "runs.jsonl")
    path = tmp / "t.toml"
    path.write_text(edit(text.replace(str(src / "mlflow.db"), str(tmp / "mlflow.db"))))
    return path


def _rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith(("| uniform |", "| critic |"))]


def test_fresh_checkout_rebuilds_the_report_and_trains_nothing(finished, tmp_path, capsys):
    src, _ = finished
    path = _fresh_checkout(src, tmp_path)
    assert sweep.main([str(path), "--report"]) == 0
    rebuilt = (tmp_path / "report" / "report.md").read_text()
    assert _rows(rebuilt) == _rows((src / "runs" / "report.md").read_text()) and len(_rows(rebuilt)) == 2
    assert "4 of 4 runs finished" in rebuilt
    assert sweep.main([str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("the sweep has 4 runs: 4 done")
    assert sweep.main([str(path)]) == 0
    assert "sweep: start" not in capsys.readouterr().out
    assert not list((tmp_path / "runs").glob("*--s*"))  # no run directory: nothing was trained
    assert _rows((tmp_path / "report" / "report.md").read_text()) == _rows(rebuilt)


def test_fresh_checkout_retrains_changed_and_needed_runs(finished, tmp_path):
    """In a fresh checkout: a run whose config changed trains again; a done run whose checkpoint a pending run
    starts from (a `{out_dir}/<run>/...` path) trains again first; the other done runs do not."""

    def edit(text: str) -> str:
        text = text.replace('"critic.reward" = "dataset"', '"critic.reward" = "dataset"\n"loss.lam" = 0.5')
        start = (
            '\n[arm.ft]\n"model.path" = "{out_dir}/uniform--s0/checkpoints/final"\n"model.format" = "wmtp"\n'
        )
        return text.replace("[[grid]]", start + "\n[[grid]]", 1).replace(
            'arm = ["uniform", "critic"]', 'arm = ["uniform", "critic", "ft"]\nseeds = [0]'
        )

    src, _ = finished
    path = _fresh_checkout(src, tmp_path, edit)
    p = run_sweep(str(path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    started = sorted(re.findall(r"sweep: start (\S+) \(new\)", p.stdout))
    assert started == ["critic--s0", "ft--s0", "uniform--s0"], p.stdout
    assert "sweep: uniform--s0 is done (ledger) but ft--s0 needs its files: training it again" in p.stdout
    assert p.stdout.index("start uniform--s0") < p.stdout.index("start ft--s0")
    ledger = [json.loads(line) for line in (tmp_path / "report" / "runs.jsonl").read_text().splitlines()]
    assert sorted(e["run"] for e in ledger) == sorted([*NAMES, "ft--s0"])  # critic--s0's old entry replaced
    old = {
        e["run"]: e["config"] for e in map(json.loads, (src / "runs" / "runs.jsonl").read_text().splitlines())
    }
    new = {e["run"]: e["config"] for e in ledger}
    assert new["critic--s0"] != old["critic--s0"] and new["uniform--s0"] == old["uniform--s0"]
    ft = json.loads((tmp_path / "runs" / "ft--s0" / "config.json").read_text())["model"]
    assert ft["path"] == f"{tmp_path / 'runs'}/uniform--s0/checkpoints/final" and ft["format"] == "wmtp"
    assert json.loads((tmp_path / "runs" / "ft--s0" / "summary.json").read_text())["steps"] == 3
