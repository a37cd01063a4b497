"""The run's state on disk: resumable checkpoints, the run directory, and exports of the trained model.

- Resumable checkpoints (sharded torch.distributed.checkpoint of model + optimizer, trainer and scorer state, RNG):
  runs/<run>/checkpoints/step_NNNNNN, committed so that some complete checkpoint is always there to resume from
  (see the section comment), pruned to train.keep_checkpoints; `Snapshot` is the in-memory copy a NaN rollback
  returns to between checkpoints.
- The run directory: one run per directory (files.RunLock), what a fresh start or a resume may find there, and
  metrics.jsonl cut back to the resumed step.
- Exports: our consolidated safetensors (checkpoints/final, best; LoRA merged by peft), and the formats the
  ecosystem runs: trunk + head 1 in the base's own HF family (hf/: LlamaForCausalLM, Qwen2ForCausalLM, ...), Meta's
  MTP layout with every head (meta/, for the models it can hold), and for a LoRA run on an HF base a standard peft
  adapter of trunk + head 1 (peft/);
  `python train.py export` does the same for checkpoints that already exist. `publish` is the end of a run:
  exports, the tracker's artifacts, uploads; `complete` then marks it finished (summary.json), and a run whose
  publishing failed stays pending until `publish_pending` (the same command again) finishes it. `check_upload`
  tries the upload target before any training.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import config as C
import data
import files
import formats
import model as M
import parallel as P
import registry
import s3cache
import tracking
from errors import UserError, scrub

# --------------------------------------------------------------------------- checkpoints
#
# runs/<run>/checkpoints/step_NNNNNN/ are resumable checkpoints, each written as step_N.tmp/ and renamed into place
# when complete; `latest` is a symlink switched to the newest in one rename (files.commit_dir), so at every moment
# some complete checkpoint is there to resume from. --resume follows `latest`, else takes the newest complete
# step_N. The newest train.keep_checkpoints periodic ones (multiples of save_every) are kept, others pruned.
# A checkpoint is only written after a good step: every one is a state a NaN rollback may return to.


@dataclass
class TrainState:
    """Everything besides model/optimizer tensors that a resumed run needs to continue identically."""

    step: int = 0
    micro_batch: int = 0  # current micro-batch size (the OOM fallback halves it)
    best_val: float = float("inf")
    lr_scale: float = 1.0
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0
    recoveries: int = 0
    oom_events: int = 0
    history: list = field(default_factory=list)  # validation results
    last_weights: dict = field(default_factory=dict)  # weight statistics of the last good step
    rolled_back_steps: int = 0  # steps undone by NaN rollbacks, in all
    rollbacks: list = field(default_factory=list)  # {"at": step, "to": step, "from": snapshot | step_N}
    mlflow_run_id: str = ""  # a resumed run continues the same MLflow run
    step_seconds: float = 0.0  # wall time inside optimizer steps (cost per step)
    class_weights: torch.Tensor | None = None  # synthetic data: weights per token class (evaluate.py)


STEP_DIR = re.compile(r"step_(\d+)")


def checkpoints(ckdir: Path) -> dict[int, Path]:
    """Complete resumable checkpoints by step (a step_N directory exists only once it is complete)."""
    if not ckdir.is_dir():
        return {}
    found = ((STEP_DIR.fullmatch(p.name), p) for p in ckdir.iterdir())
    return {int(m[1]): p for m, p in found if m and (p / "trainer.pt").is_file() and not p.is_symlink()}


def find_resume(ckdir: Path) -> Path | None:
    """`latest` when it names a complete checkpoint, else the newest complete step_N, else None."""
    latest = ckdir / "latest"
    if (latest / "trainer.pt").is_file():
        return latest.resolve()
    found = checkpoints(ckdir)
    return found[max(found)] if found else None


def prune_checkpoints(ckdir: Path, current: int, save_every: int, keep: int) -> None:
    """Keep `current` and the newest `keep` periodic checkpoints (0: all); a checkpoint leaves by a rename first, so
    a step_N name never holds a half-deleted directory."""
    periodic = sorted(
        s for s in checkpoints(ckdir) if save_every and s and s % save_every == 0 and s <= current
    )
    kept = {current, *(periodic if keep == 0 else periodic[-keep:])}
    for s, path in checkpoints(ckdir).items():
        if s not in kept:
            gone = path.with_name(f".{path.name}.del")
            os.replace(path, gone)
            files.fault_point("prune:renamed")
            shutil.rmtree(gone)


def clean_partial(ckdir: Path) -> None:
    """Remove what a killed writer left (step_N.tmp, .step_N.old/.del, pointer temps) except what `latest` names;
    run with the lock held."""
    keep = (ckdir / "latest").resolve()
    for p in ckdir.iterdir() if ckdir.is_dir() else []:
        if p == keep:
            continue
        if p.name.endswith(".tmp") or (p.name.startswith(".") and p.name.endswith((".old", ".del"))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def save_resume(cfg, run_dir: Path, net, opt, st: TrainState, scorer_state, d: P.Dist) -> Path:
    """Sharded torch.distributed.checkpoint of model + optimizer (any world size can load it), trainer state and
    RNG, committed as checkpoints/step_<st.step> (see the section comment)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = run_dir / "checkpoints" / f"step_{st.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    P.barrier()
    # a failed write (a full disk) removes step_N.tmp at once; the checkpoints committed before stay as they are
    with files.writing(tmp, f"checkpoint {final.name}", clean=d.main):
        msd, osd = get_state_dict(net, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(rng, tmp / f"rng_rank{d.rank}.pt")
        if d.main:
            torch.save({"state": st.__dict__, "scorer": scorer_state.state_dict()}, tmp / "trainer.pt")
    P.barrier()
    if d.main:
        files.commit_dir(tmp, final, final.parent / "latest")
        prune_checkpoints(final.parent, st.step, cfg.train.save_every, cfg.train.keep_checkpoints)
        clean_partial(final.parent)  # what an earlier, killed commit left
    P.barrier()
    return final


def verify(ckpt: Path) -> str | None:
    """What is wrong with a resumable checkpoint's files (naming the file), or None: trainer.pt there, the DCP
    metadata readable, and every .distcp file present and as long as the entries its metadata places in it (what
    a full disk, a torn copy or a truncation leave). A damaged record inside a file shows when it is loaded."""
    import torch.distributed.checkpoint as dcp

    if not (ckpt / "trainer.pt").is_file():
        return f"{ckpt / 'trainer.pt'} is missing"
    try:
        meta = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata()
    except Exception as e:  # a missing or damaged .metadata: pickle, EOF, OS errors
        return f"{ckpt / 'dcp' / '.metadata'} cannot be read ({type(e).__name__})"
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = ckpt / "dcp" / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size < size:
            return f"{path} is truncated ({path.stat().st_size} bytes; its metadata places {size})"
    return None


def resume_candidates(ckdir: Path) -> list[Path]:
    """The checkpoint `latest` names, then every complete step_N, newest first."""
    found = checkpoints(ckdir)
    order = [found[s] for s in sorted(found, reverse=True)]
    if (ckdir / "latest" / "trainer.pt").is_file():
        first = (ckdir / "latest").resolve()
        order = [first, *(p for p in order if p != first)]
    return order


def load_newest_intact(ckdir: Path, net, opt, scorer_state, d: P.Dist, log) -> tuple[Path, TrainState]:
    """Load the newest checkpoint that verifies and loads on every rank (`verify`, then a load attempt); a damaged
    newer one is named (`log`) and passed over. Every rank calls it; they agree on each candidate."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    for ck in resume_candidates(ckdir):
        problem = verify(ck)
        if problem is None:
            try:
                st = load_resume(ck, net, opt, scorer_state, d)
            except (
                Exception,
                CheckpointException,
            ) as e:  # a damaged record the sizes miss (CRC, torn pickle)
                problem = f"{ck} cannot be loaded ({_why(e)})"
        if not P.any_rank(problem is not None, d.device):
            return ck, st
        problem = problem or "it cannot be loaded on another rank"
        log(f"checkpoint {ck.name} is damaged: {problem}; trying the one before")
    raise UserError(
        f"--resume: no intact checkpoint in {ckdir} (each one is damaged, see above): start the run again "
        "under another train.run_name"
    )


def _why(e: BaseException) -> str:
    """'Type: first line' of an exception, of the first rank's for a torch.distributed.checkpoint failure."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def load_resume(ckpt: Path, net, opt, scorer_state, d: P.Dist) -> TrainState:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(net, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(ckpt / "dcp"))
    set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    blob = torch.load(ckpt / "trainer.pt", weights_only=False)
    scorer_state.load_state_dict(blob["scorer"])
    rng_file = ckpt / f"rng_rank{d.rank}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**blob["state"])


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (the storage itself under no_grad), or the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


class Snapshot:
    """A CPU copy of this rank's trainable parameters and their optimizer state (its FSDP shards) and of the scorer
    state, taken every train.nan_snapshot_every good steps: the known-good state a NaN rollback returns to without
    reading the disk, so a rollback loses at most that many steps even when checkpoints are rare. The host buffers
    are allocated once and reused."""

    def __init__(self):
        self.step = -1
        self.params: list[torch.Tensor] = []
        self.optim: list[dict | None] = []
        self.scorer: dict = {}

    @torch.no_grad()
    def take(self, net, opt, st: TrainState, scorer_state) -> Snapshot:
        params = [p for p in net.parameters() if p.requires_grad]
        old = self.optim or [None] * len(params)
        self.params = [_to_host(self.params[i] if self.params else None, p) for i, p in enumerate(params)]
        self.optim = [
            {
                k: _to_host((old[i] or {}).get(k), v) if torch.is_tensor(v) else v
                for k, v in opt.state[p].items()
            }
            if p in opt.state
            else None
            for i, p in enumerate(params)
        ]
        self.scorer = copy.deepcopy(scorer_state.state_dict())
        self.step = st.step
        return self

    @torch.no_grad()
    def restore(self, net, opt, scorer_state) -> None:
        params = [p for p in net.parameters() if p.requires_grad]
        for p, saved, state in zip(params, self.params, self.optim, strict=True):
            _local(p).copy_(saved)
            if state is None:
                opt.state.pop(p, None)  # not stepped yet at the snapshot: AdamW starts this one afresh
                continue
            for k, v in state.items():
                if torch.is_tensor(v) and k in opt.state[p]:
                    _local(opt.state[p][k]).copy_(v)
                else:
                    opt.state[p][k] = v.clone() if torch.is_tensor(v) else v
        scorer_state.load_state_dict(copy.deepcopy(self.scorer))


def _to_host(buf: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """Copy this rank's part of `t` to the CPU, into `buf` when it fits."""
    t = _local(t).detach()
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        return t.to("cpu", copy=True)
    return buf.copy_(t)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` in metrics.jsonl: a resumed run writes the later ones again (a line
    torn by a kill goes too)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line + "\n")
        except ValueError:
            continue
    files.atomic_write_text(path, "".join(keep))


# --------------------------------------------------------------------------- the run directory
#
# A run is finished when its summary.json is there, and that file is written last: after the evaluation, the
# exports and the uploads (`complete`). Between the end of the evaluation and then, summary.pending.json holds
# the summary: a run whose publishing failed (an upload to a bucket that went away) keeps every file, and the same
# command run again publishes it without training or evaluating again (publish_pending).

PENDING = "summary.pending.json"


def read_run_json(path: Path, default: dict | None = None) -> dict:
    """A JSON object a run wrote (config.json, summary.json, summary.pending.json): `default` when the file is
    absent, a one-line error naming the file when it is corrupt."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if default is None:
            raise formats.CheckpointError(f"missing {path}") from None
        return default
    except (ValueError, UnicodeDecodeError) as e:
        raise formats.CheckpointError(
            f"{path}: corrupt ({type(e).__name__}: {e}); the run wrote it, so it was damaged afterwards"
        ) from None
    if not isinstance(obj, dict):
        raise formats.CheckpointError(f"{path}: corrupt (expected a JSON object)")
    return obj


def read_pending(run_dir: Path) -> dict | None:
    """{"summary": ..., "mlflow_run_id": ...} of a finished run whose publishing has not completed, else None."""
    if (run_dir / "summary.json").is_file() or not (run_dir / PENDING).is_file():
        return None
    return read_run_json(run_dir / PENDING)


def write_pending(run_dir: Path, summary: dict, mlflow_run_id: str | None) -> None:
    text = scrub(
        json.dumps({"mlflow_run_id": mlflow_run_id or "", "summary": summary}, indent=2, default=str)
    )
    files.atomic_write_text(run_dir / PENDING, text)


def write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json, the mark of a finished run (written last), then the pending copy goes."""
    files.atomic_write_text(run_dir / "summary.json", scrub(json.dumps(summary, indent=2, default=str)))
    (run_dir / PENDING).unlink(missing_ok=True)


def open_run_dir(cfg, d: P.Dist, run_dir: Path, resume: bool, overwrite: bool = False) -> files.RunLock:
    """Take the run directory: its lock (rank 0; every rank stops if another run holds it), then refuse to start
    over an unfinished run (or a finished one without `overwrite`), clear what a killed writer left and write
    config.json (credentials scrubbed)."""
    lock, problem = files.RunLock(run_dir), None
    if d.main:
        try:
            lock.acquire()
            problem = _check_start(run_dir, resume, overwrite)
        except UserError as e:
            problem = str(e)
            lock.release()
    problem = P.broadcast_object(problem)
    if problem:
        raise UserError(problem)
    if d.main:
        if lock.previous.get("pid"):
            was = lock.previous
            print(
                f"{run_dir}: taking over the lock of a run that is gone (host {was.get('host')}, pid {was.get('pid')})"
            )
        clean_partial(run_dir / "checkpoints")
        text = scrub(json.dumps(C.to_dict(cfg), indent=2))
        files.atomic_write_text(run_dir / "config.json", text)
    P.barrier()
    blind = _ranks_not_seeing(lock.path, d)
    if blind:
        if d.main:
            lock.release()
        raise UserError(
            f"{run_dir}: rank(s) {blind} do not see the files rank 0 writes there: every rank writes its "
            "checkpoint shards into train.out_dir, so on several nodes it must be one filesystem they all mount "
            "(NFS, a ReadWriteMany volume; docs/DEPLOY.md, 'Beyond one node')"
        )
    return lock


def _ranks_not_seeing(lock_file: Path, d: P.Dist) -> str:
    """The ranks (with their hosts) whose view of the run directory lacks rank 0's lock file as rank 0 wrote it
    (it names rank 0's host, pid and start time); '' when every rank sees it. One collective on every rank."""
    if not d.enabled or d.world_size == 1:
        return ""
    expected = P.broadcast_object(lock_file.read_text() if d.main else None)
    try:
        seen = lock_file.read_text() == expected
    except OSError:
        seen = False
    views = P.all_gather_object(None if seen else f"{d.rank} ({socket.gethostname()})")
    return ", ".join(v for v in views if v)


def _check_start(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if read_pending(run_dir) is not None:
        return  # finished, its publishing pending: the run publishes it (with or without --resume), never deletes
    ck = find_resume(run_dir / "checkpoints")
    if resume and ck is None:
        raise UserError(
            f"--resume: no checkpoint in {run_dir / 'checkpoints'} (train.run_name = {run_dir.name!r})"
        )
    finished = (run_dir / "summary.json").exists()
    if resume or (ck is None and not finished):
        return
    if not finished:
        raise UserError(
            f"{run_dir} holds an unfinished run (checkpoint {ck.name}): continue it with --resume, or choose "
            "another train.run_name (or delete the directory)"
        )
    if not overwrite:
        raise UserError(
            f"{run_dir} holds a finished run (summary.json): choose another train.run_name, or pass --overwrite "
            "to delete its files and train it again"
        )
    print(f"{run_dir}: --overwrite: starting over; the files of the finished run there are removed")
    for p in run_dir.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.name != ".lock":
            p.unlink()


def export_model(net, out: Path, tokenizer, d: P.Dist) -> Path | None:
    """Consolidated safetensors of the full model (LoRA merged) on rank 0; every rank must call it under FSDP.

    A LoRA run also leaves its adapters as trained, every head's, in our names (adapter.safetensors +
    adapter_config.json): `write_peft_adapter` turns trunk + head 1's into a standard peft adapter of an HF base."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    args = M.unwrap(net).args
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with files.writing(tmp, f"the {out.name} export"):
        _write_ours(net, args, full, tmp, tokenizer)
        files.atomic_dir_swap(tmp, out)
    return out


def _write_ours(net, args: M.ModelArgs, full: dict, tmp: Path, tokenizer) -> None:
    """Our format of the full state dict `full` into `tmp` (a LoRA run: + its adapters alone, in our names)."""
    if hasattr(net, "get_base_model"):  # peft: the adapters alone, then merged by peft into a plain copy
        lc = net.peft_config["default"]
        adapters = {k: v.contiguous() for k, v in full.items() if "lora_" in k}
        save_file(adapters, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        meta = {"r": lc.r, "lora_alpha": lc.lora_alpha, "lora_dropout": lc.lora_dropout,
                "target_modules": sorted(lc.target_modules)}  # fmt: skip
        (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2))
        full = merge_lora(full, args, lc.r, lc.lora_alpha, lc.target_modules)
    clean = M.Transformer(args)
    clean.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
    formats.save_checkpoint(clean, tmp)
    tokenizer.save_pretrained(str(tmp))


ADAPTER_FILE = (
    "adapter.safetensors"  # a LoRA run's adapters in our names (every head), beside the merged model
)
PEFT_DIR = "peft"  # beside hf/: trunk + head 1's adapters as a standard peft adapter of the HF base


def merge_lora(full: dict, args: M.ModelArgs, r: int, alpha: int, target_modules) -> dict:
    """The state dict of a LoRA run (peft's key names: base weights and adapters) merged by peft itself
    (`merge_and_unload`: W + alpha / r * B @ A) into our plain state dict, in fp32."""
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        base = M.Transformer(args)
    net = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules)))
    # the weights peft merges into are copied: in one process `full` holds the live model's own tensors
    sd = {k: v.to(torch.float32, copy=".base_layer." in k) for k, v in full.items()}
    tied = "base_model.model.output.weight"
    if args.tie_embeddings and tied not in sd:  # a shared tensor may be listed once
        sd[tied] = sd["base_model.model.tok_embeddings.weight"]
    net.load_state_dict(sd, strict=True, assign=True)
    return net.merge_and_unload().state_dict()


def write_peft_adapter(ckpt: Path, out: Path, base: str) -> Path:
    """A standard peft adapter directory (adapter_config.json + adapter_model.safetensors) of trunk + head 1's
    LoRA adapters, in HF's module and parameter names, for the HF base `base` the run started from:
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)` computes the merged hf/ export.

    B matrices of q/k get HF's rotate-half row order (their rows are the weight's rows); A matrices are unchanged.
    The extra heads' adapters stay in ckpt's adapter.safetensors only: HF's architecture has no place for them."""
    from peft import LoraConfig

    args = formats.read_model_args(ckpt, "wmtp")
    ours = json.loads((ckpt / "adapter_config.json").read_text())
    sd = {}
    for key, t in load_file(ckpt / ADAPTER_FILE).items():  # base_model.model.<module>.lora_A.default.weight
        module, ab = key.removeprefix("base_model.model.").split(".lora_")
        name, t = (
            formats.to_hf(f"{module}.weight", t, args)
            if ab[0] == "B"
            else (formats.hf_name(f"{module}.weight"), t)
        )
        if name is not None:  # None: an extra head
            sd[f"base_model.model.{name.removesuffix('.weight')}.lora_{ab[0]}.weight"] = (
                t.float().contiguous()
            )
    config = LoraConfig(
        r=ours["r"],
        lora_alpha=ours["lora_alpha"],
        lora_dropout=ours.get("lora_dropout", 0.0),
        target_modules=sorted(formats.HF_LINEAR[m] for m in ours["target_modules"]),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(sd, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(tmp))
    files.atomic_dir_swap(tmp, out)
    return out


# --------------------------------------------------------------------------- exports (HF, Meta, peft)

EXPORT_FORMATS = ("hf", "meta")


def export_dtype(cfg: C.Config) -> torch.dtype:
    """Exports are written in model.dtype (bf16 by default: what the model computed in on GPUs and what Llama
    checkpoints ship as, half of the fp32 masters' size); our own format keeps the fp32 masters."""
    return torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32


def write_export(
    net: M.Transformer, out: Path, fmt: str, tokenizer, dtype: torch.dtype | None, readme: str | None = None
) -> Path:
    """One export directory with the tokenizer, written to a temp directory then renamed into place.

    hf: trunk + head 1 in the model's own HF family (LlamaForCausalLM, Qwen2ForCausalLM, ...; + README.md model
    card); meta: params.json + consolidated.pth, every head, params.json readable by Meta's reference code (refused,
    naming the feature, for a model Meta's code cannot compute: formats.META_REFUSED)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # a refused model (the Meta layout cannot hold it, ...) or a full disk: nothing half-written stays
    with files.writing(tmp, f"the {fmt} export"):
        if fmt == "hf":
            ids = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
            formats.save_hf(net, tmp, dtype, *ids)
            if readme is not None:
                files.atomic_write_text(tmp / "README.md", readme)
        else:
            formats.save_meta(net, tmp, dtype, reference=True)
        tokenizer.save_pretrained(str(tmp))
        files.atomic_dir_swap(tmp, out)
    return out


def export_formats(cfg: C.Config, run_dir: Path, ckpt: Path, tokenizer) -> None:
    """hf/ and meta/ inside a finished checkpoint directory of ours (checkpoints/final, checkpoints/best), and for
    a LoRA run on an HF base the peft adapter (peft/). A model Meta's layout cannot hold (Qwen2's biases, Llama
    3.1's RoPE, ...) gets no meta/: the reason is printed.

    Run once at the end of the run, from the files: `best` is rewritten at every improvement during training,
    so writing three formats each time would triple that I/O for copies that are overwritten anyway."""
    net = formats.load_checkpoint(ckpt)
    name, params, metrics, tags = run_card_inputs(run_dir)
    where = f"{run_dir.name}/{ckpt.relative_to(run_dir).as_posix()}/hf"
    readme = registry.hf_readme(name, params, metrics, tags, where)
    for fmt in EXPORT_FORMATS:
        try:
            write_export(net, ckpt / fmt, fmt, tokenizer, export_dtype(cfg), readme)
        except formats.CheckpointError as e:
            if fmt != "meta":
                raise
            print(f"not exported: {ckpt / fmt}: {e}")
            continue
        print(f"exported {ckpt / fmt} ({fmt}, {export_dtype(cfg)})")
    if (ckpt / ADAPTER_FILE).is_file() and cfg.model.format == "hf":
        write_peft_adapter(ckpt, ckpt / PEFT_DIR, cfg.model.path or cfg.model.resource)
        print(
            f"exported {ckpt / PEFT_DIR} (peft LoRA adapter of trunk + head 1 for {cfg.model.path or cfg.model.resource})"
        )


def upload_resource(run_dir: Path) -> str:
    """Where `storage.upload_checkpoints` puts a run's checkpoints: s3://<bucket>/<prefix>/<this>/final, best."""
    return f"runs/{run_dir.name}/checkpoints"


def publish(cfg: C.Config, run_dir: Path, tokenizer, tracker: tracking.Tracker) -> None:
    """The end of a run, on rank 0: hf/ and meta/ beside ours in checkpoints/final and best, both logged to the
    tracker, and uploaded to s3://<bucket>/<prefix>/runs/<run>/checkpoints/ when `storage.upload_checkpoints`.
    Every step may be done again (a rerun of a run whose publishing failed does them all)."""
    done = [c for c in (run_dir / "checkpoints" / n for n in ("final", "best")) if c.exists()]
    for ck in done:
        export_formats(cfg, run_dir, ck, tokenizer)
    for ck in done:
        tracker.log_artifacts(ck, f"checkpoints/{ck.name}")
    for ck in done if cfg.storage.upload_checkpoints else []:
        s3cache.upload(ck, f"{upload_resource(run_dir)}/{ck.name}", cfg.storage)
        print(f"uploaded {ck} to S3 resource {upload_resource(run_dir)}/{ck.name}")


def run_card_inputs(run_dir: Path) -> tuple[str, dict, dict, dict]:
    """(name, params, metrics, tags) for the model card, read from a run directory: config.json, metrics.jsonl
    (the last step) and summary.json (validation and evaluation results); the keys MLflow holds for the run."""

    raw = read_run_json(run_dir / "config.json", {})
    cfg = C.from_dict(raw)
    params = tracking.clean_params(C.flatten(raw))
    with suppress(data.DataError):  # else the card says "not recorded"
        params["data.hash"] = data.run_data_hash(cfg)
    path, metrics = run_dir / "metrics.jsonl", {}
    rows = path.read_bytes().decode(errors="replace").splitlines() if path.is_file() else []
    with suppress(ValueError, AttributeError):  # a torn or damaged last line: the card goes without them
        metrics = {k: v for k, v in json.loads(rows[-1]).items() if k != "step"} if rows else {}
    summary = read_run_json(run_dir / "summary.json", {}) or (read_pending(run_dir) or {}).get("summary", {})
    if summary.get("final_val_loss") is not None:
        metrics["val/loss"] = summary["final_val_loss"]
    metrics.update(summary.get("eval") or {})
    metrics = {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    tags = {"algo": cfg.algo, "git_commit": tracking._git_commit()}
    return tracking.registered_name(tracking.experiment_name(cfg)), params, metrics, tags


def load_resume_model(ckpt: Path) -> tuple[M.Transformer, C.Config, Path]:
    """The model of a resume checkpoint (checkpoints/latest, step_N: dcp/), LoRA merged, in fp32.

    The architecture comes from the run's config.json (runs/<run>/config.json) and its base model's metadata;
    only the model entries of the sharded checkpoint are read (not the optimizer state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    problem = verify(ckpt)
    if problem is not None:
        raise formats.CheckpointError(f"{ckpt} is damaged: {problem}")
    run_dir = ckpt.resolve().parent.parent
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{ckpt} is a resume checkpoint but {run_dir / 'config.json'} (its run's config) is missing: "
            "export it from inside its run directory (runs/<run>/checkpoints/<name>)"
        )
    cfg = C.from_dict(read_run_json(run_dir / "config.json"))
    model_dir = s3cache.resolve_model(cfg, "policy")
    args = formats.read_model_args(model_dir, cfg.model.format, cfg.model.n_future_tokens)
    reader = dcp.FileSystemReader(str(ckpt / "dcp"))
    entries = reader.read_metadata().state_dict_metadata
    sd = {k[len("model.") :]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
          if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}  # fmt: skip
    try:
        dcp.load({"model": sd}, storage_reader=reader)
    except (
        Exception,
        dcp.api.CheckpointException,
    ) as e:  # a damaged record inside a file: CRC, a torn pickle
        raise formats.CheckpointError(f"{ckpt / 'dcp'} cannot be read ({_why(e)})") from None
    if cfg.train.lora.enabled:
        lc = cfg.train.lora
        sd = merge_lora(sd, args, lc.r, lc.alpha, lc.target_modules)
    with torch.device("meta"):
        net = M.Transformer(args)
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return net, cfg, model_dir


def export_cli(argv: list[str]) -> int:
    """`train.py export --checkpoint DIR --format hf|meta --out OUT [--dtype D] [--tokenizer DIR]`."""
    import argparse

    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(
        prog="train.py export", description="Export a checkpoint to HF Llama or Meta."
    )
    ap.add_argument(
        "--checkpoint", required=True, help="ours (final, best), a resume one (last, step_N), HF, Meta"
    )
    ap.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    ap.add_argument("--out", required=True, help="a new (or empty) directory")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: as the checkpoint stores them")
    ap.add_argument(
        "--tokenizer", default="", help="default: the checkpoint's, else its run's model.tokenizer"
    )
    a = ap.parse_args(argv)
    src, out = Path(a.checkpoint), Path(a.out)
    parent = src.resolve().parent  # runs/<run>/checkpoints/<name>: the run directory gives the model card
    run_dir = (
        parent.parent if parent.name == "checkpoints" and (parent.parent / "config.json").is_file() else None
    )
    try:
        if out.exists() and any(out.iterdir()):
            raise formats.CheckpointError(f"--out {out} exists and is not empty: choose a new directory")
        cfg = model_dir = None
        if (src / "dcp").is_dir():
            net, cfg, model_dir = load_resume_model(src)
        else:
            net = formats.load_model(src, formats.detect_format(src))
        if a.tokenizer or (src / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(a.tokenizer or str(src))
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        elif cfg is not None:
            tokenizer = data.load_tokenizer(cfg, model_dir)
        else:
            raise FileNotFoundError(f"{src} holds no tokenizer (tokenizer_config.json): pass --tokenizer DIR")
        readme = None  # the model card: from the run directory, else the one an HF source carries
        if a.format == "hf" and run_dir is not None:
            readme = registry.hf_readme(*run_card_inputs(run_dir), f"{run_dir.name}/checkpoints/{src.name}")
        elif a.format == "hf" and (src / "README.md").is_file():
            readme = (src / "README.md").read_text()
        write_export(net, out, a.format, tokenizer, getattr(torch, a.dtype) if a.dtype else None, readme)
    except (
        OSError
    ) as e:  # a missing or unreadable path: the one-line error of every entry point (errors.main)
        raise formats.CheckpointError(f"export: {e}") from None
    print(f"export: {out} ({a.format}, {a.dtype or 'stored dtype'}) from {src}")
    return 0


# --------------------------------------------------------------------------- the start and the end of a run


def check_upload(cfg: C.Config, d: P.Dist, run_dir: Path) -> None:
    """With storage.upload_checkpoints, write (and delete) one object where the checkpoints will go before anything
    else: a missing bucket or rejected credentials stop the run now, not after training it (rank 0 checks)."""
    if not cfg.storage.upload_checkpoints:
        return
    problem = None
    if d.main:
        try:
            s3cache.check_upload(upload_resource(run_dir), cfg.storage)
        except UserError as e:
            problem = str(e)
    problem = P.broadcast_object(problem)
    if problem:
        raise s3cache.StorageError(problem)


def complete(cfg: C.Config, run_dir: Path, tokenizer, tracker: tracking.Tracker, summary: dict) -> None:
    """Rank 0: exports, artifacts and uploads (publish), then summary.json, the mark of a finished run.
    When publishing fails the run stays pending, every file kept: the same command run again publishes it."""
    try:
        publish(cfg, run_dir, tokenizer, tracker)
    except Exception as e:
        tracker.finish("FAILED")
        if isinstance(e, UserError):  # e.g. the upload: say what is kept and how to finish
            e.args = (
                f"{e}; the run is complete and kept in {run_dir}: run the same command again to publish it "
                "(upload pending)",
            )
        raise
    write_summary(run_dir, summary)
    tracker.finish("FINISHED")
    for line in tracker.summary():
        print(line)
    print(json.dumps({k: summary.get(k) for k in FINAL_LINE}))


def publish_pending(cfg: C.Config, d: P.Dist, run_dir: Path, tokenizer) -> int:
    """A run that finished training and evaluation but not its publishing (an upload failed): publish it now,
    continuing its MLflow run, without training or evaluating again."""
    if d.main:
        pending = read_pending(run_dir)
        print(f"{run_dir}: trained and evaluated; upload pending: exporting and uploading it (no training)")
        tracker = tracking.Tracker(cfg, rank=d.rank)
        tracker.start(run_name=run_dir.name, world_size=d.world_size, resume_run_id=pending["mlflow_run_id"])
        complete(cfg, run_dir, tokenizer, tracker, pending["summary"])
    P.barrier()
    return 0


FINAL_LINE = ("algo", "steps", "first_val_loss", "final_val_loss", "skipped_steps", "recoveries")
