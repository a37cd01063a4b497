"""train.py's optimizer step, in this process: clipping, weight decay, head weights, accumulation, schedule,
validation against a hand computation, and the OOM retry's exactness for every scorer.

The step is train.py's own (`train.train_step` / `train.optimizer_step` on a `train.Run` of the model, optimizer and
scorer built by the same functions `train.start` uses), driven here without a subprocess so each check costs a few
seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import checkpoint
import config as C
import data
import parallel as P
import score
import train
from config import REPO
from tests.test_train import tiny_overrides


def tiny_cfg(tiny: Path, tmp: Path, **kv) -> C.Config:
    return C.load_config(REPO / "configs/tiny_mbpp.toml", tiny_overrides(tiny, tmp, **kv))


def build(cfg: C.Config, tiny: Path):
    """What train() builds before its loop: model, optimizer, scorer (prepared), loader, trainer state."""
    torch.manual_seed(cfg.train.seed)
    d = P.Dist()
    tok = data.load_tokenizer(cfg, tiny / "base_meta")
    net = train.build_model(cfg, d, tiny / "base_meta")
    opt = train.make_optimizer(cfg, net)
    ds = data.build_dataset(cfg, tok, "train")
    state = score.init_state(cfg, net, tok, d.device, dataset=ds)
    mb, pad = cfg.train.micro_batch_size, tok.pad_token_id
    score.prepare(state, data.make_loader(ds, mb, pad, seed=cfg.data.seed + 1))
    loader = data.make_loader(ds, mb * cfg.train.grad_accum, pad, seed=cfg.data.seed)
    return d, tok, net, opt, state, loader, checkpoint.TrainState(micro_batch=mb)


def grad_norm(net: torch.nn.Module) -> float:
    return math.sqrt(
        sum(float(p.grad.double().square().sum()) for p in net.parameters() if p.grad is not None)
    )


# --------------------------------------------------------------------------- schedule


def test_cosine_value_at_a_mid_step_and_no_warmup(tmp_path):
    cfg = C.load_config(None, ["--train.steps=100", "--optim.lr=0.5", "--optim.min_lr_ratio=0.1"])
    # 3% of 100 steps = 3 warmup steps; step 50 is 47/97 of the way down the cosine
    want = 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 97)))
    assert train.lr_at(cfg, 50) == pytest.approx(want, rel=1e-12)
    assert [train.lr_at(cfg, s) for s in (0, 1, 2)] == pytest.approx([0.5 / 3, 1 / 3, 0.5])
    assert train.lr_at(cfg, 100) == pytest.approx(0.05)
    cfg = C.load_config(None, ["--train.steps=100", "--optim.lr=0.5", "--optim.warmup_frac=0"])
    assert train.lr_at(cfg, 0) == 0.5  # no warmup: the full rate at once
    assert train.lr_at(cfg, 50) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))


# --------------------------------------------------------------------------- the step's knobs


def test_gradient_clipping_bounds_the_norm(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, **{"optim.grad_clip": 1e-3})
    d, _, net, opt, state, loader, st = build(cfg, tiny_dir)
    r = train.Run(cfg, d, net, opt, state, st)
    m = train.train_step(r, next(loader), 0)
    assert m["train/grad_norm"] > 0.1  # the logged norm is the one before clipping
    assert grad_norm(net) == pytest.approx(1e-3, rel=1e-4)  # what AdamW stepped on
    cfg.optim.grad_clip = 0.0  # 0 disables clipping
    m = train.train_step(r, next(loader), 1)
    assert grad_norm(net) == pytest.approx(m["train/grad_norm"], rel=1e-5)


def test_weight_decay_shrinks_matrices_only(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, **{"optim.lr": 0.1, "optim.weight_decay": 0.1})
    net = train.build_model(cfg, P.Dist(), tiny_dir / "base_meta")
    opt = train.make_optimizer(cfg, net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own update is then exactly 0: only decay moves weights
    opt.step()
    for n, p in net.named_parameters():
        if p.ndim >= 2:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.1), rtol=0, atol=0, msg=n)
        else:  # RMSNorm weights
            assert torch.equal(p, before[n]), n
    assert sum(p.ndim < 2 for p in net.parameters()) == 2 * 6 + 1  # two norms per block, the final norm


def test_zero_head_weight_gives_that_head_no_gradient(tiny_dir, tmp_path):
    cfg = tiny_cfg(tiny_dir, tmp_path, **{"loss.head_weights": [1.0, 0.0, 1.0, 0.0]})
    d, _, net, opt, state, loader, st = build(cfg, tiny_dir)
    train.optimizer_step(train.Run(cfg, d, net, opt, state, st), next(loader), 0)
    for k, alive in enumerate([True, False, True, False]):
        block = net.head_block(k)
        zero = all((p.grad == 0).all() for p in block.parameters())
        assert zero != alive, f"head {k + 1}"
    assert grad_norm(net.layers[0]) > 0  # the trunk still learns from heads 1 and 3


def test_gradient_accumulation_equals_one_big_batch(tiny_dir, tmp_path):
    grads, losses = [], []
    for mb, accum in ((8, 1), (2, 4)):
        cfg = tiny_cfg(tiny_dir, tmp_path, **{"train.micro_batch_size": mb, "train.grad_accum": accum})
        d, _, net, opt, state, loader, st = build(cfg, tiny_dir)
        stats = train.optimizer_step(train.Run(cfg, d, net, opt, state, st), next(loader), 0)
        assert len(stats) == accum
        losses.append(train.step_metrics(stats, d)["train/loss"])
        grads.append([p.grad.clone() for p in net.parameters()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("val_batches", [0, 2])
def test_validation_equals_per_head_ce_computed_by_hand(val_batches, tiny_dir, tmp_path):
    """val/ce_head{k} = mean over the split's valid pairs of head k of -log p_k(target), from full forwards of
    one row at a time (no batching, no padding), in float64; val/loss is the mean over heads."""
    cfg = tiny_cfg(tiny_dir, tmp_path, **{"train.val_batches": val_batches, "train.micro_batch_size": 4})
    d = P.Dist()
    tok = data.load_tokenizer(cfg, tiny_dir / "base_meta")
    net = train.build_model(cfg, d, tiny_dir / "base_meta")
    val = data.build_dataset(cfg, tok, "validation")
    got = train.validate(cfg, net, val, tok.pad_token_id, d)
    rows = val[:] if not val_batches else val[: 4 * val_batches]
    H = cfg.model.n_future_tokens
    total, count = [0.0] * H, [0] * H
    pairs = list(zip(rows["input_ids"], rows["loss_mask"], strict=True))
    with torch.no_grad():
        for s in range(
            0, len(pairs), 15
        ):  # 15 rows per forward, right-padded (causal: padding is never seen)
            chunk = pairs[s : s + 15]
            x = torch.nn.utils.rnn.pad_sequence([torch.tensor(i) for i, _ in chunk], batch_first=True)
            logps = torch.log_softmax(net(x).double(), -1)  # [B, S, H, V]
            for b, (ids, mask) in enumerate(chunk):
                x_b, m, logp = torch.tensor(ids), torch.tensor(mask), logps[b]
                for k in range(H):  # position t of head k predicts token t + k + 1: targets x[k+1:]
                    nll = -logp[: len(ids) - k - 1, k].gather(-1, x_b[k + 1 :, None])[:, 0]
                    total[k] += float(nll[m[k + 1 :]].sum())
                    count[k] += int(m[k + 1 :].sum())
    want = [t / c for t, c in zip(total, count, strict=True)]
    assert len(rows["input_ids"]) == (90 if not val_batches else 8)
    for k in range(H):
        assert got[f"val/ce_head{k + 1}"] == pytest.approx(want[k], rel=1e-5), k
    assert got["val/loss"] == pytest.approx(sum(want) / H, rel=1e-5)


# --------------------------------------------------------------------------- OOM retry, every scorer


@pytest.mark.parametrize("scorer", ["uniform", "critic_delta_v1", "rho1_excess_v1"])
def test_an_oom_retry_leaves_no_trace_for_any_scorer(scorer, tiny_dir, tmp_path):
    """An OOM in the first micro-batch of step 1 (the step is retried at half the micro-batch, and every later
    step too) ends where an uninterrupted run ends: the same losses and weights, and for the critic the same
    value head (one value-head step per optimizer step, never one for the failed attempt); the run's weight
    histogram counts each step once."""
    runs = {}
    for name, inject in (("plain", []), ("oom", [1])):
        cfg = tiny_cfg(
            tiny_dir, tmp_path, **{"loss.scorer": scorer, "train.inject_oom_steps": inject, "loss.lam": 1.0}
        )
        d, _, net, opt, state, loader, st = build(cfg, tiny_dir)
        r = train.Run(cfg, d, net, opt, state, st)
        rows = [train.train_step(r, next(loader), step) for step in range(3)]
        runs[name] = rows, net, state, st
    (plain, net_a, state_a, st_a), (oom, net_b, state_b, st_b) = runs["plain"], runs["oom"]
    assert (st_a.oom_events, st_b.oom_events, st_b.micro_batch) == (0, 1, 2)
    for a, b in zip(plain, oom, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["weights/mean"] == pytest.approx(a["weights/mean"], abs=1e-6)
    for (n, a), b in zip(net_a.named_parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=n)  # AdamW magnifies rounding noise
    assert (state_a.calls, state_b.calls) == (3, 1 + 2 + 2)  # a call per micro-batch; the failed one undone
    assert torch.equal(state_b.hist_counts, state_a.hist_counts)  # [H, bins]
    torch.testing.assert_close(state_b.head_sums, state_a.head_sums, rtol=1e-6, atol=0)
    if scorer == "critic_delta_v1":
        for a, b in zip(state_a.value_head.parameters(), state_b.value_head.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        assert state_b.value_opt.state_dict()["state"][0]["step"] == 2 + 3  # stage 1's 2 steps + 3
