#!/usr/bin/env bash
# Create .venv (if needed) and install SAMIR with the given extras, pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
