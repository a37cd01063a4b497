"""Weighted multi-token prediction fine-tuning: one hand-written loop, single process or torchrun.

    python train.py configs/tiny_mbpp.toml [--section.key=value ...] [--resume] [--dry-run]
    torchrun --nproc_per_node=4 train.py configs/rho1_mbpp.toml
    python train.py promote --run RUN_ID --alias staging
    python train.py export --checkpoint runs/RUN/checkpoints/latest --format hf --out DIR

One optimizer step (`train_step`): the per-rank batch (micro_batch_size * grad_accum examples) is split into
micro-batches; for each (`micro_step`), the trunk runs once, the scorer gives weights [B, S, H], and the heads run
one at a time with forward+backward (model.mtp_loss_backward). Loss normalisation uses the valid-pair count of the
whole step on all ranks, so the gradient does not depend on how the step was split (which is what makes the OOM
fallback exact). The run (`train` -> `start` -> `run` -> `finish`): set-up, step 0, the loop, the end.

Elsewhere: the weights (score.py), the model and its loss (model.py), checkpoints, exports and the end-of-run
publishing (checkpoint.py), `--dry-run` (plan.py), parallelism (parallel.py), MLflow (tracking.py).
"""

from __future__ import annotations

import gc
import json
import math
import resource
import socket
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import aux_models
import checkpoint
import config as C
import data
import errors
import evaluate
import files
import formats
import model as M
import parallel as P
import plan
import registry
import s3cache
import score
import tracking
from checkpoint import TrainState
from errors import UserError

# single-process runs save with torch.distributed.checkpoint too; its "assuming a single process" note is noise
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# --------------------------------------------------------------------------- set-up: model, optimizer, schedule


def build_model(cfg: C.Config, d: P.Dist, model_dir: Path) -> torch.nn.Module:
    """Load the checkpoint, then LoRA, activation checkpointing, FSDP2 and compile, in that order.

    Every trainable parameter is fp32 on the device whatever the checkpoint's dtype (Meta's consolidated.pth is
    bf16), so its gradient and AdamW state are fp32 too and small updates are not rounded away: bf16 is a compute
    dtype only (FSDP2's MixedPrecisionPolicy under torchrun, autocast in one process). Under LoRA the frozen base
    weights are never updated: on a bf16 GPU they stay in bf16, half the memory.
    """
    # every random initialisation (LoRA's A matrices) is drawn from train.seed, whatever drew from the RNG before
    torch.manual_seed(cfg.train.seed)
    # H comes from the config: a checkpoint with other H gets heads dropped or copied from head 1 (formats.py)
    net = formats.load_model(model_dir, cfg.model.format, cfg.model.n_future_tokens)
    net.activation_checkpointing = cfg.model.activation_checkpointing
    if cfg.train.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = cfg.train.lora  # peft freezes the base weights; adapters on the blocks of trunk and heads
        if net.args.tie_embeddings and "output" in lc.target_modules:
            raise TrainError(
                f"{cfg.source}: train.lora.target_modules has 'output', but {model_dir} ties its output to the input "
                "embedding (tie_word_embeddings): an adapter there would untie them; target the blocks only"
            )
        lora = LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules
        )
        net = get_peft_model(net, lora)
    frozen = P.compute_dtype(d.device, cfg.model.dtype)
    for p in net.parameters():  # tensor by tensor: a bf16 checkpoint never sits on the host in fp32 at once
        p.data = p.data.to(d.device, torch.float32 if p.requires_grad else frozen)
    if d.enabled and cfg.train.fsdp:
        P.apply_fsdp(net, bf16=use_bf16(cfg, d))
    if cfg.model.compile:
        for block in P.blocks(net):
            block.compile()
    return net


def use_bf16(cfg: C.Config, d: P.Dist) -> bool:
    return P.compute_dtype(d.device, cfg.model.dtype) == torch.bfloat16


def params_to_train(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def make_optimizer(cfg: C.Config, net: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings and projections), not on norms."""
    params = params_to_train(net)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def lr_at(cfg: C.Config, step: int) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine down to lr * min_lr_ratio."""
    o, total = cfg.optim, max(cfg.train.steps, 1)
    warmup = max(1, round(o.warmup_frac * total)) if o.warmup_frac > 0 else 0
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(cfg: C.Config, d: P.Dist):
    """bf16 autocast for the forwards of one process on a GPU (training step, scorer preparation, validation)."""
    if use_bf16(cfg, d) and not (d.enabled and cfg.train.fsdp):  # FSDP2's MixedPrecisionPolicy casts instead
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class TrainError(UserError, RuntimeError):
    """A run that cannot go on for a reason the message explains (printed without a traceback, exit 1)."""

    exit_code = 1


# SIGTERM/SIGINT: a resumable checkpoint was committed; continue with --resume (EX_TEMPFAIL)
EXIT_PREEMPTED = 75


# --------------------------------------------------------------------------- the run's live objects


@dataclass
class Faults:
    """Fault injection for the tests (train.inject_nan_steps, inject_oom_steps, inject_oom_rank), consulted at two
    points of the step: a poisoned step's weights are NaN (so are its loss and gradients), and the first full-size
    micro-batch of an OOM step raises after its collectives (so no other rank is left inside one)."""

    train: C.TrainConfig
    rank: int

    def weights(self, w: torch.Tensor, step: int) -> torch.Tensor:
        return w * float("nan") if step in self.train.inject_nan_steps else w

    def after_micro_batch(self, step: int, i: int, micro_batch: int) -> None:
        t = self.train
        oom = step in t.inject_oom_steps and t.inject_oom_rank in (-1, self.rank)
        if oom and i == 0 and micro_batch == t.micro_batch_size:
            raise torch.OutOfMemoryError("injected OOM (train.inject_oom_steps)")


@dataclass
class Run:
    """The live objects of a run. The step reads and changes the first six (tests build a Run of those to drive
    `train_step`); the loop around it also needs the rest, which `start` fills in."""

    cfg: C.Config
    d: P.Dist
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    scorer: score.ScorerState
    st: TrainState
    run_dir: Path | None = None
    model_dir: Path | None = None
    tokenizer: Any = None
    train_ds: Any = None
    val_ds: Any = None
    tracker: tracking.Tracker | None = None
    faults: Faults = field(init=False)

    def __post_init__(self) -> None:
        self.faults = Faults(self.cfg.train, self.d.rank)

    def log(self, line: str) -> None:
        if self.d.main:
            print(line, flush=True)

    def save(self) -> None:
        """A resumable checkpoint of this state (only ever after a good step), naming the MLflow run to continue."""
        self.st.mlflow_run_id = self.tracker.run_id or self.st.mlflow_run_id
        checkpoint.save_resume(self.cfg, self.run_dir, self.net, self.opt, self.st, self.scorer, self.d)


# --------------------------------------------------------------------------- one optimizer step


def train_step(r: Run, batch: dict, step: int) -> dict:
    """One optimizer step at `step` (learning rate, gradients, clip, AdamW) and its metrics.

    A non-finite loss or gradient norm skips the step: no weight is touched, the scorer's state is rolled back,
    and `st.bad_steps` counts it (the loop restores the last good checkpoint after `train.max_bad_steps`).
    """
    cfg, st = r.cfg, r.st
    lr = lr_at(cfg, step) * st.lr_scale
    for g in r.opt.param_groups:
        g["lr"] = lr
    stats = optimizer_step(r, batch, step)
    m = step_metrics(stats, r.d)
    gnorm = torch.nn.utils.clip_grad_norm_(params_to_train(r.net), cfg.optim.grad_clip or float("inf"))
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    if math.isfinite(m["train/loss"]) and math.isfinite(gnorm):
        r.opt.step()
        score.end_step(r.scorer)
        st.bad_steps = 0
        w, valid = (torch.cat([s[k] for s in stats]) for k in ("weights", "valid"))  # [B, S, H]
        score.record_step(r.scorer, w, valid, calls=len(stats))  # the run's histogram, the step's weights/*
        m.update(r.scorer.metrics)  # value loss, mean excess, ..., weights/* (mean_head{k}: between heads)
        st.last_weights = {k: v for k, v in m.items() if k.startswith("weights/")}
        if "token_class" in batch:
            add_class_weights(r, w, valid, batch["token_class"])
    else:  # skip: no weight is touched
        r.opt.zero_grad(set_to_none=True)
        score.rollback_step(r.scorer)
        st.bad_steps += 1
        st.skipped_steps += 1
        r.log(
            f"step {step}: non-finite loss/grad norm ({m['train/loss']}, {gnorm}); skipped "
            f"({st.bad_steps} in a row)"
        )
    m.update({"train/lr": lr, "train/grad_norm": gnorm, "train/micro_batch": st.micro_batch})
    return m


def optimizer_step(r: Run, batch: dict, step: int) -> list[dict]:
    """Gradients of one optimizer step, with the OOM fallback.

    After every micro-batch the ranks agree (one tiny all-reduce) whether any of them ran out of memory; if so all
    of them drop the step's gradients, halve the micro-batch (grad_accum doubles: the same examples are used) and
    retry. An OOM that interrupts a collective on one rank only cannot be agreed on this way: the other ranks wait
    in that collective until the process-group timeout ($WMTP_DIST_TIMEOUT_MIN).
    """
    # targets once per step; the micro-batches (any size, see the OOM fallback) take slices of them
    targets, valid = M.mtp_targets(batch["input_ids"], batch["loss_mask"], r.cfg.model.n_future_tokens)
    batch = {**batch, "targets": targets, "valid": valid}
    count_total = P.all_reduce(valid.sum().double().reshape(1)).item() / r.d.world_size  # mean per rank
    score.begin_step(r.scorer)
    stats = accumulate(r, batch, count_total, step)
    while stats is None:  # some rank ran out of memory: retry the same examples in smaller micro-batches
        halve_micro_batch(r, step, rows=batch["input_ids"].shape[0])
        stats = accumulate(r, batch, count_total, step)
    if r.d.enabled and not r.cfg.train.fsdp:
        P.average_gradients(r.net)
    return stats


def accumulate(r: Run, batch: dict, count_total: float, step: int) -> list[dict] | None:
    """The step's gradients, micro-batch by micro-batch at the current size (`st.micro_batch`), and their stats;
    None, with the gradients dropped, when some rank ran out of memory."""
    n, mb = batch["input_ids"].shape[0], r.st.micro_batch
    starts = range(0, n, mb)
    r.opt.zero_grad(set_to_none=True)
    stats = []
    for i, s in enumerate(starts):
        P.set_grad_sync(r.net, i == len(starts) - 1)
        oom = False
        try:
            with autocast(r.cfg, r.d):  # one process on a GPU: bf16 compute on the fp32 weights
                stats.append(micro_step(r, {k: v[s : s + mb] for k, v in batch.items()}, count_total, step))
            r.faults.after_micro_batch(step, i, mb)
        except torch.OutOfMemoryError as e:
            oom = True
            print(f"[rank {r.d.rank}] step {step}: out of memory at micro-batch size {mb}: {str(e)[:100]}")
        if P.any_rank(oom, r.d.device):
            r.opt.zero_grad(set_to_none=True)
            return None
    return stats


def halve_micro_batch(r: Run, step: int, rows: int) -> None:
    """The OOM fallback: forget what the failed attempt recorded and halve the micro-batch of the step's `rows`
    (at 1: give up)."""
    score.rollback_step(r.scorer)  # the retry recomputes what the failed attempt recorded
    if r.d.device.type == "cuda":
        torch.cuda.empty_cache()
    if r.st.micro_batch == 1:
        raise TrainError(
            f"step {step}: out of memory even at micro_batch_size 1 on some rank; reduce data.max_length, "
            "enable model.activation_checkpointing or LoRA, or use more GPUs (see train.py --dry-run)"
        )
    r.st.micro_batch //= 2
    r.st.oom_events += 1
    accum = math.ceil(rows / r.st.micro_batch)
    r.log(f"step {step}: OOM fallback -> micro_batch {r.st.micro_batch} x grad_accum {accum} (same batch)")


def micro_step(r: Run, batch: dict, count_total: float, step: int) -> dict:
    """Trunk once, the scorer's weigher, then heads one at a time (forward + backward each), head k's weights
    asked for with head k's CE inside that loop. Returns detached per-head stats and the weights.

    `batch` carries `targets` and `valid` [B, S, H] (model.mtp_targets) next to the loader's fields."""
    cfg, targets, valid = r.cfg, batch["targets"], batch["valid"]
    h = r.net(batch["input_ids"], stage="trunk")
    weigher = score.SCORERS[cfg.loss.scorer]({**batch, "hidden": h.detach()}, r.scorer)

    def w(k: int, ce: torch.Tensor | None) -> torch.Tensor:  # head k's mixed weights
        return r.faults.weights(score.mix(weigher(k, ce), cfg.loss.lam, valid[..., k]), step)

    # False: asked before head k's CE exists, so its chunked CE runs in one pass
    w.per_head = weigher.per_head
    count = valid.sum().item()
    alpha, scale = cfg.loss.head_weights or None, count / max(count_total, 1.0)
    out = M.mtp_loss_backward(r.net, h, targets, valid, w, alpha=alpha, scale=scale, chunk=cfg.model.ce_chunk)
    out["count"] = count
    out["head_count"] = valid.sum((0, 1)).double()  # [H]: head k's pairs (its output projection's positions)
    pad_id = getattr(r.tokenizer or r.scorer.tokenizer, "pad_token_id", None)  # (a bare Run has no tokenizer)
    out["positions"] = trunk_positions(batch["input_ids"], batch["loss_mask"], pad_id)
    args = M.unwrap(r.net).args
    out["flops"] = M.train_flops(
        args, out["positions"], batch["input_ids"].shape[1], out["head_count"].tolist()
    )
    out["weights"] = weigher.finish()  # the scorer's weights before mixing (what weight statistics describe)
    out["valid"] = valid
    return out


def trunk_positions(input_ids: torch.Tensor, loss_mask: torch.Tensor, pad_id: int | None) -> int:
    """Input positions of a right-padded batch that are not padding (all of them in packed rows): per row, up to
    its last token that is not the pad id or is in the loss mask (the pad id may be EOS, which ends a row); pad id
    unknown: up to its last loss position."""
    real = loss_mask if pad_id is None else (input_ids != pad_id) | loss_mask
    at = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
    return int((real * at).amax(1).sum()) if input_ids.numel() else 0


def step_metrics(stats: list[dict], d: P.Dist) -> dict:
    """A step's losses and counts, reduced over micro-batches and ranks.

    train/loss and train/loss_head{k}: weighted by the valid-pair counts (all heads), as the loss is normalised;
    train/ce_head{k}: by head k's own pair count; train/tokens: input positions the trunk ran on (not padding);
    train/pairs: valid (position, head) pairs; train/flops: what the step computed (model.train_flops)."""
    H = stats[0]["head_loss"].numel()
    dev = stats[0]["head_loss"].device
    buf = torch.zeros(3 * H + 4, dtype=torch.float64, device=dev)
    for s in stats:
        c, n_k = float(s["count"]), s["head_count"].to(dev)
        buf[:H] += s["head_loss"].double() * c
        buf[H : 2 * H] += s["head_ce"].double() * n_k
        buf[2 * H : 3 * H] += n_k
        buf[3 * H] += s["loss"].double() * c
        buf[3 * H + 1] += c
        buf[3 * H + 2] += s["positions"]
        buf[3 * H + 3] += s["flops"]
    P.all_reduce(buf)
    c = max(buf[3 * H + 1].item(), 1.0)
    m = {"train/loss": buf[3 * H].item() / c, "train/tokens": buf[3 * H + 2].item()}
    m.update({"train/pairs": buf[3 * H + 1].item(), "train/flops": buf[3 * H + 3].item()})
    for k in range(H):
        m[f"train/loss_head{k + 1}"] = buf[k].item() / c
        m[f"train/ce_head{k + 1}"] = buf[H + k].item() / max(buf[2 * H + k].item(), 1.0)
    return m


@torch.no_grad()
def validate(cfg, net, val_ds, pad_id: int, d: P.Dist) -> dict:
    """Plain (unweighted) MTP cross-entropy on the validation split, per head and averaged; sharded over ranks.

    The batches (the first `train.val_batches` per rank, or all) are dealt round-robin. Every FSDP2 forward is a
    collective, so every rank runs the same number of rounds: a rank out of batches in the last round runs an
    idle forward on a 1-token batch with nothing to score (the sums stay exact)."""
    H = cfg.model.n_future_tokens
    sums = torch.zeros(2 * H, dtype=torch.float64, device=d.device)
    batches = list(data.eval_batches(val_ds, cfg.train.micro_batch_size, pad_id))
    if cfg.train.val_batches:
        batches = batches[: cfg.train.val_batches * d.world_size]
    idle = data.collate([[pad_id]], [[False]], [-1], [-1], pad_id)
    rounds = math.ceil(len(batches) / d.world_size)
    for i in range(d.rank, rounds * d.world_size, d.world_size):
        batch = batches[i] if i < len(batches) else idle
        ids, mask = batch["input_ids"].to(d.device), batch["loss_mask"].to(d.device)
        targets, valid = M.mtp_targets(ids, mask, H)
        with autocast(cfg, d):
            ce = M.mtp_head_ce(net, net(ids, stage="trunk"), targets, valid, chunk=cfg.model.ce_chunk)
        sums[:H] += ce.sum((0, 1)).double()
        sums[H:] += valid.sum((0, 1)).double()
    P.all_reduce(sums)
    per_head = [(sums[k] / sums[H + k].clamp(min=1)).item() for k in range(H)]
    out = {f"val/ce_head{k + 1}": v for k, v in enumerate(per_head)}
    out["val/loss"] = sum(per_head) / H
    return out


# --------------------------------------------------------------------------- the run


FLAGS = ("--resume", "--dry-run", "--overwrite")


def parse_cli(argv: list[str]) -> tuple[str, list[str], set[str]]:
    """(config path, --section.key=value overrides, the flags of FLAGS given)."""
    overrides, rest = C.split_args(argv)
    flags = {a for a in rest if a.startswith("--")}
    unknown = flags - set(FLAGS)
    paths = [a for a in rest if not a.startswith("--")]
    if unknown or len(paths) != 1:
        raise SystemExit(
            "usage: train.py CONFIG.toml [--section.key=value ...] [--resume] [--dry-run] [--overwrite]\n"
            "       train.py promote --run RUN_ID --alias staging|production\n"
            "       train.py export --checkpoint DIR --format hf|meta --out OUT\n"
            "       train.py --version"
            + (f"\nunknown option(s): {' '.join(sorted(unknown))}" if unknown else "")
        )
    return paths[0], overrides, flags


def main(argv: list[str]) -> int:
    if argv[:1] in (["--version"], ["-V"]):
        print(tracking.version())
        return 0
    if argv and argv[0] == "promote":
        return registry.main(argv[1:])
    if argv and argv[0] == "export":
        return checkpoint.export_cli(argv[1:])
    path, overrides, flags = parse_cli(argv)
    cfg = C.load_config(path, overrides)
    d = P.init_distributed(cfg.train.device)
    try:
        return train(cfg, d, "--resume" in flags, "--dry-run" in flags, "--overwrite" in flags)
    except OSError as e:  # a full disk where no temp file was being written (metrics.jsonl, a rename)
        if e.errno not in files.FULL:
            raise
        where = f" writing {e.filename}" if e.filename else f" in {cfg.train.out_dir}"
        raise files.DiskFullError(
            f"no space left on device (ENOSPC){where}: the checkpoints committed so far are intact; free space, "
            "then continue with --resume"
        ) from None
    finally:
        P.shutdown()


def train(cfg: C.Config, d: P.Dist, resume: bool, dry: bool, overwrite: bool = False) -> int:
    """Find the inputs, take the run directory, then run (or, with --dry-run, print the plan: plan.py). A run
    that finished but whose publishing failed (e.g. its upload) is published, not trained again."""
    torch.manual_seed(cfg.train.seed)
    if dry:
        return plan.dry_run(cfg, d, *plan.resolve_inputs(cfg))
    run_name = cfg.train.run_name or f"{cfg.algo}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.out_dir) / P.broadcast_object(run_name)
    checkpoint.check_upload(cfg, d, run_dir)
    model_dir = s3cache.resolve_model(cfg, "policy")
    tokenizer = data.load_tokenizer(cfg, model_dir)
    plan.check_tokenizer(cfg, model_dir, tokenizer)
    # one run per directory, held until the run ends
    lock = checkpoint.open_run_dir(cfg, d, run_dir, resume, overwrite)
    try:
        if P.broadcast_object(checkpoint.read_pending(run_dir) is not None if d.main else None):
            return checkpoint.publish_pending(cfg, d, run_dir, tokenizer)
        with P.Preemption() as preempt:
            return run(start(cfg, d, run_dir, model_dir, tokenizer, resume), preempt)
    finally:
        if d.main:
            lock.release()


def start(cfg: C.Config, d: P.Dist, run_dir: Path, model_dir: Path, tokenizer, resume: bool) -> Run:
    """Model, data, optimizer and scorer (resumed from the run's newest checkpoint with --resume), and the
    tracker's run (a resumed run continues its MLflow run)."""
    net = build_model(cfg, d, model_dir)
    base = M.unwrap(net)
    try:  # the run ends with an HF export: refuse a model HF Llama cannot express before training it
        formats.hf_config(base.args, checkpoint.export_dtype(cfg))
    except formats.CheckpointError as e:
        raise TrainError(str(e)) from None
    log = print if d.main else (lambda *a: None)
    n_params, n_train = M.count_params(base), sum(p.numel() for p in params_to_train(net))
    log(
        f"model: {plan.format_count(n_params)} parameters ({plan.format_count(n_train)} trainable), "
        f"H={base.args.n_future_tokens}, device {d.device} x {d.world_size}"
    )
    train_ds = data.build_dataset(cfg, tokenizer, cfg.data.train_split)
    val_ds = data.build_dataset(cfg, tokenizer, cfg.data.val_split)
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * d.world_size
    log(f"data: {len(train_ds)} train rows, {len(val_ds)} validation rows, {per_step} per step")
    for line in plan.budget_lines(cfg, len(train_ds), d.world_size):
        log(line)
    opt, st = make_optimizer(cfg, net), TrainState(micro_batch=cfg.train.micro_batch_size)
    scorer = score.init_state(cfg, net, tokenizer, d.device, dataset=train_ds)
    r = Run(cfg, d, net, opt, scorer, st, run_dir, model_dir, tokenizer, train_ds, val_ds)
    ckdir = run_dir / "checkpoints"
    if resume:  # the newest checkpoint that verifies and loads; a damaged newer one is named and passed over
        if not (ckdir / "latest" / "trainer.pt").is_file():
            r.log(f"{ckdir / 'latest'} is missing or broken: resuming from the newest complete checkpoint")
        ck, r.st = checkpoint.load_newest_intact(ckdir, net, r.opt, scorer, d, r.log)
        r.log(f"resumed from {ck} at step {r.st.step}")
    if d.main:  # a resumed run writes the later steps again; a fresh one starts an empty file
        checkpoint.truncate_metrics(run_dir / "metrics.jsonl", r.st.step)
    r.tracker = tracking.Tracker(cfg, rank=d.rank)
    extra = {"model.dir": str(model_dir), "data.hash": data.run_data_hash(cfg)}
    r.tracker.start(
        run_name=run_dir.name, world_size=d.world_size, extra=extra, resume_run_id=r.st.mlflow_run_id
    )
    return r


def run(r: Run, preempt: P.Preemption) -> int:
    """Step 0 (on a fresh run), the loop, then the final export and `finish`. Returns the exit code."""
    cfg, d = r.cfg, r.d
    if r.st.step == 0:
        step_zero(r)
    snapshot = (
        checkpoint.Snapshot().take(r.net, r.opt, r.st, r.scorer) if cfg.train.nan_snapshot_every else None
    )
    meter = P.Meter(d)
    per_rank, pad = cfg.train.micro_batch_size * cfg.train.grad_accum, r.tokenizer.pad_token_id
    shard = {"rank": d.rank, "world_size": d.world_size}
    seed = data.order_seed(cfg)
    loader = data.make_loader(r.train_ds, per_rank, pad, seed=seed, skip_batches=r.st.step, **shard)
    stop = min(cfg.train.steps, cfg.train.stop_after) if cfg.train.stop_after else cfg.train.steps
    saved = r.st.step
    while r.st.step < stop:
        if preempt.requested(d):  # every rank agrees at this step boundary
            return preempted(r, saved)
        batch = {k: v.to(d.device) for k, v in next(loader).items()}
        t_step = time.perf_counter()
        m = train_step(r, batch, r.st.step)
        r.st.step_seconds += time.perf_counter() - t_step
        if r.st.bad_steps >= cfg.train.max_bad_steps:
            r.st = recover(r, snapshot)
        r.st.step += 1
        every = cfg.train.nan_snapshot_every
        if every and r.st.step % every == 0 and not r.st.bad_steps:
            snapshot.take(r.net, r.opt, r.st, r.scorer)
        log_step(r, m, meter, stop)
        t_out = time.perf_counter()  # validation and checkpoints: outside the meter's window
        if (cfg.train.eval_every and r.st.step % cfg.train.eval_every == 0) or r.st.step == cfg.train.steps:
            validation(r, m["train/loss"])
        periodic = cfg.train.save_every and r.st.step % cfg.train.save_every == 0
        if (periodic or r.st.step == stop) and not r.st.bad_steps:  # a checkpoint is only ever a good state
            r.save()
            saved = r.st.step
        meter.exclude(time.perf_counter() - t_out)
    if preempt.requested(d):  # after the last step: its checkpoint is there; export and evaluation on resume
        return preempted(r, saved)
    if r.st.step < cfg.train.steps:
        r.log(f"stopped at step {r.st.step} of {cfg.train.steps} (train.stop_after); continue with --resume")
        r.tracker.finish("KILLED")
        return 0
    final = checkpoint.export_model(r.net, r.run_dir / "checkpoints" / "final", r.tokenizer, d)
    cost = cost_metrics(d, r.st, r.net, final)
    # the end-of-run evaluation loads the export whole on every rank: first free the training state
    r.scorer.model = r.scorer.reference = None
    if r.scorer.rewards is not None:
        r.scorer.rewards.free_model()
    r.net = r.opt = snapshot = None  # (r.save() is not called after this point)
    free_memory(d)
    return finish(r, final, cost, preempt)


def step_zero(r: Run) -> None:
    """Before the first step: scorer stage 1 (critic) / precompute (rho1), the first validation (which must be
    finite: nothing has been trained yet) and the first good checkpoint."""
    cfg, d = r.cfg, r.d
    shard = {"rank": d.rank, "world_size": d.world_size}
    pad, seed = r.tokenizer.pad_token_id, data.order_seed(cfg) + 1
    loader = data.make_loader(r.train_ds, cfg.train.micro_batch_size, pad, seed=seed, **shard)
    try:
        with autocast(cfg, d):
            score.prepare(r.scorer, loader)
    except aux_models.RewardError as e:  # every rank has the same rewards: all of them stop here
        r.tracker.finish("FAILED")
        raise TrainError(str(e)) from None
    v0 = validate(cfg, r.net, r.val_ds, r.tokenizer.pad_token_id, d)
    if not math.isfinite(v0["val/loss"]):
        raise formats.CheckpointError(
            f"validation loss at step 0 is {v0['val/loss']} before any update: the checkpoint ({r.model_dir}) or "
            "the data is broken (a learning rate cannot cause this); check both"
        )
    r.log(f"step 0: val/loss {v0['val/loss']:.4f}")
    r.tracker.log_metrics(v0, step=0)
    r.st.history.append({"step": 0, **v0})
    r.save()


def log_step(r: Run, m: dict, meter: P.Meter, stop: int) -> None:
    """A step's metrics with the run's counters: a log line every train.log_every steps, MLflow, metrics.jsonl."""
    st = r.st
    m.update((f"train/{k}", getattr(st, k)) for k in ("skipped_steps", "recoveries", "rolled_back_steps"))
    meter.add(m["train/tokens"], m["train/flops"])
    if st.step % r.cfg.train.log_every == 0 or st.step == stop:
        m.update(meter.read())
        heads = " ".join(f"{m[f'train/ce_head{k + 1}']:.3f}" for k in range(r.cfg.model.n_future_tokens))
        r.log(
            f"step {st.step:>6d}/{r.cfg.train.steps} loss {m['train/loss']:.4f} ce/head [{heads}] "
            f"lr {m['train/lr']:.2e} gnorm {m['train/grad_norm']:.2f} {meter.describe(m)}"
        )
    r.tracker.log_metrics(m, step=st.step)
    if r.d.main:
        with open(r.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": st.step, **m}) + "\n")


def validation(r: Run, train_loss: float) -> None:
    """Validate, log, and export checkpoints/best when the validation loss is the run's lowest."""
    v = validate(r.cfg, r.net, r.val_ds, r.tokenizer.pad_token_id, r.d)
    r.tracker.log_metrics(v, step=r.st.step)
    r.st.history.append({"step": r.st.step, "train/loss": train_loss, **v})
    best = v["val/loss"] < r.st.best_val
    r.log(f"step {r.st.step:>6d} val/loss {v['val/loss']:.4f}" + (" (best)" if best else ""))
    if best:
        r.st.best_val = v["val/loss"]
        checkpoint.export_model(r.net, r.run_dir / "checkpoints" / "best", r.tokenizer, r.d)


def recover(r: Run, snapshot: checkpoint.Snapshot | None) -> TrainState:
    """After max_bad_steps non-finite steps: return to the newest known-good state (the in-memory snapshot or the
    latest checkpoint) and lower the LR by lr_backoff. Weights and optimizer come back; the position in the data
    and the counters move on."""
    cfg, st = r.cfg, r.st
    if st.recoveries >= cfg.train.max_recoveries:
        raise TrainError(
            f"step {st.step}: {st.bad_steps} consecutive non-finite steps after {st.recoveries} recoveries "
            f"(train.max_recoveries = {cfg.train.max_recoveries}); stopping. Lower optim.lr or check the data."
        )
    keep = TrainState(**st.__dict__)
    ck = checkpoint.find_resume(r.run_dir / "checkpoints")
    ck_step = int(checkpoint.STEP_DIR.fullmatch(ck.name)[1]) if ck is not None else -1
    if snapshot is not None and snapshot.step >= ck_step:
        snapshot.restore(r.net, r.opt, r.scorer)
        to, source = snapshot.step, "the in-memory snapshot"
    else:
        to, source = checkpoint.load_resume(ck, r.net, r.opt, r.scorer, r.d).step, f"checkpoint {ck.name}"
    now = st.step + 1  # this step's number in the logs
    keep.recoveries += 1
    keep.lr_scale = st.lr_scale * cfg.train.lr_backoff
    keep.bad_steps = 0
    keep.rolled_back_steps += now - to
    keep.rollbacks = [*st.rollbacks, {"at": now, "to": to, "from": source}]
    r.log(
        f"step {now}: {st.bad_steps} non-finite steps in a row: rolled back {now - to} steps to step {to} "
        f"({source}); lr scale now {keep.lr_scale:g} (recovery {keep.recoveries})"
    )
    return keep


def preempted(r: Run, saved: int) -> int:
    if saved != r.st.step:
        r.save()
    r.log(f"preempted at step {r.st.step}: checkpoint committed; continue with --resume")
    r.tracker.finish("KILLED")
    return EXIT_PREEMPTED


def cost_metrics(d: P.Dist, st: TrainState, net, final: Path | None) -> dict:
    """What a run costs: seconds per optimizer step, the process's CPU seconds (all threads, from its start: on a
    shared CPU machine the load-independent cost), peak memory (CUDA allocator; on CPU the process's peak RSS),
    trainable parameters, size of the final checkpoint (ours, fp32) and of the LoRA adapter alone."""

    def size_mb(name: str) -> float:
        p = None if final is None else final / name
        return p.stat().st_size / 2**20 if p is not None and p.is_file() else 0.0

    if d.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(d.device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {
        "cost/step_seconds": st.step_seconds / max(st.step, 1),
        "cost/process_cpu_s": time.process_time(),
        "cost/peak_mem_mb": peak,
        "cost/trainable_params": float(sum(p.numel() for p in params_to_train(net))),
        "cost/checkpoint_mb": size_mb("model.safetensors"),
        "cost/adapter_mb": size_mb("adapter.safetensors"),
    }


def free_memory(d: P.Dist) -> None:
    gc.collect()
    if d.device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the end of a complete run


def finish(r: Run, final: Path | None, cost: dict, preempt: P.Preemption) -> int:
    """Summary, synthetic-task metrics, the weight histogram, the end-of-run evaluation (every rank; SIGTERM stops
    it and exits EXIT_PREEMPTED: --resume evaluates again), then on rank 0 the summary kept as pending, the run
    report, and `complete`: exports and uploads, summary.json (the run is finished) and the closing lines."""
    cfg, d, st, tracker = r.cfg, r.d, r.st, r.tracker
    summary = run_summary(r, cost)
    plots = r.run_dir / "plots"
    if d.main:
        tracker.log_metrics(summary["cost"], step=st.step)
        if cfg.data.dataset == "synthetic" and final is not None:
            summary["synthetic"] = synthetic_metrics(r, final)
        plots.mkdir(exist_ok=True)
        score.save_weight_histogram(r.scorer, plots / "weight_histogram.png")
    if cfg.eval.enabled:
        try:
            summary["eval"] = end_of_run_eval(r, plots / "weight_histogram.png", preempt)
        except evaluate.Stopped:
            r.log(
                f"preempted during the end-of-run evaluation: training is complete (checkpoint step_{st.step:06d}); "
                "--resume evaluates and finishes the run"
            )
            tracker.finish("KILLED")
            return EXIT_PREEMPTED
    if d.main:
        checkpoint.write_pending(r.run_dir, summary, tracker.run_id)  # from here on, a rerun only publishes
        tracker.log_artifacts(plots, "plots")
        heads = summary["weights_per_head"]
        print(
            "weights per head (run mean): " + " ".join(f"{k} {h['run_mean']:.4f}" for k, h in heads.items())
        )
        tracker.write_report(r.run_dir, summary)
        checkpoint.complete(cfg, r.run_dir, r.tokenizer, tracker, summary)
    P.barrier()
    return 0


def run_summary(r: Run, cost: dict) -> dict:
    """summary.json: the run's outcome, fallbacks, weights and cost (evaluation results are added by `finish`)."""
    st = r.st
    return {
        "run_dir": str(r.run_dir),
        "steps": st.step,
        "algo": r.cfg.algo,
        "scorer": r.cfg.loss.scorer,
        "first_val_loss": st.history[0].get("val/loss") if st.history else None,
        "final_val_loss": st.history[-1].get("val/loss") if st.history else None,
        "best_val_loss": st.best_val,
        "skipped_steps": st.skipped_steps,
        "recoveries": st.recoveries,
        "rolled_back_steps": st.rolled_back_steps,
        "rollbacks": st.rollbacks,
        "oom_events": st.oom_events,
        "final_micro_batch": st.micro_batch,
        "final_lr_scale": st.lr_scale,
        "weights": st.last_weights,
        "weights_per_head": score.head_summary(r.scorer),  # the whole run's (the histogram's) mean per head
        "scorer_metrics": dict(r.scorer.metrics),
        "critic": score.critic_summary(r.scorer),  # the value head's fit: stage 1 and the run's mean
        "cost": {**cost, "cost/prepare_seconds": r.scorer.prepare_seconds},
        "host": socket.gethostname(),
    }


def synthetic_metrics(r: Run, final: Path) -> dict:
    """The synthetic benchmark's metrics of the final model, and the run's weights per token class (rank 0)."""
    synth = evaluate.evaluate_synthetic(r.cfg, formats.load_checkpoint(final), r.tokenizer)
    if r.st.class_weights is not None:
        synth.update(evaluate.class_weight_metrics(r.st.class_weights))
    r.tracker.log_metrics(synth, step=r.st.step)
    print("synthetic: " + " ".join(f"{k[6:]} {v:.4g}" for k, v in synth.items() if "head" not in k))
    return synth


def add_class_weights(r: Run, w: torch.Tensor, valid: torch.Tensor, token_class: torch.Tensor) -> None:
    """Synthetic benchmark: add this step's weights [B, S, H] per class of their target token to the run's
    histograms, summed over ranks (so every rank holds the same totals and any rank's resume state is right)."""
    classes = M.pair_scores(token_class, w.shape[-1])
    inc = P.all_reduce(evaluate.class_weight_counts(w, valid, classes, r.cfg.loss.w_max)).cpu()
    r.st.class_weights = inc if r.st.class_weights is None else r.st.class_weights + inc


def end_of_run_eval(r: Run, histogram: Path, preempt: P.Preemption) -> dict:
    """Every rank loads the consolidated export unsharded on its device (bf16 on GPU) and generates its share of
    the problems; rank 0 judges, writes the report and logs (evaluate.evaluate_model). Returns rank 0's metrics.
    SIGTERM / SIGINT stop it within a decoding step or the programs being judged (evaluate.Stopped)."""
    cfg, d = r.cfg, r.d
    preempt.evaluating = True
    P.barrier()  # rank 0 wrote the export
    net = evaluate.load_for_eval(cfg, r.run_dir / "checkpoints" / "final", "wmtp", d.device)
    rep = Path(cfg.eval.report_dir) if cfg.eval.report_dir else r.run_dir / "eval"
    e = cfg.eval
    metrics = evaluate.evaluate_model(
        cfg,
        net,
        r.tokenizer,
        e.datasets,
        e.n_samples,
        e.limit,
        rep,
        histogram,
        lambda: preempt.received is not None,
    )
    del net
    free_memory(d)
    if d.main:
        r.tracker.log_metrics(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=r.st.step
        )
        r.tracker.log_artifacts(rep, "reports")
    return metrics


if __name__ == "__main__":
    sys.exit(errors.main(main, sys.argv[1:]))
