"""`make tiny`: small random-init models in the real file formats, for the smoke run and the tests.

    python tiny.py --out .cache/tiny [--force] [--data-root DIR]

Everything is built offline and deterministically (fixed seeds): a byte-level BPE tokenizer trained on MBPP
train+validation, a Llama-2 style one (SentencePiece-like, byte fallback) on the same text, a Meta-format MTP
base (params.json + consolidated.pth), an HF Llama reference model and an HF reward model, each with the byte-level
tokenizer saved alongside (the models' vocabulary fits both tokenizers); and for the synthetic benchmark
(data.py) its word-level tokenizer and a ~1M-parameter Meta-format H=4 base. Each artefact is written to a temp
directory and renamed into place, so an existing directory is always complete and a rerun skips it.

Today's HF families, as their hubs ship them (transformers' own config and model classes, `save_pretrained`,
bf16 weights), each with a tokenizer of its kind: `base_llama3` (Llama 3.x: llama3 RoPE scaling, tied embeddings,
GQA; a Llama-3-style byte-level BPE that prepends <|begin_of_text|>), `base_qwen2` (Qwen2.5: q/k/v biases, tied
embeddings, a vocabulary padded past the tokenizer; a Qwen-style byte-level BPE with no BOS), `base_qwen3` (Qwen3:
q/k RMSNorm, head_dim != hidden / heads; the Qwen tokenizer) and `base_mistral` (Mistral: a sliding window; the
Llama-2-style tokenizer). Their norm scales and biases are random too (transformers initialises them to 1 and 0),
so a loader that permuted them wrongly would show in the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import config
import data
import files
import formats
import integrity
import model as M
import synthetic

VOCAB_SIZE = 2048
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
LLAMA_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}  # no pad, as Llama-2
# the two byte-level BPE tokenizers of today's families: Llama 3 (BOS prepended, no pad) and Qwen (no BOS; the pad
# is <|endoftext|>, the base models' EOS)
LLAMA3_SPECIAL_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
QWEN_SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
QWEN_EXTRA_TOKENS = ["<|im_start|>", "<|im_end|>"]
# how the text is split before the merges: Llama 3's rule (numbers in runs of up to 3 digits) and Qwen's (digit by
# digit); no prefix space in either
SPLIT_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_QWEN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
FAMILIES = ("llama3", "qwen2", "qwen3", "mistral")  # base_<family>: see the module docstring
ARTEFACTS = (
    "tokenizer",
    "tokenizer_llama",
    "tokenizer_llama3",
    "tokenizer_qwen",
    "base_meta",
    "ref_hf",
    "rm_hf",
    "synthetic_tokenizer",
    "synthetic_base",
    *(f"base_{f}" for f in FAMILIES),
)
SEED = 0


def _atomic_dir(final: Path, build: Callable[[Path], None], force: bool) -> bool:
    """Run build(tmp) and rename tmp to `final`; skip when `final` exists (unless force). True when built."""
    if final.is_dir() and not force:
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the artefact is ordinary shared output
        files.atomic_dir_swap(tmp, final)  # --force replaces an old one without a half-written moment
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _corpus(data_root: str) -> list[str]:
    """MBPP train + validation problem texts and normalised code (never the test split)."""
    problems = data.load_mbpp(Path(data_root) / "mbpp")
    rows = data.mbpp_split(problems, "train") + data.mbpp_split(problems, "validation")
    return [t for p in rows for t in (p["text"], data.mbpp_target(p))]


def train_tokenizer(data_root: str):
    """A byte-level BPE (~2048 tokens) wrapped as a transformers fast tokenizer with <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(data_root), trainer=trainer)
    bos = tok.token_to_id(SPECIAL_TOKENS["bos_token"])
    # Like Llama: tokenizer(text) prepends BOS; data.py encodes with add_special_tokens=False and adds it itself.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **SPECIAL_TOKENS)


def train_llama_tokenizer(data_root: str):
    """A tokenizer in the Llama-2 style (VOCAB_SIZE tokens), with the same tokenizer.json layout as Llama-2's.

    SentencePiece-like BPE: the text gets a "▁" prefix and spaces become "▁" (pieces are "▁def", "▁return", ...),
    byte fallback (<0x00>..<0xFF> after <unk> <s> </s>, as in Llama-2), no pad token. Trained on the LINES of the
    corpus, as SentencePiece trains on lines, so no piece holds a newline: "\n" is <0x0A> and the code after a
    prompt's last newline starts with "def", not "▁def". The vocabulary fits the tiny models' (VOCAB_SIZE).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(LLAMA_SPECIAL_TOKENS.values())
    learn = Tokenizer(models.BPE(unk_token="<unk>"))
    learn.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")  # no piece crosses a space
    lines = [line for text in _corpus(data_root) for line in text.split("\n") if line.strip()]
    learn.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 256, special_tokens=specials, show_progress=False)
    )
    learned = json.loads(learn.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **LLAMA_SPECIAL_TOKENS)


def train_bpe_tokenizer(data_root: str, kind: str):
    """A byte-level BPE of today's kind (`kind`: "llama3" or "qwen"), VOCAB_SIZE pieces, as the hubs ship them.

    Both split the text by a regex first (Llama 3's or Qwen's) and map bytes to printable characters with no prefix
    space, so "def" at the start of a line is one piece and a space joins the word after it (" return"). Llama 3
    prepends <|begin_of_text|> (its BOS) and has no pad token; Qwen adds no BOS at all (a training row starts with
    the prompt's first token), pads with <|endoftext|> (its base models' EOS) and is saved as transformers'
    Qwen2Tokenizer with no unk token, as Qwen's tokenizer_config.json says (the class a Qwen model directory
    loads with AutoTokenizer).
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    if kind == "qwen":
        tok.normalizer = normalizers.NFC()
    split = SPLIT_LLAMA3 if kind == "llama3" else SPLIT_QWEN
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(data_root), trainer=trainer)
    if kind == "qwen":  # Qwen2Tokenizer builds the same pipeline (Qwen's split rule, NFC) from vocab + merges
        learned = json.loads(tok.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
        out = Qwen2Tokenizer(vocab=learned["vocab"], merges=merges, unk_token=None,
                             model_max_length=4096, **QWEN_SPECIAL_TOKENS)  # fmt: skip
        out.add_special_tokens({"additional_special_tokens": QWEN_EXTRA_TOKENS})
        return out
    bos = LLAMA3_SPECIAL_TOKENS["bos_token"]
    tok.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS.values()))  # after the learned pieces, as in Llama 3
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        ),
    ])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **LLAMA3_SPECIAL_TOKENS)


def load_tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out / "tokenizer"))


def build_tokenizer(out: Path, data_root: str, force: bool = False) -> bool:
    return _atomic_dir(
        out / "tokenizer", lambda tmp: train_tokenizer(data_root).save_pretrained(str(tmp)), force
    )


def build_llama_tokenizer(out: Path, data_root: str, force: bool = False) -> bool:
    return _atomic_dir(
        out / "tokenizer_llama", lambda tmp: train_llama_tokenizer(data_root).save_pretrained(str(tmp)), force
    )


def build_bpe_tokenizer(out: Path, data_root: str, kind: str, force: bool = False) -> bool:
    return _atomic_dir(
        out / f"tokenizer_{kind}",
        lambda tmp: train_bpe_tokenizer(data_root, kind).save_pretrained(str(tmp)),
        force,
    )


def build_base_meta(out: Path, force: bool = False) -> bool:
    """Tiny H=4 MTP base in Meta's layout: 3 trunk blocks (the last is head 1) + 3 extra heads."""

    def build(tmp: Path) -> None:
        _random_meta(tmp, load_tokenizer(out), n_kv_heads=2, max_seq_len=1024)

    return _atomic_dir(out / "base_meta", build, force)


def _random_meta(tmp: Path, tokenizer, **shape) -> None:
    """A seeded random-init H=4 MTP model (dim 128, 6 blocks) in Meta's layout, its tokenizer beside it (so
    model.tokenizer may point at the checkpoint directory) and Meta's checklist.chk (MD5s, checked at load)."""
    args = M.ModelArgs(dim=128, n_layers=6, n_heads=4, vocab_size=len(tokenizer), multiple_of=32,
                       n_future_tokens=4, **shape)  # fmt: skip
    torch.manual_seed(SEED)
    formats.save_meta(M.Transformer(args), tmp)
    tokenizer.save_pretrained(str(tmp))
    integrity.write_checklist(tmp)


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _save_hf(out: Path, name: str, make_model: Callable, force: bool) -> bool:
    def build(tmp: Path) -> None:
        tokenizer = load_tokenizer(out)
        torch.manual_seed(SEED)
        make_model(tokenizer).save_pretrained(str(tmp))  # safetensors
        tokenizer.save_pretrained(str(tmp))

    return _atomic_dir(out / name, build, force)


def build_ref_hf(out: Path, force: bool = False) -> bool:
    """Tiny H=1 reference causal LM in HF Llama format (rho1's reference; also exercises formats.load_hf)."""

    def make(tok):
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(_llama_config(tok))

    return _save_hf(out, "ref_hf", make, force)


def build_rm_hf(out: Path, force: bool = False) -> bool:
    """Tiny reward model: a one-label Llama sequence classifier (critic's reward)."""

    def make(tok):
        from transformers import LlamaForSequenceClassification

        return LlamaForSequenceClassification(_llama_config(tok, num_labels=1))

    return _save_hf(out, "rm_hf", make, force)


# the shape every tiny family base shares (per family: its features, listed in `family_config`)
FAMILY_SHAPE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip
LLAMA3_ORIGINAL_LEN = 64  # llama3 RoPE's original_max_position_embeddings: the tests run sequences past it
MISTRAL_WINDOW = 256  # base_mistral's sliding_window (its max_position_embeddings: twice that)
FAMILY_TOKENIZER = {"llama3": "tokenizer_llama3", "qwen2": "tokenizer_qwen", "qwen3": "tokenizer_qwen",
                    "mistral": "tokenizer_llama"}  # fmt: skip


def family_config(family: str, tokenizer):
    """transformers' config of a tiny base of `family`, with the features that set the family apart."""
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    if family == "llama3":  # Llama 3.2-1B's features: llama3 RoPE scaling, tied embeddings, GQA
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": LLAMA3_ORIGINAL_LEN}  # fmt: skip
        return transformers.LlamaConfig(**FAMILY_SHAPE, **ids, rope_parameters=rope, tie_word_embeddings=True)
    if family == "qwen2":  # Qwen2.5-0.5B's: q/k/v biases, tied, the vocabulary padded past the tokenizer
        vocab = -(-(len(tokenizer) + 1) // 64) * 64
        rope = {"rope_type": "default", "rope_theta": 1000000.0}
        return transformers.Qwen2Config(**FAMILY_SHAPE, **ids, vocab_size=vocab, rope_parameters=rope,
                                        tie_word_embeddings=True, use_sliding_window=False)  # fmt: skip
    if family == "qwen3":  # Qwen3's: q/k RMSNorm, head_dim 32 != 64 / 4, untied (as the 8B)
        rope = {"rope_type": "default", "rope_theta": 1000000.0}
        return transformers.Qwen3Config(**FAMILY_SHAPE, **ids, vocab_size=len(tokenizer), head_dim=32,
                                        rope_parameters=rope, tie_word_embeddings=False)  # fmt: skip
    if (
        family == "mistral"
    ):  # Mistral 7B v0.1's: a sliding window shorter than the context (as long as the tiny
        # configs' rows: their runs fit, a longer sequence is refused)
        shape = {**FAMILY_SHAPE, "max_position_embeddings": 2 * MISTRAL_WINDOW}
        return transformers.MistralConfig(
            **shape, **ids, vocab_size=len(tokenizer), sliding_window=MISTRAL_WINDOW
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_family_base(out: Path, family: str, force: bool = False) -> bool:
    """base_<family>: a seeded random model of transformers' own class for that family, saved in bf16 (as the hubs
    ship them) with its tokenizer."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out / FAMILY_TOKENIZER[family]))
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
        with torch.no_grad():  # norm scales and biases: random too (transformers makes them 1 and 0)
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return _atomic_dir(out / f"base_{family}", build, force)


def synthetic_tokenizer():
    """Word-level tokenizer over synthetic.SYN_VOCAB (one word, one token), BOS prepended like Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(synthetic.SYN_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=synthetic.SYN_SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = synthetic.SYN_SPECIALS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **synthetic.SYN_SPECIALS)


def build_synthetic_tokenizer(out: Path, force: bool = False) -> bool:
    return _atomic_dir(
        out / "synthetic_tokenizer", lambda tmp: synthetic_tokenizer().save_pretrained(str(tmp)), force
    )


def build_synthetic_base(out: Path, force: bool = False) -> bool:
    """The synthetic benchmark's random-init H=4 MTP base (Meta layout, 2 trunk blocks + 4 head blocks, dim 128:
    1.2M parameters; at H=1 the same trunk and head 1, 0.6M)."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        _random_meta(tmp, AutoTokenizer.from_pretrained(str(out / "synthetic_tokenizer")), max_seq_len=256)

    return _atomic_dir(out / "synthetic_base", build, force)


def is_complete(out: str | os.PathLike) -> bool:
    return all((Path(out) / name).is_dir() for name in ARTEFACTS)


def build_all(
    out_dir: str | os.PathLike, force: bool = False, data_root: str | None = None
) -> dict[str, Path]:
    """Build every artefact that is missing (all of them with force); returns {name: directory}."""
    out = Path(out_dir)
    root = data_root or config.default_data_root()
    steps = {
        "tokenizer": lambda: build_tokenizer(out, root, force),
        "tokenizer_llama": lambda: build_llama_tokenizer(out, root, force),
        "tokenizer_llama3": lambda: build_bpe_tokenizer(out, root, "llama3", force),
        "tokenizer_qwen": lambda: build_bpe_tokenizer(out, root, "qwen", force),
        "base_meta": lambda: build_base_meta(out, force),
        "ref_hf": lambda: build_ref_hf(out, force),
        "rm_hf": lambda: build_rm_hf(out, force),
        "synthetic_tokenizer": lambda: build_synthetic_tokenizer(out, force),
        "synthetic_base": lambda: build_synthetic_base(out, force),
        **{f"base_{f}": (lambda f=f: build_family_base(out, f, force)) for f in FAMILIES},
    }
    for name, step in steps.items():
        t0 = time.perf_counter()
        built = step()
        print(
            f"tiny: {out / name} {'built in %.1fs' % (time.perf_counter() - t0) if built else 'exists (skipped)'}"
        )
    return {name: out / name for name in ARTEFACTS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".cache/tiny", help="output directory (default .cache/tiny)")
    ap.add_argument("--force", action="store_true", help="rebuild even what already exists")
    ap.add_argument("--data-root", default=None, help="benchmark data root (default $WMTP_DATA_DIR)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.force or not is_complete(args.out):  # importing transformers takes seconds: only when needed
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    build_all(args.out, force=args.force, data_root=args.data_root)


if __name__ == "__main__":
    main()
