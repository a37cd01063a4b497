"""Benchmark loaders, prompt templates, tokenised datasets and batching.

The prompt functions here are the single source of truth for both training and evaluation, so the text a model is
fine-tuned on and the text it is evaluated on can never drift apart. Every loader validates its records and names
the file, line and field when something is off, before any work starts.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- MBPP

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


class DataError(ValueError):
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
    """Yield (line number, parsed object) for each non-blank line; gzip when the name ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def mbpp_files(root: str | os.PathLike) -> list[Path]:
    """The MBPP source files in `root`: the four split files, else a single mbpp.jsonl; [] when neither."""
    root = Path(root)
    split_files = [root / name for name in MBPP_FILES]
    if all(p.is_file() for p in split_files):
        return split_files
    if (root / MBPP_SINGLE).is_file():
        return [root / MBPP_SINGLE]
    return []


def load_mbpp(root: str | os.PathLike) -> dict[int, dict]:
    """Read MBPP (Google's original schema) from a directory; returns {task_id: record}."""
    files = mbpp_files(root)
    if not files:
        raise DataError(
            f"{root}: no MBPP data: expected the files {', '.join(MBPP_FILES)} or a single {MBPP_SINGLE}"
        )
    problems: dict[int, dict] = {}
    for path in files:
        for lineno, rec in _read_jsonl(path):
            where = f"{path}:{lineno}"
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


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """BOS (when the tokenizer has one) + prompt tokens: what training puts before the completion.

    Evaluation must encode prompts with this too, so generation starts from exactly the training context.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)
