# The two commands of the README:
#   make run   - set up (venv, deps) and start the Label Studio ML backend
#   make test  - set up (venv, deps, redis-server) and run the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

.PHONY: help setup run test lint bench-core

help:
	@echo "make run    start the DPAL backend for Label Studio (sets itself up)"
	@echo "make test   run every test (sets itself up: venv, redis-server)"

setup:
	@bash scripts/setup-venv.sh

run: setup
	@bash scripts/run.sh

test: setup
	@bash scripts/test.sh

lint: setup
	.venv/bin/ruff check dpal_core backend tests benchmarks

bench-core: setup
	.venv/bin/python benchmarks/core_speed.py
