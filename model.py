"""The multi-token-prediction (MTP) transformer and its loss.

Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA) in Meta's MTP layout (spec §1), with the features of today's
HF families as ModelArgs fields of the one Transformer (q/k/v biases, q/k norm, explicit head_dim, llama3 RoPE
scaling, tied embeddings, a sliding-window limit); the extra heads are blocks like the others and carry them too:

    tok_embeddings -> layers[:-1] (the trunk) -> h
    head 1 = layers[-1], head k+1 = extra_heads[k-1]; every head reads h (heads run in parallel)
    each head -> shared norm -> shared output projection

Module and parameter names equal the keys of Meta's `consolidated.pth`, so a Meta state dict loads with
`load_state_dict(strict=True)`. RoPE uses Meta's convention (interleaved pairs (x[2i], x[2i+1])); formats.py
loads and saves the weight formats (and un-permutes HF's rotate-half q/k weights into this convention).

Every training call goes through `Transformer.__call__` (FSDP2 attaches its root hooks there):
    model(idx)                      -> logits [B, S, H, V] (index 0 = head 1)
    model(idx, stage="trunk")       -> trunk output h [B, S, D]
    model(h, stage=k)               -> head k logits [B, S, V] (k = 0..H-1; `select=` keeps only some positions)
    model(h, stage=k, select=v, targets=t, weights=w, chunk=c) -> (weighted CE sum, CE per position) of head k
Decoding (KV cache, sampling, speculative decoding) is generate.py's, on a whole (unsharded) model:
    model.generate(prompts, max_new_tokens, temperature=..., ...) -> new tokens per prompt

The MTP loss: `mtp_targets` (head k at position t targets t+k+1), `mtp_loss_backward`, the memory-efficient step
of the paper (§2): the caller computes h once; each head runs forward + backward into a detached leaf of h, so
only one head's logits are alive, and of those only one chunk of positions' (`head_loss`: the CE and its gradient
chunk by chunk, issue 22: a 152k vocabulary never has a head's [B, S, V] logits); one backward through the trunk.
`mtp_head_ce` is the per-pair CE without gradient (validation, evaluation, the scorers' extra pass), chunked alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

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


KV = tuple[Tensor, Tensor, Tensor]  # decoding: (k_cache, v_cache, slots [B, T]) of one block (generate.py)


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
        self.q_norm = RMSNorm(self.hd, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.hd, args.norm_eps) if args.qk_norm else None

    def _heads(
        self, x: Tensor, proj: nn.Linear, n: int, norm: RMSNorm | None, cos: Tensor, sin: Tensor
    ) -> Tensor:
        """proj(x) split into n heads [B, n, T, hd], normed (qk_norm) and rotated."""
        y = proj(x).view(*x.shape[:2], n, self.hd)
        return apply_rope(y if norm is None else norm(y), cos, sin).transpose(1, 2)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, kv: KV | None = None
    ) -> Tensor:
        """Causal attention. Decoding passes `kv = (k_cache, v_cache, slots)`: the new keys/values are written at
        each row's slots [B, T] of the caches [B, n_kv, max_len, hd] (rows of a speculative batch stand at
        different slots), and the queries attend to slots 0..end-1 under the mask [B, 1, T, end]."""
        B, T, _ = x.shape
        q = self._heads(x, self.wq, self.n_heads, self.q_norm, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        gqa = self.n_kv != self.n_heads
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            self.write_kv(kv, k, v)
            end = mask.shape[-1]
            k, v = kv[0][:, :, :end], kv[1][:, :, :end]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    @staticmethod
    def write_kv(kv: KV, k: Tensor, v: Tensor) -> None:
        """Write keys and values [B, n_kv, T, hd] into kv's caches at its per-row slots [B, T]."""
        k_cache, v_cache, slots = kv
        at = slots[:, None, :, None].expand_as(k)
        k_cache.scatter_(2, at, k)
        v_cache.scatter_(2, at, v)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (normed, RoPE applied) and values [B, n_kv, T, hd] of the normed input x [B, T, D]."""
        B, T, _ = x.shape
        k = self._heads(x, self.wk, self.n_kv, self.k_norm, cos, sin)
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

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, kv: KV | None = None
    ) -> Tensor:
        # Checkpoint INSIDE forward (not around the module call): FSDP2's hooks sit on the call, so the recompute
        # sees the same (already cast, already unsharded) inputs and parameters as the first forward did.
        if self.checkpointing and kv is None and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask, kv)

    def _forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, kv: KV | None = None
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, kv)
        return h + self.feed_forward(self.ffn_norm(h))


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
        return self.rope(torch.arange(S, device=ref.device)[None], ref.dtype)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """RoPE cos/sin for integer positions [B|1, T] (decoding gives each row its own positions)."""
        return rope_cos_sin(positions, self.args, dtype)

    def forward(
        self,
        x: Tensor,
        stage: str | int = "full",
        select: Tensor | None = None,
        targets: Tensor | None = None,
        weights: Weights = None,
        chunk: int = 0,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """See the module docstring. `select` (bool [B, S], head stages only) returns logits [n_selected, V].

        With `targets` ([n_selected] token ids) a head stage returns (loss, ce) instead of logits: `head_loss` of
        the selected positions, in chunks of `chunk` positions (0: all at once). Inside the model's call, so the
        output projection is the one FSDP2 has gathered for this forward."""
        if isinstance(stage, int) and not isinstance(stage, bool):
            cos, sin = self._rope(x.shape[1], x)
            h = self._block(self.head_block(stage), x, cos, sin)
            if select is not None:
                h = h[select]
            if targets is not None:
                return head_loss(self.norm(h), self.output, targets, weights, chunk)
            return self.output(self.norm(h))
        if stage not in ("full", "trunk"):
            raise ValueError(f"stage must be 'full', 'trunk' or an int head index, got {stage!r}")
        h = self.tok_embeddings(x)
        cos, sin = self._rope(x.shape[1], h)
        for layer in self.layers[:-1]:
            h = self._block(layer, h, cos, sin)
        if stage == "trunk":
            return h
        heads = [self._block(self.head_block(k), h, cos, sin) for k in range(self.args.n_future_tokens)]
        return self.output(self.norm(torch.stack(heads, dim=-2)))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling: Any) -> list[list[int]]:
        """New tokens per prompt, sampled with head 1: `generate.generate(self, prompts, max_new_tokens,
        temperature=, top_p=, eos_id=, stop=, seed=, pad_id=, speculative=)`."""
        # Decoding lives in generate.py, which takes a model and imports nothing from this file; importing it
        # here, at the call, keeps model.py free of it (no import circle).
        import generate

        return generate.generate(self, prompts, max_new_tokens, **sampling)


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


def pair_scores(token_scores: Tensor, H: int) -> Tensor:
    """[B, S] per-position scores -> [B, S, H]: pair (t, k) gets the score of its target position t + k + 1 (the
    `mtp_targets` convention: head k at position t targets t + k + 1), 0 past the end."""
    B, S = token_scores.shape
    out = token_scores.new_zeros(B, S, H)
    for k in range(H):
        if S - k - 1 > 0:
            out[:, : S - k - 1, k] = token_scores[:, k + 1 :]
    return out


CE_CHUNK = (
    1024  # positions per chunk of a head's CE (config model.ce_chunk; 0: all of a head's logits at once)
)

# A head's weights over its selected positions: known ([N]), a function of the head's CE [N] (detached) -> [N]
# (called once per head, before any gradient), or None (1 everywhere).
Weights = Tensor | Callable[[Tensor], Tensor] | None


def _f32(x: Tensor) -> Tensor:
    """Upcast half-precision logits to fp32 for the CE (fp64 stays fp64: exact tests)."""
    return x if x.dtype == torch.float64 else x.float()


def head_loss(
    x: Tensor, output: nn.Module, targets: Tensor, weights: Weights, chunk: int
) -> tuple[Tensor, Tensor]:
    """(sum_i w_i CE_i, CE [N] detached) of the logits output(x) [N, V] against targets [N], CE in fp32.

    chunk > 0: the logits of at most `chunk` positions exist at a time (`_ChunkedCE`). chunk = 0, or an output
    projection that is not a plain bias-free nn.Linear (LoRA on `output`): all N positions' logits at once,
    through autograd.
    """
    if chunk > 0 and type(output) is nn.Linear and output.bias is None:
        w = output.weight
        need = (torch.is_grad_enabled() and x.requires_grad, torch.is_grad_enabled() and w.requires_grad)
        return _ChunkedCE.apply(x, w, targets, weights, chunk, need)
    ce = F.cross_entropy(_f32(output(x)), targets, reduction="none")
    w = weights(ce.detach()) if callable(weights) else weights
    return (ce.sum() if w is None else (w.to(ce.dtype) * ce).sum()), ce.detach()


def _exp_ce(x: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
    """(E = exp(z - max z) [c, V] fp32, its row sums [c, 1], CE [c], the logits' compute dtype) of the logits
    z = F.linear(x, weight) of one chunk: the one [c, V] fp32 buffer (upcast from half precision as it is
    shifted, in place when z is already fp32/fp64), so softmax = E / sums."""
    z = F.linear(x, weight)
    m = z.amax(1, keepdim=True)
    tgt = z.gather(1, targets[:, None])
    e = z.sub_(m) if z.dtype in (torch.float32, torch.float64) else torch.sub(z, m.float())
    dtype = z.dtype
    del z
    e = e.exp_()
    s = e.sum(1, keepdim=True)
    return e, s, (_f32(m) + s.log() - _f32(tgt)).squeeze(1), dtype


class _ChunkedCE(torch.autograd.Function):
    """Weighted CE of F.linear(x, weight), chunk by chunk of positions, without the [N, V] logits.

    The loss is linear in the (detached) weights, so a chunk's logit gradient w_i (softmax_i - onehot_i) is known
    as soon as its weights are: the forward computes the loss AND the gradients of x and weight, freeing each
    chunk's logits before the next; the backward only scales them by the incoming gradient (the caller runs
    backward at once: the head-by-head step). The per-row factor w_i / sum_i goes on the small [c, D] sides of
    the two gradient matmuls, not over [c, V]. Weights known beforehand: one pass, the unchunked CE's 3 matmuls
    of [N, D] x [D, V]. Weights that are a function of the CE (rho1 / dft_v1 per head) need every position's CE
    first: one pass for the CE, then the weights, then a second pass recomputing each chunk's logits for the
    gradients (4 such matmuls instead of 3; the head block itself still runs once).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, weights, chunk, need):
        N, fp64 = x.shape[0], x.dtype == weight.dtype == torch.float64
        ce = torch.empty(N, dtype=torch.float64 if fp64 else torch.float32, device=x.device)
        spans = [(s, min(s + chunk, N)) for s in range(0, N, chunk)]
        w = None if callable(weights) else weights
        if callable(weights) or not any(need):  # the CE alone (pass 1 of 2, or no gradient wanted)
            for s, e in spans:
                ce[s:e] = _exp_ce(x[s:e], weight, targets[s:e])[2]
            if callable(weights):
                w = weights(ce.clone())
        w = None if w is None else w.to(ce.dtype)
        gx = torch.empty_like(x) if need[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                         device=weight.device) if need[1] else None  # fmt: skip
        for s, e in spans if any(need) else ():
            p, sums, ce[s:e], dtype = _exp_ce(x[s:e], weight, targets[s:e])
            # dz_i = w_i (p_i / sums_i - onehot_i) = r_i (p_i - sums_i onehot_i), r_i = w_i / sums_i: the
            # target's entry is subtracted in fp32, before the cast (confident predictions keep their precision)
            rows = torch.arange(e - s, device=p.device)
            p[rows, targets[s:e]] -= sums[:, 0]
            r = (1.0 if w is None else w[s:e, None]) / sums
            dz = p.to(dtype)
            del p
            if gx is not None:
                gx[s:e] = (r * (dz @ weight)).to(gx.dtype)
            if gw is not None:
                gw += (dz.t() @ (r * x[s:e]).to(dtype)).to(gw.dtype)
            del dz  # before the next chunk's logits exist
        ctx.save_for_backward(gx, gw)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return (ce.sum() if w is None else (w * ce).sum()), ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, g_ce):
        gx, gw = ctx.saved_tensors
        if gx is not None:
            gx = gx * g_loss.to(gx.dtype)
        if gw is not None:
            gw = gw.mul_(g_loss.to(gw.dtype)).to(ctx.weight_dtype)
        return gx, gw, None, None, None, None


def _alpha(alpha: Iterable[float] | Tensor | None, H: int) -> list[float]:
    a = [1.0] * H if alpha is None else [float(x) for x in alpha]
    if len(a) != H:
        raise ValueError(f"alpha has {len(a)} entries, expected one per head (H={H})")
    return a


def _head_weights(weights: Tensor | Callable, k: int, v: Tensor, factor: float) -> Weights:
    """Head k's weights over its valid positions v [B, S], times `factor`, in head_loss's form. A function with
    `per_head = False` (weights known before the heads run) is asked with ce None, so the head runs one pass."""
    if not callable(weights):
        return weights[..., k][v] * factor
    if not getattr(weights, "per_head", True):
        return weights(k, None)[v] * factor

    def of_ce(ce: Tensor) -> Tensor:
        return (
            weights(k, torch.zeros(v.shape, dtype=ce.dtype, device=ce.device).index_put((v,), ce))[v] * factor
        )

    return of_ce


def mtp_loss_backward(
    model: nn.Module,
    h: Tensor,
    targets: Tensor,
    valid: Tensor,
    weights: Tensor | Callable[[int, Tensor | None], Tensor],
    alpha: Iterable[float] | Tensor | None = None,
    scale: float = 1.0,
    chunk: int = CE_CHUNK,
) -> dict[str, Tensor]:
    """Memory-efficient MTP loss + backward (paper §2): one head's logits alive at a time, and of those at most
    `chunk` positions' (`head_loss`; 0: all of the head's).

    L = sum_valid alpha_k * w * CE / count_valid (count over all heads). For each head: the CE of its valid
    positions only (fp32), backward of scale * L_k into a detached leaf of h; then ONE h.backward. Every head
    runs forward and backward even when it has no valid pair, so all ranks run the same collectives.
    `weights` is [B, S, H], or a function (k, ce_k [B, S] detached, 0 where invalid) -> head k's weights [B, S]
    for weights that depend on the head's own CE (rho1 / dft_v1 per head, spec §3.3): no extra pass over the
    heads. A function with attribute `per_head = False` is called with ce_k None before the head (its weights
    do not depend on the CE): then the chunked CE runs in one pass.
    Returns detached {"loss", "head_loss" [H], "head_ce" [H]} (unscaled).
    """
    H = targets.shape[-1]
    a = _alpha(alpha, H)
    denom = max(int(valid.sum()), 1)
    leaf = h.detach().requires_grad_()
    head_losses, head_ce = [], []
    for k in range(H):
        v = valid[..., k]
        w_k = _head_weights(weights, k, v, a[k] / denom)
        loss_k, ce = model(leaf, stage=k, select=v, targets=targets[..., k][v], weights=w_k, chunk=chunk)
        if loss_k.requires_grad:  # False under torch.no_grad(): then this is an evaluation loss
            (loss_k * scale).backward()
        head_losses.append(loss_k.detach())
        head_ce.append(ce.sum() / max(int(v.sum()), 1))
        del loss_k, ce
    if h.requires_grad and leaf.grad is not None:
        h.backward(leaf.grad)
    head_loss_t = torch.stack(head_losses)
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
def mtp_head_ce(model: nn.Module, h: Tensor, targets: Tensor, valid: Tensor, chunk: int = CE_CHUNK) -> Tensor:
    """Per-pair CE [B, S, H] (fp32, 0 where invalid) of trunk output h [B, S, D], without gradient: the one
    per-head CE of validation, evaluation, the synthetic metrics and rho1's extra pass.

    One head at a time and only its valid positions' logits, `chunk` positions at a time (`head_loss`); every
    head runs its block even when it has no valid pair (an FSDP2 forward is a collective: all ranks run the same
    ones)."""
    ce = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    for k in range(targets.shape[-1]):
        v = valid[..., k]
        ce[..., k][v] = model(h.detach(), stage=k, select=v, targets=targets[..., k][v], chunk=chunk)[
            1
        ].float()
    return ce


# ----------------------------------------------------------------------------------------------------------------
# Accounting helpers


def unwrap(net: nn.Module) -> Transformer:
    """The Transformer inside a peft (LoRA) wrapper, or the model itself."""
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def count_params_from_args(args: ModelArgs) -> int:
    """Exact parameter count of Transformer(args), built on the meta device (no memory)."""
    with torch.device("meta"):
        return count_params(Transformer(args))


def lora_param_count(args: ModelArgs, r: int, target_modules: Iterable[str]) -> int:
    """Trainable parameters LoRA adds: r * (in + out) per targeted nn.Linear (matched by its last name part)."""
    targets = set(target_modules)
    with torch.device("meta"):
        model = Transformer(args)
    linears = [(n.rsplit(".", 1)[-1], m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
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
    """Training FLOPs of one token whose every head has a target, in rows of seq_len (`train_flops` of one
    position with one pair per head): a planning figure, not what a step computes."""
    return train_flops(args, 1, seq_len, [1] * args.n_future_tokens)


def train_flops(args: ModelArgs, positions: int, width: int, pairs: Sequence[int]) -> float:
    """Training FLOPs (forward + backward) that a micro-batch computes, the numerator of MFU.

    6 per matmul parameter and position: every block (the trunk and all H head blocks) at each of the
    `positions` input positions, plus PaLM's attention term 12 * n_heads * head_dim * width per block and position
    (keys over the batch's real width, no causal halving); head k's output projection only at its pairs[k] valid
    positions (the CE runs on those alone). The embedding lookup and norms are not matmuls.
    """
    D, hd = args.dim, args.head_dim
    block = 2 * D * args.n_heads * hd + 2 * D * args.kv_heads * hd + 3 * D * args.hidden_dim
    per_position = 6.0 * args.n_layers * block + 12.0 * args.n_layers * args.n_heads * hd * width
    return positions * per_position + 6.0 * D * args.vocab_size * float(sum(pairs))
