"""Weight formats: load and save an MTP Transformer as Meta's, Hugging Face Llama's or our own checkpoint.

    Meta  params.json + consolidated.pth   `load_meta` / `save_meta` (keys = our module names, strict)
    HF    config.json + *.safetensors      `load_hf` / `save_hf` (LlamaForCausalLM; q/k rows re-permuted)
    ours  config.json + model.safetensors  `load_checkpoint` / `save_checkpoint` (ModelArgs as JSON)

`detect_format` tells them apart from their files, `load_model` dispatches, `read_model_args` reads the shapes
without the weights (dry runs). Every loader checks before it builds: the files are what was written (Meta's
checklist.chk, torch's zip CRCs, the safetensors header), every tensor is finite, and the keys and shapes match
the model exactly; errors (`CheckpointError`) name the file and the tensor or keys.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import files
from errors import UserError
from files import atomic_write
from model import ModelArgs, Transformer

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Errors


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, corrupt or does not match the model it should build: the message names the file
    (and the tensor or keys)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (offset {e.start}): not a JSON file") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


# ----------------------------------------------------------------------------------------------------------------
# Integrity: every file is what was written, every tensor finite (errors name the file and the tensor)


CHECKLIST = "checklist.chk"  # Meta ships one beside its weights: `<md5>  <file name>` per line


def write_checklist(path: str | os.PathLike) -> Path:
    """Write Meta's checklist.chk (MD5 of every other file in the directory)."""
    path = Path(path)
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != CHECKLIST)
    return files.atomic_write_text(path / CHECKLIST, "".join(f"{files.md5(path / n)}  {n}\n" for n in names))


def verify_checklist(path: str | os.PathLike) -> bool:
    """Check every file listed in `path/checklist.chk` against its MD5; False when there is no checklist."""
    path = Path(path)
    chk = path / CHECKLIST
    if not chk.is_file():
        return False
    for lineno, line in enumerate(chk.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{32})\s+\*?(.+?)\s*", line)
        if m is None:
            raise CheckpointError(f"{chk}:{lineno}: expected '<md5>  <file name>', got {line!r}")
        want, f = m.group(1).lower(), path / m.group(2)
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {chk} but missing: copy or download it again")
        if files.md5(f) != want:
            if zipfile.is_zipfile(f):
                _check_torch_zip(f)  # names the damaged tensor when it can
            raise CheckpointError(
                f"{f}: MD5 {files.md5(f)} does not match {want} in {chk}: the file is corrupted or incomplete; "
                "copy or download it again (if you changed it on purpose, update or delete the checklist)"
            )
    return True


def _storage_owners(zf: zipfile.ZipFile, pkl: str) -> dict[str, list[str]]:
    """Storage record key -> names of the tensors stored in it, read from data.pkl without loading any tensor."""

    class Names(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            return lambda storage=None, *a, **k: storage  # _rebuild_tensor_v2(storage, ...) -> its record key

        def persistent_load(self, pid: Any) -> Any:
            return str(pid[2])  # ('storage', storage type, key, location, numel)

    try:
        sd = Names(io.BytesIO(zf.read(pkl))).load()
    except Exception:  # an unusual pickle: the error then names the record only
        return {}
    owners: dict[str, list[str]] = {}
    for name, key in sd.items() if isinstance(sd, dict) else ():
        owners.setdefault(str(key), []).append(str(name))
    return owners


def _check_torch_zip(wfile: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per record: check the archive and every record's CRC (torch
    itself checks neither, so a damaged file would otherwise load garbage)."""
    try:
        zf = zipfile.ZipFile(wfile)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{wfile}: not a readable torch checkpoint ({e}): the file is truncated or corrupted (torch.save's zip "
            "format was expected); copy or download it again"
        ) from None
    with zf:
        for info in zf.infolist():
            try:
                with zf.open(info) as f:
                    while f.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                prefix, _, rel = info.filename.partition("/data/")
                names = _storage_owners(zf, f"{prefix}/data.pkl").get(rel, []) if rel else []
                what = f" (tensor {', '.join(names)})" if names else ""
                raise CheckpointError(
                    f"{wfile}: record {info.filename}{what} is corrupted ({e}); copy or download the file again"
                ) from None


def _torch_load(wfile: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(wfile, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch's zip/mmap/unpickling errors: name the file
        raise CheckpointError(f"{wfile}: cannot be read by torch.load ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{wfile}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def _check_safetensors(f: Path) -> None:
    """The safetensors header is sane and describes exactly the bytes in the file (truncation, garbage)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise CheckpointError(f"{f}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise CheckpointError(f"{f}: corrupted safetensors header ({e})") from None
    end = 0
    for name, t in header.items() if isinstance(header, dict) else [("?", None)]:
        if name == "__metadata__":
            continue
        try:
            begin, stop = t["data_offsets"]
            numel = math.prod(t["shape"])
            item = _ST_BYTES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{f}: corrupted safetensors header entry for tensor {name!r}: {t!r}"
            ) from None
        if not 0 <= begin <= stop or stop - begin != numel * item:
            raise CheckpointError(
                f"{f}: tensor {name!r}: offsets {begin}..{stop} do not fit shape {t['shape']}"
            )
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{f}: the header describes {8 + n + end} bytes but the file has {size}: truncated or corrupted; "
            "copy or download it again"
        )


_ST_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ST_BYTES |= {"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _load_safetensors(f: Path) -> dict[str, Tensor]:
    if not f.is_file():
        raise CheckpointError(f"missing {f}")
    _check_safetensors(f)
    try:
        sd = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"{f}: cannot be read by safetensors ({e})") from None
    _check_finite(sd, str(f))
    return sd


def _check_finite(sd: dict[str, Tensor], source: str) -> None:
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{source}: tensor {name!r} has {bad} non-finite value(s) (NaN/Inf) of {t.numel()}: the checkpoint "
                "is corrupted or was saved from a diverged run"
            )


# ----------------------------------------------------------------------------------------------------------------
# Building: strict keys and shapes, then the tensors; heads dropped or added


def _meta_model(args: ModelArgs) -> Transformer:
    """Transformer(args) on the meta device: its names and shapes, no memory."""
    with torch.device("meta"):
        return Transformer(args)


def _shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """The state dict keys and shapes of Transformer(args): what a checkpoint must hold, exactly."""
    return {k: v.shape for k, v in _meta_model(args).state_dict().items()}


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
    _check_keys({k: v.shape for k, v in model.state_dict().items()}, sd, source)
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
    params = _read_json(path / "params.json")
    wfile = _meta_weights_file(path)
    if not verify_checklist(path):  # no checklist.chk: torch's own per-record CRCs still catch damage
        _check_torch_zip(wfile)
    sd = _torch_load(wfile)
    _check_finite(sd, str(wfile))
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
    d = dataclasses.asdict(args)
    for k, default in (("ffn_hidden_dim", None), ("rope_scaling_factor", 1.0)):
        if d[k] == default:
            del d[k]  # keep params.json readable by Meta's code when the extensions are unused
    return d


def save_meta(
    model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None, reference: bool = False
) -> None:
    """Write params.json + consolidated.pth (each atomically; weights first, so params.json marks completion).

    `dtype` casts the weights (None: as they are). `reference=True` writes params.json as Meta's reference code
    reads it (`ModelArgs(max_seq_len=..., max_batch_size=..., **params)`): without max_seq_len, its build
    argument; load_meta then uses the ModelArgs default. ffn_hidden_dim / rope_scaling_factor (models from HF
    checkpoints) have no Meta key: they are kept when used, so load_meta still builds the same model.
    """
    path = Path(path)
    sd = {k: v.to(dtype) if dtype else v for k, v in _full_state_dict(model).items()}
    params = _params_json(model.args)
    if reference:
        del params["max_seq_len"]
        extra = sorted(set(params) & {"ffn_hidden_dim", "rope_scaling_factor"})
        if extra:
            log.warning("params.json keeps %s, which Meta's reference code does not read", extra)
    atomic_write(path / "consolidated.pth", lambda tmp: torch.save(sd, tmp))
    text = json.dumps(params, indent=2)
    atomic_write(path / "params.json", lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------------------------
# Ours: config.json (ModelArgs) + model.safetensors


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Our format: model.safetensors + config.json (ModelArgs), each written atomically."""
    path = Path(path)
    sd = _full_state_dict(model)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    text = json.dumps(dataclasses.asdict(model.args), indent=2)
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text))


def load_checkpoint(path: str | os.PathLike, n_future_tokens: int | None = None) -> Transformer:
    """Load `save_checkpoint`'s format strictly."""
    path = Path(path)
    cfg = _read_json(path / "config.json")
    if "model_type" in cfg or "architectures" in cfg:
        raise CheckpointError(f"{path / 'config.json'} is an HF config: load it with fmt='hf' (load_hf)")
    args = ModelArgs.from_dict(cfg, str(path / "config.json"))
    wfile = path / "model.safetensors"
    if not wfile.exists():
        raise CheckpointError(f"{path}: no model.safetensors")
    sd = _load_safetensors(wfile)
    _check_keys(_shapes(args), sd, str(wfile))
    if n_future_tokens is not None:
        args, sd = _resize_heads(args, sd, n_future_tokens)
    return _build(args, sd, str(wfile))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face Llama: config.json + safetensors (LlamaForCausalLM = trunk + head 1)


def _hf_args(cfg: dict[str, Any], source: str) -> ModelArgs:
    """ModelArgs for an HF LlamaConfig dict; unsupported features are refused with the offending key."""
    if cfg.get("model_type") != "llama":
        raise CheckpointError(f"{source}: model_type={cfg.get('model_type')!r}; only 'llama' is supported")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{source}: {key}=true is not supported (the model has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={cfg['hidden_act']!r}; only 'silu' is supported")
    rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
    rope.update(cfg.get("rope_scaling") or {})  # transformers 4
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise CheckpointError(
            f"{source}: rope scaling {rope_type!r} is not supported (only none/default/linear)"
        )
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    missing = [k for k in required if not isinstance(cfg.get(k), int)]
    if missing:
        raise CheckpointError(f"{source}: missing or non-integer key(s) {missing}")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{source}: head_dim={cfg['head_dim']} != hidden_size / num_attention_heads")
    try:
        return _hf_model_args(cfg, rope, rope_type)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _hf_model_args(cfg: dict[str, Any], rope: dict[str, Any], rope_type: str) -> ModelArgs:
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
        n_future_tokens=1,
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        ffn_hidden_dim=cfg["intermediate_size"],
    )


def _read_safetensors_dir(path: Path) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(_read_json(index)["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        names = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json (safetensors only)"
        )
    sd: dict[str, Tensor] = {}
    for f in names:
        sd.update(_load_safetensors(path / f))
    return sd


# HF LlamaForCausalLM tensor names -> ours (top level; and inside model.layers.{i}.)
_HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
_HF_BLOCK = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Invert HF's convert permute (rotate-half rows -> Meta's interleaved rows) of a q/k projection."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def load_hf(path: str | os.PathLike, n_future_tokens: int = 1) -> Transformer:
    """Load an HF LlamaForCausalLM directory (config.json + safetensors) as our Transformer.

    All HF blocks become trunk + head 1. With n_future_tokens = H > 1 (opt-in), H-1 extra heads are appended as
    copies of the last block, so every head starts as a next-token predictor to be fine-tuned into head k.
    """
    path = Path(path)
    source = str(path / "config.json")
    cfg = _read_json(path / "config.json")
    args = _hf_args(cfg, source)
    hf = _read_safetensors_dir(path)
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    names, sub = _HF_NAMES, _HF_BLOCK
    sd, unknown = {}, []
    for k, v in hf.items():
        if k in names:
            sd[names[k]] = v
            continue
        parts = k.split(".")  # model.layers.{i}.{module}.{proj}.weight
        mod = ".".join(parts[3:-1])
        if parts[:2] != ["model", "layers"] or mod not in sub:
            unknown.append(k)
            continue
        if mod == "self_attn.q_proj":
            v = _unpermute(v, args.n_heads)
        elif mod == "self_attn.k_proj":
            v = _unpermute(v, args.kv_heads)
        sd[f"layers.{parts[2]}.{sub[mod]}.{parts[-1]}"] = v
    if unknown:
        raise CheckpointError(f"{path}: unexpected HF tensors {unknown[:20]} (biases or a non-Llama model?)")
    if "output.weight" not in sd and cfg.get("tie_word_embeddings") and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    _check_keys(_shapes(args), sd, f"{path} (HF safetensors)")
    args, sd = _resize_heads(args, sd, n_future_tokens)
    return _build(args, sd, str(path))


def _permute(w: Tensor, n_heads: int) -> Tensor:
    """HF's convert permute (Meta's interleaved rows -> rotate-half rows) of a q/k projection: `_unpermute`'s inverse."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config(
    args: ModelArgs,
    dtype: torch.dtype,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """The LlamaForCausalLM config.json of trunk + head 1. Refuses (CheckpointError) what HF Llama cannot express.

    RoPE is written both ways (`rope_theta` / `rope_scaling`: transformers 4, vLLM, TGI; `rope_parameters`:
    transformers 5), and the dtype as `torch_dtype` (4) and `dtype` (5). Every ModelArgs field has an HF
    equivalent today (ffn_hidden_dim -> intermediate_size, rope_scaling_factor -> linear scaling, GQA ->
    num_key_value_heads); the check reads the config back with load_hf's parser and names any field that would
    change, so a future extension (qk-norm, biases, Llama 3.1 RoPE, ...) fails here instead of exporting a
    different network.
    """
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    scaling = None
    if args.rope_scaling_factor != 1.0:
        scaling = {"rope_type": "linear", "factor": args.rope_scaling_factor}
        rope = {**scaling, "rope_theta": args.rope_theta}
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
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
    _check_hf_round_trip(args, cfg)
    return cfg


def _check_hf_round_trip(args: ModelArgs, cfg: dict[str, Any]) -> None:
    """Every ModelArgs field must come back unchanged from the HF config (as head 1 alone: H = 1)."""
    back = _hf_args(cfg, "HF export config")
    want = {"n_layers": args.n_trunk + 1, "n_future_tokens": 1, "n_kv_heads": args.kv_heads}
    want["ffn_hidden_dim"] = args.hidden_dim  # multiple_of / ffn_dim_multiplier only shape the FFN width
    bad = []
    for f in dataclasses.fields(args):
        if f.name in ("multiple_of", "ffn_dim_multiplier"):
            continue
        value, got = want.get(f.name, getattr(args, f.name)), getattr(back, f.name, "<no HF Llama key>")
        if value != got:
            bad.append(f"{f.name} = {value!r} (an HF Llama config gives {got!r})")
    if bad:
        raise CheckpointError(f"HF Llama cannot express this model: {'; '.join(bad)}")


def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> None:
    """Write trunk + head 1 as an HF LlamaForCausalLM directory (model.safetensors, generation_config.json,
    config.json; each atomic, config.json last). The extra heads are not part of it (the Meta export keeps them).

    `dtype` casts the weights (None: as they are) and is written as the config's torch_dtype. wq/wk get HF's
    rotate-half permutation back, so `AutoModelForCausalLM.from_pretrained(path)` gives head 1's logits.
    """
    path, args = Path(path), model.args
    sd = _full_state_dict(model)
    dtype = dtype or sd["output.weight"].dtype
    cfg = hf_config(args, dtype, bos_id, eos_id, pad_id)
    top, block = {v: k for k, v in _HF_NAMES.items()}, {v: k for k, v in _HF_BLOCK.items()}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v.to(dtype)
            continue
        parts = k.split(".")  # layers.{i}.{module}.weight (extra_heads.* are not exported)
        if parts[0] != "layers":
            continue
        mod = ".".join(parts[2:-1])
        if mod in ("attention.wq", "attention.wk"):
            v = _permute(v, args.n_heads if mod == "attention.wq" else args.kv_heads)
        out[f"model.layers.{parts[1]}.{block[mod]}.{parts[-1]}"] = v.to(dtype).contiguous()
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
        cfg = _read_json(path / "config.json")
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
        params = _read_json(path / "params.json")
        params.pop("max_batch_size", None)
        params.pop("use_scaled_rope", None)
        if params.get("vocab_size", 0) in (-1, 0):
            sd = _torch_load(_meta_weights_file(path))
            params["vocab_size"] = sd["tok_embeddings.weight"].shape[0]
        args = ModelArgs.from_dict(params, str(path / "params.json"))
    elif fmt == "hf":
        args, n_future_tokens = (
            _hf_args(_read_json(path / "config.json"), str(path / "config.json")),
            n_future_tokens or 1,
        )
    elif fmt == "wmtp":
        args = ModelArgs.from_dict(_read_json(path / "config.json"), str(path / "config.json"))
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected 'meta', 'hf' or 'wmtp'")
    H = n_future_tokens or args.n_future_tokens
    return dataclasses.replace(args, n_layers=args.n_trunk + H, n_future_tokens=H)
