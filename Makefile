# Two commands do all set-up on a fresh Debian machine:
#   make demo   - a gateway on loopback and an example device offloading real work
#   make test   - the test suite (real Mosquitto, wasmtime, onnxruntime, SQLite)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hearth-installed

.PHONY: demo test lint bench examples clean

demo: $(STAMP) examples
	$(PY) examples/demo.py

test: $(STAMP) examples
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP) examples
	$(PY) benchmarks/offload_overhead.py

examples: $(STAMP)
	$(PY) scripts/build_examples.py

$(STAMP): scripts/bootstrap.sh device-sdk/pyproject.toml gateway/pyproject.toml requirements-dev.txt
	VENV=$(VENV) sh scripts/bootstrap.sh
	touch $@

clean:
	rm -rf $(VENV) build
