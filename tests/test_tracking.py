"""tracking.py against real MLflow: a server whose artifacts go to the moto S3 bucket, the embedded sqlite store,
and a server that is killed mid-run. The "training run" is a small loop that uses Tracker the way train.py does."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

import config as C
import errors
import registry
import tracking
from tests.servers import TcpProxy, s3_client, start_mlflow_server  # fixtures come from tests/conftest.py


def make_cfg(uri: str, scorer: str = "rho1_excess_v1") -> C.Config:
    cfg = C.Config()
    cfg.loss.scorer = scorer
    cfg.tracking.uri = uri
    cfg.storage.endpoint_url = "http://user:hunter2-secret@minio.internal:9000"  # must not reach MLflow
    cfg.model.path = "/models/" + "x" * 600  # longer than MLflow's 500-char param limit
    return cfg


def write_checkpoint(path: Path) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"dim": 4}')
    return path


def training_run(cfg: C.Config, run_dir: Path, steps: int = 5, checkpoint: str = "best") -> tracking.Tracker:
    """What train.py does with a Tracker, minus the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracker = tracking.Tracker(cfg, rank=0)
    tracker.start(
        run_name=run_dir.name,
        world_size=1,
        extra={"model.id": "tiny-mtp", "data.hash": "abc123", "api_token": "tk-9"},
    )
    for step in range(1, steps + 1):
        tracker.log_metrics({"train/loss": 3.0 / step, "train/ce_head1": 2.0 / step, "flag": True}, step=step)
    tracker.log_metrics({"val/loss": 1.25}, step=steps)
    tracker.log_artifacts(write_checkpoint(run_dir / "checkpoints" / checkpoint), f"checkpoints/{checkpoint}")
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([3.0 / s for s in range(1, steps + 1)])
    fig.savefig(run_dir / "plots" / "loss.png")
    plt.close(fig)
    tracker.log_artifacts(run_dir / "plots", "plots")
    (run_dir / "samples.jsonl").write_text('{"task_id": 11, "completion": "def f(): pass"}\n')
    tracker.log_artifact(run_dir / "samples.jsonl", "samples")
    tracker.write_report(run_dir, {"steps": steps, "best_val_loss": 1.25})
    tracker.finish("FINISHED")
    return tracker


@pytest.fixture(scope="module")
def server_run(mlflow_server, tmp_path_factory):
    cfg = make_cfg(str(mlflow_server))
    tracker = training_run(cfg, tmp_path_factory.mktemp("runs") / "rho1-run")
    return tracker, cfg


def test_run_on_server_with_s3_artifacts(server_run, mlflow_server):
    tracker, cfg = server_run
    client = MlflowClient(str(mlflow_server))
    exp = client.get_experiment_by_name("mtp/rho1-wmtp/mbpp")
    assert exp is not None and tracker.run_id
    run = client.get_run(tracker.run_id)
    assert run.info.experiment_id == exp.experiment_id and run.info.status == "FINISHED"
    p, t = run.data.params, run.data.tags
    assert p["loss.scorer"] == "rho1_excess_v1" and p["world_size"] == "1" and p["data.hash"] == "abc123"
    assert p["api_token"] == "***" and "hunter2" not in p["storage.endpoint_url"]
    assert len(p["model.path"]) == tracking.MAX_PARAM_LEN and p["model.path"].endswith("[truncated]")
    assert t["algo"] == "rho1-wmtp" and t["dataset"] == "mbpp" and t["launcher"] == "python"
    assert t["rho1.score"] == "excess" and t["scorer"] == "rho1_excess_v1" and len(t["git_commit"]) >= 7
    hist = client.get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in hist] == [1, 2, 3, 4, 5] and hist[-1].value == pytest.approx(0.6)
    assert "flag" not in run.data.metrics  # booleans are not metrics

    keys = [
        o["Key"]
        for o in s3_client(mlflow_server.s3_endpoint).list_objects_v2(Bucket=mlflow_server.bucket)["Contents"]
    ]
    base = f"mlflow/{exp.experiment_id}/{tracker.run_id}/artifacts/"
    ours = {k[len(base) :] for k in keys if k.startswith(base)}
    assert {
        "checkpoints/best/model.safetensors",
        "checkpoints/best/config.json",
        "plots/loss.png",
        "samples/samples.jsonl",
        "reports/run_report.md",
    } <= ours
    assert {k.split("/")[0] for k in ours} <= set(tracking.LAYOUT)
    assert tracker.summary()[0].startswith(f"tracking: run {tracker.run_id}") and len(tracker.summary()) == 1


def test_report_contents(server_run, tmp_path):
    tracker, cfg = server_run
    report = tracker.write_report(tmp_path / "r", {"steps": 5})
    text = report.read_text()
    assert "| val/loss | 1.25 |" in text and "| loss.scorer | `rho1_excess_v1` |" in text
    assert "hunter2" not in text and not list(report.parent.glob("*.tmp"))
    with pytest.raises(ValueError, match="must start with one of checkpoints"):
        tracker.log_artifact(report, "misc")


def test_promote_moves_aliases_and_attaches_card(server_run, mlflow_server, tmp_path):
    tracker, cfg = server_run
    uri = str(mlflow_server)
    client = MlflowClient(uri)
    name = "mtp-rho1-wmtp-mbpp"
    mv = registry.promote(tracker.run_id, "staging", uri)
    assert mv.name == name and mv.source == f"runs:/{tracker.run_id}/checkpoints/best"
    assert mv.description.startswith(f"# Model card: {name}") and "## Limitations" in mv.description
    assert "| val/loss | 1.25 |" in mv.description and "data hash: `abc123`" in mv.description
    assert client.get_model_version_by_alias(name, "staging").version == mv.version
    arts = [a.path for a in client.list_artifacts(tracker.run_id, "reports")]
    assert "reports/model_card.md" in arts

    assert registry.main(["--run", tracker.run_id, "--alias", "production", "--tracking-uri", uri]) == 0
    assert client.get_model_version_by_alias(name, "production").version == mv.version  # same version reused

    other = training_run(cfg, tmp_path / "second", steps=2, checkpoint="last")  # only checkpoints/last
    mv2 = registry.promote(other.run_id, "staging", uri)
    assert mv2.version != mv.version and mv2.source.endswith("/checkpoints/last")
    assert client.get_model_version_by_alias(name, "staging").version == mv2.version  # staging moved
    assert client.get_model_version_by_alias(name, "production").version == mv.version  # production stayed
    with pytest.raises(SystemExit):
        registry.main(["--run", tracker.run_id, "--alias", "archived"])


def test_embedded_sqlite_default_and_other_ranks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "MLRUNS", tmp_path / "mlruns")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg("", scorer="uniform")
    cfg.model.tokenizer = "/models/llama2_tokenizer"
    quiet = tracking.Tracker(cfg, rank=1)
    assert quiet.start(run_name="r", world_size=2) is None
    quiet.log_metrics({"train/loss": 1.0}, step=1)
    quiet.finish()
    assert not (tmp_path / "mlruns").exists() and quiet.summary() == []
    cfg.tracking.enabled = False  # tracking off: the local report is still written, nothing else
    off = tracking.Tracker(cfg)
    assert off.start(run_name="r") is None and off.write_report(tmp_path / "off").is_file()
    assert not (tmp_path / "mlruns").exists() and off.summary() == [
        "tracking: disabled (tracking.enabled = false)"
    ]
    cfg.tracking.enabled = True

    tracker = training_run(cfg, tmp_path / "runs" / "uniform-run", steps=3)
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    arts = tmp_path / "mlruns" / "artifacts" / "mtp_baseline_mbpp"
    assert list(arts.glob("*/artifacts/checkpoints/best/model.safetensors"))
    client = MlflowClient(tracking.default_uri())
    run = client.get_run(tracker.run_id)
    assert (
        client.get_experiment(run.info.experiment_id).name == "mtp/baseline/mbpp"
        and "rho1.score" not in run.data.tags
    )
    assert [m.value for m in client.get_metric_history(tracker.run_id, "train/loss")] == [3.0, 1.5, 1.0]
    venv_mlflow = (
        f"`{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri sqlite:///"  # not on PATH
    )
    assert any(venv_mlflow in line for line in tracker.summary()), tracker.summary()
    assert (
        registry.main(["--run", tracker.run_id, "--alias", "staging"]) == 0
    )  # default URI: the embedded store
    assert client.get_model_version_by_alias("mtp-baseline-mbpp", "staging").run_id == tracker.run_id
    # a secret-looking word inside a name is no secret: H, the tokenizer and the generation length are shown
    params = run.data.params
    assert (params["model.n_future_tokens"], params["eval.max_new_tokens"]) == ("4", "256")
    assert params["model.tokenizer"] == "/models/llama2_tokenizer" and params["api_token"] == "***"
    card = client.get_model_version_by_alias("mtp-baseline-mbpp", "staging").description
    assert "(format `meta`), 4 prediction heads" in card
    bare = client.create_run(run.info.experiment_id).info.run_id  # no checkpoint: one clear line, exit code 2
    assert errors.main(registry.main, ["--run", bare, "--alias", "staging"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "mlflow.store" not in x]  # not MLflow's INFO
    assert len(err) == 1 and err[0].startswith(f"error: run {bare} has no checkpoints/best, checkpoints/last")

    with pytest.raises(ValueError, match="s3:// holds artifacts, not runs"):
        tracking.Tracker(make_cfg("s3://bucket/mlflow"))


def check_server_loss(uri: str, stop, start, tmp_path: Path) -> None:
    """Two runs lose their server mid-run: neither raises; one finishes while it is down (summary says values were
    lost), the other after it is back (buffered values are flushed, the failed artifact upload is retried)."""
    cfg = make_cfg(uri, scorer="uniform")
    a, b = tracking.Tracker(cfg), tracking.Tracker(cfg)
    for t in (a, b):
        t.start(run_name="lossy", world_size=1)
        t.log_metrics({"train/loss": 2.0}, step=1)
    stop()  # the server vanishes mid-run

    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="training continues"):
        for step in range(2, 12):
            a.log_metrics({"train/loss": 2.0 / step}, step=step)
            b.log_metrics({"train/loss": 2.0 / step}, step=step)
    a.log_artifacts(write_checkpoint(tmp_path / "ckpt"), "checkpoints/last")
    assert time.monotonic() - t0 < 30  # retries are short and back off instead of stalling every step
    b.finish("FINISHED")  # still down: no exception, and the summary says what was lost
    lines = b.summary()
    assert any(
        f"10 metric batches could not be sent to {uri}; buffered values flushed: no" in s for s in lines
    ), lines
    assert "10 metric batches could not be sent" in "\n".join(a.summary())

    start()  # back: the buffer goes out at finish
    a.finish("FINISHED")
    lines = a.summary()
    assert any("10 metric batches could not be sent" in s and "flushed: yes" in s for s in lines), lines
    assert not any("artifact" in s for s in lines), lines
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(a.run_id, "train/loss")] == list(range(1, 12))
    assert [x.path for x in client.list_artifacts(a.run_id, "checkpoints/last")]  # retried at finish
    assert client.get_run(a.run_id).info.status == "FINISHED"
    assert client.get_run(b.run_id).info.status == "RUNNING"  # b could not close its run: the server was away


def test_network_loss_mid_run_does_not_raise(mlflow_server, tmp_path):
    proxy = TcpProxy(str(mlflow_server)).start()  # the outage sits between the client and the real server
    try:
        check_server_loss(proxy.url, proxy.stop, proxy.start, tmp_path)
    finally:
        proxy.stop()


@pytest.mark.slow
def test_server_killed_mid_run_does_not_raise(tmp_path):
    server = start_mlflow_server(tmp_path / "srv")  # its own server: it is SIGKILLed and started again
    try:
        check_server_loss(server.uri, lambda: server.stop(signal.SIGKILL), server.start, tmp_path)
    finally:
        server.stop()


def test_server_down_at_start_creates_the_run_later(mlflow_server):
    proxy = TcpProxy(str(mlflow_server))  # not started yet: the server is unreachable when training begins
    try:
        cfg = make_cfg(proxy.url, scorer="uniform")
        cfg.tracking.experiment = "wmtp-tests/late-start"
        tracker = tracking.Tracker(cfg)
        with pytest.warns(RuntimeWarning, match="training continues"):
            assert tracker.start(run_name="late", world_size=4) is None
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        tracker.log_params({"data.hash": "late-hash"})
        proxy.start()
        tracker.finish("FINISHED")  # creates the run, sends params and the buffered metrics
        client = MlflowClient(str(mlflow_server))
        run = client.get_run(tracker.run_id)
        assert client.get_experiment(run.info.experiment_id).name == "wmtp-tests/late-start"
        assert run.data.params["world_size"] == "4" and run.data.params["data.hash"] == "late-hash"
        assert run.data.metrics == {"train/loss": 1.0} and run.info.status == "FINISHED"
    finally:
        proxy.stop()
