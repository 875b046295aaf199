# noisy-student: `make iterate ROUND=2` runs the default experiment, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fashion_mnist.yaml
ROUND ?= 2
ARGS ?=
# e.g. BUDGET=60m: plan each round's epochs from its measured img/s so `make iterate` ends within it
BUDGET ?=
# e.g. LAUNCH="accelerate launch --multi_gpu --num_processes 2" for several processes
LAUNCH ?= $(PY)
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv iterate report distill prepare teacher test lint bench bench-seeds clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

prepare: venv
	$(LAUNCH) stages/prepare_data.py --config $(CONFIG) $(ARGS)

iterate: venv
	$(LAUNCH) stages/iterate.py --config $(CONFIG) round=$(ROUND) $(if $(BUDGET),budget=$(BUDGET)) $(ARGS)

# robustness, stability, pseudo-label health and runs/<experiment>/report.{md,html} for finished rounds
report: venv
	$(LAUNCH) stages/evaluate.py --config $(CONFIG) $(ARGS)

# knowledge distillation of the last round (distill.* in the config) and its compression report
distill: venv
	$(LAUNCH) stages/distill.py --config $(CONFIG) $(ARGS)

# CPU benchmarks -> bench/results/*.json (~20 min on 2 cores; run on an idle machine)
bench: venv
	$(PY) bench/pseudo_label_throughput.py
	$(PY) bench/train_throughput.py
	$(PY) bench/memory.py
	$(PY) bench/scale_out.py

# the default experiment for 3 seeds of the labeled split (~1.5 h on 2 cores)
bench-seeds: venv
	$(PY) bench/accuracy_seeds.py

test: venv
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean-runs:
	rm -rf runs
