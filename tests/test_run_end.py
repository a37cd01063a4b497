"""The end of a run (issue 20): uploads checked before training, a failed upload that keeps the trained run and is
finished by running the same command again, a finished run never deleted without --overwrite, and SIGTERM during
the end-of-run evaluation (stops within seconds, exit 75; --resume evaluates only).

S3 is the real moto server of tests/servers.py; training runs in this process (`run_train`) except where a signal
is needed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import checkpoint
import train
from config import REPO
from tests.servers import s3_client
from tests.test_train import ENV, metrics, run_train, tiny_overrides


def keys(endpoint: str, bucket: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_a_missing_bucket_stops_the_run_before_it_trains(tiny_dir, tmp_path, s3_env):
    kv = {
        "train.run_name": "nob",
        "storage.upload_checkpoints": True,
        "storage.s3_bucket": "no-such-bucket-x",
    }
    p = run_train(tiny_dir, tmp_path, check=False, **kv)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stderr.startswith(
        "error: storage.upload_checkpoints = true, checked before training: writing "
        "s3://no-such-bucket-x/wmtp/runs/nob/checkpoints/.wmtp-upload-check: bucket 'no-such-bucket-x' does not exist"
    )
    assert "step" not in p.stdout and not (tmp_path / "nob").exists()


def test_a_failed_upload_keeps_the_run_and_the_same_command_publishes_it(
    tiny_dir, tmp_path, s3_env, monkeypatch
):
    """The bucket passes the start check, then goes away before the upload: the run fails with one line that says
    the run is kept, every file is there (summary.pending.json, no summary.json). The same command again, bucket
    still missing: refused at the check, nothing deleted. Bucket back: the same command uploads without training
    and finishes the run; once more: a finished run is refused without --overwrite (nothing deleted)."""
    bucket, client = f"up-{uuid.uuid4().hex[:8]}", s3_client(s3_env)
    client.create_bucket(Bucket=bucket)
    kv = {"train.run_name": "up", "train.steps": 2, "storage.upload_checkpoints": True}
    kv |= {"storage.s3_bucket": bucket, "storage.s3_prefix": "p"}
    export = checkpoint.export_formats

    def export_then_lose_the_bucket(*a, **k):  # the bucket goes away after the start check, before the upload
        export(*a, **k)
        if bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.delete_bucket(Bucket=bucket)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "export_formats", export_then_lose_the_bucket)
        p = run_train(tiny_dir, tmp_path, check=False, **kv)
    run = tmp_path / "up"
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "NoSuchBucket" in p.stderr, p.stderr
    assert p.stderr.rstrip().endswith(
        f"the run is complete and kept in {run}: run the same command again to publish it (upload pending)"
    )
    kept = sorted(str(f.relative_to(run)) for f in run.rglob("*") if f.is_file() and f.name != ".lock")
    assert "summary.pending.json" in kept and "summary.json" not in kept
    assert "checkpoints/final/model.safetensors" in kept and "checkpoints/step_000002/trainer.pt" in kept
    rows = metrics(tmp_path, "up")

    p = run_train(tiny_dir, tmp_path, check=False, **kv)  # bucket still missing
    assert p.returncode == 2 and f"bucket '{bucket}' does not exist" in p.stderr and "step" not in p.stdout
    assert (
        sorted(str(f.relative_to(run)) for f in run.rglob("*") if f.is_file() and f.name != ".lock") == kept
    )

    client.create_bucket(Bucket=bucket)
    p = run_train(tiny_dir, tmp_path, **kv)
    assert (
        f"{run}: trained and evaluated; upload pending: exporting and uploading it (no training)" in p.stdout
    )
    assert "step " not in p.stdout and metrics(tmp_path, "up") == rows
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and not (run / "summary.pending.json").exists()
    up = keys(s3_env, bucket)
    assert (
        "p/runs/up/checkpoints/final/model.safetensors" in up
        and "p/runs/up/checkpoints/best/hf/config.json" in up
    )
    assert not [k for k in up if "upload-check" in k]

    p = run_train(tiny_dir, tmp_path, check=False, **kv)  # a finished run: never deleted without --overwrite
    assert p.returncode == 2 and p.stderr == (
        f"error: {run} holds a finished run (summary.json): choose another train.run_name, or pass --overwrite to "
        "delete its files and train it again\n"
    )
    assert (run / "checkpoints" / "final" / "model.safetensors").is_file()


def test_sigterm_during_the_end_of_run_evaluation_stops_it_and_resume_evaluates_only(tiny_dir, tmp_path):
    """SIGTERM once the evaluation of 500 MBPP problems has begun: it stops within seconds, exit 75, nothing of
    the evaluation written and the run not finished; --resume trains no step and evaluates (here 4 problems)."""
    kv = {"train.run_name": "ev", "train.steps": 2, "eval.enabled": True, "eval.limit": 0}
    kv |= {"eval.max_new_tokens": 48, "eval.batch_size": 4}
    cmd = [sys.executable, "train.py", "configs/tiny_mbpp.toml", *tiny_overrides(tiny_dir, tmp_path, **kv)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    for line in proc.stdout:  # the first progress line of the evaluation
        seen.append(line)
        if line.startswith("eval mbpp: 500 problems x 1 samples"):
            break
    assert proc.poll() is None, "".join(seen)
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rest = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the evaluation went on for 60 s after SIGTERM") from None
    took, out = time.monotonic() - t0, "".join(seen) + rest
    assert proc.returncode == train.EXIT_PREEMPTED, out[-3000:]
    assert took < 20, f"{took:.1f} s from SIGTERM to exit"
    assert "SIGTERM: stopping the evaluation now" in out
    assert "preempted during the end-of-run evaluation: training is complete (checkpoint step_000002)" in out
    run = tmp_path / "ev"
    assert not (run / "summary.json").exists() and not (run / "eval" / "metrics.json").exists()

    p = run_train(tiny_dir, tmp_path, "--resume", **{**kv, "eval.limit": 4})
    assert "step      " not in p.stdout and "eval mbpp: 4 problems x 1 samples" in p.stdout
    assert "eval mbpp: generated 4/4" in p.stdout and "eval mbpp: judged 4/4" in p.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert "mbpp/pass_at_1" in summary["eval"] and [r["step"] for r in metrics(tmp_path, "ev")] == [1, 2]
    assert json.loads((run / "eval" / "metrics.json").read_text())["mbpp"]["n_problems"] == 4
