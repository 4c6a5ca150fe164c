# Kiln: `make quickstart` runs the whole pipeline on the built-in sample; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build by default; a GPU user runs e.g. `make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128`
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
OUT ?= runs/quickstart

.PHONY: install quickstart test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# DeepSpeed ships only an sdist whose build imports torch: build it against the torch just installed,
	# not in an isolated environment (which would download a second, CUDA, torch).
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

quickstart: install
	$(BIN)/kiln quickstart --out $(OUT) --overwrite

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
