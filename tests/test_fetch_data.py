"""scripts/fetch_data.py: CI's benchmark data from the HF hub (no secrets) or the S3 copy of shared/data.

This machine cannot reach the hub, so the hub's repositories are rebuilt here from shared/data with the hub's file
names and parquet schemas (plus files the script must not fetch), and a stand-in for the download serves them
through huggingface_hub's own pattern filter (the one snapshot_download applies to `allow_patterns`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import data
from config import REPO, default_data_root
from tests import servers

s3_server, s3_env = servers.s3_server, servers.s3_env  # pytest fixtures (a real moto S3 server)

ROOT = Path(default_data_root())
_spec = importlib.util.spec_from_file_location("fetch_data", REPO / "scripts" / "fetch_data.py")
fetch_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch_data)

CC_TEST = "data/test-00000-of-00001-9c49eeff30aacaa8.parquet"
DECOY = "1_A. Not One Of The 73"


def _parquet(path: Path, rows: list[dict], schema=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _deepmind(rec: dict) -> dict:
    """A shared/data CodeContests record in DeepMind's schema, the hub's column order (hidden split in two)."""
    hidden = rec.get("hidden_tests", {"input": [], "output": []})
    cut = len(hidden["input"]) // 3
    part = lambda a, b: {k: v[a:b] for k, v in hidden.items()}  # noqa: E731
    no_code = {"language": [], "solution": []}
    return {
        "name": rec["name"],
        "description": rec["description"],
        "public_tests": rec["public_tests"],
        "private_tests": part(0, cut),
        "generated_tests": part(cut, None),
        "source": 2,
        "difficulty": rec["difficulty"],
        "solutions": no_code,
        "incorrect_solutions": no_code,
        "cf_contest_id": rec["cf_contest_id"],
        "cf_index": rec["name"].split(".")[0].split("_")[1],
        "cf_points": 0.0,
        "cf_rating": 0,
        "cf_tags": rec["cf_tags"],
        "is_description_translated": False,
        "untranslated_description": "",
        "time_limit": rec["time_limit"],
        "memory_limit_bytes": 256_000_000,
        "input_file": "",
        "output_file": "",
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """{repo id: a local copy of that hub repository}, built from shared/data in the hub's layout."""
    import pyarrow as pa

    base = tmp_path_factory.mktemp("hub")
    mbpp = data.load_mbpp(ROOT / "mbpp")
    text, texts = pa.string(), pa.list_(pa.string())
    schema = pa.schema(  # the hub's MBPP columns, in its order
        [("task_id", pa.int32()), ("text", text), ("code", text), ("test_list", texts),
         ("test_setup_code", text), ("challenge_test_list", texts)]
    )  # fmt: skip
    for split in data.MBPP_SPLITS:
        rows = [{c: p[c] for c in schema.names} for p in data.mbpp_split(mbpp, split)]
        _parquet(base / "mbpp" / "full" / f"{split}-00000-of-00001.parquet", rows, schema)
    _parquet(base / "mbpp" / "sanitized" / "test-00000-of-00001.parquet", [{"task_id": 11, "prompt": "x"}])

    he = data.load_humaneval(ROOT).values()
    cols = ["task_id", "prompt", "canonical_solution", "test", "entry_point"]
    _parquet(
        base / "he" / "openai_humaneval" / "test-00000-of-00001.parquet",
        [{c: p[c] for c in cols} for p in he],
    )

    with open(ROOT / "codecontests" / "test_partial_73.jsonl") as f:
        cc = [_deepmind(json.loads(line)) for line in f]
    decoy = dict(cc[0], name=DECOY)
    split = cc[40:] + [decoy] + cc[:40]  # another order, and a problem of the split that is not wanted
    _parquet(base / "cc" / CC_TEST, split)
    _parquet(base / "cc" / "data" / "train-00000-of-00039-0123456789abcdef.parquet", [decoy])
    _parquet(base / "cc" / "data" / "valid-00000-of-00001-0123456789abcdef.parquet", [decoy])
    return {
        "google-research-datasets/mbpp": base / "mbpp",
        "openai/openai_humaneval": base / "he",
        "deepmind/code_contests": base / "cc",
    }


class StandIn:
    """Serves a local repository as snapshot_download would: only the files that pass `allow_patterns`."""

    def __init__(self, repos: dict[str, Path], out: Path):
        self.repos, self.out, self.served = repos, out, {}

    def __call__(self, hub_id: str, patterns: list[str]) -> Path:
        from huggingface_hub.utils import filter_repo_objects

        repo = self.repos[hub_id]
        files = [p.relative_to(repo).as_posix() for p in sorted(repo.rglob("*")) if p.is_file()]
        snap = self.out / hub_id.replace("/", "--")
        self.served[hub_id] = sorted(filter_repo_objects(files, allow_patterns=patterns))
        for rel in self.served[hub_id]:
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / rel, snap / rel)
        return snap


def test_hub_data_loads_like_shared_data(tmp_path, hub):
    get = StandIn(hub, tmp_path / "downloads")
    out = tmp_path / "ci-data"
    assert fetch_data.fetch(out, get=get) == "mbpp 974, humaneval 164, codecontests 73 problems"
    assert (
        get.served
        == {  # only the needed files were fetched (not sanitized MBPP, CodeContests train / valid)
            "google-research-datasets/mbpp": [
                f"full/{s}-00000-of-00001.parquet" for s in sorted(data.MBPP_SPLITS)
            ],
            "openai/openai_humaneval": ["openai_humaneval/test-00000-of-00001.parquet"],
            "deepmind/code_contests": [CC_TEST],
        }
    )
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        fetch_data.REQUIRED_FILES
    )
    assert data.load_mbpp(out / "mbpp") == data.load_mbpp(ROOT / "mbpp")
    for (
        split
    ) in data.MBPP_SPLITS:  # the split files hold the same records, in the same order, keys in Google's
        shared = (ROOT / "mbpp" / f"{split}.jsonl").read_text().splitlines()
        fetched = (out / "mbpp" / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in fetched] == [json.loads(line) for line in shared]
        assert list(json.loads(fetched[0])) == list(json.loads(shared[0]))
    assert data.load_humaneval(out) == data.load_humaneval(ROOT)
    cc = data.load_codecontests(out)
    assert cc == data.load_codecontests(ROOT) and list(cc) == list(fetch_data.CODECONTESTS_73)
    with open(out / fetch_data.CODECONTESTS_FILE) as f, open(ROOT / fetch_data.CODECONTESTS_FILE) as g:
        for mine, theirs in zip(
            map(json.loads, f), map(json.loads, g), strict=True
        ):  # what test_data reads raw
            assert (
                mine["test_case_count"] == theirs["test_case_count"]
            )  # counted here, CodeT's official count there
            assert (
                mine["time_limit"] == theirs["time_limit"] and mine["public_tests"] == theirs["public_tests"]
            )
            assert "solutions" not in mine and "hidden_tests" not in mine

    with pytest.raises(data.DataError, match="is not empty: delete it first"):
        fetch_data.fetch(out, get=get)


def test_hub_split_without_a_problem_fails_and_writes_nothing(tmp_path, hub):
    short = tmp_path / "cc"
    with open(ROOT / fetch_data.CODECONTESTS_FILE) as f:
        _parquet(short / CC_TEST, [_deepmind(json.loads(f.readline()))])  # only the first of the 73
    get = StandIn({**hub, "deepmind/code_contests": short}, tmp_path / "downloads")
    with pytest.raises(data.DataError, match=r"missing \['1575_B. Building an Amusement Park', .*\(72\)"):
        fetch_data.fetch(tmp_path / "ci-data", get=get)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cc", "downloads"]  # no output, no temp dir left


def test_cli_hub_path_goes_through_s3cache_and_respects_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WMTP_CI_DATA_S3_URI", raising=False)
    rc = fetch_data.main(["--out", str(tmp_path / "ci-data"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 1 and "from the HF hub" in err
    assert "hub 'google-research-datasets/mbpp': StorageError: HF_HUB_OFFLINE is set" in err
    assert not (tmp_path / "ci-data").exists()


def test_cli_s3_copy_of_shared_data(tmp_path, s3_env, capsys):
    client = servers.s3_client(s3_env)
    client.create_bucket(Bucket="ci-data")
    for rel in fetch_data.REQUIRED_FILES:
        client.put_object(Bucket="ci-data", Key=f"wmtp/shared-data/{rel}", Body=(ROOT / rel).read_bytes())
    out = tmp_path / "ci-data"
    argv = [
        "--out",
        str(out),
        "--s3-uri",
        "s3://ci-data/wmtp/shared-data",
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert fetch_data.main(argv) == 0
    assert capsys.readouterr().out.endswith("codecontests 73 problems, from S3 (WMTP_CI_DATA_S3_URI)\n")
    for rel in fetch_data.REQUIRED_FILES:
        assert (out / rel).read_bytes() == (ROOT / rel).read_bytes(), rel
    assert not list(out.rglob(".wmtp-complete*"))  # s3cache's marker stays in the cache
