# fashion-gan: run `make help` for the list of targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets with what each one does
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "fashion-gan needs Python 3.11; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip
	$(VENV_PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

.PHONY: install
install: $(INSTALLED) ## Create the virtual environment (.venv) and install the project and test tools

.PHONY: train-local
train-local: $(INSTALLED) ## Train on Fashion-MNIST on this machine (a few minutes on 2 CPU cores); outputs in ./outputs
	$(VENV_PYTHON) train.py experiment=fashion_mnist $(ARGS)

.PHONY: test
test: $(INSTALLED) ## Run every test except those that need a GPU (Docker tests skip when no engine runs)
	$(VENV_PYTHON) -m pytest -m 'not gpu' $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: $(INSTALLED) ## Run the fast tests only (no slow, docker or gpu tests)
	$(VENV_PYTHON) -m pytest -m 'not slow and not docker and not gpu' $(PYTEST_ARGS)

.PHONY: test-gpu
test-gpu: $(INSTALLED) ## Run the GPU tests (needs a CUDA machine)
	$(VENV_PYTHON) -m pytest -m gpu $(PYTEST_ARGS)

.PHONY: bench
bench: $(INSTALLED) ## Run the benchmarks against the classic DCGAN recipe and write benchmarks/RESULTS.md
	$(VENV_PYTHON) -m benchmarks.run $(ARGS)

.PHONY: sweep
sweep: $(INSTALLED) ## Hydra multirun over learning rate x dropout on Fashion-MNIST, one W&B group
	$(VENV_PYTHON) train.py -m experiment=fashion_mnist model.lr=0.0001,0.0002 model.dropout=0.0,0.3 \
		logger.group=sweep-$$(date +%Y%m%d-%H%M%S) $(ARGS)

.PHONY: docker-engine
docker-engine: ## Start a local Docker engine (overlay2, host networking) if none runs
	bash scripts/start-dockerd.sh

.PHONY: docker-build
docker-build: $(INSTALLED) ## Build the job image fashion-gan:latest (BASE_IMAGE and WHEELHOUSE=1 pass through)
	bash scripts/build-image.sh

.PHONY: submit
submit: $(INSTALLED) ## Submit the floyd.yml job: make submit ARGS="--backend docker --task smoke --follow"
	$(VENV)/bin/fashion-gan run $(ARGS)

.PHONY: lint
lint: $(INSTALLED) ## Byte-compile every module (syntax check)
	$(VENV_PYTHON) -m compileall -q fashion_gan train.py tests benchmarks

.PHONY: ci
ci: ## What .ci/run runs: system packages, Docker engine, then `make test`
	bash .ci/run

.PHONY: clean
clean: ## Remove the virtual environment, caches and local outputs
	rm -rf $(VENV) .pytest_cache outputs multirun wandb
