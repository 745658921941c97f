# The two entry points of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint venv clean bench

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# the demo's table is under AWS's network model (README, "The network model"); `flstore demo`
# without --network gives the loopback figures
demo: $(STAMP)
	$(BIN)/flstore demo --network aws

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy flstore_core evaluation lambdas pipelines
	$(BIN)/mypy --strict infra/flstore_infra infra/build.py

# Test files spread over the cores (pytest-xdist, up to 4 workers; a file's tests stay on one
# worker, so a module's fixture starts once): on this 2-core host 10 min 5 s against 17 min 30 s
# in one process, most stack tests waiting on the processes they start. The hundreds of
# processes the stack tests start import the repo's modules compiled once (__pycache__,
# git-ignored), also where the environment sets PYTHONDONTWRITEBYTECODE. The 25 slowest tests
# are listed at the end, so a CI log says where its time went.
test: lint
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile \
		--durations=25

# The inner loop, without lint: the tests that start no processes and take milliseconds
# (no stack, slow, property or fuzz tests; `make test` runs every one of them). Only tests/unit
# is collected (every stack test lives in tests/stack), on the cores as `test` does, and Python
# keeps its compiled and assertion-rewritten modules (__pycache__, git-ignored) from one run to
# the next even where the environment sets PYTHONDONTWRITEBYTECODE: without them each run spent
# ~25 s compiling.
test-fast: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest tests/unit -n auto --maxprocesses 4 \
		--dist loadfile -m "not stack and not slow and not property and not fuzz"

bench: $(STAMP)
	mkdir -p bench-out
	$(BIN)/python benchmarks/codec.py --json bench-out/codec.json
	$(BIN)/python benchmarks/warm_vs_cold.py --network aws --json bench-out/warm_vs_cold.json
	$(BIN)/python benchmarks/workloads.py --json bench-out/workloads.json
	$(BIN)/python benchmarks/ingest.py --json bench-out/ingest.json
	$(BIN)/python benchmarks/scale.py --json bench-out/scale.json
	$(BIN)/python benchmarks/block_costs.py --json bench-out/block_costs.json
	$(BIN)/python benchmarks/node_runtime.py --json bench-out/node_runtime.json
	$(BIN)/python benchmarks/novel.py --network aws --json bench-out/novel.json
	$(BIN)/python benchmarks/paper.py --network aws --json bench-out/paper.json
	$(BIN)/python benchmarks/chaos.py --json bench-out/chaos.json

clean:
	rm -rf $(VENV) .flstore demo-out bench-out .pytest_cache .mypy_cache .ruff_cache
