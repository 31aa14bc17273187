#!/usr/bin/env bash
# Create .venv in the repo root (if missing) and install the project into it.
# Re-running is cheap: a stamp keyed on pyproject.toml and this script skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# keyed on this script too, so a new install line here reaches existing venvs
stamp=".venv/.dpal-installed-$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the default (CUDA) torch build"
  .venv/bin/pip install -q 'torch>=2.3,<3'
else
  # A bare 'torch' pulls a multi-GB CUDA build; this pin is the CPU build.
  echo "[setup] no GPU: installing CPU torch==2.13.*"
  .venv/bin/pip install -q 'torch==2.13.*'
fi
echo "[setup] installing dpal and its dependencies"
.venv/bin/pip install -q -e '.[dev]'
# animal-mnist (the offline benchmark's images) declares tensorflow as a dependency but needs none:
# dpal_core.bench.data reads its bundled arrays directly. --no-deps avoids a multi-GB tensorflow install.
.venv/bin/pip install -q --no-deps animal-mnist==0.4
rm -f .venv/.dpal-installed-*
touch "$stamp"
