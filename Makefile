# ctsync: the two commands in README.md are `make demo` and `make test`.
# Both install what they need: Debian packages (as root, with apt) and a virtualenv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := conntrack conntrackd nftables iproute2 iputils-ping procps util-linux keepalived tcpdump python3-venv python3-pip
# The docker-compose cluster (docker-compose.yml, tests/e2e, the demo): the engine, Debian's
# compose v1, and debootstrap for the registry-free base image (deploy/docker/).
E2E_APT_PACKAGES := docker.io docker-compose debootstrap

.PHONY: all deps e2e-deps venv lint typecheck test test-core test-linux test-e2e image demo bench clean

all: test

# System packages the agent and the root-only tests use (Debian/Ubuntu).
deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else \
	  echo "not root or no apt-get: skipping system packages ($(APT_PACKAGES))"; \
	fi

# Docker for the e2e tests and the demo: the packages, and a daemon (started here when none
# answers: CI machines and containers have no systemd). Best effort, except under CI=true,
# where the e2e tests must run: there a failure stops the build.
e2e-deps:
	@strict=$$([ "$$CI" = true ] && echo 1 || true); \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  missing=$$(for p in $(E2E_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing:" $$missing; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	      || { echo "e2e-deps: apt-get failed"; [ -z "$$strict" ] || exit 1; }; \
	  fi; \
	  deploy/docker/start-dockerd.sh || { echo "e2e-deps: no Docker daemon: e2e tests will skip"; [ -z "$$strict" ] || exit 1; }; \
	else \
	  echo "not root or no apt-get: skipping Docker set-up ($(E2E_APT_PACKAGES))"; \
	  [ -z "$$strict" ] || docker info >/dev/null 2>&1 || exit 1; \
	fi

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: deps $(BIN)/.installed

lint: venv
	$(BIN)/ruff check ctsync tests bench scripts deploy
	$(BIN)/ruff format --check ctsync tests bench scripts deploy

typecheck: venv
	$(BIN)/mypy

# The full suite: lint, types, pure core tests, the root/netns tests (which skip with a
# reason when not root) and the docker-compose e2e tests (which skip without Docker); under
# CI=true both must run.
test: lint typecheck e2e-deps
	$(BIN)/pytest

test-core: venv
	$(BIN)/pytest tests/core

test-linux: venv
	$(BIN)/pytest tests/linux

test-e2e: venv e2e-deps
	$(BIN)/pytest tests/e2e

# The cluster's image (ctsync:local), from a debootstrapped Debian: no registry needed.
image: venv e2e-deps
	deploy/docker/build-image.sh

# The compose cluster failing over live (or the same in network namespaces without Docker).
demo: venv e2e-deps
	$(BIN)/python scripts/demo.py

bench: venv
	$(BIN)/python bench/ctnetlink_bench.py all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info
