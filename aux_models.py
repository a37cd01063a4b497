"""The frozen models the scorers consult, and what they compute once per training example.

- `Rewards` (critic_delta_v1, spec §3.2): the sequence reward of each example, from a reward model (an HF
  sequence-classification model with one output, run on the decoded text with its own tokenizer), from the
  sandbox (`tests`: 1 when the completion passes its MBPP problem's tests) or from the dataset's own column;
  cached by example index and z-scored over the whole train set (`check_reward_spread` refuses rewards that
  cannot rank the examples).
- `Reference` (rho1_excess_v1, §3.3): a frozen causal LM with the base tokenizer; CE_ref at every position,
  cached per example in memory and on disk (`rho1.precompute`).

Both models sit whole on every rank or FSDP2-sharded over the ranks (`train.aux_models`). A sharded model's every
forward is a collective, so passes over the train set deal their chunks out over the ranks with idle forwards
where a rank has none (`parallel.split_map`), and lazy forwards happen on every rank or on none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import data
import evaluate
import formats
import parallel as P
import s3cache
import sandbox
from errors import UserError
from files import atomic_write
from normalize import STD_EPS  # the z-score of the critic's rewards is §3.1's

REWARD_MIN_SPREAD = 1e-4  # std / max(1, |mean|) below this is rounding of one value, not a ranking

Row = tuple[int, list[int], list[bool], int]  # (index, input_ids, loss_mask, task_id) of one training example


class ScoreError(UserError, ValueError):
    """A scorer cannot be set up (a missing or mismatched reference / reward model): the message says which key."""


class RewardError(ValueError):
    """The critic's rewards cannot rank the training examples (the message says why and what to use instead)."""


def dataset_rows(ds: Any) -> list[Row]:
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


def aux_dtype(cfg: Any, device: torch.device) -> torch.dtype:
    """bf16 on a GPU when the run computes in bf16, else fp32."""
    return torch.bfloat16 if device.type == "cuda" and cfg.model.dtype == "bfloat16" else torch.float32


def place(m: nn.Module, cfg: Any, device: torch.device, sharded: bool) -> nn.Module:
    """A frozen model onto the device: whole on every rank (`train.aux_models = "replicate"`) or FSDP2-sharded over
    the ranks ("shard" under torchrun; each forward is then a collective)."""
    m = m.eval().requires_grad_(False)
    if not sharded:
        return m.to(device)
    total = sum(p.numel() for p in m.parameters())
    P.shard_frozen(m, P.aux_blocks(m), aux_dtype(cfg, device) == torch.bfloat16, device)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in m.parameters())
    n = P.rank_world()[1]
    P.print0(f"score: {type(m).__name__} FSDP2-sharded over {n} ranks: {local} of {total} parameters here")
    return m


def _split_map(items: list, size: int, run: Callable[[list], list], sharded: bool) -> list:
    """`P.split_map` over the whole train set (the same `items` on every rank). With a sharded model a rank out of
    chunks calls run([]) (an idle forward), so every rank makes the same number of forwards."""
    return P.split_map(items, size, run, idle=(lambda: run([])) if sharded else None)


# --------------------------------------------------------------------------- the critic's rewards


def texts(tokenizer: Any, ids: list[int], mask: list[bool]) -> tuple[str, str]:
    """(prompt + completion, completion) decoded with the base tokenizer, special tokens and padding dropped."""
    last = max((j for j, m in enumerate(mask) if m), default=len(ids) - 1)
    full = tokenizer.decode(ids[: last + 1], skip_special_tokens=True)
    completion = tokenizer.decode([t for t, m in zip(ids, mask, strict=False) if m], skip_special_tokens=True)
    return full, completion


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


class Rewards:
    """Raw sequence rewards by example index (`values`) and their z-score statistics over the train set (`norm`).

    The reward model is loaded lazily (only while rewards are missing) and freed once every training example has
    its cached reward, so it holds no memory during training.
    """

    def __init__(
        self, cfg: Any, tokenizer: Any, device: torch.device, dataset: Any = None, sharded: bool = False
    ):
        self.cfg, self.kind, self.tokenizer, self.device = cfg, cfg.critic.reward, tokenizer, device
        self.dataset, self.sharded = dataset, sharded
        self.values: dict[int, float] = {}
        self.norm: tuple[float, float] | None = None  # (mean, std) over the whole train set, once known
        self.model: Any = None
        self.model_tokenizer: Any = None
        self.problems: dict[int, dict] | None = None  # MBPP problems by task_id (reward "tests")
        self.dir: Path | None = None
        cc = cfg.critic
        if self.kind == "model":
            if not cc.reward_model and not cc.reward_resource:
                raise ScoreError(
                    f"{cfg.source}: critic.reward = 'model' needs 'critic.reward_model' (an HF sequence-"
                    "classification checkpoint directory with one label) or 'critic.reward_resource'"
                )
            self.dir = s3cache.resolve_model(cfg, "reward")
            if not (self.dir / "config.json").is_file():
                raise ScoreError(
                    f"{cfg.source}: 'critic.reward_model' = {str(self.dir)!r} has no config.json "
                    "(expected an HF AutoModelForSequenceClassification checkpoint)"
                )

    def load_model(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # only for reward "model"

        tok = AutoTokenizer.from_pretrained(str(self.dir))
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ScoreError(
                    f"reward model tokenizer {self.dir} has neither pad_token nor eos_token: set one"
                )
            tok.pad_token = tok.eos_token
        rm = AutoModelForSequenceClassification.from_pretrained(
            str(self.dir), dtype=aux_dtype(self.cfg, self.device)
        )
        if rm.config.num_labels != 1:
            raise ScoreError(
                f"reward model {self.dir}: expected num_labels = 1 (a scalar reward), got {rm.config.num_labels}"
            )
        if rm.config.pad_token_id is None:  # HF finds the last real token of each row through it
            rm.config.pad_token_id = tok.pad_token_id
        self.model = place(rm, self.cfg, self.device, self.sharded)
        self.model_tokenizer = tok

    def free_model(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def forward(self, texts: list[str]) -> list[float]:
        """One reward-model forward: a scalar per text, with its own tokenizer (re-tokenised from text).

        No texts: a 1-token forward whose output is dropped (a rank's share of a sharded model's collective forward).
        """
        if self.model is None:
            self.load_model()
        tok, rm = self.model_tokenizer, self.model
        if not texts:
            ids = torch.tensor([[tok.pad_token_id]], device=self.device)
            rm(input_ids=ids, attention_mask=torch.ones_like(ids))
            return []
        limit = min(int(tok.model_max_length), int(getattr(rm.config, "max_position_embeddings", 1 << 30)))
        enc = tok(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        logits = rm(**{k: v.to(self.device) for k, v in enc.items()}).logits
        return logits[:, 0].float().cpu().tolist()

    def model_rewards(self, texts: list[str]) -> list[float]:
        """This rank's texts in chunks of `critic.reward_batch_size` (sharded: the busiest rank's forward count)."""
        bs = self.cfg.critic.reward_batch_size
        chunks = [texts[i : i + bs] for i in range(0, len(texts), bs)]
        rounds = len(chunks)
        if self.sharded:
            rounds = int(P.all_reduce(torch.tensor([rounds], device=self.device), "max").item())
        return [v for r in range(rounds) for v in self.forward(chunks[r] if r < len(chunks) else [])]

    def check_task_ids(self, task_ids: list[int]) -> None:
        """Load the MBPP problems once; every task id must be one of them."""
        if self.problems is None:
            self.problems = data.load_mbpp(data.resolve_dataset_dir(self.cfg))
        for tid in task_ids:
            if tid not in self.problems:
                raise KeyError(
                    f"critic.reward = 'tests': task_id {tid} is not an MBPP problem (packed rows have -1)"
                )

    def test_rewards(self, completions: list[str], task_ids: list[int]) -> list[float]:
        """1.0 when the completion passes its MBPP problem's tests in the sandbox, else 0.0 (parallel sandboxes)."""
        self.check_task_ids(task_ids)
        timeout = float(self.cfg.eval.timeout)

        def one(j: int) -> float:
            problem = self.problems[task_ids[j]]
            return float(evaluate.judge_completion("mbpp", problem, completions[j], timeout)["passed"])

        return sandbox.map_parallel(one, list(range(len(task_ids))), self.cfg.eval.workers)

    def compute(self, rows: list[Row], split: bool = False) -> None:
        """Raw rewards of the rows into the cache.

        split: the rows are the same on every rank (the train set): each rank scores its share (`_split_map`).
        """
        pairs = [texts(self.tokenizer, ids, mask) for _, ids, mask, _ in rows]
        if self.kind == "model":
            fulls = [full for full, _ in pairs]
            bs = self.cfg.critic.reward_batch_size
            values = _split_map(fulls, bs, self.forward, self.sharded) if split else self.model_rewards(fulls)
        else:
            jobs = [(comp, tid) for (_, comp), (*_, tid) in zip(pairs, rows, strict=True)]
            self.check_task_ids([tid for _, tid in jobs])  # on every rank, before the work is split

            def run(c: list) -> list[float]:
                return self.test_rewards([comp for comp, _ in c], [tid for _, tid in c])

            share = max(1, math.ceil(len(jobs) / P.rank_world()[1]))  # one sandbox pool per rank
            values = _split_map(jobs, share, run, self.sharded) if split else run(jobs)
        self.values.update({int(i): float(v) for (i, *_), v in zip(rows, values, strict=True)})

    def stored(self) -> dict[int, float]:
        """critic.reward = "dataset": {index: reward} from the dataset's `reward` column."""
        cols = self.dataset if isinstance(self.dataset, dict) else self.dataset[:]
        if "reward" not in cols:
            raise ScoreError(
                "critic.reward = 'dataset': the training set has no 'reward' column (data.dataset = 'synthetic' "
                "has)"
            )
        return {int(i): float(r) for i, r in zip(cols["index"], cols["reward"], strict=True)}

    def compute_all(self) -> None:
        """Every training example's reward up front, z-scored over the whole train set; then free the model."""
        if self.kind == "dataset":  # stored with each example (the synthetic benchmark's)
            self.values.update(self.stored())
        rows = [r for r in dataset_rows(self.dataset) if r[0] not in self.values]
        if rows:
            P.print0(f"score: rewards ({self.kind}) for {len(rows)} training examples")
            self.compute(rows, split=True)
        vals = torch.tensor(list(self.values.values()), dtype=torch.float64)
        self.free_model()
        check_reward_spread(vals, self.kind)
        self.norm = (float(vals.mean()), float(vals.std(unbiased=False))) if vals.numel() else (0.0, 1.0)

    def of_batch(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(raw, z-scored) rewards [B] for the batch's examples (cached by batch["index"]).

        With the train set known (`dataset`), statistics are over all of it; otherwise they are running statistics
        over the examples seen so far (an example's z-score then drifts while new examples arrive).
        """
        if self.dataset is not None and self.norm is None:
            self.compute_all()
        index = [int(i) for i in batch["index"].tolist()]
        if self.kind == "dataset":
            if "reward" not in batch:
                raise ScoreError(
                    "critic.reward = 'dataset': the batch has no 'reward' (data.dataset = 'synthetic')"
                )
            self.values.update(zip(index, batch["reward"].tolist(), strict=True))
        missing = [b for b, i in enumerate(index) if i not in self.values]
        need = bool(missing)
        if self.sharded and self.kind == "model":
            need = P.any_rank(need, self.device)  # a sharded reward model forwards on every rank or on none
        if need:
            ids, mask = batch["input_ids"].tolist(), batch["loss_mask"].tolist()
            tid = batch["task_id"].tolist() if "task_id" in batch else [-1] * len(index)
            self.compute([(index[b], ids[b], [bool(m) for m in mask[b]], int(tid[b])) for b in missing])
        raw = torch.tensor([self.values[i] for i in index], dtype=torch.float64)
        if self.norm is not None:
            mean, std = self.norm
        else:
            vals = torch.tensor(list(self.values.values()), dtype=torch.float64)
            mean, std = float(vals.mean()), float(vals.std(unbiased=False))
        return raw, (raw - mean) / (std + STD_EPS)


# --------------------------------------------------------------------------- rho1's reference model


def check_same_tokenizer(base: Any, ref_dir: str | os.PathLike, key: str = "rho1.ref_model") -> None:
    """Raise a clear error unless the tokenizer saved in `ref_dir` gives the base tokenizer's ids: the same vocab
    and specials, and (fast tokenizers) the same normaliser, pre-tokenizer and merges.

    The reference scores the base's token ids, so equal vocabularies make each id the same string; the rules that
    split text must agree too, or the reference scores sequences it never produces (byte-level BPEs of the same
    vocabulary differ in their split rule: Llama 3 keeps up to 3 digits together, Qwen one). A tokenizer without
    BOS (Qwen's) matches only another without one.
    """
    from transformers import AutoTokenizer  # only for rho1

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
            "model's (the same vocabulary split differently gives other ids for the same text); rho1 needs the "
            "SAME tokenizer for both models"
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


class Reference:
    """The frozen reference model (same tokenizer as the base, checked) and CE_ref per training example (`ce`)."""

    def __init__(
        self, cfg: Any, tokenizer: Any, device: torch.device, dataset: Any = None, sharded: bool = False
    ):
        rc = cfg.rho1
        if not rc.ref_model and not rc.ref_resource:
            raise ScoreError(
                f"{cfg.source}: loss.scorer = 'rho1_excess_v1' needs 'rho1.ref_model' (a reference causal LM "
                "directory with the base tokenizer) or 'rho1.ref_resource'"
            )
        self.cfg, self.tokenizer, self.device, self.dataset, self.sharded = (
            cfg,
            tokenizer,
            device,
            dataset,
            sharded,
        )
        self.dir = s3cache.resolve_model(cfg, "reference")
        check_same_tokenizer(tokenizer, self.dir)
        self.is_hf = rc.ref_format == "hf"
        if self.is_hf:
            from transformers import AutoModelForCausalLM  # only for an HF reference

            ref = AutoModelForCausalLM.from_pretrained(str(self.dir), dtype=aux_dtype(cfg, device))
            n_out = ref.get_output_embeddings().weight.shape[0]
        else:
            ref = formats.load_model(self.dir, rc.ref_format, 1).to(aux_dtype(cfg, device))
            n_out = ref.args.vocab_size
        if n_out < len(tokenizer):
            raise ScoreError(
                f"'rho1.ref_model' = {str(self.dir)!r}: {n_out} output logits < {len(tokenizer)} tokens"
            )
        self.model = place(ref, cfg, device, sharded)
        self.ce: dict[int, Tensor] = {}  # CE_ref per position, per example index
        self.cache_ready = False

    @torch.no_grad()
    def token_ce(self, input_ids: Tensor) -> Tensor:
        """CE_ref(j) = -log p_ref(x_j | x_<j) at every position j [B, S] float32 (0 at j = 0).

        Logits at position j - 1 predict token j. Rows are right-padded, so no attention mask is needed for the
        positions that matter (causal attention never looks right).
        """
        ids = input_ids.to(self.device)
        out = self.model(ids)
        logits = out.logits if self.is_hf else out[:, :, 0]
        ce = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        for b in range(ids.shape[0]):  # one row's fp32 logits at a time
            ce[b, 1:] = F.cross_entropy(logits[b, :-1].float(), ids[b, 1:], reduction="none")
        return ce

    def cache_path(self) -> Path:
        """<storage.cache_dir>/rho1_ref_ce/<hash of the train rows' token ids + reference identity>.pt"""
        h = hashlib.sha256()
        for i, ids, _, _ in dataset_rows(self.dataset):
            h.update(f"{i}:{len(ids)}:".encode() + torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        h.update(f"{self.cfg.rho1.ref_format}:{_dir_fingerprint(self.dir)}".encode())
        return Path(self.cfg.storage.cache_dir) / "rho1_ref_ce" / f"{h.hexdigest()[:24]}.pt"

    def rows_ce(self, rows: list[Row]) -> dict[int, Tensor]:
        """CE_ref of every row (the whole train set, the same on every rank) in micro-batch-sized forwards, the
        chunks dealt out over the ranks (`_split_map`; a rank out of chunks runs a 1-token idle forward)."""
        pad = data.pad_token_id(self.tokenizer)

        def run(chunk: list) -> list[Tensor]:
            width = max((len(r[1]) for r in chunk), default=1)
            ids = torch.tensor(
                [r[1] + [pad] * (width - len(r[1])) for r in chunk] or [[pad]], dtype=torch.long
            )
            ce = self.token_ce(ids).cpu()
            return [ce[b, : len(r[1])].clone() for b, r in enumerate(chunk)]

        ces = _split_map(rows, self.cfg.train.micro_batch_size, run, self.sharded)
        return {r[0]: ce for r, ce in zip(rows, ces, strict=True)}

    def ensure_cache(self) -> None:
        """Reference CE of every training example, once: read from the disk cache or computed and written
        atomically. Under torchrun the ranks decide together (the computation is split over them): any rank without
        the file makes every rank compute. Each rank then writes it (atomically), so node-local cache directories
        get it too."""
        if self.cache_ready or self.dataset is None:
            return
        path = self.cache_path()
        cached = path.is_file()
        if P.rank_world()[1] > 1:
            cached = not P.any_rank(not cached, self.device)
        if cached:
            self.ce = torch.load(path, weights_only=True)
            P.print0(f"score: reference CE of {len(self.ce)} examples from {path}")
        else:
            rows = dataset_rows(self.dataset)
            self.ce.update(self.rows_ce(rows))
            atomic_write(path, lambda tmp: torch.save(self.ce, tmp))
            P.print0(f"score: reference CE of {len(rows)} examples cached at {path}")
        self.cache_ready = True

    def of_batch(self, batch: dict) -> Tensor:
        """CE_ref [B, S] for the batch: from the per-example cache when `rho1.precompute`, else a forward."""
        ids = batch["input_ids"]
        if not self.cfg.rho1.precompute:
            return self.token_ce(ids)
        self.ensure_cache()
        index = [int(i) for i in batch["index"].tolist()]
        missing = any(i not in self.ce for i in index)  # no train set given, or rows outside it: fill lazily
        if self.sharded:
            missing = P.any_rank(
                missing, self.device
            )  # a sharded reference forwards on every rank or on none
        if missing:
            ce = self.token_ce(ids).cpu()
            for b, i in enumerate(index):
                self.ce.setdefault(i, ce[b].clone())
        B, S = ids.shape
        out = torch.zeros(B, S, dtype=torch.float32)
        for b, i in enumerate(index):
            row = self.ce[i][:S]
            out[b, : row.numel()] = row
        return out.to(self.device)
