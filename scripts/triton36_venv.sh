#!/usr/bin/env bash
# A second, small environment for the ahead-of-time compile test under triton 3.6 (what CUDA images
# with torch 2.11 ship), besides the pinned 3.7.1 of the main environment.
#
#   bash scripts/triton36_venv.sh [BASE_PYTHON]      # prints the path of its python on stdout
#
# It holds only triton==3.6.0 (no dependencies: the AOT compiler needs nothing else). torch, numpy and
# fasttrdpo come from BASE_PYTHON's environment (default: .venv/bin/python), added AFTER the venv's
# own site-packages through a .pth file, so `import triton` finds 3.6.0 first and everything else is
# shared: no second torch (a CUDA torch from PyPI would pin triton 3.7.1 anyway). Safe to re-run:
# a ready venv for the same base environment is reused in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_VERSION=3.6.0
VENV="${FASTTRDPO_TRITON36_VENV:-.venv-triton36}"
BASE_PY="${1:-${FASTTRDPO_VENV:-.venv}/bin/python}"
log() { echo "[triton36] $*" >&2; }

# every site-packages directory of the base (a venv's own, plus the system's with --system-site-packages)
base_site="$("$BASE_PY" -c 'import site; print(" ".join(site.getsitepackages()))')"
base_real="$("$BASE_PY" -c 'import sys; print(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable)')"
PY="$VENV/bin/python"
stamp="$VENV/.fasttrdpo-triton36"
key="$TRITON_VERSION $base_site"
if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  echo "$PY"
  exit 0
fi
rm -rf "$VENV"
log "creating $VENV (triton==$TRITON_VERSION over $base_site)"
"$base_real" -m venv --without-pip "$VENV"
own_site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$BASE_PY" -m pip install --disable-pip-version-check -q --no-deps --target "$own_site" "triton==$TRITON_VERSION"
# executed by site.py after the venv's own site-packages is on sys.path: the base environment goes
# after it, with its own .pth files (the editable fasttrdpo finder, torch's) processed
: > "$own_site/_fasttrdpo_base_env.pth"
for d in $base_site; do
  echo "import site; site.addsitedir('$d')" >> "$own_site/_fasttrdpo_base_env.pth"
done
got="$("$PY" -c 'import triton, torch, fasttrdpo.kernels; print(triton.__version__)')"
if [ "$got" != "$TRITON_VERSION" ]; then
  log "ERROR: $PY imports triton $got, expected $TRITON_VERSION"
  exit 1
fi
echo "$key" > "$stamp"
log "ready: $PY (triton $got)"
echo "$PY"
