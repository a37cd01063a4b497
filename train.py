"""Weighted multi-token prediction fine-tuning: one hand-written loop, single process or torchrun.

    python train.py configs/tiny_mbpp.toml [--section.key=value ...] [--resume] [--dry-run]
    torchrun --nproc_per_node=4 train.py configs/rho1_mbpp.toml
    python train.py promote --run RUN_ID --alias staging
    python train.py export --checkpoint runs/RUN/checkpoints/latest --format hf --out DIR

One optimizer step: the per-rank batch (micro_batch_size * grad_accum examples) is split into micro-batches; for
each, the trunk runs once, the scorer turns (batch, state) into weights [B, S, H], and the heads run one at a time
with forward+backward (model.mtp_loss_backward). Loss normalisation uses the valid-pair count of the whole step on
all ranks, so the gradient does not depend on how the step was split (which is what makes the OOM fallback exact).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

import checkpoint
import config as C
import data
import errors
import files
import formats
import model as M
import parallel as P
import s3cache
import score
from checkpoint import TrainState
from errors import UserError

# single-process runs save with torch.distributed.checkpoint too; its "assuming a single process" note is noise
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# --------------------------------------------------------------------------- setup helpers


def check_tokenizer(cfg: C.Config, model_dir: Path, tokenizer) -> M.ModelArgs:
    """Every token id must have a row in the model's embedding, and every row must fit a sliding attention window:
    checked before any work (ids past the vocabulary, or a row past the window, would otherwise fail mid-step)."""
    args = formats.read_model_args(model_dir, cfg.model.format, cfg.model.n_future_tokens)
    if len(tokenizer) > args.vocab_size:
        raise formats.CheckpointError(
            f"{cfg.source}: the tokenizer ({cfg.model.tokenizer or model_dir}) has {len(tokenizer)} tokens but the "
            f"model's vocab_size is {args.vocab_size} ({model_dir}): use the tokenizer the model was trained with"
        )
    if args.sliding_window is not None and args.sliding_window < cfg.data.max_length:  # Mistral: see model.py
        raise formats.CheckpointError(
            f"{cfg.source}: data.max_length = {cfg.data.max_length} is longer than the model's sliding_window = "
            f"{args.sliding_window} ({model_dir}): this framework attends to whole sequences, which is the windowed "
            "model only up to the window; lower data.max_length to at most the window"
        )
    return args


def build_model(cfg: C.Config, d: P.Dist, model_dir: Path) -> torch.nn.Module:
    """Load the checkpoint, then LoRA, activation checkpointing, FSDP2 and compile, in that order.

    Every trainable parameter is fp32 on the device whatever the checkpoint's dtype (Meta's consolidated.pth is
    bf16), so its gradient and AdamW state are fp32 too and small updates are not rounded away: bf16 is a compute
    dtype only (FSDP2's MixedPrecisionPolicy under torchrun, autocast in one process). Under LoRA the frozen base
    weights are never updated: on a bf16 GPU they stay in bf16, half the memory.
    """
    # H comes from the config: a checkpoint with other H gets heads dropped or copied from head 1 (formats.py)
    net = formats.load_model(model_dir, cfg.model.format, cfg.model.n_future_tokens)
    net.activation_checkpointing = cfg.model.activation_checkpointing
    if cfg.train.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = cfg.train.lora  # peft freezes the base weights; adapters on the blocks of trunk and heads
        net = get_peft_model(
            net,
            LoraConfig(
                r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules
            ),
        )
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


def make_optimizer(cfg: C.Config, net: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings and projections), not on norms."""
    params = [p for p in net.parameters() if p.requires_grad]
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


class TrainError(UserError, RuntimeError):
    """A run that cannot go on for a reason the message explains (printed without a traceback, exit 1)."""

    exit_code = 1


EXIT_PREEMPTED = (
    75  # SIGTERM/SIGINT: a resumable checkpoint was committed; continue with --resume (EX_TEMPFAIL)
)


# --------------------------------------------------------------------------- one optimizer step


def micro_step(cfg, net, batch, scorer_state, count_total: float, inject_nan: bool, inject_oom: bool) -> dict:
    """Trunk once, scorer weights, then heads one at a time. Returns detached per-head stats.

    `batch` carries `targets` and `valid` [B, S, H] (model.mtp_targets) next to the loader's fields."""
    targets, valid = batch["targets"], batch["valid"]
    h = net(batch["input_ids"], stage="trunk")
    scorer_state.hidden = h.detach()
    poison = float("nan") if inject_nan else 1.0
    per_head = score.head_by_head(batch, scorer_state)  # rho1 per head: weights from each head's own CE
    weights = score.SCORERS[cfg.loss.scorer](batch, scorer_state) if per_head is None else None

    def w(k: int, ce: torch.Tensor) -> torch.Tensor:  # head k's mixed weights, asked for inside the head loop
        w_k = weights[..., k] if per_head is None else per_head(k, ce)
        return score.mix(w_k, cfg.loss.lam, valid[..., k]) * poison

    alpha = cfg.loss.head_weights or None
    count = valid.sum().item()
    out = M.mtp_loss_backward(net, h, targets, valid, w, alpha=alpha, scale=count / max(count_total, 1.0))
    if per_head is not None:
        weights = per_head.finish()
    if inject_oom:  # after the collectives of this micro-batch, so the other ranks are not left inside one
        raise torch.OutOfMemoryError("injected OOM (train.inject_oom_steps)")
    out["count"] = count
    out["weights"] = weights.detach()  # the scorer's weights before mixing (what weight statistics describe)
    out["valid"] = valid
    return out


def optimizer_step(
    cfg, net, opt, step_batch, st: TrainState, scorer_state, d: P.Dist, step: int
) -> list[dict]:
    """Gradients of one optimizer step, with the OOM fallback.

    After every micro-batch the ranks agree (one tiny all-reduce) whether any of them ran out of memory; if so all
    of them drop the step's gradients, halve the micro-batch (grad_accum doubles: the same examples are used) and
    retry. An OOM that interrupts a collective on one rank only cannot be agreed on this way: the other ranks wait
    in that collective until the process-group timeout ($WMTP_DIST_TIMEOUT_MIN).
    """
    n = step_batch["input_ids"].shape[0]
    ids, mask = step_batch["input_ids"], step_batch["loss_mask"]
    # targets once per step; the micro-batches (any size, see the OOM fallback) take slices of them
    targets, valid = M.mtp_targets(ids, mask, cfg.model.n_future_tokens)
    step_batch = {**step_batch, "targets": targets, "valid": valid}
    count_total = P.all_reduce(valid.sum().double().reshape(1)).item() / d.world_size  # mean per rank
    inject_oom = step in cfg.train.inject_oom_steps and cfg.train.inject_oom_rank in (-1, d.rank)
    score.begin_step(scorer_state)
    while True:
        mb = st.micro_batch
        opt.zero_grad(set_to_none=True)
        stats, chunks = [], list(range(0, n, mb))
        for i, s in enumerate(chunks):
            P.set_grad_sync(net, i == len(chunks) - 1)
            mbatch = {k: v[s : s + mb] for k, v in step_batch.items()}
            oom = False
            try:
                inject = inject_oom and i == 0 and mb == cfg.train.micro_batch_size
                nan = step in cfg.train.inject_nan_steps
                with autocast(cfg, d):  # one process on a GPU: bf16 compute on the fp32 weights
                    stats.append(micro_step(cfg, net, mbatch, scorer_state, count_total, nan, inject))
            except torch.OutOfMemoryError as e:
                oom = True
                print(f"[rank {d.rank}] step {step}: out of memory at micro-batch size {mb}: {str(e)[:100]}")
            if P.any_rank(oom, d.device):
                break
        else:
            if d.enabled and not cfg.train.fsdp:
                P.average_gradients(net)
            return stats
        opt.zero_grad(set_to_none=True)
        score.rollback_step(scorer_state)  # the retry recomputes what the failed attempt recorded
        stats = None
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
        if mb == 1:
            raise TrainError(
                f"step {step}: out of memory even at micro_batch_size 1 on some rank; reduce data.max_length, "
                "enable model.activation_checkpointing or LoRA, or use more GPUs (see train.py --dry-run)"
            )
        st.micro_batch = mb // 2
        st.oom_events += 1
        if d.main:
            accum = math.ceil(n / st.micro_batch)
            print(
                f"step {step}: OOM fallback -> micro_batch {st.micro_batch} x grad_accum {accum} (same batch)"
            )


def train_step(cfg, net, opt, batch, st: TrainState, scorer_state, d: P.Dist, step: int) -> dict:
    """One optimizer step at `step` (learning rate, gradients, clip, AdamW) and its metrics.

    A non-finite loss or gradient norm skips the step: no weight is touched, the scorer's state is rolled back,
    and `st.bad_steps` counts it (the loop restores the last good checkpoint after `train.max_bad_steps`).
    """
    lr = lr_at(cfg, step) * st.lr_scale
    for g in opt.param_groups:
        g["lr"] = lr
    stats = optimizer_step(cfg, net, opt, batch, st, scorer_state, d, step)
    m = step_metrics(stats, d)
    params = [p for p in net.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    if math.isfinite(m["train/loss"]) and math.isfinite(gnorm):
        opt.step()
        score.end_step(scorer_state)
        st.bad_steps = 0
        w, valid = (torch.cat([s[k] for s in stats]) for k in ("weights", "valid"))  # [B, S, H]
        m.update(scorer_state.metrics)  # value loss, mean excess, ... (and the last micro-batch's weights/*)
        m.update(score.weight_stats(w, valid, cfg.loss.eps, cfg.loss.w_max))  # the whole step's weights
        m.update(score.head_means(w, valid))  # weights/mean_head{k}: weight moved between heads
        st.last_weights = {k: v for k, v in m.items() if k.startswith("weights/")}
        if "token_class" in batch:
            add_class_weights(cfg, st, stats, batch["token_class"])
    else:  # skip: no weight is touched
        opt.zero_grad(set_to_none=True)
        score.rollback_step(scorer_state)
        st.bad_steps += 1
        st.skipped_steps += 1
        if d.main:
            print(
                f"step {step}: non-finite loss/grad norm ({m['train/loss']}, {gnorm}); skipped "
                f"({st.bad_steps} in a row)"
            )
    m.update({"train/lr": lr, "train/grad_norm": gnorm, "train/micro_batch": st.micro_batch})
    return m


def step_metrics(stats: list[dict], d: P.Dist) -> dict:
    """Loss and per-head losses reduced over micro-batches and ranks (weighted by valid-pair counts)."""
    H = stats[0]["head_loss"].numel()
    dev = stats[0]["head_loss"].device
    buf = torch.zeros(2 * H + 2, dtype=torch.float64, device=dev)
    for s in stats:
        c = float(s["count"])
        buf[:H] += s["head_loss"].double() * c
        buf[H : 2 * H] += s["head_ce"].double() * c
        buf[2 * H] += s["loss"].double() * c
        buf[2 * H + 1] += c
    P.all_reduce(buf)
    c = max(buf[-1].item(), 1.0)
    m = {"train/loss": buf[2 * H].item() / c, "train/tokens": buf[-1].item()}
    for k in range(H):
        m[f"train/loss_head{k + 1}"] = buf[k].item() / c
        m[f"train/ce_head{k + 1}"] = buf[H + k].item() / c
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
            h = net(ids, stage="trunk")
            for k in range(H):
                logits = net(h, stage=k).float()
                ce = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), targets[..., k].flatten(), reduction="none"
                ).view_as(valid[..., k])
                sums[k] += (ce * valid[..., k]).sum().double()
                sums[H + k] += valid[..., k].sum().double()
    P.all_reduce(sums)
    per_head = [(sums[k] / sums[H + k].clamp(min=1)).item() for k in range(H)]
    out = {f"val/ce_head{k + 1}": v for k, v in enumerate(per_head)}
    out["val/loss"] = sum(per_head) / H
    return out


def autocast(cfg: C.Config, d: P.Dist):
    """bf16 autocast for the forwards of one process on a GPU (training step, scorer preparation, validation)."""
    if use_bf16(cfg, d) and not (d.enabled and cfg.train.fsdp):  # FSDP2's MixedPrecisionPolicy casts instead
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- dry run

MAX_EPOCHS = 20  # more passes than this over a fine-tuning split memorise it: --dry-run and the banner warn


def epochs(cfg: C.Config, n_rows: int, world: int) -> float:
    """Passes over the train split that `train.steps` make. The loader drops the rows that do not fill a step on
    every rank (data.batches_per_epoch), so this is steps / steps-per-epoch, not steps x batch / rows."""
    per_epoch = data.batches_per_epoch(n_rows, cfg.train.micro_batch_size * cfg.train.grad_accum, world)
    return cfg.train.steps / per_epoch if per_epoch else math.inf


def budget_lines(cfg: C.Config, n_rows: int, world: int) -> list[str]:
    """The training budget in epochs (printed by --dry-run and the start-of-run banner), with a warning."""
    per_rank = cfg.train.micro_batch_size * cfg.train.grad_accum
    per_epoch = data.batches_per_epoch(n_rows, per_rank, world)
    if per_epoch == 0:
        return [f"budget      {n_rows} train rows do not fill one step of {per_rank * world} rows"]
    n = epochs(cfg, n_rows, world)
    lines = [
        f"budget      {cfg.train.steps} steps x {per_rank * world} rows = {n:.1f} epochs of the {n_rows} "
        f"{cfg.data.train_split} rows ({per_epoch} steps per epoch)"
    ]
    if n > MAX_EPOCHS:
        lines.append(
            f"WARNING: {n:.0f} epochs (> {MAX_EPOCHS}) over {n_rows} rows: the model memorises its train split; "
            f"a few epochs is the usual fine-tuning budget (3 epochs = train.steps {3 * per_epoch})"
        )
    return lines


def resolve_inputs(cfg: C.Config) -> tuple[Path, object]:
    """Find every input the run needs (model, tokenizer, reference / reward model, data) and report all that are
    missing or unusable at once; returns (model directory, tokenizer)."""
    missing: list[str] = []

    def attempt(fn):
        try:
            return fn()
        except UserError as e:
            missing.append(errors.one_line(str(e)))
            return None

    mc = cfg.model
    model_dir = attempt(lambda: s3cache.resolve_model(cfg, mc.path, mc.resource, mc.format, "model.path"))
    tokenizer = (
        attempt(lambda: data.load_tokenizer(cfg, model_dir)) if model_dir or cfg.model.tokenizer else None
    )
    if model_dir is not None and tokenizer is not None:
        attempt(lambda: check_tokenizer(cfg, model_dir, tokenizer))
    rc, cc = cfg.rho1, cfg.critic
    if cfg.loss.scorer == "rho1_excess_v1":
        attempt(
            lambda: s3cache.resolve_model(cfg, rc.ref_model, rc.ref_resource, rc.ref_format, "rho1.ref_model")
        )
    if cfg.loss.scorer == "critic_delta_v1" and cc.reward == "model":
        attempt(
            lambda: s3cache.resolve_model(
                cfg, cc.reward_model, cc.reward_resource, "hf", "critic.reward_model"
            )
        )
    attempt(lambda: data.resolve_dataset_dir(cfg))
    if missing:
        for m in missing:
            print(f"missing     {m}")
        raise UserError(
            f"--dry-run: {len(missing)} input(s) missing or unusable (listed above); to plan the memory of a 7B run "
            "without its weights, run python scripts/plan_7b.py"
        )
    return model_dir, tokenizer


def dry_run(cfg: C.Config, d: P.Dist, model_dir: Path, tokenizer) -> int:
    """Validate config, tokenizer and model shapes; print parameter count and the per-device memory plan."""
    args = formats.read_model_args(model_dir, cfg.model.format, cfg.model.n_future_tokens)
    n_params = M.count_params_from_args(args)
    blocks = args.n_layers if cfg.model.format != "hf" else args.n_layers  # Meta layout counts every block
    world = int(os.environ.get("WORLD_SIZE", d.world_size))
    aux = 0
    if cfg.loss.scorer == "rho1_excess_v1" and cfg.rho1.ref_model:
        ref_dir = s3cache.resolve_model(
            cfg, cfg.rho1.ref_model, cfg.rho1.ref_resource, cfg.rho1.ref_format, "rho1.ref_model"
        )
        aux = M.count_params_from_args(formats.read_model_args(ref_dir, cfg.rho1.ref_format, 1))
    budget = cfg.train.memory_gb or (
        torch.cuda.get_device_properties(d.device).total_memory / 1024**3 if d.device.type == "cuda" else 80.0
    )
    trainable = None
    if cfg.train.lora.enabled:
        lc = cfg.train.lora
        trainable = M.lora_param_count(args, lc.r, lc.target_modules)
    plan = P.plan_memory(
        n_params=n_params,
        n_blocks=blocks,
        dim=args.dim,
        vocab=args.vocab_size,
        seq_len=cfg.data.max_length,
        micro_batch=cfg.train.micro_batch_size,
        world_size=world,
        budget_gb=budget,
        activation_checkpointing=cfg.model.activation_checkpointing,
        aux_params=aux,
        aux_sharded=cfg.train.aux_models == "shard",
        bf16=cfg.model.dtype == "bfloat16",
        trainable_params=trainable,
    )
    print(f"config      {cfg.source} (scorer {cfg.loss.scorer}, H={args.n_future_tokens})")
    print(
        f"model       {model_dir} [{cfg.model.format}] dim={args.dim} blocks={blocks} vocab={args.vocab_size}"
    )
    print(
        f"parameters  {P.format_count(n_params)} total"
        + (f", {P.format_count(trainable)} trainable (LoRA)" if trainable else "")
    )
    if aux:
        print(f"reference   {P.format_count(aux)} parameters ({cfg.train.aux_models})")
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.max_length * world
    print(
        f"batch       {tokens} tokens per optimizer step at most ({world} device{'s' if world > 1 else ''})"
    )
    for line in budget_lines(cfg, len(data.build_dataset(cfg, tokenizer, cfg.data.train_split)), world):
        print(line)
    compute = "bf16 compute on GPU" if cfg.model.dtype == "bfloat16" else "fp32 compute"
    frozen = ", frozen LoRA base weights in the compute dtype" if cfg.train.lora.enabled else ""
    print(f"dtypes      fp32 master weights, gradients and AdamW states; {compute}{frozen}")
    print(f"memory plan per device (world size {world}):\n{plan.table()}")
    if not plan.fits:
        fixes = [] if cfg.model.activation_checkpointing else ["enable model.activation_checkpointing"]
        fixes += ["lower train.micro_batch_size or data.max_length"]
        fixes += [] if cfg.train.lora.enabled else ["use LoRA (train.lora.enabled)"]
        fixes += (
            ["shard the reference (train.aux_models = 'shard')"]
            if aux and cfg.train.aux_models != "shard"
            else []
        )
        fixes += ["or use more devices"]
        print(
            f"REFUSED: the plan needs {plan.total_gb:.1f} GB per device but only {0.9 * plan.budget_gb:.1f} GB "
            f"(90% of the device) is usable: {', '.join(fixes)}"
        )
        return 2
    print("plan fits: OK (no optimizer step was run)")
    return 0


# --------------------------------------------------------------------------- main loop


def parse_cli(argv: list[str]) -> tuple[str, list[str], bool, bool]:
    overrides, rest = C.split_args(argv)
    flags = {a for a in rest if a.startswith("--")}
    unknown = flags - {"--resume", "--dry-run"}
    paths = [a for a in rest if not a.startswith("--")]
    if unknown or len(paths) != 1:
        raise SystemExit(
            "usage: train.py CONFIG.toml [--section.key=value ...] [--resume] [--dry-run]\n"
            "       train.py promote --run RUN_ID --alias staging|production\n"
            "       train.py export --checkpoint DIR --format hf|meta --out OUT"
            + (f"\nunknown option(s): {' '.join(sorted(unknown))}" if unknown else "")
        )
    return paths[0], overrides, "--resume" in flags, "--dry-run" in flags


def main(argv: list[str]) -> int:
    if argv and argv[0] == "promote":
        import tracking

        return tracking.main(argv[1:])
    if argv and argv[0] == "export":
        return checkpoint.export_cli(argv[1:])
    path, overrides, resume, dry = parse_cli(argv)
    cfg = C.load_config(path, overrides)
    d = P.init_distributed(cfg.train.device)
    try:
        return train(cfg, d, resume, dry)
    finally:
        P.shutdown()


def train(cfg: C.Config, d: P.Dist, resume: bool, dry: bool) -> int:
    torch.manual_seed(cfg.train.seed)
    if dry:
        return dry_run(cfg, d, *resolve_inputs(cfg))
    model_dir = s3cache.resolve_model(cfg, cfg.model.path, cfg.model.resource, cfg.model.format, "model.path")
    tokenizer = data.load_tokenizer(cfg, model_dir)
    check_tokenizer(cfg, model_dir, tokenizer)
    run_name = cfg.train.run_name or f"{cfg.algo}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.out_dir) / P.broadcast_object(run_name)
    lock = checkpoint.open_run_dir(cfg, d, run_dir, resume)  # one run per directory, held until the run ends
    try:
        with Preemption() as preempt:
            return run(cfg, d, run_dir, resume, model_dir, tokenizer, preempt)
    finally:
        if d.main:
            lock.release()


def run(cfg: C.Config, d: P.Dist, run_dir: Path, resume: bool, model_dir: Path, tokenizer, preempt) -> int:
    """Model, data, optimizer and scorer, then the loop, then export and evaluation."""
    log = print if d.main else (lambda *a, **k: None)
    net = build_model(cfg, d, model_dir)
    base = M.unwrap(net)
    try:  # the run ends with an HF export: refuse a model HF Llama cannot express before training it
        formats.hf_config(base.args, checkpoint.export_dtype(cfg))
    except formats.CheckpointError as e:
        raise TrainError(str(e)) from None
    n_params, n_train = M.count_params(base), sum(p.numel() for p in net.parameters() if p.requires_grad)
    log(
        f"model: {P.format_count(n_params)} parameters ({P.format_count(n_train)} trainable), "
        f"H={base.args.n_future_tokens}, device {d.device} x {d.world_size}"
    )
    train_ds = data.build_dataset(cfg, tokenizer, cfg.data.train_split)
    val_ds = data.build_dataset(cfg, tokenizer, cfg.data.val_split)
    per_rank, pad = cfg.train.micro_batch_size * cfg.train.grad_accum, tokenizer.pad_token_id
    log(
        f"data: {len(train_ds)} train rows, {len(val_ds)} validation rows, {per_rank * d.world_size} per step"
    )
    for line in budget_lines(cfg, len(train_ds), d.world_size):
        log(line)
    opt = make_optimizer(cfg, net)
    scorer_state = score.init_state(cfg, net, tokenizer, d.device, dataset=train_ds)
    st = TrainState(micro_batch=cfg.train.micro_batch_size)
    ckdir = run_dir / "checkpoints"
    if resume:
        ck = checkpoint.find_resume(ckdir)
        if ck != (ckdir / "latest").resolve():
            log(f"{ckdir / 'latest'} is missing or broken: resuming from the newest complete checkpoint")
        st = checkpoint.load_resume(ck, net, opt, scorer_state, d)
        log(f"resumed from {ck} at step {st.step}")
    if d.main:  # a resumed run writes the later steps again; a fresh one starts an empty file
        checkpoint.truncate_metrics(run_dir / "metrics.jsonl", st.step)

    import tracking

    tracker = tracking.Tracker(cfg, rank=d.rank)
    extra = {"model.dir": str(model_dir), "data.hash": data.run_data_hash(cfg)}
    tracker.start(run_name=run_dir.name, world_size=d.world_size, extra=extra, resume_run_id=st.mlflow_run_id)

    def save() -> None:
        st.mlflow_run_id = tracker.run_id or st.mlflow_run_id
        checkpoint.save_resume(cfg, run_dir, net, opt, st, scorer_state, d)

    shard = {"rank": d.rank, "world_size": d.world_size}
    loader = data.make_loader(train_ds, per_rank, pad, seed=cfg.data.seed, skip_batches=st.step, **shard)
    if st.step == 0:  # scorer stage 1 (critic) / precompute (rho1), first validation, first good checkpoint
        mb = cfg.train.micro_batch_size
        try:
            with autocast(cfg, d):
                score.prepare(
                    scorer_state, data.make_loader(train_ds, mb, pad, seed=cfg.data.seed + 1, **shard)
                )
        except score.RewardError as e:  # every rank has the same rewards: all of them stop here
            tracker.finish("FAILED")
            raise TrainError(str(e)) from None
        v0 = validate(cfg, net, val_ds, pad, d)
        if not math.isfinite(v0["val/loss"]):
            raise formats.CheckpointError(
                f"validation loss at step 0 is {v0['val/loss']} before any update: the checkpoint ({model_dir}) or "
                "the data is broken (a learning rate cannot cause this); check both"
            )
        log(f"step 0: val/loss {v0['val/loss']:.4f}")
        tracker.log_metrics(v0, step=0)
        st.history.append({"step": 0, **v0})
        save()
    snapshot = (
        checkpoint.Snapshot().take(net, opt, st, scorer_state) if cfg.train.nan_snapshot_every else None
    )

    # ---- the loop
    meter = Meter(d, M.flops_per_token(base.args, cfg.data.max_length))
    stop = min(cfg.train.steps, cfg.train.stop_after) if cfg.train.stop_after else cfg.train.steps
    saved = st.step
    while st.step < stop:
        if preempt.requested(d):  # every rank agrees at this step boundary
            return preempted(d, st, saved, save, tracker)
        step = st.step
        batch = {k: v.to(d.device) for k, v in next(loader).items()}
        t_step = time.perf_counter()
        m = train_step(cfg, net, opt, batch, st, scorer_state, d, step)
        st.step_seconds += time.perf_counter() - t_step
        if st.bad_steps >= cfg.train.max_bad_steps:
            st = recover(cfg, run_dir, net, opt, st, scorer_state, d, snapshot)
        st.step += 1
        every = cfg.train.nan_snapshot_every
        if every and st.step % every == 0 and not st.bad_steps:
            snapshot.take(net, opt, st, scorer_state)
        m.update(
            {
                "train/skipped_steps": st.skipped_steps,
                "train/recoveries": st.recoveries,
                "train/rolled_back_steps": st.rolled_back_steps,
            }
        )
        meter.add(m["train/tokens"])
        if st.step % cfg.train.log_every == 0 or st.step == stop:
            m.update(meter.read())
            heads = " ".join(f"{m[f'train/ce_head{k + 1}']:.3f}" for k in range(base.args.n_future_tokens))
            log(
                f"step {st.step:>6d}/{cfg.train.steps} loss {m['train/loss']:.4f} ce/head [{heads}] "
                f"lr {m['train/lr']:.2e} gnorm {m['train/grad_norm']:.2f} {meter.describe(m)}"
            )
        tracker.log_metrics(m, step=st.step)
        if d.main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": st.step, **m}) + "\n")
        if (cfg.train.eval_every and st.step % cfg.train.eval_every == 0) or st.step == cfg.train.steps:
            v = validate(cfg, net, val_ds, pad, d)
            tracker.log_metrics(v, step=st.step)
            st.history.append({"step": st.step, "train/loss": m["train/loss"], **v})
            best = v["val/loss"] < st.best_val
            log(f"step {st.step:>6d} val/loss {v['val/loss']:.4f}" + (" (best)" if best else ""))
            if best:
                st.best_val = v["val/loss"]
                checkpoint.export_model(net, run_dir / "checkpoints" / "best", tokenizer, d)
        periodic = cfg.train.save_every and st.step % cfg.train.save_every == 0
        if (periodic or st.step == stop) and not st.bad_steps:  # a checkpoint is only ever a good state
            save()
            saved = st.step

    if preempt.requested(d):  # after the last step: its checkpoint is there; export and evaluation on resume
        return preempted(d, st, saved, save, tracker)
    if st.step < cfg.train.steps:
        log(f"stopped at step {st.step} of {cfg.train.steps} (train.stop_after); continue with --resume")
        tracker.finish("KILLED")
        return 0
    final = checkpoint.export_model(net, run_dir / "checkpoints" / "final", tokenizer, d)
    cost = cost_metrics(d, st, net, final)
    # the end-of-run evaluation loads the export whole on every rank: first free the training state
    scorer_state.model = scorer_state.ref_model = scorer_state.reward_model = scorer_state.hidden = None
    net = base = opt = None  # (save() is not called after this point)
    free_memory(d)
    return finish(cfg, d, run_dir, final, st, scorer_state, tracker, tokenizer, cost)


def add_class_weights(cfg: C.Config, st: TrainState, stats: list[dict], token_class: torch.Tensor) -> None:
    """Synthetic benchmark: add this step's weights [B, S, H] per class of their target token to the run's
    histograms, summed over ranks (so every rank holds the same totals and any rank's resume state is right)."""
    import evaluate

    w = torch.cat([s["weights"] for s in stats])
    valid = torch.cat([s["valid"] for s in stats])
    inc = evaluate.class_weight_counts(w, valid, score.pair_scores(token_class, w.shape[-1]), cfg.loss.w_max)
    inc = P.all_reduce(inc).cpu()
    st.class_weights = inc if st.class_weights is None else st.class_weights + inc


def cost_metrics(d: P.Dist, st: TrainState, net, final: Path | None) -> dict:
    """What a run costs: seconds per optimizer step, the process's CPU seconds (all threads, from its start: on a
    shared CPU machine the load-independent cost), peak memory (CUDA allocator; on CPU the process's peak RSS),
    trainable parameters, size of the final checkpoint (ours, fp32) and of the LoRA adapter alone."""
    import resource

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
        "cost/trainable_params": float(sum(p.numel() for p in net.parameters() if p.requires_grad)),
        "cost/checkpoint_mb": size_mb("model.safetensors"),
        "cost/adapter_mb": size_mb("adapter.safetensors"),
    }


def free_memory(d: P.Dist) -> None:
    import gc

    gc.collect()
    if d.device.type == "cuda":
        torch.cuda.empty_cache()


def end_of_run_eval(cfg, d: P.Dist, run_dir: Path, tokenizer, tracker, step: int, histogram: Path) -> dict:
    """Every rank loads the consolidated export unsharded on its device (bf16 on GPU) and generates its share of
    the problems; rank 0 judges, writes the report and logs (evaluate.evaluate_model). Returns rank 0's metrics."""
    import evaluate

    P.barrier()  # rank 0 wrote the export
    final = run_dir / "checkpoints" / "final"
    net = evaluate.load_for_eval(cfg, final, "wmtp", d.device)
    rep = Path(cfg.eval.report_dir) if cfg.eval.report_dir else run_dir / "eval"
    e = cfg.eval
    metrics = evaluate.evaluate_model(
        cfg, net, tokenizer, e.datasets, e.n_samples, e.limit, rep, weight_histogram=histogram
    )
    del net
    free_memory(d)
    if d.main:
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        tracker.log_artifacts(rep, "reports")
    return metrics


class Meter:
    """Tokens/s per device, MFU on known GPUs (6N + attention FLOPs per token), peak memory, between log lines."""

    def __init__(self, d: P.Dist, flops_per_token: float):
        self.d, self.flops, self.peak = d, flops_per_token, P.peak_flops(d.device)
        self.t0, self.tokens = time.perf_counter(), 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def read(self) -> dict:
        tps = self.tokens / max(time.perf_counter() - self.t0, 1e-9) / self.d.world_size
        out = {"perf/tokens_per_s_per_device": tps}
        if self.peak:
            out["perf/mfu"] = tps * self.flops / self.peak
        if self.d.device.type == "cuda":
            out["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.d.device) / 1024**3
        self.t0, self.tokens = time.perf_counter(), 0.0
        return out

    @staticmethod
    def describe(m: dict) -> str:
        text = f"{m['perf/tokens_per_s_per_device']:,.0f} tok/s/dev"
        if "perf/mfu" in m:
            text += f" mfu {m['perf/mfu'] * 100:.1f}%"
        if "perf/peak_mem_gb" in m:
            text += f" mem {m['perf/peak_mem_gb']:.1f}GB"
        return text


def recover(cfg, run_dir: Path, net, opt, st: TrainState, scorer_state, d: P.Dist, snapshot) -> TrainState:
    """After max_bad_steps non-finite steps: return to the newest known-good state (the in-memory snapshot or the
    latest checkpoint) and lower the LR by lr_backoff. Weights and optimizer come back; the position in the data
    and the counters move on."""
    if st.recoveries >= cfg.train.max_recoveries:
        raise TrainError(
            f"step {st.step}: {st.bad_steps} consecutive non-finite steps after {st.recoveries} recoveries "
            f"(train.max_recoveries = {cfg.train.max_recoveries}); stopping. Lower optim.lr or check the data."
        )
    keep = TrainState(**st.__dict__)
    ck = checkpoint.find_resume(run_dir / "checkpoints")
    ck_step = int(checkpoint.STEP_DIR.fullmatch(ck.name)[1]) if ck is not None else -1
    if snapshot is not None and snapshot.step >= ck_step:
        snapshot.restore(net, opt, scorer_state)
        to, source = snapshot.step, "the in-memory snapshot"
    else:
        to, source = checkpoint.load_resume(ck, net, opt, scorer_state, d).step, f"checkpoint {ck.name}"
    now = st.step + 1  # this step's number in the logs
    keep.recoveries += 1
    keep.lr_scale = st.lr_scale * cfg.train.lr_backoff
    keep.bad_steps = 0
    keep.rolled_back_steps += now - to
    keep.rollbacks = [*st.rollbacks, {"at": now, "to": to, "from": source}]
    if d.main:
        print(
            f"step {now}: {st.bad_steps} non-finite steps in a row: rolled back {now - to} steps to step {to} "
            f"({source}); lr scale now {keep.lr_scale:g} (recovery {keep.recoveries})"
        )
    return keep


class Preemption:
    """SIGTERM (what Kubernetes and VESSL send before evicting a pod) and SIGINT ask the run to stop at the next
    step boundary: all ranks agree (parallel.any_rank), a resumable checkpoint is committed, the process exits with
    EXIT_PREEMPTED. The same signal again stops at once (the previous checkpoint stays valid)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received == signum:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is None:
            self.received = signum
            if os.environ.get("RANK", "0") == "0":
                print(
                    f"{signal.Signals(signum).name}: stopping at the end of this step with a checkpoint "
                    "(send it again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )

    def requested(self, d: P.Dist) -> bool:
        return P.any_rank(self.received is not None, d.device)


def preempted(d: P.Dist, st: TrainState, saved: int, save, tracker) -> int:
    if saved != st.step:
        save()
    if d.main:
        print(f"preempted at step {st.step}: checkpoint committed; continue with --resume", flush=True)
    tracker.finish("KILLED")
    return EXIT_PREEMPTED


def finish(
    cfg, d, run_dir: Path, final: Path | None, st: TrainState, scorer_state, tracker, tokenizer, cost=None
) -> int:
    summary = {
        "run_dir": str(run_dir),
        "steps": st.step,
        "algo": cfg.algo,
        "scorer": cfg.loss.scorer,
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
        "weights_per_head": score.head_summary(
            scorer_state
        ),  # the whole run's (the histogram's) mean per head
        "scorer_metrics": dict(scorer_state.metrics),
        "cost": cost or {},
        "host": socket.gethostname(),
    }
    plots = run_dir / "plots"
    if d.main:
        tracker.log_metrics(summary["cost"], step=st.step)
        if cfg.data.dataset == "synthetic" and final is not None:
            import evaluate

            synth = evaluate.evaluate_synthetic(cfg, formats.load_checkpoint(final), tokenizer)
            if st.class_weights is not None:
                synth.update(evaluate.class_weight_metrics(st.class_weights))
            summary["synthetic"] = synth
            tracker.log_metrics(synth, step=st.step)
            print("synthetic: " + " ".join(f"{k[6:]} {v:.4g}" for k, v in synth.items() if "head" not in k))
        plots.mkdir(exist_ok=True)
        score.save_weight_histogram(scorer_state, plots / "weight_histogram.png")
    if cfg.eval.enabled:
        hist = plots / "weight_histogram.png"
        summary["eval"] = end_of_run_eval(cfg, d, run_dir, tokenizer, tracker, st.step, hist)
    best = run_dir / "checkpoints" / "best"
    if d.main:
        files.atomic_write_text(
            run_dir / "summary.json", s3cache.scrub(json.dumps(summary, indent=2, default=str))
        )
        for ck in (c for c in (final, best) if c is not None and c.exists()):  # hf/ and meta/ beside ours
            checkpoint.export_formats(cfg, run_dir, ck, tokenizer)
        tracker.log_artifacts(plots, "plots")
        if final is not None:
            tracker.log_artifacts(final, "checkpoints/final")
        if best.exists():
            tracker.log_artifacts(best, "checkpoints/best")
        if (
            cfg.storage.upload_checkpoints
        ):  # also to s3://<bucket>/<prefix>/runs/<run>/checkpoints/ (all in s3cache)
            for ck in (c for c in (final, best) if c is not None and c.exists()):
                s3cache.upload(ck, f"runs/{run_dir.name}/checkpoints/{ck.name}", cfg.storage)
                print(f"uploaded {ck} to S3 resource runs/{run_dir.name}/checkpoints/{ck.name}")
        heads = summary["weights_per_head"]
        print(
            "weights per head (run mean): " + " ".join(f"{k} {h['run_mean']:.4f}" for k, h in heads.items())
        )
        tracker.write_report(run_dir, summary)
        tracker.finish("FINISHED")
        for line in tracker.summary():
            print(line)
        print(
            json.dumps(
                {
                    k: summary[k]
                    for k in (
                        "algo",
                        "steps",
                        "first_val_loss",
                        "final_val_loss",
                        "skipped_steps",
                        "recoveries",
                    )
                }
            )
        )
    P.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(errors.main(main, sys.argv[1:]))
