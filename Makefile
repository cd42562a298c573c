# One command per job. `make demo` and `make test` install what they need first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/fedkrso/v1/*.proto)
DEMO_DIR ?= runs/demo

.PHONY: install proto bytecode demo test docs bench bench-quick quality clean

# pip compiles what it installs on one core: compileall on every core does it a third faster
# (and, like pip, leaves a module this Python cannot compile, torch's py312 test file, to fail on
# import). Packages' own test suites (their tests/ folders) and pip are never imported by a
# run: not compiling them saves about a third (26 s against 37 s here).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-compile -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-compile --no-deps -r requirements-offline.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	$(BIN)/python -m compileall -q -j 0 -x '/(tests?|pip)/' \
		$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

# Regenerate the protobuf/gRPC stubs (committed) from proto/fedkrso/v1/*.proto.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto $(PROTOS)

demo: $(STAMP) bytecode
	$(BIN)/python -m fedkrso.bench.demo --out $(DEMO_DIR)

# The tests include the layering check (import-linter contracts in pyproject.toml); one
# pytest-xdist worker per CPU this process may run on (WORKERS=N to choose), each computing
# with one torch thread (tests/conftest.py).
WORKERS ?= $(shell $(PY) -c 'import os; print(len(os.sched_getaffinity(0)))' 2>/dev/null || echo 2)
test: $(STAMP) bytecode
	$(BIN)/python -m pytest -q -ra -n $(WORKERS) --dist worksteal --durations=15

# Compile the source tree's modules up front (pip does so for installed packages, not for this
# editable checkout): where PYTHONDONTWRITEBYTECODE is set, every server, client and simulator
# process the tests and the demo start would otherwise compile each fedkrso module again.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 bench client common proto server sim > /dev/null

# The documentation site (mkdocs.yml) into site/, strictly: a broken link or reference fails.
# `make test` builds it too (tests/test_docs.py); `$(BIN)/mkdocs serve` previews it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/fedkrso-bench --config bench/sst2.yaml

bench-quick: $(STAMP)
	$(BIN)/fedkrso-bench --config bench/sst2.yaml --quick

# The quality protocol behind docs/QUALITY.md (hours on 2 cores; run it again to resume).
quality: $(STAMP)
	$(BIN)/fedkrso-bench --protocol bench/quality.yaml --out results/quality

clean:
	rm -rf runs results site .pytest_cache
