"""torchrun --standalone --nproc_per_node=2 on CPU/gloo: FSDP2 gradients, sharded resume, export, OOM on one rank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import formats
import model as M
from config import REPO
from tests.test_train import ENV, dcp_model, losses, metrics, run_train, tiny_overrides

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DENV = {**ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun(tiny: Path, out: Path, *args: str, config: str = "configs/tiny_rho1_mbpp.toml", **kv):
    cmd = [*TORCHRUN, "train.py", config, *tiny_overrides(tiny, out, **{"train.steps": 4, **kv}), *args]
    p = subprocess.run(cmd, cwd=REPO, env=DENV, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}")
    return p


def dist_script(script: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """A tests/dist_*.py script under torchrun; a rank left waiting in a collective fails within 2 minutes."""
    cmd = [*TORCHRUN[:-1], f"--nproc_per_node={nproc}", script, *args]
    env = {**DENV, "WMTP_DIST_TIMEOUT_MIN": "2"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def test_fsdp2_gradients_equal_single_process():
    p = dist_script(
        "tests/dist_grad_check.py"
    )  # a Llama-2-style model, then one tied with biases and q/k norm
    assert p.stdout.count("max gradient error") == 4 and p.stdout.count("(tied: True)") == 2


# the end-of-run evaluation of the `full` run: 3 problems in batches of 2, greedy (rank 1 generates one)
EVAL_KV = {"eval.enabled": True, "eval.limit": 3, "eval.temperature": 0, "eval.max_new_tokens": 16}
EVAL_KV |= {"eval.batch_size": 2, "eval.workers": 2}


@pytest.fixture(scope="module")
def rho1_2proc(tiny_dir, tmp_path_factory):
    """The module's reference 2-rank run (4 steps, a checkpoint at step 2 that the resume tests rewind to)."""
    out = tmp_path_factory.mktemp("dist")
    torchrun(tiny_dir, out, **{"train.run_name": "full", "train.save_every": 2, **EVAL_KV})
    return out


def rewound_copy(run: Path, name: str, step: int) -> Path:
    """A copy of a finished run under another name, as if it had been stopped after `step`: the later
    checkpoints, exports and reports removed, `latest` pointing at step_N. What `--resume` then continues."""
    dst = run.with_name(name)
    shutil.copytree(run, dst, symlinks=True)
    ck = dst / "checkpoints"
    for p in ck.iterdir():
        if p.name != f"step_{step:06d}":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (ck / "latest").symlink_to(f"step_{step:06d}")
    for name in ("summary.json", "eval", "plots", "reports"):
        p = dst / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return dst


def test_end_of_run_evaluation_is_split_over_the_ranks_like_one_process(rho1_2proc, tiny_dir):
    """Both ranks load the export and generate their share; rank 0's report equals one process's evaluation."""
    import config as C
    import evaluate
    import tiny

    run = rho1_2proc / "full"
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((run / "eval" / "metrics.json").read_text())["mbpp"]["n_problems"] == 3
    kv = {**EVAL_KV, "data.max_length": 128}  # as tiny_overrides: head CEs are taken on rows of that length
    cfg = C.load_config(None, [f"--{k}={json.dumps(v)}" for k, v in kv.items()])
    net = evaluate.load_for_eval(cfg, run / "checkpoints" / "final", "wmtp", torch.device("cpu"))
    one = evaluate.evaluate_model(
        cfg, net, tiny.load_tokenizer(tiny_dir), ["mbpp"], 1, 3, rho1_2proc / "eval1"
    )
    assert (run / "eval" / "samples.jsonl").read_text() == (
        rho1_2proc / "eval1" / "samples.jsonl"
    ).read_text()
    assert sorted(summary["eval"]) == sorted(one) and "mbpp/pass_at_1" in one
    for k, v in one.items():
        assert summary["eval"][k] == pytest.approx(v, abs=1e-5), k


def test_sharded_resume_equals_uninterrupted_run(rho1_2proc, tiny_dir):
    out = rho1_2proc
    rewound_copy(out / "full", "part", 2)
    torchrun(tiny_dir, out, "--resume", **{"train.run_name": "part", "train.save_every": 2})
    full, part = losses(metrics(out, "full")), losses(metrics(out, "part"))
    assert sorted(part) == [1, 2, 3, 4]
    for step, loss in full.items():
        assert part[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step


def test_consolidated_export_matches_the_sharded_checkpoint(rho1_2proc):
    """The safetensors export (gathered on rank 0) loads in one process and equals the 2-rank DCP checkpoint."""
    ck = rho1_2proc / "full" / "checkpoints"
    exported = formats.load_checkpoint(ck / "final")
    resharded = M.Transformer(exported.args)
    resharded.load_state_dict(dcp_model(ck / "latest", rho1_2proc))  # 2 shards -> 1 process
    ids = torch.randint(0, exported.args.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(ids), resharded(ids))


def test_oom_on_one_rank_is_agreed_by_all(rho1_2proc, tiny_dir):
    out = rho1_2proc
    p = torchrun(
        tiny_dir, out, **{"train.run_name": "oom", "train.inject_oom_steps": [1], "train.inject_oom_rank": 1}
    )
    assert "[rank 1] step 1: out of memory" in p.stdout and "[rank 0] step 1: out of memory" not in p.stdout
    summary = json.loads((out / "oom" / "summary.json").read_text())
    assert summary["oom_events"] == 1 and summary["final_micro_batch"] == 2
    full = losses(metrics(out, "full"))
    for step, loss in losses(metrics(out, "oom")).items():
        assert loss == pytest.approx(full[step], rel=1e-5), step


def test_resume_on_one_process_from_two(rho1_2proc, tiny_dir):
    """Weights saved by 2 ranks resume in a single process (DCP reshards on load). The steps after it differ from
    the 2-rank run's by design: one rank takes one rank's share of each step's rows."""
    out = rho1_2proc
    rewound_copy(out / "full", "w21", 2)
    kv = {"train.run_name": "w21", "train.steps": 4}
    p = run_train(tiny_dir, out, "--resume", config="configs/tiny_rho1_mbpp.toml", **kv)
    assert "resumed from" in p.stdout and "at step 2" in p.stdout
    assert sorted(losses(metrics(out, "w21"))) == [1, 2, 3, 4]
    assert (out / "w21" / "checkpoints" / "final" / "model.safetensors").is_file()


def test_replicated_data_parallel_equals_fsdp(rho1_2proc, tiny_dir):
    """train.fsdp = false under torchrun (every rank holds the whole model, gradients all-reduced): the same run."""
    out = rho1_2proc
    torchrun(tiny_dir, out, **{"train.run_name": "ddp", "train.fsdp": False})
    full, ddp = losses(metrics(out, "full")), losses(metrics(out, "ddp"))
    assert sorted(ddp) == sorted(full) == [1, 2, 3, 4]
    for step, loss in full.items():
        assert ddp[step] == pytest.approx(loss, rel=1e-5), step


def test_sharded_reference_trains_exactly_like_a_replicated_one(rho1_2proc, tiny_dir):
    """train.aux_models = 'shard': the frozen reference is FSDP2-sharded over the ranks (each forward needs both
    ranks), and the excess, hence the weights, the loss and every update, equal the replicated reference's.

    The replicated run is the module's 4-step `full` run (same config; aux_models defaults to 'replicate')."""
    out = rho1_2proc
    p = torchrun(tiny_dir, out, **{"train.run_name": "shard", "train.aux_models": "shard"})
    m = re.search(
        r"FSDPLlamaForCausalLM FSDP2-sharded over 2 ranks: (\d+) of (\d+) parameters here", p.stdout
    )
    assert m, p.stdout[-2000:]
    assert 0.4 < int(m[1]) / int(m[2]) < 0.6  # rank 0 holds about half of the reference
    full, shard = losses(metrics(out, "full")), losses(metrics(out, "shard"))
    assert sorted(shard) == sorted(full) == [1, 2, 3, 4]
    for step, loss in full.items():
        assert shard[step] == pytest.approx(loss, rel=1e-5), step


def test_sharded_aux_models_stay_in_lockstep_where_the_ranks_work_differs(tiny_dir, tmp_path):
    """tests/dist_aux_check.py: precompute split with an idle rank, lazy fills on one rank only, reward model with
    texts on one rank, our Transformer sharded; each against the replicated model (see its docstring)."""
    p = dist_script("tests/dist_aux_check.py", str(tiny_dir), str(tmp_path / "cache"))
    assert p.stdout.count("aux sharding ok") == 2


def test_sharded_critic_resume_equals_uninterrupted_run(tiny_dir, tmp_path):
    """The critic's value head is trained on every rank (gradients averaged): a resumed 2-rank run continues it.
    (Uniform weights have no scorer state: the rho1 resume above and the one-process resume cover them.)"""
    config = "configs/tiny_critic_mbpp.toml"
    torchrun(tiny_dir, tmp_path, config=config, **{"train.run_name": "full", "train.save_every": 2})
    rewound_copy(tmp_path / "full", "part", 2)
    torchrun(
        tiny_dir, tmp_path, "--resume", config=config, **{"train.run_name": "part", "train.save_every": 2}
    )
    full, part = losses(metrics(tmp_path, "full")), losses(metrics(tmp_path, "part"))
    assert sorted(part) == [1, 2, 3, 4]
    for step, loss in full.items():
        assert part[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["first_val_loss"]


@pytest.mark.slow
def test_sigterm_to_torchrun_then_resume_equals_an_uninterrupted_run(rho1_2proc, tiny_dir):
    """SIGTERM to torchrun (what a pod eviction sends): it passes the signal to the workers, they agree on a step
    boundary, rank 0 commits the checkpoint and they exit (with train.EXIT_PREEMPTED); --resume on 2 ranks
    continues exactly."""
    import signal
    import time

    out = rho1_2proc
    cmd = [*TORCHRUN, "train.py", "configs/tiny_rho1_mbpp.toml"]
    cmd += tiny_overrides(tiny_dir, out, **{"train.steps": 4, "train.run_name": "pre"})
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=DENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = out / "pre" / "metrics.jsonl"
    while not (log.exists() and log.read_text().endswith("\n")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    n = int(re.search(r"preempted at step (\d+): checkpoint committed", stdout)[1])
    assert proc.returncode != 0, stderr[-3000:]  # torchrun itself reports the signal
    assert 1 <= n < 4 and (out / "pre" / "checkpoints" / "latest").resolve().name == f"step_{n:06d}"
    torchrun(tiny_dir, out, "--resume", **{"train.run_name": "pre"})
    full, pre = losses(metrics(out, "full")), losses(metrics(out, "pre"))
    assert sorted(pre) == [1, 2, 3, 4]
    for step, loss in full.items():
        assert pre[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step


@pytest.mark.slow
def test_nan_rollback_restores_the_sharded_snapshot(rho1_2proc, tiny_dir):
    """Under FSDP2 the in-memory snapshot holds each rank's shards: a rollback to step 2 ends with exactly the
    weights the uninterrupted run checkpointed at step 2."""
    out = rho1_2proc
    kv = {"train.run_name": "rb", "train.nan_snapshot_every": 2, "train.inject_nan_steps": [2, 3]}
    p = torchrun(tiny_dir, out, **kv, **{"train.max_bad_steps": 2})
    assert (
        "step 4: 2 non-finite steps in a row: rolled back 2 steps to step 2 (the in-memory snapshot)"
        in p.stdout
    )
    two = dcp_model(out / "full" / "checkpoints" / "step_000002", out)
    rolled = formats.load_checkpoint(out / "rb" / "checkpoints" / "final").state_dict()
    assert two.keys() == rolled.keys() and all(torch.equal(two[k], rolled[k]) for k in two)


# --------------------------------------------------------------------------- ranks in lockstep (full validation)

SCORERS = ["uniform", "critic_delta_v1", "rho1_excess_v1"]
LOCKSTEP_EVAL = [
    "--eval.temperature=0",
    "--eval.max_new_tokens=24",
    "--eval.batch_size=2",
    "--eval.workers=2",
]


def single_process_validation(tiny: Path, export: Path) -> dict:
    """train.validate in this process (no process group) on the exported weights, as the script configures it."""
    import config as C
    import data
    import parallel as P
    import train

    kv = [f"--model.tokenizer={json.dumps(str(tiny / 'tokenizer'))}", "--train.micro_batch_size=4"]
    kv += [
        "--train.val_batches=0",
        "--data.max_length=128",
        f"--storage.cache_dir={json.dumps(str(REPO / '.cache'))}",
    ]
    cfg = C.load_config(REPO / "configs" / "tiny_mbpp.toml", kv)
    tok = data.load_tokenizer(cfg, export)
    val_ds = data.build_dataset(cfg, tok, "validation")
    assert len(val_ds) == 90
    return train.validate(cfg, formats.load_checkpoint(export), val_ds, tok.pad_token_id, P.Dist())


# 4 ranks: every scorer, and the evaluation split (5 problems in 3 batches: rank 3 has none); 3 ranks: the scorers
# with a sharded aux model (the uniform one adds nothing to validation)
@pytest.mark.parametrize("nproc, args", [(4, [*SCORERS, "--eval"]), (3, SCORERS[1:])])
def test_ranks_stay_in_lockstep_through_full_validation_and_evaluation(nproc, args, tiny_dir, tmp_path):
    """tests/dist_lockstep_check.py under torchrun with 4 and 3 ranks (23 validation batches, 14 reference and 7
    reward chunks: none divides by the world size): each scorer prepares, steps, validates all 90 rows and exports
    without a hang; the validation loss equals one process's on the exported weights, and the evaluation split over
    the ranks equals one process's (greedy)."""
    import config as C
    import evaluate
    import tiny

    p = dist_script("tests/dist_lockstep_check.py", str(tiny_dir), str(tmp_path), *args, nproc=nproc)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    got = {r["scorer"]: r["val"] for r in rows if "scorer" in r}
    scorers = [a for a in args if a != "--eval"]
    assert sorted(got) == sorted(scorers)
    for scorer in scorers:
        want = single_process_validation(tiny_dir, tmp_path / scorer)
        for k, v in want.items():
            assert got[scorer][k] == pytest.approx(v, abs=1e-5), (scorer, k)
    if "--eval" not in args:
        return
    # the evaluation report of rank 0 equals a single process's on the same export
    cfg = C.load_config(None, LOCKSTEP_EVAL)
    net = evaluate.load_for_eval(cfg, tmp_path / scorers[0], "wmtp", torch.device("cpu"))
    evaluate.evaluate_model(cfg, net, tiny.load_tokenizer(tiny_dir), ["mbpp"], 1, 5, tmp_path / "eval1")
    samples = [(tmp_path / d / "samples.jsonl").read_text() for d in ("eval", "eval1")]
    assert samples[0] == samples[1] and samples[0].count("\n") == 5
    m_dist, m_one = (
        json.loads((tmp_path / d / "metrics.json").read_text())["mbpp"] for d in ("eval", "eval1")
    )
    assert m_dist.pop("head_ce") == pytest.approx(m_one.pop("head_ce"), abs=1e-5)
    assert m_dist == m_one and m_one["n_problems"] == 5
