#!/usr/bin/env bash
# Creates .venv and installs sai-diffusion with its test tools, CPU-only and fast.
# GPU users: install your CUDA build of torch first, then `pip install -e .` (torch>=2.4 is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel, pinned: an unpinned torch resolves to a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# Only the CLIP BPE vocabulary file is used (to build tokenizers offline); --no-deps keeps
# torchvision out.
python -m pip install -q --no-deps clip-anytorch==2.6.0
# SGD-SaI's fused CPU update is compiled once here (about a minute; torch caches it) rather
# than at the first training step; without a C++ compiler the foreach update is used instead.
python -c "from sai_diffusion.optim import fused; print('fused SGD-SaI CPU update:', 'built' if fused.cpu_kernel() else 'not built (foreach update)')"
echo "sai-diffusion installed in .venv (python $(python -c 'import sys; print(sys.version.split()[0])'), torch $(python -c 'import torch; print(torch.__version__)'))"
