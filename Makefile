# The two entry points of the README. Both create .venv (Python 3.12, from .python-version) if missing.
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= runs/default

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: run test lint
run: $(VENV)/.installed
	$(VENV)/bin/mxmoe-jax run --out $(OUT) --force

# pytest exits 5 when it collected nothing: that is a failure here, as in CI. Two worker
# processes, each test file on one of them (its module fixtures built once): 17 min instead of
# 25.5 in a fresh clone on the 2-core CI machine (2026-12-01).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "no test ran"; exit 1; fi; exit $$rc

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
