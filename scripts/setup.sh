#!/usr/bin/env bash
# Create .venv (if missing) and install DaCSeg's requirements into it. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
echo "setup: installing requirements (torch is large; the first time takes a few minutes)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -c "import torch, torchvision, pycocotools; print(f'setup: torch {torch.__version__}, torchvision {torchvision.__version__}, cuda available: {torch.cuda.is_available()}')"
