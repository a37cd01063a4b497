"""tiny.py: every artefact loads offline through the standard loaders, and builds are idempotent and atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import data
import tiny
from config import REPO, default_data_root


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))


def test_tokenizer_special_tokens_and_roundtrip(tok, tiny_dir):
    from transformers import AutoTokenizer

    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert 1500 < len(tok) <= tiny.VOCAB_SIZE
    assert tok("x = 1")["input_ids"][0] == tok.bos_token_id  # Llama-like: BOS added by default
    problems = data.load_mbpp(os.path.join(default_data_root(), "mbpp"))
    for p in data.mbpp_split(problems, "test")[:50]:  # unseen by the tokenizer's training
        text = data.mbpp_prompt(p) + data.mbpp_target(p)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and len(ids) < len(text.encode())
    fp = data.tokenizer_fingerprint(tok)
    for name in ("base_meta", "ref_hf", "rm_hf"):  # the same tokenizer sits next to every model
        assert data.tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tiny_dir / name))) == fp


def test_tokenizer_training_is_deterministic():
    a = tiny.train_tokenizer(default_data_root())
    b = tiny.train_tokenizer(default_data_root())
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_llama_style_tokenizer_is_sentencepiece_like(tiny_dir):
    """Llama-2's layout: <unk> <s> </s>, then the 256 byte tokens; a "▁" prefix and "▁" for spaces; newlines are
    byte tokens only (so code after a newline starts without "▁"); no pad token; loads offline and round-trips."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer_llama"))
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 13, 258]) == [
        "<unk>",
        "<s>",
        "</s>",
        "<0x00>",
        "<0x0A>",
        "<0xFF>",
    ]
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", None)
    assert len(tok) == tiny.VOCAB_SIZE
    assert tok("x = 1")["input_ids"][0] == tok.bos_token_id
    alone = tok.convert_ids_to_tokens(tok("def f(x):", add_special_tokens=False)["input_ids"])
    after = tok.convert_ids_to_tokens(tok('"""\ndef f(x):', add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁def" and after[:3] == ['▁"', '"', '"'] and after[4] == "def"
    assert not any("\n" in t for t in tok.get_vocab())
    problems = data.load_mbpp(os.path.join(default_data_root(), "mbpp"))
    for p in data.mbpp_split(problems, "test")[:50]:  # unseen by the tokenizer's training
        text = data.mbpp_prompt(p) + data.mbpp_target(p)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and len(ids) < len(text.encode())
    again = tiny.train_llama_tokenizer(default_data_root())  # deterministic
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_ref_hf_is_a_llama_causal_lm(tok, tiny_dir):
    from transformers import AutoModelForCausalLM

    assert (tiny_dir / "ref_hf" / "model.safetensors").is_file()
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "ref_hf"))
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.vocab_size == len(tok)
    ids = torch.tensor([tok("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        logits = lm(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_rm_hf_scores_padded_batches(tok, tiny_dir):
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_dir / "rm_hf")).eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    texts = ["def f(x):\n    return x + 1", "x = 1"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        both = rm(**batch).logits
        alone = rm(**tok(texts[1:], return_tensors="pt")).logits
    assert both.shape == (2, 1)
    torch.testing.assert_close(both[1], alone[0], rtol=1e-4, atol=1e-5)  # padding does not change the score


def test_base_meta_is_an_h4_mtp_model(tok, tiny_dir):
    import formats

    params = json.loads((tiny_dir / "base_meta" / "params.json").read_text())
    assert (params["n_future_tokens"], params["n_layers"], params["vocab_size"]) == (4, 6, len(tok))
    net = formats.load_meta(tiny_dir / "base_meta")
    assert (len(net.layers), len(net.extra_heads)) == (3, 3)
    with torch.no_grad():
        logits = net(torch.tensor([tok("x = 1")["input_ids"]]))
    assert logits.shape[2:] == (4, len(tok)) and torch.isfinite(logits).all()


def test_build_all_skips_complete_output(tiny_dir):
    before = {p: p.stat().st_mtime_ns for p in tiny_dir.rglob("*")}
    paths = tiny.build_all(tiny_dir)
    assert paths == {name: tiny_dir / name for name in tiny.ARTEFACTS}
    assert {p: p.stat().st_mtime_ns for p in tiny_dir.rglob("*")} == before
    assert not [p for p in tiny_dir.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    out = subprocess.run(
        [sys.executable, str(REPO / "tiny.py"), "--out", str(tiny_dir)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.stdout.count("exists (skipped)") == len(tiny.ARTEFACTS)


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_force(tmp_path):
    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny._atomic_dir(tmp_path / "art", broken, force=False)
    assert list(tmp_path.iterdir()) == []

    assert tiny._atomic_dir(tmp_path / "art", lambda tmp: (tmp / "v1").write_text("1"), force=False)
    assert not tiny._atomic_dir(tmp_path / "art", lambda tmp: (tmp / "v2").write_text("2"), force=False)
    assert tiny._atomic_dir(tmp_path / "art", lambda tmp: (tmp / "v2").write_text("2"), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    assert [p.name for p in (tmp_path / "art").iterdir()] == ["v2"]
