"""Generation + scoring on MBPP, HumanEval and CodeContests (spec §5), and the model-free `judge` CLI.

    python evaluate.py judge --dataset {mbpp,codecontests,humaneval} --predictions FILE.jsonl --out METRICS.json
                             [--timeout S] [--workers N] [--data-root DIR] [--time-scale F]
    python evaluate.py CONFIG --checkpoint PATH [--datasets mbpp,codecontests,humaneval] [--n N] [--limit K]
                             [--out DIR] [--speculative] [--section.key=value ...]
    torchrun --nproc_per_node=4 evaluate.py CONFIG --checkpoint PATH ...   (generation split over the GPUs)

`--checkpoint` is any checkpoint directory, its format read from its files: ours (checkpoints/final), an HF Llama
(an `hf/` export or a model from elsewhere), Meta's (params.json). The tokenizer is model.tokenizer, else the
checkpoint directory's.

Every program runs in sandbox.py. Judging rules:
- MBPP: completion, then test_setup_code, then every assert of test_list (this order passes all 974 references).
- HumanEval: prompt + completion + test + `check(entry_point)`.
- CodeContests: stdin/stdout per test (public first), whitespace-token comparison, stop at the first failing test.
  The time limit per test is the problem's limit x `time_scale` (default 3: CPython on a shared 2-core machine is
  far slower than the C++ the limits were set for) + 1 s of interpreter start-up. Problems whose answer is not
  unique need a special checker, which the data does not have: they can only be judged by exact output here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import config
import data
import errors
import sandbox
import synthetic
from errors import UserError
from files import atomic_write_text

# torch, and the modules that import it (model, formats, generate, parallel), are imported inside the functions
# that use them: `evaluate.py judge` and `judge_completion` (the critic's tests reward) run without torch.

DATASETS = ("mbpp", "humaneval", "codecontests")
PASS_KS = (1, 5, 10, 100)
CHECKER_NOTE = (
    "CodeContests is judged by whitespace-token exact output; problems that accept several answers (a special "
    "checker on Codeforces) can be marked wrong here although correct."
)


class EvalError(UserError, ValueError):
    """Bad evaluation input: the message names the file/line and what was expected."""


class Stopped(Exception):
    """The evaluation stopped because its `should_stop()` said so (train.py: SIGTERM); it wrote nothing."""


class Progress:
    """'eval mbpp: judged 120/500 programs (31 s)' lines on long evaluations, as training shows its steps: at
    most one per `every` seconds, and the last. Thread-safe (judging counts from its worker threads)."""

    def __init__(self, what: str, total: int, show: bool = True, every: float = 10.0):
        self.what, self.total, self.show, self.every = what, total, show, every
        self.done, self.t0 = 0, time.monotonic()
        self._last, self._lock = self.t0, threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.show and (now - self._last >= self.every or self.done >= self.total):
                self._last = now
                print(f"eval {self.what} {self.done}/{self.total} ({now - self.t0:.0f} s)", flush=True)


# --------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased 1 - C(n-c, k) / C(n, k), as the stable product 1 - prod_{i=n-c+1..n} (1 - k / i)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# --------------------------------------------------------------------------- problems and programs


def load_problems(dataset: str, data_root: str | os.PathLike) -> dict:
    """{task key: problem} for one dataset (MBPP: int task_id; HumanEval: "HumanEval/i"; CodeContests: name)."""
    root = Path(data_root)
    if dataset == "mbpp":
        return data.load_mbpp(root / "mbpp")
    if dataset == "humaneval":
        return data.load_humaneval(root)
    if dataset == "codecontests":
        return data.load_codecontests(root)
    raise EvalError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")


def program(dataset: str, problem: dict, completion: str) -> str:
    """The assert-mode program that judges one completion (MBPP / HumanEval)."""
    if dataset == "mbpp":
        tests = "\n".join(problem["test_list"])
        return f"{completion}\n{problem['test_setup_code']}\n{tests}\n"
    if dataset == "humaneval":
        return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    raise EvalError(f"program(): {dataset!r} is judged by stdin/stdout, not by asserts")


def reference(dataset: str, problem: dict) -> str | None:
    """The reference completion (None for CodeContests: the data has no solutions)."""
    if dataset == "mbpp":
        return problem["code"]
    if dataset == "humaneval":
        return problem["canonical_solution"]
    return None


def tokens_equal(out: str, expected: str) -> bool:
    return out.split() == expected.split()


def judge_io(code: str, problem: dict, time_scale: float = 3.0, memory_mb: int = 1024) -> dict:
    """Run one CodeContests program on every test until the first failure."""
    timeout = problem["time_limit_s"] * time_scale + 1.0
    held: dict = {"isolation": {}, "memory_bound": ""}
    for i, (inp, expected) in enumerate(problem["tests"]):
        r = sandbox.run_program(code, inp, timeout, memory_mb, mode="io")
        held = {"isolation": r.isolation, "memory_bound": r.memory_bound}
        if r.status != "ok":
            return {"passed": False, "kind": r.status, "detail": f"test {i}: {r.detail}", **held}
        if not tokens_equal(r.stdout, expected):
            return {"passed": False, "kind": "wrong_answer", "detail": f"test {i}: output differs", **held}
    return {"passed": True, "kind": "ok", "detail": "", **held}


def _judge_one(dataset: str, problem: dict, completion: str, timeout: float, time_scale: float) -> dict:
    if dataset == "codecontests":
        return judge_io(completion, problem, time_scale)
    r = sandbox.run_program(program(dataset, problem, completion), "", timeout)
    return {
        "passed": r.passed,
        "kind": r.status,
        "detail": r.detail,
        "isolation": r.isolation,
        "memory_bound": r.memory_bound,
    }


def judge_completion(
    dataset: str, problem: dict, completion: str, timeout: float = 10.0, time_scale: float = 3.0
) -> dict:
    """Judge ONE completion of one problem in the sandbox, exactly as `judge` does for each of its jobs.

    For callers outside evaluation (the critic's `tests` reward). Returns {"passed": bool, "status": "ok" /
    "wrong_answer" / "timeout" / ... (the sandbox's verdict; also under "kind"), "detail": str, "isolation": ...}.
    `timeout` (s) bounds an MBPP / HumanEval program; CodeContests tests use `time_scale` x the problem's limit.
    """
    if dataset not in DATASETS:
        raise EvalError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    verdict = _judge_one(dataset, problem, completion, timeout, time_scale)
    return {**verdict, "status": verdict["kind"]}


def judge(
    dataset: str,
    problems: dict,
    predictions: dict[Any, list[str]],
    timeout: float = 10.0,
    workers: int = 0,
    time_scale: float = 3.0,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Score {task key: [completions]}; only the problems in `predictions` count. Returns the metrics dict.

    Progress lines on stdout; once `should_stop()` is true no further program starts (raises Stopped)."""
    missing = [k for k in predictions if k not in problems]
    if missing:
        raise EvalError(f"{dataset}: unknown task ids {missing[:5]}")
    jobs = [(key, i, c) for key, comps in predictions.items() for i, c in enumerate(comps)]
    progress = Progress(f"{dataset}: judged", len(jobs))

    def run(j: tuple) -> dict | None:
        if should_stop is not None and should_stop():
            return None
        verdict = _judge_one(dataset, problems[j[0]], j[2], timeout, time_scale)
        progress.add()
        return verdict

    verdicts = sandbox.map_parallel(run, jobs, workers)
    if any(v is None for v in verdicts):
        raise Stopped(f"{dataset}: judging stopped")
    per: dict[str, dict] = {}
    for (key, i, comp), v in zip(jobs, verdicts, strict=True):
        p = per.setdefault(str(key), {"passed": 0, "n": 0, "exact": 0, "failures": []})
        p["n"] += 1
        p["passed"] += int(v["passed"])
        ref = reference(dataset, problems[key])
        p["exact"] += int(ref is not None and data.normalize_code(comp) == data.normalize_code(ref))
        if not v["passed"]:
            p["failures"].append({"sample": i, "kind": v["kind"], "detail": v["detail"]})
    return _metrics(dataset, per, verdicts)


def _metrics(dataset: str, per: dict[str, dict], verdicts: list[dict]) -> dict:
    n_min = min((p["n"] for p in per.values()), default=0)
    out: dict[str, Any] = {"dataset": dataset}
    for k in PASS_KS:
        if 1 <= k <= n_min:
            out[f"pass@{k}"] = sum(pass_at_k(p["n"], p["passed"], k) for p in per.values()) / len(per)
    has_ref = dataset != "codecontests"
    out["exact_match"] = (
        sum(p["exact"] / p["n"] for p in per.values()) / len(per) if has_ref and per else None
    )
    out["n_problems"] = len(per)
    out["n_samples"] = sum(p["n"] for p in per.values())
    iso = [v["isolation"] for v in verdicts]
    out["network_isolated"] = bool(iso) and all(i.get("net") for i in iso)
    out["isolation"] = {
        layer: bool(iso) and all(i.get(layer) for i in iso) for layer in ("net", "pid", "mount", "user")
    }
    out["memory_bound"] = "; ".join(sorted({v["memory_bound"] for v in verdicts}))  # sandbox.memory_bound
    out["failure_kinds"] = dict(Counter(f["kind"] for p in per.values() for f in p["failures"]))
    if dataset == "codecontests":
        out["note"] = CHECKER_NOTE
    out["problems"] = per
    return out


def read_predictions(path: str | os.PathLike, dataset: str, problems: dict) -> dict[Any, list[str]]:
    """Parse FILE.jsonl lines {"task_id": ..., "completions": [str, ...]}; errors name the line."""
    preds: dict[Any, list[str]] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EvalError(
                    f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "task_id" not in rec or "completions" not in rec:
                raise EvalError(f"{where}: expected an object with 'task_id' and 'completions'")
            comps = rec["completions"]
            if not isinstance(comps, list) or not comps or not all(isinstance(c, str) for c in comps):
                raise EvalError(f"{where}: 'completions' must be a non-empty list of strings")
            key = rec["task_id"]
            if dataset == "mbpp" and isinstance(key, str) and key.isdigit():
                key = int(key)
            if key not in problems:
                raise EvalError(f"{where}: unknown task_id {rec['task_id']!r} for dataset {dataset}")
            if key in preds:
                raise EvalError(f"{where}: task_id {key!r} appears twice")
            preds[key] = comps
    if not preds:
        raise EvalError(f"{path}: no predictions")
    return preds


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- generation


def _prompts(cfg: Any, dataset: str, problems: dict, limit: int) -> list[tuple[Any, str]]:
    if dataset == "mbpp":
        recs = data.mbpp_split(problems, cfg.eval.split)
        fewshot = data.mbpp_fewshot(problems) if cfg.data.template == "three_shot" else None
        items = [(r["task_id"], data.mbpp_prompt(r, cfg.data.template, fewshot)) for r in recs]
    elif dataset == "humaneval":
        items = [(k, data.humaneval_prompt(p)) for k, p in problems.items()]
    else:
        items = [(k, data.codecontests_prompt(p)) for k, p in problems.items()]
    return items[:limit] if limit else items


STOPS = {"mbpp": data.MBPP_STOP, "humaneval": data.HUMANEVAL_STOP, "codecontests": data.CODECONTESTS_STOP}


def trim(text: str, stops: list[str]) -> str:
    """Cut the completion at the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def load_for_eval(cfg: Any, path: str | os.PathLike, fmt: str, device: Any) -> Any:
    """A checkpoint ready to generate on `device`: bf16 on a GPU (model.dtype = "bfloat16"), else fp32; eval mode."""
    import formats
    import parallel as P

    net = formats.load_model(path, fmt)  # the checkpoint's own heads (an HF export has head 1 only)
    return net.to(device=device, dtype=P.compute_dtype(device, cfg.model.dtype)).eval()


def prompt_ids(tokenizer: Any, prompts: list[str], room: int) -> list[list[int]]:
    """Each prompt as training encodes it (`data.encode_prompt`: BOS + the prompt's tokens), cut from the left
    (after BOS, when the tokenizer has one) to at most `room` tokens."""
    out, keep = [], int(tokenizer.bos_token_id is not None)
    for p in prompts:
        ids = data.encode_prompt(tokenizer, p)
        out.append(ids if len(ids) <= room else ids[:keep] + ids[len(ids) - room + keep :])
    return out


def generate(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    n: int,
    stops: list[str],
    spec_stats: list[dict] | None = None,
    should_stop: Callable[[], bool] | None = None,
    what: str = "",
) -> list[list[str]]:
    """n completions per prompt with head 1 (batched; prompts cut from the left to fit max_seq_len).

    Under torchrun every rank calls it with the same prompts and a whole (unsharded) model: the batches are dealt
    out over the ranks (`P.split_map`) and the completions gathered on every rank. Each batch, its rows and its
    sampling seed are the ones a single process would use, so the results do not depend on the world size.
    With `eval.speculative` the MTP heads draft and head 1 verifies (same outputs at temperature 0, same
    distribution otherwise); each batch's decoding statistics (`generate.decode`'s) are appended to `spec_stats`
    when given. Progress lines name `what` (rank 0); once `should_stop()` is true every row ends at its next token
    and the remaining batches are skipped (their completions are empty: the caller raises Stopped).
    """
    import generate as G
    import parallel as P

    e = cfg.eval
    room = model.args.context_len - e.max_new_tokens  # context_len: max_seq_len, or a shorter sliding window
    if room < 1:
        raise EvalError(f"eval.max_new_tokens = {e.max_new_tokens} leaves no room under max_seq_len")
    flat = [(i, ids) for i, ids in enumerate(prompt_ids(tokenizer, prompts, room)) for _ in range(n)]
    tail = 32  # stop strings are a few tokens long: decoding the tail keeps the check O(1) per step
    halt = should_stop or (lambda: False)
    stop = lambda row: halt() or any(s in tokenizer.decode(row[-tail:]) for s in stops)  # noqa: E731
    rank, world = P.rank_world()
    mine = sum(
        len(flat[s : s + e.batch_size]) for s in range(rank * e.batch_size, len(flat), world * e.batch_size)
    )
    share = f" (rank {rank}'s share)" if world > 1 else ""
    progress = Progress(f"{what}: generated{share}", mine, show=rank == 0 and bool(what))

    def run(chunk: list[tuple[int, tuple[int, list[int]]]]) -> list[tuple[str, dict | None]]:
        if halt():
            return [("", None)] * len(chunk)
        seed = cfg.train.seed + chunk[0][0]  # the batch's offset in `flat`
        sampling = G.Sampling(e.max_new_tokens, e.temperature, e.top_p, tokenizer.eos_token_id, stop, seed)
        ids = [ids for _, (_, ids) in chunk]
        rows, stats = G.decode(model, ids, sampling, data.pad_token_id(tokenizer), e.speculative)
        texts = [trim(tokenizer.decode(row, skip_special_tokens=True), stops) for row in rows]
        progress.add(len(chunk))
        # one statistics dict per batch, with its first row
        return [(text, stats if j == 0 and e.speculative else None) for j, text in enumerate(texts)]

    out: list[list[str]] = [[] for _ in prompts]
    results = P.split_map(list(enumerate(flat)), e.batch_size, run)  # gathered from every rank, in order
    for (i, _), (text, stats) in zip(flat, results, strict=True):
        out[i].append(text)
        if stats is not None and spec_stats is not None:
            spec_stats.append(stats)
    return out


def head_ce(model: Any, tokenizer: Any, prompts: list[str], refs: list[str], max_length: int, batch: int = 4):
    """Per-token CE of every head on prompt + reference: ([H] means, [H] lists of values).

    Under torchrun every rank calls it with the same inputs; the batches are split over the ranks as in `generate`.
    """
    import torch

    import model as M
    import parallel as P

    H = model.args.n_future_tokens
    rows = data.tokenize_examples(tokenizer, prompts, [data.normalize_code(r) for r in refs], max_length)
    dev = model.output.weight.device

    def run(part: list) -> list[list[list[float]]]:  # per row: H lists of CE values
        b = data.collate([r[0] for r in part], [r[1] for r in part], [0] * len(part), [0] * len(part), 0)
        ids, mask = b["input_ids"].to(dev), b["loss_mask"].to(dev)
        targets, valid = M.mtp_targets(ids, mask, H)
        ce = M.mtp_head_ce(model, model(ids, stage="trunk"), targets, valid)
        return [[ce[r, :, k][valid[r, :, k]].tolist() for k in range(H)] for r in range(len(part))]

    was = model.training
    model.eval()
    with torch.no_grad():
        per_row = P.split_map(rows, batch, run)
    model.train(was)
    values = [[v for row in per_row for v in row[k]] for k in range(H)]
    return [sum(v) / len(v) if v else float("nan") for v in values], values


def _plots(out_dir: Path, results: dict, ce_values: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for ds, vals in ce_values.items():
        fig, axes = plt.subplots(1, len(vals), figsize=(4 * len(vals), 3), squeeze=False)
        for k, v in enumerate(vals):
            axes[0][k].hist(v, bins=50)
            axes[0][k].set_title(f"{ds} head {k + 1} CE (mean {sum(v) / max(len(v), 1):.2f})")
        fig.tight_layout()
        fig.savefig(out_dir / f"head_ce_{ds}.png")
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ds, m in results.items():
        fracs = [p["passed"] / p["n"] for p in m["problems"].values()]
        axes[0].hist(fracs, bins=10, range=(0, 1), alpha=0.6, label=ds)
        kinds = dict(m["failure_kinds"], passed=sum(p["passed"] for p in m["problems"].values()))
        axes[1].bar([f"{ds}:{k}" for k in kinds], list(kinds.values()))
    axes[0].set_title("fraction of samples passing per problem")
    axes[0].legend()
    axes[1].set_title("sample outcomes")
    axes[1].tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "pass_fail.png")
    plt.close(fig)


def evaluate_model(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    datasets: list[str],
    n: int,
    limit: int,
    out_dir: str | os.PathLike,
    weight_histogram: str | os.PathLike | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Generate, judge, write the report dir; returns flat numeric metrics ("<dataset>/pass_at_1", ...).

    Under torchrun EVERY rank calls it (each with the whole model): generation and head CEs are split over the
    ranks, then rank 0 alone judges, writes the report and returns the metrics; the other ranks return {}.
    Progress lines on rank 0. Once `should_stop()` is true (on any rank) generation ends within a decoding step,
    judging starts no further program, and every rank raises Stopped at the next point where they agree.
    """
    import parallel as P

    main = P.rank_world()[0] == 0
    dev = model.output.weight.device

    def halt(stopped: bool = False) -> None:  # every rank calls it at the same points: an agreed stop
        if P.any_rank(stopped or (should_stop is not None and should_stop()), dev):
            raise Stopped("the evaluation was stopped")

    out = Path(out_dir)
    results, ce_values, flat, samples = {}, {}, {}, []
    for ds in datasets:
        problems = load_problems(ds, cfg.storage.data_root)
        items = _prompts(cfg, ds, problems, limit)
        if main:
            print(f"eval {ds}: {len(items)} problems x {n} samples", flush=True)
        spec_stats: list[dict] = []
        prompts = [p for _, p in items]
        comps = generate(cfg, model, tokenizer, prompts, n, STOPS[ds], spec_stats, should_stop, ds)
        halt()
        refs = [reference(ds, problems[k]) for k, _ in items]
        if refs and refs[0] is not None:
            ce = head_ce(model, tokenizer, prompts, refs, cfg.data.max_length)
        halt()
        stopped = False
        if main:
            preds = {key: c for (key, _), c in zip(items, comps, strict=True)}
            try:
                m = judge(ds, problems, preds, cfg.eval.timeout, cfg.eval.workers, should_stop=should_stop)
            except Stopped:
                stopped = True
        halt(stopped)
        if not main:
            continue
        if spec_stats:
            import generate as G

            m["speculative"] = G.speculative_summary(*spec_stats)
        if refs and refs[0] is not None:
            m["head_ce"], ce_values[ds] = ce
        results[ds] = m
        flat.update(_flat_metrics(ds, m))
        samples += _samples(ds, items, comps, refs, m)
    if not main:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    write_json(out / "metrics.json", results)
    _plots(out, results, ce_values)
    if weight_histogram and Path(weight_histogram).is_file():
        (out / "weight_histogram.png").write_bytes(Path(weight_histogram).read_bytes())
    return flat


def _flat_metrics(ds: str, m: dict) -> dict:
    """One dataset's report as the flat numbers MLflow logs: pass@k, exact match, head CEs, speculative stats."""
    flat = {f"{ds}/{k.replace('@', '_at_')}": v for k, v in m.items() if isinstance(v, float)}
    flat.update({f"{ds}/head{k + 1}_ce": v for k, v in enumerate(m.get("head_ce", []))})
    if "speculative" in m:
        spec = m["speculative"]
        flat[f"{ds}/spec_tokens_per_forward"] = spec["tokens_per_forward"]
        for k, rate in enumerate(spec["acceptance"]):
            if rate is not None:
                flat[f"{ds}/spec_acceptance_head{k + 2}"] = rate
    return flat


def _samples(ds: str, items: list, comps: list, refs: list, m: dict) -> list[dict]:
    """The first two completions of every problem with their verdicts, for samples.jsonl."""
    rows = []
    for (key, prompt), cs, ref in zip(items, comps, refs, strict=True):
        fails = {f["sample"]: f["kind"] for f in m["problems"][str(key)]["failures"]}
        for i, c in enumerate(cs[:2]):
            rows.append(
                {
                    "dataset": ds,
                    "task_id": key,
                    "prompt": prompt,
                    "completion": c,
                    "reference": ref,
                    "passed": i not in fails,
                    "kind": fails.get(i, "ok"),
                }
            )
    return rows


# --------------------------------------------------------------------------- synthetic benchmark (data.py)
#
# Known token classes make the weighting measurable: the scorer's weights per class of the pair's target token
# (accumulated by train.py over the run from the [B, S, H] weights of every step, before mixing with lambda), the
# AUROC of those weights for clean (learnable, random) vs noise (junk, corrupt) targets, the CE of each head per
# class on the clean held-out rows, and the exact-match rate of greedy completions of held-out prompts.

WEIGHT_BINS = 500  # histogram bins over [0, loss.w_max]: weights in one bin count as ties in the AUROC


def class_weight_counts(
    weights: Any, valid: Any, pair_class: Any, w_max: float, bins: int = WEIGHT_BINS
) -> Any:
    """[C, H, bins + 1] float64 for one batch of weights [B, S, H]: per token class of the pair's target
    (`pair_class` [B, S, H], < 0 for none) and per head, the counts of the valid weights in `bins` equal bins over
    [0, w_max] (the last bin also takes w_max and above), then the sum of those weights in the last slot."""
    import torch

    C, H = len(synthetic.TOKEN_CLASSES), weights.shape[-1]
    keep = valid.bool() & (pair_class >= 0)
    w = weights.detach().to(torch.float64)[keep]
    head = torch.arange(H, device=weights.device).expand_as(keep)[keep]
    row = pair_class[keep].long() * H + head
    b = (w / w_max * bins).floor().long().clamp(0, bins - 1)
    out = torch.zeros(C * H * (bins + 1), dtype=torch.float64, device=weights.device)
    out.index_add_(0, row * (bins + 1) + b, torch.ones_like(w))
    out.index_add_(0, row * (bins + 1) + bins, w)
    return out.view(C, H, bins + 1)


def auroc(pos: Any, neg: Any) -> float:
    """P(w_pos > w_neg) + P(w_pos = w_neg) / 2 from two histograms on the same bins (one bin = one value: ties
    counted half); nan when a side is empty."""
    import torch

    pos, neg = pos.double(), neg.double()
    n = float(pos.sum()) * float(neg.sum())
    if n == 0:
        return float("nan")
    below = torch.cumsum(neg, 0) - neg
    return float((pos * (below + neg / 2)).sum()) / n


def class_weight_metrics(counts: Any) -> dict[str, float]:
    """Mean weight per token class (all heads, and per head), noise / clean mean ratio, AUROC clean vs noise."""
    hist, sums = counts[..., :-1], counts[..., -1]
    n = hist.sum(-1)
    H = hist.shape[1]
    out: dict[str, float] = {}
    for c, name in enumerate(synthetic.TOKEN_CLASSES):
        out[f"synth/weight_{name}"] = float(sums[c].sum() / n[c].sum()) if n[c].sum() > 0 else float("nan")
        for k in range(H):
            out[f"synth/weight_{name}_head{k + 1}"] = (
                float(sums[c, k] / n[c, k]) if n[c, k] > 0 else float("nan")
            )
    clean, noise = [synthetic.LEARNABLE, synthetic.RANDOM], [synthetic.JUNK, synthetic.CORRUPT]
    w_clean = float(sums[clean].sum() / n[clean].sum()) if n[clean].sum() > 0 else float("nan")
    w_noise = float(sums[noise].sum() / n[noise].sum()) if n[noise].sum() > 0 else float("nan")
    out["synth/weight_noise_over_clean"] = w_noise / w_clean
    out["synth/auroc_clean_vs_noise"] = auroc(hist[clean].sum((0, 1)), hist[noise].sum((0, 1)))
    for k in range(H):
        out[f"synth/auroc_clean_vs_noise_head{k + 1}"] = auroc(hist[clean, k].sum(0), hist[noise, k].sum(0))
    return out


def evaluate_synthetic(cfg: Any, model: Any, tokenizer: Any, batch_size: int = 32) -> dict[str, float]:
    """On the clean held-out rows: mean CE of each head per token class of the target ("synth/ce_learnable_head1",
    and the mean over heads "synth/ce_learnable"); exact-match rate of greedy completions of the held-out prompts
    (the analogue of pass@1), per task and overall ("synth/exact_match"); the MTP heads' other use, drafting for
    self-speculative decoding of the same prompts (`synthetic_speculation`)."""
    import torch

    import model as M

    H = model.args.n_future_tokens
    dev = model.output.weight.device
    sums = torch.zeros(len(synthetic.TOKEN_CLASSES), H, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    was = model.training
    model.eval()
    with torch.no_grad():
        rows = data.synthetic_rows(cfg, tokenizer, "test")
        for b in data.eval_batches(rows, batch_size, data.pad_token_id(tokenizer)):
            ids, mask = b["input_ids"].to(dev), b["loss_mask"].to(dev)
            targets, valid = M.mtp_targets(ids, mask, H)
            cls = M.pair_scores(b["token_class"].to(dev), H)
            ce = M.mtp_head_ce(model, model(ids, stage="trunk"), targets, valid, chunk=cfg.model.ce_chunk)
            for c in range(len(synthetic.TOKEN_CLASSES)):
                sel = valid & (cls == c)
                sums[c] += torch.where(sel, ce, 0.0).double().sum((0, 1)).cpu()
                counts[c] += sel.sum((0, 1)).cpu()
        prompts = data.synthetic_prompts(cfg, tokenizer)
        width = max(len(a) for _, _, a in prompts)
        hits: dict[str, list[bool]] = {}
        for s in range(0, len(prompts), batch_size):
            part = prompts[s : s + batch_size]
            outs = model.generate(
                [p for _, p, _ in part], width, temperature=0.0, pad_id=data.pad_token_id(tokenizer)
            )
            for (task, _, answer), got in zip(part, outs, strict=True):
                hits.setdefault(task, []).append(got[: len(answer)] == answer)
        spec = synthetic_speculation(model, tokenizer, prompts, batch_size)
    model.train(was)
    out: dict[str, float] = {}
    for c, name in enumerate(synthetic.TOKEN_CLASSES[:2]):  # the held-out rows are clean: no junk, no corrupt
        for k in range(H):
            out[f"synth/ce_{name}_head{k + 1}"] = float(sums[c, k] / counts[c, k])
        out[f"synth/ce_{name}"] = float(sums[c].sum() / counts[c].sum())
    for task, h in hits.items():
        out[f"synth/exact_match_{task}"] = sum(h) / len(h)
    out["synth/exact_match"] = sum(sum(h) for h in hits.values()) / len(prompts)
    return out | spec


def synthetic_speculation(model: Any, tokenizer: Any, prompts: list, batch_size: int) -> dict[str, float]:
    """Greedy self-speculative decoding of the held-out prompts over their answers (deterministic). Prompts go in
    batches of similar answer length, each decoded to its longest answer, so the drafts are judged on the
    tokens the rule determines: "synth/spec_accept_head{k}" = drafts of head k accepted / verified (a draft is
    verified when every earlier draft of its block was accepted; absent when none of head k's was), and
    "synth/spec_tokens_per_forward" (generated tokens per trunk + head-1 pass; 1.0 for H = 1)."""
    import generate as G

    if model.args.n_future_tokens == 1:
        return {"synth/spec_tokens_per_forward": 1.0}
    by_length, pad, stats = sorted(prompts, key=lambda p: len(p[2])), data.pad_token_id(tokenizer), []
    for s in range(0, len(by_length), batch_size):
        part = by_length[s : s + batch_size]
        width = max(len(a) for _, _, a in part)
        greedy = G.Sampling(max_new_tokens=width, temperature=0.0)
        stats.append(G.decode(model, [p for _, p, _ in part], greedy, pad_id=pad, speculative=True)[1])
    total = G.speculative_summary(*stats)
    out = {"synth/spec_tokens_per_forward": float(total["tokens_per_forward"])}
    for k, rate in enumerate(total["acceptance"]):
        if rate is not None:
            out[f"synth/spec_accept_head{k + 2}"] = float(rate)
    return out


# --------------------------------------------------------------------------- CLI


def _judge_cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="evaluate.py judge", description="Score a predictions file (no model).")
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--predictions", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per MBPP/HumanEval program")
    ap.add_argument("--workers", type=int, default=0, help="parallel programs (0: all cores)")
    ap.add_argument("--data-root", default=config.default_data_root())
    ap.add_argument("--time-scale", type=float, default=3.0, help="CodeContests time-limit factor")
    a = ap.parse_args(argv)
    for flag, value, ok, want in (
        ("--timeout", a.timeout, 0 < a.timeout < math.inf, "seconds per program, a number > 0"),
        ("--workers", a.workers, a.workers >= 0, "parallel programs, an integer >= 0 (0: all cores)"),
        ("--time-scale", a.time_scale, 0 < a.time_scale < math.inf, "a factor of the time limits, > 0"),
    ):  # a timeout of 0 would judge every program a timeout, silently
        if not ok:
            raise EvalError(f"{flag} {value}: expected {want}")
    problems = load_problems(a.dataset, a.data_root)
    preds = read_predictions(a.predictions, a.dataset, problems)
    m = judge(a.dataset, problems, preds, a.timeout, a.workers, a.time_scale)
    write_json(a.out, m)
    print(json.dumps({k: v for k, v in m.items() if k not in ("problems",)}))
    return 0


def _model_cli(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    import formats
    import parallel as P

    overrides, rest = config.split_args(argv)
    ap = argparse.ArgumentParser(prog="evaluate.py", description="Generate with a checkpoint and judge.")
    ap.add_argument("config")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--datasets", default=None, help="comma list (default: eval.datasets)")
    ap.add_argument("--n", type=int, default=None, help="samples per problem, >= 1 (default: eval.n_samples)")
    ap.add_argument("--limit", type=int, default=None, help="first K problems, 0: all (default: eval.limit)")
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--speculative", action="store_true", help="draft with the MTP heads (= eval.speculative)"
    )
    a = ap.parse_args(rest)
    cfg = config.load_config(a.config, overrides)
    cfg.eval.speculative = cfg.eval.speculative or a.speculative
    ckpt = Path(a.checkpoint)
    if not ckpt.is_dir():
        raise EvalError(
            f"--checkpoint: {ckpt} is not a directory (a checkpoint: ours, an HF Llama or Meta's)"
        )
    if a.n is not None and a.n < 1:
        raise EvalError(f"--n {a.n}: expected the number of samples per problem, an integer >= 1")
    if a.limit is not None and a.limit < 0:
        raise EvalError(f"--limit {a.limit}: expected the number of problems, an integer >= 0 (0: all)")
    datasets = [d.strip() for d in a.datasets.split(",")] if a.datasets is not None else cfg.eval.datasets
    if not all(datasets):
        raise EvalError(
            f"--datasets {a.datasets!r}: an empty name; expected a comma list of {', '.join(DATASETS)}"
        )
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        raise EvalError(f"--datasets: unknown {bad}; expected a comma list of {', '.join(DATASETS)}")
    tok_dir = cfg.model.tokenizer or str(ckpt)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise EvalError(f"{tok_dir}: no tokenizer could be loaded ({str(e).splitlines()[0]})") from None
    d = P.init_distributed(cfg.train.device)  # the GPU when there is one; torchrun splits the generation
    try:
        try:  # the format from the files (ours, an HF export or any HF Llama, Meta), judged with its own heads
            net = load_for_eval(cfg, ckpt, formats.detect_format(ckpt), d.device)
        except (formats.CheckpointError, FileNotFoundError) as e:
            raise EvalError(f"--checkpoint: {e}") from None
        out = a.out or cfg.eval.report_dir or str(ckpt / "eval")
        n = cfg.eval.n_samples if a.n is None else a.n
        limit = cfg.eval.limit if a.limit is None else a.limit
        flat = evaluate_model(cfg, net, tokenizer, datasets, n, limit, out)
    finally:
        P.shutdown()
    if d.main:
        print(json.dumps(flat))
    return 0


def main(argv: list[str]) -> int:
    """`evaluate.py judge ...` or `evaluate.py CONFIG --checkpoint DIR`; expected failures print one line (errors.py)."""

    def run(args: list[str]) -> int:
        if args[:1] in (["--version"], ["-V"]):
            import tracking

            print(tracking.version())
            return 0
        return _judge_cli(args[1:]) if args[:1] == ["judge"] else _model_cli(args)

    return errors.main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
