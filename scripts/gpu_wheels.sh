#!/usr/bin/env bash
# Prepare the wheel folder scripts/gpu_check.sh installs the peers from on an offline GPU machine.
#
#   bash scripts/gpu_wheels.sh [DIR]        # default DIR: .whl (git-ignored through .git/info/exclude)
#
# Run it on a machine with PyPI access. It downloads, for CPython 3.12 on manylinux x86-64 (the offline
# H100/H200 images: torch 2.11 + triton 3.6 already installed), pure-Python wheels only, --no-deps:
#   trl, liger-kernel, cut-cross-entropy    the peers the GPU check measures
#   datasets, dill, multiprocess             what trl imports that those images lack
# never torch, triton or any CUDA package (gpu_check.sh reuses the machine's). The versions are pinned
# to what the CPU test environment runs, so both sides compare the same peers. The folder holds one
# version of each (two would stop pip). Each wheel's Requires-Dist lines are printed: a requirement
# the GPU image lacks shows up there as an import error in gpu_check's report, never silently.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PY="${PYTHON:-python3}"
PINS=(trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
mkdir -p "$DIR"
if [ "$DIR" = ".whl" ] && git rev-parse --git-dir >/dev/null 2>&1; then  # keep the wheels out of git
  excl="$(git rev-parse --git-path info/exclude)"
  grep -qx '/.whl/' "$excl" 2>/dev/null || echo '/.whl/' >> "$excl"
fi
for pin in "${PINS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DIR" "$pin"
done
echo "wheels in $DIR:"
for w in "$DIR"/*.whl; do
  echo "  $(basename "$w") ($(du -k "$w" | cut -f1) KiB)"
  "$PY" - "$w" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
print("    requires: " + (", ".join(r for r in reqs if "extra ==" not in r) or "-"))
EOF
done
echo "total: $(du -sh "$DIR" | cut -f1). On the GPU machine: bash scripts/gpu_check.sh --wheels $DIR --out gpu-check-out"
