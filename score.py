"""Token-importance scorers: `scorer(batch, state)` gives the weights [B, S, H] of a micro-batch (spec §3).

One weight per (position t, head k) pair; head k (0-based) at position t predicts `input_ids[t + k + 1]`, so a
pair's score is the score of its TARGET position j = t + k + 1. Weights are detached float32, exactly 0 where
`batch["valid"]` is False, mean 1 over the valid pairs of each sequence and head (`loss.normalize = "head"`, the
default) or of each sequence, all heads together (`"sequence"`, the ablation).

Every entry of `SCORERS` has one signature: `SCORERS[loss.scorer](batch, state) -> Weigher`, where `batch` carries
`targets` / `valid` [B, S, H] (model.mtp_targets) and `hidden`, the detached trunk output [B, S, D]. The trainer's
head-by-head step asks the weigher for head k's weights with the CE it has just computed for that head
(`weigher(k, ce_k)`), then `weigher.finish()` gives all of them [B, S, H]. Scorers whose weights are known before
the heads run (uniform, the critic, the "sequence" scope) ignore the CE; rho1 and dft_v1 with the per-head scope
weigh head k from that very CE, so they need no extra pass over the heads. `weights(batch, state)` gives the
[B, S, H] weights outside the step (one no-grad pass over the heads feeds the weigher).

- `uniform`: 1 on every valid pair (plain MTP).
- `critic_delta_v1` (§3.2): reward (aux_models.Rewards) -> value head on the detached trunk output, fitted with
  GAE targets on the completion and the last prompt position (`value_positions`) -> delta_j = V_j - V_{j-1} ->
  `normalize_weights`; the fit's explained variance is logged (`critic/explained_variance`).
- `rho1_excess_v1` (§3.3): excess loss CE_k(t) - CE_ref(t + k + 1) against a frozen reference
  (aux_models.Reference) -> weighted or select mode (`rho1_weights`).
- `dft_v1` (§3.4): the reference-free baseline, w proportional to the model's own q = exp(-CE_k(t)) ->
  clip-normalise (`dft_weights`).

The rules that turn raw scores into weights are normalize.py's. Around each optimizer step the trainer calls
`begin_step`, then `end_step` and `record_step` (the one place the run's weight histogram and statistics are
recorded) for a step it takes, or `rollback_step` for one it throws away (an OOM retry, a non-finite step), so
such a step leaves no trace in the scorer's state.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import model as M
import parallel as P
from aux_models import Reference, Rewards, ScoreError
from files import atomic_write
from normalize import dft_weights, normalize_weights, rho1_weights

HIST_BINS = 60


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


Rule = Callable[[Tensor, Tensor, dict, str], Tensor]  # (raw scores, valid, stats, scope) -> weights


@dataclass
class ScorerState:
    """What a scorer needs between calls: the run's rule, the critic's value head and rewards, rho1's reference,
    the run's weight histogram."""

    cfg: Any
    model: nn.Module | None = None
    tokenizer: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dataset: Any = None  # the tokenised train split (rows with input_ids, loss_mask, index, task_id)
    rule: Rule | None = None  # raw scores -> weights with the run's settings bound (`_rule`)
    scope: str = "head"  # loss.normalize
    metrics: dict[str, float] = field(default_factory=dict)  # log values of the last micro-batch and step
    # train.aux_models = "shard" under torchrun: the reference / reward model is FSDP2-sharded (aux_models.py)
    aux_sharded: bool = False
    # critic_delta_v1
    value_head: ValueHead | None = None
    value_opt: torch.optim.Optimizer | None = None
    value_count: float = 0.0  # positions whose value loss is accumulated in the value head's grads
    rewards: Rewards | None = None
    # critic explained variance (spec §3.2): this step's sums over the regressed positions (n, sum V^, sum V^^2,
    # sum e, sum e^2 with e = V^ - V), then the run's: [sum of the steps' values, steps], and stage 1's last value
    ev_step: Tensor | None = None
    ev_run: list[float] = field(default_factory=lambda: [0.0, 0.0])
    stage1: dict[str, float] = field(default_factory=dict)
    # rho1_excess_v1
    reference: Reference | None = None
    # weight histogram over the run's accepted steps, per head: counts [H, HIST_BINS], the exact sums [H] (run
    # means), and how many micro-batches were weighed
    hist_edges: Tensor | None = None
    hist_counts: Tensor | None = None
    head_sums: Tensor | None = None
    calls: int = 0
    prepare_seconds: float = 0.0  # score.prepare: critic stage 1, rho1's reference-CE precompute

    def state_dict(self) -> dict:
        """What a resumed run needs: value head + optimiser, cached rewards and their statistics, histogram."""
        r = self.rewards
        return {
            "scorer": self.cfg.loss.scorer,
            "value_head": None if self.value_head is None else self.value_head.state_dict(),
            "value_opt": None if self.value_opt is None else self.value_opt.state_dict(),
            "rewards": {} if r is None else dict(r.values),
            "reward_norm": None if r is None else r.norm,
            "hist_counts": None if self.hist_counts is None else self.hist_counts.cpu(),
            "head_sums": None if self.head_sums is None else self.head_sums.cpu(),
            "calls": self.calls,
            "ev_run": list(self.ev_run),
            "stage1": dict(self.stage1),
            "prepare_seconds": self.prepare_seconds,
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
        if self.rewards is not None:
            self.rewards.values = {int(k): float(v) for k, v in sd.get("rewards", {}).items()}
            self.rewards.norm = None if sd.get("reward_norm") is None else tuple(sd["reward_norm"])
        for name in ("hist_counts", "head_sums"):
            mine, saved = getattr(self, name), sd.get(name)
            if saved is not None and mine is not None:
                if saved.shape != mine.shape:
                    raise ValueError(f"scorer state: {name} {tuple(saved.shape)} != {tuple(mine.shape)} here")
                setattr(self, name, saved.to(mine.device, torch.float64))
        self.calls = int(sd.get("calls", 0))
        self.ev_run = [float(x) for x in sd.get("ev_run", [0.0, 0.0])]
        self.stage1 = dict(sd.get("stage1", {}))
        self.prepare_seconds = float(sd.get("prepare_seconds", 0.0))


def _model_dim(model: nn.Module) -> int:
    """The trunk width, also through a peft wrapper."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        args = getattr(m, "args", None)
        if args is not None:
            return int(args.dim)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.tok_embeddings
    return int(emb.weight.shape[1])


def _rule(cfg: Any) -> Rule:
    """The configured scorer's rule from raw scores to weights, with the run's settings bound once (config.py has
    validated them): §3.1 for the critic, §3.3 for rho1 (signed or absolute excess), §3.4 for dft_v1."""
    lc, rc = cfg.loss, cfg.rho1
    bounds = {"eps": lc.eps, "w_max": lc.w_max}
    if lc.scorer == "rho1_excess_v1":
        signed, knobs = rc.score == "excess", {"mode": rc.mode, "top_p": rc.top_p, "top_boost": rc.top_boost}

        def rho1(e: Tensor, v: Tensor, stats: dict, scope: str) -> Tensor:
            s = e if signed else e.abs()
            return rho1_weights(s, v, lc.temperature, stats=stats, scope=scope, **bounds, **knobs)

        return rho1
    if lc.scorer == "dft_v1":
        return lambda ce, v, stats, scope: dft_weights(ce, v, stats=stats, scope=scope, **bounds)
    return lambda s, v, stats, scope: normalize_weights(
        s, v, lc.temperature, stats=stats, scope=scope, **bounds
    )


def init_state(cfg: Any, model: nn.Module, tokenizer: Any, device: Any, dataset: Any = None) -> ScorerState:
    """Build what `cfg.loss.scorer` needs: value head + AdamW and rewards (critic), the frozen reference (rho1)."""
    name = cfg.loss.scorer
    if name not in SCORERS:
        raise ScoreError(f"{cfg.source}: 'loss.scorer' = {name!r}; expected one of {', '.join(SCORERS)}")
    dev = torch.device(device)
    edges = torch.linspace(
        0.0, max(float(cfg.loss.w_max), 1.0), HIST_BINS + 1, dtype=torch.float64, device=dev
    )
    state = ScorerState(cfg, model, tokenizer, dev, dataset, _rule(cfg), cfg.loss.normalize, hist_edges=edges)
    H = cfg.model.n_future_tokens
    state.hist_counts = torch.zeros(H, HIST_BINS, dtype=torch.float64, device=dev)
    state.head_sums = torch.zeros(H, dtype=torch.float64, device=dev)
    state.aux_sharded = P.Dist().enabled and cfg.train.aux_models == "shard"  # under torchrun, any world size
    if name == "critic_delta_v1":
        with torch.random.fork_rng(devices=[]):  # same head on every rank, training RNG stream untouched
            torch.manual_seed(int(cfg.train.seed))
            state.value_head = ValueHead(_model_dim(model), cfg.critic.value_hidden).to(dev)
        state.value_opt = torch.optim.AdamW(state.value_head.parameters(), lr=cfg.critic.value_lr)
        state.rewards = Rewards(cfg, tokenizer, dev, dataset, state.aux_sharded)
    elif name == "rho1_excess_v1":
        state.reference = Reference(cfg, tokenizer, dev, dataset, state.aux_sharded)
    elif name == "dft_v1":
        P.print0(
            f"score: loss.temperature = {cfg.loss.temperature} is ignored: dft_v1 weights are proportional to the "
            "model's own probability of the target (spec §3.4), with no softmax temperature"
        )
    return state


def prepare(state: ScorerState, loader: Iterator[dict] | None) -> None:
    """Before training: critic rewards up front (when the train set is known) and stage 1 value-head fitting;
    rho1 reference-CE precompute (`rho1.precompute`); nothing for uniform and dft_v1."""
    t0 = time.perf_counter()
    if state.rewards is not None:
        _prepare_critic(state, loader)
    elif state.reference is not None and state.cfg.rho1.precompute:
        state.reference.ensure_cache()
    state.prepare_seconds += time.perf_counter() - t0


# --------------------------------------------------------------------------- around each optimizer step


def begin_step(state: ScorerState) -> None:
    """An optimizer step starts: drop any value-head gradient and explained-variance sums."""
    _clear_value_grads(state)
    state.ev_step = None


def rollback_step(state: ScorerState) -> None:
    """The step's work is thrown away (an OOM retry, a skipped non-finite step): the accumulated value-head gradient
    and explained-variance sums are dropped (the histogram only ever records accepted steps: `record_step`). A
    retried step then leaves exactly the trace of an uninterrupted one."""
    _clear_value_grads(state)
    state.ev_step = None


def end_step(state: ScorerState) -> None:
    """The optimizer step was taken: the critic's value head takes its one step of this optimizer step, and the
    step's explained variance (over every micro-batch and rank) goes to the metrics and the run's mean."""
    if state.value_head is None:
        return
    if state.cfg.critic.update_value_head:
        _value_step(state)
    sums = (
        torch.zeros(5, dtype=torch.float64, device=state.device) if state.ev_step is None else state.ev_step
    )
    state.ev_step = None
    ev = explained_variance(P.all_reduce(sums))  # every rank takes part, with or without positions
    state.metrics["critic/explained_variance"] = ev
    if math.isfinite(ev):
        state.ev_run = [state.ev_run[0] + ev, state.ev_run[1] + 1]


def record_step(state: ScorerState, weights: Tensor, valid: Tensor, calls: int) -> dict[str, float]:
    """An accepted optimizer step's weights [B, S, H] (all its micro-batches; `calls` of them): the step's weight
    statistics (returned, and left in `state.metrics`) and the run's per-head histogram and sums. The one place
    the run's weights are recorded."""
    c = state.cfg.loss
    stats = {**weight_stats(weights, valid, c.eps, c.w_max), **head_means(weights, valid)}
    state.metrics.update(stats)
    H, edges = weights.shape[-1], state.hist_edges
    counts = torch.stack([score_histogram(weights[..., k], valid[..., k], edges) for k in range(H)])
    v = valid.bool() & torch.isfinite(weights)
    sums = torch.where(v, weights.double(), 0.0).flatten(0, -2).sum(0).to(edges.device)
    state.hist_counts = counts if state.hist_counts is None else state.hist_counts + counts
    state.head_sums = sums if state.head_sums is None else state.head_sums + sums
    state.calls += calls
    return stats


# --------------------------------------------------------------------------- the weighers


def _valid(batch: dict) -> Tensor:
    if "valid" not in batch or "targets" not in batch:
        raise KeyError("scorer: batch needs 'targets' and 'valid' [B, S, H] (from model.mtp_targets)")
    return batch["valid"].bool()


def _hidden(batch: dict) -> Tensor:
    if "hidden" not in batch:
        raise KeyError("scorer: batch needs 'hidden', the trunk output [B, S, D] (model(ids, stage='trunk'))")
    return batch["hidden"].detach()


class Weigher:
    """The weights of one micro-batch, head by head. `self(k, ce_k)` gives head k's weights [B, S]; `finish()` all
    of them [B, S, H], detached, and leaves the scorer's log values in `state.metrics`.

    This base holds weights known before the heads run (uniform, the critic, the "sequence" scope): `per_head` is
    False and the CE is not needed. `HeadWeigher` weighs head k from its CE."""

    per_head = False

    def __init__(self, state: ScorerState, valid: Tensor, weights: Tensor, extra: dict[str, float]):
        self.state, self.valid, self.weights, self.extra = state, valid, weights, extra

    def __call__(self, k: int, ce_k: Tensor | None = None) -> Tensor:
        return self.weights[..., k]

    def finish(self) -> Tensor:
        self.state.metrics = dict(self.extra)
        return self.weights.detach()


class HeadWeigher(Weigher):
    """Per-head scope, rho1 and dft_v1 (spec §3.3, §3.4): head k's weights need only head k's CE (and, for rho1,
    the reference's), so the trainer's head-by-head step passes the CE it has just computed for its loss and uses
    the returned weights at once: no extra pass over the heads. `ref` [B, S, H]: CE_ref of each pair's target
    (rho1: the score is the excess CE - ref) or None (dft_v1: the score is the CE itself)."""

    per_head = True

    def __init__(self, state: ScorerState, valid: Tensor, ref: Tensor | None):
        self.ce = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        super().__init__(state, valid, torch.zeros_like(self.ce), {})
        self.ref, self.stats = ref, {"nonfinite": 0}

    def __call__(self, k: int, ce_k: Tensor | None = None) -> Tensor:
        """Weights of head k [B, S] from its per-pair CE [B, S] (detached; any value on invalid pairs)."""
        v = self.valid[..., k]
        ce_k = torch.where(v, ce_k.detach().to(self.ce), 0.0)
        self.ce[..., k] = ce_k
        s = ce_k if self.ref is None else torch.where(v, ce_k - self.ref[..., k], 0.0)
        w = self.state.rule(s, v, self.stats, "sequence")  # [B, S]: one head, so "sequence" is that head
        self.weights[..., k] = w
        return w

    def finish(self) -> Tensor:
        self.extra = _ce_metrics(self.valid, self.ce, self.ref, self.stats["nonfinite"])
        return super().finish()


def _ce_metrics(valid: Tensor, ce: Tensor, ref: Tensor | None, nonfinite: int) -> dict[str, float]:
    """rho1's mean excess, CE and reference CE, or (ref None) dft_v1's mean own probability and CE."""
    n = max(int(valid.sum()), 1)
    mean = lambda x: float(torch.where(valid, x, 0.0).sum()) / n  # noqa: E731
    if ref is None:
        out = {"dft/prob_mean": mean((-ce).exp()), "dft/ce_mean": mean(ce)}  # the model's own p(target)
    else:
        out = {"rho1/excess_mean": mean(ce - ref), "rho1/ce_mean": mean(ce), "rho1/ref_ce_mean": mean(ref)}
    return {**out, "scorer/nonfinite": float(nonfinite)}


def model_ce(batch: dict, state: ScorerState) -> Tensor:
    """CE_k(t) [B, S, H] of the model being trained, from one extra no-grad pass over every head: what the
    "sequence" scope needs before any head's weight, and what `weights` feeds a per-head weigher with."""
    chunk = state.cfg.model.ce_chunk
    return M.mtp_head_ce(state.model, _hidden(batch), batch["targets"], _valid(batch), chunk=chunk)


def weights(batch: dict, state: ScorerState) -> Tensor:
    """The configured scorer's weights [B, S, H] outside the trainer's step (tests, tools): its weigher fed every
    head's CE from one no-grad pass over the heads when it weighs head by head. Equal to what the step uses."""
    weigher = SCORERS[state.cfg.loss.scorer](batch, state)
    if weigher.per_head:
        ce = model_ce(batch, state)
        for k in range(ce.shape[-1]):
            weigher(k, ce[..., k])
    return weigher.finish()


def uniform(batch: dict, state: ScorerState) -> Weigher:
    """Plain MTP: weight 1 on every valid pair."""
    valid = _valid(batch)
    return Weigher(state, valid, valid.to(torch.float32), {"scorer/nonfinite": 0.0})


# --------------------------------------------------------------------------- critic_delta_v1 (spec §3.2)


def value_positions(loss_mask: Tensor) -> Tensor:
    """The positions the value head is regressed on [B, S] (spec §3.2): every completion token, and the position
    just before each completion span (the last prompt position: the state before the first action), whose V the
    first completion token's delta subtracts. A span that starts at position 0 has none (V_{-1} = 0)."""
    m = loss_mask.bool()
    start = m & ~F.pad(m[:, :-1], (1, 0))  # the first token of each span
    return m | F.pad(start[:, 1:], (0, 1))


def explained_variance(sums: Tensor) -> float:
    """1 - Var(V^ - V) / Var(V^) from [n, sum V^, sum V^^2, sum e, sum e^2] (e = V^ - V; population variances);
    nan without positions or when the targets do not vary."""
    n, t1, t2, e1, e2 = (float(x) for x in sums)
    var_t = t2 / n - (t1 / n) ** 2 if n > 0 else 0.0
    if not var_t > 1e-12:
        return float("nan")
    return 1.0 - (e2 / n - (e1 / n) ** 2) / var_t


def _ev_sums(target: Tensor, v: Tensor, m: Tensor) -> Tensor:
    t, e = target.double()[m], (target.double() - v.double())[m]
    return torch.stack([t.new_tensor(float(t.numel())), t.sum(), t.square().sum(), e.sum(), e.square().sum()])


def _critic_values(state: ScorerState, batch: dict, update: bool) -> tuple[Tensor, float, Tensor, Tensor]:
    """V [B, S] (detached, as it is before this optimizer step's value-head update), the value loss, raw rewards,
    and the explained-variance sums of the regressed positions (`explained_variance`).

    Token rewards are 0 except the z-scored sequence reward on the last completion token; targets are the GAE
    returns over the regressed positions (`value_positions`: the completion and the last prompt position), fitted
    with MSE over those positions. With `update`, the loss's gradient is only accumulated (summed over positions):
    `end_step` takes the one value-head step of the optimizer step, so how a step is split into micro-batches
    (the OOM fallback) changes nothing.
    """
    h = _hidden(batch)
    mask = batch["loss_mask"].to(h.device).bool()
    fit = value_positions(mask)
    raw, z = state.rewards.of_batch(batch)
    B, S = mask.shape
    pos = torch.arange(S, device=h.device)
    last = torch.where(mask, pos, -1).amax(1)
    r = torch.where((pos[None, :] == last[:, None]) & mask, z.to(h.device, torch.float32)[:, None], 0.0)
    cc = state.cfg.critic
    with torch.enable_grad(), torch.autocast(device_type=h.device.type, enabled=False):
        v = state.value_head(h)
        _, ret = gae_returns(r, v.detach(), fit, cc.gamma, cc.gae_lambda)
        m = fit.to(v.dtype)
        sq = ((v - ret.to(v.dtype)).square() * m).sum()
        if update:
            sq.backward()
            state.value_count += float(m.sum())
    ev = _ev_sums(ret, v.detach(), fit)
    return v.detach(), float(sq.detach()) / max(float(m.sum()), 1.0), raw, ev


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


def critic_delta_v1(batch: dict, state: ScorerState) -> Weigher:
    """delta_j = V_j - V_{j-1} (V_{-1} = 0); pair (t, k) scores its target j = t + k + 1; then §3.1. The weights
    depend only on the trunk, so they are known before the heads run."""
    valid = _valid(batch)
    v, value_loss, raw, ev = _critic_values(state, batch, update=state.cfg.critic.update_value_head)
    state.ev_step = ev if state.ev_step is None else state.ev_step + ev  # the step's, over its micro-batches
    delta = v - torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], 1)
    stats: dict = {}
    w = state.rule(M.pair_scores(delta, valid.shape[-1]), valid, stats, state.scope)
    extra = {
        "critic/value_loss": value_loss,
        "critic/explained_variance": explained_variance(ev),  # this call's; end_step: the whole step's
        "critic/reward_mean": float(raw.mean()),
        "scorer/nonfinite": float(stats["nonfinite"]),
    }
    return Weigher(state, valid, w, extra)


def _prepare_critic(state: ScorerState, loader: Iterator[dict] | None) -> None:
    """Rewards up front when the train set is known, then stage 1: `critic.pretrain_steps` value-head steps on
    the frozen trunk (hidden computed under no_grad)."""
    if state.dataset is not None:
        state.rewards.compute_all()
    steps = state.cfg.critic.pretrain_steps
    if steps <= 0:
        return
    if loader is None:
        raise ValueError(f"critic.pretrain_steps = {steps} needs a loader of training batches in prepare()")
    first = last = (float("nan"), float("nan"))
    for step in range(steps):
        batch = {k: v.to(state.device) for k, v in next(loader).items()}
        with torch.no_grad():
            batch["hidden"] = state.model(batch["input_ids"], stage="trunk")
        _, loss, _, ev = _critic_values(state, batch, update=True)
        _value_step(state)
        last = (loss, explained_variance(P.all_reduce(ev)))
        first = last if step == 0 else first
    state.metrics["critic/pretrain_value_loss"] = last[0]
    state.stage1 = {"critic/stage1_value_loss": last[0], "critic/stage1_explained_variance": last[1]}
    P.print0(
        f"score: critic stage 1: {steps} value-head steps, value loss {first[0]:.4f} -> {last[0]:.4f}, "
        f"explained variance {first[1]:.3f} -> {last[1]:.3f}"
    )


def critic_summary(state: ScorerState) -> dict[str, float]:
    """The run's value-fit numbers for summary.json: stage 1's last value loss and explained variance, and the
    mean over the training steps of each step's explained variance (`critic/explained_variance_mean`); {} for
    the other scorers."""
    if state.value_head is None:
        return {}
    total, steps = state.ev_run
    return {**state.stage1, "critic/explained_variance_mean": total / steps if steps else float("nan")}


# --------------------------------------------------------------------------- rho1_excess_v1 (§3.3), dft_v1 (§3.4)


def _ref_pairs(batch: dict, state: ScorerState, valid: Tensor) -> Tensor:
    """CE_ref of each pair's target token [B, S, H] (0 on invalid pairs): the reference predicts x_{t+k+1} from
    its logits at position t + k, so pair (t, k) takes CE_ref at position t + k + 1 (`model.pair_scores`)."""
    ref = M.pair_scores(state.reference.of_batch(batch).to(valid.device), valid.shape[-1])
    return torch.where(valid, ref, 0.0)


def excess_scores(batch: dict, state: ScorerState) -> tuple[Tensor, Tensor, Tensor]:
    """(excess, CE_k(t), CE_ref(t + k + 1)) [B, S, H], 0 on invalid pairs; both CEs on token x_{t+k+1}; CE_k from
    one no-grad pass over every head (`model_ce`)."""
    valid = _valid(batch)
    ce, ref = model_ce(batch, state), _ref_pairs(batch, state, valid)
    return torch.where(valid, ce - ref, 0.0), ce, ref


def _joint(batch: dict, state: ScorerState, ref: Tensor | None) -> Weigher:
    """The "sequence" scope of rho1 / dft_v1: every head's CE before any head's weight (the extra pass), one
    normalisation over all heads of each sequence."""
    valid = _valid(batch)
    ce = torch.where(valid, model_ce(batch, state), 0.0)
    stats: dict = {"nonfinite": 0}
    w = state.rule(ce if ref is None else torch.where(valid, ce - ref, 0.0), valid, stats, "sequence")
    return Weigher(state, valid, w, _ce_metrics(valid, ce, ref, stats["nonfinite"]))


def rho1_excess_v1(batch: dict, state: ScorerState) -> Weigher:
    """Excess e(t, k) = CE_k(t) - CE_ref(t + k + 1); s = e (`excess`) or |e| (`abs_excess`); §3.3 weights. The
    reference forward (or cache lookup) happens here, once per micro-batch."""
    valid = _valid(batch)
    ref = _ref_pairs(batch, state, valid)
    return HeadWeigher(state, valid, ref) if state.scope == "head" else _joint(batch, state, ref)


def dft_v1(batch: dict, state: ScorerState) -> Weigher:
    """q = exp(-CE_k(t)) of the model being trained, w = q * n / sum(q) per group, clip-normalised (§3.4)."""
    return HeadWeigher(state, _valid(batch), None) if state.scope == "head" else _joint(batch, state, None)


SCORERS: dict[str, Callable[[dict, ScorerState], Weigher]] = {
    "uniform": uniform,
    "critic_delta_v1": critic_delta_v1,
    "rho1_excess_v1": rho1_excess_v1,
    "dft_v1": dft_v1,
}


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
    import matplotlib  # only for the plot

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
