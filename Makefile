# Two commands do all set-up on a fresh machine with python3 and make:
#   make demo   train a healthy and a dying network, watched; print the summaries
#   make test   the test suite
# and `make docs` builds the documentation site (MkDocs, --strict: a broken link fails) into build/site.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.deadwatch-installed

.PHONY: demo test docs bench install clean

install: $(STAMP)

# torch==2.13.0 first: a plain `pip install torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deadwatch demo --logdir runs/demo

# pytest's exit code is make's: 5 (no tests collected) fails like a failing test.
test: $(STAMP)
	$(BIN)/python -m pytest -q

docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict --site-dir build/site

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
