# Two commands do all set-up on a fresh Debian machine:
#   make demo   - a gateway on loopback and an example device offloading real work
#   make test   - the test suite (real Mosquitto, wasmtime, onnxruntime, SQLite)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hearth-installed

.PHONY: demo test lint bench examples clean lock openvino bench-accel dist deb deb-openvino

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

# The gateway with onnxruntime-openvino (Intel CPU, iGPU, NPU) in a virtualenv of its own: the
# OpenVINO build replaces `import onnxruntime`, so it cannot sit beside the plain one in .venv.
# Run the gateway from it: .venv-openvino/bin/hearth-gateway run (docs/accelerators.md).
OPENVINO_VENV ?= .venv-openvino
openvino: $(OPENVINO_VENV)/.hearth-installed

$(OPENVINO_VENV)/.hearth-installed: scripts/accel_venv.sh constraints.txt constraints-openvino.txt \
		device-sdk/pyproject.toml gateway/pyproject.toml
	sh scripts/accel_venv.sh $(OPENVINO_VENV) onnxruntime-openvino constraints-openvino.txt
	touch $@

# Every execution provider the OpenVINO venv has, against the CPU provider, per model.
bench-accel: openvino examples
	$(OPENVINO_VENV)/bin/python benchmarks/accel.py

examples: $(STAMP)
	$(PY) scripts/build_examples.py

# Wheels of both packages in build/dist, pure Python (docs/install.md). CI builds them.
dist: $(STAMP)
	sh packaging/build_wheels.sh $(PY)

# The gateway's Debian package in build/deb, for the architecture of this machine: a venv from
# constraints.txt's pins under /opt/hearth, the systemd unit, /etc/hearth (docs/install.md).
deb:
	sh packaging/deb/build.sh

# The same for Intel boxes: hearth-gateway-openvino, onnxruntime-openvino in its venv
# (docs/accelerators.md).
deb-openvino:
	DEB_ACCEL=openvino sh packaging/deb/build.sh

$(STAMP): scripts/bootstrap.sh device-sdk/pyproject.toml gateway/pyproject.toml requirements-dev.txt \
		constraints.txt
	VENV=$(VENV) sh scripts/bootstrap.sh
	touch $@

# Resolve every dependency afresh in a scratch virtualenv and pin the result in constraints.txt.
# Run it on purpose (a new dependency, a wanted upgrade), then run `make lint test` and commit.
lock:
	rm -rf .venv-lock
	VENV=.venv-lock LOCK=0 sh scripts/bootstrap.sh
	{ sed -n '/^#/p' constraints.txt; \
	  .venv-lock/bin/python -m pip --version | awk '{print "pip==" $$2}'; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^#' | sort -f; \
	} > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(OPENVINO_VENV) build
