# make demo: train a small model on Python's own docs (offline) and print samples.
# make test: run the test suite. Both create .venv and install ownllm into it when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a machine with a GPU, install the torch you want into .venv first and set TORCH= .
TORCH ?= torch==2.13.0
# Test processes (pytest-xdist): most tests wait on subprocesses and servers, so 2 workers halve the wall time on 2 cores.
TEST_WORKERS ?= 2

.PHONY: demo test test-all install browser clean

$(BIN)/ownllm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(BIN)/python -m pip install --quiet "$(TORCH)")
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/ownllm

install: $(BIN)/ownllm

demo: install
	$(BIN)/ownllm demo --out runs/demo
	@echo "ownllm is installed in $(VENV): 'source $(VENV)/bin/activate' puts it on the PATH of a shell (or call $(BIN)/ownllm)"

# The chat-page test drives Debian's headless chromium; install it with apt when it is missing.
browser:
	@command -v chromium >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "make test needs chromium (the chat-page test): install it"; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: install browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-all: install browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m ""

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
