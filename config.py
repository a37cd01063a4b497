"""Typed TOML configuration: one dataclass per section, defaults from the spec, `--section.key=value` overrides.

Every error names the file, the dotted key and what was expected, and is raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent


def default_data_root() -> str:
    """Where the benchmark files live: $WMTP_DATA_DIR, else ../shared/data beside the repo."""
    return os.environ.get("WMTP_DATA_DIR", str(REPO.parent / "shared" / "data"))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file through `write(tmp_path)` into a temp file beside it, then os.replace: readers never see a
    half-written file, and a crash leaves the old file (or none). Shared by every module that writes outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make outputs private to the writer
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_dir_swap(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put a fully written directory `tmp` at `final`, replacing an old one: the old is moved aside first, so
    `final` is at every moment either the complete old or the complete new directory."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


SYNTHETIC_TASKS = ("copy", "nest", "chain")  # data.py's synthetic segment kinds


class ConfigError(ValueError):
    """A config problem: the message names the file, the dotted key and what was expected."""


@dataclass
class ModelConfig:
    path: str = ""  # checkpoint directory (local path wins; else `resource` is mirrored from S3)
    format: Literal["meta", "hf", "wmtp"] = "meta"  # meta: params.json+consolidated.pth; hf: LlamaForCausalLM
    resource: str = ""  # logical S3 resource, e.g. "models/7b_1t_4" (empty: local only)
    tokenizer: str = ""  # tokenizer directory (AutoTokenizer); empty: same as `path`
    n_future_tokens: int = 4  # H; an HF checkpoint with H > 1 gets H-1 heads copied from its last block
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # parameter dtype on GPU (CPU always trains in fp32)
    max_seq_len: int = 2048
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class SyntheticConfig:
    """The synthetic benchmark with known token classes (data.py; `data.dataset = "synthetic"`)."""

    n_train: int = 4096  # rows of the train split
    n_val: int = 256  # rows of the validation split (noisy like train)
    n_test: int = 256  # clean held-out rows (CE per token class) and as many greedy-completion prompts
    tasks: list[str] = field(default_factory=lambda: ["copy", "nest", "chain"])
    min_span: int = 2  # length of the random span of a copy / nest segment, and of a junk run
    max_span: int = 8
    max_segments: int = 5  # segments per row: uniform in [1, max_segments] (fewer if data.max_length cuts)
    corrupt: float = 0.15  # q: each learnable token is replaced by a random one with this probability
    junk: float = 0.3  # probability of a run of random tokens before each segment
    rule_seed: int = 0  # the chain task's fixed function (a permutation of the symbols)
    test_seed: int = 1234  # the clean held-out rows and prompts (the same for every data.seed)


@dataclass
class DataConfig:
    dataset: Literal["mbpp", "synthetic"] = "mbpp"
    path: str = ""  # local dataset directory; empty: <data_root>/mbpp
    resource: str = "datasets/mbpp"  # logical S3 resource
    hub_id: str = "google-research-datasets/mbpp"  # last resort for users with internet
    template: Literal["zero_shot", "three_shot"] = "zero_shot"
    max_length: int = 512
    packing: bool = False
    seed: int = 42
    train_split: Literal["train", "validation", "test", "prompt"] = "train"
    val_split: Literal["train", "validation", "test", "prompt"] = "validation"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])


@dataclass
class TrainConfig:
    out_dir: str = "runs"  # the run writes into <out_dir>/<run_name>
    run_name: str = ""  # empty: <algo>-<dataset>-<timestamp>
    steps: int = 1000  # optimizer steps (the LR schedule spans them)
    stop_after: int = 0  # end this invocation after this step (0: at `steps`); resume later with --resume
    micro_batch_size: int = 4
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 100  # validation loss every N steps (0: only at the end)
    val_batches: int = 20  # validation batches per evaluation (0: the whole split)
    save_every: int = 0  # step checkpoints every N steps (0: only last/best)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    fsdp: bool = True  # under torchrun: FSDP2 per block (False: plain DDP-free replication for debugging)
    aux_models: Literal["replicate", "shard"] = "replicate"  # reference / reward models under torchrun
    max_bad_steps: int = 3  # consecutive non-finite steps before restoring the last good checkpoint
    lr_backoff: float = 0.5  # LR factor applied at each recovery
    max_recoveries: int = 3
    # fault injection for tests: raise torch.OutOfMemoryError / poison the loss with NaN at these steps
    inject_oom_steps: list[int] = field(default_factory=list)
    inject_oom_rank: int = -1  # -1: every rank
    inject_nan_steps: list[int] = field(default_factory=list)
    memory_gb: float = 0.0  # per-device memory for --dry-run planning (0: detect, A100 80GB when unknown)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class OptimConfig:
    lr: float = 2e-5
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_frac: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # matrices only
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class LossConfig:
    scorer: Literal["uniform", "critic_delta_v1", "rho1_excess_v1"] = "uniform"
    # which pairs one normalisation covers (spec §3.1): "head" = each head of a sequence on its own (mean weight 1
    # per head: weights move between tokens, never between heads); "sequence" = all heads jointly (ablation)
    normalize: Literal["head", "sequence"] = "head"
    lam: float = 0.3  # w~ = 1 + lam * (w - 1)
    temperature: float = 0.7
    eps: float = 0.05
    w_max: float = 3.0
    head_weights: list[float] = field(default_factory=list)  # alpha_k; empty: all 1


@dataclass
class CriticConfig:
    reward: Literal["model", "tests", "dataset"] = "model"  # dataset: the reward stored with each example
    reward_model: str = ""  # HF sequence-classification checkpoint directory (one label)
    reward_resource: str = ""  # logical S3 resource for it
    gamma: float = 0.99
    gae_lambda: float = 0.95
    pretrain_steps: int = 100  # stage 1: value head only, trunk frozen
    update_value_head: bool = True  # stage 2: keep fitting V
    value_lr: float = 1e-4
    value_hidden: int = 256
    reward_batch_size: int = 16


@dataclass
class Rho1Config:
    ref_model: str = ""  # reference causal LM directory (same tokenizer as the base)
    ref_format: Literal["meta", "hf", "wmtp"] = "hf"
    ref_resource: str = ""
    score: Literal["excess", "abs_excess"] = "excess"
    mode: Literal["weighted", "select"] = "weighted"
    top_p: float = 0.2
    top_boost: float = 1.0
    precompute: bool = False  # reference CE once per example, cached by data hash + reference model


@dataclass
class EvalConfig:
    enabled: bool = False  # evaluate at the end of train.py
    datasets: list[str] = field(default_factory=lambda: ["mbpp"])
    split: str = "test"
    n_samples: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 8
    limit: int = 0  # first K problems per dataset (0: all)
    timeout: float = 10.0  # seconds per program (MBPP task 123 needs several on a loaded machine)
    workers: int = 0  # parallel sandbox workers (0: all cores)
    report_dir: str = ""  # empty: <run dir>/eval


@dataclass
class StorageConfig:
    cache_dir: str = ".cache"
    data_root: str = field(default_factory=default_data_root)
    s3_bucket: str = ""  # empty: $WMTP_S3_BUCKET, else no S3
    s3_prefix: str = "wmtp"
    endpoint_url: str = ""  # empty: $AWS_ENDPOINT_URL, else AWS
    region: str = ""  # empty: $AWS_DEFAULT_REGION / AWS config
    upload_checkpoints: bool = False
    max_attempts: int = 5  # S3 calls: botocore attempts per request (retries with backoff) before giving up
    connect_timeout: float = 5.0  # seconds per S3 connection attempt
    multipart_threshold_mb: int = 64  # uploads above this size go multipart (S3 minimum part: 5 MiB)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: embedded sqlite store sqlite:///<repo>/mlruns/mlflow.db; or http(s)://server
    experiment: str = ""  # empty: mtp/{algo}/{dataset}
    run_name: str = ""  # empty: train.run_name
    parent_run: str = ""  # MLflow run id this run is nested under (sweep.py sets it: one parent per sweep)
    tags: list[str] = field(default_factory=list)  # extra run tags "key=value" (sweep.py: one per axis)


ALGOS = {"uniform": "baseline", "critic_delta_v1": "critic-wmtp", "rho1_excess_v1": "rho1-wmtp"}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    rho1: Rho1Config = field(default_factory=Rho1Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    source: str = "<defaults>"  # the TOML file this came from (for messages)

    @property
    def algo(self) -> str:
        """Name of the algorithm in experiment and run names: mtp/{algo}/{dataset}."""
        return ALGOS[self.loss.scorer]


# --------------------------------------------------------------------------- parsing

_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    # dotted key: (min, max, what) ; inclusive bounds
    "model.n_future_tokens": (1, 16, "an integer in [1, 16]"),
    "model.max_seq_len": (8, None, "an integer >= 8"),
    "data.max_length": (8, None, "an integer >= 8"),
    "train.steps": (0, None, "an integer >= 0"),
    "train.stop_after": (0, None, "an integer >= 0"),
    "train.micro_batch_size": (1, None, "an integer >= 1"),
    "train.grad_accum": (1, None, "an integer >= 1"),
    "train.log_every": (1, None, "an integer >= 1"),
    "train.eval_every": (0, None, "an integer >= 0"),
    "train.val_batches": (0, None, "an integer >= 0"),
    "train.save_every": (0, None, "an integer >= 0"),
    "train.max_bad_steps": (1, None, "an integer >= 1"),
    "train.lr_backoff": (1e-6, 1.0, "a factor in (0, 1]"),
    "train.max_recoveries": (0, None, "an integer >= 0"),
    "train.memory_gb": (0, None, "a number >= 0"),
    "train.lora.r": (1, None, "an integer >= 1"),
    "train.lora.dropout": (0.0, 0.999, "a probability in [0, 1)"),
    "optim.lr": (0.0, 1.0, "a learning rate in [0, 1]"),
    "optim.min_lr_ratio": (0.0, 1.0, "a ratio in [0, 1]"),
    "optim.warmup_frac": (0.0, 1.0, "a fraction in [0, 1]"),
    "optim.beta1": (0.0, 0.999999, "a value in [0, 1)"),
    "optim.beta2": (0.0, 0.999999, "a value in [0, 1)"),
    "optim.weight_decay": (0.0, None, "a value >= 0"),
    "optim.eps": (1e-30, None, "a value > 0"),
    "optim.grad_clip": (0.0, None, "a value >= 0 (0 disables clipping)"),
    "loss.lam": (0.0, 1.0, "lambda in [0, 1]"),
    "loss.temperature": (1e-6, None, "a temperature > 0"),
    "loss.eps": (1e-12, 1.0, "a floor in (0, 1]"),
    "loss.w_max": (1.0, None, "a cap >= 1"),
    "critic.gamma": (0.0, 1.0, "a discount in [0, 1]"),
    "critic.gae_lambda": (0.0, 1.0, "a value in [0, 1]"),
    "critic.pretrain_steps": (0, None, "an integer >= 0"),
    "critic.value_lr": (0.0, 1.0, "a learning rate in [0, 1]"),
    "critic.value_hidden": (1, None, "an integer >= 1"),
    "critic.reward_batch_size": (1, None, "an integer >= 1"),
    "rho1.top_p": (1e-6, 1.0, "a fraction in (0, 1]"),
    "rho1.top_boost": (0.0, None, "a value >= 0"),
    "eval.n_samples": (1, None, "an integer >= 1"),
    "eval.temperature": (0.0, None, "a temperature >= 0 (0: greedy)"),
    "eval.top_p": (1e-6, 1.0, "a value in (0, 1]"),
    "eval.max_new_tokens": (1, None, "an integer >= 1"),
    "eval.batch_size": (1, None, "an integer >= 1"),
    "eval.limit": (0, None, "an integer >= 0"),
    "eval.timeout": (0.1, None, "seconds > 0"),
    "eval.workers": (0, None, "an integer >= 0"),
    "data.synthetic.n_train": (1, None, "an integer >= 1"),
    "data.synthetic.n_val": (1, None, "an integer >= 1"),
    "data.synthetic.n_test": (1, None, "an integer >= 1"),
    "data.synthetic.min_span": (1, None, "an integer >= 1"),
    "data.synthetic.max_segments": (1, None, "an integer >= 1"),
    "data.synthetic.corrupt": (0.0, 1.0, "a probability in [0, 1]"),
    "data.synthetic.junk": (0.0, 1.0, "a probability in [0, 1]"),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    ok = True
    if origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            ok = False
        else:
            return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation {tp}")
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _fill(obj: Any, table: dict, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if key not in names or key == "source":
            known = ", ".join(sorted(n for n in names if n != "source"))
            raise ConfigError(
                f"{source}: unknown key '{dotted}' (known keys in [{prefix.rstrip('.')}]: {known})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a table [{dotted}], got {value!r}")
            _fill(getattr(obj, key), value, dotted + ".", source)
            continue
        setattr(obj, key, _coerce(value, tp, f"{source}: '{dotted}'"))


def _check_ranges(cfg: Config) -> None:
    for dotted, (lo, hi, what) in _RANGES.items():
        value = get_key(cfg, dotted)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{cfg.source}: '{dotted}' = {value!r} is out of range: expected {what}")
    loss = cfg.loss
    if loss.eps > 1.0 or loss.w_max < 1.0:
        raise ConfigError(f"{cfg.source}: need 0 < loss.eps <= 1 <= loss.w_max, got {loss.eps}, {loss.w_max}")
    if loss.head_weights and len(loss.head_weights) != cfg.model.n_future_tokens:
        raise ConfigError(
            f"{cfg.source}: 'loss.head_weights' has {len(loss.head_weights)} entries, expected "
            f"model.n_future_tokens = {cfg.model.n_future_tokens} (or an empty list for all 1)"
        )
    if any(a < 0 for a in loss.head_weights):
        raise ConfigError(f"{cfg.source}: 'loss.head_weights' must be >= 0, got {loss.head_weights}")
    if cfg.loss.scorer == "rho1_excess_v1" and cfg.rho1.mode == "select":
        p, eps = cfg.rho1.top_p, loss.eps
        need = (1 - (1 - p) * eps) / p
        if need > loss.w_max:
            raise ConfigError(
                f"{cfg.source}: 'rho1.top_p' = {p} with mode 'select' needs selected weight {need:.3f} "
                f"> loss.w_max = {loss.w_max}: raise loss.w_max or rho1.top_p"
            )
    if cfg.loss.scorer == "critic_delta_v1" and cfg.data.packing:
        raise ConfigError(
            f"{cfg.source}: 'data.packing' = true cannot be used with loss.scorer = 'critic_delta_v1' "
            "(the reward is per example): set data.packing = false"
        )
    _check_synthetic(cfg)
    for text in cfg.tracking.tags:
        if "=" not in text or not text.split("=", 1)[0]:
            raise ConfigError(f"{cfg.source}: 'tracking.tags' entry {text!r}: expected 'key=value'")
    if cfg.tracking.uri.startswith("s3://"):
        raise ConfigError(
            f"{cfg.source}: 'tracking.uri' = {cfg.tracking.uri!r} is not a tracking URI: s3:// holds artifacts, "
            "not runs. Use an http(s):// MLflow server started with --artifacts-destination s3://..., "
            "or leave it empty for the embedded sqlite store"
        )


def _check_synthetic(cfg: Config) -> None:
    sc = cfg.data.synthetic
    if sc.max_span < sc.min_span:
        raise ConfigError(
            f"{cfg.source}: 'data.synthetic.max_span' = {sc.max_span} < data.synthetic.min_span = {sc.min_span}"
        )
    bad = [t for t in sc.tasks if t not in SYNTHETIC_TASKS]
    if bad or not sc.tasks:
        raise ConfigError(
            f"{cfg.source}: 'data.synthetic.tasks' = {sc.tasks!r}: expected a non-empty list of "
            f"{', '.join(repr(t) for t in SYNTHETIC_TASKS)}"
        )
    worst = (
        3 * sc.max_span + 4
    )  # BOS, a junk run, the longest segment, EOS: a row's first segment always fits
    if cfg.data.dataset == "synthetic" and cfg.data.max_length < worst:
        raise ConfigError(
            f"{cfg.source}: 'data.max_length' = {cfg.data.max_length} is too short for the synthetic rows: "
            f"expected >= {worst} (3 * data.synthetic.max_span + 4)"
        )
    critic = cfg.loss.scorer == "critic_delta_v1"
    if critic and cfg.critic.reward == "dataset" and cfg.data.dataset != "synthetic":
        raise ConfigError(
            f"{cfg.source}: 'critic.reward' = 'dataset' needs a dataset that stores a reward with each example "
            f"(data.dataset = 'synthetic'), got data.dataset = {cfg.data.dataset!r}"
        )


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


def _top(table: dict, source: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config) if f.name != "source"}
    for key, value in table.items():
        if key not in sections:
            raise ConfigError(
                f"{source}: unknown section '{key}' (expected one of {', '.join(sorted(sections))})"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a table [{key}], got {value!r}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (or defaults when `path` is None) and apply `--section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        cfg.source = str(path)
        _top(table, cfg.source)
        _fill(cfg, table, "", cfg.source)
    for text in overrides or []:
        key, value = _parse_override(text)
        nested = _nest(key, value)
        _top(nested, f"command line {text!r}")
        _fill(cfg, nested, "", f"command line {text!r}")
    _check_ranges(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as nested plain data (for checkpoints and tracking)."""
    return dataclasses.asdict(cfg)


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
    cfg = Config()
    d = dict(d)
    cfg.source = d.pop("source", "<checkpoint>")
    _fill(cfg, d, "", cfg.source)
    return cfg


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` overrides (dotted keys) from the other arguments."""
    overrides, rest = [], []
    for a in argv:
        head = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        (overrides if "." in head and "=" in a else rest).append(a)
    return overrides, rest


if __name__ == "__main__":  # python config.py CONFIG [overrides]: print the resolved config
    ov, rest = split_args(sys.argv[1:])
    c = load_config(rest[0] if rest else None, ov)
    for k, v in flatten(to_dict(c)).items():
        print(f"{k} = {v!r}")
