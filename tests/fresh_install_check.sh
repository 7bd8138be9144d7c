#!/usr/bin/env bash
# A user's install, checked for real: a fresh venv gets the CPU torch, then only `pip install ".[cli]"`
# (a built wheel, not editable), and `mace-erase demo` must finish with its report. No open_clip, no
# MACE_CLIP_BPE, no COMFYUI_PATH, an empty tokenizer cache: the shipped BPE file must be enough.
# Too slow for pytest (~1-3 min); .ci/run calls it after the tests. Everything lives in a temp folder
# that is removed at the end.
#
#   tests/fresh_install_check.sh            env: PYTHON (default python3.11), TORCH_SPEC (default torch==2.13.0)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/mace-fresh-install.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
unset PYTHONPATH MACE_CLIP_BPE COMFYUI_PATH PYTHONHOME
export XDG_CACHE_HOME="$TMP/cache" PIP_DISABLE_PIP_VERSION_CHECK=1
start=$SECONDS

# The sources as a clone would have them (tracked + new unignored files), so no build output lands in REPO.
mkdir "$TMP/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$REPO" ls-files -z -co --exclude-standard | tar -C "$REPO" --null -T - -cf - | tar -C "$TMP/src" -xf -
else
  tar -C "$REPO" --exclude='./.venv*' --exclude='./.comfy' -cf - . | tar -C "$TMP/src" -xf -
fi

"$PY" -m venv "$TMP/venv"
PIP="$TMP/venv/bin/pip"
echo "$TORCH_SPEC" > "$TMP/torch-constraint.txt"   # nothing may pull another torch
"$PIP" install -q "$TORCH_SPEC"
(cd "$TMP/src" && "$PIP" install -q -c "$TMP/torch-constraint.txt" ".[cli]")

cd "$TMP"   # away from the sources: the installed package must be the one imported
"$TMP/venv/bin/python" - "$TMP/venv" <<'PY'
import importlib.metadata, importlib.util, sys
import mace_ops
dist = importlib.metadata.distribution("mass-concept-erasure")  # the registry name; import names unchanged
assert any(str(f) == "mace_ops/__init__.py" for f in dist.files), "mass-concept-erasure does not own mace_ops"
assert mace_ops.__file__.startswith(sys.argv[1]), f"mace_ops imported from {mace_ops.__file__}, not the venv"
assert importlib.util.find_spec("open_clip") is None, "open_clip must not be installed for this check"
from mace_ops.clip_bpe import SHIPPED_BPE
assert SHIPPED_BPE.is_file(), f"the wheel lacks {SHIPPED_BPE}"
print(f"installed mace_ops: {mace_ops.__file__}; BPE file: {SHIPPED_BPE}")
PY
"$TMP/venv/bin/mace-erase" demo --out "$TMP/demo" --quiet
report="$TMP/demo/report/report.html"
if [ ! -s "$report" ] || [ ! -s "$TMP/demo/erasure.safetensors" ]; then
  echo "fresh install check FAILED: the demo left no report or erasure file" >&2
  exit 1
fi
echo "fresh install check: ok, pip install \".[cli]\" + mace-erase demo in $((SECONDS - start)) s"
