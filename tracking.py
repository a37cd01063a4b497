"""MLflow tracking for training runs: rank 0 only, an embedded sqlite store by default, resilient to server loss.

Where runs go:
- `tracking.uri` empty: an embedded store, `sqlite:///<repo>/mlruns/mlflow.db`, artifacts in
  `<repo>/mlruns/artifacts`. Browse it from the repo root with

      mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

- `tracking.uri = "http(s)://host:port"`: a tracking server (e.g. one started with
  `--artifacts-destination s3://bucket/mlflow`; the client then needs no S3 credentials). An `s3://` URI is
  rejected: S3 holds artifacts, not runs.

Artifacts use one fixed layout: `checkpoints/`, `reports/`, `samples/`, `plots/`.

Why the resilience: a tracking server that goes away must not kill a multi-hour training run. Every MLflow call is
guarded; metrics are buffered in memory (bounded) and re-sent on a later call (after a short back-off), HTTP
retries/timeouts are kept low for the run, a warning is printed once, and `summary()` says what was lost.

What the MLflow UI shows: experiments are tagged `mlflow.experimentKind = custom_model_development` (else MLflow 3
opens them on the GenAI traces view), runs carry the entry point (`mlflow.source.name`) and git commit (the Source
column) and their training data as a dataset input with its digest (the Dataset column), and system metrics
(`system/...`: CPU, memory, and GPU utilisation/memory through nvidia-ml-py) are sampled on GPU machines, or wherever
`MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true` (`false` turns them off on GPUs too).

The model registry (promote, model cards, the transformers flavor) is registry.py.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import config as C
import errors
import files
from errors import scrub

log = logging.getLogger("wmtp.tracking")

MLRUNS = C.REPO / "mlruns"  # embedded store root (a module attribute so tests can point it elsewhere)
LAYOUT = ("checkpoints", "reports", "samples", "plots")
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's model-training views
SYSTEM_METRICS_ENV = (
    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # MLflow's own switch; unset: on iff CUDA is visible
)
DIGEST_LEN = (
    16  # MLflow stores a dataset digest in at most 36 characters; the full hash is the data.hash param
)
MAX_PARAM_LEN = 500  # the strictest MLflow servers' param value limit
MAX_BUFFER = 100_000  # buffered metric values kept while the server is away (oldest dropped beyond)
BATCH = 1000  # MLflow's log_batch limit on metrics per request
RETRY_AFTER = (5.0, 60.0)  # seconds before re-trying a server that failed: first, max (doubling)
HTTP_ENV = {  # short HTTP retries for the run (restored at finish), unless the user set them
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.2",
}
# a param whose last name part is one of these (alone or after a prefix: api_token, aws_secret_access_key) is a
# secret; names that merely contain the word (model.n_future_tokens, model.tokenizer) are not
_SECRET_KEY = re.compile(
    r"(?:\w+_)?(?:secret|password|passwd|token|credentials?|access_key|secret_key|api_key|apikey|private_key|auth)",
    re.I,
)


class TrackingError(errors.UserError, ValueError):
    """A tracking problem a user can fix (a URI, a run without checkpoints, an unreachable server)."""


def default_uri() -> str:
    return f"sqlite:///{MLRUNS / 'mlflow.db'}"


def check_uri(uri: str) -> str:
    """The tracking URI to use ('' -> embedded sqlite); s3:// is refused (it can hold artifacts, not runs)."""
    if uri.startswith("s3://"):
        raise TrackingError(
            f"tracking.uri = {uri!r}: s3:// holds artifacts, not runs. Use an http(s):// MLflow server started "
            "with --artifacts-destination s3://..., or leave it empty for the embedded sqlite store"
        )
    return uri or default_uri()


def _artifact_root(uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts live beside the database; a server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    return (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9._-]", "_", experiment)).as_uri()


def clean_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow strings: known secret keys masked, secret values scrubbed, values cut to 500 chars."""
    out = {}
    for k, v in params.items():
        secret = _SECRET_KEY.fullmatch(k.rsplit(".", 1)[-1]) and v not in ("", None)
        text = "***" if secret else scrub(str(v))
        if len(text) > MAX_PARAM_LEN:
            cut = "...[truncated]"
            text = text[: MAX_PARAM_LEN - len(cut)] + cut
        out[k] = text
    return out


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=C.REPO, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version() -> str:
    """`wmtp <version> (git <commit>[+dirty])` for `train.py --version` / `evaluate.py --version`: the version in
    pyproject.toml (the installed package's metadata outside a checkout) and the commit runs record as git_commit;
    +dirty when tracked files differ from it."""
    import tomllib
    from importlib import metadata

    try:
        number = tomllib.loads((C.REPO / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        try:
            number = metadata.version("wmtp")
        except metadata.PackageNotFoundError:
            number = "unknown"
    commit = _git_commit()
    try:
        cmd = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(cmd, cwd=C.REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return f"wmtp {number} (git {commit}{'+dirty' if dirty and commit != 'unknown' else ''})"


def experiment_name(cfg: C.Config) -> str:
    return cfg.tracking.experiment or f"mtp/{cfg.algo}/{cfg.data.dataset}"


def registered_name(experiment: str) -> str:
    """`mtp/rho1-wmtp/mbpp` -> `mtp-rho1-wmtp-mbpp` (registry names avoid '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-")


def mlflow_command() -> str:
    """The mlflow script beside this interpreter (a venv's bin/, which may not be on PATH), else plain `mlflow`."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else "mlflow"


class Tracker:
    """One training run in MLflow. Only rank 0 talks to MLflow; on other ranks every method does nothing."""

    def __init__(self, cfg: C.Config, rank: int = 0):
        self.cfg = cfg
        self.main = rank == 0
        self.active = self.main and cfg.tracking.enabled
        self.uri = check_uri(cfg.tracking.uri)
        self.experiment = experiment_name(cfg)
        self.run_id: str | None = None
        self.last_metrics: dict[str, float] = {}
        self._spec: dict[str, Any] | None = None  # what start() asked for; the run is created lazily
        self._client = None
        self._pending: collections.deque = collections.deque()
        self._dropped = 0
        self._unsent_batches = 0  # log_metrics calls whose values could not be sent at the time
        self._failed_artifacts: list[tuple[str, str]] = []  # (local path, subdir) to retry at finish
        self._retried_artifacts: list[tuple[str, str, bool]] = []
        self._next_try = 0.0
        self._wait = RETRY_AFTER[0]
        self._warned = False
        self._last_error = ""
        self._finished = False
        self._env_set: list[str] = []
        self._logged: dict[str, int] = {}  # a resumed run: last step the MLflow run already holds, per metric
        self._monitor = None  # MLflow's SystemMetricsMonitor, while the run is open
        if self.active and self.uri.startswith(("http://", "https://")):
            self._env_set = [k for k in HTTP_ENV if k not in os.environ]
            os.environ.update({k: HTTP_ENV[k] for k in self._env_set})

    # ----------------------------------------------------------------------- plumbing

    def _mlflow(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _failed(self, what: str, e: Exception) -> None:
        self._last_error = scrub(f"{type(e).__name__}: {e}")[:300]
        self._next_try = time.monotonic() + self._wait
        self._wait = min(self._wait * 2, RETRY_AFTER[1])
        if not self._warned:
            self._warned = True
            msg = (
                f"tracking: {what} failed at {scrub(self.uri)} ({self._last_error}); training continues, "
                f"metrics are buffered and re-sent later"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            print(msg, file=sys.stderr)

    def _ensure_run(self) -> bool:
        """Create the experiment and run (with tags and params) the first time the server is reachable."""
        if self.run_id is not None:
            return True
        if self._spec is None:
            return False
        from mlflow.entities import Param

        client = self._mlflow()
        if self._spec.get("resume") and self._reopen(client, self._spec["resume"]):
            return True
        exp_id = ensure_experiment(client, self.experiment, _artifact_root(self.uri, self.experiment))
        run = client.create_run(exp_id, tags=self._spec["tags"], run_name=self._spec["name"])
        params = [Param(k, v) for k, v in self._spec["params"].items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            client.log_batch(run.info.run_id, params=params[i : i + 100])
        if self._spec["inputs"]:
            client.log_inputs(run.info.run_id, datasets=self._spec["inputs"])
        self.run_id = run.info.run_id
        self._start_system_metrics(resume=False)
        return True

    def _start_system_metrics(self, resume: bool) -> None:
        """MLflow's sampler of CPU/memory/disk/network and (with nvidia-ml-py) GPU utilisation and memory, in a
        thread of its own that logs `system/...` metrics to this run every 10 s (MLFLOW_SYSTEM_METRICS_* tune it).
        It stops by itself when the server goes away; training goes on."""
        if not system_metrics_wanted():
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:  # e.g. psutil missing: the run goes on without system metrics
            self._monitor = None
            print(f"tracking: no system metrics ({scrub(f'{type(e).__name__}: {e}')[:200]})", file=sys.stderr)

    def _reopen(self, client, run_id: str) -> bool:
        """Continue the MLflow run of a resumed training run: status RUNNING again, and the steps it already holds
        (logged before a kill, replayed identically after the resume) are not sent twice. False when the run is not
        in this store (a new run is created)."""
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            print(f"tracking: run {run_id} of the checkpoint is not in {scrub(self.uri)}; starting a new run")
            return False
        for key in run.data.metrics:
            self._logged[key] = max(m.step for m in client.get_metric_history(run_id, key))
        client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._start_system_metrics(resume=True)
        return True

    def _flush(self, force: bool = False) -> bool:
        """Send buffered metrics; True when nothing is left. While the server is away, retry only after a delay."""
        if not self._pending and self.run_id is not None:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        try:
            if not self._ensure_run():
                return False
            if self._logged:
                done = self._logged
                self._pending = collections.deque(m for m in self._pending if m.step > done.get(m.key, -1))
            while self._pending:
                chunk = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
                self._mlflow().log_batch(self.run_id, metrics=chunk)
                for _ in chunk:
                    self._pending.popleft()
            self._wait = RETRY_AFTER[0]
            return True
        except Exception as e:  # a tracking problem must never stop training
            self._failed("sending metrics", e)
            return False

    # ----------------------------------------------------------------------- public API

    def start(
        self,
        run_name: str | None = None,
        world_size: int = 1,
        extra: dict[str, Any] | None = None,
        resume_run_id: str = "",
        entry_point: str = "train.py",
    ) -> str | None:
        """Open the run: tags (algo, dataset, git commit, host, launcher, scorer, the entry point), params (config,
        world size, extra such as model ids and the data hash), and the training data as a dataset input whose
        digest is the data hash. `resume_run_id` (from a checkpoint) continues that run instead.
        Returns the run id, or None when tracking is off or unreachable."""
        if not self.active:
            return None
        cfg = self.cfg
        commit = _git_commit()
        tags = {
            "algo": cfg.algo,
            "dataset": cfg.data.dataset,
            "scorer": cfg.loss.scorer,
            "git_commit": commit,
            "mlflow.source.git.commit": commit,
            "mlflow.source.name": entry_point,
            "mlflow.source.type": "LOCAL",
            "host": socket.gethostname(),
            "launcher": "torchrun"
            if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
            else "python",
        }
        if cfg.loss.scorer == "rho1_excess_v1":
            tags["rho1.score"] = cfg.rho1.score
            tags["rho1.mode"] = cfg.rho1.mode
        tags.update(dict(t.split("=", 1) for t in cfg.tracking.tags))  # e.g. one per sweep axis (sweep.py)
        if cfg.tracking.parent_run:  # nested under a sweep's parent run: MLflow's tree and compare views
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run
        params = C.flatten(C.to_dict(cfg))
        params.update({"world_size": world_size, **(extra or {})})
        name = run_name or cfg.tracking.run_name or cfg.train.run_name or None
        data_hash = str(params.get("data.hash") or "")
        inputs = [training_input(cfg, data_hash)] if data_hash else []
        self._spec = {
            "name": name,
            "tags": tags,
            "params": clean_params(params),
            "resume": resume_run_id,
            "inputs": inputs,
        }
        self._flush(force=True)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Extra params after start (e.g. the data hash once known). Never raises."""
        if not self.active:
            return
        if self.run_id is None and self._spec is not None:
            self._spec["params"].update(clean_params(params))
            return
        try:
            from mlflow.entities import Param

            self._mlflow().log_batch(
                self.run_id, params=[Param(k, v) for k, v in clean_params(params).items()]
            )
        except Exception as e:
            self._failed("logging params", e)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer numeric metrics for `step` and send what is buffered. Never raises."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.last_metrics[k] = float(v)
                if len(self._pending) >= MAX_BUFFER:
                    self._pending.popleft()
                    self._dropped += 1
                self._pending.append(Metric(k, float(v), now, int(step)))
        if not self._flush():
            self._unsent_batches += 1

    def _artifact_path(self, subdir: str) -> str:
        sub = subdir.strip("/")
        if sub.split("/")[0] not in LAYOUT:
            raise ValueError(f"artifact subdir {subdir!r}: must start with one of {', '.join(LAYOUT)}")
        return sub

    def log_artifact(self, path: str | Path, subdir: str) -> None:
        """Upload one file under `subdir` (checkpoints/, reports/, samples/, plots/...). Never raises on I/O."""
        self._upload(Path(path), self._artifact_path(subdir), is_dir=False)

    def log_artifacts(self, local_dir: str | Path, subdir: str) -> None:
        """Upload a directory's contents under `subdir`. Never raises on I/O."""
        self._upload(Path(local_dir), self._artifact_path(subdir), is_dir=True)

    def _upload(self, path: Path, sub: str, is_dir: bool, retry: bool = True) -> bool:
        if not self.active:
            return True
        try:
            if not self._ensure_run():
                raise RuntimeError("no run")
            if is_dir:
                self._mlflow().log_artifacts(self.run_id, str(path), sub)
            else:
                self._mlflow().log_artifact(self.run_id, str(path), sub)
            return True
        except Exception as e:
            self._failed(f"uploading {path} to {sub}/", e)
            if retry:
                self._failed_artifacts.append((str(path), sub))
            return False

    def write_report(self, run_dir: str | Path, summary: dict[str, Any] | None = None) -> Path | None:
        """Write `<run_dir>/reports/run_report.md` (config, metrics, summary, plots) and log it under reports/."""
        if not self.main:
            return None
        run_dir = Path(run_dir)
        out = run_dir / "reports" / "run_report.md"
        files.atomic_write_text(out, self._report_text(run_dir, summary or {}))
        if self.active:
            self.log_artifact(out, "reports")
        return out

    def _report_text(self, run_dir: Path, summary: dict[str, Any]) -> str:
        lines = [f"# Run report: {run_dir.name}", ""]
        lines += [
            f"- experiment: `{self.experiment}`",
            f"- algo: `{self.cfg.algo}` (scorer `{self.cfg.loss.scorer}`)",
        ]
        if self.run_id:
            lines.append(f"- MLflow run: `{self.run_id}` at `{scrub(self.uri)}`")
        lines += ["", "## Metrics (last value)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {fmt_metric(v)} |" for k, v in sorted(self.last_metrics.items())]
        heads = summary.get("weights_per_head") or {}
        if heads:
            last = summary.get("weights") or {}
            lines += [
                "",
                "## Weights per head",
                "",
                "| head | run mean | last step mean | pairs |",
                "|---|---|---|---|",
            ]
            for name, h in heads.items():
                step = last.get(f"weights/mean_{name}")
                lines.append(
                    f"| {name} | {fmt_metric(h['run_mean'])} | {'-' if step is None else fmt_metric(step)} | {h['pairs']:.0f} |"
                )
        if summary:
            lines += [
                "",
                "## Summary",
                "",
                "```json",
                scrub(json.dumps(summary, indent=2, default=str)),
                "```",
            ]
        plots = sorted((run_dir / "plots").glob("*.png"))
        if plots:
            lines += ["", "## Plots", ""] + [f"![{p.stem}](../plots/{p.name})" for p in plots]
        params = clean_params(C.flatten(C.to_dict(self.cfg)))
        lines += ["", "## Config", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | `{v}` |" for k, v in params.items()]
        return "\n".join(lines) + "\n"

    def finish(self, status: str = "FINISHED") -> None:
        """Flush buffered metrics, retry failed artifact uploads once, close the run. Never raises."""
        if not self.active or self._finished:
            return
        self._finished = True
        if self._monitor is not None:  # its last samples go out before the run is closed
            with contextlib.suppress(Exception):
                self._monitor.finish()
            self._monitor = None
        self._flush(force=True)
        failed, self._failed_artifacts = self._failed_artifacts, []
        self._retried_artifacts = [
            (p, s, self._upload(Path(p), s, Path(p).is_dir(), retry=False)) for p, s in failed
        ]
        if self.run_id is not None:
            try:
                set_terminated(self._mlflow(), self.run_id, status)
            except Exception as e:
                self._failed("closing the run", e)
        for k in self._env_set:
            os.environ.pop(k, None)

    def summary(self) -> list[str]:
        """Human-readable lines about where the run went and what could not be sent."""
        if not self.main:
            return []
        if not self.cfg.tracking.enabled:
            return ["tracking: disabled (tracking.enabled = false)"]
        uri = scrub(self.uri)
        lines = []
        if self.run_id:
            lines.append(f"tracking: run {self.run_id} in experiment '{self.experiment}' at {uri}")
            if self.uri.startswith("sqlite:///"):
                lines.append(f"tracking: view with `{mlflow_command()} ui --backend-store-uri {uri}`")
        else:
            lines.append(f"tracking: no run could be created at {uri} ({self._last_error or 'not started'})")
        if self._unsent_batches or self._pending or self._dropped:
            flushed = "yes" if not self._pending and not self._dropped else "no"
            detail = (
                f" ({len(self._pending)} values still buffered, {self._dropped} dropped)"
                if flushed == "no"
                else ""
            )
            lines.append(
                f"tracking: {self._unsent_batches} metric batches could not be sent to {uri}; "
                f"buffered values flushed: {flushed}{detail}"
            )
        lost = [s for _, s, ok in self._retried_artifacts if not ok]
        lost += [s for _, s in self._failed_artifacts]
        if lost:
            lines.append(f"tracking: {len(lost)} artifact upload(s) failed: {', '.join(lost)}")
        return lines


def set_terminated(client, run_id: str, status: str) -> None:
    """Close a run. MLflow prints `View run <name> at: <tracking URI>/...` for a server, the URI's user:password
    included: the line is caught and printed scrubbed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        client.set_terminated(run_id, status)
    sys.stdout.write(scrub(out.getvalue()))


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created when missing, tagged as model training (`mlflow.experimentKind`): without the
    tag MLflow 3's UI opens it on the GenAI "Traces" overview. An experiment of ours made before the tag existed
    gets it; a kind set by someone else is left alone."""
    key, kind = EXPERIMENT_KIND
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location, tags={key: kind})
    if key not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, key, kind)
    return exp.experiment_id


def training_input(cfg: C.Config, data_hash: str):
    """The run's training data as MLflow's dataset input (the runs table's Dataset column): the dataset's name,
    the data hash as its digest (cut to MLflow's limit; the full one is in the profile and the data.hash param),
    where it came from, and the split, under the `training` context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    d = cfg.data
    where = d.path or f"{d.resource} (S3 resource), else {d.hub_id}"
    if d.dataset == "synthetic":
        where = "synthetic.py (generated from the [data.synthetic] settings)"
    source = json.dumps({"uri": where})
    profile = json.dumps({"sha256": data_hash, "split": d.train_split, "template": d.template})
    ds = Dataset(
        name=d.dataset,
        digest=data_hash[:DIGEST_LEN],
        source_type="code" if d.dataset == "synthetic" else "local",
        source=scrub(source),
        profile=profile,
    )
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])


def system_metrics_wanted() -> bool:
    """MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING (true/false) decides; unset, only where a GPU is visible."""
    value = os.environ.get(SYSTEM_METRICS_ENV, "").strip().lower()
    if value:
        return value in ("1", "true", "yes")
    import torch

    return torch.cuda.is_available()


def fmt_metric(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)
