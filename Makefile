# Set-up and everyday commands. `make demo` and `make test` install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install whenever a file that defines the environment changes.
INSTALL_INPUTS := requirements.txt requirements-dev.txt setup.py tools/install_detectron2.py
STAMP := $(VENV)/.installed-$(shell cat $(INSTALL_INPUTS) | sha256sum | cut -c1-16)
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Default `make ablate`: the gamma/alpha grid of the paper's Table 1a/1b (9 distinct runs) with
# the tiny model on the demo's shapes dataset, 200 iterations each (docs/ablations/).
ABLATE_ARGS ?= --configs "configs/ablations/table1a_ce_alpha0.[257]*.yaml" \
	"configs/ablations/table1b_*.yaml" --model-config configs/retinanet_R18_GN_tiny.yaml \
	--demo-data --output output/ablations/gamma_alpha SOLVER.MAX_ITER 200 \
	SOLVER.STEPS "(155, 185)" SOLVER.WARMUP_ITERS 50 SOLVER.CHECKPOINT_PERIOD 100000 SEED 0

.PHONY: install test test-slow lint demo bench ablate env clean

install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --disable-pip-version-check -q --no-build-isolation -e .
	$(PY) -m retinanet_plugin.env --plugin-only
	rm -f $(VENV)/.installed-*
	touch $@

# One pytest worker per core (pytest-xdist; a test file's tests stay on one worker).
test: install
	$(PY) -m pytest -n auto --dist loadfile tests $(PYTEST_ARGS)

# Slow tests: random SIGKILLs during training and checkpoint writes (~1 min); compiled inference
# against eager (inductor compiles for minutes on 2 cores).
test-slow: install
	$(PY) -m pytest tests -m slow $(PYTEST_ARGS)

# Code style: black and isort (line length 100, setup.cfg), flake8 (line length, unused names).
LINT_PATHS := retinanet_plugin tools benchmarks tests train_net.py setup.py
lint: install
	$(PY) -m black --check -l 100 $(LINT_PATHS)
	$(PY) -m isort --check-only $(LINT_PATHS)
	$(PY) -m flake8 $(LINT_PATHS)

demo: install
	$(PY) tools/demo.py --overwrite

# Benchmarks against detectron2's and torchvision's RetinaNet (several minutes on 2 cores); writes
# benchmarks/results/<machine>.{json,md} and the table for this machine in docs/performance.md.
bench: install
	$(PY) -m benchmarks.run --update-docs $(BENCH_ARGS)

# Trains and evaluates each config, then writes a comparison table (.md, .json) and an AP chart;
# see `python tools/ablate.py --help`.
ablate: install
	$(PY) tools/ablate.py $(ABLATE_ARGS)

env: install
	$(PY) -m retinanet_plugin.env

clean:
	rm -rf $(VENV) output build *.egg-info
