# One venv at the repository root; everything runs from it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines: the local CPU wheel. GPU machines: `make setup TORCH_SPEC="torch>=2.4,<2.15"` (CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup lint test test-fast demo up down status bench clean-state
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing below pulls another build of it.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,demo]" "$(TORCH_SPEC)"
	touch $@

# Lint first: ruff's configured rules and its formatter (pyproject [tool.ruff]) on the whole tree.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest tests

test-fast: setup lint
	$(PY) -m pytest tests -m "not e2e and not multinode"

demo: setup
	$(PY) cluster/local/quickstart.py

up: setup
	$(PY) cluster/local/stack.py up

down:
	$(PY) cluster/local/stack.py down

status:
	$(PY) cluster/local/stack.py status

bench: setup
	$(PY) bench/model.py && $(PY) bench/data.py && $(PY) bench/train.py && $(PY) bench/train.py --checkpoint-cost && $(PY) bench/train.py --emulate 0.1 --cpu-batch 32 && $(PY) bench/train.py --deit-step && $(PY) bench/infer.py && $(PY) bench/shards.py && $(PY) bench/resize.py
