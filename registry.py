"""The model registry: `promote(run_id, alias)` registers a run's best checkpoint as a model version with a
generated model card and moves the alias (`staging` | `production`); the CLI is
`python train.py promote --run RUN_ID --alias staging` (which calls `main`). The HF export (`hf/`) is logged with
MLflow's transformers flavor, so that `mlflow.transformers.load_model("models:/NAME@production")` (a
text-generation pipeline) and `mlflow.pyfunc.load_model(...)` load it. Runs are tracked by tracking.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import errors
from errors import scrub
from tracking import TrackingError, check_uri, fmt_metric, registered_name

ALIASES = ("staging", "production")


def _checkpoint_artifact(client, run_id: str) -> str:
    """The HF export of best (else final): the registered version then loads with transformers as it is. Runs
    without one (from before the export existed) register our format: best, last, final."""
    for path in ("checkpoints/best/hf", "checkpoints/final/hf"):
        if client.list_artifacts(run_id, path):
            return path
    for path in ("checkpoints/best", "checkpoints/last", "checkpoints/final"):
        if client.list_artifacts(run_id, path):
            return path
    have = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    raise TrackingError(
        f"run {run_id} has no checkpoints/best, checkpoints/last or checkpoints/final artifact "
        f"(checkpoints/ holds: {', '.join(have) or 'nothing'})"
    )


def model_card(run, name: str, artifact: str) -> str:
    """The registry's model card of an MLflow run (params, metrics, tags)."""
    d = run.data
    return card_text(name, d.params, d.metrics, d.tags, f"runs:/{run.info.run_id}/{artifact}")


def card_text(name: str, params: dict, metrics: dict, tags: dict, checkpoint: str) -> str:
    """A markdown model card from a run's params (flat config keys), metrics and tags (algo, git_commit). One
    text for the registry (model_card) and the HF export's README.md (hf_readme, which adds YAML front matter)."""
    p, m, t = params, metrics, tags
    get = lambda k: p.get(k, "?")  # noqa: E731
    lines = [
        f"# Model card: {name}",
        "",
        "## Model",
        f"- base model: `{get('model.path') or get('model.resource')}` (format `{get('model.format')}`), "
        f"{get('model.n_future_tokens')} prediction heads",
        f"- training: `{t.get('algo', '?')}` (scorer `{get('loss.scorer')}`, lambda {get('loss.lam')}, "
        f"temperature {get('loss.temperature')}), {get('train.steps')} steps at lr {get('optim.lr')}",
        f"- LoRA: {get('train.lora.enabled')}",
        f"- checkpoint: `{checkpoint}`; git commit `{t.get('git_commit', '?')}`",
        "",
        "## Data",
        f"- dataset: `{get('data.dataset')}` (train split `{get('data.train_split')}`, validation split "
        f"`{get('data.val_split')}`), template `{get('data.template')}`, max length {get('data.max_length')}",
        f"- data hash: `{p.get('data.hash', 'not recorded')}`",
        "",
        "## Metrics (last logged value)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {fmt_metric(v)} |" for k, v in sorted(m.items())],
        "",
        "## Config",
        "",
        "| key | value |",
        "|---|---|",
        *[
            f"| {k} | `{v}` |"
            for k, v in sorted(p.items())
            if k.split(".")[0] in ("model", "loss", "optim", "train", "rho1", "critic")
        ],
        "",
        "## Intended use",
        "Research on weighted multi-token prediction for Python code generation (MBPP-style function synthesis):",
        "comparing token-weighting schemes against the uniform MTP baseline.",
        "",
        "## Limitations",
        "- Fine-tuned and validated on MBPP only: short English prompts, single Python functions; scores do not",
        "  transfer to other languages, larger programs or other benchmarks.",
        "- Generated code can be wrong or unsafe: run it only in a sandbox and review it before any use.",
        "- Inherits the base model's license, biases and knowledge cut-off; MBPP is CC-BY-4.0.",
    ]
    return "\n".join(lines) + "\n"


BENCHMARKS = {"mbpp": "MBPP", "humaneval": "HumanEval", "codecontests": "CodeContests"}


def hf_readme(name: str, params: dict, metrics: dict, tags: dict, checkpoint: str) -> str:
    """The HF model card (README.md of an HF export): YAML front matter (library_name, base_model, tags, datasets,
    metrics, model-index with the run's pass@k and validation loss), then the same text as the registry's card."""
    import yaml

    def result(dataset: str, split: str, ms: list[dict]) -> dict:
        ds = {"type": dataset, "name": BENCHMARKS.get(dataset, dataset), "split": split}
        return {"task": {"type": "text-generation"}, "dataset": ds, "metrics": ms}

    scores: dict[str, list[dict]] = {}
    for key, value in sorted(metrics.items()):
        found = re.fullmatch(r"(mbpp|humaneval|codecontests)/pass_at_(\d+)", key)
        if found:
            scores.setdefault(found[1], []).append({"type": f"pass@{found[2]}", "value": value})
    index = [result(ds, params.get("eval.split", "test"), ms) for ds, ms in scores.items()]
    if "val/loss" in metrics:
        val = {"type": "loss", "name": "validation loss (mean CE of the heads)", "value": metrics["val/loss"]}
        index.append(result(params.get("data.dataset", "?"), "validation", [val]))
    algo, scorer = tags.get("algo"), params.get("loss.scorer")
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "base_model": params.get("model.resource") or params.get("model.path") or None,
        "tags": [k for k in ("wmtp", "multi-token-prediction", "llama", "code", algo, scorer) if k],
        "datasets": [params["data.hub_id"]] if params.get("data.hub_id") else [],
        "metrics": sorted({m["type"] for r in index for m in r["metrics"]}),
        "model-index": [{"name": name, "results": index}],
    }
    front = {k: v for k, v in front.items() if v not in (None, [])}
    body = card_text(name, params, metrics, tags, checkpoint)
    return f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n\n{body}"


def promote(run_id: str, alias: str, tracking_uri: str | None = None):
    """Register the run's best checkpoint as a model version with a model card, and point `alias` (staging |
    production) at it. An HF export is logged with MLflow's transformers flavor (see log_hf_model), so the version
    loads with `mlflow.transformers.load_model("models:/NAME@ALIAS")`; a run without one registers our format's
    files as they are (see _checkpoint_artifact). A run already registered reuses its version.
    Returns the ModelVersion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if alias not in ALIASES:
        raise TrackingError(f"alias {alias!r}: expected one of {', '.join(ALIASES)}")
    uri = check_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id).name
    name = registered_name(experiment)
    artifact = _checkpoint_artifact(client, run_id)
    card = model_card(run, name, artifact)
    client.log_text(run_id, card, "reports/model_card.md")
    readme = None
    if artifact.endswith("/hf"):  # the version's README.md: the same card, for transformers and the Hub
        d, where = run.data, f"runs:/{run_id}/{artifact}"
        readme = hf_readme(name, d.params, d.metrics, d.tags, where)
        client.log_text(run_id, readme, f"{artifact}/README.md")
    description = card if len(card) <= 4900 else card[:4800] + "\n...(full card: reports/model_card.md)\n"
    try:
        client.create_registered_model(name, description=f"WMTP models from experiment {experiment}")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    # a version registered before the flavor existed (its source the run's hf/ files) is registered again
    existing = [v for v in found if readme is None or v.source.startswith("models:/")]
    if existing:
        version = existing[0]
        client.update_model_version(name, version.version, description=description)
    else:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        source, model_id = f"runs:/{run_id}/{artifact}", None
        # the flavor's log_model, and the registry's look-up of a models:/ source, use the global tracking URI
        with _use_tracking_uri(uri):
            if readme is not None:
                source, model_id = log_hf_model(client, run, artifact, readme)
            version = client.create_model_version(
                name, source, run_id=run_id, description=description, model_id=model_id
            )
    client.set_model_version_tag(name, version.version, "model_card", "reports/model_card.md")
    client.set_model_version_tag(name, version.version, "checkpoint", f"runs:/{run_id}/{artifact}")
    client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def log_hf_model(client, run, artifact: str, readme: str) -> tuple[str, str]:
    """Log the run's HF export (`artifact`) as an MLflow model of the transformers flavor (a text-generation
    pipeline, the model card as its card, the run's params), linked to the run as its output, in the run's
    experiment. Returns (model URI, model id). Call it with the global tracking URI set to the client's.

    The model is loaded once, in its stored dtype, on the CPU: the flavor saves a loaded pipeline (logging from a
    directory fails with transformers 5 in MLflow 3.17). The requirements are pinned to what runs here rather
    than inferred (inference loads the model again in a subprocess). Signature params: max_new_tokens, do_sample."""
    import tempfile

    import mlflow
    import torch
    import transformers
    from huggingface_hub import ModelCard
    from mlflow.models import infer_signature

    run_id = run.info.run_id
    with tempfile.TemporaryDirectory(prefix="wmtp-promote-") as tmp:
        local = client.download_artifacts(run_id, artifact, tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(local, dtype="auto")
        tokenizer = transformers.AutoTokenizer.from_pretrained(local)
        logged = client.create_logged_model(
            run.info.experiment_id,
            name="model",
            source_run_id=run_id,
            tags={"wmtp.checkpoint": f"runs:/{run_id}/{artifact}"},
            params=dict(run.data.params),
        )
        signature = infer_signature(
            ["def add(a, b):"],
            ["def add(a, b):\n    return a + b"],
            params={
                "max_new_tokens": int(run.data.params.get("eval.max_new_tokens", 256)),
                "do_sample": False,
            },
        )
        requirements = [
            f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}",
        ]
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            torch_dtype=model.dtype,
            model_card=ModelCard(readme),
            signature=signature,
            pip_requirements=requirements,
            run_id=run_id,
            model_id=logged.model_id,
        )
    return info.model_uri, info.model_id


def main(argv: list[str] | None = None) -> int:
    """`train.py promote --run RUN_ID --alias staging|production [--tracking-uri URI]`."""
    from mlflow.exceptions import MlflowException

    ap = argparse.ArgumentParser(prog="train.py promote", description=promote.__doc__)
    ap.add_argument("--run", required=True, help="MLflow run id")
    ap.add_argument("--alias", required=True, choices=ALIASES)
    ap.add_argument(
        "--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else the embedded store"
    )
    args = ap.parse_args(argv)
    try:
        mv = promote(args.run, args.alias, args.tracking_uri or None)
    except MlflowException as e:  # run not found, server unreachable: the user's to fix, not a bug
        raise TrackingError(f"promote: {scrub(str(e))}") from None
    print(
        f"promote: {mv.name} version {mv.version} ({mv.source}); alias '{args.alias}' -> version {mv.version}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(errors.main(main, sys.argv[1:]))
