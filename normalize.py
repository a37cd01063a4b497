"""The normaliser of spec §3.1 and the weighting rules built on it: raw scores -> weights in [eps, w_max], mean 1.

Pure tensor functions (no model, no state), shared by the scorers of score.py:
- `normalize_weights` (§3.1): z-score, softmax(z / T) * n, clip-normalise; the critic's rule;
- `rho1_weights` (§3.3): weighted (the top-p pairs boosted) or select mode over z-scored excess losses;
- `dft_weights` (§3.4): q * n / sum(q) of the model's own probabilities, clip-normalised;
- `clip_normalize` (§3.1 step 4): the bisection on log c that every rule ends with.
Each runs per normalisation group: a (sequence, head) of a [B, S, H] input (`scope="head"`, the default) or a
sequence with all its heads (`"sequence"`). Every output is finite, inside [eps, w_max], mean 1 within 1e-6 over
each group's valid pairs and exactly 0 on invalid ones, for any input (NaN, Inf, constant, extreme).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

STD_EPS = 1e-6  # spec §3.1 step 2: z = (s - mean) / (std + 1e-6)
BISECT_ITERS = 100  # log c bracket halves 100 times: far below 1e-6 for any realistic bracket width

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


def _fill_nonfinite(s: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
    """Step 1 on rows [R, N]: every entry outside `finite` (non-finite or invalid) -> the row mean of the finite
    ones (0 for a row with none). Returns (filled rows, row means)."""
    mean = torch.where(finite, s, 0.0).sum(1) / finite.sum(1).clamp(min=1)
    return torch.where(finite, s, mean[:, None]), mean


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
    s, mean = _fill_nonfinite(s / scale[:, None], finite)
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
    `mode` and `top_p` (in (0, 1]) are the run's validated rho1.mode / rho1.top_p (config.py checks them once).
    """
    _check_norm_args(temperature, eps, w_max)
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


DFT_LOG_RANGE = 700.0  # log q below the group's top - 700 is raised to it: float64 keeps c <= e^709 finite


def dft_weights(
    ce: Tensor, valid: Tensor, eps: float, w_max: float, stats: dict | None = None, *, scope: str = "head"
) -> Tensor:
    """Spec §3.4 on each normalisation group (`scope` as in `normalize_weights`) of the model's own CE [B, S, H]:
    q = exp(-CE), w = q * n / sum(q), then clip-normalise (§3.1 step 4). No z-score, no softmax temperature.

    Non-finite CE takes the group mean of the finite ones (counted in `stats["nonfinite"]`); a group with no finite
    CE gets 1. log q is floored at the group's largest log q - DFT_LOG_RANGE, which changes only pairs whose q is
    below e^-700 of the top one's (any float32 softmax underflows far earlier) and keeps the bisection bracket
    finite, so the invariants hold for any input."""
    _check_norm_args(1.0, eps, w_max)
    c, v = _rows(ce, valid, scope)
    finite = v & torch.isfinite(c)
    log_q, _ = _fill_nonfinite(-c, finite)
    top = torch.where(v, log_q, -math.inf).amax(1, keepdim=True)
    log_q = torch.maximum(log_q, torch.where(torch.isfinite(top), top, 0.0) - DFT_LOG_RANGE)
    w = clip_normalize(_log_weights(log_q, v, 1.0), v, eps, w_max)  # log(q n / sum q) at T = 1
    w = torch.where((finite.sum(1) == 0)[:, None] & v, 1.0, w)
    if stats is not None:
        stats["nonfinite"] = stats.get("nonfinite", 0) + int((v & ~finite).sum())
    return _finish(w, v, eps, w_max, ce.shape, scope)
