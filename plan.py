"""What a run needs and what it costs, known before its first step: `train.py CONFIG --dry-run`.

- inputs: every model, tokenizer and dataset the config names, all missing ones reported at once;
- the tokenizer against the model's vocabulary (also checked by every real run);
- the budget in epochs (also the start-of-run banner) and the per-device memory plan of FSDP2 training, printed
  with its formulas' terms, refused (exit 2) when it does not fit.

`python scripts/plan_7b.py` prints the plans of the shipped 7B configs from metadata-only stand-ins.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import config as C
import data
import errors
import formats
import model as M
import parallel as P
import s3cache
from errors import UserError

MAX_EPOCHS = 20  # more passes than this over a fine-tuning split memorise it: --dry-run and the banner warn


# --------------------------------------------------------------------------- inputs


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

    model_dir = attempt(lambda: s3cache.resolve_model(cfg, "policy"))
    tokenizer = (
        attempt(lambda: data.load_tokenizer(cfg, model_dir)) if model_dir or cfg.model.tokenizer else None
    )
    if model_dir is not None and tokenizer is not None:
        attempt(lambda: check_tokenizer(cfg, model_dir, tokenizer))
    if cfg.loss.scorer == "rho1_excess_v1":
        attempt(lambda: s3cache.resolve_model(cfg, "reference"))
    if cfg.loss.scorer == "critic_delta_v1" and cfg.critic.reward == "model":
        attempt(lambda: s3cache.resolve_model(cfg, "reward"))
    attempt(lambda: data.resolve_dataset_dir(cfg))
    if missing:
        for m in missing:
            print(f"missing     {m}")
        raise UserError(
            f"--dry-run: {len(missing)} input(s) missing or unusable (listed above); to plan the memory of a 7B run "
            "without its weights, run python scripts/plan_7b.py"
        )
    return model_dir, tokenizer


# --------------------------------------------------------------------------- the budget in epochs


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


# --------------------------------------------------------------------------- the memory plan


@dataclass
class MemoryPlan:
    world_size: int
    params_gb: float
    grads_gb: float
    optim_gb: float
    activations_gb: float
    activations_ckpt_gb: float
    logits_gb: float
    aux_models_gb: float
    budget_gb: float
    activation_checkpointing: bool

    @property
    def total_gb(self) -> float:
        acts = self.activations_ckpt_gb if self.activation_checkpointing else self.activations_gb
        return self.params_gb + self.grads_gb + self.optim_gb + acts + self.logits_gb + self.aux_models_gb

    @property
    def fits(self) -> bool:
        return self.total_gb <= 0.9 * self.budget_gb  # keep 10% for the allocator and NCCL buffers

    def table(self) -> str:
        acts = "on" if self.activation_checkpointing else "off"
        rows = [
            ("parameters (sharded, trainable in fp32)", self.params_gb),
            ("gradients (sharded, fp32)", self.grads_gb),
            ("AdamW states (sharded, fp32 m+v)", self.optim_gb),
            ("activations, no checkpointing", self.activations_gb),
            ("activations, per-block checkpointing", self.activations_ckpt_gb),
            ("one head's logits, CE and grads", self.logits_gb),
            ("reference / reward models", self.aux_models_gb),
        ]
        lines = [f"  {name:<40s} {gb:8.2f} GB" for name, gb in rows]
        lines.append(
            f"  {'total (checkpointing ' + acts + ')':<40s} {self.total_gb:8.2f} GB of {self.budget_gb:.0f} GB"
        )
        return "\n".join(lines)


def plan_memory(
    n_params: int,
    n_blocks: int,
    dim: int,
    vocab: int,
    seq_len: int,
    micro_batch: int,
    world_size: int,
    budget_gb: float,
    activation_checkpointing: bool,
    aux_params: int = 0,
    aux_sharded: bool = False,
    bf16: bool = True,
    trainable_params: int | None = None,
    logits_rows: int | None = None,
) -> MemoryPlan:
    """Per-device memory for FSDP2 training (the formulas are printed by --dry-run, so keep them simple).

    Params are sharded over `world_size`; during a block's compute one block is all-gathered (ignored: small).
    Activations per block follow Korthikanti et al. (2022) with flash attention: ~34 * s * b * d bytes in 16-bit;
    with checkpointing only the block inputs (2 * s * b * d bytes each) plus one block's full activations stay.
    The logits term is the loss as it computes them (`logits_bytes`): one head at a time; with `logits_rows` (the
    chunk of model.ce_chunk) the logits of at most that many positions, plus the output projection's gradient
    accumulated over the chunks in fp32 and one chunk's product in the compute dtype; without, every position
    of the micro-batch at once.
    """
    gb = 1024**3
    p_bytes = 2 if bf16 else 4
    trainable = n_params if trainable_params is None else trainable_params
    # fp32 master weights, sharded; under LoRA the frozen base stays in the compute dtype (train.build_model)
    frozen = n_params * (p_bytes if trainable_params is not None else 0)
    params = (frozen + trainable * 4) / world_size / gb
    grads = trainable * 4 / world_size / gb
    optim = trainable * 8 / world_size / gb
    tokens = seq_len * micro_batch
    per_block = 34 * tokens * dim * (p_bytes / 2) / gb
    acts = n_blocks * per_block
    acts_ckpt = n_blocks * 2 * tokens * dim / gb + per_block
    chunked = bool(logits_rows)
    logits = min(logits_rows or tokens, tokens) * vocab * logits_bytes(bf16, chunked) / gb
    if chunked:
        logits += vocab * dim * (4 + p_bytes) / gb
    aux = aux_params * p_bytes / (world_size if aux_sharded else 1) / gb
    return MemoryPlan(
        world_size, params, grads, optim, acts, acts_ckpt, logits, aux, budget_gb, activation_checkpointing
    )


def logits_bytes(bf16: bool, chunked: bool = False) -> int:
    """Bytes per logit at the peak of one head's CE step (model.mtp_loss_backward).

    Whole (model.ce_chunk = 0): the logits in the compute dtype (bf16: 2, fp32: 4), their fp32 copy for the CE
    (bf16 only: 4), the CE's saved log-softmax (4), the gradient reaching it (4) and the fp32 logits' gradient (4,
    fp32 only: in bf16 it reuses the copy's place); measured on CPU for a 152k vocabulary and 512 positions: 13.5
    bytes (bf16) and 16.3 (fp32) per logit. Chunked (model._ChunkedCE): one fp32 buffer per logit (4), beside
    the compute-dtype logits it is made from and the gradient cast back to them in bf16 (2)."""
    if chunked:
        return 6 if bf16 else 4
    return 14 if bf16 else 16


def format_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


# --------------------------------------------------------------------------- --dry-run


def dry_run(cfg: C.Config, d: P.Dist, model_dir: Path, tokenizer) -> int:
    """Validate config, tokenizer and model shapes; print parameter count, budget and the per-device memory plan.
    Returns 2 (refused) when the plan does not fit, else 0; no optimizer step is run."""
    args = formats.read_model_args(model_dir, cfg.model.format, cfg.model.n_future_tokens)
    n_params = M.count_params_from_args(args)
    world = int(os.environ.get("WORLD_SIZE", d.world_size))
    plan, trainable, aux = run_plan(cfg, args, world, d.device)
    print(f"config      {cfg.source} (scorer {cfg.loss.scorer}, H={args.n_future_tokens})")
    print(
        f"model       {model_dir} [{cfg.model.format}] dim={args.dim} blocks={args.n_layers} "
        f"vocab={args.vocab_size}"
    )
    print(
        f"parameters  {format_count(n_params)} total"
        + (f", {format_count(trainable)} trainable (LoRA)" if trainable else "")
    )
    if aux:
        print(f"reference   {format_count(aux)} parameters ({cfg.train.aux_models})")
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
        print(refusal(cfg, plan, aux))
        return 2
    print("plan fits: OK (no optimizer step was run)")
    return 0


def run_plan(
    cfg: C.Config, args: M.ModelArgs, world: int, device: torch.device
) -> tuple[MemoryPlan, int | None, int]:
    """(the memory plan, trainable parameters under LoRA or None, parameters of the reference model) of a run."""
    aux = 0
    if cfg.loss.scorer == "rho1_excess_v1" and cfg.rho1.ref_model:
        ref_dir = s3cache.resolve_model(cfg, "reference")
        aux = M.count_params_from_args(formats.read_model_args(ref_dir, cfg.rho1.ref_format, 1))
    budget = cfg.train.memory_gb or (
        torch.cuda.get_device_properties(device).total_memory / 1024**3 if device.type == "cuda" else 80.0
    )
    lc = cfg.train.lora
    trainable = M.lora_param_count(args, lc.r, lc.target_modules) if lc.enabled else None
    plan = plan_memory(
        n_params=M.count_params_from_args(args),
        n_blocks=args.n_layers,
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
        logits_rows=cfg.model.ce_chunk or None,
    )
    return plan, trainable, aux


def refusal(cfg: C.Config, plan: MemoryPlan, aux: int) -> str:
    """Why the plan does not fit and what would make it fit."""
    fixes = [] if cfg.model.activation_checkpointing else ["enable model.activation_checkpointing"]
    fixes += ["lower train.micro_batch_size or data.max_length"]
    fixes += [] if cfg.train.lora.enabled else ["use LoRA (train.lora.enabled)"]
    if aux and cfg.train.aux_models != "shard":
        fixes += ["shard the reference (train.aux_models = 'shard')"]
    fixes += ["or use more devices"]
    return (
        f"REFUSED: the plan needs {plan.total_gb:.1f} GB per device but only {0.9 * plan.budget_gb:.1f} GB "
        f"(90% of the device) is usable: {', '.join(fixes)}"
    )
