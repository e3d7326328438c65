#!/usr/bin/env bash
# README test command: set up the venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${FASTTRDPO_VENV:-.venv}/bin/python" -m pytest "$@"   # pytest.ini: testpaths = tests
