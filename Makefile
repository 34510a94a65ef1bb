# Set-up and everyday commands. `make demo` and `make test` install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install whenever a file that defines the environment changes.
INSTALL_INPUTS := requirements.txt requirements-dev.txt setup.py tools/install_detectron2.py
STAMP := $(VENV)/.installed-$(shell cat $(INSTALL_INPUTS) | sha256sum | cut -c1-16)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test demo bench env clean

install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --disable-pip-version-check -q --no-build-isolation -e .
	$(PY) -m retinanet_plugin.env --plugin-only
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: install
	$(PY) tools/demo.py

# Benchmarks against detectron2's and torchvision's RetinaNet (several minutes on 2 cores); writes
# benchmarks/results/<machine>.{json,md} and the README's table for this machine.
bench: install
	$(PY) -m benchmarks.run --update-readme $(BENCH_ARGS)

env: install
	$(PY) -m retinanet_plugin.env

clean:
	rm -rf $(VENV) output build *.egg-info
