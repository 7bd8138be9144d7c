#!/usr/bin/env bash
# MACE device check: the CUDA tests, then benchmarks/device_check.py at full SD1.5 size (fp16, bf16).
# Estimated 5-7 minutes on one H100/H200 (not yet run on a GPU), at most 9 (timeouts: tests 3, figures 6;
# whatever finished is kept). Writes under $OUT
# (default ./device-check-out): pytest.log, device_check.log, device_check.md, device_check.json.
#
#   bash benchmarks/device_check.sh              # on a GPU machine, from the repository root
#   bash benchmarks/device_check.sh --dry-run    # anywhere: tiny model on the CPU, < 2 min, no tests
#
# Python: $PYTHON if set, else python3 (it must have a CUDA torch). Missing packages (typically
# diffusers) are pip-installed with --no-deps into ./.device-check-site, from wheels in $MACE_WHEELS
# (no index) when set, else from PyPI. Nothing is downloaded from a model hub: the models are random,
# built in code. A machine that cannot reach PyPI needs the wheels carried: here, run
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
# and there MACE_WHEELS=.whl bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
[[ "${1:-}" == "--dry-run" ]] && DRY="--dry-run"
OUT="${OUT:-./device-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
need=()
for mod in torch diffusers transformers safetensors pytest numpy; do
  "$PY" -c "import $mod" 2>/dev/null || need+=("$mod")
done
SITE="$PWD/.device-check-site"
if ((${#need[@]})); then
  # --target and --no-deps: never touch the interpreter's own torch (a CUDA build); diffusers' own
  # needs (huggingface-hub, regex, requests, filelock, Pillow, numpy) are in any torch + transformers setup
  echo "installing into $SITE: ${need[*]}"
  src=()
  [[ -n "${MACE_WHEELS:-}" ]] && src=(--no-index --find-links "$MACE_WHEELS")
  if [[ " ${need[*]} " == *" torch "* ]]; then  # no torch at all: PyPI's default (CUDA) build, with its libraries
    "$PY" -m pip install -q --target "$SITE" "${src[@]}" torch || exit 3
  fi
  rest=()
  for m in "${need[@]}"; do [[ "$m" != torch ]] && rest+=("$m"); done
  if ((${#rest[@]})); then
    "$PY" -m pip install -q --no-deps --target "$SITE" "${src[@]}" "${rest[@]}" || exit 3
  fi
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/environment.txt"
status=0
if [[ -z "$DRY" ]]; then
  # the CUDA tests and the precision/device/fingerprint tests they build on (~1-2 min)
  timeout 180 "$PY" -m pytest -q -rs tests/test_device.py tests/test_precision.py tests/test_fingerprint.py \
    2>&1 | tee "$OUT/pytest.log" || status=1
fi
timeout 360 "$PY" benchmarks/device_check.py $DRY --out "$OUT" 2>&1 | tee "$OUT/device_check.log" || status=1
echo "device check finished with status $status; results in $OUT"
exit $status
