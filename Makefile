# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean figures

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a CPU build of this version is on the machine's disk.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/preimage demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis

# The figures and CSVs of docs/results.md (about two hours on 2 cores). Resumable:
# runs already in docs/figures/NAME.csv are skipped.
AUTHORS := ../shared/models/invertgan_lp
figures: $(STAMP)
	$(BIN)/preimage experiment noise --runs 30 --out docs/figures
	$(BIN)/preimage experiment latent-dim --runs 50 --out docs/figures
	$(BIN)/preimage experiment partial --runs 30 --out docs/figures
	$(BIN)/preimage experiment mnist-decoder --runs 30 --out docs/figures \
		$(if $(wildcard $(AUTHORS)),--model $(AUTHORS),)
	$(BIN)/preimage experiment projection --runs 100 --out docs/figures
	$(BIN)/preimage demo --out docs/figures
	$(BIN)/python examples/nonconvex_preimage.py --out docs/figures
