# Two commands on a fresh machine:  `make demo`  (plan a generated workload
# with every strategy, embedded planner, no server, no GPU) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint

$(BIN)/flashcp: pyproject.toml setup.py $(wildcard planner_service/flashcp_planner/strategies/_engine*.p*)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/flashcp

demo: install
	$(BIN)/flashcp compare --workload prolong --context 131072 --cp 8 --seed 0

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
