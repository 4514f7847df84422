#!/usr/bin/env bash
# Install SAMIR into .venv and run the demo (MNI152 vs. a deformed, contrast-changed, noisy copy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
.venv/bin/samir demo "$@"
