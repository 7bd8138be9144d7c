#!/usr/bin/env bash
# Set up a local ComfyUI checkout and its venv for the real-host tests (tests/comfy). Nothing of ComfyUI
# is committed: .comfy/ and .venv* are git-ignored.
#
#   tests/comfy/setup_comfyui.sh [COMFYUI_GIT_SOURCE]
#
# COMFYUI_GIT_SOURCE: a ComfyUI git URL or local mirror (default: https://github.com/comfyanonymous/ComfyUI).
# Environment: PYTHON (default python3.11), TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1"),
# TORCHAUDIO_SPEC (default "torchaudio==2.11.0", installed --no-deps: ComfyUI imports it at start).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SOURCE="${1:-https://github.com/comfyanonymous/ComfyUI}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
TORCHAUDIO_SPEC="${TORCHAUDIO_SPEC:-torchaudio==2.11.0}"
COMFY="$REPO/.comfy/ComfyUI"
VENV="$REPO/.venv-comfy"

if [ ! -d "$COMFY/.git" ]; then
  mkdir -p "$REPO/.comfy"
  if ! git clone -q "$SOURCE" "$COMFY"; then
    # a partial mirror may lack a few large tokenizer blobs we do not need: check out without them
    cd "$COMFY"
    missing=$(git ls-tree -r HEAD | while read -r _ _ sha path; do git cat-file -e "$sha" 2>/dev/null || echo "!/$path"; done)
    # shellcheck disable=SC2086
    git sparse-checkout set --no-cone '/*' $missing
    git checkout -f HEAD
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
# shellcheck disable=SC2086
"$PIP" install -q $TORCH_SPEC
"$PIP" install -q --no-deps "$TORCHAUDIO_SPEC"
"$VENV/bin/python" - "$VENV/torch-constraint.txt" <<'PY'
import sys, importlib.metadata as md
with open(sys.argv[1], "w") as f:
    for name in ("torch", "torchvision", "torchaudio"):
        f.write(f"{name}=={md.version(name)}\n")
PY
# ComfyUI's requirements without torch*, and without spandrel's dependencies (they can pull another torch)
grep -vE '^(torch|torchvision|torchaudio|spandrel)([<>=~ ]|$)' "$COMFY/requirements.txt" > "$REPO/.comfy/req-no-torch.txt"
"$PIP" install -q -c "$VENV/torch-constraint.txt" -r "$REPO/.comfy/req-no-torch.txt"
"$PIP" install -q --no-deps spandrel
# this pack and its test dependencies, never another torch
"$PIP" install -q -c "$VENV/torch-constraint.txt" safetensors pytest
"$PIP" install -q --no-deps -e "$REPO"
ln -sfn "$REPO" "$COMFY/custom_nodes/mace"

"$VENV/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
echo "ComfyUI: $COMFY"
echo "run the tests: COMFYUI_PATH=$COMFY $VENV/bin/python -m pytest tests/comfy"
