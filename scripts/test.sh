#!/usr/bin/env bash
# Run the whole test suite on this machine: lint, then pytest with a real Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check dpal_core backend tests benchmarks
.venv/bin/python -m pytest -q "$@"
