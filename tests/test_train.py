"""train.py end to end on the tiny models: resume equivalence, OOM and NaN fallbacks, LoRA, dry run, exports.

Each run goes through the command line's own code path (`errors.main(train.main, argv)`, what `python train.py
...` runs), in this process: a new interpreter would spend ~5 s per run importing torch and transformers. What needs
a process of its own (a signal, a kill, fault injection through the environment) starts `python train.py`. Runs are
short (a few steps, 128 tokens).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import checkpoint
import config as C
import errors
import files
import plan
import train
from config import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}


def tiny_overrides(tiny: Path, out: Path, **extra) -> list[str]:
    kv = {
        "model.path": str(tiny / "base_meta"),
        "model.tokenizer": str(tiny / "tokenizer"),
        "rho1.ref_model": str(tiny / "ref_hf"),
        "critic.reward_model": str(tiny / "rm_hf"),
        "critic.pretrain_steps": 2,
        "train.out_dir": str(out),
        "train.steps": 6,
        "train.micro_batch_size": 4,
        "train.eval_every": 3,
        "train.val_batches": 2,
        "train.log_every": 1,
        "data.max_length": 128,
        "storage.cache_dir": str(REPO / ".cache"),
        "eval.enabled": False,
        "tracking.enabled": False,
        **extra,
    }
    return [f"--{k}={json.dumps(v) if not isinstance(v, str) else json.dumps(v)}" for k, v in kv.items()]


def run_train(
    tiny: Path, out: Path, *args: str, config: str = "configs/tiny_mbpp.toml", check=True, **kv
) -> subprocess.CompletedProcess:
    """`python train.py CONFIG [overrides] ARGS` in this process: stdout / stderr captured, the exit code the
    interpreter would give (errors.main's for expected failures, 1 and the traceback on stderr for a bug)."""
    argv = [config, *tiny_overrides(tiny, out, **kv), *args]
    out_io, err_io = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out_io), contextlib.redirect_stderr(err_io):
        try:
            code = errors.main(train.main, argv)
        except SystemExit as e:  # usage errors
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
    p = subprocess.CompletedProcess(["train.py", *argv], code, out_io.getvalue(), err_io.getvalue())
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(out: Path, run: str) -> list[dict]:
    return [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows}


@pytest.fixture(scope="module")
def reference_run(tiny_dir, tmp_path_factory):
    """An uninterrupted 6-step run that the resume / OOM tests compare against."""
    out = tmp_path_factory.mktemp("ref")
    run_train(tiny_dir, out, **{"train.run_name": "ref"})
    return out, metrics(out, "ref")


def test_lr_schedule_warmup_then_cosine():
    cfg = C.load_config(None, ["--train.steps=100", "--optim.lr=1.0", "--optim.min_lr_ratio=0.1"])
    lrs = [train.lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 3) and lrs[2] == pytest.approx(1.0)  # 3% of 100 steps = 3 warmup steps
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_training_reduces_validation_loss_and_writes_checkpoints(reference_run):
    out, rows = reference_run
    summary = json.loads((out / "ref" / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["first_val_loss"]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    ck = out / "ref" / "checkpoints"
    # save_every = 0: the step-0 checkpoint was pruned once the end-of-run one was committed
    assert sorted(p.name for p in ck.iterdir()) == ["best", "final", "latest", "step_000006"]
    assert (ck / "latest").resolve() == ck / "step_000006" and (ck / "final" / "model.safetensors").is_file()


def test_per_head_weight_means_are_logged_and_reported(reference_run):
    """weights/mean_head{k} every step; the run's per-head means (histogram) in summary.json and the run report.
    The reference run is uniform: every weight is exactly 1, and the histogram holds every valid pair."""
    out, rows = reference_run
    for r in rows:
        assert [r[f"weights/mean_head{k}"] for k in range(1, 5)] == [1.0] * 4
    summary = json.loads((out / "ref" / "summary.json").read_text())
    heads = summary["weights_per_head"]
    assert sorted(heads) == ["head1", "head2", "head3", "head4"]
    assert all(h["run_mean"] == 1.0 for h in heads.values())
    assert sum(h["pairs"] for h in heads.values()) == sum(r["train/pairs"] for r in rows)
    assert summary["weights"]["weights/mean_head3"] == 1.0
    report = (out / "ref" / "reports" / "run_report.md").read_text()
    assert "## Weights per head" in report
    assert f"| head2 | 1 | 1 | {heads['head2']['pairs']:.0f} |" in report


def test_tokens_are_trunk_positions_the_same_at_h1_and_h4(reference_run, tiny_dir, tmp_path):
    """Issue 22: train/tokens counts the input positions the trunk ran on, not (position, head) pairs: the same
    at H=1 and H=4 on the same batches, and equal to the rows' lengths counted through the project's loader (the
    tiny tokenizer pads with EOS, which also ends every row); train/pairs and train/flops follow the batch."""
    import data
    import formats
    import model as M

    _, ref = reference_run  # H=4
    kv = {"train.run_name": "h1", "model.n_future_tokens": 1, "train.steps": 2, "train.eval_every": 0}
    run_train(tiny_dir, tmp_path, **kv)
    h1 = metrics(tmp_path, "h1")
    cfg = C.load_config(str(REPO / "configs/tiny_mbpp.toml"), tiny_overrides(tiny_dir, tmp_path))
    tok = data.load_tokenizer(cfg, Path(cfg.model.path))
    ds = data.build_dataset(cfg, tok, "train")
    loader = data.make_loader(ds, cfg.train.micro_batch_size, tok.pad_token_id, seed=data.order_seed(cfg))
    args = formats.load_model(Path(cfg.model.path), cfg.model.format, 4).args
    for step in (1, 2):
        batch = next(loader)
        lengths = [len(ds[int(i)]["input_ids"]) for i in batch["index"]]
        _, valid = M.mtp_targets(batch["input_ids"], batch["loss_mask"], 4)
        pairs = valid.sum((0, 1)).tolist()
        r4, r1 = ref[step - 1], h1[step - 1]
        assert r4["train/tokens"] == r1["train/tokens"] == sum(lengths) < batch["input_ids"].numel(), step
        assert r4["train/pairs"] == sum(pairs) and r1["train/pairs"] == pairs[0]
        assert r4["train/pairs"] > r1["train/pairs"]  # (pairs are what train/tokens used to count)
        width = batch["input_ids"].shape[1]
        assert r4["train/flops"] == pytest.approx(M.train_flops(args, sum(lengths), width, pairs), rel=1e-12)


def test_resume_gives_the_same_losses(reference_run, tiny_dir, tmp_path):
    _, ref = reference_run
    run_train(tiny_dir, tmp_path, **{"train.run_name": "r", "train.stop_after": 3})
    first = losses(metrics(tmp_path, "r"))
    assert sorted(first) == [1, 2, 3]
    run_train(tiny_dir, tmp_path, "--resume", **{"train.run_name": "r"})
    resumed = losses(metrics(tmp_path, "r"))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step, loss in losses(ref).items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step


def assert_resumed_like(ref: list[dict], ref_dir: Path, out: Path, run: str) -> None:
    """A resumed 6-step run: every step logged once, the uninterrupted run's losses, its final weights exactly."""
    from safetensors.torch import load_file

    rows = metrics(out, run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for step, loss in losses(ref).items():
        assert losses(rows)[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    a, b = (load_file(d / "checkpoints" / "final" / "model.safetensors") for d in (ref_dir, out / run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_newest_checkpoint_is_passed_over_on_resume_and_named_by_export(
    reference_run, tiny_dir, tmp_path, capsys
):
    """An interrupted run whose newest checkpoint (step 4) has a truncated .distcp file: `export` names the file in
    one line; --resume says which checkpoint is damaged and why, continues from step 2 and ends with the
    uninterrupted run's weights."""

    out, ref = reference_run
    kv = {"train.run_name": "dmg", "train.save_every": 2}
    run_train(tiny_dir, tmp_path, **kv, **{"train.stop_after": 4})
    ck = tmp_path / "dmg" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["best", "latest", "step_000002", "step_000004"]
    [shard] = (ck / "step_000004" / "dcp").glob("*.distcp")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    cut = f"{shard} is truncated ({shard.stat().st_size} bytes; its metadata places "

    capsys.readouterr()
    argv = ["export", "--checkpoint", str(ck / "step_000004"), "--format", "hf", "--out", str(tmp_path / "x")]
    assert errors.main(train.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ck / 'step_000004'} is damaged: {cut}") and len(err.splitlines()) == 1, (
        err
    )

    p = run_train(tiny_dir, tmp_path, "--resume", **kv)
    assert f"checkpoint step_000004 is damaged: {cut}" in p.stdout and "trying the one before" in p.stdout
    assert f"resumed from {ck / 'step_000002'} at step 2" in p.stdout
    assert_resumed_like(ref, out / "ref", tmp_path, "dmg")


def private_mount_ns() -> list[str] | None:
    """A command prefix that runs a shell in a mount namespace of its own where tmpfs can be mounted (root: a
    mount namespace; otherwise a user namespace mapped to root), or None where neither is permitted."""
    if not shutil.which("unshare"):
        return None
    for ns in (["--mount", "--propagation", "private"], ["--user", "--map-root-user", "--mount"]):
        probe = ["unshare", *ns, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return ["unshare", *ns]
    return None


@pytest.mark.skipif(private_mount_ns() is None, reason="no mount namespace for a small private tmpfs")
def test_a_full_disk_is_one_line_and_the_committed_checkpoints_resume_exactly(
    reference_run, tiny_dir, tmp_path
):
    """The run directory on a real small disk (a tmpfs in a mount namespace of its own): stopped at step 2, the
    disk filled but for 256 KiB, then --resume trains steps 3 and 4 and cannot write checkpoint 4: one line naming
    ENOSPC and the path, step_000004.tmp removed at once. Space freed, --resume continues from step 2 and ends
    with the uninterrupted run's weights."""

    out, ref = reference_run
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir(), logs.mkdir()
    kv = {"train.run_name": "full", "train.save_every": 2, "train.eval_every": 0}
    cmd = shlex.join(
        [sys.executable, "train.py", "configs/tiny_mbpp.toml", *tiny_overrides(tiny_dir, disk, **kv)]
    )
    script = f"""
mount -t tmpfs -o size=256m tmpfs {disk}
{cmd} --train.stop_after=2 > {logs}/1.out 2>&1; echo $? > {logs}/1.rc
fallocate -l $(( $(df --output=avail -B1 {disk} | tail -1) - 262144 )) {disk}/ballast
{cmd} --resume > {logs}/2.out 2> {logs}/2.err; echo $? > {logs}/2.rc
ls -a {disk}/full/checkpoints > {logs}/2.ls
rm {disk}/ballast
{cmd} --resume > {logs}/3.out 2>&1; echo $? > {logs}/3.rc
cp -r {disk}/full {logs}/full
"""
    subprocess.run([*private_mount_ns(), "sh", "-c", script], cwd=REPO, env=ENV, timeout=900, check=True)
    rc = {i: (logs / f"{i}.rc").read_text().strip() for i in (1, 2, 3)}
    assert rc[1] == "0", (logs / "1.out").read_text()[-3000:]
    err = (logs / "2.err").read_text()
    assert rc[2] == "2" and "Traceback" not in err, (logs / "2.out").read_text()[-2000:] + err[-3000:]
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    tmp = disk / "full" / "checkpoints" / "step_000004.tmp"
    assert line.startswith(
        f"error: no space left on device (ENOSPC) writing checkpoint step_000004 at {tmp}: "
    )
    left = (logs / "2.ls").read_text().split()
    assert "step_000002" in left and not [n for n in left if n.endswith(".tmp")], left
    assert rc[3] == "0", (logs / "3.out").read_text()[-3000:]
    assert (
        f"resumed from {disk / 'full' / 'checkpoints' / 'step_000002'} at step 2"
        in (logs / "3.out").read_text()
    )
    assert_resumed_like(ref, out / "ref", logs, "full")


def test_oom_fallback_keeps_the_effective_batch(reference_run, tiny_dir, tmp_path):
    _, ref = reference_run
    p = run_train(tiny_dir, tmp_path, **{"train.run_name": "oom", "train.inject_oom_steps": [2]})
    assert "OOM fallback -> micro_batch 2 x grad_accum 2" in p.stdout
    rows = metrics(tmp_path, "oom")
    summary = json.loads((tmp_path / "oom" / "summary.json").read_text())
    assert summary["oom_events"] == 1 and summary["final_micro_batch"] == 2
    # same examples, same normalisation: the losses equal the uninterrupted run's up to summation order
    for a, b in zip(rows, ref, strict=True):
        assert a["train/tokens"] == b["train/tokens"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)


def test_train_seed_drives_the_data_order(reference_run, tiny_dir, tmp_path):
    """A sweep's replicates (seed_keys = ["train.seed"]) replicate something on MBPP: another train.seed deals the
    rows in another order (other losses, other final weights), the same seed gives the same run; data.seed (42)
    keeps the cached rows and the validation subset, so the step-0 validation loss is the same."""
    from safetensors.torch import load_file

    out, ref = reference_run  # train.seed 42 (the default)
    run_train(tiny_dir, tmp_path, **{"train.run_name": "s7", "train.seed": 7})
    other = metrics(tmp_path, "s7")
    assert all(a["train/loss"] != b["train/loss"] for a, b in zip(other, ref, strict=True))
    a, b = (
        load_file(d / "checkpoints" / "final" / "model.safetensors") for d in (out / "ref", tmp_path / "s7")
    )
    assert not any(torch.equal(a[k], b[k]) for k in a if "norm" not in k)
    first = [
        json.loads((d / "summary.json").read_text())["first_val_loss"] for d in (out / "ref", tmp_path / "s7")
    ]
    assert first[0] == first[1]
    run_train(tiny_dir, tmp_path, **{"train.run_name": "s7again", "train.seed": 7, "train.stop_after": 2})
    assert losses(metrics(tmp_path, "s7again")) == {s: v for s, v in losses(other).items() if s <= 2}


def test_train_seed_drives_every_random_initialisation(tiny_dir, tmp_path):
    """LoRA's A matrices and the critic's value head are drawn from train.seed: seeds 0 and 1 give other initial
    weights, seed 0 twice the same ones (whatever drew from the RNG in between). The extra heads an HF base gets
    are not drawn at all: they are copies of its last block (spec §1), so every seed starts them the same."""
    import data
    import parallel as P
    import score

    def initial(seed: int, **kv) -> tuple[dict, dict]:
        torch.rand(seed + 7)  # the caller's RNG state must not matter
        kv = {"train.seed": seed, "train.lora.enabled": True, "train.lora.r": 4, **kv}
        cfg = C.load_config(REPO / "configs/tiny_critic_mbpp.toml", tiny_overrides(tiny_dir, tmp_path, **kv))
        net = train.build_model(cfg, P.Dist(), Path(cfg.model.path))
        state = score.init_state(cfg, net, data.load_tokenizer(cfg, Path(cfg.model.path)), "cpu")
        lora = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_A" in n}
        return lora, {n: p.detach().clone() for n, p in state.value_head.named_parameters()}

    (lora0, value0), (lora1, value1), (lora0b, value0b) = initial(0), initial(1), initial(0)
    for a, b, c in ((lora0, lora1, lora0b), (value0, value1, value0b)):
        assert a.keys() == b.keys() == c.keys() and a
        assert all(torch.equal(a[k], c[k]) for k in a)
        assert all(not torch.equal(a[k], b[k]) for k in a)
    assert any("extra_heads" in k for k in lora0)  # the extra heads' adapters are drawn too

    hf = {"model.path": str(tiny_dir / "ref_hf"), "model.format": "hf", "model.n_future_tokens": 3}
    nets = [
        train.build_model(C.load_config(None, tiny_overrides(tiny_dir, tmp_path, **hf, **{"train.seed": s})),
                          P.Dist(), tiny_dir / "ref_hf")
        for s in (0, 1)
    ]  # fmt: skip
    for net in nets:
        last = net.layers[-1].state_dict()
        assert all(torch.equal(h.state_dict()[k], last[k]) for h in net.extra_heads for k in last)


def test_the_synthetic_benchmark_keeps_data_seed_as_its_order():
    """The study sets train.seed and data.seed together; its prerequisite runs (train.seed 0, data.seed 1000) must
    train in the order they always did: the synthetic corpus's order follows data.seed, MBPP's train.seed."""
    import data

    syn = C.load_config(None, ["--data.dataset=synthetic", "--data.seed=1000", "--train.seed=0"])
    mbpp = C.load_config(None, ["--data.seed=1000", "--train.seed=0"])
    assert data.order_seed(syn) == 1000 and data.order_seed(mbpp) == 0


def sqlite_tracking(tmp: Path) -> dict:
    return {"tracking.enabled": True, "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}"}


def mlflow_history(tmp: Path, run: str, key: str) -> list[int]:
    """Steps of `key` in the one MLflow run named `run` (asserting there is exactly one)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mtp/baseline/mbpp")
    [r] = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run}'")
    assert r.info.status == "FINISHED"
    return sorted(m.step for m in client.get_metric_history(r.info.run_id, key))


def test_sigterm_then_resume_equals_an_uninterrupted_run(reference_run, tiny_dir, tmp_path):
    """What Kubernetes does before evicting a pod: SIGTERM mid-run. The run commits a checkpoint at the next step
    boundary and exits with EXIT_PREEMPTED; --resume ends with the uninterrupted run's weights, and metrics.jsonl
    and MLflow hold every step once. No credential of the config reaches the run directory."""
    out, ref = reference_run
    kv = {"train.run_name": "pre", **sqlite_tracking(tmp_path)}
    kv["storage.endpoint_url"] = "http://wmtp:hunter2-secret@minio.internal:9000"
    cmd = [sys.executable, "train.py", "configs/tiny_mbpp.toml", *tiny_overrides(tiny_dir, tmp_path, **kv)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "pre" / "metrics.jsonl"
    while not (log.exists() and log.read_text().endswith("\n")):  # step 1 is done
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == train.EXIT_PREEMPTED, stdout[-2000:] + stderr[-2000:]
    n = int(re.search(r"preempted at step (\d+): checkpoint committed", stdout)[1])
    assert 1 <= n < 6 and sorted(losses(metrics(tmp_path, "pre"))) == list(range(1, n + 1))
    assert (tmp_path / "pre" / "checkpoints" / "latest").resolve().name == f"step_{n:06d}"

    run_train(tiny_dir, tmp_path, "--resume", **kv)
    rows = metrics(tmp_path, "pre")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for step, loss in losses(ref).items():
        assert losses(rows)[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    from safetensors.torch import load_file

    a, b = (
        load_file(d / "checkpoints" / "final" / "model.safetensors") for d in (out / "ref", tmp_path / "pre")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert mlflow_history(tmp_path, "pre", "train/loss") == [1, 2, 3, 4, 5, 6]
    assert mlflow_history(tmp_path, "pre", "val/loss") == [0, 3, 6]
    for f in ("config.json", "summary.json", "reports/run_report.md"):
        assert "hunter2" not in (tmp_path / "pre" / f).read_text(), f
    assert "minio.internal" in (tmp_path / "pre" / "config.json").read_text()


def test_a_run_killed_while_committing_a_checkpoint_resumes(reference_run, tiny_dir, tmp_path):
    """Killed with the step-4 checkpoint written but not yet renamed into place, after metrics of steps 3 and 4
    were logged: --resume starts from step 2, logs steps 3 and 4 again in metrics.jsonl only (MLflow already has
    them), ends like the uninterrupted run and keeps the newest train.keep_checkpoints = 2 periodic checkpoints."""
    _, ref = reference_run
    kv = {"train.run_name": "kill", "train.save_every": 2, **sqlite_tracking(tmp_path)}
    env = {**ENV, files.FAULT_ENV: "commit:written:3"}  # commits: step 0, step 2, step 4
    cmd = [sys.executable, "train.py", "configs/tiny_mbpp.toml", *tiny_overrides(tiny_dir, tmp_path, **kv)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "FaultInjected: WMTP_FAULT=commit:written:3" in p.stderr, p.stderr[-2000:]
    ck = tmp_path / "kill" / "checkpoints"
    assert (ck / "step_000004.tmp").is_dir() and (ck / "latest").resolve().name == "step_000002"
    assert sorted(losses(metrics(tmp_path, "kill"))) == [1, 2, 3, 4]

    run_train(tiny_dir, tmp_path, "--resume", **kv)
    rows = metrics(tmp_path, "kill")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for step, loss in losses(ref).items():
        assert losses(rows)[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    assert mlflow_history(tmp_path, "kill", "train/loss") == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in ck.iterdir()) == ["best", "final", "latest", "step_000004", "step_000006"]


def test_best_is_the_checkpoint_of_the_lowest_validation_loss(tiny_dir, tmp_path):
    """A learning rate so high that validation goes down, up, down: checkpoints/best holds the weights of the
    lowest validation loss (step 2), not the last ones; its loss, recomputed, is the summary's best_val_loss."""
    import data
    import formats
    import parallel as P

    kv = {"train.run_name": "best", "train.steps": 4, "train.eval_every": 1, "optim.lr": 0.05}
    run_train(tiny_dir, tmp_path, **kv, **{"optim.warmup_frac": 0.0})
    run = tmp_path / "best"
    hist = torch.load(run / "checkpoints" / "latest" / "trainer.pt", weights_only=False)["state"]["history"]
    val = {h["step"]: h["val/loss"] for h in hist}
    assert sorted(val) == [0, 1, 2, 3, 4] and min(val, key=val.get) == 2 and val[4] > val[2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_loss"] == val[2] and summary["final_val_loss"] == val[4]
    cfg = C.load_config(REPO / "configs/tiny_mbpp.toml", tiny_overrides(tiny_dir, tmp_path, **kv))
    tok = data.load_tokenizer(cfg, tiny_dir / "base_meta")
    val_ds = data.build_dataset(cfg, tok, "validation")
    for name, want in (("best", val[2]), ("final", val[4])):
        got = train.validate(
            cfg, formats.load_checkpoint(run / "checkpoints" / name), val_ds, tok.pad_token_id, P.Dist()
        )
        assert got["val/loss"] == pytest.approx(want, rel=1e-6), name


def test_oom_at_micro_batch_one_gives_up_clearly(tiny_dir, tmp_path):
    kv = {"train.run_name": "oom1", "train.micro_batch_size": 1, "train.inject_oom_steps": [0]}
    p = run_train(tiny_dir, tmp_path, check=False, **kv)
    assert p.returncode == 1
    assert "error: step 0: out of memory even at micro_batch_size 1" in p.stderr


def dcp_model(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = tmp / (ckpt.name + ".pt")
    dcp_to_torch_save(str(ckpt / "dcp"), str(dst))
    return torch.load(dst, weights_only=False)["model"]


def test_bf16_checkpoint_trains_fp32_master_weights(tiny_dir, tmp_path):
    """Meta's consolidated.pth is bf16. Trained in bf16, most 1e-5 updates would round away; the masters, their
    gradients and the AdamW state are fp32, so after 3 steps at lr 1e-5 nearly every weight has moved."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import formats

    base = tmp_path / "base_bf16"
    formats.save_meta(formats.load_model(tiny_dir / "base_meta", "meta").to(torch.bfloat16), base)
    init = torch.load(base / "consolidated.pth", weights_only=True)
    assert {v.dtype for v in init.values()} == {torch.bfloat16}
    kv = {"train.run_name": "bf16", "model.path": str(base), "optim.lr": 1e-5, "train.steps": 3}
    run_train(tiny_dir, tmp_path, **kv, **{"train.eval_every": 0, "train.val_batches": 1})
    dcp_to_torch_save(str(tmp_path / "bf16" / "checkpoints" / "latest" / "dcp"), str(tmp_path / "last.pt"))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    masters, adam = ckpt["model"], ckpt["optim"]["state"]
    assert {v.dtype for v in masters.values()} == {torch.float32}
    assert {t.dtype for s in adam.values() for k, t in s.items() if k != "step"} == {torch.float32}
    assert sorted(adam) == sorted(masters)  # every parameter is trained
    moved = sum(int((masters[k] != init[k].float()).sum()) for k in init)
    assert moved / sum(v.numel() for v in init.values()) > 0.95


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_one_process_step_computes_in_bf16_on_a_gpu_only(device, tiny_dir, tmp_path):
    """One process on a GPU: bf16 autocast over the fp32 masters (what FSDP2's MixedPrecisionPolicy does under
    torchrun); the CPU computes in fp32."""
    import data
    import parallel as P
    import score

    kv = {"model.dtype": "bfloat16", "train.device": device}
    cfg = C.load_config(REPO / "configs/tiny_mbpp.toml", tiny_overrides(tiny_dir, tmp_path, **kv))
    d = P.Dist(device=torch.device(device))
    net = train.build_model(cfg, d, tiny_dir / "base_meta")
    seen = []
    net.layers[0].attention.wq.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    tok = data.load_tokenizer(cfg, tiny_dir / "base_meta")
    batch = next(data.make_loader(data.build_dataset(cfg, tok, "train"), 4, tok.pad_token_id))
    batch = {k: v.to(d.device) for k, v in batch.items()}
    state = score.init_state(cfg, net, tok, d.device)
    opt = train.make_optimizer(cfg, net)
    train.optimizer_step(train.Run(cfg, d, net, opt, state, checkpoint.TrainState(micro_batch=4)), batch, 0)
    assert set(seen) == {torch.bfloat16 if device == "cuda" else torch.float32}
    assert {(p.dtype, p.grad.dtype) for p in net.parameters()} == {(torch.float32, torch.float32)}


def test_nan_steps_are_skipped_then_recovered_with_lower_lr(tiny_dir, tmp_path):
    kv = {
        "train.run_name": "nan",
        "train.steps": 7,
        "train.save_every": 1,
        "train.keep_checkpoints": 0,
        "train.inject_nan_steps": [2, 3, 4],
        "train.max_bad_steps": 3,
        "train.lr_backoff": 0.5,
    }
    p = run_train(tiny_dir, tmp_path, **kv)
    assert (
        "step 5: 3 non-finite steps in a row: rolled back 3 steps to step 2 (checkpoint step_000002)"
        in p.stdout
    )
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["recoveries"] == 1 and summary["final_lr_scale"] == 0.5
    rows = {r["step"]: r for r in metrics(tmp_path, "nan")}
    assert [rows[s]["train/skipped_steps"] for s in range(1, 8)] == [0, 0, 1, 2, 3, 3, 3]
    cfg = C.load_config("configs/tiny_mbpp.toml", ["--train.steps=7"])
    assert rows[6]["train/lr"] == pytest.approx(0.5 * train.lr_at(cfg, 5))
    # no checkpoint during the bad steps; the one after the rollback holds exactly the weights of step 2
    ck = tmp_path / "nan" / "checkpoints"
    assert sorted(int(p.name[5:]) for p in ck.glob("step_*")) == [1, 2, 5, 6, 7]
    w2, w5, w6 = (dcp_model(ck / f"step_{s:06d}", tmp_path) for s in (2, 5, 6))
    assert all(torch.equal(w2[k], w5[k]) for k in w2)
    assert any(not torch.equal(w2[k], w6[k]) for k in w2)  # the first good step after the recovery


def test_nan_rollback_loses_at_most_nan_snapshot_every_steps(tiny_dir, tmp_path):
    """save_every = 0 leaves step 0 as the only checkpoint: the in-memory snapshot (every 2 steps) is the state the
    rollback returns to, and the run says how far back it went."""
    kv = {"train.run_name": "far", "train.nan_snapshot_every": 2, "train.inject_nan_steps": [3, 4, 5]}
    p = run_train(tiny_dir, tmp_path, **kv)
    assert (
        "step 6: 3 non-finite steps in a row: rolled back 4 steps to step 2 (the in-memory snapshot)"
        in p.stdout
    )
    summary = json.loads((tmp_path / "far" / "summary.json").read_text())
    assert summary["rolled_back_steps"] == 4 and summary["rollbacks"] == [
        {"at": 6, "to": 2, "from": "the in-memory snapshot"}
    ]
    rows = metrics(tmp_path, "far")
    assert [r["train/rolled_back_steps"] for r in rows] == [0, 0, 0, 0, 0, 4]


def test_nan_forever_stops_with_a_clear_message(tiny_dir, tmp_path):
    kv = {
        "train.run_name": "nan2",
        "train.inject_nan_steps": list(range(6)),
        "train.max_bad_steps": 2,
        "train.max_recoveries": 1,
    }
    p = run_train(tiny_dir, tmp_path, check=False, **kv)
    assert p.returncode != 0
    assert "consecutive non-finite steps after 1 recoveries" in p.stderr


def test_dry_run_prints_the_plan_and_refuses_what_does_not_fit(tiny_dir, tmp_path):
    p = run_train(tiny_dir, tmp_path, "--dry-run")
    assert (
        "parameters  1.63M" in p.stdout and "memory plan per device" in p.stdout and "plan fits" in p.stdout
    )
    assert "budget      6 steps x 4 rows = 0.1 epochs of the 374 train rows (93 steps per epoch)" in p.stdout
    assert (
        "dtypes      fp32 master weights, gradients and AdamW states" in p.stdout
        and "WARNING" not in p.stdout
    )
    assert not (tmp_path / "tiny-mtp").exists()  # no run directory, no step
    kv = {"train.memory_gb": 0.001, "train.steps": 2000}
    p = run_train(tiny_dir, tmp_path, "--dry-run", check=False, **kv)
    assert p.returncode == 2 and "REFUSED" in p.stdout
    assert (
        "WARNING: 22 epochs (> 20) over 374 rows" in p.stdout and "(3 epochs = train.steps 279)" in p.stdout
    )


def test_epochs_follow_the_loader_over_ranks_and_accumulation():
    def epochs(steps: int, mb: int, accum: int, world: int, rows: int = 374) -> float:
        kv = [f"--train.steps={steps}", f"--train.micro_batch_size={mb}", f"--train.grad_accum={accum}"]
        return plan.epochs(C.load_config(None, kv), rows, world)

    # the figure: 2000 steps x 64 sequences. 374 // 4 ranks = 93 rows per rank, // 16 = 5 steps an epoch
    assert epochs(2000, 4, 4, 4) == 400.0
    assert epochs(69, 4, 1, 4) == 3.0  # the shipped 7B configs: 93 // 4 = 23 steps an epoch
    assert epochs(93, 4, 1, 1) == 1.0 and epochs(93, 2, 2, 1) == 1.0  # accumulation = a larger micro-batch
    assert epochs(10, 4, 1, 3) == 10 / 31  # 374 // 3 = 124 rows per rank, // 4
    assert epochs(10, 200, 1, 2) == math.inf  # 187 rows per rank do not fill one step
    lines = plan.budget_lines(C.load_config(None, ["--train.steps=2000", "--train.grad_accum=4"]), 374, 4)
    assert (
        lines[0]
        == "budget      2000 steps x 64 rows = 400.0 epochs of the 374 train rows (5 steps per epoch)"
    )
    assert lines[1].startswith("WARNING: 400 epochs (> 20) over 374 rows")


def test_constant_test_rewards_stop_before_training(tiny_dir, tmp_path):
    """critic.reward = 'tests' judges the reference solutions, which all pass: every reward is 1 and the critic's
    weights would be noise. On MBPP's 10-problem prompt split (train's 374 are the same story, 37x the sandbox
    runs) the run stops before its first step and says why and what to use instead."""
    kv = {"train.run_name": "const", "critic.reward": "tests", "data.train_split": "prompt"}
    kv["data.max_length"] = 512  # no reference is cut (a cut one would fail its tests)
    p = run_train(tiny_dir, tmp_path, config="configs/tiny_critic_mbpp.toml", check=False, **kv)
    assert p.returncode == 1, p.stderr[-2000:]
    assert (
        "critic.reward = 'tests': the 10 training rewards have (near) zero variance (mean 1, std 0)"
        in p.stderr
    )
    assert "Use critic.reward = 'model'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "const" / "metrics.jsonl").exists() and "step 0: val/loss" not in p.stdout


def test_config_error_exits_before_any_work(tiny_dir, tmp_path):
    p = run_train(tiny_dir, tmp_path, "--loss.lam=2", check=False)
    assert p.returncode == 2 and p.stderr == (
        "error: command line '--loss.lam=2': 'loss.lam' = 2 is out of range: expected a number in [0, 1]\n"
    )


def test_lora_trains_only_adapters_and_the_merged_export_matches(tiny_dir, tmp_path):
    import data
    import formats
    import parallel as P
    import score

    kv = {"train.lora.enabled": True, "train.lora.dropout": 0.0, "train.lora.r": 4, "optim.lr": 1e-2}
    cfg = C.load_config(REPO / "configs/tiny_mbpp.toml", tiny_overrides(tiny_dir, tmp_path, **kv))
    d = P.Dist()
    tok = data.load_tokenizer(cfg, tiny_dir / "base_meta")
    net = train.build_model(cfg, d, tiny_dir / "base_meta")
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = train.make_optimizer(cfg, net)
    state = score.init_state(cfg, net, tok, d.device)
    loader = data.make_loader(data.build_dataset(cfg, tok, "train"), 4, tok.pad_token_id)
    r = train.Run(cfg, d, net, opt, state, checkpoint.TrainState(micro_batch=4))
    for step in range(3):
        train.optimizer_step(r, next(loader), step)
        opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("extra_heads" in n and "lora_B" in n for n in changed)  # the extra heads get adapters too
    assert any(n.startswith("base_model.model.layers.") and "lora_B" in n for n in changed)

    out = checkpoint.export_model(net, tmp_path / "export", tok, d)
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(out / "adapter.safetensors"))
    merged = formats.load_checkpoint(out)
    net.eval()
    ids = torch.randint(0, merged.args.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(net(ids), merged(ids), rtol=1e-5, atol=1e-5)

    # the HF export holds the merged weights: transformers gives the adapter model's head 1, not the base's
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        checkpoint.write_export(merged, tmp_path / "hf", "hf", tok, None)
    ).eval()
    base = formats.load_meta(tiny_dir / "base_meta").eval()
    with torch.no_grad():
        logits = hf(ids).logits
        assert (logits - net(ids)[:, :, 0]).abs().max().item() < 1e-4
        assert (logits - base(ids)[:, :, 0]).abs().max().item() > 1e-2
    # a resume checkpoint of the LoRA run (adapters and base weights under peft's names) exports merged too
    (tmp_path / "run").mkdir()
    files.atomic_write_text(tmp_path / "run" / "config.json", json.dumps(C.to_dict(cfg)))
    resume = checkpoint.save_resume(cfg, tmp_path / "run", net, opt, r.st, state, d)
    again, _, _ = checkpoint.load_resume_model(resume)
    assert all(torch.allclose(v, merged.state_dict()[k], atol=1e-6) for k, v in again.state_dict().items())


# --------------------------------------------------------------------------- exports (HF Llama, Meta)


def mbpp_prompts(tok, n: int = 4) -> list[list[int]]:
    import data

    problems = data.load_mbpp(Path(C.default_data_root()) / "mbpp")
    rows = data.mbpp_split(problems, "test")[:n]
    return [data.encode_prompt(tok, data.mbpp_prompt(r, "zero_shot")) for r in rows]


def test_exports_load_in_transformers_and_meta_and_equal_the_trained_heads(reference_run):
    """The done-when of the export: HF = head 1 (logits and greedy tokens), Meta = every head, a model card."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import formats

    out, _ = reference_run
    ck = out / "ref" / "checkpoints"
    for name in ("final", "best"):
        assert {"hf", "meta"} <= {p.name for p in (ck / name).iterdir()}, name
    trained = formats.load_checkpoint(ck / "final").eval()
    assert trained.args.n_future_tokens == 4
    hf = AutoModelForCausalLM.from_pretrained(ck / "final" / "hf", local_files_only=True).eval()
    assert (
        hf.dtype == torch.float32
        and json.loads((ck / "final/hf/config.json").read_text())["dtype"] == "float32"
    )
    tok = AutoTokenizer.from_pretrained(ck / "final" / "hf")
    prompts = mbpp_prompts(tok)
    meta = formats.load_meta(ck / "final" / "meta").eval()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            ours = trained(ids)
            assert (hf(ids).logits - ours[:, :, 0]).abs().max().item() <= 1e-4
            assert torch.equal(meta(ids), ours)  # every head, the same fp32 tensors
        ours = trained.generate(prompts, 24, temperature=0, eos_id=tok.eos_token_id)
        for p, row in zip(prompts, ours, strict=True):
            new = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p) :].tolist()
            assert (new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new) == row
    params = json.loads((ck / "final" / "meta" / "params.json").read_text())
    assert "max_seq_len" not in params and params["n_future_tokens"] == 4

    @dataclass
    class MetaReferenceArgs:  # the fields of Meta's reference ModelArgs, built as its Llama.build does
        dim: int = 4096
        n_layers: int = 32
        n_heads: int = 32
        n_kv_heads: int | None = None
        vocab_size: int = -1
        multiple_of: int = 256
        ffn_dim_multiplier: float | None = None
        norm_eps: float = 1e-5
        rope_theta: float = 10000.0
        max_batch_size: int = 32
        max_seq_len: int = 2048
        n_future_tokens: int = 1

    assert MetaReferenceArgs(max_seq_len=512, max_batch_size=1, **params).n_future_tokens == 4

    readme = (ck / "final" / "hf" / "README.md").read_text()
    _, front, body = readme.split("---\n", 2)
    card = yaml.safe_load(front)
    summary = json.loads((out / "ref" / "summary.json").read_text())
    assert card["library_name"] == "transformers" and card["datasets"] == ["google-research-datasets/mbpp"]
    assert card["base_model"].endswith("base_meta") and {"wmtp", "baseline", "uniform"} <= set(card["tags"])
    [result] = card["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == summary["final_val_loss"] and card["metrics"] == ["loss"]
    assert body.startswith("\n# Model card: mtp-baseline-mbpp\n") and "## Limitations" in body
    assert (
        "checkpoint: `ref/checkpoints/final/hf`" in body
        and f"| val/loss | {summary['final_val_loss']:.6g} |" in body
    )


def test_export_cli_from_a_resume_checkpoint_and_a_final_dir(reference_run, tmp_path, capsys):
    from safetensors.torch import load_file

    out, _ = reference_run
    ck = out / "ref" / "checkpoints"
    # checkpoints/latest (sharded, with optimizer state) holds the same weights as final: the same HF export
    argv = ["export", "--checkpoint", str(ck / "latest"), "--format", "hf", "--out", str(tmp_path / "a")]
    assert train.main(argv) == 0
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(ck / "final" / "hf" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")
    argv = ["export", "--checkpoint", str(ck / "final"), "--format", "meta", "--dtype", "bfloat16"]
    assert train.main([*argv, "--out", str(tmp_path / "m")]) == 0
    a, b = (
        torch.load(d / "consolidated.pth", weights_only=True) for d in (tmp_path / "m", ck / "final" / "meta")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].bfloat16()) for k in a)
    capsys.readouterr()
    cli = lambda argv: errors.main(train.main, argv)  # noqa: E731  (what `python train.py ...` runs)
    assert cli([*argv, "--out", str(tmp_path / "m")]) == 2  # never overwrites a directory
    assert "--out" in capsys.readouterr().err
    assert cli(["export", "--checkpoint", str(ck), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_a_damaged_run_config_or_summary_is_one_line(reference_run, tiny_dir, tmp_path, capsys):
    """export reads the run's config.json (a resume checkpoint's architecture) and summary.json (the model card):
    damaged, each is one line naming it; evaluate names a damaged config.json of the checkpoint it loads."""
    import evaluate

    out, _ = reference_run
    run = tmp_path / "ref"
    shutil.copytree(out / "ref", run, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    (run / "summary.json").write_text('{"steps": 6, "eval')
    argv = ["export", "--checkpoint", str(run / "checkpoints" / "final"), "--format", "hf"]
    capsys.readouterr()
    assert errors.main(train.main, [*argv, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {run / 'summary.json'}: corrupt (JSONDecodeError: ") and err.count("\n") == 1
    )
    (run / "config.json").write_bytes(b"\xff\xfe{")
    argv = ["export", "--checkpoint", str(run / "checkpoints" / "latest"), "--format", "meta"]
    assert errors.main(train.main, [*argv, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {run / 'config.json'}: corrupt (UnicodeDecodeError: ")
        and err.count("\n") == 1
    )
    (run / "checkpoints" / "final" / "config.json").write_text('{"dim": ')
    argv = ["configs/tiny_mbpp.toml", "--checkpoint", str(run / "checkpoints" / "final"), "--limit", "1"]
    assert evaluate.main([*argv, f"--model.tokenizer={tiny_dir / 'tokenizer'}"]) == 2
    assert capsys.readouterr().err == (
        f"error: --checkpoint: {run / 'checkpoints' / 'final' / 'config.json'}: invalid JSON at line 1: Expecting value\n"
    )


def test_evaluate_detects_the_checkpoint_format(reference_run, tmp_path, capsys):
    """Ours, its HF export and its Meta export are judged the same way (head 1 identical; HF has one head)."""
    import evaluate

    out, _ = reference_run
    ck = out / "ref" / "checkpoints" / "final"
    flat = {}
    for sub in ("", "hf", "meta"):
        argv = ["configs/tiny_mbpp.toml", "--checkpoint", str(ck / sub), "--limit", "2", "--n", "1"]
        argv += ["--out", str(tmp_path / (sub or "wmtp")), "--model.tokenizer=", "--eval.max_new_tokens=16"]
        assert evaluate.main(argv) == 0
        flat[sub or "wmtp"] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert flat["wmtp"]["mbpp/pass_at_1"] == flat["hf"]["mbpp/pass_at_1"] == flat["meta"]["mbpp/pass_at_1"]
    assert flat["hf"]["mbpp/head1_ce"] == pytest.approx(flat["wmtp"]["mbpp/head1_ce"], rel=1e-5)
    assert (
        flat["meta"]["mbpp/head4_ce"] == flat["wmtp"]["mbpp/head4_ce"] and "mbpp/head2_ce" not in flat["hf"]
    )


@pytest.mark.slow
def test_compile_switch_trains(tiny_dir, tmp_path):
    """model.compile = true compiles each block (opt-in); the losses match eager mode closely."""
    run_train(tiny_dir, tmp_path, **{"train.run_name": "eager", "train.steps": 3})
    run_train(tiny_dir, tmp_path, **{"train.run_name": "compiled", "train.steps": 3, "model.compile": True})
    eager, compiled = losses(metrics(tmp_path, "eager")), losses(metrics(tmp_path, "compiled"))
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4), step
