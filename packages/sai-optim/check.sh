#!/usr/bin/env bash
# Builds the sai-optim wheel from a clean folder, installs it into a fresh venv that has only
# torch (the local CPU wheel, pinned: an unpinned torch resolves to a multi-GB CUDA build), and
# runs check_installed.py there twice: as installed, and with no compiler or ninja on PATH (the
# fused CPU update falls back to foreach with one warning). About a minute; a second run reuses
# the venv and rebuilds the wheel.
#
#     bash packages/sai-optim/check.sh [VENV]      # VENV defaults to /tmp/sai-optim-venv
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-/tmp/sai-optim-venv}"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# setuptools builds in packages/sai-optim/build and never empties it: a module deleted from
# sai_diffusion/optim would live on in the wheel from a stale copy there
rm -rf "$here/build" "$here"/*.egg-info
"$python" -m pip wheel -q --no-deps "$here" -w "$work/dist"
rm -rf "$here/build" "$here"/*.egg-info
wheel="$(ls "$work"/dist/sai_optim-*.whl)"
echo "built $(basename "$wheel"):"
"$python" -m zipfile -l "$wheel" | awk 'NR > 1 {print "  " $1}'

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"

cp "$here/check_installed.py" "$work/"  # run from outside the checkout: the installed copy, not ours
cd "$work"
"$venv/bin/python" check_installed.py
echo "again without a C++ compiler or ninja on PATH:"
mkdir "$work/extensions"
env -i HOME="$HOME" PATH="$venv/bin" TORCH_EXTENSIONS_DIR="$work/extensions" \
    "$venv/bin/python" -W ignore::UserWarning check_installed.py
