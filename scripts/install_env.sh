#!/usr/bin/env bash
# Create (or complete) the project's virtual environment in one go.
#
# Idempotent: every step first checks whether its result is already there.
# Fails loudly: every failing step prints what it was doing and why it stopped.
#
#   VENV                  where the environment lives          (default: .venv in the repo)
#   PYTHON                interpreter used to create it         (default: python3)
#   TORCH_SPEC            pip requirement(s) for torch          (default: requirements/torch.txt)
#   MMSEG_SPARSEVIT_CACHE cache of the source-built mmcv wheel  (default: ~/.cache/mmseg_sparsevit)
#   MMCV_VERSION          mmcv release built from source        (default: 2.1.0)
#   MAX_JOBS              parallel compile jobs for mmcv        (default: number of cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
CACHE="${MMSEG_SPARSEVIT_CACHE:-$HOME/.cache/mmseg_sparsevit}"
MMCV_VERSION="${MMCV_VERSION:-2.1.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

step() { printf '\n==> [install] %s\n' "$*"; }
fail() { printf '\n!!! [install] FAILED: %s\n' "$*" >&2; exit 1; }
trap 'fail "command \"${BASH_COMMAND}\" exited with status $? (line ${LINENO}); see the output above"' ERR

step "virtual environment at $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV" || fail "could not create a venv with $PYTHON (is python3-venv installed?)"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || fail "Python >= 3.10 is required (torch 2.14), got $("$PY" --version)"

# requirements/build.txt (a setuptools that still ships pkg_resources, for mmengine and the mmcv build)
# is resolved together with torch and with the runtime set, so neither can move setuptools past it.
step "torch + torchvision"
if "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  echo "already installed: $("$PY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
elif [ -n "${TORCH_SPEC:-}" ]; then
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q $TORCH_SPEC -r "$ROOT/requirements/build.txt"
else
  "${PIP[@]}" install -q -r "$ROOT/requirements/torch.txt" -r "$ROOT/requirements/build.txt"
fi

step "runtime dependencies"
"${PIP[@]}" install -q -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/tests.txt" \
  -r "$ROOT/requirements/build.txt"

step "mmcv $MMCV_VERSION with compiled ops"
if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; then
  echo "already installed: mmcv $MMCV_VERSION with ops"
else
  "$PY" "$ROOT/scripts/build_mmcv.py" --version "$MMCV_VERSION" --cache "$CACHE" \
    || fail "building mmcv $MMCV_VERSION from source (log above)"
  "$PY" -c "import mmcv.ops" || fail "mmcv installed but 'import mmcv.ops' fails"
fi

step "mmdet + mmsegmentation"
"${PIP[@]}" install -q -r "$ROOT/requirements/mm.txt"

step "mmseg_sparsevit (editable)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"

step "smoke check"
"$PY" - <<'EOF'
import torch, mmcv, mmcv.ops, mmengine, mmdet, mmseg, timm
import mmdet.models, mmseg.models  # noqa: F401  (registers Mask2Former and friends)
import mmseg_sparsevit  # noqa: F401
print(f'torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), mmcv {mmcv.__version__}, '
      f'mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, '
      f'timm {timm.__version__}, mmseg_sparsevit {mmseg_sparsevit.__version__}')
EOF
step "environment ready: $VENV"
