"""Session fixtures for the tiny artefacts of tiny.py (import them into a test module to use them).

`tiny_dir` reuses `<repo>/.cache/tiny` when `make tiny` already built it completely, else builds everything once
per session into a temp dir. `tiny_tokenizer_dir` is the tokenizer alone (cheap; needs no model.py), for tests of
data handling; `tiny_llama_tokenizer_dir` the Llama-2 style one.
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


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    if (REPO_TINY / "tokenizer").is_dir():
        return REPO_TINY / "tokenizer"
    out = tmp_path_factory.mktemp("tiny_tok")
    tiny.build_tokenizer(out, default_data_root())
    return out / "tokenizer"


@pytest.fixture(scope="session")
def tiny_llama_tokenizer_dir(tmp_path_factory) -> Path:
    if (REPO_TINY / "tokenizer_llama").is_dir():
        return REPO_TINY / "tokenizer_llama"
    out = tmp_path_factory.mktemp("tiny_tok_llama")
    tiny.build_llama_tokenizer(out, default_data_root())
    return out / "tokenizer_llama"
