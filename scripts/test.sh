#!/usr/bin/env bash
# Run the whole test suite on this machine: lint, then pytest (the tests start their own
# redis-server, Label Studio and workers on loopback, and stop them by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  echo "[test] installing redis-server (Debian package)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
.venv/bin/ruff check dpal_core backend tests benchmarks scripts
# One BLAS/OpenMP thread per process: on 2 shared cores more threads only spin against each other.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "[test] no tests were collected"; fi
exit "$rc"
