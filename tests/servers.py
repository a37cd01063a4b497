"""Pytest fixtures that start real servers: moto's S3 server and an MLflow tracking server whose artifacts go to it.

    tests/conftest.py does `from tests.servers import *`, so every test module sees these fixtures:

- `s3_server` (session): moto's threaded S3 server on 127.0.0.1:<free port>; the value is the endpoint URL.
- `s3_env` (function): fake AWS credentials + AWS_ENDPOINT_URL=s3_server + HF_HUB_OFFLINE=1 in os.environ.
- `moto_process` (function): a factory for moto server *subprocesses* that can be stopped (killed) and restarted
  on the same port, optionally enforcing credentials (`auth=True`); all are killed at the end of the test.
- `mlflow_server` (session): `mlflow server` (sqlite backend) whose artifacts go to `s3://<bucket>/mlflow` on the
  moto server; the value is the tracking URI, with `.bucket` and `.s3_endpoint` attributes.
- `start_mlflow_server(...)`: the same as a handle you can stop and restart (for server-loss tests).
- `TcpProxy(target_url)`: a TCP forwarder you can stop and start on the same port: a network outage in front of
  a real server, without paying the server's start-up again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

__all__ = [  # what `from tests.servers import *` (tests/conftest.py) brings in
    "FAKE_AWS", "URL", "MlflowProcess", "MotoProcess", "TcpProxy", "free_port", "mlflow_server", "moto_process",
    "s3_client", "s3_env", "s3_server", "start_mlflow_server", "wait_http",
]  # fmt: skip

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class URL(str):
    """A server URL (a plain str) that also carries attributes such as `.bucket`."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll `url` until it answers (any HTTP status) or raise with the server's log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"server at {url} did not come up within {timeout:.0f}s\n{tail}")


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    """Stop a server started with start_new_session=True, children included (mlflow runs uvicorn as a child):
    `sig` first, SIGKILL after `wait` seconds, and SIGKILL for whatever is left in its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=wait)


# --------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield URL(f"http://{host}:{port}")
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Fake credentials and the moto endpoint in os.environ for this test (restored afterwards)."""
    for k, v in FAKE_AWS.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "WMTP_S3_BUCKET"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return s3_server


class MotoProcess:
    """A moto S3 server in its own process: stop() kills it (in-flight transfers break), start() brings it back
    on the same port with empty state. `auth=True` makes it check credentials (INITIAL_NO_AUTH_ACTION_COUNT=0)."""

    def __init__(self, log_dir: Path, auth: bool = False):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"moto-{self.port}.log"
        self.env = dict(os.environ, **FAKE_AWS)
        if auth:
            self.env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> MotoProcess:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=out, start_new_session=True)
        wait_http(f"{self.endpoint}/moto-api/", timeout, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc, signal.SIGKILL)
            self.proc = None


@pytest.fixture
def moto_process(tmp_path):
    started: list[MotoProcess] = []

    def make(auth: bool = False) -> MotoProcess:
        m = MotoProcess(tmp_path, auth)
        started.append(m)
        return m.start()

    yield make
    for m in started:
        m.stop()


# --------------------------------------------------------------------------- MLflow


class MlflowProcess:
    """`mlflow server` with a sqlite backend; artifacts to `s3://<bucket>/mlflow` (moto) or to a local folder."""

    def __init__(self, workdir: Path, s3_endpoint: str | None = None, bucket: str | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "mlflow.db"
        self.log = workdir / "mlflow-server.log"
        self.bucket = bucket
        self.dest = f"s3://{bucket}/mlflow" if bucket else (workdir / "artifacts").as_uri()
        self.env = dict(os.environ, **FAKE_AWS)
        for k in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
            self.env.pop(k, None)
        if s3_endpoint:
            self.env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> MlflowProcess:
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.db}",
            "--artifacts-destination", self.dest,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=out, start_new_session=True, cwd=self.db.parent
            )
        wait_http(f"{self.uri}/health", timeout, self.proc, self.log)
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            _kill_group(
                self.proc, sig, wait=3.0
            )  # uvicorn may linger on keep-alive connections: then SIGKILL
            self.proc = None


def start_mlflow_server(
    workdir: Path, s3_endpoint: str | None = None, bucket: str | None = None
) -> MlflowProcess:
    return MlflowProcess(workdir, s3_endpoint, bucket).start()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_server, bucket)
    url = URL(server.uri)
    url.bucket, url.s3_endpoint, url.log = bucket, str(s3_server), server.log
    yield url
    server.stop(signal.SIGTERM)


def _boto_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": FAKE_AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": FAKE_AWS["AWS_DEFAULT_REGION"],
    }


def s3_client(endpoint: str):
    """A plain boto3 client for the moto server with the fake credentials (for test setup and listing)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **_boto_kwargs())


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target_url`'s host:port. stop() closes the listener and every open connection
    (clients see the server vanish: resets, then refused connections); start() listens on the same port again."""

    def __init__(self, target_url: str):
        u = urllib.parse.urlsplit(target_url)
        self.target = (u.hostname, u.port)
        self.port = free_port()
        self.url = f"{u.scheme}://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            src.close()  # each socket is the source of exactly one pipe

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
