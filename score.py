"""Token-importance scorers: `scorer(batch, state) -> weights [B, S, H]` (spec §3).

One weight per (position t, head k) pair; head k (0-based) at position t predicts `input_ids[t + k + 1]`, so a
pair's score is the score of its TARGET position j = t + k + 1. Weights are detached float32, exactly 0 where
`batch["valid"]` is False, mean 1 over the valid pairs of each sequence and head (`loss.normalize = "head"`, the
default) or of each sequence, all heads together (`"sequence"`, the ablation).

- `uniform`: 1 on every valid pair (plain MTP).
- `critic_delta_v1` (§3.2): reward model (or sandbox tests) -> value head on the detached trunk output, fitted with
  GAE targets -> delta_j = V_j - V_{j-1} -> `normalize_weights`.
- `rho1_excess_v1` (§3.3): excess loss CE_k(t) - CE_ref(t + k + 1) against a frozen reference -> weighted or
  select mode. With the per-head scope, head k's weights need only head k's CE, so the trainer computes them
  inside its head-by-head step (`head_by_head`) instead of paying an extra pass over the heads.

The pure functions (`normalize_weights`, `clip_normalize`, `gae_returns`, `mix`, `weight_stats`, `rho1_weights`)
need no model; the trainer uses `init_state`, `prepare`, `SCORERS`, `head_by_head`, `mix`,
`save_weight_histogram`, and `begin_step` / `rollback_step` / `end_step` around each optimizer step (so an OOM
retry or a skipped step leaves no trace in the scorer's state).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import parallel as P
import s3cache
from errors import UserError
from files import atomic_write
from model import pair_scores


class ScoreError(UserError, ValueError):
    """A scorer cannot be set up (a missing or mismatched reference / reward model): the message says which key."""


STD_EPS = 1e-6  # spec §3.1 step 2: z = (s - mean) / (std + 1e-6)
BISECT_ITERS = 100  # log c bracket halves 100 times: far below 1e-6 for any realistic bracket width
HIST_BINS = 60

# --------------------------------------------------------------------------- the normaliser (spec §3.1)


def _check_norm_args(temperature: float, eps: float, w_max: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"normalize_weights: temperature must be a finite number > 0, got {temperature!r}")
    if not (0 < eps <= 1 <= w_max and math.isfinite(w_max)):
        raise ValueError(
            f"normalize_weights: need 0 < eps <= 1 <= w_max < inf, got eps={eps!r}, w_max={w_max!r}"
        )


SCOPES = ("head", "sequence")  # loss.normalize: which pairs one normalisation runs over (spec §3.1)


def _rows(scores: Tensor, valid: Tensor, scope: str) -> tuple[Tensor, Tensor]:
    """[B, ...] -> [R, N] float64 scores and bool mask, one row per normalisation group.

    scope "sequence": a row is a sequence's pairs ([B, ...] flattened per b). scope "head": the last axis is the
    head axis ([B, S, H]), and a row is one head of one sequence ([B * H, S]). Inputs with fewer than 3 axes have
    no head axis, so both scopes normalise each row (a 1-D input is one row).
    """
    if scope not in SCOPES:
        raise ValueError(f"normalisation scope must be one of {SCOPES} (loss.normalize), got {scope!r}")
    if scores.shape != valid.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must have the same shape"
        )
    if scores.ndim == 0:
        raise ValueError("scores must have at least one dimension (rows are sequences)")
    s, v = scores.detach(), valid.detach().bool()
    if s.ndim == 1:
        s, v = s[None], v[None]
    elif scope == "head" and s.ndim >= 3:  # [B, S, H] -> [B * H, S]: a (sequence, head) group per row
        s, v = s.movedim(-1, 1).flatten(0, 1), v.movedim(-1, 1).flatten(0, 1)
    return s.reshape(s.shape[0], -1).to(torch.float64), v.reshape(v.shape[0], -1)


def _unrows(w: Tensor, shape: torch.Size, scope: str) -> Tensor:
    """Inverse of `_rows` for the weights: [R, N] -> the input's shape."""
    if scope == "head" and len(shape) >= 3:
        return w.reshape(shape[0], shape[-1], *shape[1:-1]).movedim(1, -1)
    return w.reshape(shape)


def _standardize(s: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, int]:
    """Steps 1-2 on rows [B, N] (float64). Returns (z, flat, nonfinite): `flat` rows get weight 1.

    Each row is first divided by its largest finite |score| (and the 1e-6 by the same factor), which is the same
    z in exact arithmetic but keeps 1e300-sized scores finite and makes a constant row exactly constant.
    """
    finite = valid & torch.isfinite(s)
    nonfinite = int((valid & ~finite).sum())
    n = valid.sum(1)
    n_fin = finite.sum(1)
    scale = torch.where(finite, s.abs(), 0.0).amax(1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s = torch.where(finite, s / scale[:, None], 0.0)
    mean = s.sum(1) / n_fin.clamp(min=1)
    s = torch.where(finite, s, mean[:, None])  # non-finite (and invalid) -> the row mean of the finite scores
    hi = torch.where(finite, s, -math.inf).amax(1)
    lo = torch.where(finite, s, math.inf).amin(1)
    flat = (n_fin == 0) | (n <= 1) | (hi <= lo)
    dev = torch.where(valid, s - mean[:, None], 0.0)
    std = (dev.square().sum(1) / n.clamp(min=1)).sqrt()  # population std over the n valid pairs
    z = dev / (std + STD_EPS / scale)[:, None]
    z = torch.where(valid & ~flat[:, None], z, 0.0)
    return z, flat, nonfinite


def _log_weights(z: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """Step 3 in log space: log(softmax(z / T) * n) over the valid pairs of each row (0 elsewhere)."""
    x = torch.where(valid, z / temperature, -math.inf)
    lse = torch.logsumexp(x, 1, keepdim=True)
    n = valid.sum(1, keepdim=True).clamp(min=1).to(z.dtype)
    return torch.where(valid, x - torch.where(torch.isfinite(lse), lse, 0.0) + n.log(), 0.0)


def clip_normalize(
    log_w: Tensor, valid: Tensor, eps: float, w_max: float, iters: int = BISECT_ITERS
) -> Tensor:
    """Step 4: w = clip(c * w, eps, w_max) with mean 1 over each row's valid pairs; bisection on log c.

    `log_w` [B, N] (log of positive raw weights, any finite values on valid pairs). mean(clip(c w)) is
    continuous and non-decreasing in log c; it is eps (<= 1) at log c = log eps - max log w and w_max (>= 1) at
    log w_max - min log w, so that bracket always holds the root, even when it is degenerate (eps = w_max = 1,
    or all w equal). Returns float64 [B, N], 0 on invalid pairs.
    """
    log_w = log_w.to(torch.float64)
    any_valid = valid.any(1)
    top = torch.where(valid, log_w, -math.inf).amax(1)
    bottom = torch.where(valid, log_w, math.inf).amin(1)
    top = torch.where(any_valid, top, 0.0)
    bottom = torch.where(any_valid, bottom, 0.0)
    lo, hi = math.log(eps) - top, math.log(w_max) - bottom
    n = valid.sum(1).clamp(min=1).to(torch.float64)

    def clipped(log_c: Tensor) -> Tensor:
        return torch.where(valid, (log_w + log_c[:, None]).exp().clamp(eps, w_max), 0.0)

    for _ in range(iters):
        mid = (lo + hi) / 2
        below = clipped(mid).sum(1) / n < 1.0
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return clipped((lo + hi) / 2)


def _finish(w: Tensor, valid: Tensor, eps: float, w_max: float, shape: torch.Size, scope: str) -> Tensor:
    """float64 rows -> float32 in the input's shape, the float32 bounds nudged inside [eps, w_max]; exactly 0 on
    invalid pairs."""
    lo = torch.tensor(eps, dtype=torch.float32)
    if lo.item() < eps:
        lo = torch.nextafter(lo, torch.tensor(math.inf))
    hi = torch.tensor(w_max, dtype=torch.float32)
    if hi.item() > w_max:
        hi = torch.nextafter(hi, torch.tensor(-math.inf))
    w = w.to(torch.float32).clamp(lo.item(), hi.item())
    return _unrows(torch.where(valid, w, 0.0), shape, scope)


def normalize_weights(
    scores: Tensor,
    valid: Tensor,
    temperature: float,
    eps: float,
    w_max: float,
    stats: dict | None = None,
    *,
    scope: str = "head",
) -> Tensor:
    """Spec §3.1 on each normalisation group of `scores` [B, S, H]. Returns float32 weights of the same shape.

    scope "head" (default): each head of each sequence on its own, so every head's mean weight is 1 and weights
    move emphasis between tokens, never between heads. scope "sequence": all valid pairs of a sequence together.
    Non-finite valid scores take the group mean of the finite ones (their count goes to `stats["nonfinite"]`
    when a dict is passed); groups with no finite score, one valid pair or zero variance get 1. Then z-score
    (population std + 1e-6), log w = z/T - logsumexp(z/T) + log n, and clip-normalise to mean 1 in [eps, w_max].
    """
    _check_norm_args(temperature, eps, w_max)
    s, v = _rows(scores, valid, scope)
    z, flat, nonfinite = _standardize(s, v)
    w = clip_normalize(_log_weights(z, v, temperature), v, eps, w_max)
    w = torch.where(flat[:, None] & v, 1.0, w)
    if stats is not None:
        stats["nonfinite"] = stats.get("nonfinite", 0) + nonfinite
    return _finish(w, v, eps, w_max, scores.shape, scope)


def _top_mask(z: Tensor, valid: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """The k = max(1, round(p n)) highest-scoring valid pairs of each row (ties: earlier flat index first)."""
    n = valid.sum(1)
    k = torch.clamp(torch.round(top_p * n.to(torch.float64)), min=1).to(n.dtype)
    order = torch.sort(torch.where(valid, z, -math.inf), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(z.shape[1], device=z.device).expand_as(order)
    )
    return valid & (rank < k[:, None]), k


def rho1_weights(
    scores: Tensor,
    valid: Tensor,
    temperature: float,
    eps: float,
    w_max: float,
    mode: str = "weighted",
    top_p: float = 0.2,
    top_boost: float = 1.0,
    stats: dict | None = None,
    *,
    scope: str = "head",
) -> Tensor:
    """Spec §3.3 weighting of raw scores [B, S, H] per normalisation group (`scope` as in `normalize_weights`;
    with "head", select mode picks the top max(1, round(p n_k)) pairs of each head).

    weighted: softmax(z/T) * n, the top-p pairs multiplied by (1 + top_boost), then clip-normalise (§3.1 step 4).
    select: the k = max(1, round(p n)) top pairs get a = (n - (n - k) eps) / k, the rest eps; a row whose a
    exceeds w_max (k/n rounds below p) is clip-normalised instead so the [eps, w_max] / mean-1 invariants hold.
    Rows that §3.1 step 1 calls degenerate (no finite score, one pair, zero variance) get 1 in both modes.
    """
    _check_norm_args(temperature, eps, w_max)
    if mode not in ("weighted", "select"):
        raise ValueError(f"rho1.mode must be 'weighted' or 'select', got {mode!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"rho1.top_p must be in (0, 1], got {top_p!r}")
    s, v = _rows(scores, valid, scope)
    z, flat, nonfinite = _standardize(s, v)
    top, k = _top_mask(z, v, top_p)
    if mode == "weighted":
        log_w = _log_weights(z, v, temperature) + torch.where(top, math.log1p(top_boost), 0.0)
        w = clip_normalize(log_w, v, eps, w_max)
    else:
        n = v.sum(1).to(torch.float64)
        kf = k.to(torch.float64)
        a = (n - (n - kf) * eps) / kf
        w = torch.where(top, a[:, None], eps)
        over = a > w_max
        if bool(over.any()):
            w = torch.where(over[:, None], clip_normalize(w.clamp(min=eps).log(), v, eps, w_max), w)
        w = torch.where(v, w, 0.0)
    w = torch.where(flat[:, None] & v, 1.0, w)
    if stats is not None:
        stats["nonfinite"] = stats.get("nonfinite", 0) + nonfinite
    return _finish(w, v, eps, w_max, scores.shape, scope)


# --------------------------------------------------------------------------- GAE, mixing, statistics


def gae_returns(
    rewards: Tensor, values: Tensor, valid: Tensor, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """GAE over the valid positions of each row [B, S], in order, skipping invalid ones (spec §3.2).

    delta_i = r_i + gamma V_next - V_i (V after the last valid position = 0), A_i = sum_l (gamma lambda)^l
    delta_{i+l}, returns = A + V. Both 0 on invalid positions; no gradient.
    """
    out_dtype = torch.promote_types(rewards.dtype, values.dtype)
    r, v, m = rewards.detach().double(), values.detach().double(), valid.bool()
    B, S = r.shape
    order = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices  # valid positions first, in order
    cm, cr, cv = m.gather(1, order), r.gather(1, order), v.gather(1, order)
    cr, cv = torch.where(cm, cr, 0.0), torch.where(cm, cv, 0.0)
    v_next = torch.cat([cv[:, 1:], cv.new_zeros(B, 1)], 1)
    delta = torch.where(cm, cr + gamma * v_next - cv, 0.0)
    i = torch.arange(S, device=r.device)
    lag = i[:, None] - i[None, :]  # [j, i]: j - i
    decay = torch.where(lag >= 0, (gamma * gae_lambda) ** lag.clamp(min=0).double(), 0.0)
    adv_c = delta @ decay  # A_i = sum_{j >= i} (gamma lambda)^(j - i) delta_j
    ret_c = torch.where(cm, adv_c + cv, 0.0)
    adv = torch.zeros_like(r).scatter_(1, order, adv_c)
    ret = torch.zeros_like(r).scatter_(1, order, ret_c)
    return adv.to(out_dtype), ret.to(out_dtype)


def mix(weights: Tensor, lam: float, valid: Tensor | None = None) -> Tensor:
    """w~ = 1 + lam (w - 1) on valid pairs, 0 elsewhere (spec §2). Without `valid`, weight 0 means invalid."""
    v = (weights != 0) if valid is None else valid.bool()
    return torch.where(v, 1.0 + lam * (weights - 1.0), torch.zeros_like(weights))


def weight_stats(weights: Tensor, valid: Tensor, eps: float, w_max: float) -> dict[str, float]:
    """Log values over the valid pairs (any shape): mean, std, min, max, fraction at eps / at w_max, nonfinite."""
    w = weights.detach()[valid.bool()].double()
    fin = w[torch.isfinite(w)]
    out = {"weights/nonfinite": float(w.numel() - fin.numel()), "weights/count": float(w.numel())}
    if fin.numel() == 0:
        return out | {
            f"weights/{k}": 0.0 for k in ("mean", "std", "min", "max", "frac_at_eps", "frac_at_wmax")
        }
    tol = 1e-5
    out.update(
        {
            "weights/mean": float(fin.mean()),
            "weights/std": float(fin.std(unbiased=False)),
            "weights/min": float(fin.min()),
            "weights/max": float(fin.max()),
            "weights/frac_at_eps": float((fin <= eps * (1 + tol)).double().mean()),
            "weights/frac_at_wmax": float((fin >= w_max * (1 - tol)).double().mean()),
        }
    )
    return out


def head_means(weights: Tensor, valid: Tensor) -> dict[str, float]:
    """`weights/mean_head{k}` (k from 1): the mean weight of each head's valid pairs, weights [..., H].

    The normaliser makes the mean 1 over a sequence's pairs of ALL heads together, so a scorer that moves weight
    from one head to another (rather than between tokens) shows here and nowhere else.
    """
    w = weights.detach().double()
    v = (valid.bool() & torch.isfinite(w)).flatten(0, -2)
    n, total = v.sum(0), torch.where(v, w.flatten(0, -2), 0.0).sum(0)
    return {f"weights/mean_head{k + 1}": float(total[k] / n[k]) if n[k] else 0.0 for k in range(w.shape[-1])}


def score_histogram(weights: Tensor, valid: Tensor, edges: Tensor) -> Tensor:
    """Counts of the valid weights in the bins of `edges` (values past the last edge land in the last bin)."""
    w = weights.detach()[valid.bool()].to(edges.dtype)
    w = w[torch.isfinite(w)]
    idx = (torch.bucketize(w, edges, right=True) - 1).clamp(0, edges.numel() - 2)
    return torch.bincount(idx, minlength=edges.numel() - 1).to(torch.float64)


# --------------------------------------------------------------------------- state


class ValueHead(nn.Module):
    """V(prefix) from the detached trunk output: Linear-GELU-Linear to a scalar, always float32."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h.float()).squeeze(-1)


@dataclass
class ScorerState:
    """What a scorer needs between calls. The trainer sets `hidden` (detached trunk output) before each call."""

    cfg: Any
    model: nn.Module | None = None
    tokenizer: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dataset: Any = None  # the tokenised train split (rows with input_ids, loss_mask, index, task_id)
    hidden: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # log values of the last call
    # critic_delta_v1
    value_head: ValueHead | None = None
    value_opt: torch.optim.Optimizer | None = None
    rewards: dict[int, float] = field(default_factory=dict)  # raw reward per example (batch["index"])
    reward_norm: tuple[float, float] | None = None  # (mean, std) over the whole train set, once known
    reward_model: Any = None
    reward_tokenizer: Any = None
    reward_dir: Path | None = None
    problems: dict[int, dict] | None = None  # MBPP problems by task_id (reward "tests")
    # rho1_excess_v1
    ref_model: nn.Module | None = None
    ref_is_hf: bool = False
    ref_dir: Path | None = None
    ref_ce: dict[int, Tensor] = field(default_factory=dict)  # CE_ref per position, per example (precompute)
    ref_cache_ready: bool = False
    # train.aux_models = "shard" under torchrun: the reference / reward model is FSDP2-sharded, so every forward
    # is a collective that all ranks make together (see _split_map and the lazy paths)
    aux_sharded: bool = False
    # weight histogram over the whole run, per head: counts [H, HIST_BINS], and the exact sums [H] (run means)
    hist_edges: Tensor | None = None
    hist_counts: Tensor | None = None
    head_sums: Tensor | None = None
    calls: int = 0
    value_count: float = 0.0  # completion positions whose value loss is accumulated in the value head's grads
    step_start: tuple | None = (
        None  # (histogram, head sums, calls) when the optimizer step began (begin_step)
    )

    def state_dict(self) -> dict:
        """What a resumed run needs: value head + optimiser, cached rewards and their statistics, histogram."""
        return {
            "scorer": self.cfg.loss.scorer,
            "value_head": None if self.value_head is None else self.value_head.state_dict(),
            "value_opt": None if self.value_opt is None else self.value_opt.state_dict(),
            "rewards": dict(self.rewards),
            "reward_norm": self.reward_norm,
            "hist_counts": None if self.hist_counts is None else self.hist_counts.cpu(),
            "head_sums": None if self.head_sums is None else self.head_sums.cpu(),
            "calls": self.calls,
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("scorer", self.cfg.loss.scorer) != self.cfg.loss.scorer:
            raise ValueError(
                f"scorer state was saved by loss.scorer = {sd['scorer']!r} but this run uses "
                f"{self.cfg.loss.scorer!r}: resume with the same scorer"
            )
        if self.value_head is not None and sd.get("value_head") is not None:
            self.value_head.load_state_dict(sd["value_head"])
            if self.value_opt is not None and sd.get("value_opt") is not None:
                self.value_opt.load_state_dict(sd["value_opt"])
        self.rewards = {int(k): float(v) for k, v in sd.get("rewards", {}).items()}
        self.reward_norm = None if sd.get("reward_norm") is None else tuple(sd["reward_norm"])
        for name in ("hist_counts", "head_sums"):
            mine, saved = getattr(self, name), sd.get(name)
            if saved is not None and mine is not None:
                if saved.shape != mine.shape:
                    raise ValueError(f"scorer state: {name} {tuple(saved.shape)} != {tuple(mine.shape)} here")
                setattr(self, name, saved.to(mine.device, torch.float64))
        self.calls = int(sd.get("calls", 0))


def _log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"score: {msg}", flush=True)


def _model_dim(model: nn.Module) -> int:
    """The trunk width, also through a peft wrapper."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        args = getattr(m, "args", None)
        if args is not None:
            return int(args.dim)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.tok_embeddings
    return int(emb.weight.shape[1])


def init_state(cfg: Any, model: nn.Module, tokenizer: Any, device: Any, dataset: Any = None) -> ScorerState:
    """Build what `cfg.loss.scorer` needs: value head + AdamW (critic), the frozen reference model (rho1).

    The reward model is loaded lazily (only while rewards are missing) so it holds no memory once every
    training example has its cached reward.
    """
    name = cfg.loss.scorer
    if name not in SCORERS:
        raise ScoreError(f"{cfg.source}: 'loss.scorer' = {name!r}; expected one of {', '.join(SCORERS)}")
    dev = torch.device(device)
    w_top = max(float(cfg.loss.w_max), 1.0)
    edges = torch.linspace(0.0, w_top, HIST_BINS + 1, dtype=torch.float64, device=dev)
    state = ScorerState(cfg, model, tokenizer, dev, dataset, hist_edges=edges)
    H = cfg.model.n_future_tokens
    state.hist_counts = torch.zeros(H, HIST_BINS, dtype=torch.float64, device=dev)
    state.head_sums = torch.zeros(H, dtype=torch.float64, device=dev)
    state.aux_sharded = P.Dist().enabled and cfg.train.aux_models == "shard"  # under torchrun, any world size
    if name == "critic_delta_v1":
        _init_critic(state)
    elif name == "rho1_excess_v1":
        _init_rho1(state)
    return state


def prepare(state: ScorerState, loader: Iterator[dict] | None) -> None:
    """Before training: critic rewards up front (when the train set is known) and stage 1 value-head fitting;
    rho1 reference-CE precompute (`rho1.precompute`); nothing for uniform."""
    name = state.cfg.loss.scorer
    if name == "critic_delta_v1":
        _prepare_critic(state, loader)
    elif name == "rho1_excess_v1" and state.cfg.rho1.precompute:
        _ensure_ref_cache(state)


def _record(state: ScorerState, weights: Tensor, valid: Tensor, extra: dict[str, float]) -> Tensor:
    """Per-call log values + the run's weight histogram; returns the weights detached."""
    c = state.cfg.loss
    state.metrics = {**weight_stats(weights, valid, c.eps, c.w_max), **head_means(weights, valid), **extra}
    if state.hist_edges is not None:
        H, edges = weights.shape[-1], state.hist_edges
        counts = torch.stack([score_histogram(weights[..., k], valid[..., k], edges) for k in range(H)])
        v = valid.bool() & torch.isfinite(weights)
        sums = torch.where(v, weights.double(), 0.0).flatten(0, -2).sum(0).to(edges.device)
        state.hist_counts = counts if state.hist_counts is None else state.hist_counts + counts
        state.head_sums = sums if state.head_sums is None else state.head_sums + sums
    state.calls += 1
    return weights.detach()


def begin_step(state: ScorerState) -> None:
    """An optimizer step starts: remember the run's histogram and per-head sums, drop any value-head gradient."""
    state.step_start = tuple(None if t is None else t.clone() for t in (state.hist_counts, state.head_sums))
    state.step_start += (state.calls,)
    _clear_value_grads(state)


def rollback_step(state: ScorerState) -> None:
    """The step's work is thrown away (an OOM retry, a skipped non-finite step): histogram, per-head sums and call
    count go back to `begin_step`'s, the accumulated value-head gradient is dropped. A retried step then leaves
    exactly the trace of an uninterrupted one."""
    if state.step_start is not None:
        hist, sums, state.calls = state.step_start
        state.hist_counts = None if hist is None else hist.clone()
        state.head_sums = None if sums is None else sums.clone()
    _clear_value_grads(state)


def end_step(state: ScorerState) -> None:
    """The optimizer step was taken: the critic's value head takes its one step of this optimizer step."""
    if state.value_head is not None and state.cfg.critic.update_value_head:
        _value_step(state)


def _valid(batch: dict) -> Tensor:
    if "valid" not in batch or "targets" not in batch:
        raise KeyError("scorer: batch needs 'targets' and 'valid' [B, S, H] (from model.mtp_targets)")
    return batch["valid"].bool()


# --------------------------------------------------------------------------- uniform


def uniform(batch: dict, state: ScorerState) -> Tensor:
    """Plain MTP: weight 1 on every valid pair."""
    valid = _valid(batch)
    return _record(state, valid.to(torch.float32), valid, {"scorer/nonfinite": 0.0})


# --------------------------------------------------------------------------- critic_delta_v1 (spec §3.2)


def _init_critic(state: ScorerState) -> None:
    cfg, cc = state.cfg, state.cfg.critic
    with torch.random.fork_rng(devices=[]):  # same head on every rank, training RNG stream untouched
        torch.manual_seed(int(cfg.train.seed))
        state.value_head = ValueHead(_model_dim(state.model), cc.value_hidden).to(state.device)
    state.value_opt = torch.optim.AdamW(state.value_head.parameters(), lr=cc.value_lr)
    if cc.reward == "model":
        if not cc.reward_model and not cc.reward_resource:
            raise ScoreError(
                f"{cfg.source}: critic.reward = 'model' needs 'critic.reward_model' (an HF sequence-classification "
                "checkpoint directory with one label) or 'critic.reward_resource'"
            )
        state.reward_dir = s3cache.resolve_model(cfg, "reward")
        if not (state.reward_dir / "config.json").is_file():
            raise ScoreError(
                f"{cfg.source}: 'critic.reward_model' = {str(state.reward_dir)!r} has no config.json "
                "(expected an HF AutoModelForSequenceClassification checkpoint)"
            )
    elif cc.reward not in ("tests", "dataset"):
        raise ScoreError(
            f"{cfg.source}: 'critic.reward' = {cc.reward!r}; expected 'model', 'tests' or 'dataset'"
        )


def _aux_dtype(state: ScorerState) -> torch.dtype:
    bf16 = state.device.type == "cuda" and state.cfg.model.dtype == "bfloat16"
    return torch.bfloat16 if bf16 else torch.float32


def _place_aux(state: ScorerState, m: nn.Module) -> nn.Module:
    """A frozen reference / reward model onto the device: whole on every rank (`train.aux_models = "replicate"`)
    or FSDP2-sharded over the ranks ("shard" under torchrun; each forward is then a collective)."""
    m = m.eval().requires_grad_(False)
    if not state.aux_sharded:
        return m.to(state.device)
    total = sum(p.numel() for p in m.parameters())
    P.shard_frozen(m, P.aux_blocks(m), _aux_dtype(state) == torch.bfloat16, state.device)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in m.parameters())
    _log(
        f"{type(m).__name__} FSDP2-sharded over {P.rank_world()[1]} ranks: {local} of {total} parameters here"
    )
    return m


def _rounds(state: ScorerState, n: int) -> int:
    """How many forwards this rank makes for its `n` chunks: the busiest rank's count when the model is sharded."""
    if not state.aux_sharded:
        return n
    return int(P.all_reduce(torch.tensor([n], device=state.device), "max").item())


def _split_map(state: ScorerState, items: list, size: int, run: Callable[[list], list]) -> list:
    """`P.split_map` over the whole train set (the same `items` on every rank). With a sharded model a rank out of
    chunks calls run([]) (an idle forward), so every rank makes the same number of forwards."""
    return P.split_map(items, size, run, idle=(lambda: run([])) if state.aux_sharded else None)


def _load_reward_model(state: ScorerState) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = state.reward_dir
    tok = AutoTokenizer.from_pretrained(str(d))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ScoreError(f"reward model tokenizer {d} has neither pad_token nor eos_token: set one")
        tok.pad_token = tok.eos_token
    rm = AutoModelForSequenceClassification.from_pretrained(str(d), dtype=_aux_dtype(state))
    if rm.config.num_labels != 1:
        raise ScoreError(
            f"reward model {d}: expected num_labels = 1 (a scalar reward), got {rm.config.num_labels}"
        )
    if rm.config.pad_token_id is None:  # HF finds the last real token of each row through it
        rm.config.pad_token_id = tok.pad_token_id
    state.reward_model = _place_aux(state, rm)
    state.reward_tokenizer = tok


def _free_reward_model(state: ScorerState) -> None:
    state.reward_model = None
    if state.device.type == "cuda":
        torch.cuda.empty_cache()


def _texts(tokenizer: Any, ids: list[int], mask: list[bool]) -> tuple[str, str]:
    """(prompt + completion, completion) decoded with the base tokenizer, special tokens and padding dropped."""
    last = max((j for j, m in enumerate(mask) if m), default=len(ids) - 1)
    full = tokenizer.decode(ids[: last + 1], skip_special_tokens=True)
    completion = tokenizer.decode([t for t, m in zip(ids, mask, strict=False) if m], skip_special_tokens=True)
    return full, completion


@torch.no_grad()
def _rm_forward(state: ScorerState, texts: list[str]) -> list[float]:
    """One reward-model forward: a scalar per text, with its own tokenizer (re-tokenised from text).

    No texts: a 1-token forward whose output is dropped (a rank's share of a sharded model's collective forward).
    """
    if state.reward_model is None:
        _load_reward_model(state)
    tok, rm = state.reward_tokenizer, state.reward_model
    if not texts:
        ids = torch.tensor([[tok.pad_token_id]], device=state.device)
        rm(input_ids=ids, attention_mask=torch.ones_like(ids))
        return []
    limit = min(int(tok.model_max_length), int(getattr(rm.config, "max_position_embeddings", 1 << 30)))
    enc = tok(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    logits = rm(**{k: v.to(state.device) for k, v in enc.items()}).logits
    return logits[:, 0].float().cpu().tolist()


def _rm_rewards(state: ScorerState, texts: list[str]) -> list[float]:
    """This rank's texts in chunks of `critic.reward_batch_size` (sharded: the busiest rank's forward count)."""
    bs = state.cfg.critic.reward_batch_size
    chunks = [texts[i : i + bs] for i in range(0, len(texts), bs)]
    rounds = _rounds(state, len(chunks))
    return [v for r in range(rounds) for v in _rm_forward(state, chunks[r] if r < len(chunks) else [])]


def _check_task_ids(state: ScorerState, task_ids: list[int]) -> None:
    """Load the MBPP problems once; every task id must be one of them."""
    if state.problems is None:
        import data

        state.problems = data.load_mbpp(data.resolve_dataset_dir(state.cfg))
    for tid in task_ids:
        if tid not in state.problems:
            raise KeyError(
                f"critic.reward = 'tests': task_id {tid} is not an MBPP problem (packed rows have -1)"
            )


def _test_rewards(state: ScorerState, completions: list[str], task_ids: list[int]) -> list[float]:
    """1.0 when the completion passes its MBPP problem's tests in the sandbox, else 0.0 (parallel sandboxes)."""
    _check_task_ids(state, task_ids)
    import sandbox  # lazily: sandboxes are only needed for this reward
    from evaluate import judge_completion

    timeout = float(state.cfg.eval.timeout)

    def one(j: int) -> float:
        return float(judge_completion("mbpp", state.problems[task_ids[j]], completions[j], timeout)["passed"])

    return sandbox.map_parallel(one, list(range(len(task_ids))), state.cfg.eval.workers)


def _compute_rewards(
    state: ScorerState, rows: list[tuple[int, list[int], list[bool], int]], split: bool = False
) -> None:
    """Raw rewards for (index, input_ids, loss_mask, task_id) rows into the cache.

    split: the rows are the same on every rank (the train set): each rank scores its share (`_split_map`).
    """
    texts = [_texts(state.tokenizer, ids, mask) for _, ids, mask, _ in rows]
    if state.cfg.critic.reward == "model":
        fulls = [full for full, _ in texts]
        if split:
            bs = state.cfg.critic.reward_batch_size
            values = _split_map(state, fulls, bs, lambda c: _rm_forward(state, c))
        else:
            values = _rm_rewards(state, fulls)
    else:
        jobs = [(comp, tid) for (_, comp), (*_, tid) in zip(texts, rows, strict=True)]
        _check_task_ids(state, [tid for _, tid in jobs])  # on every rank, before the work is split

        def run(c: list) -> list[float]:
            return _test_rewards(state, [comp for comp, _ in c], [tid for _, tid in c])

        share = max(1, math.ceil(len(jobs) / P.rank_world()[1]))  # one sandbox pool per rank
        values = _split_map(state, jobs, share, run) if split else run(jobs)
    state.rewards.update({int(i): float(v) for (i, *_), v in zip(rows, values, strict=True)})


def _dataset_rows(ds: Any) -> list[tuple[int, list[int], list[bool], int]]:
    cols = ds if isinstance(ds, dict) else ds[:]
    return list(
        zip(
            [int(i) for i in cols["index"]],
            [list(r) for r in cols["input_ids"]],
            [list(m) for m in cols["loss_mask"]],
            [int(t) for t in cols["task_id"]],
            strict=True,
        )
    )


def _all_rewards(state: ScorerState) -> None:
    """Every training example's reward up front, z-scored over the whole train set; then free the model."""
    if state.cfg.critic.reward == "dataset":  # stored with each example (the synthetic benchmark's)
        state.rewards.update(_stored_rewards(state.dataset))
    rows = [r for r in _dataset_rows(state.dataset) if r[0] not in state.rewards]
    if rows:
        _log(f"rewards ({state.cfg.critic.reward}) for {len(rows)} training examples")
        _compute_rewards(state, rows, split=True)
    vals = torch.tensor(list(state.rewards.values()), dtype=torch.float64)
    _free_reward_model(state)
    check_reward_spread(vals, state.cfg.critic.reward)
    state.reward_norm = (float(vals.mean()), float(vals.std(unbiased=False))) if vals.numel() else (0.0, 1.0)


class RewardError(ValueError):
    """The critic's rewards cannot rank the training examples (the message says why and what to use instead)."""


REWARD_MIN_SPREAD = 1e-4  # std / max(1, |mean|) below this is rounding of one value, not a ranking


def check_reward_spread(rewards: Tensor, reward: str) -> None:
    """Raise RewardError when the train set's rewards have (near) zero variance.

    The critic z-scores them, (r - mean) / (std + 1e-6): equal rewards give z = 0 everywhere, and rewards that
    differ only by rounding give z of order 1 from noise. Either way the value head learns nothing real and the
    weights that come out of it are amplified noise, so the run stops before training.
    """
    if rewards.numel() < 2:
        return
    mean, std = float(rewards.mean()), float(rewards.std(unbiased=False))
    if std > REWARD_MIN_SPREAD * max(1.0, abs(mean)):
        return
    why = {
        "tests": "every example passes its tests (on MBPP's train split the references all do)",
        "model": "the reward model scores every example the same",
    }.get(reward, "")
    raise RewardError(
        f"critic.reward = {reward!r}: the {rewards.numel()} training rewards have (near) zero variance "
        f"(mean {mean:.6g}, std {std:.3g}): {why}. The z-scored rewards are then 0 or noise, and so would be the "
        "critic's weights. Use critic.reward = 'model' with a reward model that ranks the examples (or a "
        "training set whose examples differ in reward), or another scorer: loss.scorer = 'rho1_excess_v1' or "
        "'uniform'."
    )


def _stored_rewards(ds: Any) -> dict[int, float]:
    """critic.reward = "dataset": {index: reward} from the dataset's `reward` column."""
    cols = ds if isinstance(ds, dict) else ds[:]
    if "reward" not in cols:
        raise ScoreError(
            "critic.reward = 'dataset': the training set has no 'reward' column (data.dataset = 'synthetic' has)"
        )
    return {int(i): float(r) for i, r in zip(cols["index"], cols["reward"], strict=True)}


def _batch_rewards(state: ScorerState, batch: dict) -> tuple[Tensor, Tensor]:
    """(raw, z-scored) rewards [B] for the batch's examples (cached by batch["index"]).

    With the train set known (init_state's `dataset`), statistics are over all of it; otherwise they are running
    statistics over the examples seen so far (an example's z-score then drifts while new examples arrive).
    """
    if state.dataset is not None and state.reward_norm is None:
        _all_rewards(state)
    index = [int(i) for i in batch["index"].tolist()]
    if state.cfg.critic.reward == "dataset":
        if "reward" not in batch:
            raise ScoreError(
                "critic.reward = 'dataset': the batch has no 'reward' (data.dataset = 'synthetic')"
            )
        state.rewards.update(zip(index, batch["reward"].tolist(), strict=True))
    missing = [b for b, i in enumerate(index) if i not in state.rewards]
    need = bool(missing)
    if state.aux_sharded and state.cfg.critic.reward == "model":
        need = P.any_rank(need, state.device)  # a sharded reward model forwards on every rank or on none
    if need:
        ids, mask = batch["input_ids"].tolist(), batch["loss_mask"].tolist()
        tid = batch["task_id"].tolist() if "task_id" in batch else [-1] * len(index)
        _compute_rewards(
            state, [(index[b], ids[b], [bool(m) for m in mask[b]], int(tid[b])) for b in missing]
        )
    raw = torch.tensor([state.rewards[i] for i in index], dtype=torch.float64)
    if state.reward_norm is not None:
        mean, std = state.reward_norm
    else:
        vals = torch.tensor(list(state.rewards.values()), dtype=torch.float64)
        mean, std = float(vals.mean()), float(vals.std(unbiased=False))
    return raw, (raw - mean) / (std + STD_EPS)


def _critic_values(state: ScorerState, batch: dict, update: bool) -> tuple[Tensor, float, Tensor]:
    """V [B, S] (detached, as it is before this optimizer step's value-head update), the value loss, raw rewards.

    Token rewards are 0 except the z-scored sequence reward on the last completion token; targets are the GAE
    returns over the completion positions (loss_mask), regressed with MSE over those positions. With `update`,
    the loss's gradient is only accumulated (summed over positions): `end_step` takes the one value-head step of
    the optimizer step, so how a step is split into micro-batches (the OOM fallback) changes nothing.
    """
    if state.hidden is None:
        raise ValueError("critic_delta_v1: state.hidden is None; set it to the detached trunk output first")
    h = state.hidden.detach()
    mask = batch["loss_mask"].to(h.device).bool()
    raw, z = _batch_rewards(state, batch)
    B, S = mask.shape
    pos = torch.arange(S, device=h.device)
    last = torch.where(mask, pos, -1).amax(1)
    r = torch.where((pos[None, :] == last[:, None]) & mask, z.to(h.device, torch.float32)[:, None], 0.0)
    cc = state.cfg.critic
    with torch.enable_grad(), torch.autocast(device_type=h.device.type, enabled=False):
        v = state.value_head(h)
        _, ret = gae_returns(r, v.detach(), mask, cc.gamma, cc.gae_lambda)
        m = mask.to(v.dtype)
        sq = ((v - ret.to(v.dtype)).square() * m).sum()
        if update:
            sq.backward()
            state.value_count += float(m.sum())
    return v.detach(), float(sq.detach()) / max(float(m.sum()), 1.0), raw


def _value_step(state: ScorerState) -> None:
    """One AdamW step of the value head on the gradient accumulated since the step began: the mean over this
    rank's completion positions, then over the ranks (data parallel: every rank keeps the same head)."""
    params = list(state.value_head.parameters())
    for p in params:
        if p.grad is None:  # no position on this rank: still take part in the all-reduce
            p.grad = torch.zeros_like(p)
        elif state.value_count > 0:
            p.grad /= state.value_count
    P.average_gradients(state.value_head)
    state.value_opt.step()
    _clear_value_grads(state)


def _clear_value_grads(state: ScorerState) -> None:
    if state.value_opt is not None:
        state.value_opt.zero_grad(set_to_none=True)
    state.value_count = 0.0


def critic_delta_v1(batch: dict, state: ScorerState) -> Tensor:
    """delta_j = V_j - V_{j-1} (V_{-1} = 0); pair (t, k) scores its target j = t + k + 1; then §3.1."""
    valid = _valid(batch)
    c = state.cfg
    v, value_loss, raw = _critic_values(state, batch, update=c.critic.update_value_head)
    delta = v - torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], 1)
    stats: dict = {}
    scores = pair_scores(delta, valid.shape[-1])
    w = normalize_weights(
        scores, valid, c.loss.temperature, c.loss.eps, c.loss.w_max, stats, scope=c.loss.normalize
    )
    extra = {
        "critic/value_loss": value_loss,
        "critic/reward_mean": float(raw.mean()),
        "scorer/nonfinite": float(stats["nonfinite"]),
    }
    return _record(state, w, valid, extra)


def _prepare_critic(state: ScorerState, loader: Iterator[dict] | None) -> None:
    """Rewards up front when the train set is known, then stage 1: `critic.pretrain_steps` value-head steps on
    the frozen trunk (hidden computed under no_grad)."""
    if state.dataset is not None:
        _all_rewards(state)
    steps = state.cfg.critic.pretrain_steps
    if steps <= 0:
        return
    if loader is None:
        raise ValueError(f"critic.pretrain_steps = {steps} needs a loader of training batches in prepare()")
    first = last = float("nan")
    for step in range(steps):
        batch = {k: v.to(state.device) for k, v in next(loader).items()}
        with torch.no_grad():
            state.hidden = state.model(batch["input_ids"], stage="trunk").detach()
        _, last, _ = _critic_values(state, batch, update=True)
        _value_step(state)
        first = last if step == 0 else first
    state.hidden = None
    state.metrics["critic/pretrain_value_loss"] = last
    _log(f"critic stage 1: {steps} value-head steps, value loss {first:.4f} -> {last:.4f}")


# --------------------------------------------------------------------------- rho1_excess_v1 (spec §3.3)


def check_same_tokenizer(base: Any, ref_dir: str | os.PathLike, key: str = "rho1.ref_model") -> None:
    """Raise a clear error unless the tokenizer saved in `ref_dir` gives the base tokenizer's ids: the same vocab
    and specials, and (fast tokenizers) the same normaliser, pre-tokenizer and merges.

    The reference scores the base's token ids, so equal vocabularies make each id the same string; the rules that
    split text must agree too, or the reference scores sequences it never produces (byte-level BPEs of the same
    vocabulary differ in their split rule: Llama 3 keeps up to 3 digits together, Qwen one). A tokenizer without
    BOS (Qwen's) matches only another without one.
    """
    from transformers import AutoTokenizer

    try:
        ref = AutoTokenizer.from_pretrained(str(ref_dir))
    except Exception as e:  # any loader failure means we cannot prove the ids agree
        raise ScoreError(
            f"'{key}' = {str(ref_dir)!r}: cannot load its tokenizer ({type(e).__name__}: {e}); the reference "
            "directory must hold the tokenizer it was trained with"
        ) from None
    va, vb = base.get_vocab(), ref.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:5]
        raise ScoreError(
            f"'{key}' = {str(ref_dir)!r}: its tokenizer differs from the base model's ({len(va)} vs {len(vb)} "
            f"tokens; first differences {diff}); rho1 needs the SAME tokenizer for both models"
        )
    for attr in ("bos_token", "eos_token", "unk_token"):
        a, b = getattr(base, attr, None), getattr(ref, attr, None)
        ia, ib = getattr(base, attr + "_id", None), getattr(ref, attr + "_id", None)
        if (a, ia) != (b, ib):
            raise ScoreError(
                f"'{key}' = {str(ref_dir)!r}: {attr} differs: base {a!r} (id {ia}) vs reference {b!r} (id {ib})"
            )
    ra, rb = _split_rules(base), _split_rules(ref)
    parts = [k for k in ra.keys() & rb.keys() if ra[k] != rb[k]]
    if parts:
        raise ScoreError(
            f"'{key}' = {str(ref_dir)!r}: its tokenizer's {' and '.join(sorted(parts))} differ from the base "
            "model's (the same vocabulary split differently gives other ids for the same text); rho1 needs the SAME tokenizer for both models"
        )


def _split_rules(tok: Any) -> dict[str, Any]:
    """What turns text into ids besides the vocabulary (fast tokenizers): normaliser, pre-tokenizer, merges."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return {}
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    return {"normalizer": spec.get("normalizer"), "pre-tokenizer": spec.get("pre_tokenizer"),
            "merges": model.get("merges"), "model type": model.get("type")}  # fmt: skip


def _init_rho1(state: ScorerState) -> None:
    cfg, rc = state.cfg, state.cfg.rho1
    if not rc.ref_model and not rc.ref_resource:
        raise ScoreError(
            f"{cfg.source}: loss.scorer = 'rho1_excess_v1' needs 'rho1.ref_model' (a reference causal LM "
            "directory with the base tokenizer) or 'rho1.ref_resource'"
        )
    d = s3cache.resolve_model(cfg, "reference")
    check_same_tokenizer(state.tokenizer, d)
    if rc.ref_format == "hf":
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=_aux_dtype(state))
        n_out = ref.get_output_embeddings().weight.shape[0]
    else:
        import formats

        ref = formats.load_model(d, rc.ref_format, 1).to(_aux_dtype(state))
        n_out = ref.args.vocab_size
    if n_out < len(state.tokenizer):
        raise ScoreError(
            f"'rho1.ref_model' = {str(d)!r}: {n_out} output logits < {len(state.tokenizer)} tokens"
        )
    state.ref_model = _place_aux(state, ref)
    state.ref_is_hf = rc.ref_format == "hf"
    state.ref_dir = d


@torch.no_grad()
def ref_token_ce(state: ScorerState, input_ids: Tensor) -> Tensor:
    """CE_ref(j) = -log p_ref(x_j | x_<j) at every position j [B, S] float32 (0 at j = 0).

    Logits at position j - 1 predict token j. Rows are right-padded, so no attention mask is needed for the
    positions that matter (causal attention never looks right).
    """
    ids = input_ids.to(state.device)
    out = state.ref_model(ids)
    logits = out.logits if state.ref_is_hf else out[:, :, 0]
    ce = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    for b in range(ids.shape[0]):  # one row's fp32 logits at a time
        ce[b, 1:] = F.cross_entropy(logits[b, :-1].float(), ids[b, 1:], reduction="none")
    return ce


def _dir_fingerprint(d: Path) -> str:
    """Identity of a model directory: file names, sizes and the first and last MiB of each file."""
    h = hashlib.sha256()
    for p in sorted(q for q in d.rglob("*") if q.is_file()):
        size = p.stat().st_size
        h.update(f"{p.relative_to(d)}\0{size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()


def ref_cache_path(state: ScorerState) -> Path:
    """<storage.cache_dir>/rho1_ref_ce/<hash of the train rows' token ids + reference identity>.pt"""
    h = hashlib.sha256()
    for i, ids, _, _ in _dataset_rows(state.dataset):
        h.update(f"{i}:{len(ids)}:".encode() + torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    h.update(f"{state.cfg.rho1.ref_format}:{_dir_fingerprint(state.ref_dir)}".encode())
    return Path(state.cfg.storage.cache_dir) / "rho1_ref_ce" / f"{h.hexdigest()[:24]}.pt"


def _ref_ce_rows(state: ScorerState, rows: list[tuple[int, list[int], list[bool], int]]) -> dict[int, Tensor]:
    """CE_ref of every row (the whole train set, the same on every rank) in micro-batch-sized forwards, the
    chunks dealt out over the ranks (`_split_map`; a rank out of chunks runs a 1-token idle forward)."""
    import data

    pad = data.pad_token_id(state.tokenizer)

    def run(chunk: list) -> list[Tensor]:
        width = max((len(r[1]) for r in chunk), default=1)
        ids = torch.tensor([r[1] + [pad] * (width - len(r[1])) for r in chunk] or [[pad]], dtype=torch.long)
        ce = ref_token_ce(state, ids).cpu()
        return [ce[b, : len(r[1])].clone() for b, r in enumerate(chunk)]

    ces = _split_map(state, rows, state.cfg.train.micro_batch_size, run)
    return {r[0]: ce for r, ce in zip(rows, ces, strict=True)}


def _ensure_ref_cache(state: ScorerState) -> None:
    """Reference CE of every training example, once: read from the disk cache or computed and written atomically.

    Under torchrun the ranks decide together (the computation is split over them): any rank without the file
    makes every rank compute. Each rank then writes it (atomically), so node-local cache directories get it too.
    """
    if state.ref_cache_ready or state.dataset is None:
        return
    path = ref_cache_path(state)
    cached = path.is_file()
    if P.rank_world()[1] > 1:
        cached = not P.any_rank(not cached, state.device)
    if cached:
        state.ref_ce = torch.load(path, weights_only=True)
        _log(f"reference CE of {len(state.ref_ce)} examples from {path}")
    else:
        rows = _dataset_rows(state.dataset)
        state.ref_ce.update(_ref_ce_rows(state, rows))
        atomic_write(path, lambda tmp: torch.save(state.ref_ce, tmp))
        _log(f"reference CE of {len(rows)} examples cached at {path}")
    state.ref_cache_ready = True


def _batch_ref_ce(state: ScorerState, batch: dict) -> Tensor:
    """CE_ref [B, S] for the batch: from the per-example cache when `rho1.precompute`, else a reference forward."""
    ids = batch["input_ids"]
    if not state.cfg.rho1.precompute:
        return ref_token_ce(state, ids)
    _ensure_ref_cache(state)
    index = [int(i) for i in batch["index"].tolist()]
    missing = any(i not in state.ref_ce for i in index)  # no train set given, or rows outside it: fill lazily
    if state.aux_sharded:
        missing = P.any_rank(missing, state.device)  # a sharded reference forwards on every rank or on none
    if missing:
        ce = ref_token_ce(state, ids).cpu()
        for b, i in enumerate(index):
            state.ref_ce.setdefault(i, ce[b].clone())
    B, S = ids.shape
    out = torch.zeros(B, S, dtype=torch.float32)
    for b, i in enumerate(index):
        row = state.ref_ce[i][:S]
        out[b, : row.numel()] = row
    return out.to(state.device)


def _ref_pairs(batch: dict, state: ScorerState, valid: Tensor) -> Tensor:
    """CE_ref of each pair's target token [B, S, H] (0 on invalid pairs): the reference predicts x_{t+k+1} from
    its logits at position t + k, so pair (t, k) takes CE_ref at position t + k + 1 (`pair_scores`)."""
    ref = pair_scores(_batch_ref_ce(state, batch).to(valid.device), valid.shape[-1])
    return torch.where(valid, ref, 0.0)


def excess_scores(batch: dict, state: ScorerState) -> tuple[Tensor, Tensor, Tensor]:
    """(excess, CE_k(t), CE_ref(t + k + 1)) [B, S, H], 0 on invalid pairs; both CEs on token x_{t+k+1}.

    CE_k comes from one no-grad pass over every head (`model.mtp_head_ce`): what the `"sequence"` scope needs
    before any head's weight. The trainer's per-head path (`head_by_head`) gets CE_k from the training step.
    """
    valid = _valid(batch)
    ce, ref = _model_ce(batch, state), _ref_pairs(batch, state, valid)
    return torch.where(valid, ce - ref, 0.0), ce, ref


def _model_ce(batch: dict, state: ScorerState) -> Tensor:
    """CE_k(t) [B, S, H] of the model being trained, from one extra no-grad pass over every head."""
    import model as M

    if state.hidden is None:
        raise ValueError("rho1_excess_v1: state.hidden is None; set it to the detached trunk output first")
    return M.mtp_head_ce(state.model, state.hidden.detach(), batch["targets"], _valid(batch))


def _rho1_from_excess(excess: Tensor, valid: Tensor, cfg: Any, stats: dict, scope: str) -> Tensor:
    """§3.3: s = e (`excess`) or |e| (`abs_excess`), then weighted or select mode over each `scope` group."""
    s = excess if cfg.rho1.score == "excess" else excess.abs()
    lc, rc = cfg.loss, cfg.rho1
    return rho1_weights(
        s, valid, lc.temperature, lc.eps, lc.w_max, rc.mode, rc.top_p, rc.top_boost, stats, scope=scope
    )


def _rho1_record(
    state: ScorerState, w: Tensor, valid: Tensor, ce: Tensor, ref: Tensor, nonfinite: int
) -> Tensor:
    n = max(int(valid.sum()), 1)
    extra = {
        "rho1/excess_mean": float(torch.where(valid, ce - ref, 0.0).sum()) / n,
        "rho1/ce_mean": float(torch.where(valid, ce, 0.0).sum()) / n,
        "rho1/ref_ce_mean": float(ref.sum()) / n,
        "scorer/nonfinite": float(nonfinite),
    }
    return _record(state, w, valid, extra)


class Rho1Heads:
    """rho1 weights head by head, for `loss.normalize = "head"` (spec §3.3).

    Head k's weights need only head k's CE (and the reference's), so the trainer's head-by-head step calls
    `self(k, ce_k)` with the CE it has just computed for its loss and uses the returned weights at once: no extra
    pass over the heads. `finish()` then records the step's statistics exactly as the scorer does and returns
    all weights [B, S, H]. Built once per micro-batch (the reference forward, when needed, happens here).
    """

    def __init__(self, batch: dict, state: ScorerState):
        self.state, self.valid = state, _valid(batch)
        self.ref = _ref_pairs(batch, state, self.valid)
        self.ce = torch.zeros(self.valid.shape, dtype=torch.float32, device=self.valid.device)
        self.weights = torch.zeros_like(self.ce)
        self.stats: dict = {"nonfinite": 0}

    def __call__(self, k: int, ce_k: Tensor) -> Tensor:
        """Weights of head k [B, S] from its per-pair CE [B, S] (detached; any value on invalid pairs)."""
        v = self.valid[..., k]
        ce_k = torch.where(v, ce_k.detach().to(self.ce), 0.0)
        self.ce[..., k] = ce_k
        excess = torch.where(v, ce_k - self.ref[..., k], 0.0)
        w = _rho1_from_excess(excess, v, self.state.cfg, self.stats, scope="sequence")  # [B, S]: one head
        self.weights[..., k] = w
        return w

    def finish(self) -> Tensor:
        return _rho1_record(self.state, self.weights, self.valid, self.ce, self.ref, self.stats["nonfinite"])


def head_by_head(batch: dict, state: ScorerState) -> Rho1Heads | None:
    """The per-head form of the configured scorer when its weights need the heads' own CE (rho1 with the "head"
    scope), for the trainer's head-by-head step; None when the weights are known before the heads run (then
    call `SCORERS[...]`). Both give the same weights: `rho1_excess_v1` itself runs this path on the CE of its
    extra pass."""
    c = state.cfg
    if c.loss.scorer == "rho1_excess_v1" and c.loss.normalize == "head":
        return Rho1Heads(batch, state)
    return None


def rho1_excess_v1(batch: dict, state: ScorerState) -> Tensor:
    """Excess e(t, k) = CE_k(t) - CE_ref(t + k + 1); s = e (`excess`) or |e| (`abs_excess`); §3.3 weights."""
    valid = _valid(batch)
    if state.cfg.loss.normalize == "head":
        heads, ce = Rho1Heads(batch, state), _model_ce(batch, state)
        for k in range(valid.shape[-1]):
            heads(k, ce[..., k])
        return heads.finish()
    excess, ce, ref = excess_scores(batch, state)
    stats: dict = {"nonfinite": 0}
    w = _rho1_from_excess(excess, valid, state.cfg, stats, scope="sequence")
    return _rho1_record(state, w, valid, ce, ref, stats["nonfinite"])


# --------------------------------------------------------------------------- run-level histogram


def head_summary(state: ScorerState) -> dict[str, dict[str, float]]:
    """{"head{k}": {"run_mean", "pairs"}}: every weight the scorer gave head k over the run (from the histogram)."""
    if state.hist_counts is None or state.head_sums is None:
        return {}
    n = state.hist_counts.reshape(state.head_sums.numel(), -1).sum(1)
    return {
        f"head{k + 1}": {"run_mean": float(state.head_sums[k] / n[k]) if n[k] else 0.0, "pairs": float(n[k])}
        for k in range(n.numel())
    }


def save_weight_histogram(state: ScorerState, path: str | os.PathLike) -> Path:
    """PNG of every weight the scorer produced over the run, one colour per head (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = state.cfg.loss
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if state.hist_counts is not None and float(state.hist_counts.sum()) > 0:
        edges = state.hist_edges.cpu().numpy()
        heads = head_summary(state)
        for k, counts in enumerate(state.hist_counts.reshape(len(heads), -1).cpu().numpy()):
            label = f"head {k + 1}: mean {heads[f'head{k + 1}']['run_mean']:.3f}"
            ax.stairs(counts, edges, color=f"C{k}", lw=1.5, label=label)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no weights recorded", ha="center", va="center", transform=ax.transAxes)
    for x, name in ((c.eps, "eps"), (1.0, "1"), (c.w_max, "w_max")):
        ax.axvline(x, color="gray", ls="--", lw=0.8)
        ax.text(x, 1.0, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("weight (before mixing with lambda)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{c.scorer}: {int(state.calls)} calls", fontsize=10, pad=14)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


SCORERS: dict[str, Callable[[dict, ScorerState], Tensor]] = {
    "uniform": uniform,
    "critic_delta_v1": critic_delta_v1,
    "rho1_excess_v1": rho1_excess_v1,
}
