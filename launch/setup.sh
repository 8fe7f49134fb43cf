#!/usr/bin/env bash
# Set up a machine for msa-train: PyTorch first (CPU build where there is no NVIDIA GPU,
# never the multi-GB CUDA build there), then this repository with its training and test
# dependencies, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: keeping installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PYTHON" -m pip install "torch==${TORCH_VERSION}"
else
    # "+cpu" matches only CPU builds: a local wheel or the PyTorch CPU index, never PyPI's CUDA wheel.
    "$PYTHON" -m pip install "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
        || "$PYTHON" -m pip install "torch==${TORCH_VERSION}+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
"$PYTHON" -m pip install -e ".[dev]"
"$PYTHON" -c "import torch, transformers, msa_modeling; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}, msa_modeling ready')"
