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

import dataclasses
import math
from collections.abc import Callable, Iterable
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
    """Meta's params.json keys, plus `max_seq_len` and two extensions needed by HF checkpoints."""

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
    rope_scaling_factor: float = 1.0  # HF "linear" rope scaling: positions are divided by this factor

    def __post_init__(self) -> None:
        n_kv = self.n_kv_heads or self.n_heads
        checks = [
            (
                self.dim > 0 and self.n_heads > 0 and self.vocab_size > 0,
                "dim, n_heads, vocab_size must be > 0",
            ),
            (self.dim % self.n_heads == 0, f"dim={self.dim} must be divisible by n_heads={self.n_heads}"),
            ((self.dim // self.n_heads) % 2 == 0, f"head dim {self.dim // self.n_heads} must be even (RoPE)"),
            (self.n_heads % n_kv == 0, f"n_heads={self.n_heads} must be divisible by n_kv_heads={n_kv}"),
            (self.n_future_tokens >= 1, f"n_future_tokens={self.n_future_tokens} must be >= 1"),
            (
                self.n_layers >= self.n_future_tokens,
                f"n_layers={self.n_layers} must be >= n_future_tokens={self.n_future_tokens} "
                "(n_layers counts the trunk AND the head blocks)",
            ),
            (self.rope_scaling_factor > 0, f"rope_scaling_factor={self.rope_scaling_factor} must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelArgs: {msg}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def n_trunk(self) -> int:
        return self.n_layers - self.n_future_tokens

    @property
    def hidden_dim(self) -> int:
        """FFN width: Llama's rule (2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> ModelArgs:
        """Strict construction from a JSON dict: unknown keys and wrong types are errors naming `source`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; expected a subset of {sorted(fields)}")
        ints = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "n_future_tokens"}
        ints |= {"max_seq_len", "ffn_hidden_dim"}
        for k, v in d.items():
            if v is None and k in ("n_kv_heads", "ffn_dim_multiplier", "ffn_hidden_dim"):
                continue
            want = int if k in ints else float
            if isinstance(v, bool) or not isinstance(v, want if want is int else (int, float)):
                raise ValueError(f"{source}: key {k!r} = {v!r} must be {want.__name__}")
        floats = {k for k in fields if k not in ints}
        d = {k: float(v) if k in floats and v is not None else v for k, v in d.items()}
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


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


def rope_cos_sin(positions: Tensor, args: ModelArgs, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B|1, T, 1, head_dim/2] for integer positions [B|1, T]; fp32 angles like Meta/HF (fp64 if asked).

    Computed on the fly (cheap) rather than stored as a buffer, so `model.to(bfloat16)` cannot degrade them and
    the state dict holds exactly Meta's keys.
    """
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=positions.device, dtype=cdt) / hd))
    angles = (positions.to(cdt) / args.rope_scaling_factor)[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle i (Meta's complex-multiply convention, in reals)."""
    # one complex multiply: about 5x faster on CPU than the four real products and a stack
    xc = torch.view_as_complex(x.to(cos.dtype).unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(self.n_heads * self.hd, args.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, kv=None) -> Tensor:
        """Causal attention; with `kv=(k_cache, v_cache, start)` the new keys/values are written from cache slot
        `start` on (an int: the same slot for every row) or at per-row slots (speculative decoding, where rows
        accept different numbers of drafts): `start` is then the slot index [B, n_kv, T, hd] for a scatter
        along the slot dimension. The mask [B, 1, T, end] covers slots 0..end-1."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.hd), cos, sin).transpose(1, 2)
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
        """Keys (RoPE applied) and values [B, n_kv, T, hd] of the normed input x [B, T, D]."""
        B, T, _ = x.shape
        k = apply_rope(self.wk(x).view(B, T, self.n_kv, self.hd), cos, sin).transpose(1, 2)
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
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) matrices; residual output projections (wo, w2) scaled by 1/sqrt(2 * n_layers)."""
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if p.ndim == 1:
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
    """Training FLOPs per token: 6 * (matmul params touched per token) + 12 * blocks * dim * seq_len (attention).

    Each token passes through the trunk, all H head blocks and H output projections; the embedding lookup is not
    a matmul. The attention term is PaLM's (no causal halving), as used for MFU.
    """
    D, hd = args.dim, args.head_dim
    attn = D * args.n_heads * hd * 2 + D * args.kv_heads * hd * 2
    block = attn + 3 * D * args.hidden_dim + 2 * D
    n_matmul = args.n_layers * block + args.n_future_tokens * D * args.vocab_size
    return 6.0 * n_matmul + 12.0 * args.n_layers * D * seq_len
