# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Torch is pinned and installed first: an unpinned torch would pull CUDA wheels on a CPU machine.
TORCH_SPEC ?= torch==2.13.0
# The tested versions of every dependency (see `make lock`); pip still resolves from pyproject.toml
# without it, for users who install Heed with plain pip.
CONSTRAINTS := -c constraints.txt

.PHONY: demo test venv dev lint lock bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[annotate,control]"
	touch $@

$(VENV)/.dev: pyproject.toml constraints.txt $(VENV)/.installed
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[annotate,control,bench,dev]"
	touch $@

venv: $(VENV)/.installed

dev: $(VENV)/.dev

demo: $(VENV)/.installed
	$(BIN)/heed demo $(DEMO_ARGS)

test: $(VENV)/.dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Record the versions of the current .venv as the tested set (run after `make test` passes).
lock: $(VENV)/.dev
	{ echo "# Tested versions, installed by make (pip -c constraints.txt). Update deliberately:"; \
	  echo "# make lock rewrites this file from the current .venv after the suite passes."; \
	  $(BIN)/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
