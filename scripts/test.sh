#!/usr/bin/env bash
# Install SAMIR with its test extras into .venv and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q "$@"
