PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean redis

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bastion demo

test: $(STAMP) redis lint typecheck unit

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || echo "warning: redis-server could not be installed; Redis tests will fail"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check bastion tests benchmarks
	$(VENV)/bin/ruff format --check bastion tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy bastion

unit: $(STAMP)
	$(VENV)/bin/bastion test rules/
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/engine.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
