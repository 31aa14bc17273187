# The two commands of the README:
#   make run   - set up (venv, deps) and start the DPAL backend for Label Studio
#   make test  - set up (venv, deps, redis-server, Label Studio in its own venv) and run every test
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python

.PHONY: help setup run test test-fast labelstudio lint demo bench-core bench-serve bench-rescore bench

help:
	@echo "make run         start the DPAL backend for Label Studio (sets itself up)"
	@echo "make test        run every test, end-to-end with a real Label Studio (sets itself up)"
	@echo "make test-fast   every test but the slow end-to-end ones"
	@echo "make demo        Label Studio + backend + worker with a demo project, no Docker"
	@echo "make bench       the active-learning benchmark on animal-mnist (proxy backbone, ~15 min on 2 cores)"

setup:
	@bash scripts/setup-venv.sh

run: setup
	@bash scripts/run.sh

# Label Studio lives in its own cached venv (~/.cache/dpal/labelstudio-venv): it pins an older
# label-studio-sdk than ours. First time: 2-4 minutes; afterwards instant.
labelstudio: setup
	@$(PY) -c 'import sys; sys.path.insert(0, "tests/e2e"); import labelstudio as l; l.ensure_label_studio(); l.migrated_database(l.DEFAULT_VENV)'

test: setup labelstudio
	@bash scripts/test.sh

test-fast: setup
	@bash scripts/test.sh -m "not slow"

lint: setup
	.venv/bin/ruff check dpal_core backend tests benchmarks scripts

demo: setup labelstudio
	@$(PY) scripts/demo.py

bench: setup
	.venv/bin/dpal bench --dataset animal-mnist --backbone proxy --strategies all --seeds 3 --out benchmarks/results/animal-mnist

bench-core: setup
	$(PY) benchmarks/core_speed.py

bench-serve: setup
	$(PY) benchmarks/serve_speed.py

bench-rescore: setup
	$(PY) benchmarks/rescore_speed.py
