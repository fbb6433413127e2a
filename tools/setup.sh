#!/usr/bin/env bash
# Creates .venv in the project and installs fxcompress with its extras under
# the pinned constraints. Safe to run again: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,data,plot]'
