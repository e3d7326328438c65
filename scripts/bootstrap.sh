#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment. Safe to re-run: a set-up machine takes seconds.
#
#   * no venv yet            -> create .venv (with --system-site-packages when the base Python already
#                               imports a CUDA torch, so an offline GPU machine reuses it)
#   * torch missing, no GPU  -> the pinned CPU build torch==2.13.0 + triton==3.7.1 (never a multi-GB
#                               CUDA download on a CPU box)
#   * torch missing, GPU     -> PyPI's default Linux torch (the CUDA build)
#   * torch importable       -> left alone (never reinstall over a working CUDA build)
#   * then this package, editable, with the `test` extra
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTTRDPO_VENV:-.venv}"
BASE_PY="${PYTHON:-python3}"
log() { echo "[bootstrap] $*" >&2; }

gpu_present() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
cuda_torch_in() { "$1" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; }

if [ ! -x "$VENV/bin/python" ]; then
  if cuda_torch_in "$BASE_PY"; then
    log "base python already imports a CUDA torch: creating $VENV with --system-site-packages to reuse it"
    "$BASE_PY" -m venv --system-site-packages "$VENV"
  else
    log "creating $VENV"
    "$BASE_PY" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"

key="$(cat setup.py scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.fasttrdpo-bootstrap"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && "$PY" -c "import torch, triton, fasttrdpo" >/dev/null 2>&1; then
  exit 0  # already set up for this version of setup.py
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if "$PY" -c "import torch" >/dev/null 2>&1; then
  log "reusing installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
  if gpu_present && ! cuda_torch_in "$PY"; then
    log "WARNING: a GPU is present but the installed torch is a CPU build; the triton backend will not run."
  fi
elif gpu_present; then
  log "GPU present, no torch: installing PyPI's CUDA build of torch"
  pip_install torch
else
  log "no GPU: installing the CPU build torch==2.13.0 with triton==3.7.1"
  pip_install torch==2.13.0 triton==3.7.1
fi

log "installing fasttrdpo (editable) with the test extra"
if ! pip_install -e ".[test]"; then
  # Offline GPU machines hold torch and triton but not the pure-Python peers (trl, liger, datasets).
  log "WARNING: could not install the test extra (offline?). Installing fasttrdpo alone; tests that need"
  log "         a missing peer (trl, liger-kernel, ...) will be reported as skipped."
  pip_install --no-build-isolation --no-deps -e .
fi
echo "$key" > "$stamp"
log "ready: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
