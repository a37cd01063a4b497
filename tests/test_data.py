"""data.py on the real benchmark files: loaders, prompts, the tokenised cache and its key, batching."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

import data
from config import default_data_root, load_config
from tests import servers

s3_server, s3_env = servers.s3_server, servers.s3_env  # pytest fixtures (a real moto S3 server)

ROOT = Path(default_data_root())


@pytest.fixture(scope="module")
def mbpp() -> dict[int, dict]:
    return data.load_mbpp(ROOT / "mbpp")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="module", params=["bpe", "llama", "llama3", "qwen"])
def any_tok(
    request, tiny_tokenizer_dir, tiny_llama_tokenizer_dir, tiny_llama3_tokenizer_dir, tiny_qwen_tokenizer_dir
):
    """Every kind of tiny tokenizer: byte-level BPE with <s>, Llama-2 style (SentencePiece-like "▁" prefix, byte
    fallback), and today's byte-level BPEs: Llama 3's (<|begin_of_text|>, no pad) and Qwen's (no BOS at all)."""
    from transformers import AutoTokenizer

    dirs = {"bpe": tiny_tokenizer_dir, "llama": tiny_llama_tokenizer_dir, "llama3": tiny_llama3_tokenizer_dir,
            "qwen": tiny_qwen_tokenizer_dir}  # fmt: skip
    return AutoTokenizer.from_pretrained(str(dirs[request.param]))


def bos(tok) -> list[int]:
    """What a row starts with: [BOS], or nothing for a tokenizer without one (Qwen)."""
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def make_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f'--storage.cache_dir="{tmp_path / "cache"}"', *overrides])


def copy_mbpp(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in data.MBPP_FILES:
        shutil.copy(ROOT / "mbpp" / name, dst / name)
    return dst


# --------------------------------------------------------------------------- loaders


def test_mbpp_has_974_problems_in_google_splits(mbpp):
    assert len(mbpp) == 974 and sorted(mbpp) == list(range(1, 975))
    sizes = {s: len(data.mbpp_split(mbpp, s)) for s in data.MBPP_SPLITS}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    test = data.mbpp_split(mbpp, "test")
    assert [p["task_id"] for p in test] == list(range(11, 511))
    with pytest.raises(data.DataError, match="unknown MBPP split 'dev'"):
        data.mbpp_split(mbpp, "dev")


def test_mbpp_single_file_layout(tmp_path, mbpp):
    lines = b"".join((ROOT / "mbpp" / n).read_bytes() for n in data.MBPP_FILES)
    (tmp_path / "mbpp.jsonl").write_bytes(lines)
    assert data.load_mbpp(tmp_path) == mbpp


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: r.pop("code"), r"validation\.jsonl:3: missing field 'code'"),
        (lambda r: r.update(task_id="513"), r"validation\.jsonl:3: field 'task_id' should be int, got str"),
        (
            lambda r: r.update(test_list="assert f()"),
            r"validation\.jsonl:3: field 'test_list' should be list",
        ),
        (lambda r: r.update(test_list=[]), r"validation\.jsonl:3: field 'test_list' is empty"),
        (lambda r: r.update(task_id=511), r"validation\.jsonl:3: duplicate task_id 511"),
    ],
)
def test_mbpp_bad_record_names_file_line_and_field(tmp_path, edit, pattern):
    root = copy_mbpp(tmp_path / "mbpp")
    path = root / "validation.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[2])
    edit(rec)
    lines[2] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=pattern):
        data.load_mbpp(root)


def test_mbpp_invalid_json_and_missing_dir(tmp_path):
    root = copy_mbpp(tmp_path / "mbpp")
    with open(root / "train.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(data.DataError, match=r"train\.jsonl:375: invalid JSON"):
        data.load_mbpp(root)
    with pytest.raises(data.DataError, match=r"no MBPP data: expected the files prompt\.jsonl"):
        data.load_mbpp(tmp_path / "nowhere")


def test_humaneval_164_in_order():
    he = data.load_humaneval(ROOT)
    assert list(he) == [f"HumanEval/{i}" for i in range(164)]
    assert data.load_humaneval(ROOT / "humaneval" / "HumanEval.jsonl.gz") == he
    p = he["HumanEval/0"]
    assert data.humaneval_prompt(p) == p["prompt"] and "def has_close_elements" in p["prompt"]
    assert not any(s in p["canonical_solution"] for s in data.HUMANEVAL_STOP)


def test_codecontests_73_with_complete_tests_and_time_limits():
    cc = data.load_codecontests(ROOT)
    assert len(cc) == 73
    with open(ROOT / "codecontests" / "test_partial_73.jsonl") as f:
        raw = {r["name"]: r for r in map(json.loads, f)}
    for name, p in cc.items():
        r = raw[name]
        assert len(p["tests"]) == r["test_case_count"]
        assert p["n_public"] == len(r["public_tests"]["input"])
        assert p["tests"][0] == (r["public_tests"]["input"][0], r["public_tests"]["output"][0])
        assert p["time_limit_s"] == r["time_limit"]["seconds"] + r["time_limit"]["nanos"] / 1e9
    assert {p["time_limit_s"] for p in cc.values()} >= {1.0, 2.0, 1.5}
    prompt = data.codecontests_prompt(cc["1575_A. Another Sorting Problem"])
    assert "Andi and Budi" in prompt and data.CODECONTESTS_INSTRUCTION in prompt


def test_codecontests_original_schema_and_errors(tmp_path):
    rec = {
        "name": "1_A. X",
        "description": "Print the sum.",
        "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
        "private_tests": {"input": ["2 2\n"], "output": ["4\n"]},
        "generated_tests": {"input": ["0 0\n", "5 5\n"], "output": ["0\n", "10\n"]},
        "time_limit": None,
    }
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    p = data.load_codecontests(path)["1_A. X"]
    assert p["tests"] == [("1 2\n", "3\n"), ("2 2\n", "4\n"), ("0 0\n", "0\n"), ("5 5\n", "10\n")]
    assert (p["n_public"], p["time_limit_s"]) == (1, 2.0)
    rec["time_limit"] = {"seconds": 3, "nanos": 500000000}
    path.write_text(json.dumps(rec) + "\n")
    assert data.load_codecontests(tmp_path)["1_A. X"]["time_limit_s"] == 3.5
    rec["private_tests"]["output"] = []
    path.write_text("\n" + json.dumps(rec) + "\n")
    with pytest.raises(data.DataError, match=r"x\.jsonl:2: field 'private_tests' has 1 inputs but 0 outputs"):
        data.load_codecontests(path)


# --------------------------------------------------------------------------- prompts


def test_zero_shot_prompt_has_text_and_first_test_only(mbpp):
    p = mbpp[11]
    prompt = data.mbpp_prompt(p)
    assert p["text"] in prompt and p["test_list"][0] in prompt
    assert p["test_list"][1] not in prompt and p["code"] not in prompt


def test_three_shot_prompt_has_tasks_2_to_4_then_target(mbpp):
    shots = data.mbpp_fewshot(mbpp)
    prompt = data.mbpp_prompt(mbpp[11], "three_shot", shots)
    positions = [prompt.index(data.mbpp_target(mbpp[t])) for t in (2, 3, 4)]
    assert positions == sorted(positions)
    assert prompt.endswith(data.mbpp_prompt(mbpp[11]))
    # each shot's code is followed by a stop sequence, so a model imitating the shots stops after its code
    for t in (2, 3, 4):
        after = prompt[prompt.index(data.mbpp_target(mbpp[t])) + len(data.mbpp_target(mbpp[t])) :]
        assert any(after.startswith(s) for s in data.MBPP_STOP)
    with pytest.raises(data.DataError, match="needs fewshot"):
        data.mbpp_prompt(mbpp[11], "three_shot")
    with pytest.raises(data.DataError, match="unknown MBPP template 'two_shot'"):
        data.mbpp_prompt(mbpp[11], "two_shot")


def test_target_normalises_line_endings_and_stops_never_cut_a_reference(mbpp):
    assert "\r\n" in mbpp[1]["code"]
    target = data.mbpp_target(mbpp[1])
    assert "\r" not in target and target == "\n".join(line.rstrip() for line in mbpp[1]["code"].split("\r\n"))
    assert data.normalize_code("a = 1  \r\nb = 2\r\n\r\n") == "a = 1\nb = 2"
    assert data.normalize_code("x = 1\rreturn x \t") == "x = 1\nreturn x"
    for p in mbpp.values():
        t = data.mbpp_target(p)
        assert not any(s in t for s in data.MBPP_STOP), p["task_id"]
        assert data.normalize_code(t) == t


# --------------------------------------------------------------------------- cache key


def test_cache_key_changes_with_each_preprocessing_option(tmp_path, tok):
    cfg = make_cfg(tmp_path)
    base = data.dataset_cache_key(cfg, tok, "train")
    variants = [
        ("--data.template=three_shot", "train"),
        ("--data.max_length=256", "train"),
        ("--data.packing=true", "train"),
        ("--data.seed=7", "train"),
        ("--data.seed=42", "validation"),
    ]
    keys = {data.dataset_cache_key(make_cfg(tmp_path, o), tok, split) for o, split in variants}
    assert base not in keys and len(keys) == len(variants)

    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    assert data.dataset_cache_key(cfg, tok2, "train") == base  # same tokenizer loaded again
    tok2.add_tokens(["<extra_token>"])
    assert data.dataset_cache_key(cfg, tok2, "train") != base


def test_cache_key_follows_data_content_not_location(tmp_path, tok):
    base = data.dataset_cache_key(make_cfg(tmp_path), tok, "train")
    copy = copy_mbpp(tmp_path / "elsewhere" / "mbpp")
    moved = make_cfg(
        tmp_path,
        f'--data.path="{copy}"',
        '--storage.cache_dir="/somewhere/else"',
        "--train.steps=7",
        "--train.micro_batch_size=2",
        '--model.path="x"',
        "--loss.lam=0.5",
    )
    assert data.resolve_dataset_dir(moved) == copy
    assert data.dataset_cache_key(moved, tok, "train") == base
    path = copy / "prompt.jsonl"  # one byte of a file the train split does not even read (3-shot pool)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"minimum cost")] = ord("M")
    path.write_bytes(bytes(raw))
    assert data.dataset_cache_key(moved, tok, "train") != base


def test_resolve_dataset_dir_order_and_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = make_cfg(tmp_path, f'--data.path="{empty}"')
    assert data.resolve_dataset_dir(cfg) == ROOT / "mbpp"  # incomplete data.path falls through
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WMTP_S3_BUCKET", raising=False)
    cfg = make_cfg(tmp_path, f'--data.path="{empty}"', f'--storage.data_root="{tmp_path}"')
    with pytest.raises(data.DataError) as err:
        data.resolve_dataset_dir(cfg)
    msg = str(err.value)
    assert "MBPP not found; tried:" in msg and f"{empty} (no prompt.jsonl" in msg
    assert f"{tmp_path / 'mbpp'} (no" in msg
    assert "'datasets/mbpp'" in msg and "google-research-datasets/mbpp" in msg  # S3 and hub were tried


def test_mbpp_mirrored_from_s3_gives_the_same_cache_key(tmp_path, s3_env, tok):
    from tests.servers import s3_client

    client = s3_client(s3_env)
    client.create_bucket(Bucket="wmtp-data")
    for name in data.MBPP_FILES:
        client.put_object(
            Bucket="wmtp-data", Key=f"wmtp/datasets/mbpp/{name}", Body=(ROOT / "mbpp" / name).read_bytes()
        )
    nowhere = tmp_path / "nowhere"
    cfg = make_cfg(tmp_path, f'--storage.data_root="{nowhere}"', '--storage.s3_bucket="wmtp-data"')
    mirrored = data.resolve_dataset_dir(cfg)
    assert mirrored.is_relative_to(tmp_path / "cache") and data.load_mbpp(mirrored) == data.load_mbpp(
        ROOT / "mbpp"
    )
    assert data.dataset_cache_key(cfg, tok, "train") == data.dataset_cache_key(
        make_cfg(tmp_path), tok, "train"
    )


def test_mbpp_hub_parquet_layout(tmp_path, mbpp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "full").mkdir()
    for split in data.MBPP_SPLITS:
        rows = data.mbpp_split(mbpp, split)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "full" / f"{split}-00000-of-00001.parquet")
    assert data.load_mbpp(tmp_path) == mbpp
    assert data.resolve_dataset_dir(make_cfg(tmp_path, f'--data.path="{tmp_path}"')) == tmp_path


# --------------------------------------------------------------------------- tokenised dataset


def test_build_dataset_rows_masks_and_cache_hit(tmp_path, any_tok, mbpp):
    tok = any_tok
    cfg = make_cfg(tmp_path)
    before = dict(data.STATS)
    ds = data.build_dataset(cfg, tok, "validation")
    assert data.STATS["built"] == before["built"] + 1
    assert len(ds) == 90 and ds["index"][:] == list(range(90))
    assert sorted(ds["task_id"][:]) == list(range(511, 601))
    assert ds["task_id"][:] != sorted(ds["task_id"][:])  # shuffled with data.seed
    for row in ds:
        p = mbpp[row["task_id"]]
        prompt = data.encode_prompt(tok, data.mbpp_prompt(p))
        n = len(prompt)
        assert row["input_ids"][:n] == prompt and prompt[: len(bos(tok))] == bos(tok)
        assert row["loss_mask"] == [False] * n + [True] * (len(row["input_ids"]) - n)
        assert row["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(row["input_ids"][n:-1]) == data.mbpp_target(p)

    again = data.build_dataset(cfg, tok, "validation")  # from disk, no tokenising
    assert {"built": before["built"] + 1, "loaded": before["loaded"] + 1} == data.STATS
    assert again[:] == ds[:]
    cache = tmp_path / "cache" / "datasets"
    key = data.dataset_cache_key(cfg, tok, "validation")
    assert [p.name for p in cache.iterdir()] == [f"mbpp-validation-{key}"]  # no temp dirs left behind
    assert all(Path(f["filename"]).is_relative_to(cache) for f in again.cache_files)


def test_training_rows_are_the_tokens_of_prompt_plus_completion(tmp_path, any_tok, mbpp):
    """Prompt and completion are tokenised as ONE text, as the model reads them: alone, a Llama-style completion
    would start with "▁def" (a one-space indent) where the model sees "def" after the prompt's newline. The first
    trained token starts the completion, and evaluation's prompt encoding is exactly the row's prompt."""
    tok = any_tok
    ds = data.build_dataset(make_cfg(tmp_path, "--data.max_length=1024"), tok, "train")  # no row is cut
    for row in ds:
        prompt, target = data.mbpp_prompt(mbpp[row["task_id"]]), data.mbpp_target(mbpp[row["task_id"]])
        enc = tok(prompt + target, add_special_tokens=False, return_offsets_mapping=True)
        assert row["input_ids"] == [*bos(tok), *enc["input_ids"], tok.eos_token_id]
        n = row["loss_mask"].index(True)
        assert row["loss_mask"] == [False] * n + [True] * (len(row["input_ids"]) - n)
        assert enc["offset_mapping"][n - len(bos(tok))][0] == len(prompt)  # row[n] is enc[n - 1] after a BOS
        assert row["input_ids"][:n] == data.encode_prompt(tok, prompt)


def test_packing_rows_are_exactly_max_length_and_keep_every_token(tmp_path, any_tok):
    tok = any_tok
    plain = data.build_dataset(make_cfg(tmp_path), tok, "validation")
    packed = data.build_dataset(
        make_cfg(tmp_path, "--data.packing=true", "--data.max_length=128"), tok, "validation"
    )
    assert {len(r) for r in packed["input_ids"][:]} == {128}
    assert set(packed["task_id"][:]) == {-1}
    stream = [t for r in plain["input_ids"][:] for t in r]
    mask = [m for r in plain["loss_mask"][:] for m in r]
    pad = len(packed) * 128 - len(stream)
    assert 0 <= pad < 128
    assert [t for r in packed["input_ids"][:] for t in r] == stream + [data.pad_token_id(tok)] * pad
    assert [m for r in packed["loss_mask"][:] for m in r] == mask + [False] * pad


def test_truncation_keeps_bos_prompt_end_and_completion_start():
    prompt, comp = [0] + list(range(100, 140)), list(range(200, 300)) + [1]
    p, c = data._fit(prompt, comp, 64)
    assert len(p) + len(c) == 64 and p[0] == 0 and p[-1] == 139 and c[0] == 200 and len(c) == 32
    p, c = data._fit([0, 5, 6], comp, 64)  # short prompt: only the completion's tail is cut
    assert p == [0, 5, 6] and c == comp[:61]
    assert data._fit([0, 5], [7, 1], 64) == ([0, 5], [7, 1])
    p, c = data._fit(prompt[1:], comp, 64, keep=0)  # no BOS (Qwen): the prompt's first token is not kept
    assert len(p) + len(c) == 64 and p == prompt[-32:] and c == comp[:32]


def test_three_shot_dataset_is_truncated_to_max_length(tmp_path, any_tok):
    tok = any_tok
    ds = data.build_dataset(
        make_cfg(tmp_path, "--data.template=three_shot", "--data.max_length=200"), tok, "prompt"
    )
    for ids, mask in zip(ds["input_ids"][:], ds["loss_mask"][:], strict=True):
        assert len(ids) <= 200 and ids[: len(bos(tok))] == bos(tok) and sum(mask) >= 1
        n = mask.index(True)
        assert all(mask[n:]) and not any(mask[:n])


# --------------------------------------------------------------------------- batching


def toy_rows(n: int) -> dict[str, list]:
    ids = [[i] * (1 + i % 5) for i in range(n)]
    return {
        "input_ids": ids,
        "loss_mask": [[j > 0 for j in range(len(r))] for r in ids],
        "task_id": [1000 + i for i in range(n)],
        "index": list(range(n)),
    }


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def test_loader_batches_are_padded_and_deterministic():
    rows = toy_rows(23)
    a = take(data.make_loader(rows, 4, pad_id=-7), 12)
    b = take(data.make_loader(rows, 4, pad_id=-7), 12)
    c = take(data.make_loader(rows, 4, pad_id=-7, seed=43), 12)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["index"], y["index"]) for x, y in zip(a, c, strict=True))
    batch = a[0]
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    assert batch["input_ids"].shape[1] == max(1 + int(i) % 5 for i in batch["index"])
    for b_, i in enumerate(batch["index"].tolist()):
        n = 1 + i % 5
        assert batch["input_ids"][b_, :n].tolist() == [i] * n and (batch["input_ids"][b_, n:] == -7).all()
        assert not batch["loss_mask"][b_, n:].any() and batch["task_id"][b_] == 1000 + i
    # 23 rows, batch 4: 5 batches per epoch (3 rows dropped), each epoch a different permutation
    epoch0 = torch.cat([x["index"] for x in a[:5]])
    epoch1 = torch.cat([x["index"] for x in a[5:10]])
    assert len(set(epoch0.tolist())) == 20 and not torch.equal(epoch0, epoch1)


def test_ranks_get_disjoint_shards_of_equal_length():
    rows = toy_rows(26)
    shards = [
        torch.cat([x["index"] for x in take(data.make_loader(rows, 3, 0, rank=r, world_size=3), 2)])
        for r in range(3)
    ]
    seen = [set(s.tolist()) for s in shards]
    assert all(len(s) == 6 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(data.DataError, match="do not fill one batch"):
        next(data.make_loader(toy_rows(5), 3, 0, world_size=2))


@pytest.mark.parametrize("skip", [0, 3, 5, 7, 11])
def test_skip_batches_resumes_the_same_stream(skip):
    rows = toy_rows(23)
    full = take(data.make_loader(rows, 4, 0, rank=1, world_size=2), skip + 6)
    resumed = take(data.make_loader(rows, 4, 0, rank=1, world_size=2, skip_batches=skip), 6)
    for x, y in zip(full[skip:], resumed, strict=True):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["input_ids"], y["input_ids"])


def test_eval_batches_in_order_with_partial_last(tmp_path, any_tok):
    tok = any_tok
    ds = data.build_dataset(make_cfg(tmp_path), tok, "prompt")
    batches = list(data.eval_batches(ds, 4, data.pad_token_id(tok)))
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))
    first = batches[0]
    assert first["input_ids"][0, : len(bos(tok))].tolist() == bos(tok)


def test_humaneval_file_may_be_plain_jsonl(tmp_path):
    with gzip.open(ROOT / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        first = f.readline()
    (tmp_path / "he.jsonl").write_text(first)
    assert list(data.load_humaneval(tmp_path / "he.jsonl")) == ["HumanEval/0"]
