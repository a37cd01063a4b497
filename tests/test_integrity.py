"""Run integrity in one process: checkpoint commits killed between any two renames, the NaN snapshot, one run per
directory, and every expected failure printed as one line with exit 2 (errors.py) on each entry point.

The end-to-end runs (SIGTERM then --resume, a kill while committing, the rollback distance) are in test_train.py,
next to the uninterrupted run they are compared with.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import config as C
import data
import errors
import files
import integrity
import parallel as P
import s3cache
import score
import train
from config import REPO, default_data_root
from tests.test_train import ENV, run_train, tiny_overrides

CONFIG = str(REPO / "configs" / "tiny_mbpp.toml")


# --------------------------------------------------------------------------- checkpoint commits


@pytest.fixture(scope="module")
def trainer(tiny_dir, tmp_path_factory):
    """Two tiny models with AdamW and scorer state, as train.run builds them: one saves, the other resumes."""
    out = tmp_path_factory.mktemp("commit")
    kv = {"train.save_every": 2, "train.keep_checkpoints": 1}
    cfg = C.load_config(CONFIG, tiny_overrides(tiny_dir, out, **kv))
    d = P.Dist()
    tok = data.load_tokenizer(cfg, tiny_dir / "base_meta")
    pairs = []
    for _ in range(2):
        net = train.build_model(cfg, d, tiny_dir / "base_meta")
        pairs.append((net, train.make_optimizer(cfg, net), score.init_state(cfg, net, tok, d.device)))
    return cfg, d, pairs


def update(net, opt) -> dict[str, torch.Tensor]:
    """One real AdamW step on a fixed gradient; returns the new weights."""
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.01)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in net.named_parameters()}


# fault point -> the step --resume continues from (the previous checkpoint until `latest` has moved)
FAULTS = [
    ("commit:written", 2),  # step_4.tmp complete, nothing renamed
    ("swap:moved-aside", 4),  # re-committing step 4: the old one moved aside, the new not yet renamed in
    ("commit:renamed", 2),  # step_4 in place, `latest` still on step_2
    ("commit:pointed", 4),  # `latest` moved, step_2 not yet pruned
    ("prune:renamed", 4),  # step_2 renamed to .step_000002.del, not yet deleted
]


@pytest.mark.parametrize("point, resumed", FAULTS)
def test_a_kill_between_any_two_renames_leaves_a_resumable_checkpoint(
    trainer, tmp_path, monkeypatch, point, resumed
):
    cfg, d, [(net, opt, state), (net2, opt2, state2)] = trainer
    run_dir, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    st = checkpoint.TrainState(step=2, micro_batch=4)
    expected = {2: update(net, opt)}
    checkpoint.save_resume(cfg, run_dir, net, opt, st, state, d)
    st.step = 4
    expected[4] = update(net, opt)
    if point == "swap:moved-aside":
        checkpoint.save_resume(cfg, run_dir, net, opt, st, state, d)
        expected[4] = update(net, opt)
    monkeypatch.setenv(files.FAULT_ENV, point)
    monkeypatch.setattr(files, "_fault_hits", type(files._fault_hits)())
    with pytest.raises(files.FaultInjected):
        checkpoint.save_resume(cfg, run_dir, net, opt, st, state, d)
    monkeypatch.delenv(files.FAULT_ENV)

    checkpoint.clean_partial(ckdir)  # what the next run does first, holding the lock
    ck = checkpoint.find_resume(ckdir)
    assert checkpoint.load_resume(ck, net2, opt2, state2, d).step == resumed
    assert all(torch.equal(p, expected[resumed][n]) for n, p in net2.named_parameters())
    assert not [p.name for p in ckdir.iterdir() if p.name.endswith((".old", ".del"))]
    st.step = 6  # and the run goes on: the next commit cleans up after the killed one
    checkpoint.save_resume(cfg, run_dir, net, opt, st, state, d)
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_000006"]  # keep_checkpoints = 1


def damaged_newest_is_passed_over(trainer, tmp_path, damage) -> list[str]:
    """Checkpoints at steps 2 and 4, step 4 damaged by `damage(step_dir)` in a way verify cannot see: the resume
    loads step 2 exactly; returns what it said."""
    cfg, d, [(net, opt, state), (net2, opt2, state2)] = trainer
    run_dir, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    weights = update(net, opt)
    checkpoint.save_resume(cfg, run_dir, net, opt, checkpoint.TrainState(step=2, micro_batch=4), state, d)
    shutil.copytree(ckdir / "step_000002", tmp_path / "keep")  # keep_checkpoints = 1 prunes it at step 4
    update(net, opt)
    checkpoint.save_resume(cfg, run_dir, net, opt, checkpoint.TrainState(step=4, micro_batch=4), state, d)
    shutil.copytree(tmp_path / "keep", ckdir / "step_000002")
    damage(ckdir / "step_000004")
    assert checkpoint.verify(ckdir / "step_000004") is None
    said = []
    ck, st = checkpoint.load_newest_intact(ckdir, net2, opt2, state2, d, said.append)
    assert ck == ckdir / "step_000002" and st.step == 2
    assert all(torch.equal(p, weights[n]) for n, p in net2.named_parameters())
    return said


def test_a_checkpoint_that_does_not_load_is_passed_over(trainer, tmp_path):
    """Sizes that match the metadata but a trainer.pt that does not load (what verify cannot see): the load
    attempt names it and the previous checkpoint is loaded, exactly."""
    said = damaged_newest_is_passed_over(
        trainer, tmp_path, lambda step: (step / "trainer.pt").write_bytes(b"not a pickle")
    )
    step4 = tmp_path / "run" / "checkpoints" / "step_000004"
    assert len(said) == 1 and said[0].startswith(
        f"checkpoint step_000004 is damaged: {step4} cannot be loaded (UnpicklingError: "
    )


def test_a_shard_with_garbage_of_the_right_size_is_passed_over(trainer, tmp_path):
    """A .distcp file overwritten in place (its size intact, so verify passes): torch.distributed.checkpoint reports
    it as a CheckpointException, a BaseException, not an Exception; it is named and passed over all the same."""

    def garbage(step):
        [shard] = (step / "dcp").glob("*.distcp")
        shard.write_bytes(b"\x00" * shard.stat().st_size)

    said = damaged_newest_is_passed_over(trainer, tmp_path, garbage)
    step4 = tmp_path / "run" / "checkpoints" / "step_000004"
    assert len(said) == 1 and said[0].startswith(
        f"checkpoint step_000004 is damaged: {step4} cannot be loaded ("
    ), said


def test_snapshot_restores_model_optimizer_and_scorer_exactly(trainer):
    cfg, d, [(net, opt, state), _] = trainer
    update(net, opt)
    snap = checkpoint.Snapshot().take(net, opt, checkpoint.TrainState(step=7), state)
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    update(net, opt)
    update(net, opt)
    snap.restore(net, opt, state)
    assert snap.step == 7 and all(torch.equal(p, weights[n]) for n, p in net.named_parameters())
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(v, moments[i][k]) for k, v in s.items())
    fresh = train.make_optimizer(
        cfg, net
    )  # a snapshot taken before the first step: AdamW starts afresh again
    snap.take(net, fresh, checkpoint.TrainState(), state)  # the same host buffers again
    update(net, fresh)
    snap.restore(net, fresh, state)
    assert not fresh.state and all(torch.equal(p, weights[n]) for n, p in net.named_parameters())


# --------------------------------------------------------------------------- one run per directory


def test_a_second_run_with_the_same_name_stops_at_once(tiny_dir, tmp_path):
    run_dir = tmp_path / "twin"
    with files.RunLock(run_dir):  # this process is the run that holds it
        p = run_train(tiny_dir, tmp_path, check=False, **{"train.run_name": "twin"})
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith(
        f"error: {run_dir} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, since "
    )
    assert sorted(x.name for x in run_dir.iterdir()) == [".lock"]  # nothing written


def test_the_lock_of_a_run_that_is_gone_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": "node-7", "pid": 4194301, "since": 0}))  # no OS lock
    with files.RunLock(tmp_path) as lock:
        assert lock.previous["pid"] == 4194301
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(files.LockError, match=f"pid {os.getpid()}"):
            files.RunLock(tmp_path).acquire()
    with files.RunLock(tmp_path) as again:  # released at the end of the run: free, and nobody to take over
        assert again.previous == {}


# --------------------------------------------------------------------------- one error surface


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def mbpp_copy(tmp: Path, single: bool = False) -> Path:
    """MBPP's split files (or one mbpp.jsonl of the train split only) in a directory of their own."""
    src, out = Path(default_data_root()) / "mbpp", tmp / "mbpp"
    out.mkdir(parents=True)
    if single:
        shutil.copy(src / "train.jsonl", out / "mbpp.jsonl")
    else:
        for name in ("prompt.jsonl", "test.jsonl", "validation.jsonl", "train.jsonl"):
            shutil.copy(src / name, out / name)
    return out


def train_cli(tiny: Path, tmp: Path, *args: str, **kv) -> int:
    return errors.main(train.main, [CONFIG, *tiny_overrides(tiny, tmp, **kv), *args])


def test_missing_path_is_one_line_and_exit_2(tiny_dir, tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        CONFIG,
        *tiny_overrides(tiny_dir, tmp_path),
        "--model.path=/nonexistent/7B",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr == (
        f"error: {CONFIG}: 'model.path' = '/nonexistent/7B': cannot find model '/nonexistent/7B'; tried: local path "
        "'/nonexistent/7B' does not exist; S3: no resource configured\n"
    )


def test_bad_data_line_and_empty_split_are_one_line_and_exit_2(tiny_dir, tmp_path, capsys):
    bad = mbpp_copy(tmp_path / "a")
    lines = (bad / "train.jsonl").read_text().splitlines(keepends=True)
    (bad / "train.jsonl").write_text("".join(lines[:4]) + '{"task_id": 605, "text": \n' + "".join(lines[5:]))
    assert train_cli(tiny_dir, tmp_path, **{"data.path": str(bad)}) == 2
    assert one_error(capsys).startswith(f"error: {bad / 'train.jsonl'}:5: invalid JSON")

    only_train = mbpp_copy(tmp_path / "b", single=True)
    assert train_cli(tiny_dir, tmp_path, **{"data.path": str(only_train)}) == 2
    assert one_error(capsys) == (
        f"error: {only_train}: MBPP split 'validation' is empty: none of the 374 problems read has a task_id in "
        "511..600 (data.train_split / data.val_split)"
    )


def test_files_that_are_not_utf8_or_json_are_one_line(tiny_dir, tmp_path, capsys):
    """A data file with a Latin-1 byte, one with an unterminated string, a config that is not UTF-8: one line each,
    naming the file, the line and the column."""
    bad = mbpp_copy(tmp_path / "a")
    lines = (bad / "train.jsonl").read_bytes().splitlines(keepends=True)
    (bad / "train.jsonl").write_bytes(b"".join(lines[:6]) + b'{"task_id": 607, "text": "caf\xe9"}\n')
    assert train_cli(tiny_dir, tmp_path, **{"data.path": str(bad)}) == 2
    assert one_error(capsys) == f"error: {bad / 'train.jsonl'}:7: not UTF-8 text (byte 0xe9 at column 30)"
    (bad / "train.jsonl").write_bytes(b"".join(lines[:2]) + b'{"task_id": 607, "text": "abc')
    assert train_cli(tiny_dir, tmp_path, **{"data.path": str(bad)}) == 2
    assert one_error(capsys) == (
        f"error: {bad / 'train.jsonl'}:3: invalid JSON (Unterminated string starting at column 26)"
    )
    toml = tmp_path / "latin1.toml"
    toml.write_bytes(b'[train]\nrun_name = "caf\xe9"\n')
    assert errors.main(train.main, [str(toml)]) == 2
    assert one_error(capsys) == f"error: {toml}: not UTF-8 text (byte 0xe9 at offset 23)"


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_any_work(tiny_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    tok.add_tokens([f"<extra_{i}>" for i in range(10)])
    tok.save_pretrained(str(tmp_path / "big_tok"))
    kv = {"model.tokenizer": str(tmp_path / "big_tok"), "train.run_name": "big"}
    assert train_cli(tiny_dir, tmp_path, **kv) == 2
    assert one_error(capsys) == (
        f"error: {CONFIG}: the tokenizer ({tmp_path / 'big_tok'}) has 2058 tokens but the model's vocab_size is 2048 "
        f"({tiny_dir / 'base_meta'}): use the tokenizer the model was trained with"
    )
    assert not (tmp_path / "big").exists()


def test_dry_run_lists_every_missing_input_and_points_to_plan_7b(tiny_dir, tmp_path, capsys):
    kv = {
        "model.path": "/nowhere/7B_1T_4",
        "model.tokenizer": "/nowhere/hf_tokenizer",
        "loss.scorer": "rho1_excess_v1",
        "rho1.ref_model": "/nowhere/ref",
        "data.path": "/nowhere/mbpp",
        "storage.data_root": "/nowhere/data",
        "data.hub_id": "",
    }
    assert train_cli(tiny_dir, tmp_path, "--dry-run", **kv) == 2
    out = capsys.readouterr()
    missing = [line for line in out.out.splitlines() if line.startswith("missing ")]
    assert len(missing) == 4, out.out
    for key, path in [("model.path", "/nowhere/7B_1T_4"), ("model.tokenizer", "/nowhere/hf_tokenizer"),
                      ("rho1.ref_model", "/nowhere/ref"), ("MBPP not found", "/nowhere/mbpp")]:  # fmt: skip
        assert any(key in m and path in m for m in missing), (key, missing)
    assert out.err == (
        "error: --dry-run: 4 input(s) missing or unusable (listed above); to plan the memory of a 7B run without "
        "its weights, run python scripts/plan_7b.py\n"
    )


def test_non_finite_validation_at_step_0_blames_checkpoint_or_data(tiny_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir / "base_meta", broken, ignore=shutil.ignore_patterns(integrity.CHECKLIST))
    sd = torch.load(broken / "consolidated.pth", weights_only=True)
    sd["output.weight"].fill_(1e38)  # finite, but every logit overflows
    torch.save(sd, broken / "consolidated.pth")
    assert train_cli(tiny_dir, tmp_path, **{"model.path": str(broken), "train.run_name": "inf"}) == 2
    assert one_error(capsys).startswith(
        f"error: validation loss at step 0 is nan before any update: the checkpoint ({broken}) or the data is broken"
    )


@pytest.mark.parametrize(
    "main, argv, message",
    [
        (
            s3cache.main,
            ["mirror", "models/x"],
            "mirror: no S3 bucket configured (storage.s3_bucket or WMTP_S3_BUCKET)",
        ),
        (
            C._print,
            [CONFIG, "--optim.lr=nan"],
            "command line '--optim.lr=nan': 'optim.lr' = nan: expected a finite",
        ),
        (
            train.main,
            [CONFIG, "--train.lora.r=0"],
            "command line '--train.lora.r=0': 'train.lora.r' = 0 is out of",
        ),
    ],
)
def test_every_entry_point_prints_one_line(main, argv, message, capsys, monkeypatch):
    monkeypatch.delenv("WMTP_S3_BUCKET", raising=False)
    assert errors.main(main, argv) == 2
    assert one_error(capsys).startswith(f"error: {message}")
    monkeypatch.setenv("WMTP_DEBUG", "1")  # the traceback, for a developer
    with pytest.raises(errors.UserError):
        errors.main(main, argv)
