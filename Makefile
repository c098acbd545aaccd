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
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  ($$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || { echo "error: redis-server could not be installed; the Redis tests need it" >&2; exit 1; }; }

lint: $(STAMP)
	$(VENV)/bin/ruff check bastion tests benchmarks
	$(VENV)/bin/ruff format --check bastion tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy bastion

unit: $(STAMP) redis
	$(VENV)/bin/bastion test rules/
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/engine.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
