"""Decoding with an MTP Transformer: head 1 decides every token; with `speculative=True` heads 2..H draft them.

    generate(model, prompts, max_new_tokens, temperature=0.2, top_p=0.95, eos_id=None, stop=None, seed=None,
             pad_id=0, speculative=False)            -> new tokens per prompt (what model.generate returns)
    decode(model, prompts, Sampling(...), pad_id=0, speculative=False)
                                                     -> (new tokens per prompt, decoding statistics)

Prompts are left-padded into one batch. Every row has its own RoPE positions (0 after its padding) and attends to
its own slots only, so a padded row computes exactly what it would alone. `forward_cached` runs a block of tokens
through trunk + head 1 into a `KVCache` at each row's own slots: the rows of a speculative batch accept different
numbers of drafts, so they stand at different slots.

These are functions of a model (a model.Transformer), and nothing here imports model.py: model.generate delegates
to this file. The speculative loop is `_speculate`; drafting is `_spec_heads` + `_draft`, verification
`forward_cached` + `_verify`: the places to time and change.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUCLEUS_TOPK = 64  # top-p looks for its nucleus among the top 64 tokens first (sorting all V is slow on CPU)
SPEC_MAX_BACKOFF = 64  # when drafting does not pay: up to this many plain steps between one-draft probes
SPEC_DECAY = 0.75  # a head's acceptance: accepted / verified drafts, older steps' counts decayed by this ...
SPEC_PRIOR = (0.8, 2.0)  # ... from these pseudo-counts (acceptance 0.4, worth two verified drafts)
SPEC_COST_PRIOR = 1.25  # a drafting step's time over a plain step's, at least (more once measured) ...
SPEC_MARGIN = 1.15  # ... times this (what the step timings miss: catch-up steps, switching, probes)
SPEC_TIMES = 8  # ... measured as the fastest of the last this many steps of each kind
# a batch times a plain step after 2 and 4 drafting steps while it expects fewer tokens per drafting step than
# SPEC_EXPLORE_BELOW x H (with more, drafting pays unless a drafting step costs that many plain ones), every 32
SPEC_EXPLORE = (2, 4, 32)
SPEC_EXPLORE_BELOW = 0.75
SPEC_HEAD_WINDOW = 8  # the extra heads run whole over at most this many new slots, keys/values only before


@dataclass(frozen=True)
class Sampling:
    """How a decoding call draws its tokens and where its rows end.

    temperature 0 is greedy; otherwise nucleus (top_p) sampling from softmax(logits / temperature), with a
    torch.Generator seeded by `seed` when given. A row stops at `eos_id` (not included in its output), once
    `stop(row_new_tokens)` returns True (the token that triggered it is kept; the caller trims stop strings), or
    after max_new_tokens tokens.
    """

    max_new_tokens: int
    temperature: float = 0.2
    top_p: float = 0.95
    eos_id: int | None = None
    stop: Callable[[list[int]], bool] | None = None
    seed: int | None = None

    def append(self, row: list[int], toks: list[int]) -> tuple[bool, int]:
        """Append toks to a row token by token: EOS ends the row (not appended), so do `stop(row)` and the
        budget. Returns (row done, tokens used, EOS included)."""
        for i, tok in enumerate(toks):
            if self.eos_id is not None and tok == self.eos_id:
                return True, i + 1
            row.append(tok)
            if (self.stop is not None and self.stop(row)) or len(row) >= self.max_new_tokens:
                return True, i + 1
        return False, len(toks)


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.2,
    top_p: float = 0.95,
    eos_id: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    seed: int | None = None,
    pad_id: int = 0,
    speculative: bool = False,
    trace: dict | None = None,
) -> list[list[int]]:
    """Sample continuations with head 1 (batched, left-padded, KV-cached): the new tokens of each prompt.

    The sampling keywords are `Sampling`'s. `speculative=True`: self-speculative decoding with the extra heads
    (`_speculate`). Greedy output is the plain greedy output token for token; sampled output has exactly the plain
    distribution (not the same draws for a seed: the generator is consumed differently). `decode` also returns
    the decoding statistics; `trace` is `decode`'s (tests).
    """
    s = Sampling(max_new_tokens, temperature, top_p, eos_id, stop, seed)
    return decode(model, prompts, s, pad_id, speculative, trace)[0]


@torch.no_grad()
def decode(
    model: nn.Module,
    prompts: list[list[int]],
    s: Sampling,
    pad_id: int = 0,
    speculative: bool = False,
    trace: dict | None = None,
) -> tuple[list[list[int]], dict[str, Any]]:
    """`generate` with its statistics: (new tokens per prompt, statistics of the call).

    Statistics (`speculative_summary` adds up those of several calls): "tokens": generated tokens (EOS included),
    "forwards": trunk + head 1 passes, "row_forwards": (row, pass) pairs with the row still generating,
    "tokens_per_forward": tokens / row_forwards (plain decoding: 1.0), "drafted" / "accepted": per extra head
    (head 2..H), drafts verified (every earlier draft of the block accepted) and accepted, "acceptance":
    accepted / drafted per head (None when none was verified), "draft_steps": passes that verified drafts.

    `trace` (tests), a dict, receives "p": per row, head 1's fp32 logits [V] behind each token handed to the row
    (EOS included); speculative decoding adds "q": (row, tokens the row had before the drafting position, heads
    2.. fp32 logits [n_drafts, V]) per drafting step and row.
    """
    H = model.args.n_future_tokens if speculative else 1
    rows = _Rows(s, [[] for _ in prompts], [False] * len(prompts), _new_stats(H - 1), trace)
    if trace is not None:
        trace.update(p=[[] for _ in prompts], q=[])
    batch = _left_pad(model, prompts, s, pad_id)
    if batch is not None:
        dev = model.output.weight.device
        gen = torch.Generator(device=dev).manual_seed(s.seed) if s.seed is not None else None
        with _eval_mode(model):
            if speculative:
                _speculate(model, *batch, rows, gen)
            else:
                _plain(model, *batch, rows, gen)
    return rows.out, speculative_summary(rows.stats)


# ----------------------------------------------------------------------------------------------------------------
# The KV cache and the cached forward


class KVCache:
    """Keys/values [B, n_kv, max_len, hd] per block (trunk, head 1, then `extra_heads` extra heads), per slot.

    `pad[b]`: left-pad slots of row b, never attended to (row b's RoPE positions start at 0 after them).
    Speculative decoding (extra_heads > 0) also keeps `hidden` [B, max_len, D], the trunk output per slot (the
    extra heads' input), and `filled[k][b]`: the slots of row b whose keys/values extra head k + 2 holds. The
    head blocks' caches (head 1 and the extra heads) are then views of one tensor `heads_k` / `heads_v`
    [1 + extra_heads, B, n_kv, max_len, hd], so `HeadStack` reads and writes several heads at once.
    """

    def __init__(self, model: nn.Module, pad: Tensor, max_len: int, extra_heads: int = 0):
        a, w = model.args, model.output.weight
        B, n = pad.shape[0], len(model.layers) - 1
        shape = (B, a.kv_heads, max_len, a.head_dim)
        new = lambda *s: torch.zeros(*s, dtype=w.dtype, device=w.device)  # noqa: E731
        self.heads_k, self.heads_v = new(1 + extra_heads, *shape), new(1 + extra_heads, *shape)
        self.k = [new(shape) for _ in range(n)] + list(self.heads_k.unbind(0))
        self.v = [new(shape) for _ in range(n)] + list(self.heads_v.unbind(0))
        self.pad, self.max_len = pad, max_len
        self.hidden = new(B, max_len, a.dim) if extra_heads else None
        self.filled = [[0] * B for _ in range(extra_heads)]


def forward_cached(
    model: nn.Module, ids: Tensor, cache: KVCache, start: list[int], last: bool = False
) -> Tensor:
    """Run ids [B, T] through trunk + head 1 into cache slots start[b].. of each row (keeping the trunk output in
    `cache.hidden` when it has one); head 1's fp32 logits [B, T, V] (only the last position, [B, 1, V], with
    `last`)."""
    h, cos, sin, mask, slots = _trunk_cached(model, ids, cache, start)
    n = len(model.layers) - 1
    x = model.layers[n](h, cos, sin, mask, (cache.k[n], cache.v[n], slots))
    return model.output(model.norm(x[:, -1:] if last else x)).float()


def forward_heads(
    model: nn.Module, ids: Tensor, cache: KVCache, start: list[int], stack: HeadStack, n_heads: int
) -> Tensor:
    """`forward_cached` with heads 1..n_heads run together (`HeadStack`) on the trunk output: fp32 logits
    [B, T, n_heads, V]. The extra heads' caches must hold every slot before start[b] (cache.filled)."""
    h, cos, sin, mask, slots = _trunk_cached(model, ids, cache, start)
    x = stack(h, cos, sin, mask, slots, cache, 0, n_heads)  # [G, B, T, D]
    return model.output(model.norm(x)).float().permute(1, 2, 0, 3)


def _trunk_cached(
    model: nn.Module, ids: Tensor, cache: KVCache, start: list[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The trunk's part of a cached forward: (trunk output, RoPE cos/sin, mask, slots) of ids [B, T]."""
    slots, end = _slots(start, ids.shape[1], ids.device)
    if end > cache.max_len:
        raise ValueError(f"KV cache overflow: {end} positions > max_len {cache.max_len}")
    positions, mask = _decode_mask(slots, cache.pad, end)
    h = model.tok_embeddings(ids)
    cos, sin = model.rope(positions, h.dtype)
    # (not model.layers[:-1]: slicing builds a new ModuleList per call)
    for i in range(len(model.layers) - 1):
        h = model.layers[i](h, cos, sin, mask, (cache.k[i], cache.v[i], slots))
    if cache.hidden is not None:
        _write(cache.hidden, slots, h)
    return h, cos, sin, mask, slots


def _rms(x: Tensor, eps: float) -> Tensor:
    """model.RMSNorm's normalisation without its scale (fp32, cast back)."""
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class HeadStack:
    """The head blocks' weights stacked [H, ...] (head 1, then the extra heads), so that heads g0..g1-1 run as
    ONE batched block on the same input (torch.bmm over the heads): the arithmetic of model.TransformerBlock
    (RMSNorm, GQA attention with optional q/k/v biases and q/k norm, RoPE, SwiGLU), in the operations of one
    block instead of one block per head. Decoding a small model is bound by the number of operations per step,
    not by their size, so this is what makes running every head in the verification forward cheap. Built per
    decoding call (a copy of the head blocks' weights)."""

    def __init__(self, model: nn.Module):
        blocks = [model.head_block(k) for k in range(model.args.n_future_tokens)]
        att = blocks[0].attention
        self.nh, self.nkv, self.hd, self.eps = att.n_heads, att.n_kv, att.hd, model.args.norm_eps
        # the block's own RoPE and cache write, from the model's module (this file does not import model.py)
        self.write_kv, self.apply_rope = att.write_kv, sys.modules[type(att).__module__].apply_rope

        def st(get) -> Tensor | None:
            return None if get(blocks[0]) is None else torch.stack([get(b) for b in blocks])

        self.attn_norm, self.ffn_norm = st(lambda b: b.attention_norm.weight), st(lambda b: b.ffn_norm.weight)
        for name in ("wq", "wk", "wv", "wo"):  # [H, in, out]: x @ W^T as a bmm
            setattr(self, name, st(lambda b, n=name: getattr(b.attention, n).weight.t()))
            setattr(self, "b" + name[1], st(lambda b, n=name: getattr(b.attention, n).bias))
        self.q_norm = st(lambda b: None if b.attention.q_norm is None else b.attention.q_norm.weight)
        self.k_norm = st(lambda b: None if b.attention.k_norm is None else b.attention.k_norm.weight)
        for name in ("w1", "w2", "w3"):
            setattr(self, name, st(lambda b, n=name: getattr(b.feed_forward, n).weight.t()))

    def __call__(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        slots: Tensor,
        cache: KVCache,
        g0: int,
        g1: int,
    ) -> Tensor:
        """Heads g0..g1-1 (0: head 1) on x [B, T, D] at cache slots [B, T] under mask [B, 1, T, end], writing
        their keys/values into cache.heads_k/v: outputs [G, B, T, D]."""
        G, (B, T, D), g = g1 - g0, x.shape, slice(g0, g1)
        xn = (_rms(x, self.eps)[None] * self.attn_norm[g, None, None]).view(G, B * T, D)
        q = self._proj_heads(xn, self.wq, self.bq, self.q_norm, g, self.nh, B, T, cos, sin)
        k = self._proj_heads(xn, self.wk, self.bk, self.k_norm, g, self.nkv, B, T, cos, sin)
        v = self._bmm(xn, self.wv, self.bv, g).view(G * B, T, self.nkv, self.hd).transpose(1, 2)
        shape = (G * B, *cache.heads_k.shape[2:])
        kc, vc = cache.heads_k[g].view(shape), cache.heads_v[g].view(shape)
        end = mask.shape[-1]
        self.write_kv((kc, vc, slots.repeat(G, 1)), k, v)
        out = F.scaled_dot_product_attention(
            q,
            kc[:, :, :end],
            vc[:, :, :end],
            attn_mask=mask.repeat(G, 1, 1, 1),
            enable_gqa=self.nkv != self.nh,
        )
        h = x.reshape(1, B * T, D) + torch.bmm(out.transpose(1, 2).reshape(G, B * T, -1), self.wo[g])
        hn = _rms(h, self.eps) * self.ffn_norm[g, None]
        f = torch.bmm(F.silu(torch.bmm(hn, self.w1[g])) * torch.bmm(hn, self.w3[g]), self.w2[g])
        return (h + f).view(G, B, T, D)

    @staticmethod
    def _bmm(x: Tensor, w: Tensor, b: Tensor | None, g: slice) -> Tensor:
        return torch.bmm(x, w[g]) if b is None else torch.baddbmm(b[g, None], x, w[g])

    def _proj_heads(self, xn, w, b, norm, g, n, B, T, cos, sin) -> Tensor:
        """Queries or keys [G * B, n, T, hd]: projected, q/k-normed, rotated (model.Attention._heads)."""
        y = self._bmm(xn, w, b, g).view(-1, B, T, n, self.hd)
        if norm is not None:
            y = _rms(y, self.eps) * norm[g, None, None, None]
        return self.apply_rope(y, cos, sin).transpose(2, 3).flatten(0, 1)


def _slots(start: list[int], T: int, device: torch.device) -> tuple[Tensor, int]:
    """Cache slots [B, T] of a T-token block that starts at slot start[b] in row b; end = 1 + the last slot."""
    slots = torch.tensor(start, device=device)[:, None] + torch.arange(T, device=device)
    return slots, max(start) + T


def _decode_mask(slots: Tensor, pad: Tensor, end: int) -> tuple[Tensor, Tensor]:
    """RoPE positions [B, T] and attention mask [B, 1, T, end] of queries at cache slots `slots` [B, T].

    A query sees its row's slots from the first non-pad one up to its own; a pad query sees itself only (no
    all-masked row, no NaN).
    """
    positions = (slots - pad[:, None]).clamp(min=0)
    k_idx, q_col = torch.arange(end, device=slots.device)[None, None], slots[:, :, None]
    visible = (k_idx >= pad[:, None, None]) & (k_idx <= q_col)
    return positions, (visible | (k_idx == q_col))[:, None]


def _read(buf: Tensor, slots: Tensor) -> Tensor:
    """buf [B, L, D] at per-row slots [B, T]: [B, T, D]."""
    return buf.gather(1, slots[:, :, None].expand(-1, -1, buf.shape[-1]))


def _write(buf: Tensor, slots: Tensor, x: Tensor) -> None:
    """Write x [B, T, D] into buf [B, L, D] at per-row slots [B, T]."""
    buf.scatter_(1, slots[:, :, None].expand(-1, -1, buf.shape[-1]), x)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _left_pad(
    model: nn.Module, prompts: list[list[int]], s: Sampling, pad_id: int
) -> tuple[Tensor, Tensor] | None:
    """Check the arguments; None when there is nothing to generate, else (ids [B, P], pad [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if s.max_new_tokens < 0 or not 0.0 < s.top_p <= 1.0 or s.temperature < 0:
        raise ValueError(
            f"generate: bad max_new_tokens={s.max_new_tokens}, top_p={s.top_p}, T={s.temperature}"
        )
    if s.max_new_tokens == 0:
        return None
    P, max_seq_len = max(len(p) for p in prompts), model.args.max_seq_len
    if P + s.max_new_tokens > max_seq_len:
        raise ValueError(
            f"generate: longest prompt {P} + max_new_tokens {s.max_new_tokens} > max_seq_len {max_seq_len}"
        )
    dev = model.output.weight.device
    pad = torch.tensor([P - len(p) for p in prompts], device=dev)
    ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=dev)
    return ids, pad


# ----------------------------------------------------------------------------------------------------------------
# Handing out tokens, and plain decoding


@dataclass
class _Rows:
    """What a decoding call has handed out, per row, and its counts."""

    s: Sampling
    out: list[list[int]]
    done: list[bool]
    stats: dict[str, Any]
    trace: dict | None

    def hand_out(self, emit: list[list[int]], p_rows: Tensor) -> None:
        """Give each row still generating its step's tokens one at a time, exactly as plain decoding would;
        p_rows [B, >= n, V]: head 1's logits behind them."""
        self.stats["forwards"] += 1
        for b in range(len(self.out)):
            if self.done[b]:
                continue
            self.done[b], n = self.s.append(self.out[b], emit[b])
            self.stats["row_forwards"] += 1
            self.stats["tokens"] += n
            if self.trace is not None:
                self.trace["p"][b].extend(p_rows[b, :n])


def _plain(model: nn.Module, ids: Tensor, pad: Tensor, rows: _Rows, gen: torch.Generator | None) -> None:
    """One token per row and forward, from head 1."""
    (B, P), s = ids.shape, rows.s
    cache = KVCache(model, pad, P + s.max_new_tokens)
    logits, pos = forward_cached(model, ids, cache, [0] * B, last=True), P
    while True:
        nxt = sample(logits[:, 0], s.temperature, s.top_p, gen)
        rows.hand_out([[t] for t in nxt.tolist()], logits)
        if all(rows.done):
            return
        logits, pos = forward_cached(model, nxt[:, None], cache, [pos] * B, last=True), pos + 1


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator | None = None) -> Tensor:
    """Next token per row of fp32 logits [..., V]: argmax at temperature 0, else a draw from `nucleus_probs`."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw(nucleus_probs(logits, temperature, top_p), gen)


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


# ----------------------------------------------------------------------------------------------------------------
# Self-speculative decoding (Stern et al. 2018's blockwise parallel decoding with the speculative-sampling rule of
# Leviathan et al. / Chen et al. 2023; Gloeckle et al. 2024 §3.2 for MTP heads)


def _speculate(model: nn.Module, ids: Tensor, pad: Tensor, rows: _Rows, gen: torch.Generator | None) -> None:
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

    While drafting, that same forward runs every head (`forward_heads`: head 1 and the extra heads as one
    batched block, `HeadStack`) at every position of the block, so the next drafts are the extra heads' logits at
    the last accepted position: one forward per step. After plain steps the extra heads catch up lazily
    (`_spec_heads`: keys/values of the slots they missed, then a short window).

    Rows keep their own lengths: each row accepts its own number of drafts and writes its next block at its
    own cache slots (per-row RoPE positions and masks). Accepting the batch minimum would also be exact but
    throws away accepted drafts of every other row, so its gain shrinks as the batch grows. A rejection
    rolls a row back by just not advancing its length: the slots past it are masked and overwritten.

    When drafting is expected not to pay (from the heads' acceptance and the measured cost of a drafting step
    over a plain one, `_DraftThrottle`), decoding goes plain for a while, with cheap one-draft probes: a model
    whose heads guess badly, or a batch so wide that a drafting step costs as much as the tokens it gains, costs
    little more than plain decoding. Stop callbacks, EOS and max_new_tokens apply token by token as in plain
    decoding: tokens a draft ran ahead with past a stop are dropped.
    """
    H, (B, P), s = model.args.n_future_tokens, ids.shape, rows.s
    # a row that finished inside a block has advanced up to H - 1 slots past its budget, and its (unused)
    # blocks keep running from there
    cache = KVCache(model, pad, P + s.max_new_tokens + 2 * H, extra_heads=H - 1)
    stack = HeadStack(model) if H > 1 else None
    length = [P] * B  # accepted slots of trunk + head 1, per row
    throttle = _DraftThrottle(H - 1, B)
    logits = forward_cached(model, ids, cache, [0] * B, last=True)
    nxt = sample(logits[:, 0], s.temperature, s.top_p, gen)  # the exact token: not in the cache yet
    rows.hand_out([[t] for t in nxt.tolist()], logits)
    ahead = None  # heads 2..H's logits [B, H-1, V] at each row's last accepted slot, from the last forward
    # a step's cost: on a CPU the process's CPU time (what other jobs on the machine do not change), else wall time
    clock = time.process_time if ids.device.type == "cpu" else time.perf_counter
    while not all(rows.done):
        t0 = clock()
        room = max(s.max_new_tokens - len(rows.out[b]) for b in range(B) if not rows.done[b]) - 1
        n_draft = min(throttle.n_drafts(), room) if room > 0 else 0
        block, n_acc = nxt[:, None], [0] * B
        steady = ahead is not None  # drafts from the last forward (else the extra heads catch up first)
        if n_draft:
            q_logits = ahead[:, :n_draft] if steady else _spec_heads(model, cache, length, n_draft, stack)
            q, drafts = _draft(q_logits, s, gen)
            block = torch.cat([block, drafts], dim=1)
            if rows.trace is not None:
                rows.trace["q"] += [
                    (b, len(rows.out[b]) - 1, q_logits[b]) for b in range(B) if not rows.done[b]
                ]
        heads = H if throttle.drafting and room > 1 else 1  # the extra heads too: the next step's drafts
        if heads > 1:
            _catch_up(model, cache, length)
            out = forward_heads(model, block, cache, length, stack, heads)
            p_rows, ahead = out[:, :, 0], out[:, :, 1:]
        else:
            p_rows, ahead = forward_cached(model, block, cache, length), None
        if n_draft:
            acc, nxt = _verify(p_rows, q, block[:, 1:], s, gen)
            n_acc = acc.tolist()
            throttle.update(_count_drafts(rows.stats, n_acc, n_draft, rows.done))
        else:
            nxt = sample(p_rows[:, 0], s.temperature, s.top_p, gen)
        toks, last = block.tolist(), nxt.tolist()
        for b in range(B):
            length[b] += 0 if rows.done[b] else 1 + n_acc[b]  # the exact token and the accepted drafts
        if ahead is not None:
            ahead = ahead[torch.arange(B, device=ahead.device), torch.tensor(n_acc, device=ahead.device)]
            cache.filled = [list(length) for _ in cache.filled]
        rows.hand_out([toks[b][1 : 1 + n_acc[b]] + [last[b]] for b in range(B)], p_rows)
        # (after .tolist(): the device has finished)
        throttle.timed(n_draft, steady and heads > 1, clock() - t0)


def _catch_up(model: nn.Module, cache: KVCache, length: list[int]) -> None:
    """Keys/values of every extra head at the slots it has not seen before each row's length (after plain
    steps), so that a forward of all heads can attend to them."""
    for k, filled in enumerate(cache.filled):
        if any(f < ln for f, ln in zip(filled, length, strict=True)):
            i = len(model.layers) + k
            _fill_kv(model, model.extra_heads[k], cache, i, filled, length)
            cache.filled[k] = list(length)


def _spec_heads(model: nn.Module, cache: KVCache, length: list[int], n: int, stack: HeadStack) -> Tensor:
    """Logits [B, n, V] of heads 2..n+1 at each row's last accepted slot length[b] - 1, when the last forward did
    not run them (after plain steps).

    The extra heads' caches are filled lazily from the trunk outputs kept in `cache.hidden`: the heads run
    together (`HeadStack`) over the last (at most SPEC_HEAD_WINDOW) slots the least recent of them has not seen;
    older unseen slots only get their keys and values (`_fill_kv`: a block's keys/values at a slot depend only on
    the trunk output there). Every row gets a window of the longest gap: a row with a shorter gap recomputes
    earlier slots from the same inputs, and writes slots past its length that stay masked until overwritten.
    """
    hidden, dev = cache.hidden, cache.pad.device
    gap = max(ln - f for k in range(n) for ln, f in zip(length, cache.filled[k], strict=True))
    W = min(max(1, gap), SPEC_HEAD_WINDOW)
    start = [max(ln - W, 0) for ln in length]
    for k in range(n):
        _fill_kv(model, model.extra_heads[k], cache, len(model.layers) + k, cache.filled[k], start)
        cache.filled[k] = list(length)
    slots, end = _slots(start, W, dev)
    positions, mask = _decode_mask(slots, cache.pad, end)
    x = _read(hidden, slots)
    cos, sin = model.rope(positions, x.dtype)
    out = stack(x, cos, sin, mask, slots, cache, 1, 1 + n)  # [n, B, W, D]
    last = torch.tensor([ln - 1 - s for ln, s in zip(length, start, strict=True)], device=dev)
    out = out[:, torch.arange(len(length), device=dev), last]  # [n, B, D]
    return model.output(model.norm(out.transpose(0, 1))).float()


def _fill_kv(
    model: nn.Module, block: nn.Module, cache: KVCache, i: int, filled: list[int], upto: list[int]
) -> None:
    """Write `block`'s (cache block i's) keys/values at slots filled[b]..upto[b]-1 of each row, from the trunk
    outputs in cache.hidden (one span of the longest gap for every row: a row with a shorter gap rewrites earlier
    slots from the same inputs, and slots from upto[b] on, which stay masked until overwritten)."""
    T = max(u - f for u, f in zip(upto, filled, strict=True))
    if T <= 0:
        return
    slots, _ = _slots([max(u - T, 0) for u in upto], T, cache.pad.device)
    cos, sin = model.rope((slots - cache.pad[:, None]).clamp(min=0), cache.hidden.dtype)
    att = block.attention
    k, v = att.project_kv(block.attention_norm(_read(cache.hidden, slots)), cos, sin)
    att.write_kv((cache.k[i], cache.v[i], slots), k, v)


def _draft(q_logits: Tensor, s: Sampling, gen: torch.Generator | None) -> tuple[Tensor | None, Tensor]:
    """Drafts [B, n] from heads 2..n+1's logits [B, n, V]: (their distributions, None when greedy; drafts)."""
    if s.temperature == 0:
        return None, q_logits.argmax(-1)
    q = nucleus_probs(q_logits, s.temperature, s.top_p)
    return q, draw(q, gen)


def _verify(
    p_logits: Tensor, q: Tensor | None, drafts: Tensor, s: Sampling, gen: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Check drafts [B, n] against head 1's logits [B, n+1, V] at [exact token, drafts]: (number of leading
    accepted drafts [B], the exact token after them [B]: the fix of the first rejected draft, else a sample of
    head 1 at the last position)."""
    n = drafts.shape[1]
    if s.temperature == 0:
        target = p_logits.argmax(-1)
        n_acc = (drafts == target[:, :n]).long().cumprod(1).sum(1)
        return n_acc, target.gather(1, n_acc[:, None])[:, 0]
    p = nucleus_probs(p_logits, s.temperature, s.top_p)
    accepted, token = speculative_accept(p[:, :n], q, drafts, gen)
    n_acc = accepted.long().cumprod(1).sum(1)
    token = torch.cat([token, draw(p[:, n:], gen)], dim=1)  # position n: every draft accepted
    return n_acc, token.gather(1, n_acc[:, None])[:, 0]


class _DraftThrottle:
    """How many tokens to draft, from the heads' acceptance and what a drafting step costs here.

    Each head's acceptance is its drafts accepted / verified, the counts of older steps decayed by SPEC_DECAY
    per drafting step and started from the pseudo-counts SPEC_PRIOR (so a wide batch, which verifies more drafts
    per step, learns faster that its heads guess badly); they give the expected number of accepted drafts per
    step, gain = r2 + r2 r3 + ...
    A drafting step hands each row 1 + gain tokens where a plain step hands 1, so drafting pays while
    1 + gain >= SPEC_MARGIN x cost, the time of a drafting step over a plain one: SPEC_COST_PRIOR, or more once measured (the
    fastest of the last SPEC_TIMES full drafting steps over the fastest plain one, at least 2 of each: machine
    load only adds time; on a CPU the process's CPU time, which other jobs change far less than wall time). A batch
    of several rows times plain steps early (when it expects fewer than SPEC_EXPLORE_BELOW x H tokens per drafting
    step) and now and then (SPEC_EXPLORE), so a batch so wide that a drafting step costs about as much as its
    tokens goes plain within a few steps (at batch 1 a drafting step costs little more than a plain one, and
    plain steps are only timed when drafting stops). While drafting pays every head drafts; otherwise none
    for 1, 2, 4, ... (at most SPEC_MAX_BACKOFF) steps between one-draft probes (only head 2 runs).
    It decides from past acceptance and timings only, never from the tokens being verified, so the output
    distribution is exact and greedy output does not depend on it; sampled draws depend on which steps drafted,
    so with a seed they repeat unless a measured cost changed a decision (wide batches, long generations).
    """

    def __init__(self, n_heads: int, batch: int):
        self.counts = [list(SPEC_PRIOR) for _ in range(n_heads)]  # (accepted, verified), decayed
        self.rate, self.backoff, self.skip = [SPEC_PRIOR[0] / SPEC_PRIOR[1]] * n_heads, 0, 0
        self.batch, self.drafts, self.exploring = batch, 0, False
        self.gain = self._gain()
        self.times: dict[str, list[float]] = {"draft": [], "plain": []}

    @property
    def drafting(self) -> bool:
        """Every head drafts at the next step (the heads run in this step's forward for it)."""
        # (this step counts as a drafting step: the next one explores when drafts + 1 says so)
        return (
            bool(self.rate)
            and self.backoff == 0
            and not self.exploring
            and not self._explore(self.drafts + 1)
        )

    def _explore(self, drafts: int) -> bool:
        """Time a plain step after this many drafting steps (a batch: SPEC_EXPLORE)."""
        first, second, every = SPEC_EXPLORE
        early = drafts in (first, second) and 1 + self.gain < SPEC_EXPLORE_BELOW * (1 + len(self.rate))
        return self.batch > 1 and (early or (drafts > 0 and drafts % every == 0))

    def cost(self) -> float:
        d, p = self.times["draft"], self.times["plain"]
        return max(SPEC_COST_PRIOR, min(d) / min(p) if len(d) >= 2 and len(p) >= 2 else 0.0)

    def n_drafts(self) -> int:
        if self.skip:
            self.skip -= 1
            return 0
        if self.backoff == 0 and self._explore(self.drafts):
            self.exploring = True
            return 0
        return len(self.rate) if self.backoff == 0 else min(1, len(self.rate))

    def update(self, step_counts: list[tuple[int, int]]) -> None:
        """Count a drafting step's (accepted, verified) drafts per drafting head and decide the next steps."""
        for i, (a, v) in enumerate(step_counts):
            if v:  # (a head behind a rejection is not verified: nothing learnt about it)
                c = self.counts[i]
                c[0], c[1] = SPEC_DECAY * c[0] + a, SPEC_DECAY * c[1] + v
                self.rate[i] = c[0] / c[1]
        self.gain = self._gain()
        pays = 1 + self.gain >= SPEC_MARGIN * self.cost()
        self.backoff = 0 if pays else min(max(2 * self.backoff, 1), SPEC_MAX_BACKOFF)
        self.skip = self.backoff

    def _gain(self) -> float:
        """Expected accepted drafts per full drafting step: r2 + r2 r3 + ..."""
        return sum(math.prod(self.rate[: i + 1]) for i in range(len(self.rate)))

    def timed(self, n_draft: int, steady: bool, seconds: float) -> None:
        """Count a step and keep its wall time: a plain step's, and a full drafting step's when it was steady
        (its drafts came from the previous forward and its forward ran every head for the next ones)."""
        if n_draft == 0:
            self.times["plain"] = [*self.times["plain"][1 - SPEC_TIMES :], seconds]
        elif n_draft == len(self.rate) and steady:
            self.times["draft"] = [*self.times["draft"][1 - SPEC_TIMES :], seconds]
        if self.exploring or n_draft == len(self.rate):
            self.drafts += 1
        self.exploring = False


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def _new_stats(n_extra_heads: int) -> dict[str, Any]:
    return {"tokens": 0, "forwards": 0, "row_forwards": 0, "draft_steps": 0,
            "drafted": [0] * n_extra_heads, "accepted": [0] * n_extra_heads}  # fmt: skip


def _count_drafts(stats: dict, n_acc: list[int], n_draft: int, done: list[bool]) -> list[tuple[int, int]]:
    """Count per head the drafts verified (every earlier draft accepted) and accepted, over the rows still
    generating; returns this step's (accepted, verified) per drafting head."""
    stats["draft_steps"] += 1
    verified, accepted = [0] * n_draft, [0] * n_draft
    for a in (a for a, d in zip(n_acc, done, strict=True) if not d):
        for i in range(min(a + 1, n_draft)):
            verified[i] += 1
            accepted[i] += int(i < a)
    for i in range(n_draft):
        stats["drafted"][i] += verified[i]
        stats["accepted"][i] += accepted[i]
    return list(zip(accepted, verified, strict=True))


def speculative_summary(*stats: dict) -> dict:
    """Sum the counts of `decode` statistics (of one or several calls) and add their ratios: tokens_per_forward,
    and acceptance per extra head (None where no draft was verified)."""
    out = {k: sum(s[k] for s in stats) for k in ("tokens", "forwards", "row_forwards", "draft_steps")}
    for k in ("drafted", "accepted"):  # one count per extra head
        out[k] = [sum(c) for c in zip(*(s[k] for s in stats), strict=True)]
    out["tokens_per_forward"] = out["tokens"] / max(out["row_forwards"], 1)
    out["acceptance"] = [a / d if d else None for a, d in zip(out["accepted"], out["drafted"], strict=True)]
    return out
