"""Session fixtures for the tiny artefacts of tiny.py (import them into a test module to use them).

`tiny_dir` reuses `<repo>/.cache/tiny` when `make tiny` already built it completely, else builds everything once
per session into a temp dir. `tiny_tokenizer_dir` is the tokenizer alone (cheap; needs no model.py), for tests of
data handling; `tiny_llama_tokenizer_dir` the Llama-2 style one, `tiny_llama3_tokenizer_dir` and
`tiny_qwen_tokenizer_dir` today's byte-level BPEs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402
from config import REPO, default_data_root  # noqa: E402

REPO_TINY = REPO / ".cache" / "tiny"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    if tiny.is_complete(REPO_TINY):
        return REPO_TINY
    out = tmp_path_factory.mktemp("tiny")
    tiny.build_all(out, data_root=default_data_root())
    return out


def _tokenizer(name: str, build, tmp_path_factory) -> Path:
    """REPO/.cache/tiny/<name> when `make tiny` built it, else built once into a temp dir (cheap: no models)."""
    if (REPO_TINY / name).is_dir():
        return REPO_TINY / name
    out = tmp_path_factory.mktemp(name)
    build(out, default_data_root())
    return out / name


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return _tokenizer("tokenizer", tiny.build_tokenizer, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llama_tokenizer_dir(tmp_path_factory) -> Path:
    return _tokenizer("tokenizer_llama", tiny.build_llama_tokenizer, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llama3_tokenizer_dir(tmp_path_factory) -> Path:
    return _tokenizer(
        "tokenizer_llama3", lambda out, root: tiny.build_bpe_tokenizer(out, root, "llama3"), tmp_path_factory
    )


@pytest.fixture(scope="session")
def tiny_qwen_tokenizer_dir(tmp_path_factory) -> Path:
    return _tokenizer(
        "tokenizer_qwen", lambda out, root: tiny.build_bpe_tokenizer(out, root, "qwen"), tmp_path_factory
    )
