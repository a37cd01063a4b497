"""Typed TOML configuration: one pydantic model per section, defaults from the spec, `--section.key=value` overrides.

Validation is pydantic v2 in strict mode: the exact type (an integer is accepted for a number, nothing else is
coerced), finite numbers only (no nan/inf), the bounds declared on each field, no unknown keys. Every error names
where the value came from (`configs/x.toml:12` or the command-line override `--loss.lam=1.5`), the dotted key and
what was expected, and is raised before any work starts.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

import errors

REPO = Path(__file__).resolve().parent


def default_data_root() -> str:
    """Where the benchmark files live: $WMTP_DATA_DIR, else ../shared/data beside the repo."""
    return os.environ.get("WMTP_DATA_DIR", str(REPO.parent / "shared" / "data"))


class ConfigError(errors.UserError, ValueError):
    """A config problem: the message names where the value came from, the dotted key and what was expected."""


class Section(BaseModel):
    """Strict types, finite numbers, no unknown keys; attributes stay assignable (tests and tools set them)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ModelConfig(Section):
    path: str = ""  # checkpoint directory (local path wins; else `resource` is mirrored from S3)
    format: Literal["meta", "hf", "wmtp"] = "meta"  # meta: params.json+consolidated.pth; hf: LlamaForCausalLM
    resource: str = ""  # logical S3 resource, e.g. "models/7b_1t_4" (empty: local only)
    tokenizer: str = ""  # tokenizer directory (AutoTokenizer); empty: same as `path`
    n_future_tokens: int = Field(
        4, ge=1, le=16
    )  # H; an HF checkpoint with H > 1 gets H-1 heads copied from its last block
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # parameter dtype on GPU (CPU always trains in fp32)
    max_seq_len: int = Field(2048, ge=8)
    activation_checkpointing: bool = False
    compile: bool = False
    # positions per chunk of a head's CE: the logits of at most this many positions exist at once (model.CE_CHUNK;
    # at a 152k vocabulary 1024 positions' fp32 logits are 0.6 GB); 0: all of a head's logits at once
    ce_chunk: int = Field(1024, ge=0)


SYNTHETIC_TASKS = ("copy", "nest", "chain")  # data.py's synthetic segment kinds


class SyntheticConfig(Section):
    """The synthetic benchmark with known token classes (data.py; `data.dataset = "synthetic"`)."""

    n_train: int = Field(4096, ge=1)  # rows of the train split
    n_val: int = Field(256, ge=1)  # rows of the validation split (noisy like train)
    n_test: int = Field(
        256, ge=1
    )  # clean held-out rows (CE per token class) and as many greedy-completion prompts
    tasks: list[Literal["copy", "nest", "chain"]] = Field(["copy", "nest", "chain"], min_length=1)
    min_span: int = Field(2, ge=1)  # length of the random span of a copy / nest segment, and of a junk run
    max_span: int = Field(8, ge=1)
    max_segments: int = Field(
        5, ge=1
    )  # segments per row: uniform in [1, max_segments] (fewer if max_length cuts)
    corrupt: float = Field(0.15, ge=0.0, le=1.0)  # q: each learnable token is replaced by a random one
    junk: float = Field(0.3, ge=0.0, le=1.0)  # probability of a run of random tokens before each segment
    rule_seed: int = 0  # the chain task's fixed function (a permutation of the symbols)
    test_seed: int = 1234  # the clean held-out rows and prompts (the same for every data.seed)


class DataConfig(Section):
    dataset: Literal["mbpp", "synthetic"] = "mbpp"
    path: str = ""  # local dataset directory; empty: <data_root>/mbpp
    resource: str = "datasets/mbpp"  # logical S3 resource
    hub_id: str = "google-research-datasets/mbpp"  # last resort for users with internet
    template: Literal["zero_shot", "three_shot"] = "zero_shot"
    max_length: int = Field(512, ge=8)
    packing: bool = False
    seed: int = 42
    train_split: Literal["train", "validation", "test", "prompt"] = "train"
    val_split: Literal["train", "validation", "test", "prompt"] = "validation"
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


class TrainConfig(Section):
    out_dir: str = "runs"  # the run writes into <out_dir>/<run_name>
    run_name: str = ""  # empty: <algo>-<dataset>-<timestamp>
    steps: int = Field(1000, ge=0)  # optimizer steps (the LR schedule spans them)
    stop_after: int = Field(
        0, ge=0
    )  # end this invocation after this step (0: at `steps`); resume later with --resume
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=0)  # validation loss every N steps (0: only at the end)
    val_batches: int = Field(20, ge=0)  # validation batches per evaluation (0: the whole split)
    save_every: int = Field(
        0, ge=0
    )  # resumable checkpoints/step_N every N steps (0: only at the end / when stopped)
    keep_checkpoints: int = Field(2, ge=0)  # periodic step_N checkpoints kept on disk, newest first (0: all)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    fsdp: bool = True  # under torchrun: FSDP2 per block (False: plain DDP-free replication for debugging)
    aux_models: Literal["replicate", "shard"] = "replicate"  # reference / reward models under torchrun
    max_bad_steps: int = Field(
        3, ge=1
    )  # consecutive non-finite steps before rolling back to the last good state
    lr_backoff: float = Field(0.5, gt=0.0, le=1.0)  # LR factor applied at each recovery
    max_recoveries: int = Field(3, ge=0)
    # a CPU copy of model + optimizer every N good steps: a NaN rollback then loses at most N steps (0: no copy,
    # roll back to the last checkpoint). Costs host memory of one sharded checkpoint per rank.
    nan_snapshot_every: int = Field(50, ge=0)
    # fault injection for tests: raise torch.OutOfMemoryError / poison the loss with NaN at these steps
    inject_oom_steps: list[int] = []
    inject_oom_rank: int = Field(-1, ge=-1)  # -1: every rank
    inject_nan_steps: list[int] = []
    memory_gb: float = Field(
        0.0, ge=0.0
    )  # per-device memory for --dry-run planning (0: detect, A100 80GB when unknown)
    lora: LoraConfig = Field(default_factory=LoraConfig)


class OptimConfig(Section):
    lr: float = Field(2e-5, ge=0.0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # cosine decays to lr * min_lr_ratio
    warmup_frac: float = Field(0.03, ge=0.0, le=1.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.1, ge=0.0)  # matrices only
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping


class LossConfig(Section):
    scorer: Literal["uniform", "critic_delta_v1", "rho1_excess_v1", "dft_v1"] = "uniform"
    # which pairs one normalisation covers (spec §3.1): "head" = each head of a sequence on its own (mean weight 1
    # per head: weights move between tokens, never between heads); "sequence" = all heads jointly (ablation)
    normalize: Literal["head", "sequence"] = "head"
    lam: float = Field(0.3, ge=0.0, le=1.0)  # w~ = 1 + lam * (w - 1)
    temperature: float = Field(0.7, gt=0.0)  # softmax(z / T) of §3.1 (critic, rho1); dft_v1 ignores it (§3.4)
    eps: float = Field(0.05, gt=0.0, le=1.0)
    w_max: float = Field(3.0, ge=1.0)
    head_weights: list[Annotated[float, Field(ge=0.0)]] = []  # alpha_k; empty: all 1


class CriticConfig(Section):
    reward: Literal["model", "tests", "dataset"] = "model"  # dataset: the reward stored with each example
    reward_model: str = ""  # HF sequence-classification checkpoint directory (one label)
    reward_resource: str = ""  # logical S3 resource for it
    gamma: float = Field(0.99, ge=0.0, le=1.0)
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0)
    pretrain_steps: int = Field(100, ge=0)  # stage 1: value head only, trunk frozen
    update_value_head: bool = True  # stage 2: keep fitting V
    value_lr: float = Field(1e-4, ge=0.0, le=1.0)
    value_hidden: int = Field(256, ge=1)
    reward_batch_size: int = Field(16, ge=1)


class Rho1Config(Section):
    ref_model: str = ""  # reference causal LM directory (same tokenizer as the base)
    ref_format: Literal["meta", "hf", "wmtp"] = "hf"
    ref_resource: str = ""
    score: Literal["excess", "abs_excess"] = "excess"
    mode: Literal["weighted", "select"] = "weighted"
    top_p: float = Field(0.2, gt=0.0, le=1.0)
    top_boost: float = Field(1.0, ge=0.0)
    precompute: bool = False  # reference CE once per example, cached by data hash + reference model


class EvalConfig(Section):
    enabled: bool = False  # evaluate at the end of train.py
    datasets: list[str] = ["mbpp"]
    split: str = "test"
    n_samples: int = Field(1, ge=1)
    temperature: float = Field(0.2, ge=0.0)  # 0: greedy
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    limit: int = Field(0, ge=0)  # first K problems per dataset (0: all)
    timeout: float = Field(
        10.0, gt=0.0
    )  # seconds per program (MBPP task 123 needs several on a loaded machine)
    workers: int = Field(0, ge=0)  # parallel sandbox workers (0: all cores)
    report_dir: str = ""  # empty: <run dir>/eval
    speculative: bool = False  # draft with the MTP heads, verify with head 1: same output distribution


class StorageConfig(Section):
    cache_dir: str = ".cache"
    data_root: str = Field(default_factory=default_data_root)
    s3_bucket: str = ""  # empty: $WMTP_S3_BUCKET, else no S3
    s3_prefix: str = "wmtp"
    endpoint_url: str = ""  # empty: $AWS_ENDPOINT_URL, else AWS
    region: str = ""  # empty: $AWS_DEFAULT_REGION / AWS config
    upload_checkpoints: bool = False
    max_attempts: int = Field(
        5, ge=1
    )  # S3 calls: botocore attempts per request (retries with backoff) before giving up
    connect_timeout: float = Field(5.0, gt=0.0)  # seconds per S3 connection attempt
    multipart_threshold_mb: int = Field(
        64, ge=1
    )  # uploads above this size go multipart (S3 minimum part: 5 MiB)


class TrackingConfig(Section):
    enabled: bool = True
    uri: str = ""  # empty: embedded sqlite store sqlite:///<repo>/mlruns/mlflow.db; or http(s)://server
    experiment: str = ""  # empty: mtp/{algo}/{dataset}
    run_name: str = ""  # empty: train.run_name
    parent_run: str = ""  # MLflow run id this run is nested under (sweep.py sets it: one parent per sweep)
    tags: list[str] = []  # extra run tags "key=value" (sweep.py: one per axis)


ALGOS = {
    "uniform": "baseline",
    "critic_delta_v1": "critic-wmtp",
    "rho1_excess_v1": "rho1-wmtp",
    "dft_v1": "dft-wmtp",
}


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    rho1: Rho1Config = Field(default_factory=Rho1Config)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    source: str = "<defaults>"  # the TOML file this came from (for messages)

    @property
    def algo(self) -> str:
        """Name of the algorithm in experiment and run names: mtp/{algo}/{dataset}."""
        return ALGOS[self.loss.scorer]


SECTIONS = [name for name in Config.model_fields if name != "source"]


# --------------------------------------------------------------------------- where each value came from

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _dotted(text: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in text.split("."))


def _key_lines(text: str) -> dict[str, int]:
    """Line number of every table header and `key =` line of a TOML text, by dotted key (tomllib keeps none)."""
    lines: dict[str, int] = {}
    table = ""
    for n, line in enumerate(text.splitlines(), 1):
        if m := _HEADER.match(line):
            table = _dotted(m.group(1))
            lines.setdefault(table, n)
        elif m := _ASSIGN.match(line):
            key = _dotted(m.group(1))
            lines.setdefault(f"{table}.{key}" if table else key, n)
    return lines


class Origins:
    """Dotted key -> where its value came from: `file.toml:LINE` or `command line '--a.b=v'`."""

    def __init__(self, default: str):
        self.default = default
        self.by_key: dict[str, str] = {}

    def set(self, dotted: str, where: str) -> None:
        for k in [k for k in self.by_key if k == dotted or k.startswith(dotted + ".")]:
            del self.by_key[k]
        self.by_key[dotted] = where

    def __call__(self, dotted: str) -> str:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in self.by_key:
                return self.by_key[".".join(parts[:i])]
        return self.default


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


# --------------------------------------------------------------------------- validation messages


def _field(loc: tuple) -> FieldInfo | None:
    model: Any = Config
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        model = info.annotation
    return info


def _bounds(info: FieldInfo | None, loc: tuple) -> str:
    """The expected range of a field in words, from its declared bounds: 'an integer >= 1', 'a number in (0, 1]'."""
    meta = list(info.metadata) if info is not None else []
    if info is not None and isinstance(loc[-1], int):  # list element: bounds sit on the element type
        (inner,) = info.annotation.__args__
        meta = [m for a in getattr(inner, "__metadata__", ()) for m in getattr(a, "metadata", [a])]
    lo = next(((m.ge, "[") for m in meta if isinstance(m, Ge)), None) or next(
        ((m.gt, "(") for m in meta if isinstance(m, Gt)), None
    )
    hi = next(((m.le, "]") for m in meta if isinstance(m, Le)), None) or next(
        ((m.lt, ")") for m in meta if isinstance(m, Lt)), None
    )
    kind = "an integer" if info is not None and info.annotation is int else "a number"
    lo, hi = (None if b is None else (f"{b[0]:g}", b[1]) for b in (lo, hi))
    if lo and hi:
        return f"{kind} in {lo[1]}{lo[0]}, {hi[0]}{hi[1]}"
    if lo:
        return f"{kind} {'>=' if lo[1] == '[' else '>'} {lo[0]}"
    if hi:
        return f"{kind} {'<=' if hi[1] == ']' else '<'} {hi[0]}"
    return kind


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "a list",
}


def _message(err: dict, origins: Origins) -> str:
    loc = err["loc"]
    dotted = ".".join(str(p) for p in loc if not isinstance(p, int))
    shown = dotted + "".join(f"[{p}]" for p in loc if isinstance(p, int))
    where, value, kind = origins(dotted), err.get("input"), err["type"]
    if kind == "extra_forbidden":
        section = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        owner = _field(loc[:-1]).annotation if section else Config
        known = ", ".join(sorted(k for k in owner.model_fields if k != "source"))
        return f"{where}: unknown key '{dotted}' (known keys in [{section}]: {known})"
    if kind in ("model_type", "dict_type"):
        return f"{where}: '{dotted}' must be a table [{dotted}], got {value!r}"
    if kind == "literal_error":
        return f"{where}: '{shown}': expected one of {err['ctx']['expected']}, got {value!r}"
    if kind == "finite_number":
        return f"{where}: '{shown}' = {value!r}: expected a finite number, not nan or inf"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        info = _field(loc)
        return f"{where}: '{shown}' = {value!r} is out of range: expected {_bounds(info, loc)}"
    expected = _EXPECTED.get(kind, err["msg"].lower())
    return f"{where}: '{shown}': expected {expected}, got {value!r} ({type(value).__name__})"


def _validate(table: dict, origins: Origins) -> Config:
    for key, value in table.items():
        if key not in SECTIONS:
            raise ConfigError(
                f"{origins(key)}: unknown section '{key}' (expected one of {', '.join(sorted(SECTIONS))})"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{origins(key)}: '{key}' must be a table [{key}], got {value!r}")
    try:
        cfg = Config.model_validate(table)
    except ValidationError as e:
        raise ConfigError("\n".join(_message(err, origins) for err in e.errors())) from None
    _check_rules(cfg, origins)
    return cfg


def _check_rules(cfg: Config, where: Origins) -> None:
    """Rules that involve several keys (each blamed on where its first key came from)."""
    loss = cfg.loss
    if loss.head_weights and len(loss.head_weights) != cfg.model.n_future_tokens:
        raise ConfigError(
            f"{where('loss.head_weights')}: 'loss.head_weights' has {len(loss.head_weights)} entries, expected "
            f"model.n_future_tokens = {cfg.model.n_future_tokens} (or an empty list for all 1)"
        )
    if cfg.loss.scorer == "rho1_excess_v1" and cfg.rho1.mode == "select":
        p, eps = cfg.rho1.top_p, loss.eps
        need = (1 - (1 - p) * eps) / p
        if need > loss.w_max:
            raise ConfigError(
                f"{where('rho1.top_p')}: 'rho1.top_p' = {p} with mode 'select' needs selected weight {need:.3f} "
                f"> loss.w_max = {loss.w_max}: raise loss.w_max or rho1.top_p"
            )
    if cfg.loss.scorer == "critic_delta_v1" and cfg.data.packing:
        raise ConfigError(
            f"{where('data.packing')}: 'data.packing' = true cannot be used with loss.scorer = 'critic_delta_v1' "
            "(the reward is per example): set data.packing = false"
        )
    sc = cfg.data.synthetic
    if sc.max_span < sc.min_span:
        raise ConfigError(
            f"{where('data.synthetic.max_span')}: 'data.synthetic.max_span' = {sc.max_span} < "
            f"data.synthetic.min_span = {sc.min_span}"
        )
    worst = (
        3 * sc.max_span + 4
    )  # BOS, a junk run, the longest segment, EOS: a row's first segment always fits
    if cfg.data.dataset == "synthetic" and cfg.data.max_length < worst:
        raise ConfigError(
            f"{where('data.max_length')}: 'data.max_length' = {cfg.data.max_length} is too short for the synthetic "
            f"rows: expected >= {worst} (3 * data.synthetic.max_span + 4)"
        )
    critic = cfg.loss.scorer == "critic_delta_v1"
    if critic and cfg.critic.reward == "dataset" and cfg.data.dataset != "synthetic":
        raise ConfigError(
            f"{where('critic.reward')}: 'critic.reward' = 'dataset' needs a dataset that stores a reward with each "
            f"example (data.dataset = 'synthetic'), got data.dataset = {cfg.data.dataset!r}"
        )
    for text in cfg.tracking.tags:
        if "=" not in text or not text.split("=", 1)[0]:
            raise ConfigError(
                f"{where('tracking.tags')}: 'tracking.tags' entry {text!r}: expected 'key=value'"
            )
    if cfg.tracking.uri.startswith("s3://"):
        raise ConfigError(
            f"{where('tracking.uri')}: 'tracking.uri' = {cfg.tracking.uri!r} is not a tracking URI: s3:// holds "
            "artifacts, not runs. Use an http(s):// MLflow server started with --artifacts-destination s3://..., "
            "or leave it empty for the embedded sqlite store"
        )


# --------------------------------------------------------------------------- loading


def get_key(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _parse_override(text: str) -> tuple[str, Any]:
    """`--train.steps=10` -> ("train.steps", 10); the value is parsed as TOML, bare words as strings."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected --section.key=value")
    key, raw = body.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def read_toml(path: str | os.PathLike, what: str = "config file") -> tuple[str, dict]:
    """(text, table) of a TOML file; a missing file or a syntax error is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or defaults when `path` is None) and apply `--section.key=value` overrides."""
    table: dict = {}
    origins = Origins("<defaults>")
    if path is not None:
        path = Path(path)
        text, table = read_toml(path)
        origins.default = str(path)
        origins.by_key = {k: f"{path}:{n}" for k, n in _key_lines(text).items()}
    for arg in overrides or []:
        key, value = _parse_override(arg)
        _merge(table, _nest(key, value))
        origins.set(key, f"command line {arg!r}")
    cfg = _validate(table, origins)
    cfg.source = str(path) if path is not None else "<defaults>"
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as nested plain data (for checkpoints and tracking)."""
    return cfg.model_dump()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def from_dict(d: dict) -> Config:
    """Inverse of to_dict (used when a checkpoint carries its config)."""
    d = dict(d)
    source = d.pop("source", "<checkpoint>")
    cfg = _validate(d, Origins(source))
    cfg.source = source
    return cfg


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` overrides (dotted keys) from the other arguments."""
    overrides, rest = [], []
    for a in argv:
        head = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        (overrides if "." in head and "=" in a else rest).append(a)
    return overrides, rest


def _print(argv: list[str]) -> int:
    ov, rest = split_args(argv)
    c = load_config(rest[0] if rest else None, ov)
    for k, v in flatten(to_dict(c)).items():
        print(f"{k} = {v!r}")
    return 0


if __name__ == "__main__":  # python config.py CONFIG [overrides]: print the resolved config
    sys.exit(errors.main(_print, sys.argv[1:]))
