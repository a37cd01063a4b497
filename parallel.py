"""The one place for parallelism and the devices: torch.distributed init, FSDP2 sharding, cross-rank decisions
(a preemption signal included), compute dtypes, and what a device achieves (tokens/s, MFU, peak memory: `Meter`). The memory plan is plan.py's.

Everything here degrades to a no-op in a single process, so train.py reads the same with or without torchrun.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True under torchrun (even with one process, so FSDP2 runs on a single GPU too)."""
        return dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK); nccl on CUDA, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=int(os.environ.get("WMTP_DIST_TIMEOUT_MIN", "30"))),
        )
    return Dist(rank, world, local, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce that is a no-op without a process group (gloo needs CPU tensors: caller's device)."""
    if dist.is_initialized():
        dist.all_reduce(
            t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        )
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any rank: how ranks agree on OOM / NaN decisions without hanging."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce(t, "max").item() > 0)


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(model: nn.Module) -> None:
    """Replicated (non-FSDP) data parallelism: mean of the gradients over ranks."""
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)  # SUM: gloo has no AVG
            p.grad /= dist.get_world_size()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (trunk, head 1 and the extra heads), also through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [*base.layers, *base.extra_heads]


def apply_fsdp(model: nn.Module, bf16: bool) -> nn.Module:
    """FSDP2: `fully_shard` each block (trunk blocks and every head), then the root (embeddings, norm, output).

    bf16 params for compute with fp32 gradient reduction on GPU; full fp32 on CPU/gloo.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {"mp_policy": mp} if mp is not None else {}
    for block in blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def aux_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a reference / reward model: ours (layers + extra_heads) or an HF decoder
    (`LlamaForCausalLM`, `LlamaForSequenceClassification`, ...: model.model.layers)."""
    if hasattr(model, "layers") and hasattr(model, "extra_heads"):
        return [*model.layers, *model.extra_heads]
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    raise TypeError(
        f"cannot shard a {type(model).__name__}: expected our model.Transformer (layers + extra_heads) or an HF "
        "decoder with model.model.layers; set train.aux_models = 'replicate'"
    )


def shard_frozen(
    model: nn.Module, block_modules: list[nn.Module], bf16: bool, device: torch.device | None = None
) -> nn.Module:
    """FSDP2 for an inference-only model: `fully_shard` per block, then the root, each rank keeping 1/world.

    The model is put in eval mode without gradients; it may still be on the CPU (FSDP2 moves each module to the
    mesh's device as it shards it, so a full copy never sits on the GPU). bf16: compute in bfloat16 through a
    MixedPrecisionPolicy, as `apply_fsdp`. `device`: the mesh's device type (default: FSDP2's, CUDA when there is
    one; pass the training device so `train.device = "cpu"` stays on gloo). Every block (the root too) all-gathers
    for its forward and frees the gathered weights after it, so each forward is a collective: EVERY rank must call
    the model the same number of times, in the same order.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.eval().requires_grad_(False)
    kw: dict = {
        "reshard_after_forward": True
    }  # explicit: the root too (FSDP2 keeps it gathered for backward)
    if device is not None:
        from torch.distributed.device_mesh import init_device_mesh

        kw["mesh"] = init_device_mesh(device.type, (dist.get_world_size(),))
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for block in block_modules:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def print0(text: str) -> None:
    """Print on rank 0 only (torchrun's RANK; any process without it is rank 0), flushed."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_gather_object(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects; CPU tensors); [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def split_map(
    items: list, size: int, run: Callable[[list], list], idle: Callable[[], None] | None = None
) -> list:
    """[run(chunk) for the chunks of `size` items], flattened; `run` gives one result per item.

    Under torchrun with the SAME `items` on every rank, chunk j runs on rank j % world_size and the results are
    all-gathered back into the order of `items` on every rank: world_size x less work, and each chunk is exactly
    the one a single process would run. A rank out of chunks in the last round calls `idle()` (when given), so
    every rank makes the same number of calls: a sharded model's forwards are collectives.
    """
    chunks = [items[s : s + size] for s in range(0, len(items), size)]
    rank, world = rank_world()
    if world == 1:
        return [y for c in chunks for y in run(c)]
    mine = {}
    for j in range(rank, math.ceil(len(chunks) / world) * world, world):
        if j < len(chunks):
            mine[j] = run(chunks[j])
        elif idle is not None:
            idle()
    done = {j: ys for part in all_gather_object(mine) for j, ys in part.items()}
    return [y for j in range(len(chunks)) for y in done[j]]


def compute_dtype(device: torch.device, model_dtype: str) -> torch.dtype:
    """bfloat16 on a GPU that has it when `model.dtype` = "bfloat16", else float32 (CPU always computes in fp32).

    A compute dtype only: master weights, gradients and optimizer states are fp32 whatever the checkpoint's dtype.
    """
    if device.type == "cuda" and model_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a gradient-accumulation step (FSDP2 only)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


# --------------------------------------------------------------------------- preemption


class Preemption:
    """SIGTERM (what Kubernetes and VESSL send before evicting a pod) and SIGINT ask the run to stop at the next
    step boundary: all ranks agree (any_rank), a resumable checkpoint is committed, the process exits with
    EXIT_PREEMPTED. During the end-of-run evaluation (training done, its checkpoint committed) the evaluation stops
    at once and --resume redoes it. The same signal again stops at once (the previous checkpoint stays valid)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.evaluating = False  # the end-of-run evaluation stops at once (train.end_of_run_eval)
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
                what = (
                    "the evaluation now" if self.evaluating else "at the end of this step with a checkpoint"
                )
                print(
                    f"{signal.Signals(signum).name}: stopping {what} (send it again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )

    def requested(self, d: Dist) -> bool:
        return any_rank(self.received is not None, d.device)


# --------------------------------------------------------------------------- memory planning (--dry-run)

GPU_PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the device, for MFU; None when unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


class Meter:
    """Tokens/s per device, MFU on known GPUs, peak memory, between log lines.

    `add` takes a step's tokens (input positions the trunk ran on, all ranks) and the FLOPs it computed
    (model.train_flops, all ranks); MFU = FLOPs / seconds / world size / peak. Time spent outside the steps
    (validation, checkpoints) is `exclude`d from the window and reported apart (perf/excluded_s)."""

    def __init__(self, d: Dist):
        self.d, self.peak = d, peak_flops(d.device)
        self._restart()

    def _restart(self) -> None:
        self.t0, self.tokens, self.flops, self.excluded = time.perf_counter(), 0.0, 0.0, 0.0

    def add(self, tokens: float, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def read(self) -> dict:
        seconds = max(time.perf_counter() - self.t0 - self.excluded, 1e-9) * self.d.world_size
        out = {"perf/tokens_per_s_per_device": self.tokens / seconds, "perf/excluded_s": self.excluded}
        if self.peak:
            out["perf/mfu"] = self.flops / seconds / self.peak
        if self.d.device.type == "cuda":
            out["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.d.device) / 1024**3
        self._restart()
        return out

    @staticmethod
    def describe(m: dict) -> str:
        text = f"{m['perf/tokens_per_s_per_device']:,.0f} tok/s/dev"
        if "perf/mfu" in m:
            text += f" mfu {m['perf/mfu'] * 100:.1f}%"
        if "perf/peak_mem_gb" in m:
            text += f" mem {m['perf/peak_mem_gb']:.1f}GB"
        return text
