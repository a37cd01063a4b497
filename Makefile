# wmtp: two commands on a fresh machine: `make smoke` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export WMTP_DATA_DIR ?= $(abspath ../shared/data)
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv tiny smoke test test-slow lint format bench gpu-check research release-check clean

# torch first and pinned: on the CI machines pip takes the 2.13.0 CPU wheel lying on disk; elsewhere PyPI's Linux
# wheel is the CUDA build (set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU-only install).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

tiny: venv
	$(BIN)/python tiny.py --out .cache/tiny

# FAMILY=llama3|qwen2|qwen3|mistral: the same runs on that tiny HF family base (smoke.py --family)
smoke: tiny
	$(BIN)/python smoke.py $(if $(FAMILY),--family $(FAMILY))

# lint: code style, the Dockerfile (hadolint, no ignored rules), the VESSL spec and the CI workflow (schemas).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --schemafile schemas/vessl.schema.json vessl.yaml
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/ci.yml

test: lint
	$(BIN)/python -m pytest -q --durations=15

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: tiny
	$(BIN)/python bench/mtp_step.py
	$(BIN)/python bench/judge.py
	$(BIN)/python bench/speculative.py

# The study on the synthetic benchmark (README "Research"): 95 runs, ~3.5 CPU-hours (~2 h on 2 idle cores);
# resumes when rerun (in a fresh checkout too: the ledger docs/results/synthetic/runs.jsonl); the report lands in
# docs/results/synthetic/. From scratch: rm -rf runs/research/synthetic docs/results/synthetic/runs.jsonl.
research: tiny
	$(BIN)/python sweep.py configs/sweeps/synthetic.toml

# The fast part of the README's reproduction path from a clean clone of HEAD in a temp directory: make smoke,
# --version, make lint, promote the smoke's rho1 run (staging, production), load it by alias and generate.
# About 10 min on 2 cores, most of it the venv install (scripts/release_check.sh says what each step checks).
release-check:
	bash scripts/release_check.sh

gpu-check:
	PYTHON=$(abspath $(BIN)/python) bash scripts/gpu_check.sh

clean:
	rm -rf .cache runs mlruns
