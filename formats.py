"""Weight formats: load and save an MTP Transformer as Meta's, Hugging Face Llama's or our own checkpoint.

    Meta  params.json + consolidated.pth   `load_meta` / `save_meta` (keys = our module names, strict)
    HF    config.json + *.safetensors      `load_hf` / `save_hf` (Llama, Qwen2, Qwen3, Mistral; q/k rows re-permuted)
    ours  config.json + model.safetensors  `load_checkpoint` / `save_checkpoint` (ModelArgs as JSON)

`detect_format` tells them apart from their files, `load_model` dispatches, `read_model_args` reads the shapes
without the weights (dry runs). Every loader checks before it builds: the files are what was written (Meta's
checklist.chk, torch's zip CRCs, the safetensors header), every tensor is finite, and the keys and shapes match
the model exactly; errors (`CheckpointError`) name the file and the tensor or keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from files import atomic_write
from integrity import (
    CheckpointError,
    check_finite,
    check_torch_zip,
    load_safetensors,
    read_json_object,
    torch_load,
    verify_checklist,
)
from model import FAMILIES, META_KEYS, ModelArgs, Transformer

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Building: strict keys and shapes, then the tensors; heads dropped or added


def _meta_model(args: ModelArgs) -> Transformer:
    """Transformer(args) on the meta device: its names and shapes, no memory."""
    with torch.device("meta"):
        return Transformer(args)


def _shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """The state dict keys and shapes of Transformer(args): what a checkpoint must hold, exactly (a tied output
    is the embedding itself: not listed, Transformer.load_state_dict puts it back)."""
    shapes = {k: v.shape for k, v in _meta_model(args).state_dict().items()}
    if args.tie_embeddings:
        del shapes["output.weight"]
    return shapes


def _full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    sd = model.state_dict()
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
        for k, v in sd.items()
    }


def _check_keys(expected: dict[str, torch.Size], sd: dict[str, Tensor], source: str) -> None:
    """Every expected key present with its shape, nothing else; else one error listing all problems."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} != model {tuple(s)}"
        for k, s in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(s)
    ]
    if missing or unexpected or shapes:

        def show(xs: list[str]) -> str:
            return ", ".join(xs[:20]) + (f", ... ({len(xs)} in all)" if len(xs) > 20 else "")

        parts = [f"{name} ({len(xs)}): {show(xs)}" for name, xs in [("missing keys", missing),
                 ("unexpected keys", unexpected), ("wrong shapes", shapes)] if xs]  # fmt: skip
        raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(parts))


def _build(args: ModelArgs, sd: dict[str, Tensor], source: str) -> Transformer:
    """Build on the meta device (no double memory), check keys/shapes strictly, then assign the tensors."""
    model = _meta_model(args)
    _check_keys(_shapes(args), sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def _resize_heads(args: ModelArgs, sd: dict[str, Tensor], H: int) -> tuple[ModelArgs, dict[str, Tensor]]:
    """Keep the trunk; keep the first min(H, H0) heads; new heads are copies of head 1's block (opt-in)."""
    H0, trunk = args.n_future_tokens, args.n_trunk
    if H == H0:
        return args, sd

    def head_prefix(k: int) -> str:
        return f"layers.{trunk}." if k == 0 else f"extra_heads.{k - 1}."

    out = {k: v for k, v in sd.items() if not k.startswith(("extra_heads.", f"layers.{trunk}."))}
    for k in range(H):
        src = head_prefix(k if k < H0 else 0)
        for name, t in sd.items():
            if name.startswith(src):
                out[head_prefix(k) + name[len(src) :]] = t if k < H0 else t.clone()
    if H > H0:
        log.warning(
            "n_future_tokens %d -> %d: heads %d..%d start as copies of head 1's block", H0, H, H0 + 1, H
        )
    return dataclasses.replace(args, n_layers=trunk + H, n_future_tokens=H), out


# ----------------------------------------------------------------------------------------------------------------
# Meta: params.json + consolidated.pth (keys = our module names)


def _meta_weights_file(path: Path) -> Path:
    if (path / "consolidated.pth").exists():
        return path / "consolidated.pth"
    shards = sorted(path.glob("consolidated.*.pth"))
    if len(shards) == 1:
        return shards[0]
    if shards:
        raise CheckpointError(
            f"{path}: {len(shards)} model-parallel shards; merge them into consolidated.pth"
        )
    raise CheckpointError(f"{path}: no consolidated.pth (Meta format expects params.json + consolidated.pth)")


def load_meta(path: str | os.PathLike, n_future_tokens: int | None = None) -> Transformer:
    """Load Meta's format strictly. `n_future_tokens` (default: params.json's, else 1) may drop or add heads."""
    path = Path(path)
    params = read_json_object(path / "params.json")
    wfile = _meta_weights_file(path)
    if not verify_checklist(path):  # no checklist.chk: torch's own per-record CRCs still catch damage
        check_torch_zip(wfile)
    sd = torch_load(wfile)
    check_finite(sd, str(wfile))
    freqs = sd.pop("rope.freqs", None)  # old Meta checkpoints store RoPE frequencies; ours are computed
    params.pop("max_batch_size", None)  # Meta's inference-time setting, not architecture
    if params.pop("use_scaled_rope", False):
        raise CheckpointError(
            f"{path / 'params.json'}: use_scaled_rope=true (Llama 3.1 RoPE) is not supported"
        )
    if params.get("vocab_size", 0) in (-1, 0) and "tok_embeddings.weight" in sd:
        params["vocab_size"] = sd["tok_embeddings.weight"].shape[0]  # Llama-2 style params.json has -1
    args = ModelArgs.from_dict(params, str(path / "params.json"))
    if freqs is not None:
        want = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
        if freqs.shape != want.shape or not torch.allclose(freqs.float(), want, rtol=1e-3):
            raise CheckpointError(f"{wfile}: rope.freqs does not match rope_theta={args.rope_theta}")
    source = f"{wfile} (params: {path / 'params.json'})"
    _check_keys(_shapes(args), sd, source)
    if n_future_tokens is not None:
        args, sd = _resize_heads(args, sd, n_future_tokens)
    return _build(args, sd, source)


def _params_json(args: ModelArgs) -> dict[str, Any]:
    """params.json: Meta's keys, and the extensions only where they are used (so Meta's code reads it then). A tied
    output is written as a copy (Meta's layout has its own output.weight): the key goes."""
    ext = {k: v for k, v in args.extensions().items() if k != "tie_embeddings"}
    return {k: getattr(args, k) for k in (*META_KEYS, "max_seq_len")} | ext


# what Meta's reference code cannot run, by the params.json key that would carry it (its description)
META_REFUSED = {
    "qkv_bias": "q/k/v biases (Qwen2)",
    "qk_norm": "q/k RMSNorm (Qwen3)",
    "attn_head_dim": "a head_dim other than dim / n_heads",
    "rope_scaling_type": "llama3 RoPE scaling (Llama 3.1)",
    "sliding_window": "a sliding attention window (Mistral)",
}


def save_meta(
    model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None, reference: bool = False
) -> None:
    """Write params.json + consolidated.pth (each atomically; weights first, so params.json marks completion).

    `dtype` casts the weights (None: as they are). `reference=True` writes params.json as Meta's reference code
    reads it (`ModelArgs(max_seq_len=..., max_batch_size=..., **params)`): without max_seq_len, its build
    argument; load_meta then uses the ModelArgs default. ffn_hidden_dim / rope_scaling_factor (models from HF
    checkpoints) have no Meta key: they are kept when used, so load_meta still builds the same model. What Meta's
    code cannot compute at all (META_REFUSED: biases, q/k norm, llama3 RoPE, ...) is refused with reference=True,
    naming the feature; a tied output is written as its own tensor.
    """
    path = Path(path)
    params = _params_json(model.args)
    if reference:
        del params["max_seq_len"]
        refused = [META_REFUSED[k] for k in params if k in META_REFUSED]
        if refused:
            raise CheckpointError(
                f"Meta's layout cannot hold this model ({model.args.family}): {', '.join(refused)}; "
                "export it in the HF format instead"
            )
        params.pop("family", None)  # a Mistral without a window is a Llama to Meta's code
        extra = sorted(set(params) & {"ffn_hidden_dim", "rope_scaling_factor"})
        if extra:
            log.warning("params.json keeps %s, which Meta's reference code does not read", extra)
    sd = {
        k: (v.clone() if k == "output.weight" else v).to(dtype or v.dtype)
        for k, v in _full_state_dict(model).items()
    }
    atomic_write(path / "consolidated.pth", lambda tmp: torch.save(sd, tmp))
    text = json.dumps(params, indent=2)
    atomic_write(path / "params.json", lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------------------------
# Ours: config.json (ModelArgs) + model.safetensors


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Our format: model.safetensors + config.json (ModelArgs), each written atomically."""
    path = Path(path)
    sd = {k: v for k, v in _full_state_dict(model).items() if k in _shapes(model.args)}  # tied: once
    atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    text = json.dumps(dataclasses.asdict(model.args), indent=2)
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text))


def load_checkpoint(path: str | os.PathLike, n_future_tokens: int | None = None) -> Transformer:
    """Load `save_checkpoint`'s format strictly."""
    path = Path(path)
    cfg = read_json_object(path / "config.json")
    if "model_type" in cfg or "architectures" in cfg:
        raise CheckpointError(f"{path / 'config.json'} is an HF config: load it with fmt='hf' (load_hf)")
    args = ModelArgs.from_dict(cfg, str(path / "config.json"))
    wfile = path / "model.safetensors"
    if not wfile.exists():
        raise CheckpointError(f"{path}: no model.safetensors")
    sd = load_safetensors(wfile)
    _check_keys(_shapes(args), sd, str(wfile))
    if n_future_tokens is not None:
        args, sd = _resize_heads(args, sd, n_future_tokens)
    return _build(args, sd, str(wfile))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face: config.json + safetensors of Llama (2, 3.x), Qwen2 / Qwen2.5, Qwen3, Mistral (XForCausalLM = trunk +
# head 1)


HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "mistral": "MistralForCausalLM"}  # fmt: skip
# what transformers' config classes assume for a key that config.json leaves out
_HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "head_dim": None, "sliding_window": None},
    "qwen2": {"max_position_embeddings": 32768, "head_dim": None, "sliding_window": None},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128, "sliding_window": None},
    "mistral": {"max_position_embeddings": 131072, "head_dim": None, "sliding_window": 4096},
}
# families of another block (LayerNorm, GELU MLP, biases everywhere, often learned positions): refused by name
_GPT2_STYLE = ("gpt2", "gpt_bigcode", "starcoder2", "starcoder", "gpt_neox", "gptj", "codegen", "phi", "falcon",
               "bloom", "opt")  # fmt: skip
_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _hf_args(cfg: dict[str, Any], source: str) -> ModelArgs:
    """ModelArgs for an HF config.json of a supported family; anything else is refused naming the key."""
    family = cfg.get("model_type")
    if family in _GPT2_STYLE:
        raise CheckpointError(
            f"{source}: model_type={family!r} is a GPT-2 / StarCoder2-style model (LayerNorm, GELU MLP, biases "
            "everywhere), not the Llama-style block (RMSNorm, SwiGLU MLP, RoPE) this framework implements; "
            f"supported model_type: {', '.join(FAMILIES)}"
        )
    if family not in FAMILIES:
        raise CheckpointError(
            f"{source}: model_type={family!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    _refuse_hf_features(cfg, family, source)
    rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
    rope.update(cfg.get("rope_scaling") or {})  # transformers 4
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope scaling {rope_type!r} is not supported (only none/{'/'.join(_ROPE_TYPES)})"
        )
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(
            f"{source}: partial_rotary_factor != 1 (RoPE on part of a head) is not supported"
        )
    missing = [k for k in _LLAMA3_ROPE_KEYS if rope_type == "llama3" and k not in rope]
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    missing += [k for k in required if not isinstance(cfg.get(k), int)]
    optional = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
    missing += [k for k in optional if cfg.get(k) is not None and not isinstance(cfg.get(k), int)]
    if missing:
        raise CheckpointError(f"{source}: missing or non-integer key(s) {missing}")
    try:
        return _hf_model_args(cfg, family, rope, rope_type)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _refuse_hf_features(cfg: dict[str, Any], family: str, source: str) -> None:
    """The config keys of features the Transformer does not have, each refused by name."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{source}: hidden_act={cfg['hidden_act']!r}; only 'silu' (SwiGLU) is supported"
        )
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported (the MLP has no biases)")
    if cfg.get("attention_bias") and family != "qwen2":
        raise CheckpointError(
            f"{source}: attention_bias=true (biases on q/k/v and o_proj) is not supported; q/k/v biases without "
            "one on o_proj are Qwen2's"
        )
    if cfg.get("quantization_config"):
        raise CheckpointError(f"{source}: quantization_config: quantized weights are not supported")
    if cfg.get("attention_dropout", 0.0):
        raise CheckpointError(
            f"{source}: attention_dropout={cfg['attention_dropout']} is not supported (none)"
        )
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise CheckpointError(
            f"{source}: use_sliding_window=true (windowed attention from layer max_window_layers on) is not "
            "supported"
        )
    kinds = sorted(set(cfg.get("layer_types") or []) - {"full_attention"})
    if kinds and family != "mistral":
        raise CheckpointError(f"{source}: layer_types {kinds} are not supported (full_attention only)")


def _hf_model_args(cfg: dict[str, Any], family: str, rope: dict[str, Any], rope_type: str) -> ModelArgs:
    dim, n_heads, defaults = cfg["hidden_size"], cfg["num_attention_heads"], _HF_DEFAULTS[family]
    head_dim = cfg.get("head_dim") or defaults["head_dim"]
    kw: dict[str, Any] = {}
    if rope_type in ("linear", "llama3"):
        kw.update(rope_scaling_factor=float(rope["factor"]), rope_scaling_type="linear")
    if rope_type == "llama3":
        kw.update(
            rope_scaling_type="llama3",
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    return ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        n_future_tokens=1,
        max_seq_len=cfg.get("max_position_embeddings") or defaults["max_position_embeddings"],
        ffn_hidden_dim=cfg["intermediate_size"],
        attn_head_dim=None if head_dim is None or head_dim * n_heads == dim else head_dim,
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=cfg.get("sliding_window", defaults["sliding_window"]) if family == "mistral" else None,
        family=family,
        **kw,
    )


def _read_safetensors_dir(path: Path) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json_object(index)["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        names = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json (safetensors only)"
        )
    sd: dict[str, Tensor] = {}
    for f in names:
        sd.update(load_safetensors(path / f))
    return sd


# HF tensor names (the four families share them) -> ours (top level; and inside model.layers.{i}.)
_HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
_HF_BLOCK = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "self_attn.q_norm": "attention.q_norm",
             "self_attn.k_norm": "attention.k_norm", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
# our nn.Linear names -> HF's (LoRA target_modules of a peft adapter)
HF_LINEAR = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
             "w3": "up_proj", "output": "lm_head"}  # fmt: skip
_OUR_TOP, _OUR_BLOCK = {v: k for k, v in _HF_NAMES.items()}, {v: k for k, v in _HF_BLOCK.items()}


def hf_name(key: str) -> str | None:
    """The HF name of one of our tensors (trunk + head 1; None for the extra heads, which HF has no place for)."""
    if key in _OUR_TOP:
        return _OUR_TOP[key]
    parts = key.split(".")  # layers.{i}.{module}.{weight|bias}
    if parts[0] != "layers":
        return None
    return f"model.layers.{parts[1]}.{_OUR_BLOCK['.'.join(parts[2:-1])]}.{parts[-1]}"


def _rope_heads(key: str, args: ModelArgs) -> int | None:
    """How many heads of HF's rotate-half rows a tensor of ours holds (None: not rotated): wq / wk and their
    biases, and the q/k norm scales [head_dim] (one head)."""
    mod = ".".join(key.split(".")[2:-1]) if key.startswith(("layers.", "extra_heads.")) else ""
    return {"attention.wq": args.n_heads, "attention.wk": args.kv_heads, "attention.q_norm": 1,
            "attention.k_norm": 1}.get(mod)  # fmt: skip


def to_hf(key: str, t: Tensor, args: ModelArgs) -> tuple[str | None, Tensor]:
    """One of our tensors as HF holds it: its HF name (None for the extra heads) and its rows in HF's rotate-half
    order (wq / wk and their biases, the q/k norm scales; also a LoRA B of wq / wk, whose rows are the weight's)."""
    n = _rope_heads(key, args)
    return hf_name(key), _permute(t, n) if n else t


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Invert HF's convert permute (rotate-half rows -> Meta's interleaved rows) of q/k rows (weights, biases,
    norm scales)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute(w: Tensor, n_heads: int) -> Tensor:
    """HF's convert permute (Meta's interleaved rows -> rotate-half rows): `_unpermute`'s inverse."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_hf(path: str | os.PathLike, n_future_tokens: int = 1) -> Transformer:
    """Load an HF directory (config.json + safetensors) of Llama, Qwen2 / Qwen2.5, Qwen3 or Mistral strictly:
    every tensor used, every shape checked, unsupported features refused naming the key.

    All HF blocks become trunk + head 1. With n_future_tokens = H > 1 (opt-in), H-1 extra heads are appended as
    copies of the last block (with its biases and q/k norms), so every head starts as a next-token predictor to be
    fine-tuned into head k. A tied checkpoint (no lm_head.weight) gives one parameter for embedding and output.
    """
    path = Path(path)
    source = str(path / "config.json")
    args = _hf_args(read_json_object(path / "config.json"), source)
    hf = {k: v for k, v in _read_safetensors_dir(path).items() if not k.endswith("rotary_emb.inv_freq")}
    copy = hf.pop("lm_head.weight", None) if args.tie_embeddings else None  # some writers keep the tied copy
    if copy is not None and not torch.equal(copy, hf.get("model.embed_tokens.weight", copy)):
        raise CheckpointError(
            f"{path}: lm_head.weight differs from model.embed_tokens.weight but {source} says "
            "tie_word_embeddings=true"
        )
    expected = {hf_name(k): s for k, s in _shapes(args).items()}
    _check_keys(expected, hf, f"{path} (HF {HF_ARCHITECTURES[args.family]} safetensors)")
    sd = {}
    for k in _shapes(args):
        v, n = hf[hf_name(k)], _rope_heads(k, args)
        sd[k] = _unpermute(v, n) if n else v
    args, sd = _resize_heads(args, sd, n_future_tokens)
    return _build(args, sd, str(path))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config(
    args: ModelArgs,
    dtype: torch.dtype,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """The config.json of trunk + head 1 in the model's own HF family (args.family: LlamaForCausalLM,
    Qwen2ForCausalLM, ...), with its biases, q/k norms, head_dim, tying, sliding window and RoPE scaling.

    RoPE is written both ways (`rope_theta` / `rope_scaling`: transformers 4, vLLM, TGI; `rope_parameters`:
    transformers 5), and the dtype as `torch_dtype` (4) and `dtype` (5). The check reads the config back with
    load_hf's parser and refuses (CheckpointError) naming any field that would change: a feature the family cannot
    express (q/k norm in Llama, ...) fails here instead of exporting a different network.
    """
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    scaling = None
    if args.rope_scaling_factor != 1.0 or args.rope_scaling_type != "linear":
        scaling = {"rope_type": args.rope_scaling_type, "factor": args.rope_scaling_factor}
        if args.rope_scaling_type == "llama3":
            scaling.update(low_freq_factor=args.rope_low_freq_factor, high_freq_factor=args.rope_high_freq_factor,
                           original_max_position_embeddings=args.rope_original_max_seq_len)  # fmt: skip
        rope = {**scaling, "rope_theta": args.rope_theta}
    cfg = {
        "architectures": [HF_ARCHITECTURES[args.family]],
        "model_type": args.family,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_trunk + 1,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": args.tie_embeddings,
        "rope_theta": args.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
        "use_cache": True,
    }
    if args.family in ("llama", "qwen3"):
        cfg.update(attention_bias=False)
    if args.family == "llama":
        cfg.update(mlp_bias=False)
    if args.family in ("qwen2", "qwen3"):  # the window Qwen ships unused
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_trunk + 1)
    if args.family == "mistral":
        cfg.update(sliding_window=args.sliding_window)
    _check_hf_round_trip(args, cfg)
    return cfg


def _check_hf_round_trip(args: ModelArgs, cfg: dict[str, Any]) -> None:
    """Every ModelArgs field must come back unchanged from the HF config (as head 1 alone: H = 1)."""
    name = HF_ARCHITECTURES[args.family].removesuffix("ForCausalLM")
    back = _hf_args(cfg, f"HF {name} export config")
    want = {"n_layers": args.n_trunk + 1, "n_future_tokens": 1, "n_kv_heads": args.kv_heads}
    want["ffn_hidden_dim"] = args.hidden_dim  # multiple_of / ffn_dim_multiplier only shape the FFN width
    default_hd = args.dim % args.n_heads == 0 and args.head_dim == args.dim // args.n_heads
    want["attn_head_dim"] = None if default_hd else args.head_dim
    bad = []
    for f in dataclasses.fields(args):
        if f.name in ("multiple_of", "ffn_dim_multiplier"):
            continue
        value, got = want.get(f.name, getattr(args, f.name)), getattr(back, f.name)
        if value != got:
            bad.append(f"{f.name} = {value!r} (an HF {name} config gives {got!r})")
    if bad:
        raise CheckpointError(f"HF {name} cannot express this model: {'; '.join(bad)}")


def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> None:
    """Write trunk + head 1 as an HF directory of the model's own family (model.safetensors,
    generation_config.json, config.json; each atomic, config.json last). The extra heads are not part of it (the
    Meta export keeps them).

    `dtype` casts the weights (None: as they are) and is written as the config's torch_dtype. q/k rows (weights,
    biases, norm scales) get HF's rotate-half permutation back, and a tied output is written once (as the
    embedding), so `AutoModelForCausalLM.from_pretrained(path)` gives head 1's logits.
    """
    path, args = Path(path), model.args
    sd = _full_state_dict(model)
    dtype = dtype or sd["output.weight"].dtype
    cfg = hf_config(args, dtype, bos_id, eos_id, pad_id)
    out = {}
    for k in _shapes(args):
        name, t = to_hf(k, sd[k], args)
        if name is not None:  # extra_heads.* are not exported
            out[name] = t.to(dtype).contiguous()
    atomic_write(path / "model.safetensors", lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    atomic_write(path / "generation_config.json", lambda tmp: Path(tmp).write_text(json.dumps(gen, indent=2)))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))


# ----------------------------------------------------------------------------------------------------------------
# Which format, and dispatch


def detect_format(path: str | os.PathLike) -> str:
    """'hf' | 'wmtp' | 'meta' from the files of a checkpoint directory (config.json with a model_type: HF)."""
    path = Path(path)
    if (path / "config.json").is_file():
        cfg = read_json_object(path / "config.json")
        return "hf" if "model_type" in cfg or "architectures" in cfg else "wmtp"
    if (path / "params.json").is_file():
        return "meta"
    if (path / "dcp").is_dir():
        raise CheckpointError(
            f"{path} is a resume checkpoint (dcp/): export it first with "
            f"`python train.py export --checkpoint {path} --format hf --out DIR`"
        )
    raise FileNotFoundError(
        f"{path}: not a checkpoint directory (expected config.json: HF or ours, or params.json: Meta)"
    )


def load_model(path: str | os.PathLike, fmt: str, n_future_tokens: int | None = None) -> Transformer:
    """Dispatch on fmt: "meta" (params.json + consolidated.pth), "hf" (LlamaForCausalLM), "wmtp" (ours).

    n_future_tokens None keeps the checkpoint's H (1 for HF); a different H drops heads or adds copies of head 1.
    """
    if fmt == "meta":
        return load_meta(path, n_future_tokens)
    if fmt == "hf":
        return load_hf(path, n_future_tokens or 1)
    if fmt == "wmtp":
        return load_checkpoint(path, n_future_tokens)
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected 'meta', 'hf' or 'wmtp'")


def read_model_args(path: str | os.PathLike, fmt: str, n_future_tokens: int | None = None) -> ModelArgs:
    """The ModelArgs `load_model(path, fmt, n_future_tokens)` would build, without reading the weights (dry runs)."""
    path = Path(path)
    if fmt == "meta":
        params = read_json_object(path / "params.json")
        params.pop("max_batch_size", None)
        params.pop("use_scaled_rope", None)
        if params.get("vocab_size", 0) in (-1, 0):
            sd = torch_load(_meta_weights_file(path))
            params["vocab_size"] = sd["tok_embeddings.weight"].shape[0]
        args = ModelArgs.from_dict(params, str(path / "params.json"))
    elif fmt == "hf":
        args, n_future_tokens = (
            _hf_args(read_json_object(path / "config.json"), str(path / "config.json")),
            n_future_tokens or 1,
        )
    elif fmt == "wmtp":
        args = ModelArgs.from_dict(read_json_object(path / "config.json"), str(path / "config.json"))
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected 'meta', 'hf' or 'wmtp'")
    H = n_future_tokens or args.n_future_tokens
    return dataclasses.replace(args, n_layers=args.n_trunk + H, n_future_tokens=H)
