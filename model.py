"""The multi-token-prediction (MTP) transformer, its loss, its loaders and batched generation.

Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA, no biases) in Meta's MTP layout (spec §1):

    tok_embeddings -> layers[:-1] (the trunk) -> h
    head 1 = layers[-1], head k+1 = extra_heads[k-1]; every head reads h (heads run in parallel)
    each head -> shared norm -> shared output projection

Module and parameter names equal the keys of Meta's `consolidated.pth`, so a Meta state dict loads with
`load_state_dict(strict=True)`. RoPE uses Meta's convention (interleaved pairs (x[2i], x[2i+1])); `load_hf`
un-permutes HF's rotate-half q/k weights into it.

Every call goes through `Transformer.__call__` (FSDP2 attaches its root hooks there):
    model(idx)                      -> logits [B, S, H, V] (index 0 = head 1)
    model(idx, stage="trunk")       -> trunk output h [B, S, D]
    model(h, stage=k)               -> head k logits [B, S, V] (k = 0..H-1; `select=` keeps only some positions)
    model(ids, stage="decode", cache=c) -> head 1 fp32 logits of the last position [B, V] (KV-cached)

`mtp_loss_backward` is the memory-efficient step of the paper (§2): the caller computes h once; each head runs
forward + backward into a detached leaf of h, so only one head's logits are alive; one backward through the trunk.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import files
from errors import UserError
from files import atomic_write

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    """Meta's params.json keys, plus `max_seq_len` and the extensions that today's HF families need.

    The defaults are Meta's Llama-2-era block (no biases, no q/k norm, head_dim = dim / n_heads, untied output),
    so Meta checkpoints and params.json files are read exactly as before.
    """

    dim: int = 4096
    n_layers: int = 32  # ALL blocks: trunk (n_layers - H) + H head blocks
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: = n_heads (no GQA)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    n_future_tokens: int = 1  # H
    max_seq_len: int = 4096
    ffn_hidden_dim: int | None = None  # exact FFN width (HF intermediate_size); None: Llama's rule
    rope_scaling_factor: float = 1.0  # RoPE scaling factor, applied as rope_scaling_type says (1.0: none)
    rope_scaling_type: str = (
        "linear"  # "linear": positions / factor; "llama3": Llama 3.1's per-frequency rule
    )
    rope_low_freq_factor: float = (
        1.0  # llama3 scaling: wavelengths past original / low are divided by factor,
    )
    rope_high_freq_factor: float = (
        4.0  # ... those under original / high are kept, the band between is blended
    )
    rope_original_max_seq_len: int = 8192  # ... "original" (HF original_max_position_embeddings)
    attn_head_dim: int | None = (
        None  # per-head width when it is not dim / n_heads (Qwen3); None: dim / n_heads
    )
    qkv_bias: bool = False  # biases on wq / wk / wv, none on wo (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    tie_embeddings: bool = (
        False  # output.weight IS tok_embeddings.weight: one parameter, shared by every head
    )
    sliding_window: int | None = (
        None  # Mistral's attention window: a longer sequence is refused (see context_len)
    )
    family: str = "llama"  # the HF model_type the HF export writes back: llama, qwen2, qwen3 or mistral

    def __post_init__(self) -> None:
        n_kv = self.n_kv_heads or self.n_heads
        checks = [
            (
                self.dim > 0 and self.n_heads > 0 and self.vocab_size > 0,
                "dim, n_heads, vocab_size must be > 0",
            ),
            (
                self.attn_head_dim is not None or self.dim % self.n_heads == 0,
                f"dim={self.dim} must be divisible by n_heads={self.n_heads} (or set attn_head_dim)",
            ),
            (self.head_dim > 0 and self.head_dim % 2 == 0, f"head dim {self.head_dim} must be even (RoPE)"),
            (self.n_heads % n_kv == 0, f"n_heads={self.n_heads} must be divisible by n_kv_heads={n_kv}"),
            (self.n_future_tokens >= 1, f"n_future_tokens={self.n_future_tokens} must be >= 1"),
            (
                self.n_layers >= self.n_future_tokens,
                f"n_layers={self.n_layers} must be >= n_future_tokens={self.n_future_tokens} "
                "(n_layers counts the trunk AND the head blocks)",
            ),
            (self.rope_scaling_factor > 0, f"rope_scaling_factor={self.rope_scaling_factor} must be > 0"),
            (
                self.rope_scaling_type in ROPE_SCALING_TYPES,
                f"rope_scaling_type={self.rope_scaling_type!r} must be one of {ROPE_SCALING_TYPES}",
            ),
            (
                self.rope_scaling_type != "llama3"
                or (
                    0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                    and self.rope_original_max_seq_len > 0
                ),
                "llama3 RoPE scaling needs 0 < rope_low_freq_factor < rope_high_freq_factor and "
                "rope_original_max_seq_len > 0",
            ),
            (
                self.sliding_window is None or self.sliding_window > 0,
                f"sliding_window={self.sliding_window} must be > 0 (or None)",
            ),
            (self.family in FAMILIES, f"family={self.family!r} must be one of {FAMILIES}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelArgs: {msg}")

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def n_trunk(self) -> int:
        return self.n_layers - self.n_future_tokens

    @property
    def context_len(self) -> int:
        """The longest sequence computed exactly: max_seq_len, or the sliding window when it is shorter (full
        attention over a sequence no longer than the window is what the windowed model computes)."""
        return min(self.max_seq_len, self.sliding_window or self.max_seq_len)

    @property
    def hidden_dim(self) -> int:
        """FFN width: Llama's rule (2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def extensions(self) -> dict[str, Any]:
        """The fields beyond Meta's params.json keys (and max_seq_len) whose values differ from the defaults."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in META_KEYS and f.name != "max_seq_len" and getattr(self, f.name) != f.default
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> ModelArgs:
        """Strict construction from a JSON dict: unknown keys and wrong types are errors naming `source`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; expected a subset of {sorted(fields)}")
        out = {}
        for k, v in d.items():
            kind, optional = fields[k].type.split(" | ")[0], fields[k].type.endswith("| None")
            if v is None and optional:
                out[k] = None
                continue
            ok = {
                "int": isinstance(v, int) and not isinstance(v, bool),
                "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                "bool": isinstance(v, bool),
                "str": isinstance(v, str),
            }[kind]
            if not ok:
                raise ValueError(f"{source}: key {k!r} = {v!r} must be {kind}")
            out[k] = float(v) if kind == "float" else v
        try:
            return cls(**out)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


# the keys of Meta's params.json (its reference ModelArgs, without the inference-time max_batch_size / max_seq_len)
META_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "n_future_tokens")  # fmt: skip
ROPE_SCALING_TYPES = ("linear", "llama3")
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # HF model_type values that load_hf reads


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Meta and HF do), cast back, then scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_inv_freq(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Angle per position of each rotated pair i: theta^(-2i/head_dim), with llama3 scaling when configured.

    llama3 (Llama 3.1): a frequency whose wavelength 2 pi / f exceeds original / low_freq_factor is divided by
    `factor`, one under original / high_freq_factor is kept, and the band between blends the two linearly in
    original / wavelength. Linear scaling divides the positions instead (`rope_cos_sin`).
    """
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=dtype) / hd))
    if args.rope_scaling_type != "llama3":
        return inv_freq
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    orig = args.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    blend = ((orig / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: divided by factor, 1: kept
    scaled = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(
        wavelen < orig / high, inv_freq, torch.where(wavelen > orig / low, inv_freq / factor, scaled)
    )


def rope_cos_sin(positions: Tensor, args: ModelArgs, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B|1, T, 1, head_dim/2] for integer positions [B|1, T]; fp32 angles like Meta/HF (fp64 if asked).

    Computed on the fly (cheap) rather than stored as a buffer, so `model.to(bfloat16)` cannot degrade them and
    the state dict holds exactly Meta's keys. Every forward takes its positions here, so this is also where a
    sequence longer than a sliding window is refused: this model attends to the whole sequence, which equals the
    windowed attention only up to the window.
    """
    if args.sliding_window is not None and positions.numel() and int(positions.max()) >= args.sliding_window:
        raise ValueError(
            f"sequence of {int(positions.max()) + 1} positions > sliding_window={args.sliding_window}: this model "
            "attends to the whole sequence, which equals the windowed attention only up to the window"
        )
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = rope_inv_freq(args, positions.device, cdt)
    scale = args.rope_scaling_factor if args.rope_scaling_type == "linear" else 1.0
    angles = (positions.to(cdt) / scale)[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle i (Meta's complex-multiply convention, in reals)."""
    # one complex multiply: about 5x faster on CPU than the four real products and a stack
    xc = torch.view_as_complex(x.to(cos.dtype).unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).type_as(x)


class Attention(nn.Module):
    """GQA self-attention; optional q/k/v biases (Qwen2) and per-head q/k RMSNorm before RoPE (Qwen3).

    Rows of wq / wk (and their biases) are in Meta's interleaved RoPE layout; the q/k norm weights [head_dim] too
    (the per-head RMS is the same in either layout, the scales are permuted as the rows are)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.hd, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, self.n_kv * self.hd, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, self.n_kv * self.hd, bias=args.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.hd, args.norm_eps)
            self.k_norm = RMSNorm(self.hd, args.norm_eps)

    def _heads(self, x: Tensor, proj: nn.Linear, n: int, norm: str, cos: Tensor, sin: Tensor) -> Tensor:
        """proj(x) split into n heads [B, n, T, hd], normed (qk_norm) and rotated."""
        y = proj(x).view(*x.shape[:2], n, self.hd)
        if hasattr(self, norm):
            y = getattr(self, norm)(y)
        return apply_rope(y, cos, sin).transpose(1, 2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, kv=None) -> Tensor:
        """Causal attention; with `kv=(k_cache, v_cache, start)` the new keys/values are written from cache slot
        `start` on (an int: the same slot for every row) or at per-row slots (speculative decoding, where rows
        accept different numbers of drafts): `start` is then the slot index [B, n_kv, T, hd] for a scatter
        along the slot dimension. The mask [B, 1, T, end] covers slots 0..end-1."""
        B, T, _ = x.shape
        q = self._heads(x, self.wq, self.n_heads, "q_norm", cos, sin)
        k, v = self.project_kv(x, cos, sin)
        gqa = self.n_kv != self.n_heads
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k_cache, v_cache, start = kv
            cache_write(k_cache, start, k)
            cache_write(v_cache, start, v)
            end = mask.shape[-1]
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (normed, RoPE applied) and values [B, n_kv, T, hd] of the normed input x [B, T, D]."""
        B, T, _ = x.shape
        k = self._heads(x, self.wk, self.n_kv, "k_norm", cos, sin)
        return k, self.wv(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

        self.checkpointing = False  # set through Transformer.activation_checkpointing

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, kv=None) -> Tensor:
        # Checkpoint INSIDE forward (not around the module call): FSDP2's hooks sit on the call, so the recompute
        # sees the same (already cast, already unsharded) inputs and parameters as the first forward did.
        if self.checkpointing and kv is None and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask, kv)

    def _forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, kv=None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv)
        return h + self.feed_forward(self.ffn_norm(h))


class KVCache:
    """Preallocated per-layer keys/values [B, n_kv, max_len, hd] for left-padded batched decoding.

    `pad[b]` = number of left-pad slots of row b: they are never attended to, and row b's RoPE positions start
    at 0 after its padding, so a padded row computes exactly what it would compute alone.
    """

    def __init__(self, args: ModelArgs, n_layers: int, pad: Tensor, max_len: int, dtype: torch.dtype):
        B, dev = pad.shape[0], pad.device
        shape = (B, args.kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(n_layers)]
        self.pad, self.pos, self.max_len = pad, 0, max_len


def cache_write(cache: Tensor, start: int | Tensor, x: Tensor) -> None:
    """Write x [B, n_kv, T, hd] into cache slots start.. (int), or scatter it at a per-row slot index [B, n_kv,
    T, hd] (speculative decoding)."""
    if isinstance(start, int):
        cache[:, :, start : start + x.shape[2]] = x
    else:
        cache.scatter_(2, start, x)


# ----------------------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H = args.n_future_tokens
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers - H + 1))
        self.extra_heads = nn.ModuleList(TransformerBlock(args) for _ in range(H - 1))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """With tie_embeddings, make output.weight the embedding's parameter itself (again, after a load with
        assign=True has put two tensors in their places): one parameter, one gradient, sharded once by FSDP2."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, keeping the tie: a tied model's state dict may omit output.weight (safetensors files hold
        a shared tensor once; HF's tied checkpoints have no lm_head.weight)."""
        if (
            self.args.tie_embeddings
            and "output.weight" not in state_dict
            and "tok_embeddings.weight" in state_dict
        ):
            state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.tie_weights()
        return out

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) matrices; residual output projections (wo, w2) scaled by 1/sqrt(2 * n_layers); biases
        0, norm scales 1. A tied output is the embedding (named_parameters yields it once)."""
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.args.n_layers))
            else:
                p.normal_(0.0, std)

    @property
    def n_future_tokens(self) -> int:
        return self.args.n_future_tokens

    def head_block(self, k: int) -> TransformerBlock:
        """Block of head k (0-based): layers[-1] for k=0, extra_heads[k-1] otherwise."""
        if not 0 <= k < self.args.n_future_tokens:
            raise IndexError(f"head index {k} out of range for n_future_tokens={self.args.n_future_tokens}")
        return self.layers[-1] if k == 0 else self.extra_heads[k - 1]

    @property
    def activation_checkpointing(self) -> bool:
        return all(b.checkpointing for b in (*self.layers, *self.extra_heads))

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        """Checkpoint every block (trunk and heads) while training: recompute in backward instead of storing."""
        for b in (*self.layers, *self.extra_heads):
            b.checkpointing = on

    def _block(self, block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return block(x, cos, sin)

    def _rope(self, S: int, ref: Tensor) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(torch.arange(S, device=ref.device)[None], self.args, ref.dtype)

    def forward(
        self,
        x: Tensor,
        stage: str | int = "full",
        select: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """See the module docstring. `select` (bool [B, S], head stages only) returns logits [n_selected, V]."""
        if stage == "decode":
            if cache is None:
                raise ValueError('stage="decode" needs cache=KVCache(...)')
            return self._decode(x, cache)
        if isinstance(stage, int) and not isinstance(stage, bool):
            cos, sin = self._rope(x.shape[1], x)
            h = self._block(self.head_block(stage), x, cos, sin)
            if select is not None:
                h = h[select]
            return self.output(self.norm(h))
        if stage not in ("full", "trunk"):
            raise ValueError(f"stage must be 'full', 'trunk', 'decode' or an int head index, got {stage!r}")
        h = self.tok_embeddings(x)
        cos, sin = self._rope(x.shape[1], h)
        for layer in self.layers[:-1]:
            h = self._block(layer, h, cos, sin)
        if stage == "trunk":
            return h
        heads = [self._block(self.head_block(k), h, cos, sin) for k in range(self.args.n_future_tokens)]
        return self.output(self.norm(torch.stack(heads, dim=-2)))

    def _decode(self, ids: Tensor, cache: KVCache) -> Tensor:
        """Append `ids` [B, T] to the cache through trunk + head 1; fp32 logits of the last position [B, V]."""
        B, T = ids.shape
        start, end = cache.pos, cache.pos + T
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {cache.max_len}")
        positions, mask = _decode_mask(torch.arange(start, end, device=ids.device)[None], cache.pad, end)
        h = self.tok_embeddings(ids)
        cos, sin = rope_cos_sin(positions, self.args, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, (cache.k[i], cache.v[i], start))
        cache.pos = end
        return self.output(self.norm(h[:, -1])).float()

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.2,
        top_p: float = 0.95,
        eos_id: int | None = None,
        stop: Callable[[list[int]], bool] | None = None,
        seed: int | None = None,
        pad_id: int = 0,
        speculative: bool = False,
    ) -> list[list[int]]:
        """Sample continuations with head 1 (batched, left-padded, KV-cached). Returns new tokens per prompt.

        temperature 0 is greedy; otherwise nucleus (top_p) sampling from softmax(logits / temperature), with a
        torch.Generator seeded by `seed` when given. A row stops at `eos_id` (not included in its output) or once
        `stop(row_new_tokens)` returns True (the token that triggered it is kept; the caller trims stop strings).

        `speculative=True`: self-speculative decoding with the extra heads (see `_generate_speculative`). Greedy
        output is the plain greedy output token for token; sampled output has exactly the plain distribution (not
        the same draws for a seed: the generator is consumed differently). Each such call sets
        `self.speculative_stats` (tokens per forward, per-head acceptance: see `_generate_speculative`).
        """
        if speculative:
            return self._generate_speculative(
                prompts, max_new_tokens, temperature, top_p, eos_id, stop, seed, pad_id
            )[0]
        return self._generate(prompts, max_new_tokens, temperature, top_p, eos_id, stop, seed, pad_id)[0]

    def _left_pad(self, prompts, max_new_tokens, temperature, top_p, pad_id) -> tuple[Tensor, Tensor] | None:
        """Check generate's arguments; None when there is nothing to generate, else (ids [B, P], pad [B])."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if max_new_tokens < 0 or not 0.0 < top_p <= 1.0 or temperature < 0:
            raise ValueError(f"generate: bad max_new_tokens={max_new_tokens}, top_p={top_p}, T={temperature}")
        if max_new_tokens == 0:
            return None
        P = max(len(p) for p in prompts)
        if P + max_new_tokens > self.args.max_seq_len:
            raise ValueError(
                f"generate: longest prompt {P} + max_new_tokens {max_new_tokens} > max_seq_len {self.args.max_seq_len}"
            )
        dev = self.output.weight.device
        pad = torch.tensor([P - len(p) for p in prompts], device=dev)
        ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=dev)
        return ids, pad

    def _generate(
        self, prompts, max_new_tokens, temperature, top_p, eos_id, stop, seed, pad_id, keep_logits=False
    ) -> tuple[list[list[int]], list[Tensor]]:
        out: list[list[int]] = [[] for _ in prompts]
        batch = self._left_pad(prompts, max_new_tokens, temperature, top_p, pad_id)
        if batch is None:
            return out, []
        ids, pad = batch
        dev, dtype = self.output.weight.device, self.output.weight.dtype
        cache = KVCache(self.args, len(self.layers), pad, ids.shape[1] + max_new_tokens, dtype)
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        was_training = self.training
        self.eval()
        try:
            logits, kept, done = self(ids, stage="decode", cache=cache), [], [False] * len(prompts)
            for step in range(max_new_tokens):
                if keep_logits:
                    kept.append(logits)
                nxt = sample(logits, temperature, top_p, gen)
                for b, tok in enumerate(nxt.tolist()):
                    if done[b]:
                        continue
                    if eos_id is not None and tok == eos_id:
                        done[b] = True
                        continue
                    out[b].append(tok)
                    done[b] = stop is not None and stop(out[b])
                if all(done) or step == max_new_tokens - 1:
                    break
                logits = self(nxt[:, None], stage="decode", cache=cache)
        finally:
            self.train(was_training)
        return out, kept

    # Self-speculative decoding (Stern et al. 2018's blockwise parallel decoding with the speculative-sampling
    # rule of Leviathan et al. / Chen et al. 2023; Gloeckle et al. 2024 §3.2 for MTP heads).

    def _spec_step(
        self, ids: Tensor, cache: KVCache, hbuf: Tensor, start: list[int], last: bool = False
    ) -> Tensor:
        """Run `ids` [B, T] through trunk + head 1 into cache slots start[b].. of each row, keeping the trunk
        output in `hbuf` for the extra heads; head 1's fp32 logits [B, T, V] (only the last position with `last`)."""
        slots, q, end = _slots(start, ids.shape[1], ids.device)
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {cache.max_len}")
        positions, mask = _decode_mask(q, cache.pad, end)
        h = self.tok_embeddings(ids)
        cos, sin = rope_cos_sin(positions, self.args, h.dtype)
        n, at = len(self.layers) - 1, self._kv_slots(slots)
        for i in range(n):  # (not self.layers[:-1]: slicing builds a new ModuleList per call)
            h = self.layers[i](h, cos, sin, mask, (cache.k[i], cache.v[i], at))
        _slot_io(hbuf, slots, h.shape[1], h)
        x = self.layers[-1](h, cos, sin, mask, (cache.k[n], cache.v[n], at))
        return self.output(self.norm(x[:, -1:] if last else x)).float()

    def _kv_slots(self, slots: int | Tensor) -> int | Tensor:
        """What Attention's kv takes for these slots: the int, or per-row slots [B, T] as a scatter index."""
        if isinstance(slots, int):
            return slots
        return slots[:, None, :, None].expand(-1, self.args.kv_heads, -1, self.args.head_dim)

    def _spec_heads(self, cache: KVCache, hbuf: Tensor, filled: list[list[int]], length: list[int], n: int):
        """Logits [B, n, V] of heads 2..n+1 at each row's last accepted slot length[b] - 1.

        The extra heads' caches are filled lazily from the trunk outputs kept in `hbuf`: head k+2 runs over the
        last (at most SPEC_HEAD_WINDOW) slots it has not seen since filled[k][b]; older unseen slots only get
        their keys and values (`_fill_kv`: a block's keys/values at a slot depend only on the trunk output
        there). Every row gets a window of the longest gap: a row with a shorter gap recomputes earlier slots
        from the same inputs, and writes slots past its length that stay masked until overwritten.
        """
        rows, outs, prev = torch.arange(len(length), device=hbuf.device), [], None
        for k in range(n):
            if filled[k] != prev:  # heads that drafted together share the window
                prev = filled[k]
                W = min(max(1, *(ln - f for ln, f in zip(length, prev, strict=True))), SPEC_HEAD_WINDOW)
                start = [max(ln - W, 0) for ln in length]
                slots, q, end = _slots(start, W, hbuf.device)
                positions, mask = _decode_mask(q, cache.pad, end)
                x, at = _slot_io(hbuf, slots, W), self._kv_slots(slots)
                cos, sin = rope_cos_sin(positions, self.args, x.dtype)
                last = [ln - 1 - s for ln, s in zip(length, start, strict=True)]
                last = torch.tensor(last, device=hbuf.device)
            i, block = len(self.layers) + k, self.extra_heads[k]
            self._fill_kv(block, cache.k[i], cache.v[i], cache.pad, hbuf, filled[k], start)
            outs.append(block(x, cos, sin, mask, (cache.k[i], cache.v[i], at))[rows, last])
            filled[k] = list(length)
        return self.output(self.norm(torch.stack(outs, dim=1))).float()

    def _fill_kv(
        self, block, k_cache: Tensor, v_cache: Tensor, pad: Tensor, hbuf: Tensor, filled, upto
    ) -> None:
        """Write `block`'s keys/values at slots filled[b]..upto[b]-1 of each row, from the trunk outputs in hbuf
        (one span of the longest gap for every row: a row with a shorter gap rewrites earlier slots from the same
        inputs, and slots from upto[b] on, which stay masked until overwritten)."""
        T = max(u - f for u, f in zip(upto, filled, strict=True))
        if T <= 0:
            return
        slots, q, _ = _slots([max(u - T, 0) for u in upto], T, hbuf.device)
        cos, sin = rope_cos_sin((q - pad[:, None]).clamp(min=0), self.args, hbuf.dtype)
        k, v = block.attention.project_kv(block.attention_norm(_slot_io(hbuf, slots, T)), cos, sin)
        at = self._kv_slots(slots)
        cache_write(k_cache, at, k)
        cache_write(v_cache, at, v)

    def _generate_speculative(
        self, prompts, max_new_tokens, temperature, top_p, eos_id, stop, seed, pad_id, keep_logits=False
    ) -> tuple[list[list[int]], dict]:
        """Self-speculative decoding: head 1 decides every token; heads 2..H only propose (draft) them.

        A forward at the accepted prefix gives head 1's distribution for the next token, which is sampled (the
        "exact" token), and heads 2..H's distributions for the H-1 tokens after it, from which drafts are drawn.
        The next forward runs [exact token, drafts] through trunk + head 1: draft i is accepted with probability
        min(1, p/q) (p: head 1 at the preceding position, q: the drafting head; both after temperature and
        top-p), the first rejected one is replaced by a sample of normalise(max(0, p - q)), and when all are
        accepted head 1's last position gives the next exact token; so every returned token is distributed as
        plain sampling with head 1 would draw it (Leviathan et al. 2023, thm 1). At temperature 0 a draft is
        accepted when it equals head 1's argmax: the output is plain greedy's (up to floating-point near-ties:
        a block forward rounds differently from a one-token forward). The next drafts come from heads 2..H at the
        last accepted position, so each forward yields 1..H tokens per row (plain: 1).

        Rows keep their own lengths: each row accepts its own number of drafts and writes its next block at its
        own cache slots (per-row RoPE positions and masks). Accepting the batch minimum would also be exact but
        throws away accepted drafts of every other row, so its gain shrinks as the batch grows. A rejection
        rolls a row back by just not advancing its length: the slots past it are masked and overwritten.

        The extra heads (transformer blocks with their own KV caches) run lazily, when their drafts are needed,
        over the accepted positions only (`_spec_heads`). When the drafts are expected to gain less than
        SPEC_MIN_GAIN tokens per extra head and step, decoding goes plain for a while, with cheap one-draft
        probes (`_DraftThrottle`): a model whose heads guess badly costs little more than plain decoding. Stop callbacks, EOS and max_new_tokens apply token by token as in
        `_generate`: tokens a draft ran ahead with past a stop are dropped.

        Sets `self.speculative_stats`: {"tokens": generated tokens (EOS included), "forwards": trunk + head 1
        passes, "row_forwards": (row, pass) pairs with the row still generating, "tokens_per_forward": tokens /
        row_forwards (plain decoding: 1.0), "drafted" / "accepted": per extra head (head 2..H), drafts verified
        (every earlier draft of the block accepted) and accepted, "acceptance": accepted / drafted per head
        (None when none was verified), "draft_steps": passes that verified drafts}. With `keep_logits` (tests)
        also returns {"p": per row, head 1's logits [V] behind each generated token, "q": (row, number of
        generated tokens before the drafting position, heads 2..H logits [n_drafts, V]) per drafting step}.
        """
        H = self.args.n_future_tokens
        out: list[list[int]] = [[] for _ in prompts]
        stats: dict[str, Any] = {"tokens": 0, "forwards": 0, "row_forwards": 0, "draft_steps": 0}
        stats.update(drafted=[0] * (H - 1), accepted=[0] * (H - 1))
        kept: dict[str, list] = {"p": [[] for _ in prompts], "q": []}
        batch = self._left_pad(prompts, max_new_tokens, temperature, top_p, pad_id)
        if batch is not None:
            was_training = self.training
            self.eval()
            try:
                self._speculate(batch, out, stats, kept if keep_logits else None, max_new_tokens, temperature,
                                top_p, eos_id, stop, seed)  # fmt: skip
            finally:
                self.train(was_training)
        self.speculative_stats = speculative_summary(stats)
        return out, kept

    def _speculate(
        self, batch, out, stats, kept, max_new_tokens, temperature, top_p, eos_id, stop, seed
    ) -> None:
        """The decoding loop of `_generate_speculative` (fills `out`, `stats` and `kept` in place)."""
        ids, pad = batch
        H, B, P = self.args.n_future_tokens, ids.shape[0], ids.shape[1]
        dev, dtype = self.output.weight.device, self.output.weight.dtype
        # a row that finished inside a block has advanced up to H - 1 slots past its budget, and its (unused)
        # blocks keep running from there
        max_len = P + max_new_tokens + 2 * H
        cache = KVCache(self.args, len(self.layers) + H - 1, pad, max_len, dtype)
        hbuf = torch.zeros(B, max_len, self.args.dim, dtype=dtype, device=dev)  # trunk outputs, per slot
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        length = [P] * B  # accepted slots of trunk + head 1, per row
        filled = [[0] * B for _ in range(H - 1)]  # slots each extra head has filled, per row
        done, throttle = [False] * B, _DraftThrottle(H - 1)

        def hand_out(emit: list[list[int]], p_rows: Tensor) -> None:
            """Give each row its step's tokens one at a time, exactly as plain generation would."""
            stats["forwards"] += 1
            for b in range(B):
                if done[b]:
                    continue
                done[b], n = _append(out[b], emit[b], eos_id, stop, max_new_tokens)
                stats["row_forwards"] += 1
                stats["tokens"] += n
                if kept is not None:
                    kept["p"][b].extend(p_rows[b, :n])

        logits = self._spec_step(ids, cache, hbuf, [0] * B, last=True)
        nxt = sample(logits[:, 0], temperature, top_p, gen)  # the exact token: not in the cache yet
        hand_out([[t] for t in nxt.tolist()], logits)
        while not all(done):
            room = max(max_new_tokens - len(out[b]) for b in range(B) if not done[b]) - 1
            n_draft = min(throttle.n_drafts(), room) if room > 0 else 0
            block = nxt[:, None]
            if n_draft:
                q_logits = self._spec_heads(cache, hbuf, filled, length, n_draft)
                q, drafts = _draft(q_logits, temperature, top_p, gen)
                block = torch.cat([block, drafts], dim=1)
                if kept is not None:
                    kept["q"] += [(b, len(out[b]) - 1, q_logits[b]) for b in range(B) if not done[b]]
            p_rows = self._spec_step(block, cache, hbuf, length)
            n_acc = [0] * B
            if n_draft:
                acc, nxt = _verify(p_rows, q, block[:, 1:], temperature, top_p, gen)
                n_acc = acc.tolist()
                throttle.update(_count_drafts(stats, n_acc, n_draft, done))
            else:
                nxt = sample(p_rows[:, 0], temperature, top_p, gen)
            rows, last = block.tolist(), nxt.tolist()
            for b in range(B):
                length[b] += 0 if done[b] else 1 + n_acc[b]  # the exact token and the accepted drafts
            hand_out([rows[b][1 : 1 + n_acc[b]] + [last[b]] for b in range(B)], p_rows)


def sample(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator | None = None) -> Tensor:
    """Next token per row of fp32 logits [..., V]: argmax at temperature 0, else a draw from `nucleus_probs`."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw(nucleus_probs(logits, temperature, top_p), gen)


SPEC_MIN_GAIN = 1 / 3  # speculative decoding drafts while it expects this many accepted drafts per head ...
SPEC_MAX_BACKOFF = 64  # ... and otherwise decodes up to this many steps plainly between one-draft probes
SPEC_RATE_WEIGHT = 0.25  # weight of the last drafting step in the running acceptance of each head
SPEC_HEAD_WINDOW = 8  # the extra heads run whole over at most this many new slots, keys/values only before
NUCLEUS_TOPK = 64  # top-p looks for its nucleus among the top 64 tokens first (sorting all V is slow on CPU)


def _decode_mask(slots: Tensor, pad: Tensor, end: int) -> tuple[Tensor, Tensor]:
    """RoPE positions [B, T] and attention mask [B, 1, T, end] of queries at cache slots `slots` [B|1, T].

    A query sees its row's slots from the first non-pad one up to its own; a pad query sees itself only (no
    all-masked row, no NaN).
    """
    positions = (slots - pad[:, None]).clamp(min=0)
    k_idx, q_col = torch.arange(end, device=slots.device)[None, None], slots[:, :, None]
    visible = (k_idx >= pad[:, None, None]) & (k_idx <= q_col)
    return positions, (visible | (k_idx == q_col))[:, None]


def _slots(start: list[int], T: int, device: torch.device) -> tuple[int | Tensor, Tensor, int]:
    """Cache slots of a T-token block starting at start[b] in row b: (an int when every row starts at the same
    slot, else the slots [B, T]; the query slots [B|1, T]; end = 1 + the last slot)."""
    end = max(start) + T
    if min(start) == end - T:
        return end - T, torch.arange(end - T, end, device=device)[None], end
    q = torch.tensor(start, device=device)[:, None] + torch.arange(T, device=device)
    return q, q, end


def _slot_io(buf: Tensor, slots: int | Tensor, T: int, x: Tensor | None = None) -> Tensor | None:
    """Read buf [B, L, D] at T slots from `slots` (an int) or at per-row slots [B, T]; or write x there."""
    if isinstance(slots, int):
        if x is None:
            return buf[:, slots : slots + T]
        buf[:, slots : slots + T] = x
        return None
    index = slots[:, :, None].expand(-1, -1, buf.shape[-1])
    if x is None:
        return buf.gather(1, index)
    buf.scatter_(1, index, x)
    return None


def nucleus_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """softmax(logits / temperature) on the smallest set of most likely tokens whose mass reaches top_p,
    renormalised; in vocabulary order, the shape of logits. The distribution that `sample` draws from."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    top, order = probs.topk(min(NUCLEUS_TOPK, probs.shape[-1]), dim=-1)
    if not bool((top.sum(-1) > top_p).all()):  # the nucleus may reach past the top k: sort everything
        top, order = probs.sort(dim=-1, descending=True)
    top = top.masked_fill(top.cumsum(-1) - top > top_p, 0.0)  # keep the smallest prefix with mass >= top_p
    kept = torch.zeros_like(probs).scatter_(-1, order, top)
    return kept / kept.sum(-1, keepdim=True)


def draw(probs: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """One token per row of probabilities [..., V], by inverse CDF: one uniform per row (torch.multinomial is
    several times slower on CPU)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=gen, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)[..., 0]


def speculative_accept(
    p: Tensor, q: Tensor, draft: Tensor, gen: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The speculative-sampling step: is each draft accepted, and the token that stands at its place.

    p, q: target and draft distributions [..., V]; draft [...]: tokens drawn from q. A draft d is accepted with
    probability min(1, p(d) / q(d)); a rejected one is replaced by a sample of normalise(max(0, p - q)). Then the
    token is distributed exactly as p: P(v) = q(v) min(1, p(v)/q(v)) + (1 - sum_w min(p(w), q(w))) r(v)
    = min(p(v), q(v)) + max(0, p(v) - q(v)) = p(v). Returns (accepted bool [...], token [...]).
    """
    pd, qd = p.gather(-1, draft[..., None])[..., 0], q.gather(-1, draft[..., None])[..., 0]
    u = torch.rand(pd.shape, generator=gen, device=p.device, dtype=pd.dtype)
    accepted = u * qd < pd  # u < p/q without dividing; u in [0, 1): always accepted when p >= q
    residual = (p - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected
    return accepted, torch.where(accepted, draft, draw(residual, gen))


def _draft(q_logits: Tensor, temperature: float, top_p: float, gen) -> tuple[Tensor | None, Tensor]:
    """Drafts [B, n] from heads 2..n+1's logits [B, n, V]: (their distributions, None when greedy; drafts)."""
    if temperature == 0:
        return None, q_logits.argmax(-1)
    q = nucleus_probs(q_logits, temperature, top_p)
    return q, draw(q, gen)


def _verify(p_logits: Tensor, q: Tensor | None, drafts: Tensor, temperature: float, top_p: float, gen):
    """Check drafts [B, n] against head 1's logits [B, n+1, V] at [exact token, drafts]: (number of leading
    accepted drafts [B], the exact token after them [B]: the fix of the first rejected draft, else a sample of
    head 1 at the last position)."""
    n = drafts.shape[1]
    if temperature == 0:
        target = p_logits.argmax(-1)
        n_acc = (drafts == target[:, :n]).long().cumprod(1).sum(1)
        return n_acc, target.gather(1, n_acc[:, None])[:, 0]
    p = nucleus_probs(p_logits, temperature, top_p)
    accepted, token = speculative_accept(p[:, :n], q, drafts, gen)
    n_acc = accepted.long().cumprod(1).sum(1)
    token = torch.cat([token, draw(p[:, n:], gen)], dim=1)  # position n: every draft accepted
    return n_acc, token.gather(1, n_acc[:, None])[:, 0]


def _count_drafts(stats: dict, n_acc: list[int], n_draft: int, done: list[bool]) -> list[float | None]:
    """Count per head the drafts verified (every earlier draft accepted) and accepted, over the rows still
    generating; returns this step's acceptance per drafting head (None where none was verified)."""
    stats["draft_steps"] += 1
    verified, accepted = [0] * n_draft, [0] * n_draft
    for a in (a for a, d in zip(n_acc, done, strict=True) if not d):
        for i in range(min(a + 1, n_draft)):
            verified[i] += 1
            accepted[i] += int(i < a)
    for i in range(n_draft):
        stats["drafted"][i] += verified[i]
        stats["accepted"][i] += accepted[i]
    return [a / v if v else None for a, v in zip(accepted, verified, strict=True)]


class _DraftThrottle:
    """How many tokens to draft. Each head keeps a running mean of its acceptance (the last drafting step
    weighted SPEC_RATE_WEIGHT); they give the expected number of accepted drafts per step, r2 + r2 r3 + ...
    While that is >= SPEC_MIN_GAIN per extra head (each costs about a block) every head drafts; otherwise none
    for 1, 2, 4, ... (at most SPEC_MAX_BACKOFF) steps between one-draft probes (only head 2 runs) until it is
    again. It decides from past acceptance only, so it cannot change the output distribution."""

    def __init__(self, n_heads: int):
        self.rate, self.backoff, self.skip = [1.0] * n_heads, 0, 0

    def n_drafts(self) -> int:
        if self.skip:
            self.skip -= 1
            return 0
        return len(self.rate) if self.backoff == 0 else min(1, len(self.rate))

    def update(self, step_rates: list[float | None]) -> None:
        for i, r in enumerate(step_rates):
            if r is not None:
                self.rate[i] += SPEC_RATE_WEIGHT * (r - self.rate[i])
        gain = sum(math.prod(self.rate[: i + 1]) for i in range(len(self.rate)))
        ok = gain >= SPEC_MIN_GAIN * len(self.rate)
        self.backoff = 0 if ok else min(max(2 * self.backoff, 1), SPEC_MAX_BACKOFF)
        self.skip = self.backoff


def speculative_summary(*stats: dict) -> dict:
    """Sum the counts of `speculative_stats` dicts (of one or several generate calls) and add their ratios:
    tokens_per_forward, and acceptance per extra head (None where no draft was verified)."""
    out = {k: sum(s[k] for s in stats) for k in ("tokens", "forwards", "row_forwards", "draft_steps")}
    for k in ("drafted", "accepted"):  # one count per extra head
        out[k] = [sum(c) for c in zip(*(s[k] for s in stats), strict=True)]
    out["tokens_per_forward"] = out["tokens"] / max(out["row_forwards"], 1)
    out["acceptance"] = [a / d if d else None for a, d in zip(out["accepted"], out["drafted"], strict=True)]
    return out


def _append(row: list[int], toks: list[int], eos_id: int | None, stop, budget: int) -> tuple[bool, int]:
    """Append toks to a row as plain generation does, token by token: EOS ends the row (not appended), so do
    `stop(row)` and the budget. Returns (row done, tokens used, EOS included)."""
    for i, tok in enumerate(toks):
        if eos_id is not None and tok == eos_id:
            return True, i + 1
        row.append(tok)
        if (stop is not None and stop(row)) or len(row) >= budget:
            return True, i + 1
    return False, len(toks)


# ----------------------------------------------------------------------------------------------------------------
# MTP targets and loss


def mtp_targets(input_ids: Tensor, loss_mask: Tensor, H: int) -> tuple[Tensor, Tensor]:
    """targets[b,t,k] = input_ids[b,t+k+1]; valid = (t+k+1 < S) & loss_mask[b,t+k+1]; targets 0 where invalid."""
    B, S = input_ids.shape
    targets = input_ids.new_zeros(B, S, H)
    valid = torch.zeros(B, S, H, dtype=torch.bool, device=input_ids.device)
    for k in range(H):
        n = S - k - 1
        if n <= 0:
            continue
        valid[:, :n, k] = loss_mask[:, k + 1 :].bool()
        targets[:, :n, k] = torch.where(valid[:, :n, k], input_ids[:, k + 1 :], 0)
    return targets, valid


def _f32(x: Tensor) -> Tensor:
    """Upcast half-precision logits to fp32 for the CE (fp64 stays fp64: exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _alpha(alpha: Iterable[float] | Tensor | None, H: int) -> list[float]:
    a = [1.0] * H if alpha is None else [float(x) for x in alpha]
    if len(a) != H:
        raise ValueError(f"alpha has {len(a)} entries, expected one per head (H={H})")
    return a


def mtp_loss_backward(
    model: nn.Module,
    h: Tensor,
    targets: Tensor,
    valid: Tensor,
    weights: Tensor | Callable[[int, Tensor], Tensor],
    alpha: Iterable[float] | Tensor | None = None,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """Memory-efficient MTP loss + backward (paper §2): one head's logits alive at a time.

    L = sum_valid alpha_k * w * CE / count_valid (count over all heads). For each head: logits of the valid
    positions only (fp32 CE), backward of scale * L_k into a detached leaf of h; then ONE h.backward. Every head
    runs forward and backward even when it has no valid pair, so all ranks run the same collectives.
    `weights` is [B, S, H], or a function (k, ce_k [B, S] detached, 0 where invalid) -> head k's weights [B, S]
    for weights that depend on the head's own CE (rho1 per head, spec §3.3): no extra pass over the heads.
    Returns detached {"loss", "head_loss" [H], "head_ce" [H]} (unscaled).
    """
    H = targets.shape[-1]
    a = _alpha(alpha, H)
    count = int(valid.sum())
    denom = max(count, 1)
    leaf = h.detach().requires_grad_()
    head_loss, head_ce = [], []
    for k in range(H):
        v = valid[..., k]
        logits = model(leaf, stage=k, select=v)
        ce = F.cross_entropy(_f32(logits), targets[..., k][v], reduction="none")
        if callable(weights):
            w_k = weights(
                k, torch.zeros(v.shape, dtype=ce.dtype, device=ce.device).index_put((v,), ce.detach())
            )
        else:
            w_k = weights[..., k]
        loss_k = (w_k[v].to(ce.dtype) * ce).sum() * (a[k] / denom)
        if loss_k.requires_grad:  # False under torch.no_grad(): then this is an evaluation loss
            (loss_k * scale).backward()
        head_loss.append(loss_k.detach())
        head_ce.append(ce.detach().sum() / max(int(v.sum()), 1))
        del logits, ce, loss_k
    if h.requires_grad and leaf.grad is not None:
        h.backward(leaf.grad)
    head_loss_t = torch.stack(head_loss)
    return {"loss": head_loss_t.sum(), "head_loss": head_loss_t, "head_ce": torch.stack(head_ce)}


def naive_mtp_loss(
    model: nn.Module,
    idx: Tensor,
    targets: Tensor,
    valid: Tensor,
    weights: Tensor,
    alpha: Iterable[float] | Tensor | None = None,
) -> Tensor:
    """Same loss with all heads' logits [B, S, H, V] at once (reference for tests and the benchmark)."""
    H = targets.shape[-1]
    logits = model(idx)
    ce = F.cross_entropy(_f32(logits).flatten(0, 2), targets.flatten(), reduction="none").view_as(weights)
    a = torch.tensor(_alpha(alpha, H), dtype=ce.dtype, device=ce.device)
    w = torch.where(valid, weights.to(ce.dtype), 0.0) * a
    return (w * torch.where(valid, ce, 0.0)).sum() / max(int(valid.sum()), 1)


@torch.no_grad()
def mtp_head_ce(model: nn.Module, h: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Per-pair CE [B, S, H] (fp32, 0 where invalid) without gradient, one head at a time (rho1's extra pass)."""
    ce = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    for k in range(targets.shape[-1]):
        v = valid[..., k]
        logits = model(h.detach(), stage=k, select=v)
        ce[..., k][v] = F.cross_entropy(logits.float(), targets[..., k][v], reduction="none")
    return ce


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: Meta (params.json + consolidated.pth), HF Llama (safetensors), ours (safetensors + config.json)


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, corrupt or does not match the model it should build: the message names the file
    (and the tensor or keys)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


# ---- integrity: every file is what was written, every tensor finite (errors name the file and the tensor)

CHECKLIST = "checklist.chk"  # Meta ships one beside its weights: `<md5>  <file name>` per line


def write_checklist(path: str | os.PathLike) -> Path:
    """Write Meta's checklist.chk (MD5 of every other file in the directory)."""
    path = Path(path)
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != CHECKLIST)
    return files.atomic_write_text(path / CHECKLIST, "".join(f"{files.md5(path / n)}  {n}\n" for n in names))


def verify_checklist(path: str | os.PathLike) -> bool:
    """Check every file listed in `path/checklist.chk` against its MD5; False when there is no checklist."""
    path = Path(path)
    chk = path / CHECKLIST
    if not chk.is_file():
        return False
    for lineno, line in enumerate(chk.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{32})\s+\*?(.+?)\s*", line)
        if m is None:
            raise CheckpointError(f"{chk}:{lineno}: expected '<md5>  <file name>', got {line!r}")
        want, f = m.group(1).lower(), path / m.group(2)
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {chk} but missing: copy or download it again")
        if files.md5(f) != want:
            if zipfile.is_zipfile(f):
                _check_torch_zip(f)  # names the damaged tensor when it can
            raise CheckpointError(
                f"{f}: MD5 {files.md5(f)} does not match {want} in {chk}: the file is corrupted or incomplete; "
                "copy or download it again (if you changed it on purpose, update or delete the checklist)"
            )
    return True


def _storage_owners(zf: zipfile.ZipFile, pkl: str) -> dict[str, list[str]]:
    """Storage record key -> names of the tensors stored in it, read from data.pkl without loading any tensor."""

    class Names(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            return lambda storage=None, *a, **k: storage  # _rebuild_tensor_v2(storage, ...) -> its record key

        def persistent_load(self, pid: Any) -> Any:
            return str(pid[2])  # ('storage', storage type, key, location, numel)

    try:
        sd = Names(io.BytesIO(zf.read(pkl))).load()
    except Exception:  # an unusual pickle: the error then names the record only
        return {}
    owners: dict[str, list[str]] = {}
    for name, key in sd.items() if isinstance(sd, dict) else ():
        owners.setdefault(str(key), []).append(str(name))
    return owners


def _check_torch_zip(wfile: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per record: check the archive and every record's CRC (torch
    itself checks neither, so a damaged file would otherwise load garbage)."""
    try:
        zf = zipfile.ZipFile(wfile)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{wfile}: not a readable torch checkpoint ({e}): the file is truncated or corrupted (torch.save's zip "
            "format was expected); copy or download it again"
        ) from None
    with zf:
        for info in zf.infolist():
            try:
                with zf.open(info) as f:
                    while f.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                prefix, _, rel = info.filename.partition("/data/")
                names = _storage_owners(zf, f"{prefix}/data.pkl").get(rel, []) if rel else []
                what = f" (tensor {', '.join(names)})" if names else ""
                raise CheckpointError(
                    f"{wfile}: record {info.filename}{what} is corrupted ({e}); copy or download the file again"
                ) from None


def _torch_load(wfile: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(wfile, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's zip/mmap/unpickling errors: name the file
        raise CheckpointError(f"{wfile}: cannot be read by torch.load ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{wfile}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def _check_safetensors(f: Path) -> None:
    """The safetensors header is sane and describes exactly the bytes in the file (truncation, garbage)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise CheckpointError(f"{f}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise CheckpointError(f"{f}: corrupted safetensors header ({e})") from None
    end = 0
    for name, t in header.items() if isinstance(header, dict) else [("?", None)]:
        if name == "__metadata__":
            continue
        try:
            begin, stop = t["data_offsets"]
            numel = math.prod(t["shape"])
            item = _ST_BYTES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{f}: corrupted safetensors header entry for tensor {name!r}: {t!r}"
            ) from None
        if not 0 <= begin <= stop or stop - begin != numel * item:
            raise CheckpointError(
                f"{f}: tensor {name!r}: offsets {begin}..{stop} do not fit shape {t['shape']}"
            )
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{f}: the header describes {8 + n + end} bytes but the file has {size}: truncated or corrupted; "
            "copy or download it again"
        )


_ST_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ST_BYTES |= {"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _load_safetensors(f: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not f.is_file():
        raise CheckpointError(f"missing {f}")
    _check_safetensors(f)
    try:
        sd = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f}: cannot be read by safetensors ({e})") from None
    _check_finite(sd, str(f))
    return sd


def _check_finite(sd: dict[str, Tensor], source: str) -> None:
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{source}: tensor {name!r} has {bad} non-finite value(s) (NaN/Inf) of {t.numel()}: the checkpoint "
                "is corrupted or was saved from a diverged run"
            )


def _check_keys(expected: dict[str, torch.Size], sd: dict[str, Tensor], source: str) -> None:
    """Every expected key present with its shape, nothing else; else one error listing all problems."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} != model {tuple(s)}"
        for k, s in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(s)
    ]
    if missing or unexpected or shapes:

        def show(xs: list[str]) -> str:
            return ", ".join(xs[:20]) + (f", ... ({len(xs)} in all)" if len(xs) > 20 else "")

        parts = [f"{name} ({len(xs)}): {show(xs)}" for name, xs in [("missing keys", missing),
                 ("unexpected keys", unexpected), ("wrong shapes", shapes)] if xs]  # fmt: skip
        raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(parts))


def _expected_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a checkpoint of `args` holds (a tied output is the embedding: not listed)."""
    shapes = {k: v.shape for k, v in _meta_model(args).state_dict().items()}
    if args.tie_embeddings:
        del shapes["output.weight"]
    return shapes


def _build(args: ModelArgs, sd: dict[str, Tensor], source: str) -> Transformer:
    """Build on the meta device (no double memory), check keys/shapes strictly, then assign the tensors."""
    with torch.device("meta"):
        model = Transformer(args)
    _check_keys(_expected_shapes(args), sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def _resize_heads(args: ModelArgs, sd: dict[str, Tensor], H: int) -> tuple[ModelArgs, dict[str, Tensor]]:
    """Keep the trunk; keep the first min(H, H0) heads; new heads are copies of head 1's block (opt-in)."""
    H0, trunk = args.n_future_tokens, args.n_trunk
    if H == H0:
        return args, sd

    def head_prefix(k: int) -> str:
        return f"layers.{trunk}." if k == 0 else f"extra_heads.{k - 1}."

    out = {k: v for k, v in sd.items() if not k.startswith(("extra_heads.", f"layers.{trunk}."))}
    for k in range(H):
        src = head_prefix(k if k < H0 else 0)
        for name, t in sd.items():
            if name.startswith(src):
                out[head_prefix(k) + name[len(src) :]] = t if k < H0 else t.clone()
    if H > H0:
        log.warning(
            "n_future_tokens %d -> %d: heads %d..%d start as copies of head 1's block", H0, H, H0 + 1, H
        )
    return dataclasses.replace(args, n_layers=trunk + H, n_future_tokens=H), out


def _meta_weights_file(path: Path) -> Path:
    if (path / "consolidated.pth").exists():
        return path / "consolidated.pth"
    shards = sorted(path.glob("consolidated.*.pth"))
    if len(shards) == 1:
        return shards[0]
    if shards:
        raise CheckpointError(
            f"{path}: {len(shards)} model-parallel shards; merge them into consolidated.pth"
        )
    raise CheckpointError(f"{path}: no consolidated.pth (Meta format expects params.json + consolidated.pth)")


def load_meta(path: str | os.PathLike, n_future_tokens: int | None = None) -> Transformer:
    """Load Meta's format strictly. `n_future_tokens` (default: params.json's, else 1) may drop or add heads."""
    path = Path(path)
    params = _read_json(path / "params.json")
    wfile = _meta_weights_file(path)
    if not verify_checklist(path):  # no checklist.chk: torch's own per-record CRCs still catch damage
        _check_torch_zip(wfile)
    sd = _torch_load(wfile)
    _check_finite(sd, str(wfile))
    freqs = sd.pop("rope.freqs", None)  # old Meta checkpoints store RoPE frequencies; ours are computed
    params.pop("max_batch_size", None)  # Meta's inference-time setting, not architecture
    if params.pop("use_scaled_rope", False):
        raise CheckpointError(
            f"{path / 'params.json'}: use_scaled_rope=true (Llama 3.1 RoPE) is not supported"
        )
    if params.get("vocab_size", 0) in (-1, 0) and "tok_embeddings.weight" in sd:
        params["vocab_size"] = sd["tok_embeddings.weight"].shape[0]  # Llama-2 style params.json has -1
    args = ModelArgs.from_dict(params, str(path / "params.json"))
    if freqs is not None:
        want = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
        if freqs.shape != want.shape or not torch.allclose(freqs.float(), want, rtol=1e-3):
            raise CheckpointError(f"{wfile}: rope.freqs does not match rope_theta={args.rope_theta}")
    source = f"{wfile} (params: {path / 'params.json'})"
    _check_keys(_expected_shapes(args), sd, source)
    if n_future_tokens is not None:
        args, sd = _resize_heads(args, sd, n_future_tokens)
    return _build(args, sd, source)


def _meta_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def _full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    sd = model.state_dict()
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
        for k, v in sd.items()
    }


def _params_json(args: ModelArgs) -> dict[str, Any]:
    """params.json: Meta's keys, and the extensions only where they are used (so Meta's code reads it then). A tied
    output is written as a copy (Meta's layout has its own output.weight): the key goes."""
    ext = {k: v for k, v in args.extensions().items() if k != "tie_embeddings"}
    return {k: getattr(args, k) for k in (*META_KEYS, "max_seq_len")} | ext


# what Meta's reference code cannot run, by the params.json key that would carry it (its description)
META_REFUSED = {
    "qkv_bias": "q/k/v biases (Qwen2)",
    "qk_norm": "q/k RMSNorm (Qwen3)",
    "attn_head_dim": "a head_dim other than dim / n_heads",
    "rope_scaling_type": "llama3 RoPE scaling (Llama 3.1)",
    "sliding_window": "a sliding attention window (Mistral)",
}


def save_meta(
    model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None, reference: bool = False
) -> None:
    """Write params.json + consolidated.pth (each atomically; weights first, so params.json marks completion).

    `dtype` casts the weights (None: as they are). `reference=True` writes params.json as Meta's reference code
    reads it (`ModelArgs(max_seq_len=..., max_batch_size=..., **params)`): without max_seq_len, its build
    argument; load_meta then uses the ModelArgs default. ffn_hidden_dim / rope_scaling_factor (models from HF
    checkpoints) have no Meta key: they are kept when used, so load_meta still builds the same model. What Meta's
    code cannot compute at all (META_REFUSED: biases, q/k norm, llama3 RoPE, ...) is refused with reference=True,
    naming the feature; a tied output is written as its own tensor.
    """
    path = Path(path)
    params = _params_json(model.args)
    if reference:
        del params["max_seq_len"]
        refused = [META_REFUSED[k] for k in params if k in META_REFUSED]
        if refused:
            raise CheckpointError(
                f"Meta's layout cannot hold this model ({model.args.family}): {', '.join(refused)}; "
                "export it in the HF format instead"
            )
        params.pop("family", None)  # a Mistral without a window is a Llama to Meta's code
        extra = sorted(set(params) & {"ffn_hidden_dim", "rope_scaling_factor"})
        if extra:
            log.warning("params.json keeps %s, which Meta's reference code does not read", extra)
    sd = {
        k: (v.clone() if k == "output.weight" else v).to(dtype or v.dtype)
        for k, v in _full_state_dict(model).items()
    }
    atomic_write(path / "consolidated.pth", lambda tmp: torch.save(sd, tmp))
    text = json.dumps(params, indent=2)
    atomic_write(path / "params.json", lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Our format: model.safetensors + config.json (ModelArgs), each written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: v for k, v in _full_state_dict(model).items() if k in _expected_shapes(model.args)}  # tied: once
    atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    text = json.dumps(dataclasses.asdict(model.args), indent=2)
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text))


def load_checkpoint(path: str | os.PathLike, n_future_tokens: int | None = None) -> Transformer:
    """Load `save_checkpoint`'s format strictly."""
    path = Path(path)
    cfg = _read_json(path / "config.json")
    if "model_type" in cfg or "architectures" in cfg:
        raise CheckpointError(f"{path / 'config.json'} is an HF config: load it with fmt='hf' (load_hf)")
    args = ModelArgs.from_dict(cfg, str(path / "config.json"))
    wfile = path / "model.safetensors"
    if not wfile.exists():
        raise CheckpointError(f"{path}: no model.safetensors")
    sd = _load_safetensors(wfile)
    _check_keys(_expected_shapes(args), sd, str(wfile))
    if n_future_tokens is not None:
        args, sd = _resize_heads(args, sd, n_future_tokens)
    return _build(args, sd, str(wfile))


# ---- HF: Llama (2 and 3.x), Qwen2 / Qwen2.5, Qwen3, Mistral (config.json + safetensors)

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "mistral": "MistralForCausalLM"}  # fmt: skip
# what transformers' config classes assume for a key that config.json leaves out
_HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "head_dim": None, "sliding_window": None},
    "qwen2": {"max_position_embeddings": 32768, "head_dim": None, "sliding_window": None},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128, "sliding_window": None},
    "mistral": {"max_position_embeddings": 131072, "head_dim": None, "sliding_window": 4096},
}
# families of another block (LayerNorm, GELU MLP, biases everywhere, often learned positions): refused by name
_GPT2_STYLE = ("gpt2", "gpt_bigcode", "starcoder2", "starcoder", "gpt_neox", "gptj", "codegen", "phi", "falcon",
               "bloom", "opt")  # fmt: skip
_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _hf_args(cfg: dict[str, Any], source: str) -> ModelArgs:
    """ModelArgs for an HF config.json of a supported family; anything else is refused naming the key."""
    family = cfg.get("model_type")
    if family in _GPT2_STYLE:
        raise CheckpointError(
            f"{source}: model_type={family!r} is a GPT-2 / StarCoder2-style model (LayerNorm, GELU MLP, biases "
            "everywhere), not the Llama-style block (RMSNorm, SwiGLU MLP, RoPE) this framework implements; "
            f"supported model_type: {', '.join(FAMILIES)}"
        )
    if family not in FAMILIES:
        raise CheckpointError(
            f"{source}: model_type={family!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    _refuse_hf_features(cfg, family, source)
    rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
    rope.update(cfg.get("rope_scaling") or {})  # transformers 4
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope scaling {rope_type!r} is not supported (only none/{'/'.join(_ROPE_TYPES)})"
        )
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(
            f"{source}: partial_rotary_factor != 1 (RoPE on part of a head) is not supported"
        )
    missing = [k for k in _LLAMA3_ROPE_KEYS if rope_type == "llama3" and k not in rope]
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    missing += [k for k in required if not isinstance(cfg.get(k), int)]
    optional = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
    missing += [k for k in optional if cfg.get(k) is not None and not isinstance(cfg.get(k), int)]
    if missing:
        raise CheckpointError(f"{source}: missing or non-integer key(s) {missing}")
    try:
        return _hf_model_args(cfg, family, rope, rope_type)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _refuse_hf_features(cfg: dict[str, Any], family: str, source: str) -> None:
    """The config keys of features the Transformer does not have, each refused by name."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{source}: hidden_act={cfg['hidden_act']!r}; only 'silu' (SwiGLU) is supported"
        )
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported (the MLP has no biases)")
    if cfg.get("attention_bias") and family != "qwen2":
        raise CheckpointError(
            f"{source}: attention_bias=true (biases on q/k/v and o_proj) is not supported; q/k/v biases without "
            "one on o_proj are Qwen2's"
        )
    if cfg.get("quantization_config"):
        raise CheckpointError(f"{source}: quantization_config: quantized weights are not supported")
    if cfg.get("attention_dropout", 0.0):
        raise CheckpointError(
            f"{source}: attention_dropout={cfg['attention_dropout']} is not supported (none)"
        )
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise CheckpointError(
            f"{source}: use_sliding_window=true (windowed attention from layer max_window_layers on) is not "
            "supported"
        )
    kinds = sorted(set(cfg.get("layer_types") or []) - {"full_attention"})
    if kinds and family != "mistral":
        raise CheckpointError(f"{source}: layer_types {kinds} are not supported (full_attention only)")


def _hf_model_args(cfg: dict[str, Any], family: str, rope: dict[str, Any], rope_type: str) -> ModelArgs:
    dim, n_heads, defaults = cfg["hidden_size"], cfg["num_attention_heads"], _HF_DEFAULTS[family]
    head_dim = cfg.get("head_dim") or defaults["head_dim"]
    kw: dict[str, Any] = {}
    if rope_type in ("linear", "llama3"):
        kw.update(rope_scaling_factor=float(rope["factor"]), rope_scaling_type="linear")
    if rope_type == "llama3":
        kw.update(
            rope_scaling_type="llama3",
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    return ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        n_future_tokens=1,
        max_seq_len=cfg.get("max_position_embeddings") or defaults["max_position_embeddings"],
        ffn_hidden_dim=cfg["intermediate_size"],
        attn_head_dim=None if head_dim is None or head_dim * n_heads == dim else head_dim,
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=cfg.get("sliding_window", defaults["sliding_window"]) if family == "mistral" else None,
        family=family,
        **kw,
    )


def _read_safetensors_dir(path: Path) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(_read_json(index)["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        names = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json (safetensors only)"
        )
    sd: dict[str, Tensor] = {}
    for f in names:
        sd.update(_load_safetensors(path / f))
    return sd


# HF tensor names (the four families share them) -> ours (top level; and inside model.layers.{i}.)
_HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
_HF_BLOCK = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "self_attn.q_norm": "attention.q_norm",
             "self_attn.k_norm": "attention.k_norm", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
_OUR_TOP, _OUR_BLOCK = {v: k for k, v in _HF_NAMES.items()}, {v: k for k, v in _HF_BLOCK.items()}


def hf_name(key: str) -> str | None:
    """The HF name of one of our tensors (trunk + head 1; None for the extra heads, which HF has no place for)."""
    if key in _OUR_TOP:
        return _OUR_TOP[key]
    parts = key.split(".")  # layers.{i}.{module}.{weight|bias}
    if parts[0] != "layers":
        return None
    return f"model.layers.{parts[1]}.{_OUR_BLOCK['.'.join(parts[2:-1])]}.{parts[-1]}"


def _rope_heads(key: str, args: ModelArgs) -> int | None:
    """How many heads of HF's rotate-half rows a tensor of ours holds (None: not rotated): wq / wk and their
    biases, and the q/k norm scales [head_dim] (one head)."""
    mod = ".".join(key.split(".")[2:-1]) if key.startswith(("layers.", "extra_heads.")) else ""
    return {"attention.wq": args.n_heads, "attention.wk": args.kv_heads, "attention.q_norm": 1,
            "attention.k_norm": 1}.get(mod)  # fmt: skip


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Invert HF's convert permute (rotate-half rows -> Meta's interleaved rows) of q/k rows (weights, biases,
    norm scales)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute(w: Tensor, n_heads: int) -> Tensor:
    """HF's convert permute (Meta's interleaved rows -> rotate-half rows): `_unpermute`'s inverse."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_hf(path: str | os.PathLike, n_future_tokens: int = 1) -> Transformer:
    """Load an HF directory (config.json + safetensors) of Llama, Qwen2 / Qwen2.5, Qwen3 or Mistral strictly:
    every tensor used, every shape checked, unsupported features refused naming the key.

    All HF blocks become trunk + head 1. With n_future_tokens = H > 1 (opt-in), H-1 extra heads are appended as
    copies of the last block (with its biases and q/k norms), so every head starts as a next-token predictor to be
    fine-tuned into head k. A tied checkpoint (no lm_head.weight) gives one parameter for embedding and output.
    """
    path = Path(path)
    source = str(path / "config.json")
    args = _hf_args(_read_json(path / "config.json"), source)
    hf = {k: v for k, v in _read_safetensors_dir(path).items() if not k.endswith("rotary_emb.inv_freq")}
    copy = hf.pop("lm_head.weight", None) if args.tie_embeddings else None  # some writers keep the tied copy
    if copy is not None and not torch.equal(copy, hf.get("model.embed_tokens.weight", copy)):
        raise CheckpointError(
            f"{path}: lm_head.weight differs from model.embed_tokens.weight but {source} says "
            "tie_word_embeddings=true"
        )
    expected = {hf_name(k): s for k, s in _expected_shapes(args).items()}
    _check_keys(expected, hf, f"{path} (HF {HF_ARCHITECTURES[args.family]} safetensors)")
    sd = {}
    for k in _expected_shapes(args):
        v, n = hf[hf_name(k)], _rope_heads(k, args)
        sd[k] = _unpermute(v, n) if n else v
    args, sd = _resize_heads(args, sd, n_future_tokens)
    return _build(args, sd, str(path))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config(
    args: ModelArgs,
    dtype: torch.dtype,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """The config.json of trunk + head 1 in the model's own HF family (args.family: LlamaForCausalLM,
    Qwen2ForCausalLM, ...), with its biases, q/k norms, head_dim, tying, sliding window and RoPE scaling.

    RoPE is written both ways (`rope_theta` / `rope_scaling`: transformers 4, vLLM, TGI; `rope_parameters`:
    transformers 5), and the dtype as `torch_dtype` (4) and `dtype` (5). The check reads the config back with
    load_hf's parser and refuses (CheckpointError) naming any field that would change: a feature the family cannot
    express (q/k norm in Llama, ...) fails here instead of exporting a different network.
    """
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    scaling = None
    if args.rope_scaling_factor != 1.0 or args.rope_scaling_type != "linear":
        scaling = {"rope_type": args.rope_scaling_type, "factor": args.rope_scaling_factor}
        if args.rope_scaling_type == "llama3":
            scaling.update(low_freq_factor=args.rope_low_freq_factor, high_freq_factor=args.rope_high_freq_factor,
                           original_max_position_embeddings=args.rope_original_max_seq_len)  # fmt: skip
        rope = {**scaling, "rope_theta": args.rope_theta}
    cfg = {
        "architectures": [HF_ARCHITECTURES[args.family]],
        "model_type": args.family,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_trunk + 1,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": args.tie_embeddings,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
        "use_cache": True,
    }
    if args.family in ("llama", "qwen3"):
        cfg.update(attention_bias=False)
    if args.family == "llama":
        cfg.update(mlp_bias=False)
    if args.family in ("qwen2", "qwen3"):  # the window Qwen ships unused
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_trunk + 1)
    if args.family == "mistral":
        cfg.update(sliding_window=args.sliding_window)
    _check_hf_round_trip(args, cfg)
    return cfg


def _check_hf_round_trip(args: ModelArgs, cfg: dict[str, Any]) -> None:
    """Every ModelArgs field must come back unchanged from the HF config (as head 1 alone: H = 1)."""
    name = HF_ARCHITECTURES[args.family].removesuffix("ForCausalLM")
    back = _hf_args(cfg, f"HF {name} export config")
    want = {"n_layers": args.n_trunk + 1, "n_future_tokens": 1, "n_kv_heads": args.kv_heads}
    want["ffn_hidden_dim"] = args.hidden_dim  # multiple_of / ffn_dim_multiplier only shape the FFN width
    default_hd = args.dim % args.n_heads == 0 and args.head_dim == args.dim // args.n_heads
    want["attn_head_dim"] = None if default_hd else args.head_dim
    bad = []
    for f in dataclasses.fields(args):
        if f.name in ("multiple_of", "ffn_dim_multiplier"):
            continue
        value, got = want.get(f.name, getattr(args, f.name)), getattr(back, f.name)
        if value != got:
            bad.append(f"{f.name} = {value!r} (an HF {name} config gives {got!r})")
    if bad:
        raise CheckpointError(f"HF {name} cannot express this model: {'; '.join(bad)}")


def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> None:
    """Write trunk + head 1 as an HF directory of the model's own family (model.safetensors,
    generation_config.json, config.json; each atomic, config.json last). The extra heads are not part of it (the
    Meta export keeps them).

    `dtype` casts the weights (None: as they are) and is written as the config's torch_dtype. q/k rows (weights,
    biases, norm scales) get HF's rotate-half permutation back, and a tied output is written once (as the
    embedding), so `AutoModelForCausalLM.from_pretrained(path)` gives head 1's logits.
    """
    from safetensors.torch import save_file

    path, args = Path(path), model.args
    sd = _full_state_dict(model)
    dtype = dtype or sd["output.weight"].dtype
    cfg = hf_config(args, dtype, bos_id, eos_id, pad_id)
    out = {}
    for k in _expected_shapes(args):
        name, n = hf_name(k), _rope_heads(k, args)
        if name is not None:  # extra_heads.* are not exported
            out[name] = (_permute(sd[k], n) if n else sd[k]).to(dtype).contiguous()
    atomic_write(path / "model.safetensors", lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    atomic_write(path / "generation_config.json", lambda tmp: Path(tmp).write_text(json.dumps(gen, indent=2)))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))


def detect_format(path: str | os.PathLike) -> str:
    """'hf' | 'wmtp' | 'meta' from the files of a checkpoint directory (config.json with a model_type: HF)."""
    path = Path(path)
    if (path / "config.json").is_file():
        cfg = _read_json(path / "config.json")
        return "hf" if "model_type" in cfg or "architectures" in cfg else "wmtp"
    if (path / "params.json").is_file():
        return "meta"
    if (path / "dcp").is_dir():
        raise CheckpointError(
            f"{path} is a resume checkpoint (dcp/): export it first with "
            f"`python train.py export --checkpoint {path} --format hf --out DIR`"
        )
    raise FileNotFoundError(
        f"{path}: not a checkpoint directory (expected config.json: HF or ours, or params.json: Meta)"
    )


def unwrap(net: nn.Module) -> Transformer:
    """The Transformer inside a peft (LoRA) wrapper, or the model itself."""
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def load_model(path: str | os.PathLike, fmt: str, n_future_tokens: int | None = None) -> Transformer:
    """Dispatch on fmt: "meta" (params.json + consolidated.pth), "hf" (LlamaForCausalLM), "wmtp" (ours).

    n_future_tokens None keeps the checkpoint's H (1 for HF); a different H drops heads or adds copies of head 1.
    """
    if fmt == "meta":
        return load_meta(path, n_future_tokens)
    if fmt == "hf":
        return load_hf(path, n_future_tokens or 1)
    if fmt == "wmtp":
        return load_checkpoint(path, n_future_tokens)
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected 'meta', 'hf' or 'wmtp'")


def read_model_args(path: str | os.PathLike, fmt: str, n_future_tokens: int | None = None) -> ModelArgs:
    """The ModelArgs `load_model(path, fmt, n_future_tokens)` would build, without reading the weights (dry runs)."""
    path = Path(path)
    if fmt == "meta":
        params = _read_json(path / "params.json")
        params.pop("max_batch_size", None)
        params.pop("use_scaled_rope", None)
        if params.get("vocab_size", 0) in (-1, 0):
            sd = _torch_load(_meta_weights_file(path))
            params["vocab_size"] = sd["tok_embeddings.weight"].shape[0]
        args = ModelArgs.from_dict(params, str(path / "params.json"))
    elif fmt == "hf":
        args, n_future_tokens = (
            _hf_args(_read_json(path / "config.json"), str(path / "config.json")),
            n_future_tokens or 1,
        )
    elif fmt == "wmtp":
        args = ModelArgs.from_dict(_read_json(path / "config.json"), str(path / "config.json"))
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected 'meta', 'hf' or 'wmtp'")
    H = n_future_tokens or args.n_future_tokens
    return dataclasses.replace(args, n_layers=args.n_trunk + H, n_future_tokens=H)


# ----------------------------------------------------------------------------------------------------------------
# Accounting helpers


def count_params_from_args(args: ModelArgs) -> int:
    """Exact parameter count of Transformer(args), built on the meta device (no memory)."""
    return count_params(_meta_model(args))


def lora_param_count(args: ModelArgs, r: int, target_modules: Iterable[str]) -> int:
    """Trainable parameters LoRA adds: r * (in + out) per targeted nn.Linear (matched by its last name part)."""
    targets = set(target_modules)
    linears = [
        (n.rsplit(".", 1)[-1], m) for n, m in _meta_model(args).named_modules() if isinstance(m, nn.Linear)
    ]
    unknown = targets - {name for name, _ in linears}
    if unknown:
        raise ValueError(
            f"LoRA target_modules {sorted(unknown)} match no linear layer (have wq wk wv wo w1 w2 w3 output)"
        )
    return sum(r * (m.in_features + m.out_features) for name, m in linears if name in targets)


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters (optionally without the input embedding table)."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.tok_embeddings.weight.numel()
    return n


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (matmul params touched per token) + 12 * blocks * dim * seq_len (attention).

    Each token passes through the trunk, all H head blocks and H output projections; the embedding lookup is not
    a matmul. The attention term is PaLM's (no causal halving), as used for MFU.
    """
    D, hd = args.dim, args.head_dim
    attn = D * args.n_heads * hd * 2 + D * args.kv_heads * hd * 2
    block = attn + 3 * D * args.hidden_dim + 2 * D
    n_matmul = args.n_layers * block + args.n_future_tokens * D * args.vocab_size
    return 6.0 * n_matmul + 12.0 * args.n_layers * D * seq_len
