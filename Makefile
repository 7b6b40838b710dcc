# Two commands on a fresh machine: `make demo` and `make test`.
# Every install goes through constraints.txt so pip never swaps in a CUDA build of torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS := dev,service,tasks
PYTEST_ARGS ?=

.PHONY: all venv demo test test-fast lint format bench clean system-deps task-labels

all: test

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP) system-deps

# graphviz's `dot` draws CGs; installed from Debian when we are root and it is missing.
system-deps:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null) \
	      || echo "warning: could not install graphviz; drawing CGs will be skipped"; \
	  else echo "warning: graphviz 'dot' not found; drawing CGs will be skipped"; fi; }

demo: venv
	$(VENV)/bin/aiop demo

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check aiop scripts benchmarks tests
	$(VENV)/bin/ruff format --check aiop scripts benchmarks tests

format: venv
	$(VENV)/bin/ruff format aiop scripts benchmarks tests
	$(VENV)/bin/ruff check --fix aiop scripts benchmarks tests

bench: venv
	$(PY) benchmarks/cg_speed.py

# The accuracy labels the predictor learns from (data/task_labels.db, the default recipe's
# sets): many CPU hours on one core, resumable (a rerun skips every label the store holds,
# about a second each). Each family's supernet trains on first use (5-11 min).
LABEL := OMP_NUM_THREADS=1 $(PY) scripts/run_train_cgs_on_task.py -cache_file data/task_labels.db
task-labels: venv
	$(LABEL) -family ofa_mbv3 ofa_pn ofa_resnet -task classification -num_archs 200
	$(LABEL) -family ofa_mbv3 ofa_pn ofa_resnet -task pose -num_archs 200
	$(LABEL) -family ofa_mbv3 ofa_pn ofa_resnet -task semantic detection -num_archs 200
	$(LABEL) -family ofa_resnet -task semantic detection -num_archs 400
	$(LABEL) -family ofa_pn -task panoptic instance -num_archs 200
	$(LABEL) -family ofa_pn -task instance -num_archs 400
	$(LABEL) -family ofa_mbv3 -task panoptic -num_archs 100
	$(LABEL) -family ofa_mbv3 ofa_pn ofa_resnet -task panoptic instance -num_archs 30

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
