# ctsync: the two commands in README.md are `make demo` and `make test`.
# Both install what they need: Debian packages (as root, with apt) and a virtualenv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := conntrack conntrackd nftables iproute2 iputils-ping procps util-linux keepalived tcpdump python3-venv python3-pip

.PHONY: all deps venv lint typecheck test test-core test-linux demo bench clean

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

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: deps $(BIN)/.installed

lint: venv
	$(BIN)/ruff check ctsync tests bench scripts
	$(BIN)/ruff format --check ctsync tests bench scripts

typecheck: venv
	$(BIN)/mypy

# The full suite: lint, types, pure core tests and the root/netns tests (which skip with
# a reason when not root; under CI=true they must run).
test: lint typecheck
	$(BIN)/pytest

test-core: venv
	$(BIN)/pytest tests/core

test-linux: venv
	$(BIN)/pytest tests/linux

demo: venv
	$(BIN)/python scripts/demo.py

bench: venv
	$(BIN)/python bench/ctnetlink_bench.py all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info
