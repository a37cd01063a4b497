"""Shared fixtures: the tiny real-format models (tiny_fixture.py) and real S3 / MLflow servers (servers.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.servers import *  # noqa: E402,F403
from tests.tiny_fixture import (  # noqa: E402,F401
    tiny_dir,
    tiny_llama3_tokenizer_dir,
    tiny_llama_tokenizer_dir,
    tiny_qwen_tokenizer_dir,
    tiny_tokenizer_dir,
)
