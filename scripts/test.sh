#!/usr/bin/env bash
# Install SAMIR with its test extras into .venv and run the test suite (what CI runs).
# With no arguments, the Slicer bridge and module tests then run again on the Slicer preview's MRML.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ]; then
  echo "== the Slicer bridge and module tests again, on the Slicer preview (scripts/slicer-preview.txt) =="
  .venv/bin/python -m pip install --quiet --upgrade --no-deps --target .slicer-preview -r scripts/slicer-preview.txt
  PYTHONPATH=.slicer-preview .venv/bin/python -m pytest -q \
    Testing/test_slicer_bridge.py Testing/test_slicer_engine.py Testing/test_slicer_module.py
fi
