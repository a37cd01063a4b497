"""Local-first resolution of models and datasets, with an S3 mirror cache and uploads. All S3 calls live here.

Resolution order for `resolve(resource, local_path, storage_cfg, kind)`:
1. the configured local path, when it exists and holds every required file;
2. `s3://<bucket>/<prefix>/<resource>/` mirrored into `<cache_dir>/<name>-<hash>`;
3. the Hugging Face hub (`hub_id`), for users with internet;
4. otherwise a `StorageError` that lists every place that was tried and why it failed.

Cache key and cost of a cache hit: the hash covers the S3 listing (relative keys, sizes, ETags), so a changed
object gives a new directory and a stale mirror is never reused. Computing it costs one LIST request per 1000
objects on every call; a hit does no HEAD and no GET. (We list rather than trust a cached listing so that a
changed object is noticed at once.)

Why the download is safe:
- atomic: objects go into `<cache_dir>/.tmp-<name>-<hash>-<pid>-<rand>/`, each file is checked (size, and MD5
  when the ETag is a plain MD5, i.e. not a multipart `...-N` ETag), a marker file is written last, and the
  directory is renamed into place. A complete mirror therefore always has its marker; a temp directory is never
  returned.
- restartable: a process killed mid-download leaves only a temp directory, which the next downloader (holding
  the lock, so nobody else can be using it) deletes before starting again.
- several ranks/processes: a file lock `<cache_dir>/<name>-<hash>.lock` lets one process download while the
  others wait and then reuse the finished mirror. The lock is an OS lock (released if the holder dies); on a
  shared network file system give each node its own `storage.cache_dir`.

Errors name the endpoint, bucket and resource, never credentials (messages are scrubbed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import config
import errors
import files
from errors import UserError, scrub

log = logging.getLogger("wmtp.s3cache")

MARKER = ".wmtp-complete.json"
MB = 1024 * 1024


class StorageError(UserError, RuntimeError):
    """A storage problem, with a message that says where, what and what to do (never a credential)."""


# --------------------------------------------------------------------------- settings and client


def settings(storage_cfg: Any) -> dict[str, str]:
    """Bucket, prefix, endpoint and region from config, falling back to the environment."""
    return {
        "bucket": storage_cfg.s3_bucket or os.environ.get("WMTP_S3_BUCKET", ""),
        "prefix": storage_cfg.s3_prefix.strip("/"),
        "endpoint": storage_cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL", ""),
        "region": storage_cfg.region
        or os.environ.get("AWS_DEFAULT_REGION", "")
        or os.environ.get("AWS_REGION", ""),
    }


def make_client(storage_cfg: Any):
    """A boto3 S3 client with bounded retries (botocore standard mode) and a connect timeout.

    Credentials come from the standard AWS chain (env, profile, instance role); nothing is hard-coded.
    """
    import boto3
    from botocore.config import Config

    s = settings(storage_cfg)
    attempts = max(1, int(getattr(storage_cfg, "max_attempts", 5)))
    conf = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=float(getattr(storage_cfg, "connect_timeout", 5.0)),
        read_timeout=60,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=s["endpoint"] or None, region_name=s["region"] or None, config=conf
    )


def _where(s: dict[str, str]) -> str:
    return (
        f"endpoint {scrub(s['endpoint'])}" if s["endpoint"] else f"AWS S3 (region {s['region'] or 'default'})"
    )


# --------------------------------------------------------------------------- errors


def _explain(e: Exception, s: dict[str, str], what: str, attempts: int) -> StorageError:
    """Turn a botocore exception into a StorageError that says what failed and what to do."""
    from botocore import exceptions as bx

    where = _where(s)
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        msg = (
            f"{what}: no usable AWS credentials for {where}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or run where an instance/pod role provides them"
        )
    elif isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            msg = f"{what}: bucket {s['bucket']!r} does not exist at {where} (storage.s3_bucket / WMTP_S3_BUCKET)"
        elif code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"} or (
            status == 403
        ):
            msg = (
                f"{what}: credentials were rejected by {where} ({code or status}). Check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE and the bucket policy"
            )
        elif code in {"NoSuchKey", "404"}:
            msg = f"{what}: object not found at {where} ({code})"
        else:
            msg = f"{what}: S3 request failed at {where}: {code} {e}"
    elif isinstance(
        e, (bx.ConnectionError, bx.HTTPClientError, ConnectionError)
    ):  # refused, timeouts, resets
        msg = (
            f"{what}: cannot reach {where} after {attempts} attempt(s) ({type(e).__name__}). "
            "Check storage.endpoint_url / AWS_ENDPOINT_URL and the network"
        )
    else:
        msg = f"{what}: {type(e).__name__}: {e}"
    return StorageError(scrub(msg))


def _guard(s: dict[str, str], what: str, attempts: int, fn: Callable[[], Any]) -> Any:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError

    try:
        return fn()
    except RetriesExceededError as e:  # s3transfer's wrapper around the last network error
        raise _explain(e.last_exception or e, s, what, attempts) from None
    except S3UploadFailedError as e:  # carries the ClientError only as text
        raise StorageError(scrub(f"{what}: upload failed at {_where(s)}: {e}")) from None
    except (BotoCoreError, ClientError, ConnectionError) as e:
        raise _explain(e, s, what, attempts) from None


# --------------------------------------------------------------------------- listing and cache key


def _split(resource: str, s: dict[str, str]) -> tuple[str, str]:
    """(bucket, key prefix ending in '/') for a logical resource or an explicit s3://bucket/key URL."""
    if resource.startswith("s3://"):
        bucket, _, key = resource[5:].partition("/")
        return bucket, key.strip("/") + "/"
    return s["bucket"], "/".join(p for p in (s["prefix"], resource.strip("/")) if p) + "/"


def _target(resource: str, storage_cfg: Any, client, what: str) -> tuple[dict, str, str, Any, int]:
    """Settings, bucket, key prefix, client and retry budget for one resource (shared by mirror and upload)."""
    s = settings(storage_cfg)
    bucket, prefix = _split(resource, s)
    if not bucket:
        raise StorageError(f"{what}: no S3 bucket configured (storage.s3_bucket or WMTP_S3_BUCKET)")
    attempts = max(1, int(getattr(storage_cfg, "max_attempts", 5)))
    return s, bucket, prefix, client or make_client(storage_cfg), attempts


def list_objects(client, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object under `prefix`: [{"key": relative key, "size": int, "etag": str}], sorted by key."""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix) :]
            if not rel or rel.endswith("/"):
                continue  # directory marker objects
            parts = rel.split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise StorageError(f"s3://{bucket}/{o['Key']}: unsafe key (empty, '.' or '..' path part)")
            out.append({"key": rel, "size": int(o["Size"]), "etag": str(o.get("ETag", "")).strip('"')})
    return sorted(out, key=lambda o: o["key"])


def listing_hash(objects: list[dict[str, Any]]) -> str:
    blob = json.dumps([[o["key"], o["size"], o["etag"]] for o in objects], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _name(resource: str) -> str:
    last = resource.rstrip("/").rsplit("/", 1)[-1] or "resource"
    return re.sub(r"[^A-Za-z0-9._-]", "_", last)


def is_complete(path: Path) -> bool:
    """A mirror is complete when its marker (written last) exists and every listed file has its size."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((path / f["key"]).is_file() and (path / f["key"]).stat().st_size == f["size"] for f in files)


# --------------------------------------------------------------------------- download


def _verify(path: Path, obj: dict[str, Any], url: str) -> None:
    size = path.stat().st_size
    if size != obj["size"]:
        raise StorageError(f"{url}: downloaded {size} bytes, expected {obj['size']}; run again")
    etag = obj["etag"]
    if re.fullmatch(r"[0-9a-f]{32}", etag) and files.md5(path) != etag:  # multipart ETags (`-N`) are not MD5s
        raise StorageError(f"{url}: MD5 mismatch (object changed during download or corrupted); run again")


def _download(client, s, bucket, prefix, objects, tmp: Path, progress, attempts: int) -> None:
    from boto3.s3.transfer import TransferConfig

    tcfg = TransferConfig(max_concurrency=4)
    for obj in objects:
        dest = tmp / obj["key"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = f"s3://{bucket}/{prefix}{obj['key']}"
        _guard(
            s,
            f"downloading {url}",
            attempts,
            lambda o=obj, d=dest: client.download_file(
                bucket, prefix + o["key"], str(d), Config=tcfg, Callback=progress
            ),
        )
        _verify(dest, obj, url)
    meta = {"bucket": bucket, "prefix": prefix, "files": objects, "time": time.time()}
    (tmp / MARKER).write_text(json.dumps(meta, indent=1))  # written last: marks the mirror complete


def mirror(
    resource: str,
    storage_cfg: Any,
    required_files: list[str] | None = None,
    client=None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Mirror `s3://<bucket>/<prefix>/<resource>/` into `<cache_dir>/<name>-<hash>` and return that directory."""
    from filelock import FileLock, Timeout

    s, bucket, prefix, client, attempts = _target(resource, storage_cfg, client, "mirror")
    url = f"s3://{bucket}/{prefix}"
    objects = _guard(s, f"listing {url}", attempts, lambda: list_objects(client, bucket, prefix))
    if not objects:
        raise StorageError(
            f"listing {url}: no objects under this prefix at {_where(s)} (resource {resource!r})"
        )
    missing = sorted(set(required_files or []) - {o["key"] for o in objects})
    if missing:
        raise StorageError(f"{url}: required file(s) missing from S3: {', '.join(missing)}")

    cache = Path(storage_cfg.cache_dir).resolve()
    base = f"{_name(resource)}-{listing_hash(objects)}"
    final = cache / base
    if is_complete(final):
        return final  # cache hit: no object request
    cache.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache / f"{base}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process to finish mirroring %s into %s", url, final)
        lock.acquire()
    try:
        if is_complete(final):
            return final  # another process finished it while we waited
        for stale in cache.glob(f".tmp-{base}-*"):  # left by a killed downloader; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete (tampered) mirror: move it out of the way, never reuse it
            shutil.rmtree(final)
        tmp = cache / f".tmp-{base}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            log.info("mirroring %s (%d files, %.1f MB) into %s", url, len(objects), _mb(objects), final)
            _download(client, s, bucket, prefix, objects, tmp, progress, attempts)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
    finally:
        lock.release()


def _mb(objects: list[dict[str, Any]]) -> float:
    return sum(o["size"] for o in objects) / MB


# --------------------------------------------------------------------------- resolve


def _local_problem(path: Path, required_files: list[str] | None) -> str | None:
    """None when `path` is usable, else why not."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        if not required_files and not any(path.iterdir()):
            return "is an empty directory"
        missing = [f for f in required_files or [] if not (path / f).exists()]
        if missing:
            return f"lacks required file(s): {', '.join(missing)}"
    return None


def _from_hub(hub_id: str, kind: str, storage_cfg: Any, patterns: list[str] | None = None) -> Path:
    """Last resort for users with internet: huggingface_hub.snapshot_download into the cache (only the files
    matching `patterns` when given: a dataset repo can hold GBs beyond the split that is needed)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise StorageError("HF_HUB_OFFLINE is set")
    from huggingface_hub import snapshot_download

    repo_type = "dataset" if kind == "dataset" else "model"
    cache = Path(storage_cfg.cache_dir).resolve() / "hub"
    return Path(
        snapshot_download(repo_id=hub_id, repo_type=repo_type, cache_dir=str(cache), allow_patterns=patterns)
    )


def resolve(
    resource: str,
    local_path: str | Path | None,
    storage_cfg: Any,
    kind: Literal["model", "dataset"],
    hub_id: str | None = None,
    required_files: list[str] | None = None,
    client=None,
    progress: Callable[[int], None] | None = None,
    hub_patterns: list[str] | None = None,
) -> Path:
    """Find a model/dataset directory: local path, else S3 mirror, else hub; else a StorageError listing all tries.

    `client` (a boto3 S3 client, e.g. from make_client) and `progress` (called with byte counts) are optional.
    `hub_patterns` (glob patterns of repo paths, e.g. ["data/test-*.parquet"]) limits what the hub download fetches.
    """
    tried: list[str] = []
    if local_path:
        p = Path(local_path)
        problem = _local_problem(p, required_files)
        if problem is None:
            return p
        tried.append(f"local path {str(p)!r} {problem}")
    else:
        tried.append("local path: none configured")
    s = settings(storage_cfg)
    if resource and (s["bucket"] or resource.startswith("s3://")):
        try:
            return mirror(resource, storage_cfg, required_files, client, progress)
        except StorageError as e:
            tried.append(f"S3: {e}")
    elif resource:
        tried.append(f"S3 resource {resource!r}: no bucket configured (storage.s3_bucket / WMTP_S3_BUCKET)")
    else:
        tried.append("S3: no resource configured")
    if hub_id:
        try:
            return _from_hub(hub_id, kind, storage_cfg, hub_patterns)
        except Exception as e:  # any hub failure is one more line in the error below
            tried.append(f"hub {hub_id!r}: {type(e).__name__}: {e}")
    raise StorageError(
        scrub(f"cannot find {kind} {resource or local_path!r}; tried:\n  - " + "\n  - ".join(tried))
    )


# files whose presence makes a local model directory complete, per checkpoint format (formats.load_model's)
MODEL_FILES = {"meta": ["params.json"], "hf": ["config.json"], "wmtp": ["model.safetensors", "config.json"]}


# where each model role lives in the config: (section, path key, S3 resource key, format key; None: always HF)
MODEL_ROLES = {
    "policy": ("model", "path", "resource", "format"),  # the model being fine-tuned
    "reference": ("rho1", "ref_model", "ref_resource", "ref_format"),  # rho1's reference causal LM
    "reward": ("critic", "reward_model", "reward_resource", None),  # the critic's HF sequence classifier
}


def resolve_model(cfg: Any, role: Literal["policy", "reference", "reward"]) -> Path:
    """The model directory of `role`, from its config keys (MODEL_ROLES): the local path, else the S3 mirror of
    its resource; errors name the config file and key."""
    section, path_key, resource_key, format_key = MODEL_ROLES[role]
    sec = getattr(cfg, section)
    path, resource = getattr(sec, path_key), getattr(sec, resource_key)
    fmt, key = getattr(sec, format_key) if format_key else "hf", f"{section}.{path_key}"
    if not path and not resource:
        raise StorageError(f"{cfg.source}: '{key}' is empty and no S3 resource is configured for it")
    try:
        return resolve(resource, path or None, cfg.storage, kind="model", required_files=MODEL_FILES.get(fmt))
    except StorageError as e:
        raise StorageError(f"{cfg.source}: '{key}' = {path!r}: {e}") from None


# --------------------------------------------------------------------------- upload


def upload(
    local: str | Path,
    resource: str,
    storage_cfg: Any,
    client=None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Upload a file or a directory tree to `s3://<bucket>/<prefix>/<resource>/`; returns the object URLs.

    Files above `storage.multipart_threshold_mb` go up in parts (boto3 TransferConfig), e.g. checkpoints.
    """
    from boto3.s3.transfer import TransferConfig

    local = Path(local)
    if not local.exists():
        raise StorageError(f"upload: {local} does not exist")
    s, bucket, prefix, client, attempts = _target(resource, storage_cfg, client, "upload")
    part = max(5 * MB, int(getattr(storage_cfg, "multipart_threshold_mb", 64)) * MB)
    tcfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=4)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    urls = []
    for f in files:
        key = prefix + (f.name if local.is_file() else f.relative_to(local).as_posix())
        url = f"s3://{bucket}/{key}"
        _guard(
            s,
            f"uploading {f} to {url}",
            attempts,
            lambda f=f, key=key: client.upload_file(str(f), bucket, key, Config=tcfg, Callback=progress),
        )
        urls.append(url)
    return urls


def check_upload(resource: str, storage_cfg: Any, client=None) -> str:
    """Put and delete one small object under `resource`: before a run that will upload its checkpoints, so that a
    missing bucket, rejected credentials or a read-only policy stop it before it trains, not after. Returns the
    s3:// URL the uploads will go to."""
    what = "storage.upload_checkpoints = true, checked before training"
    s, bucket, prefix, client, attempts = _target(resource, storage_cfg, client, what)
    key = prefix + ".wmtp-upload-check"
    what = f"{what}: writing s3://{bucket}/{key}"
    _guard(s, what, attempts, lambda: client.put_object(Bucket=bucket, Key=key, Body=b"wmtp upload check\n"))
    _guard(s, what, attempts, lambda: client.delete_object(Bucket=bucket, Key=key))
    return f"s3://{bucket}/{prefix}"


# --------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    """`python s3cache.py upload LOCAL RESOURCE` puts a model or dataset directory into S3 (what a run's `resource`
    keys then mirror); `python s3cache.py mirror RESOURCE` mirrors one into the cache and prints where. Storage
    settings come from `--config CONFIG` and `--storage.key=value` overrides; credentials from the AWS chain."""
    overrides, rest = config.split_args(argv)
    ap = argparse.ArgumentParser(prog="s3cache.py", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser(
        "upload", help="upload a local file or directory to s3://<bucket>/<prefix>/<resource>/"
    )
    up.add_argument("local")
    up.add_argument("resource")
    mi = sub.add_parser("mirror", help="mirror s3://<bucket>/<prefix>/<resource>/ into storage.cache_dir")
    mi.add_argument("resource")
    for p in (up, mi):
        p.add_argument("--config", default=None, help="TOML config whose [storage] section to use")
    a = ap.parse_args(rest)
    storage = config.load_config(a.config, overrides).storage
    if a.cmd == "upload":
        urls = upload(a.local, a.resource, storage)
        print(
            f"uploaded {len(urls)} file(s): {urls[0] if len(urls) == 1 else urls[0].rsplit('/', 1)[0] + '/...'}"
        )
    else:
        print(mirror(a.resource, storage))
    return 0


if __name__ == "__main__":
    sys.exit(errors.main(main, sys.argv[1:]))
