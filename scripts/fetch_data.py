"""Fill a data root ($WMTP_DATA_DIR) with the benchmark files the tests read, where ../shared/data is absent (CI).

    python scripts/fetch_data.py [--out DIR] [--s3-uri s3://bucket/prefix] [--cache DIR]

DIR gets the layout of shared/data: mbpp/{prompt,test,validation,train}.jsonl, humaneval/HumanEval.jsonl.gz and
codecontests/test_partial_73.jsonl, from one of two sources:
- the S3 copy of shared/data, when --s3-uri (default $WMTP_CI_DATA_S3_URI) is set: mirrored by s3cache, copied as is;
- else the Hugging Face hub, through s3cache.resolve's hub fallback (HF_HUB_OFFLINE must be unset or 0), fetching
  only the files needed: MBPP from google-research-datasets/mbpp (full/*.parquet, read by data.load_mbpp), HumanEval
  from openai/openai_humaneval, and from deepmind/code_contests' test split the 73 problems of shared/data (the
  names below, in its order) in DeepMind's original schema, which data.load_codecontests reads.

What the hub path changes against shared/data: the bytes (JSON key order and escaping, the gzip header), never the
fields the loaders read. CodeContests keeps private_tests and generated_tests apart (shared/data merged them into
hidden_tests; the loader concatenates them in the same order), drops the solutions, has no codet_task_id, and its
test_case_count is counted from the hub's own tests (shared/data took it from CodeT's metadata; both are public +
private + generated). MBPP is the hub's revision: shared/data/README.md lists 3 tasks (341, 596, 642) that differ
between google-research revisions.
Every file is read back with the project's loaders before DIR is put in place, so DIR is complete or untouched.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import s3cache  # noqa: E402
from config import StorageConfig  # noqa: E402
from files import atomic_dir_swap  # noqa: E402

# (repo id, the only files to download)
MBPP_HUB = ("google-research-datasets/mbpp", ["full/*.parquet"])
HUMANEVAL_HUB = ("openai/openai_humaneval", ["openai_humaneval/test-*.parquet"])
CODECONTESTS_HUB = ("deepmind/code_contests", ["data/test-*.parquet"])

MBPP_KEYS = (
    "text",
    "code",
    "task_id",
    "test_setup_code",
    "test_list",
    "challenge_test_list",
)  # Google's order
CODECONTESTS_FILE = "codecontests/test_partial_73.jsonl"
CODECONTESTS_REQUIRED = (
    "name",
    "description",
    "public_tests",
    "private_tests",
    "generated_tests",
    "time_limit",
)
CODECONTESTS_OPTIONAL = (  # everything else of the original schema but the (large) solutions
    "source", "difficulty", "cf_contest_id", "cf_index", "cf_points", "cf_rating", "cf_tags",
    "is_description_translated", "untranslated_description", "memory_limit_bytes", "input_file", "output_file",
)  # fmt: skip
# The 73 test-split problems of shared/data/codecontests/test_partial_73.jsonl (names only; see its README).
CODECONTESTS_73 = (
    "1575_A. Another Sorting Problem", "1575_B. Building an Amusement Park", "1575_C. Cyclic Sum",
    "1575_D. Divisible by Twenty-Five", "1575_E. Eye-Pleasing City Park Tour", "1575_F. Finding Expected Value",
    "1575_G. GCD Festival", "1575_H. Holiday Wall Ornaments", "1575_I. Illusions of the Desert",
    "1575_J. Jeopardy of Dropped Balls", "1575_K. Knitting Batik", "1575_L. Longest Array Deconstruction",
    "1575_M. Managing Telephone Poles", "1579_A. Casimir's String Solitaire", "1579_B. Shifting Sort",
    "1579_C. Ticks", "1579_D. Productive Meeting", "1579_E2. Array Optimization by Deque",
    "1579_F. Array Stabilization (AND version)", "1579_G. Minimal Coverage", "1580_A. Portal",
    "1580_B. Mathematics Curriculum", "1580_C. Train Maintenance", "1580_D. Subsequence",
    "1580_E. Railway Construction", "1580_F. Problems for Codeforces", "1581_A. CQXYM Count Permutations",
    "1581_B. Diameter of Graph", "1582_A. Luntik and Concerts", "1582_B. Luntik and Subsequences",
    "1582_F1. Korney Korneevich and XOR (easy version)", "1582_F2. Korney Korneevich and XOR (hard version)",
    "1582_G. Kuzya and Homework", "1586_A. Windblume Ode", "1586_B. Omkar and Heavenly Tree",
    "1586_C. Omkar and Determination", "1586_D. Omkar and the Meaning of Life", "1586_E. Moment of Bloom",
    "1586_F. Defender of Childhood Dreams", "1586_G. Omkar and Time Travel", "1586_H. Omkar and Tours",
    "1586_I. Omkar and Mosaic", "1591_A. Life of a Flower", "1591_B. Array Eversion", "1591_C. Minimize Distance",
    "1591_D. Yet Another Sorting Problem", "1591_E. Frequency Queries", "1591_F. Non-equal Neighbours",
    "1594_A. Consecutive Sum Riddle", "1594_B. Special Numbers", "1594_C. Make Them Equal",
    "1594_D. The Number of Imposters", "1594_E2. Rubik's Cube Coloring (hard version)", "1598_A. Computer Game",
    "1598_F. RBS", "1599_A. Weights", "1600_E. Array Game", "1601_A. Array Elimination",
    "1603_D. Artistic Partition", "1604_A. Era", "1606_A. AB Balance", "1607_A. Linear Keyboard",
    "1608_G. Alphabetic Tree", "1613_A. Long Comparison", "1615_A. Closing The Gap", "1615_H. Reindeer Games",
    "1617_A. Forbidden Subsequence", "1618_A. Polycarp and Sums of Subsequences", "1619_A. Square String?",
    "1619_B. Squares and Cubes", "1620_A. Equal or Not Equal", "1622_A. Construct a Rectangle",
    "1623_A. Robot Cleaner",
)  # fmt: skip
REQUIRED_FILES = [f"mbpp/{s}.jsonl" for s in data.MBPP_SPLITS] + [
    "humaneval/HumanEval.jsonl.gz",
    CODECONTESTS_FILE,
]

HubGet = Callable[[str, list[str]], Path]  # (repo id, file patterns) -> a local directory holding those files


def hub_snapshot(cache_dir: str | os.PathLike) -> HubGet:
    """The real hub download: s3cache.resolve's hub fallback into <cache_dir>/hub (no local path, no S3)."""
    storage = StorageConfig(cache_dir=str(cache_dir))
    return lambda hub_id, patterns: s3cache.resolve(
        "", None, storage, "dataset", hub_id=hub_id, hub_patterns=patterns
    )


def _parquet_rows(
    root: Path, pattern: str, columns: tuple[str, ...] = (), optional: tuple[str, ...] = ()
) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted(root.glob(pattern))
    if not files:
        raise data.DataError(f"{root}: no {pattern} in the hub download")
    rows = []
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise data.DataError(f"{f}: missing column(s) {', '.join(missing)}")
        wanted = [*columns, *(c for c in optional if c in names)] or None
        rows += pq.read_table(f, columns=wanted).to_pylist()
    return rows


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    if path.suffix == ".gz":
        with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            gz.write(text)
    else:
        path.write_bytes(text)


def mbpp_from_hub(out: Path, get: HubGet) -> None:
    problems = data.load_mbpp(get(*MBPP_HUB))  # the hub layout full/<split>-*.parquet
    for split in data.MBPP_SPLITS:
        recs = [{k: p[k] for k in MBPP_KEYS} for p in data.mbpp_split(problems, split)]
        _write_jsonl(out / "mbpp" / f"{split}.jsonl", recs)


def humaneval_from_hub(out: Path, get: HubGet) -> None:
    rows = _parquet_rows(get(*HUMANEVAL_HUB), HUMANEVAL_HUB[1][0], tuple(data.HUMANEVAL_FIELDS))
    _write_jsonl(
        out / "humaneval" / "HumanEval.jsonl.gz", [{k: r[k] for k in data.HUMANEVAL_FIELDS} for r in rows]
    )


def codecontests_from_hub(out: Path, get: HubGet) -> None:
    """The 73 problems in shared/data's order; test_case_count = public + private + generated tests."""
    root = get(*CODECONTESTS_HUB)
    rows = _parquet_rows(root, CODECONTESTS_HUB[1][0], CODECONTESTS_REQUIRED, CODECONTESTS_OPTIONAL)
    wanted = set(CODECONTESTS_73)
    picked = [r for r in rows if r["name"] in wanted]
    names = [r["name"] for r in picked]
    missing = [n for n in CODECONTESTS_73 if n not in names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if missing or twice:
        raise data.DataError(
            f"{root}: the CodeContests test split should hold each of the 73 problems once; "
            f"missing {missing[:5]} ({len(missing)}), more than once {twice[:5]}"
        )
    picked.sort(key=lambda r: CODECONTESTS_73.index(r["name"]))
    for r in picked:
        tests = (r["public_tests"], r["private_tests"], r["generated_tests"])
        r["test_case_count"] = sum(len(t["input"]) for t in tests if t)
    _write_jsonl(out / CODECONTESTS_FILE, picked)


def copy_from_s3(out: Path, uri: str, cache_dir: str | os.PathLike) -> None:
    """Mirror the S3 copy of shared/data (s3cache: verified, cached) and copy it into `out`."""
    storage = StorageConfig(cache_dir=str(cache_dir))
    mirror = s3cache.resolve(uri, None, storage, "dataset", required_files=REQUIRED_FILES)
    shutil.copytree(mirror, out, ignore=shutil.ignore_patterns(s3cache.MARKER), dirs_exist_ok=True)


def check(root: Path) -> str:
    """Read everything back with the project's loaders; a summary line, or a DataError naming what is off."""
    mbpp = data.load_mbpp(root / "mbpp")
    if sorted(mbpp) != list(range(1, 975)):
        raise data.DataError(f"{root / 'mbpp'}: expected MBPP task_ids 1..974, got {len(mbpp)} tasks")
    he = data.load_humaneval(root)
    if list(he) != [f"HumanEval/{i}" for i in range(164)]:
        raise data.DataError(f"{root / 'humaneval'}: expected HumanEval/0..163 in order, got {len(he)} tasks")
    cc = data.load_codecontests(root)
    if list(cc) != list(CODECONTESTS_73):
        raise data.DataError(f"{root / 'codecontests'}: expected the 73 problems in order, got {len(cc)}")
    return f"mbpp {len(mbpp)}, humaneval {len(he)}, codecontests {len(cc)} problems"


def fetch(
    out: str | os.PathLike,
    s3_uri: str = "",
    cache_dir: str | os.PathLike = REPO / ".cache",
    get: HubGet | None = None,
) -> str:
    """Fill `out` (absent or empty) from S3 when `s3_uri` is set, else from the hub (`get`: tests pass a local
    stand-in for the hub download). Returns check()'s summary."""
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise data.DataError(f"{out} is not empty: delete it first (nothing was changed)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if s3_uri:
            copy_from_s3(tmp, s3_uri, cache_dir)
        else:
            get = get or hub_snapshot(cache_dir)
            for part in (mbpp_from_hub, humaneval_from_hub, codecontests_from_hub):
                part(tmp, get)
        summary = check(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the data from other users
        atomic_dir_swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default=os.environ.get("WMTP_DATA_DIR", ""), help="data root (default $WMTP_DATA_DIR)"
    )
    p.add_argument(
        "--s3-uri",
        default=os.environ.get("WMTP_CI_DATA_S3_URI", ""),
        help="S3 copy of shared/data (default $WMTP_CI_DATA_S3_URI; empty: the HF hub)",
    )
    p.add_argument("--cache", default=str(REPO / ".cache"), help="download cache (default .cache)")
    a = p.parse_args(argv)
    if not a.out:
        p.error("--out is required when WMTP_DATA_DIR is not set")
    source = "S3 (WMTP_CI_DATA_S3_URI)" if a.s3_uri else "the HF hub"
    try:
        summary = fetch(a.out, a.s3_uri, a.cache)
    except (data.DataError, s3cache.StorageError) as e:
        print(f"error: fetching benchmark data from {source} into {a.out}: {e}", file=sys.stderr)
        return 1
    print(f"{a.out}: {summary}, from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
