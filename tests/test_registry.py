"""The model registry as MLflow users use it, and the MLflow UI's view of a run.

The walk, in the embedded store and against the MLflow server the tests start (artifacts in the moto bucket): a
real tiny training run -> `train.py promote --alias staging` -> `--alias production` ->
`mlflow.transformers.load_model("models:/NAME@production")` -> generate, which must give what transformers gives on
the run's own HF export (greedy); `mlflow.pyfunc.load_model` answers too. Then the fields the UI shows, read through
the UI's own ajax API: the experiment's kind, the run's Dataset (name, digest) and Source columns, system metrics.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

import data
import errors
import tracking
import train
from tests.test_train import run_train

PROMPT = "def add(a, b):"
NEW_TOKENS = 8


def tracked_run(tiny: Path, out: Path, uri: str, experiment: str) -> tuple[str, Path]:
    """A real 2-step run tracked at `uri` (validation at each step, so checkpoints/best/hf exists)."""
    kv = {"train.steps": 2, "train.eval_every": 1, "train.run_name": "reg", "tracking.enabled": True}
    kv |= {"tracking.uri": uri, "tracking.experiment": experiment}
    p = run_train(tiny, out, **kv)
    line = next(x for x in p.stdout.splitlines() if x.startswith("tracking: run "))
    return line.split()[2], out / "reg"


def greedy(hf_dir: Path) -> str:
    """What plain transformers generates from the run's own HF export: the reference for the registry's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, net = AutoTokenizer.from_pretrained(hf_dir), AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = tok(PROMPT, return_tensors="pt")
    out = net.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def promote_and_load(uri: str, run_id: str, run_dir: Path, monkeypatch) -> MlflowClient:
    """train -> promote staging -> promote production -> load by alias -> generate (the walk of both stores)."""
    import mlflow

    for alias in ("staging", "production"):
        argv = ["promote", "--run", run_id, "--alias", alias, "--tracking-uri", uri]
        assert errors.main(train.main, argv) == 0
    client = MlflowClient(uri, registry_uri=uri)
    name = tracking.registered_name(client.get_experiment(client.get_run(run_id).info.experiment_id).name)
    prod, staging = (client.get_model_version_by_alias(name, a) for a in ("production", "staging"))
    assert prod.version == staging.version and prod.run_id == run_id  # one version, both aliases
    assert re.fullmatch(r"models:/m-[0-9a-f]+", prod.source), prod.source  # an MLflow model, not loose files
    assert prod.tags["checkpoint"] == f"runs:/{run_id}/checkpoints/best/hf"
    logged = client.get_logged_model(prod.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.status == "READY"
    assert logged.experiment_id == client.get_run(run_id).info.experiment_id  # in the run's experiment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # how MLflow users point the client at the registry
    expected = greedy(run_dir / "checkpoints" / "best" / "hf")
    pipe = mlflow.transformers.load_model(f"models:/{name}@production")
    got = pipe(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
    assert got == expected
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@production")
    assert pyfunc.metadata.get_params_schema().to_dict()[0]["name"] in ("max_new_tokens", "do_sample")
    out = pyfunc.predict([PROMPT], params={"max_new_tokens": NEW_TOKENS, "do_sample": False})
    assert out == [expected]

    # the model card travels with the version: its description, and the MLflow model's own model_card.md
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}@production", dst_path=str(run_dir / "dl"))
    )
    card = (local / "model_card.md").read_text()
    assert f"# Model card: {name}" in card and "## Limitations" in card
    assert prod.description.startswith(f"# Model card: {name}")
    flavor = (local / "MLmodel").read_text()
    assert "transformers:" in flavor and "task: text-generation" in flavor and "python_function:" in flavor

    # promoting again (another alias, same run) reuses the version: no second logged model
    assert (
        errors.main(train.main, ["promote", "--run", run_id, "--alias", "staging", "--tracking-uri", uri])
        == 0
    )
    assert len(client.search_model_versions(f"name='{name}' and run_id='{run_id}'")) == 1
    return client


def test_registry_walk_in_the_embedded_store(tiny_dir, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    run_id, run_dir = tracked_run(tiny_dir, tmp_path / "runs", uri, "wmtp-tests/registry-embedded")
    client = promote_and_load(uri, run_id, run_dir, monkeypatch)
    arts = tmp_path / "mlruns" / "artifacts"  # the logged model's files stay beside the database
    assert list(arts.glob("wmtp-tests_registry-embedded/**/MLmodel")), sorted(arts.rglob("*"))[:20]
    assert client.get_run(run_id).info.status == "FINISHED"  # logging the model did not reopen the run


@pytest.fixture(scope="module")
def server_run(tiny_dir, mlflow_server, tmp_path_factory):
    """A run tracked on the server with system metrics on (sampled every second, CPU here)."""
    mp = pytest.MonkeyPatch()
    mp.setenv(tracking.SYSTEM_METRICS_ENV, "true")
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    try:
        out = tmp_path_factory.mktemp("registry-server")
        run_id, run_dir = tracked_run(tiny_dir, out, str(mlflow_server), "wmtp-tests/registry-server")
    finally:
        mp.undo()
    return run_id, run_dir


def test_registry_walk_against_the_server(server_run, mlflow_server, monkeypatch):
    run_id, run_dir = server_run
    promote_and_load(str(mlflow_server), run_id, run_dir, monkeypatch)


def ui_api(uri: str, endpoint: str, body: dict | None = None) -> dict:
    """The UI's own ajax API (what the browser calls), GET or POST JSON."""
    url = f"{uri}/ajax-api/2.0/mlflow/{endpoint}"
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_the_ui_shows_a_training_experiment_with_dataset_source_and_system_metrics(server_run, mlflow_server):
    run_id, run_dir = server_run
    uri = str(mlflow_server)
    run = ui_api(uri, f"runs/get?run_id={run_id}")["run"]
    exp_id = run["info"]["experiment_id"]
    exp = ui_api(uri, f"experiments/get?experiment_id={exp_id}")["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]

    # the runs table (runs/search): Dataset and Source columns, system metrics
    [row] = ui_api(
        uri, "runs/search", {"experiment_ids": [exp_id], "filter": f"attributes.run_id = '{run_id}'"}
    )["runs"]
    tags = {t["key"]: t["value"] for t in row["data"]["tags"]}
    assert tags["mlflow.source.name"] == "train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == tracking._git_commit()
    [inp] = row["inputs"]["dataset_inputs"]
    full = data.run_data_hash(json_config(run_dir))
    assert inp["dataset"]["name"] == "mbpp" and inp["dataset"]["digest"] == full[: tracking.DIGEST_LEN]
    assert json.loads(inp["dataset"]["profile"])["sha256"] == full
    assert {"key": "mlflow.data.context", "value": "training"} in inp["tags"]
    metrics = {m["key"] for m in row["data"]["metrics"]}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= metrics, metrics
    assert "train/loss" in metrics


def json_config(run_dir: Path):
    import config as C

    return C.from_dict(json.loads((run_dir / "config.json").read_text()))


def test_experiment_kind_is_added_to_an_older_experiment_and_never_overwritten(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    old = client.create_experiment("made-before", (tmp_path / "a").as_uri())
    assert tracking.ensure_experiment(client, "made-before") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    genai = client.create_experiment(
        "theirs", (tmp_path / "b").as_uri(), tags={"mlflow.experimentKind": "genai"}
    )
    tracking.ensure_experiment(client, "theirs")
    assert client.get_experiment(genai).tags["mlflow.experimentKind"] == "genai"
