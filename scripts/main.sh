#!/usr/bin/env bash
# README main-job command: set up the venv if needed, then train TR-DPO on the embedded default
# (tiny GPTNeoX + synthetic preference task). Extra arguments go to `fasttrdpo train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${FASTTRDPO_VENV:-.venv}/bin/python" -m fasttrdpo train "$@"
