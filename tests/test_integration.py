"""The whole pipeline against real servers: `python train.py` logs to a real `mlflow server` whose artifacts go to
the moto S3 bucket, `train.py promote` moves registry aliases, and a model stored only in S3 is mirrored and reused.

Every step is a real subprocess, as a user runs it. The subprocesses get their own, recognisable fake credentials
so that a leak into MLflow params/tags or the console would be caught.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

import config as C
import data
import s3cache
import tracking
from config import REPO
from tests.servers import (
    s3_client,
)  # fixtures (mlflow_server, s3_server, tiny_dir) come from tests/conftest.py
from tests.test_train import tiny_overrides

# what the training subprocesses authenticate with (moto accepts any); none of these may leak anywhere
SECRET = f"wmtp-it-secret-{uuid.uuid4().hex}"
KEY_ID = "AKIAWMTPINTEGRATION7"
EXPERIMENT = "mtp/rho1-wmtp/mbpp"
REGISTERED = "mtp-rho1-wmtp-mbpp"


def sub_env(s3_endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.pop("WMTP_S3_BUCKET", None)
    env.update(
        {
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "2",
        }
    )
    return env


def run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if p.returncode != 0:
        raise AssertionError(
            f"train.py {args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def assert_no_credentials(text: str, where: str) -> None:
    assert SECRET not in text, f"the secret access key leaked into {where}"
    assert KEY_ID not in text, f"the access key id leaked into {where}"


def bucket_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def tracked_run(tiny_dir, mlflow_server, tmp_path_factory):
    """One real Rho-1 training run (4 steps, evaluation on 2 MBPP tasks) tracked on the server, checkpoints
    uploaded to the same bucket under a prefix of its own."""
    out = tmp_path_factory.mktemp("it-runs")
    name = f"it-rho1-{uuid.uuid4().hex[:6]}"
    prefix = f"it-{uuid.uuid4().hex[:8]}"
    kv = {
        "train.run_name": name,
        "train.steps": 4,
        "train.eval_every": 2,
        "eval.enabled": True,
        "eval.limit": 2,
        "eval.max_new_tokens": 16,
        "tracking.enabled": True,
        "tracking.uri": str(mlflow_server),
        "storage.upload_checkpoints": True,
        "storage.s3_bucket": mlflow_server.bucket,
        "storage.s3_prefix": prefix,
    }
    env = sub_env(mlflow_server.s3_endpoint)
    p = run(["configs/tiny_rho1_mbpp.toml", *tiny_overrides(tiny_dir, out, **kv)], env, timeout=400)
    found = re.search(rf"tracking: run ([0-9a-f]+) in experiment '{re.escape(EXPERIMENT)}'", p.stdout)
    assert found, f"no tracking summary line in the output:\n{p.stdout[-3000:]}"
    return {"run_id": found.group(1), "name": name, "prefix": prefix, "proc": p, "env": env, "out": out}


def test_training_run_logs_to_mlflow_and_its_artifacts_land_in_s3(tracked_run, mlflow_server):
    run_id, name, prefix = tracked_run["run_id"], tracked_run["name"], tracked_run["prefix"]
    client = MlflowClient(str(mlflow_server))
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    listed = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    assert [r.info.run_id for r in listed] == [run_id]
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == name

    p, t, m = r.data.params, r.data.tags, r.data.metrics
    assert p["loss.scorer"] == "rho1_excess_v1" and p["world_size"] == "1"
    assert p["data.hash"] == data.data_fingerprint(Path(C.default_data_root()) / "mbpp")
    assert t["algo"] == "rho1-wmtp" and t["dataset"] == "mbpp" and t["rho1.mode"] == "weighted"
    for key in ("train/loss", "val/loss", "weights/mean", "rho1/excess_mean", "mbpp/pass_at_1"):
        assert key in m, f"metric {key} missing; have {sorted(m)}"
    assert [h.step for h in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert {h.step for h in client.get_metric_history(run_id, "val/loss")} == {0, 2, 4}
    summary = json.loads((tracked_run["out"] / name / "summary.json").read_text())
    assert m["mbpp/pass_at_1"] == summary["eval"]["mbpp/pass_at_1"]  # what the run measured, not a copy of it
    assert m["weights/mean"] == pytest.approx(1.0, abs=1e-4)  # per (sequence, head) mean 1: so is the step's

    # MLflow's artifacts are objects in the moto bucket, in the fixed layout
    base = f"mlflow/{exp.experiment_id}/{run_id}/artifacts/"
    arts = {k[len(base) :] for k in bucket_keys(mlflow_server.s3_endpoint, mlflow_server.bucket, base)}
    assert {
        "checkpoints/final/model.safetensors",
        "checkpoints/final/config.json",
        "checkpoints/final/hf/model.safetensors",
        "checkpoints/final/meta/consolidated.pth",
        "checkpoints/best/model.safetensors",
        "checkpoints/best/hf/config.json",
        "plots/weight_histogram.png",
        "reports/run_report.md",
    } <= arts, sorted(arts)
    assert any(
        a.startswith("reports/") and a != "reports/run_report.md" for a in arts
    )  # the evaluation report
    assert {a.split("/")[0] for a in arts} <= set(tracking.LAYOUT)

    # the checkpoint upload (storage.upload_checkpoints) under <prefix>/runs/<run_name>/checkpoints/
    ck = f"{prefix}/runs/{name}/checkpoints/"
    uploaded = {k[len(ck) :] for k in bucket_keys(mlflow_server.s3_endpoint, mlflow_server.bucket, ck)}
    local = tracked_run["out"] / name / "checkpoints" / "final"
    assert {f"final/{f.relative_to(local).as_posix()}" for f in local.rglob("*") if f.is_file()} <= uploaded
    assert "final/model.safetensors" in uploaded and any(u.startswith("best/") for u in uploaded)

    # no credential anywhere a user or a dashboard would see it
    proc = tracked_run["proc"]
    assert_no_credentials(json.dumps(p) + json.dumps(t), "the run's params/tags")
    assert_no_credentials(proc.stdout + proc.stderr, "the training output")
    report = client.download_artifacts(run_id, "reports/run_report.md", str(tracked_run["out"]))
    text = Path(report).read_text()
    assert f"MLflow run: `{run_id}`" in text
    assert_no_credentials(text, "the run report")


def test_promote_moves_staging_then_production_and_attaches_the_card(tracked_run, mlflow_server):
    run_id, env, uri = tracked_run["run_id"], tracked_run["env"], str(mlflow_server)
    client = MlflowClient(uri, registry_uri=uri)
    p = run(["promote", "--run", run_id, "--alias", "staging", "--tracking-uri", uri], env)
    [mv] = client.search_model_versions(f"name='{REGISTERED}' and run_id='{run_id}'")
    assert f"alias 'staging' -> version {mv.version}" in p.stdout
    assert client.get_model_version_by_alias(REGISTERED, "staging").version == mv.version
    # the HF export, logged with MLflow's transformers flavor (tests/test_registry.py loads it by alias)
    assert (
        mv.source.startswith("models:/m-") and mv.tags["checkpoint"] == f"runs:/{run_id}/checkpoints/best/hf"
    )

    env_uri = {**env, "MLFLOW_TRACKING_URI": uri}  # the other way tracking.main finds the server
    q = run(["promote", "--run", run_id, "--alias", "production"], env_uri)
    assert client.search_model_versions(f"name='{REGISTERED}' and run_id='{run_id}'")[0].version == mv.version
    for alias in ("staging", "production"):
        assert client.get_model_version_by_alias(REGISTERED, alias).version == mv.version
    assert_no_credentials(p.stdout + p.stderr + q.stdout + q.stderr, "the promote output")

    # the model card: on the version (description + tag) and as a run artifact (in the bucket)
    v = client.get_model_version(REGISTERED, mv.version)
    assert v.description.startswith(f"# Model card: {REGISTERED}") and "## Limitations" in v.description
    assert v.tags["model_card"] == "reports/model_card.md"
    params = client.get_run(run_id).data.params
    assert f"data hash: `{params['data.hash']}`" in v.description
    assert "| mbpp/pass_at_1 |" in v.description and "scorer `rho1_excess_v1`" in v.description
    exp_id = client.get_run(run_id).info.experiment_id
    card_key = f"mlflow/{exp_id}/{run_id}/artifacts/reports/model_card.md"
    assert bucket_keys(mlflow_server.s3_endpoint, mlflow_server.bucket, card_key) == [card_key]
    # the registered HF directory carries the same card as its README.md, under YAML front matter
    import yaml

    dst = tracked_run["out"] / "downloaded"
    card = Path(client.download_artifacts(run_id, "reports/model_card.md", str(dst))).read_text()
    readme = Path(client.download_artifacts(run_id, "checkpoints/best/hf/README.md", str(dst))).read_text()
    _, front, body = readme.split("---\n", 2)
    assert body == "\n" + card and yaml.safe_load(front)["library_name"] == "transformers"
    pass_at_1 = client.get_run(run_id).data.metrics["mbpp/pass_at_1"]
    results = yaml.safe_load(front)["model-index"][0]["results"]
    [mbpp] = [r for r in results if r["dataset"] == {"type": "mbpp", "name": "MBPP", "split": "test"}]
    assert {"type": "pass@1", "value": pass_at_1} in mbpp["metrics"]


def mirrors(cache: Path) -> list[Path]:
    return [p for p in cache.glob("tiny_base-*") if p.is_dir()]  # not the `.lock` file beside each


def test_model_only_in_s3_is_mirrored_then_reused(tiny_dir, s3_server, tmp_path):
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=bucket)
    storage = C.StorageConfig(s3_bucket=bucket, s3_prefix="wmtp")
    urls = s3cache.upload(tiny_dir / "base_meta", "models/tiny_base", storage, client=client)
    assert f"s3://{bucket}/wmtp/models/tiny_base/params.json" in urls

    cache = tmp_path / "cache"
    kv = {
        "model.path": "/nonexistent",
        "model.resource": "models/tiny_base",
        "storage.cache_dir": str(cache),
        "storage.s3_bucket": bucket,
        "train.steps": 2,
        "train.eval_every": 0,
    }
    env = sub_env(s3_server)

    def train_once(name: str) -> subprocess.CompletedProcess:
        args = tiny_overrides(tiny_dir, tmp_path / "runs", **{**kv, "train.run_name": name})
        return run(["configs/tiny_mbpp.toml", *args], env)

    first = train_once("s3-a")
    [mirror] = mirrors(cache)
    assert re.fullmatch(r"tiny_base-[0-9a-f]{16}", mirror.name)
    assert sorted(p.name for p in mirror.iterdir() if p.name != s3cache.MARKER) == sorted(
        p.name for p in (tiny_dir / "base_meta").iterdir()
    )
    assert s3cache.is_complete(mirror) and not list(cache.glob(".tmp-*"))
    marker = (mirror / s3cache.MARKER).stat()
    assert (tmp_path / "runs" / "s3-a" / "checkpoints" / "final" / "model.safetensors").is_file()

    second = train_once("s3-b")  # same objects in S3: the same mirror, not downloaded again
    assert mirrors(cache) == [mirror]
    again = (mirror / s3cache.MARKER).stat()
    assert (again.st_ino, again.st_mtime_ns) == (marker.st_ino, marker.st_mtime_ns)
    assert (tmp_path / "runs" / "s3-b" / "checkpoints" / "final" / "model.safetensors").is_file()
    for p in (first, second):
        assert_no_credentials(p.stdout + p.stderr, "the training output")
