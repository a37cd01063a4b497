#!/usr/bin/env bash
# `make release-check`: the fast part of the README's reproduction path, as a third party follows it, from a clean
# clone of this checkout's HEAD (what is committed; local changes are not seen) in a temp directory:
#
#   1. git clone              a fresh copy, nothing carried over (no .venv, .cache, runs, mlruns)
#   2. make smoke             venv from pyproject.toml, the tiny models, the three algorithms on real MBPP
#   3. train.py --version     the version and the clone's commit
#   4. make lint              ruff, hadolint, the VESSL spec and the CI workflow against their schemas
#   5. train.py promote       the smoke's rho1 run -> staging -> production (MLflow's embedded store in the clone)
#   6. load by alias          mlflow.transformers.load_model("models:/mtp-rho1-wmtp-mbpp@production") generates
#
# `make test` and `make research` (the slow part) are not run here. Env: WMTP_DATA_DIR (the benchmark data; make
# passes its own), PY (python3.11), KEEP=1 keeps the temp directory (it is kept anyway when a step fails).
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
data=$(cd "${WMTP_DATA_DIR:-$repo/../shared/data}" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/wmtp-release-check.XXXXXX")
step() { printf '\n=== release-check: %s\n' "$*"; }
trap 'echo "release-check FAILED; the clone is kept in $tmp/wmtp" >&2' ERR

step "clone $(git -C "$repo" rev-parse HEAD) into $tmp/wmtp"
git clone --quiet --no-hardlinks "$repo" "$tmp/wmtp"
cd "$tmp/wmtp"
export WMTP_DATA_DIR=$data HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset MLFLOW_TRACKING_URI

step "make smoke"
make smoke PY="${PY:-python3.11}"

step "train.py --version"
version=$(.venv/bin/python train.py --version)
echo "$version"
[[ $version == *"$(git rev-parse HEAD)"* ]] || { echo "--version does not name the clone's commit" >&2; false; }

step "make lint"
make lint

step "promote the smoke's rho1 run: staging, then production"
run_id=$(.venv/bin/python - <<'EOF'
from mlflow import MlflowClient

import tracking

client = MlflowClient(tracking.default_uri())
exp = client.get_experiment_by_name("mtp/rho1-wmtp/mbpp")
[run] = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1,
                           order_by=["attributes.start_time DESC"])
print(run.info.run_id)
EOF
)
.venv/bin/python train.py promote --run "$run_id" --alias staging
.venv/bin/python train.py promote --run "$run_id" --alias production

step "load it from the registry by alias and generate"
MLFLOW_TRACKING_URI="sqlite:///$PWD/mlruns/mlflow.db" .venv/bin/python - <<'EOF'
import mlflow

pipe = mlflow.transformers.load_model("models:/mtp-rho1-wmtp-mbpp@production")
out = pipe("def add(a, b):", max_new_tokens=16, do_sample=False)[0]["generated_text"]
assert out.startswith("def add(a, b):") and len(out) > len("def add(a, b):"), out
print(f"models:/mtp-rho1-wmtp-mbpp@production generated: {out!r}")
EOF

trap - ERR
if [[ ${KEEP:-0} == 1 ]]; then
  echo "release-check passed; the clone is in $tmp/wmtp"
else
  rm -rf "$tmp"
  echo "release-check passed"
fi
