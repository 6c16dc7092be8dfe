# Set-up and the two jobs the README names. Everything installs from the package registries
# (plus this machine's local torch wheels, when present) into .venv on first use.
#
#   make replay   streaming replay of the CIFAR-10 test set through cameras -> edge -> cloud
#                 (embedded Mosquitto and Redis, installed as root when missing, else run in
#                 containers when a Docker engine answers; report in runs/replay.json)
#   make test     the test suite (starts Mosquitto and Redis if they are not answering)

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= $(HOME)/.cache/ada-ddnn/cifar10
SHARED_CIFAR ?= ../shared/datasets/cifar10/materialize.py
TORCH_PINS ?= torch==2.14.1

export ADA_DDNN_DATA ?= $(DATA)
PYTEST_ARGS ?=   # e.g. -v --durations=20 (CI), -x -k compose

.PHONY: setup data services replay test bench clean

$(BIN)/ada-ddnn: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_PINS)" || $(BIN)/python -m pip install --quiet torch
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/ada-ddnn

# CIFAR-10: an existing copy under $(DATA), else the shared copy on our machines, else the
# official download (needs internet and torchvision).
data: setup
	@if $(BIN)/ada-ddnn data --data "$(DATA)" >/dev/null 2>&1; then echo "CIFAR-10 at $(DATA)"; \
	elif [ -f "$(SHARED_CIFAR)" ]; then $(BIN)/python "$(SHARED_CIFAR)" "$(DATA)"; \
	else $(BIN)/python -m pip install --quiet torchvision && $(BIN)/ada-ddnn data --download --data "$(DATA)"; fi

services:
	@bash scripts/ensure-services.sh

replay: data
	@bash scripts/ensure-services.sh --install-only
	$(BIN)/ada-ddnn replay --n 0 --json runs/replay.json

test: data services
	ADA_DDNN_REQUIRE_DATA=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/ada-ddnn bench train --json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
