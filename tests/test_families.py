"""Today's HF base models: Llama 3.x, Qwen2 / Qwen2.5, Qwen3 and Mistral load as MTP bases, train, and export back
to their own architecture; what the framework cannot compute is refused by name.

The tiny bases are tiny.py's (transformers' own classes, random weights including the norm scales and biases, bf16
as the hubs ship them): `tiny_dir` builds them once per session. The reference logits are transformers' own, in
fp32 from the same bf16 weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import aux_models
import checkpoint
import formats
import model as M
import tiny
from tests.test_train import metrics, run_train

FAMILIES = tiny.FAMILIES  # llama3, qwen2, qwen3, mistral
HF_CLASS = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "mistral": "MistralForCausalLM"}  # fmt: skip
SEQ = tiny.LLAMA3_ORIGINAL_LEN + 36  # past llama3 RoPE's original length, within Mistral's window


@pytest.fixture(scope="module")
def hf_models(tiny_dir):
    """transformers' model of each tiny base, in fp32 (loaded once for the module)."""
    from transformers import AutoModelForCausalLM

    return {
        f: AutoModelForCausalLM.from_pretrained(tiny_dir / f"base_{f}", dtype=torch.float32).eval()
        for f in FAMILIES
    }


def ids_for(args: M.ModelArgs, seed: int = 0, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------- loading: head 1 = transformers


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("H", [1, 2])
def test_head1_logits_equal_transformers(family, H, tiny_dir, hf_models):
    hf = hf_models[family]
    assert type(hf).__name__ == HF_CLASS[family]
    ours = formats.load_hf(tiny_dir / f"base_{family}", H).float().eval()
    ids = ids_for(ours.args)
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert got.shape == (*ids.shape, H, ours.args.vocab_size)
    assert max_diff(want, got[:, :, 0]) <= 1e-4
    if H == 2:  # head 2 starts as a copy of head 1's block (biases, q/k norms and all)
        assert max_diff(got[:, :, 1], got[:, :, 0]) <= 1e-5


def test_the_family_features_are_what_the_configs_say(tiny_dir):
    a = {f: formats.load_hf(tiny_dir / f"base_{f}").args for f in FAMILIES}
    assert (
        a["llama3"].rope_scaling_type == "llama3" and a["llama3"].tie_embeddings and a["llama3"].kv_heads == 2
    )
    assert a["llama3"].rope_original_max_seq_len == tiny.LLAMA3_ORIGINAL_LEN
    assert a["qwen2"].qkv_bias and a["qwen2"].tie_embeddings and not a["qwen2"].qk_norm
    qwen_tok = len(__import__("transformers").AutoTokenizer.from_pretrained(tiny_dir / "tokenizer_qwen"))
    assert a["qwen2"].vocab_size > qwen_tok  # padded past the tokenizer, as Qwen2.5's 151936 > 151665
    assert a["qwen3"].qk_norm and a["qwen3"].head_dim == 32 != a["qwen3"].dim // a["qwen3"].n_heads
    assert a["mistral"].sliding_window == tiny.MISTRAL_WINDOW and a["mistral"].family == "mistral"
    assert all(a[f].family == {"llama3": "llama"}.get(f, f) for f in FAMILIES)


def test_tied_embeddings_are_one_parameter_for_every_head(tiny_dir):
    m = formats.load_hf(tiny_dir / "base_qwen2", 3)
    assert m.output.weight is m.tok_embeddings.weight
    names = [n for n, _ in m.named_parameters()]
    assert "tok_embeddings.weight" in names and "output.weight" not in names  # one parameter, listed once
    ids = ids_for(m.args, batch=1, seq=16)
    m(ids).float().sum().backward()
    assert m.tok_embeddings.weight.grad is not None  # the gradient of both uses lands on the one tensor


def test_the_extra_heads_carry_the_family_features(tiny_dir):
    m = formats.load_hf(tiny_dir / "base_qwen3", 2)
    head2 = m.extra_heads[0].attention
    assert head2.q_norm is not None and torch.equal(head2.q_norm.weight, m.layers[-1].attention.q_norm.weight)
    q = formats.load_hf(tiny_dir / "base_qwen2", 2).extra_heads[0].attention
    assert q.wq.bias is not None and q.wo.bias is None


@pytest.mark.parametrize("family", FAMILIES)
def test_our_checkpoint_round_trip_keeps_the_features(family, tiny_dir, tmp_path):
    m = formats.load_hf(tiny_dir / f"base_{family}", 2)
    formats.save_checkpoint(m, tmp_path)
    back = formats.load_checkpoint(tmp_path)
    assert back.args == m.args
    assert (back.output.weight is back.tok_embeddings.weight) == m.args.tie_embeddings
    ids = ids_for(m.args, batch=1, seq=20)
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))


def test_our_meta_params_keep_the_features_when_not_for_metas_code(tiny_dir, tmp_path):
    """save_meta(reference=False) (ours, e.g. tiny.py's) keeps every extension in params.json; load_meta reads them
    back; a tied output becomes its own tensor there."""
    m = formats.load_hf(tiny_dir / "base_qwen2", 2)
    formats.save_meta(m, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["qkv_bias"] is True and params["family"] == "qwen2" and "tie_embeddings" not in params
    back = formats.load_meta(tmp_path)
    assert back.args == dataclasses.replace(m.args, tie_embeddings=False)
    ids = ids_for(m.args, batch=1, seq=20)
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))


def test_llama3_rope_equals_transformers_inverse_frequencies(tiny_dir, hf_models):
    """The three bands of Llama 3.1's rule (kept, blended, divided by factor) are all present in the tiny base."""
    args = formats.load_hf(tiny_dir / "base_llama3").args
    ours = M.rope_inv_freq(args, torch.device("cpu"), torch.float32)
    theirs = hf_models["llama3"].model.rotary_emb.inv_freq
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    plain = M.rope_inv_freq(
        dataclasses.replace(args, rope_scaling_type="linear"), torch.device("cpu"), torch.float32
    )
    ratio = plain / ours
    assert (ratio == 1).any() and (ratio == args.rope_scaling_factor).any()
    assert ((ratio > 1) & (ratio < args.rope_scaling_factor)).any()


# --------------------------------------------------------------------------- what is refused, by name


def save_hf_dir(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


def edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_gpt2_and_starcoder2_style_models_are_refused_saying_why(tmp_path):
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    )
    sc2 = transformers.Starcoder2ForCausalLM(
        transformers.Starcoder2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    )  # fmt: skip
    for name, model in (("gpt2", gpt2), ("starcoder2", sc2)):
        d = save_hf_dir(model, tmp_path / name)
        with pytest.raises(formats.CheckpointError, match=rf"model_type='{name}' is a GPT-2 / StarCoder2-style model "
                           r"\(LayerNorm, GELU MLP, biases everywhere\)"):  # fmt: skip
            formats.load_hf(d)


@pytest.mark.parametrize(
    ("family", "changes", "match"),
    [
        (
            "llama3",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
            "rope scaling 'yarn'",
        ),
        ("llama3", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
        ("llama3", {"attention_bias": True}, "attention_bias=true"),
        ("llama3", {"mlp_bias": True}, "mlp_bias=true"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=true"),
        ("qwen3", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("qwen3", {"model_type": "qwen3_moe"}, "model_type='qwen3_moe' is not supported"),
        ("mistral", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        (
            "llama3",
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
            "original_max_position_embeddings",
        ),
    ],
)
def test_unsupported_config_features_are_refused_naming_the_key(family, changes, match, tiny_dir, tmp_path):
    d = edit_config(tiny_dir / f"base_{family}", tmp_path / "m", **changes)
    with pytest.raises(formats.CheckpointError, match=match):
        formats.load_hf(d)


def test_tensors_are_checked_strictly(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = edit_config(tiny_dir / "base_qwen2", tmp_path / "extra")
    sd = load_file(d / "model.safetensors")
    save_file({**sd, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, d / "model.safetensors")
    with pytest.raises(
        formats.CheckpointError, match=r"unexpected keys \(1\): model.layers.0.self_attn.o_proj.bias"
    ):
        formats.load_hf(d)
    d = edit_config(tiny_dir / "base_qwen2", tmp_path / "nobias")
    save_file(
        {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_proj.bias"}, d / "model.safetensors"
    )
    with pytest.raises(
        formats.CheckpointError, match=r"missing keys \(1\): model.layers.1.self_attn.k_proj.bias"
    ):
        formats.load_hf(d)
    d = edit_config(
        tiny_dir / "base_qwen2", tmp_path / "untied_copy"
    )  # a tied checkpoint that carries lm_head
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"] + 1}, d / "model.safetensors")
    with pytest.raises(
        formats.CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"
    ):
        formats.load_hf(d)
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, d / "model.safetensors")
    assert formats.load_hf(d).args.tie_embeddings  # the same copy: accepted


def test_a_sequence_past_the_sliding_window_is_refused(tiny_dir):
    m = formats.load_hf(tiny_dir / "base_mistral")
    w = tiny.MISTRAL_WINDOW
    assert m.args.context_len == w < m.args.max_seq_len
    with pytest.raises(ValueError, match=rf"sequence of {w + 1} positions > sliding_window={w}"):
        m(ids_for(m.args, batch=1, seq=w + 1))


def test_meta_export_refuses_what_metas_layout_cannot_hold(tiny_dir, tmp_path):
    expect = {"llama3": "llama3 RoPE scaling", "qwen2": "q/k/v biases", "qwen3": "q/k RMSNorm",
              "mistral": "a sliding attention window"}  # fmt: skip
    for family, feature in expect.items():
        with pytest.raises(
            formats.CheckpointError, match=f"Meta's layout cannot hold this model .*{feature}"
        ):
            formats.save_meta(formats.load_hf(tiny_dir / f"base_{family}"), tmp_path / family, reference=True)
        assert not (tmp_path / family / "params.json").exists()
    # a tied output is a copy in Meta's layout: Meta's code computes the same network
    m = formats.load_hf(
        edit_config(tiny_dir / "base_llama3", tmp_path / "l3", rope_parameters={"rope_theta": 5e5})
    )
    formats.save_meta(m, tmp_path / "meta", reference=True)
    back = formats.load_meta(tmp_path / "meta")
    ids = ids_for(m.args, batch=1, seq=20)
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids)) and not back.args.tie_embeddings


# --------------------------------------------------------------------------- tokenizers of today's kind


def test_tokenizer_check_accepts_the_same_byte_level_bpe_and_refuses_other_split_rules(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(tiny_dir / "base_qwen2")
    assert qwen.bos_token is None and qwen.pad_token == qwen.eos_token == "<|endoftext|>"
    aux_models.check_same_tokenizer(
        qwen, tiny_dir / "base_qwen3"
    )  # Qwen2.5 base, Qwen3 reference: same tokenizer
    llama3 = AutoTokenizer.from_pretrained(tiny_dir / "base_llama3")
    aux_models.check_same_tokenizer(llama3, tiny_dir / "tokenizer_llama3")
    with pytest.raises(ValueError, match="tokenizer differs from the base model's"):
        aux_models.check_same_tokenizer(qwen, tiny_dir / "base_llama3")
    # the same vocabulary with other rules (a tokenizer.json read as written, not rebuilt by Qwen2Tokenizer): without
    # Qwen's NFC normaliser and with Llama 3's split, "é" written as e + a combining accent gets other ids
    d = shutil.copytree(tiny_dir / "tokenizer_qwen", tmp_path / "other")
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = tiny.SPLIT_LLAMA3
    spec["normalizer"] = None
    (d / "tokenizer.json").write_text(json.dumps(spec))
    conf = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(
        json.dumps({**conf, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    other, text = AutoTokenizer.from_pretrained(d), "cafe\u0301 = 1000"
    assert other.get_vocab() == qwen.get_vocab() and other(text)["input_ids"] != qwen(text)["input_ids"]
    with pytest.raises(
        ValueError, match="tokenizer's normalizer and pre-tokenizer differ from the base model's"
    ):
        aux_models.check_same_tokenizer(qwen, d)
    # a BOS on one side only
    with pytest.raises(ValueError, match="bos_token differs"):
        other = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer_llama3")
        other.bos_token = None
        other.save_pretrained(str(tmp_path / "nobos"))
        aux_models.check_same_tokenizer(llama3, tmp_path / "nobos")


# --------------------------------------------------------------------------- training, exports, peft adapter


def family_kv(tiny: Path, family: str, **extra) -> dict:
    """train.py overrides for a run on tiny base_<family> (HF format, its own tokenizer), H=2, 2 steps."""
    base = tiny / f"base_{family}"
    kv = {"model.path": str(base), "model.format": "hf", "model.tokenizer": str(base), "model.n_future_tokens": 2,
          "train.steps": 2, "train.eval_every": 2, "train.val_batches": 1, "train.run_name": family}  # fmt: skip
    return {**kv, **extra}


@pytest.fixture(scope="module")
def family_runs(tiny_dir, tmp_path_factory):
    """One 2-step full fine-tuning run per family and one LoRA run on the Qwen2.5 base, in this process."""
    out = tmp_path_factory.mktemp("families")
    runs = {f: run_train(tiny_dir, out, **family_kv(tiny_dir, f)) for f in FAMILIES}
    lora = {"train.lora.enabled": True, "train.lora.dropout": 0.0, "train.lora.r": 4, "optim.lr": 1e-2}
    runs["lora"] = run_train(
        tiny_dir, out, **family_kv(tiny_dir, "qwen2", **lora, **{"train.run_name": "lora"})
    )
    return out, runs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_and_exports_its_own_architecture(family, family_runs, tiny_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, runs = family_runs
    rows = metrics(out, family)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in rows)
    final = out / family / "checkpoints" / "final"
    trained = formats.load_checkpoint(final).eval()
    assert (
        trained.args.n_future_tokens == 2
        and trained.args.family == formats.load_hf(tiny_dir / f"base_{family}").args.family
    )
    hf = AutoModelForCausalLM.from_pretrained(final / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == HF_CLASS[family]  # the base's own class, with its features
    ids = ids_for(trained.args, seed=1)
    with torch.no_grad():
        assert max_diff(hf(ids).logits, trained(ids)[:, :, 0]) <= 1e-4
        base = formats.load_hf(tiny_dir / f"base_{family}").float().eval()
        assert max_diff(base(ids)[:, :, 0], trained(ids)[:, :, 0]) > 1e-3  # training moved head 1
    cfg, names = (
        json.loads((final / "hf" / "config.json").read_text()),
        set(load_file(final / "hf" / "model.safetensors")),
    )
    assert (
        cfg["tie_word_embeddings"] == (family in ("llama3", "qwen2"))
        and ("lm_head.weight" in names) != cfg["tie_word_embeddings"]
    )
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (family == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (family == "qwen3")
    assert cfg["rope_parameters"]["rope_type"] == ("llama3" if family == "llama3" else "default")
    assert cfg.get("sliding_window") == (tiny.MISTRAL_WINDOW if family == "mistral" else None)
    # Meta's layout cannot hold any of these four: no meta/, and the run says why
    assert (
        not (final / "meta").exists()
        and f"not exported: {final / 'meta'}: Meta's layout cannot hold" in runs[family].stdout
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_export_cli_takes_each_hf_base(family, tiny_dir, hf_models, tmp_path):
    """`train.py export --checkpoint HF_DIR --format hf` of a base gives the same network back, same class."""
    from transformers import AutoModelForCausalLM

    import train

    argv = [
        "export",
        "--checkpoint",
        str(tiny_dir / f"base_{family}"),
        "--format",
        "hf",
        "--out",
        str(tmp_path / "x"),
    ]
    assert train.main(argv) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "x", dtype=torch.float32).eval()
    assert type(again).__name__ == HF_CLASS[family]
    ids = ids_for(formats.load_hf(tiny_dir / f"base_{family}").args, seed=2)
    with torch.no_grad():
        assert max_diff(again(ids).logits, hf_models[family](ids).logits) <= 1e-4
    with pytest.raises(formats.CheckpointError, match="Meta's layout cannot hold"):
        train.main([*argv[:3], "--format", "meta", "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp"))


def test_a_lora_run_on_an_hf_base_leaves_a_standard_peft_adapter(family_runs, tiny_dir, hf_models):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _ = family_runs
    final = out / "lora" / "checkpoints" / "final"
    peft_dir = final / checkpoint.PEFT_DIR
    conf = json.loads((peft_dir / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["base_model_name_or_path"] == str(tiny_dir / "base_qwen2")
    assert set(conf["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    names = set(load_file(peft_dir / "adapter_model.safetensors"))
    assert (
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in names and len(names) == 2 * 7 * 2
    )
    assert any(
        k.startswith("base_model.model.extra_heads.0.") for k in load_file(final / checkpoint.ADAPTER_FILE)
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "base_qwen2", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, peft_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "hf", dtype=torch.float32).eval()
    ids = ids_for(formats.load_hf(tiny_dir / "base_qwen2").args, seed=3)
    with torch.no_grad():
        got, want = adapted(ids).logits, merged(ids).logits
        assert max_diff(got, want) <= 1e-4
        assert max_diff(got, hf_models["qwen2"](ids).logits) > 1e-2  # training moved them
    assert merged.config.tie_word_embeddings  # the frozen tied embedding stays tied in the merged export


def test_lora_on_a_tied_output_and_rows_past_the_window_are_refused(tiny_dir, tmp_path):
    kv = family_kv(
        tiny_dir, "qwen2", **{"train.lora.enabled": True, "train.lora.target_modules": ["wq", "output"]}
    )
    p = run_train(tiny_dir, tmp_path, check=False, **kv)
    assert p.returncode != 0 and "has 'output', but" in p.stderr and "tie_word_embeddings" in p.stderr
    p = run_train(
        tiny_dir, tmp_path, check=False, **family_kv(tiny_dir, "mistral", **{"data.max_length": 300})
    )
    want = f"data.max_length = 300 is longer than the model's sliding_window = {tiny.MISTRAL_WINDOW}"
    assert p.returncode != 0 and want in p.stderr


@pytest.mark.slow
def test_plan_7b_prints_the_plans_of_the_modern_pairs():
    """scripts/plan_7b.py (metadata-only stand-ins): both new configs get a plan that fits 4 x 80 GB, with one head's
    152k / 128k logits counted as the loss computes them (chunked: model.ce_chunk)."""
    import subprocess
    import sys

    from config import REPO

    p = subprocess.run(
        [sys.executable, "scripts/plan_7b.py"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for cfg, vocab, gb in (("rho1_qwen25coder_mbpp", 152064, "3.92"), ("rho1_llama31_mbpp", 128256, "3.67")):
        block = p.stdout.split(
            f"python train.py configs/{cfg}.toml --dry-run --model.activation_checkpointing=true"
        )[1]
        assert f"vocab={vocab}" in block and f"one head's logits, CE and grads              {gb} GB" in block
        assert block.split("$ ")[0].rstrip().endswith("plan fits: OK (no optimizer step was run)")
