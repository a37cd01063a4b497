"""Benchmark loaders, prompt templates, tokenised datasets and batching.

The prompt functions here are the single source of truth for both training and evaluation, so the text a model is
fine-tuned on and the text it is evaluated on can never drift apart. Every loader validates its records and names
the file, line and field when something is off, before any work starts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import s3cache
import synthetic
from errors import UserError

# --------------------------------------------------------------------------- MBPP

log = logging.getLogger("wmtp.data")

MBPP_FILES = ("prompt.jsonl", "test.jsonl", "validation.jsonl", "train.jsonl")
MBPP_SINGLE = "mbpp.jsonl"
MBPP_SPLITS: dict[str, tuple[int, int]] = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 974),
}
MBPP_FIELDS: dict[str, type] = {
    "task_id": int,
    "text": str,
    "code": str,
    "test_list": list,
    "test_setup_code": str,
    "challenge_test_list": list,
}
MBPP_FEWSHOT_IDS = (2, 3, 4)


class DataError(UserError, ValueError):
    """A data problem: the message names the file (and line / field) and what was expected."""


def _check_record(rec: Any, fields: dict[str, type], where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for name, tp in fields.items():
        if name not in rec:
            raise DataError(f"{where}: missing field '{name}' (expected {tp.__name__})")
        value = rec[name]
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise DataError(f"{where}: field '{name}' should be {tp.__name__}, got {type(value).__name__}")
        if tp is list and not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: field '{name}' should be a list of strings")
    return rec


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; gzip when the name ends in .gz. A line that is
    not UTF-8 or not JSON is a DataError naming the file, the line and the column."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                at = f"byte {raw[e.start]:#04x} at column {e.start + 1}"
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({at})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:  # "Unterminated string starting at": the column says where
                msg = e.msg.removesuffix(" at")
                raise DataError(f"{path}:{lineno}: invalid JSON ({msg} at column {e.colno})") from None


def mbpp_files(root: str | os.PathLike) -> list[Path]:
    """The MBPP source files in `root`; [] when there are none.

    The four split files, else a single mbpp.jsonl, else the HF hub layout (full/<split>-*.parquet, what
    s3cache's hub fallback downloads).
    """
    root = Path(root)
    split_files = [root / name for name in MBPP_FILES]
    if all(p.is_file() for p in split_files):
        return split_files
    if (root / MBPP_SINGLE).is_file():
        return [root / MBPP_SINGLE]
    parquet = [sorted((root / "full").glob(f"{split}-*.parquet")) for split in MBPP_SPLITS]
    if all(parquet):
        return [p for files in parquet for p in files]
    return []


def _read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) with where = "file:line" (JSON lines) or "file row N" (parquet)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path} row {i}", rec
    else:
        for lineno, rec in _read_jsonl(path):
            yield f"{path}:{lineno}", rec


def load_mbpp(root: str | os.PathLike) -> dict[int, dict]:
    """Read MBPP (Google's original schema) from a directory; returns {task_id: record}."""
    files = mbpp_files(root)
    if not files:
        raise DataError(
            f"{root}: no MBPP data: expected the files {', '.join(MBPP_FILES)}, a single {MBPP_SINGLE} "
            "or the HF hub layout full/<split>-*.parquet"
        )
    problems: dict[int, dict] = {}
    for path in files:
        for where, rec in _read_records(path):
            _check_record(rec, MBPP_FIELDS, where)
            if rec["task_id"] in problems:
                raise DataError(f"{where}: duplicate task_id {rec['task_id']}")
            if not rec["test_list"]:
                raise DataError(f"{where}: field 'test_list' is empty (expected at least one assert)")
            problems[rec["task_id"]] = rec
    return problems


def mbpp_split(problems: dict[int, dict], split: str) -> list[dict]:
    """The problems of one split (task_id ranges of MBPP_SPLITS), sorted by task_id."""
    if split not in MBPP_SPLITS:
        raise DataError(f"unknown MBPP split {split!r}: expected one of {', '.join(MBPP_SPLITS)}")
    lo, hi = MBPP_SPLITS[split]
    return [problems[t] for t in sorted(problems) if lo <= t <= hi]


def normalize_code(s: str) -> str:
    """Line endings to \\n, trailing whitespace off every line, no leading/trailing blank lines.

    Used for the training target and for evaluation's exact match, so both compare the same text.
    """
    lines = s.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def mbpp_target(problem: dict) -> str:
    """The completion a model is trained on: the reference code, normalised."""
    return normalize_code(problem["code"])


def _mbpp_block(problem: dict) -> str:
    # A docstring-like block then the code: the natural shape of Python files for a code model.
    return f'"""\n{problem["text"].strip()}\n{problem["test_list"][0].strip()}\n"""\n'


# A completion in the format above ends where the model starts a new block, a test, or a script body.
# None of these occurs in any normalised MBPP reference solution (checked in tests/test_data.py).
MBPP_SHOT_SEP = "\n\n\n"
MBPP_STOP: list[str] = ['\n"""', "\nassert", "\nif __name__", "\nprint(", MBPP_SHOT_SEP]


def mbpp_prompt(problem: dict, template: str = "zero_shot", fewshot: list[dict] | None = None) -> str:
    """The prompt for one MBPP problem.

    zero_shot: the problem text and its first test in a docstring block; the code follows.
    three_shot: tasks 2, 3, 4 (block + reference code, separated by blank lines) then the zero-shot prompt.
    `fewshot` are those three problems (records); required for three_shot.
    """
    if template == "zero_shot":
        return _mbpp_block(problem)
    if template == "three_shot":
        if not fewshot:
            raise DataError(
                "mbpp_prompt(template='three_shot') needs fewshot=[tasks 2, 3, 4] (mbpp_fewshot())"
            )
        shots = "".join(_mbpp_block(p) + mbpp_target(p) + MBPP_SHOT_SEP for p in fewshot)
        return shots + _mbpp_block(problem)
    raise DataError(f"unknown MBPP template {template!r}: expected 'zero_shot' or 'three_shot'")


def mbpp_fewshot(problems: dict[int, dict]) -> list[dict]:
    """The few-shot examples of the three_shot template (tasks 2, 3, 4)."""
    missing = [t for t in MBPP_FEWSHOT_IDS if t not in problems]
    if missing:
        raise DataError(f"three_shot template needs MBPP tasks {MBPP_FEWSHOT_IDS}; missing {missing}")
    return [problems[t] for t in MBPP_FEWSHOT_IDS]


# --------------------------------------------------------------------------- HumanEval

HUMANEVAL_FIELDS: dict[str, type] = {
    "task_id": str,
    "prompt": str,
    "entry_point": str,
    "canonical_solution": str,
    "test": str,
}
# The completion is a function body: it ends at the next top-level statement.
HUMANEVAL_STOP: list[str] = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def _find_file(root: str | os.PathLike, subdir: str, name: str) -> Path:
    """`root` may be the data root (holding `subdir/name`), the subdirectory, or the file itself."""
    root = Path(root)
    for cand in (root, root / name, root / subdir / name):
        if cand.is_file():
            return cand
    raise DataError(f"{root}: no {name} (looked for {root}, {root / name} and {root / subdir / name})")


def load_humaneval(root: str | os.PathLike) -> dict[str, dict]:
    """Read HumanEval (gzip or plain JSON lines); returns {task_id: record} in file order."""
    path = _find_file(root, "humaneval", "HumanEval.jsonl.gz")
    problems: dict[str, dict] = {}
    for lineno, rec in _read_jsonl(path):
        _check_record(rec, HUMANEVAL_FIELDS, f"{path}:{lineno}")
        problems[rec["task_id"]] = rec
    return problems


def humaneval_prompt(problem: dict) -> str:
    """The HumanEval prompt is the function signature and docstring itself."""
    return problem["prompt"]


# --------------------------------------------------------------------------- CodeContests

CODECONTESTS_INSTRUCTION = (
    "Write a Python 3 program that reads from standard input and writes to standard output."
)
CODECONTESTS_STOP: list[str] = ['\n"""', "\n\n\n\n"]
_DEFAULT_TIME_LIMIT_S = 2.0


def _tests(rec: dict, key: str, where: str) -> list[tuple[str, str]]:
    t = rec.get(key)
    if t is None:
        return []
    if (
        not isinstance(t, dict)
        or not isinstance(t.get("input"), list)
        or not isinstance(t.get("output"), list)
    ):
        raise DataError(f"{where}: field '{key}' should be {{'input': [str], 'output': [str]}}")
    if len(t["input"]) != len(t["output"]):
        raise DataError(f"{where}: field '{key}' has {len(t['input'])} inputs but {len(t['output'])} outputs")
    return list(zip(t["input"], t["output"], strict=True))


def _time_limit(rec: dict, where: str) -> float:
    tl = rec.get("time_limit")
    if tl is None:
        return _DEFAULT_TIME_LIMIT_S
    if isinstance(tl, (int, float)) and not isinstance(tl, bool):
        return float(tl)
    if isinstance(tl, dict):
        seconds = (tl.get("seconds") or 0) + (tl.get("nanos") or 0) / 1e9
        return float(seconds) if seconds > 0 else _DEFAULT_TIME_LIMIT_S
    raise DataError(f"{where}: field 'time_limit' should be {{'seconds': int, 'nanos': int}}, got {tl!r}")


def _codecontests_record(rec: Any, where: str) -> dict:
    _check_record(rec, {"name": str, "description": str}, where)
    public = _tests(rec, "public_tests", where)
    if "hidden_tests" in rec:  # the 73-problem file: private + generated merged
        rest = _tests(rec, "hidden_tests", where)
    else:  # the original DeepMind schema
        rest = _tests(rec, "private_tests", where) + _tests(rec, "generated_tests", where)
    tests = public + rest
    if not tests:
        raise DataError(f"{where}: problem {rec['name']!r} has no tests")
    count = rec.get("test_case_count")
    if count is not None and count != len(tests):
        raise DataError(
            f"{where}: problem {rec['name']!r} has {len(tests)} tests, test_case_count says {count}"
        )
    return {
        "name": rec["name"],
        "description": rec["description"],
        "tests": tests,
        "n_public": len(public),
        "time_limit_s": _time_limit(rec, where),
        "difficulty": rec.get("difficulty"),
        "cf_tags": rec.get("cf_tags", []),
    }


def load_codecontests(root: str | os.PathLike) -> dict[str, dict]:
    """Read CodeContests JSON lines (a file, a directory of *.jsonl, or <root>/codecontests/*.jsonl).

    Returns {name: {"name", "description", "tests": [(input, output)], "n_public", "time_limit_s", ...}} with the
    public tests first. Accepts the original schema (public/private/generated_tests) and the 73-problem file's
    (public_tests + hidden_tests).
    """
    root = Path(root)
    if root.is_file():
        files = [root]
    else:
        folder = root / "codecontests" if (root / "codecontests").is_dir() else root
        files = sorted(folder.glob("*.jsonl"))
        if not files:
            raise DataError(f"{root}: no CodeContests data: expected *.jsonl in {folder}")
    problems: dict[str, dict] = {}
    for path in files:
        for lineno, rec in _read_jsonl(path):
            prob = _codecontests_record(rec, f"{path}:{lineno}")
            problems[prob["name"]] = prob
    return problems


def codecontests_prompt(problem: dict) -> str:
    """The statement and the I/O instruction in a docstring block; the program follows."""
    statement = problem["description"].strip().replace('"""', "'''")
    return f'"""\n{statement}\n\n{CODECONTESTS_INSTRUCTION}\n"""\n'


# --------------------------------------------------------------------------- tokenisation


def load_tokenizer(cfg: Any, model_dir: Path | None):
    """The run's tokenizer: model.tokenizer, else the model directory's; a pad token (EOS) when it has none."""
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    path = Path(cfg.model.tokenizer) if cfg.model.tokenizer else model_dir
    if path is None or not path.exists():
        raise DataError(f"{cfg.source}: '{key}' = {str(path)!r} does not exist (the tokenizer directory)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise DataError(
            f"{cfg.source}: '{key}' = {str(path)!r}: no tokenizer could be loaded ({str(e).splitlines()[0]})"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """BOS (when the tokenizer has one) + prompt tokens: what training puts before the completion.

    Evaluation must encode prompts with this too, so generation starts from exactly the training context. A
    tokenizer without BOS (Qwen's) gives the prompt's tokens alone, as Qwen's models were trained.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def _fit(
    prompt: list[int], completion: list[int], max_length: int, keep: int = 1
) -> tuple[list[int], list[int]]:
    """Cut (BOS + prompt, completion + EOS) to at most max_length tokens.

    The completion keeps its start and gets at least half the row (or all it needs); the prompt gives up its
    oldest tokens after its first `keep` (the BOS: 1, none without one) first, because in the three_shot template
    the target task sits at the prompt's end and its first part is few-shot examples. build_dataset logs how many
    examples were cut.
    """
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    n_comp = max(max_length - len(prompt), min(len(completion), max_length // 2))
    n_prompt = max_length - n_comp
    head = prompt[:keep] if n_prompt > 0 else []
    prompt = head + (prompt[len(prompt) - (n_prompt - len(head)) :] if n_prompt > len(head) else [])
    return prompt, completion[:n_comp]


def tokenize_examples(
    tokenizer: Any, prompts: list[str], completions: list[str], max_length: int | None
) -> list[tuple[list[int], list[bool]]]:
    """(input_ids, loss_mask) per example: BOS + tokens of (prompt + completion) + EOS, mask True on the
    completion's tokens and EOS. With a tokenizer that has no BOS (Qwen's) a row starts with the prompt's first
    token (nothing predicts it; it is a prompt token, outside the loss anyway).

    Prompt and completion are tokenised as ONE text, as the model reads them: tokenised alone, a completion gets
    a word-initial piece (SentencePiece's "▁def", a one-space indent) that the model never sees after the
    prompt's newline. The completion's tokens are the ones that end past the prompt (character offsets, so a fast
    tokenizer is needed). Evaluation encodes the prompt alone (`encode_prompt`): the same tokens unless a token
    straddles the boundary, which is counted in a warning. Rows longer than max_length are cut by `_fit`.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos_token: set one")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} is a slow (Python) tokenizer: data.py needs the "
            "character offsets of a fast one (a directory with tokenizer.json, loaded by AutoTokenizer)"
        )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out, straddling = [], 0
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"], strict=True):
        n = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
        straddling += n < len(ids) and offsets[n][0] < len(prompt)
        p, c = bos + list(ids[:n]), list(ids[n:]) + [eos]
        if max_length is not None:
            p, c = _fit(p, c, max_length, keep=len(bos))
        out.append((p + c, [False] * len(p) + [True] * len(c)))
    if straddling:
        log.warning(
            f"data: in {straddling} of {len(texts)} examples a token spans the end of the prompt and the start of "
            "the completion: it is trained on, and evaluation's prompt (encoded alone) ends differently"
        )
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: vocab, merges, normaliser, special tokens (not the path it came from)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time state that transformers toggles; it does not change ids
        spec.pop("padding", None)
    else:
        spec = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    spec["special"] = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- where the data comes from


def resolve_dataset_dir(cfg: Any) -> Path:
    """The MBPP directory: data.path if set and complete, else <storage.data_root>/mbpp, else s3cache."""
    if cfg.data.dataset != "mbpp":
        raise DataError(f"{cfg.source}: 'data.dataset' = {cfg.data.dataset!r}: only 'mbpp' is supported")
    tried = []
    local = [Path(cfg.data.path)] if cfg.data.path else []
    for cand in [*local, Path(cfg.storage.data_root) / "mbpp"]:
        if mbpp_files(cand):
            return cand
        tried.append(f"{cand} (no {'/'.join(MBPP_FILES)}, {MBPP_SINGLE} or full/*.parquet)")
    try:  # the S3 mirror of data.resource, then the HF hub (data.hub_id): s3cache lists what it tried
        path = s3cache.resolve(
            cfg.data.resource, None, cfg.storage, "dataset", hub_id=cfg.data.hub_id or None
        )
    except s3cache.StorageError as e:
        tried.append(str(e))
    else:
        if mbpp_files(path):
            return Path(path)
        tried.append(f"{path} (mirrored, but it holds no MBPP files)")
    raise DataError(f"{cfg.source}: MBPP not found; tried:\n  - " + "\n  - ".join(tried))


def data_fingerprint(root: str | os.PathLike) -> str:
    """Content hash of the MBPP source files (file names and bytes; not where they live)."""
    h = hashlib.sha256()
    for path in mbpp_files(root):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def run_data_hash(cfg: Any) -> str:
    """The data identity a run records (MLflow's data.hash, the model card): the MBPP files' content, or what
    decides the synthetic rows."""
    if cfg.data.dataset == "synthetic":
        return synthetic.fingerprint(cfg)
    return data_fingerprint(resolve_dataset_dir(cfg))


# --------------------------------------------------------------------------- tokenised dataset + cache

PREPROCESS_VERSION = 2  # bump when prompt format or tokenisation rules change: invalidates every cache
STATS = {"built": 0, "loaded": 0}  # how build_dataset got its result (tests check cache hits with it)


def dataset_cache_key(cfg: Any, tokenizer: Any, split: str, root: str | os.PathLike | None = None) -> str:
    """Hash of everything that decides the tokenised rows, and nothing else (paths and train.* excluded)."""
    root = resolve_dataset_dir(cfg) if root is None else root
    parts = {
        "version": PREPROCESS_VERSION,
        "data": data_fingerprint(root),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": cfg.data.template,
        "max_length": cfg.data.max_length,
        "packing": cfg.data.packing,
        "split": split,
        "seed": cfg.data.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _pack(rows: list[tuple[list[int], list[bool]]], max_length: int, pad_id: int) -> list[tuple[list, list]]:
    """Concatenate examples and cut rows of exactly max_length; the last row is right-padded (mask False).

    Attention is not blocked between packed examples (plain causal mask), as in most packing setups.
    """
    ids = [t for r in rows for t in r[0]]
    mask = [m for r in rows for m in r[1]]
    out = []
    for i in range(0, len(ids), max_length):
        chunk, cmask = ids[i : i + max_length], mask[i : i + max_length]
        pad = max_length - len(chunk)
        out.append((chunk + [pad_id] * pad, cmask + [False] * pad))
    return out


def pad_token_id(tokenizer: Any) -> int:
    """pad_token_id, else eos (padding is masked out, so the id only has to be valid)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def _build_rows(cfg: Any, tokenizer: Any, split: str, root: Path) -> dict[str, list]:
    problems = load_mbpp(root)
    examples = mbpp_split(problems, split)
    if not examples:
        lo, hi = MBPP_SPLITS[split]
        raise DataError(
            f"{root}: MBPP split {split!r} is empty: none of the {len(problems)} problems read has a task_id in "
            f"{lo}..{hi} (data.train_split / data.val_split)"
        )
    fewshot = mbpp_fewshot(problems) if cfg.data.template == "three_shot" else None
    random.Random(cfg.data.seed).shuffle(examples)
    prompts = [mbpp_prompt(p, cfg.data.template, fewshot) for p in examples]
    # Packed examples may span rows, so only unpacked rows are cut to max_length.
    limit = None if cfg.data.packing else cfg.data.max_length
    rows = tokenize_examples(tokenizer, prompts, [mbpp_target(p) for p in examples], limit)
    cut = sum(1 for r in rows if not r[1][-1] or r[0][-1] != tokenizer.eos_token_id)
    if cut:
        log.warning(
            f"data: {cut} of {len(rows)} {split} examples cut to data.max_length = {cfg.data.max_length}"
        )
    if cfg.data.packing:
        rows = _pack(rows, cfg.data.max_length, pad_token_id(tokenizer))
        task_ids = [-1] * len(rows)
    else:
        task_ids = [p["task_id"] for p in examples]
    return {
        "input_ids": [r[0] for r in rows],
        "loss_mask": [r[1] for r in rows],
        "task_id": task_ids,
        "index": list(range(len(rows))),
    }


def build_dataset(cfg: Any, tokenizer: Any, split: str) -> Any:
    """The tokenised split as a `datasets.Dataset` (input_ids, loss_mask, task_id, index), cached on disk.

    Rows are in a fixed order shuffled with data.seed (packing decides which examples share a row); `index` is
    the row number, stable for a given cache key. The cache lives at <storage.cache_dir>/datasets/<name>-<key>
    and is written to a temp dir then renamed, so a half-written cache is never read.
    """
    import datasets

    if cfg.data.dataset == "synthetic":
        return synthetic_dataset(cfg, tokenizer, split)
    root = resolve_dataset_dir(cfg)
    key = dataset_cache_key(cfg, tokenizer, split, root)
    path = Path(cfg.storage.cache_dir) / "datasets" / f"{cfg.data.dataset}-{split}-{key}"
    if not path.is_dir():
        features = datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int32")),
                "loss_mask": datasets.List(datasets.Value("bool")),
                "task_id": datasets.Value("int64"),
                "index": datasets.Value("int64"),
            }
        )
        ds = datasets.Dataset.from_dict(_build_rows(cfg, tokenizer, split, root), features=features)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        bars = not datasets.utils.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            ds.save_to_disk(str(tmp))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is ordinary shared output
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():  # not a lost race with another process: a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if bars:
                datasets.enable_progress_bars()
        STATS["built"] += 1
    else:
        STATS["loaded"] += 1
    return datasets.load_from_disk(str(path))


# --------------------------------------------------------------------------- batching


def _columns(ds: Any) -> tuple[list[list[int]], list[list[bool]], list[int], list[int]]:
    cols = ds[:] if not isinstance(ds, dict) else ds
    return list(cols["input_ids"]), list(cols["loss_mask"]), list(cols["task_id"]), list(cols["index"])


EXTRA_COLUMNS = ("token_class", "reward")  # optional: the synthetic benchmark's per-token class and reward


def _extra_columns(ds: Any) -> dict[str, list]:
    names = ds.keys() if isinstance(ds, dict) else ds.column_names
    return {k: list(ds[k]) for k in EXTRA_COLUMNS if k in names}


def collate(
    ids: list[list[int]],
    masks: list[list[bool]],
    index: list[int],
    task_id: list[int],
    pad_id: int,
    extra: dict[str, list] | None = None,
) -> dict[str, Any]:
    """The batch dict of docs/DESIGN.md, right-padded to the longest row; `extra` rows of EXTRA_COLUMNS become
    "token_class" [B, S] (-1 on padding) and "reward" [B]."""
    import torch

    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for b, (row, m) in enumerate(zip(ids, masks, strict=True)):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        loss_mask[b, : len(m)] = torch.tensor(m, dtype=torch.bool)
    out = {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "index": torch.tensor(index, dtype=torch.long),
        "task_id": torch.tensor(task_id, dtype=torch.long),
    }
    extra = extra or {}
    if "token_class" in extra:
        cls = torch.full((len(ids), width), -1, dtype=torch.long)
        for b, row in enumerate(extra["token_class"]):
            cls[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        out["token_class"] = cls
    if "reward" in extra:
        out["reward"] = torch.tensor(extra["reward"], dtype=torch.float64)
    return out


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int) -> list[int]:
    """This rank's row order for one epoch: like DistributedSampler(drop_last=True), same permutation on all ranks."""
    import torch

    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    per_rank = n // world_size
    return order[: per_rank * world_size][rank::world_size]


def order_seed(cfg: Any) -> int:
    """The seed of the order the training loader deals rows in (each epoch reshuffled from it + epoch).

    MBPP: `train.seed`, so the replicates of a sweep (seed_keys = ["train.seed"]) see the data in other orders,
    while `data.seed` (42) keeps fixing the cached rows and the validation subset. The synthetic benchmark keeps
    `data.seed`, which also generates its corpus: the study (configs/sweeps/synthetic.toml) sets both keys to the
    seed, and its prerequisite runs (train.seed 0, data.seed 1000 / 2000) must train as they did."""
    return cfg.data.seed if cfg.data.dataset == "synthetic" else cfg.train.seed


def batches_per_epoch(n_rows: int, batch_size: int, world_size: int) -> int:
    """Batches each rank takes from one epoch of `make_loader` (the rows that do not fill one are dropped)."""
    return (n_rows // world_size) // batch_size


def make_loader(
    ds: Any,
    batch_size: int,
    pad_id: int,
    seed: int = 42,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    epoch_start: int = 0,
    skip_batches: int = 0,
) -> Iterator[dict]:
    """Training batches forever: each epoch reshuffled from seed + epoch, each rank a disjoint shard.

    Incomplete batches are dropped so every rank takes the same number of steps. `skip_batches` skips that many
    batches of this stream (possibly whole epochs) without collating them, so a resumed run that passes the
    number of batches it consumed continues exactly where it stopped.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"make_loader: rank {rank} is not in [0, world_size={world_size})")
    ids, masks, task_id, index = _columns(ds)
    extra = _extra_columns(ds)
    per_epoch = batches_per_epoch(len(ids), batch_size, world_size)
    if per_epoch == 0:
        raise DataError(
            f"make_loader: {len(ids)} rows over {world_size} rank(s) do not fill one batch of {batch_size}: "
            "lower train.micro_batch_size or use a larger split"
        )
    epoch, skip = epoch_start + skip_batches // per_epoch, skip_batches % per_epoch
    while True:
        order = epoch_order(len(ids), seed, epoch, shuffle, rank, world_size)
        for b in range(skip, per_epoch):
            rows = order[b * batch_size : (b + 1) * batch_size]
            yield collate(
                [ids[i] for i in rows],
                [masks[i] for i in rows],
                [index[i] for i in rows],
                [task_id[i] for i in rows],
                pad_id,
                {k: [col[i] for i in rows] for k, col in extra.items()},
            )
        epoch, skip = epoch + 1, 0


def eval_batches(ds: Any, batch_size: int, pad_id: int) -> Iterator[dict]:
    """Every row once, in order, no shuffle; the last batch may be smaller."""
    ids, masks, task_id, index = _columns(ds)
    extra = _extra_columns(ds)
    for s in range(0, len(ids), batch_size):
        sl = slice(s, s + batch_size)
        yield collate(
            ids[sl], masks[sl], index[sl], task_id[sl], pad_id, {k: c[sl] for k, c in extra.items()}
        )


# --------------------------------------------------------------------------- synthetic benchmark: synthetic.py's rows as token ids


def _synthetic_ids(tokenizer: Any) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    missing = [w for w in synthetic.SYN_VOCAB if w not in vocab]
    if missing:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} lacks the synthetic words {missing[:5]}: "
            "use the word-level tokenizer built by tiny.py (.cache/tiny/synthetic_tokenizer)"
        )
    return vocab


def synthetic_rows(cfg: Any, tokenizer: Any, split: str) -> dict[str, list]:
    """The columns of one split: input_ids, loss_mask (all but BOS), token_class (-1 on BOS), task_id (-1),
    index, and reward (the fraction of target tokens that are not noise: the critic's `dataset` reward)."""
    sc = cfg.data.synthetic
    if split == "test":  # the clean held-out set: the same rows for every data.seed
        n, seed, corrupt, junk = sc.n_test, f"test:{sc.test_seed}", 0.0, 0.0
    elif split in ("train", "validation"):
        n, seed, corrupt, junk = (
            getattr(sc, "n_train" if split == "train" else "n_val"),
            split,
            sc.corrupt,
            sc.junk,
        )
        seed = f"{seed}:{cfg.data.seed}"
    else:
        raise DataError(f"synthetic data has the splits train, validation and test, not {split!r}")
    rng, rule, vocab = (
        random.Random(f"synthetic:{seed}"),
        synthetic.chain_rule(sc.rule_seed),
        _synthetic_ids(tokenizer),
    )
    cols: dict[str, list] = {
        k: [] for k in ("input_ids", "loss_mask", "token_class", "task_id", "index", "reward")
    }
    for i in range(n):
        words, classes = synthetic.example(rng, rule, sc, cfg.data.max_length - 1, corrupt, junk)
        cols["input_ids"].append([tokenizer.bos_token_id] + [vocab[w] for w in words])
        cols["loss_mask"].append([False] + [True] * len(words))
        cols["token_class"].append([-1] + classes)
        cols["task_id"].append(-1)
        cols["index"].append(i)
        cols["reward"].append(
            1.0 - sum(c in (synthetic.JUNK, synthetic.CORRUPT) for c in classes) / len(classes)
        )
    return cols


def synthetic_dataset(cfg: Any, tokenizer: Any, split: str) -> Any:
    """synthetic_rows as a `datasets.Dataset` (built in memory: generating is faster than reading a cache)."""
    import datasets

    return datasets.Dataset.from_dict(synthetic_rows(cfg, tokenizer, split))


def synthetic_prompts(cfg: Any, tokenizer: Any) -> list[tuple[str, list[int], list[int]]]:
    """n_test clean held-out (task, prompt ids, answer ids), the tasks in turn: `copy s.. =`, `nest b.. =`,
    `chain x`; the answer is what the rule determines (the analogue of a unit-tested completion)."""
    sc = cfg.data.synthetic
    rng, rule, vocab = (
        random.Random(f"prompts:{sc.test_seed}"),
        synthetic.chain_rule(sc.rule_seed),
        _synthetic_ids(tokenizer),
    )
    out = []
    for i in range(sc.n_test):
        task = sc.tasks[i % len(sc.tasks)]
        words, classes = synthetic.segment(task, rng, rule, sc)
        cut = classes.index(synthetic.LEARNABLE)
        ids = [vocab[w] for w in words]
        out.append((task, [tokenizer.bos_token_id] + ids[:cut], ids[cut:]))
    return out
