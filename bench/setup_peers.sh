#!/usr/bin/env bash
# Create the virtual environment that bench/peers.py runs in (the classical peer methods).
#
#   bash bench/setup_peers.sh [VENV_DIR]        # default: bench/.peers-venv
#
# It is separate from the project's own environment because antspyx 0.6.3 needs numpy < 2.4.
# Installs antspyx (ANTs SyN), itk-elastix (elastix B-spline) and SimpleITK (demons, resampling)
# in one pip command so that pip resolves one consistent numpy. Idempotent: does nothing when the
# environment already imports all three. PYTHON=python3.X picks the interpreter (default python3).
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-$BENCH/.peers-venv}"
PYTHON="${PYTHON:-python3}"
PACKAGES=("antspyx==0.6.3" "itk-elastix==0.25.4" "SimpleITK" "numpy<2.4")
CHECK='import ants, itk, SimpleITK, numpy; itk.ElastixRegistrationMethod; print("ants", ants.__version__, "| itk", itk.Version.GetITKVersion(), "| SimpleITK", SimpleITK.__version__, "| numpy", numpy.__version__)'

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    echo "peers environment ready: $VENV"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install "${PACKAGES[@]}"
"$VENV/bin/python" -c "$CHECK"
echo "peers environment ready: $VENV"
