"""s3cache against a real (moto) S3 server: resolution order, cache hits, atomicity, concurrency, clear errors.

Requests are counted with a botocore event hook on the client we pass in (the real client, not a mock).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

import config as C
import s3cache
from config import StorageConfig
from tests.servers import free_port, s3_client  # fixtures (s3_env, moto_process) come from tests/conftest.py

FILES = {"config.json": b'{"dim": 8}', "weights/part-0.bin": os.urandom(300_000), "tokenizer.json": b"{}"}


def _cfg(tmp: Path, bucket: str, **kw) -> StorageConfig:
    kw = {"max_attempts": 2, "connect_timeout": 1.0, **kw}
    return StorageConfig(cache_dir=str(tmp / ".cache"), s3_bucket=bucket, s3_prefix="wmtp", **kw)


def _put(client, bucket: str, resource: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"wmtp/{resource}/{rel}", Body=data)


def counted_client(cfg: StorageConfig) -> tuple[object, Counter]:
    """A real s3cache client with a hook counting every S3 operation it sends."""
    client, calls = s3cache.make_client(cfg), Counter()
    client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return client, calls


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def bucket(s3_env, tmp_path):
    name = f"b-{uuid.uuid4().hex[:10]}"
    client = s3_client(s3_env)
    client.create_bucket(Bucket=name)
    return name, client, _cfg(tmp_path, name)


# --------------------------------------------------------------------------- resolution order


def test_local_path_wins_and_incomplete_local_falls_back(bucket, tmp_path):
    name, client, cfg = bucket
    _put(client, name, "models/tiny", FILES)
    local = tmp_path / "local_tiny"
    (local / "weights").mkdir(parents=True)
    for rel, data in FILES.items():
        (local / rel).write_bytes(data)
    s3c, calls = counted_client(cfg)
    got = s3cache.resolve("models/tiny", local, cfg, "model", required_files=list(FILES), client=s3c)
    assert got == local and not calls  # local and complete: S3 is not even listed

    (local / "tokenizer.json").unlink()  # incomplete local copy: the S3 mirror is used instead
    got = s3cache.resolve("models/tiny", local, cfg, "model", required_files=list(FILES), client=s3c)
    assert got.parent == Path(cfg.cache_dir).resolve() and got.name.startswith("tiny-")
    assert {k: v for k, v in _tree(got).items() if k != s3cache.MARKER} == FILES


def test_local_only_without_bucket(tmp_path, monkeypatch):
    monkeypatch.delenv("WMTP_S3_BUCKET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg(tmp_path, "")
    local = tmp_path / "mbpp"
    local.mkdir()
    (local / "train.jsonl").write_text("{}\n")
    assert s3cache.resolve("datasets/mbpp", local, cfg, "dataset", required_files=["train.jsonl"]) == local
    with pytest.raises(s3cache.StorageError) as e:
        s3cache.resolve(
            "datasets/mbpp", tmp_path / "nope", cfg, "dataset", hub_id="google-research-datasets/mbpp"
        )
    msg = str(e.value)
    assert "does not exist" in msg and "no bucket configured" in msg and "HF_HUB_OFFLINE" in msg


def test_mirror_then_cache_hit_without_object_requests(bucket):
    name, client, cfg = bucket
    _put(client, name, "models/tiny", FILES)
    s3c, calls = counted_client(cfg)
    first = s3cache.resolve("models/tiny", None, cfg, "model", required_files=["config.json"], client=s3c)
    assert calls["GetObject"] == len(FILES)
    assert (first / s3cache.MARKER).is_file() and s3cache.is_complete(first)
    assert {k: v for k, v in _tree(first).items() if k != s3cache.MARKER} == FILES
    assert not list(Path(cfg.cache_dir).glob(".tmp-*"))

    s3c2, calls2 = counted_client(cfg)
    second = s3cache.resolve("models/tiny", None, cfg, "model", client=s3c2)
    assert second == first
    assert dict(calls2) == {"ListObjectsV2": 1}  # the cache key costs one LIST; no HEAD, no GET


def test_changed_object_gives_new_cache_key(bucket):
    name, client, cfg = bucket
    _put(client, name, "datasets/mbpp", {"train.jsonl": b'{"task_id": 601}\n'})
    old = s3cache.resolve("datasets/mbpp", None, cfg, "dataset")
    _put(client, name, "datasets/mbpp", {"train.jsonl": b'{"task_id": 602}\n'})
    new = s3cache.resolve("datasets/mbpp", None, cfg, "dataset")
    assert new != old and new.name.startswith("mbpp-")
    assert (new / "train.jsonl").read_bytes() == b'{"task_id": 602}\n'
    assert (old / "train.jsonl").read_bytes() == b'{"task_id": 601}\n'  # the old mirror is left intact


def test_upload_multipart_and_mirror_back(bucket, tmp_path):
    name, client, cfg = bucket
    cfg.multipart_threshold_mb = 5  # S3's minimum part size
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    big = os.urandom(6 * 1024 * 1024 + 123)
    (ckpt / "model.safetensors").write_bytes(big)
    (ckpt / "sub" / "config.json").write_text('{"a": 1}')
    urls = s3cache.upload(ckpt, "runs/r1/checkpoints/best", cfg)
    assert urls == [
        f"s3://{name}/wmtp/runs/r1/checkpoints/best/model.safetensors",
        f"s3://{name}/wmtp/runs/r1/checkpoints/best/sub/config.json",
    ]
    head = client.head_object(Bucket=name, Key="wmtp/runs/r1/checkpoints/best/model.safetensors")
    assert head["ETag"].strip('"').endswith("-2")  # went up in two parts
    single = s3cache.upload(ckpt / "sub" / "config.json", "reports/r1", cfg)
    assert single == [f"s3://{name}/wmtp/reports/r1/config.json"]

    got = s3cache.resolve("runs/r1/checkpoints/best", None, cfg, "model")  # multipart ETag: size check only
    assert (got / "model.safetensors").read_bytes() == big


# --------------------------------------------------------------------------- interruption and concurrency


def test_exception_mid_download_leaves_no_cache(bucket):
    name, client, cfg = bucket
    _put(client, name, "models/tiny", FILES)

    def boom(nbytes: int) -> None:
        raise RuntimeError("simulated crash during transfer")

    with pytest.raises(RuntimeError, match="simulated crash"):
        s3cache.resolve("models/tiny", None, cfg, "model", progress=boom)
    assert not list(Path(cfg.cache_dir).glob("tiny-*/"))  # no mirror directory
    assert not list(Path(cfg.cache_dir).glob(".tmp-*"))  # and the temp dir was cleaned
    got = s3cache.resolve("models/tiny", None, cfg, "model")
    assert {k: v for k, v in _tree(got).items() if k != s3cache.MARKER} == FILES


def _slow_resolve(cfg: StorageConfig, resource: str, delay: float, barrier, queue) -> None:
    """Child process: resolve with a slow progress callback; report (path, operation counts)."""
    client, calls = counted_client(cfg)
    if barrier is not None:
        barrier.wait()
    path = s3cache.resolve(resource, None, cfg, "model", client=client, progress=lambda n: time.sleep(delay))
    if queue is not None:
        queue.put((str(path), dict(calls)))


def test_killed_process_leaves_no_usable_cache_and_next_call_completes(bucket):
    name, client, cfg = bucket
    big = os.urandom(4 * 1024 * 1024)
    _put(client, name, "models/big", {"a.bin": b"small", "b.bin": big})
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_slow_resolve, args=(cfg, "models/big", 0.1, None, None))
    child.start()
    cache = Path(cfg.cache_dir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the big object is partly on disk
        partial = [p for p in cache.glob(".tmp-*/**/*") if p.is_file() and p.name.startswith("b.bin")]
        if partial and partial[0].stat().st_size > 0:
            break
        time.sleep(0.05)
    else:
        child.kill()
        pytest.fail("the child never started writing b.bin")
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert list(cache.glob(".tmp-*")), "the killed download should have left its temp dir"
    assert not [p for p in cache.glob("big-*") if p.is_dir()]  # but no mirror that could be used

    got = s3cache.resolve("models/big", None, cfg, "model")
    assert (got / "b.bin").read_bytes() == big and s3cache.is_complete(got)
    assert not list(cache.glob(".tmp-*"))  # the stale temp dir was removed


def test_two_processes_download_once(bucket):
    name, client, cfg = bucket
    files = {"a.bin": os.urandom(1024 * 1024), "b.bin": os.urandom(512 * 1024)}
    _put(client, name, "models/shared", files)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_slow_resolve, args=(cfg, "models/shared", 0.02, barrier, queue)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0][0] == results[1][0]
    gets = sorted(r[1].get("GetObject", 0) for r in results)
    assert gets == [0, len(files)]  # one process downloaded, the other waited and reused
    assert {k: v for k, v in _tree(Path(results[0][0])).items() if k != s3cache.MARKER} == files


# --------------------------------------------------------------------------- errors


def test_missing_bucket_and_missing_prefix(bucket, tmp_path, s3_env):
    name, client, cfg = bucket
    with pytest.raises(s3cache.StorageError) as e:
        s3cache.resolve("models/tiny", None, _cfg(tmp_path, "no-such-bucket-wmtp"), "model")
    assert "bucket 'no-such-bucket-wmtp' does not exist" in str(e.value) and s3_env in str(e.value)
    with pytest.raises(s3cache.StorageError) as e:
        s3cache.resolve("models/nothing", None, cfg, "model")
    assert f"s3://{name}/wmtp/models/nothing/" in str(e.value) and "no objects under this prefix" in str(
        e.value
    )
    _put(client, name, "models/partial", {"config.json": b"{}"})
    with pytest.raises(s3cache.StorageError, match="required file.*missing from S3: weights.bin"):
        s3cache.resolve("models/partial", None, cfg, "model", required_files=["config.json", "weights.bin"])


def test_missing_credentials(bucket, tmp_path, monkeypatch):
    name, client, cfg = bucket
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(s3cache.StorageError, match="no usable AWS credentials"):
        s3cache.resolve("models/tiny", None, cfg, "model")


def test_bad_credentials_are_rejected_and_never_printed(moto_process, tmp_path, monkeypatch, caplog):
    server = moto_process(auth=True)
    key_id, secret = "AKIAWMTPBADKEY000000", "wmtp-very-secret-value-42"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    cfg = _cfg(tmp_path, "some-bucket", endpoint_url=server.endpoint)
    caplog.set_level(logging.DEBUG, logger="wmtp")
    with pytest.raises(s3cache.StorageError) as e:
        s3cache.resolve("models/tiny", None, cfg, "model")
    msg = str(e.value)
    assert "credentials were rejected" in msg and server.endpoint in msg
    assert key_id not in msg and secret not in msg
    assert key_id not in caplog.text and secret not in caplog.text
    assert (
        s3cache.scrub(f"id {key_id} secret {secret} url http://u:{secret}@h/")
        == "id *** secret *** url http://***@h/"
    )


def test_unreachable_endpoint_bounded_retries(tmp_path, s3_env):
    port = free_port()  # nothing listens here
    cfg = _cfg(tmp_path, "bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2)
    t0 = time.monotonic()
    with pytest.raises(s3cache.StorageError) as e:
        s3cache.resolve("models/tiny", None, cfg, "model")
    assert time.monotonic() - t0 < 20
    msg = str(e.value)
    assert f"cannot reach endpoint http://127.0.0.1:{port} after 2 attempt(s)" in msg and "models/tiny" in msg


def test_endpoint_that_goes_away_and_comes_back(moto_process, tmp_path, s3_env):
    server = moto_process()
    cfg = _cfg(tmp_path, "bkt", endpoint_url=server.endpoint)
    s3_client(server.endpoint).create_bucket(Bucket="bkt")
    s3cache.upload(_file(tmp_path), "datasets/d", cfg)
    first = s3cache.resolve("datasets/d", None, cfg, "dataset")
    server.stop()
    with pytest.raises(s3cache.StorageError, match=f"cannot reach endpoint {server.endpoint}"):
        s3cache.resolve("datasets/d", None, cfg, "dataset")
    server.start()  # same port, empty state: the data must be uploaded again
    s3_client(server.endpoint).create_bucket(Bucket="bkt")
    s3cache.upload(_file(tmp_path), "datasets/d", cfg)
    again = s3cache.resolve("datasets/d", None, cfg, "dataset")
    assert (again / "train.jsonl").read_text() == (first / "train.jsonl").read_text()


def _file(tmp: Path) -> Path:
    p = tmp / "train.jsonl"
    p.write_text('{"task_id": 601}\n')
    return p


def test_resolve_model_reads_the_keys_of_each_role(tmp_path, monkeypatch):
    """policy / reference / reward: each role's path, resource and format keys (MODEL_ROLES); errors name the key."""
    monkeypatch.delenv("WMTP_S3_BUCKET", raising=False)
    dirs = {"policy": ("meta", ["params.json"]), "reference": ("wmtp", ["config.json", "model.safetensors"]),
            "reward": ("hf", ["config.json"])}  # fmt: skip
    for role, (_, names) in dirs.items():
        for n in names:
            (tmp_path / role).mkdir(exist_ok=True)
            (tmp_path / role / n).write_text("{}")
    kv = {"model.path": tmp_path / "policy", "model.format": "meta", "rho1.ref_model": tmp_path / "reference",
          "rho1.ref_format": "wmtp", "critic.reward_model": tmp_path / "reward",
          "storage.cache_dir": tmp_path / "cache"}  # fmt: skip
    cfg = C.load_config(None, [f"--{k}={v}" for k, v in kv.items()])
    assert {role: s3cache.resolve_model(cfg, role) for role in dirs} == {r: tmp_path / r for r in dirs}
    # incomplete for its format (wmtp: config.json + model.safetensors), and no S3 to fall back to
    (tmp_path / "reference" / "model.safetensors").unlink()
    with pytest.raises(
        s3cache.StorageError, match=r"(?s)'rho1\.ref_model' = .*reference.*lacks .*model\.safetensors"
    ):
        s3cache.resolve_model(cfg, "reference")
    cfg = C.load_config(None, ["--critic.reward_model=", f"--storage.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(s3cache.StorageError, match=r"'critic\.reward_model' is empty and no S3 resource"):
        s3cache.resolve_model(cfg, "reward")
