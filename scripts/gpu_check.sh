#!/usr/bin/env bash
# Issue 11's GPU check: one command, one H100/H200, no internet, <= 5 minutes.
#
#   bash scripts/gpu_check.sh --out DIR [--wheels DIR] [--python PY] [--budget-s 290] [--tests-timeout 110]
#                             [--no-tests]     # a re-run that gives the whole budget to the benchmarks
#   bash scripts/gpu_check.sh --dry-run --out DIR        # the same steps at tiny shapes on CPU (CI)
#
# Steps (each logged with its elapsed time to DIR/gpu_check.log):
#   1. the Python that already holds torch and triton is reused as it is: nothing installs or upgrades
#      torch/triton, no venv is made (a venv made from a venv's python would not see that venv's torch);
#   2. fasttrdpo is imported from this checkout (a symlink tree in a scratch dir when it is not installed);
#      each peer (trl, liger-kernel, cut-cross-entropy, and datasets/dill/multiprocess that trl imports) that
#      does not import is installed, --no-deps --no-index, from the wheels in --wheels DIR (prepared on a
#      machine with internet by scripts/gpu_wheels.sh) into that scratch dir, put first on PYTHONPATH;
#      a peer that still does not import is reported as "not run: <why>";
#   3. the CUDA-marked tests (pytest -m gpu over the test files that have them), capped by --tests-timeout;
#   4. benchmarks/throughput.py --gpu-check with what is left of the budget (repeats sized from the traffic
#      model; what would not fit is reported as not run);
#   5. benchmarks/gpu_report.py: DIR/gpu_check.json + DIR/gpu_check.md (tests, peers, measurements beside
#      the traffic model's predictions, the issue's targets, elapsed time per part).
# DIR ends up with at most six files: gpu_check.{json,md,log}, pytest-gpu.log, throughput.{json,log}.
# Exit status: 0 when the tests passed (or none ran) and the benchmark run completed, 1 otherwise, 2 when
# the environment cannot run the check at all (no torch/triton, no CUDA device outside --dry-run).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
T0=$(date +%s)

OUT="" WHEELS="" PY="${FASTTRDPO_PYTHON:-}" BUDGET=290 TESTS_TIMEOUT="" DRY=0 TESTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --tests-timeout) TESTS_TIMEOUT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --no-tests) TESTS=0; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check.sh: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/gpu_check.log"
if [ -z "$TESTS_TIMEOUT" ]; then TESTS_TIMEOUT=$([ $DRY = 1 ] && echo 90 || echo 110); fi
elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$OUT/gpu_check.log" >&2; }

# ------------------------------------------------------------------------------------- 1. the Python
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, triton" >/dev/null 2>&1; then PY=.venv/bin/python
  else PY=python3; fi
fi
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/fasttrdpo-gpu-check.XXXXXX")"
SITE="$SCRATCH/site"
mkdir -p "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET FASTTRDPO_BACKEND
fatal() {
  log "FATAL: $*"
  "$PY" "$ROOT/benchmarks/gpu_report.py" --out "$OUT" --scratch "$SCRATCH" --fatal "$*" --dry-run "$DRY" \
    --elapsed "setup=$(elapsed)" >/dev/null 2>&1 || true
  exit 2
}
# -P: the working directory (this checkout) must not shadow what is imported: its fasttrdpo/ has no
# kernels/ subpackage (setup.py maps it), so fasttrdpo comes from an install or from the symlink tree below
PYF=()
"$PY" -P -c "" >/dev/null 2>&1 && PYF=(-P)

# peer name | module to import | wheel file prefixes (the peer's own first, then what it needs)
PEERS="trl|trl.kernels|trl- datasets- dill- multiprocess-
liger-kernel|liger_kernel.chunked_loss|liger_kernel-
cut-cross-entropy|cut_cross_entropy|cut_cross_entropy-"
modules_of() { while IFS='|' read -r name module prefixes; do
  echo "$module"; for p in ${prefixes#* }; do [ "$p" != "$prefixes" ] && { p="${p%-}"; echo "${p//-/_}"; }; done
done <<< "$PEERS"; }
# One process (each start imports torch: seconds) answers, one line each, "key<TAB>status<TAB>detail":
#   @torch   ok + versions and devices, or error (then nothing else is tried)
#   @cuda    ok or none
#   @here    ok (fasttrdpo and fasttrdpo.kernels import from this checkout), elsewhere, or error
#   <module> ok + its folder, or error + why        (every peer module, see PEERS)
probe_script='
import importlib, os, sys
def out(*a):
    print(*a, sep="\t", flush=True)
def why(e):
    return f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")[:300]
args = sys.argv[1:]
if args and args[0] == "--env":
    root = os.path.realpath(args[1])
    args = args[2:]
    try:
        import torch, triton
    except BaseException as e:
        out("@torch", "error", why(e))
        sys.exit(0)
    devs = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    out("@torch", "ok", f"{sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} "
        f"triton {triton.__version__} | devices: {devs}")
    out("@cuda", "ok" if torch.cuda.is_available() else "none", "-")
    try:
        import fasttrdpo, fasttrdpo.kernels.linear_logprobs
        files = (fasttrdpo.__file__, fasttrdpo.kernels.linear_logprobs.__file__)
        here = all(os.path.realpath(f).startswith(root + os.sep) for f in files)
        out("@here", "ok" if here else "elsewhere", " ".join(files))
    except BaseException as e:
        out("@here", "error", why(e))
for m in args:
    try:
        mod = importlib.import_module(m)
        out(m, "ok", os.path.dirname(getattr(mod, "__file__", "") or "?"))
    except BaseException as e:
        out(m, "error", why(e))
'
probe() { "$PY" "${PYF[@]}" -c "$probe_script" "$@" 2>/dev/null; }
PROBE="$SCRATCH/probe.tsv"
probe --env "$ROOT" $(modules_of | sort -u) > "$PROBE"
status_of() { awk -F'\t' -v m="$1" '$1 == m {print $2; exit}' "$PROBE"; }
detail_of() { awk -F'\t' -v m="$1" '$1 == m {print $3; exit}' "$PROBE"; }
if [ "$(status_of @torch)" != ok ]; then
  fatal "$PY cannot import torch and triton (this script never installs them): $(detail_of @torch)"
fi
log "python $PY: $(detail_of @torch)"
if [ $DRY = 0 ] && [ "$(status_of @cuda)" != ok ]; then
  fatal "no CUDA device visible to torch (use --dry-run on a CPU machine)"
fi

# ------------------------------------------------------------------------------------- 2. fasttrdpo + peers
here_ok() {  # fasttrdpo and its kernels subpackage import from this checkout
  "$PY" "${PYF[@]}" - "$ROOT" <<'EOF' >/dev/null 2>&1
import os, sys
import fasttrdpo, fasttrdpo.kernels.linear_logprobs
root = os.path.realpath(sys.argv[1])
files = (fasttrdpo.__file__, fasttrdpo.kernels.linear_logprobs.__file__)
sys.exit(0 if all(os.path.realpath(f).startswith(root + os.sep) for f in files) else 1)
EOF
}
if [ "$(status_of @here)" != ok ]; then
  # setup.py maps kernels/ -> fasttrdpo.kernels and csrc/ -> fasttrdpo.csrc: the same tree, by symlinks
  mkdir -p "$SITE/fasttrdpo"
  for f in "$ROOT"/fasttrdpo/*; do ln -s "$f" "$SITE/fasttrdpo/$(basename "$f")"; done
  ln -s "$ROOT/kernels" "$SITE/fasttrdpo/kernels"
  ln -s "$ROOT/csrc" "$SITE/fasttrdpo/csrc"
  here_ok || fatal "fasttrdpo from $ROOT does not import: $("$PY" "${PYF[@]}" -c 'import fasttrdpo.kernels' 2>&1 | tail -1)"
  log "fasttrdpo: imported from $ROOT through $SITE/fasttrdpo (symlinks; nothing installed)"
else
  log "fasttrdpo: already importable from $ROOT"
fi

to_install=()
while IFS='|' read -r name module prefixes; do
  [ "$(status_of "$module")" = ok ] && continue
  [ -n "$WHEELS" ] || continue
  own="${prefixes%% *}"
  for p in $prefixes; do
    if [ "$p" != "$own" ]; then dep="${p%-}"; [ "$(status_of "${dep//-/_}")" = ok ] && continue; fi
    for w in "$WHEELS"/"$p"*.whl; do
      [ -e "$w" ] || continue
      case " ${to_install[*]-} " in *" $w "*) ;; *) to_install+=("$w") ;; esac
    done
  done
done <<< "$PEERS"
if [ ${#to_install[@]} -gt 0 ]; then
  log "installing ${#to_install[@]} wheel(s) into $SITE (--no-deps --no-index): $(for w in "${to_install[@]}"; do basename "$w"; done | tr '\n' ' ')"
  "$PY" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --target "$SITE" "${to_install[@]}" \
    >>"$OUT/gpu_check.log" 2>&1 || log "pip install from $WHEELS failed (see above); continuing, the peers say why"
  # probe again the modules that did not import (one process), keeping the rest of the first probe
  probe $(awk -F'\t' '$2 != "ok" && $1 !~ /^@/ {print $1}' "$PROBE") > "$PROBE.2"
  awk -F'\t' '$2 == "ok" || $1 ~ /^@/' "$PROBE" > "$PROBE.1"
  cat "$PROBE.1" "$PROBE.2" > "$PROBE"
fi
PEERS_TSV="$SCRATCH/peers.tsv"
: > "$PEERS_TSV"
while IFS='|' read -r name module prefixes; do
  own="${prefixes%% *}"
  if [ "$(status_of "$module")" = ok ]; then
    case "$(detail_of "$module")" in "$SITE"*) how="installed from $WHEELS" ;; *) how="already importable" ;; esac
    ver="$("$PY" -c "import importlib.metadata as md; print(md.version('$name'))" 2>/dev/null || echo '?')"
    printf '%s\tok\t%s %s (%s)\n' "$name" "$name" "$ver" "$how" >> "$PEERS_TSV"
  elif [ -z "$WHEELS" ]; then
    printf '%s\tnot run\tnot importable here and no --wheels DIR given: %s\n' "$name" "$(detail_of "$module")" >> "$PEERS_TSV"
  elif ! ls "$WHEELS"/"$own"*.whl >/dev/null 2>&1; then
    printf '%s\tnot run\tnot importable here (%s) and no %s*.whl in %s\n' "$name" "$(detail_of "$module")" "$own" "$WHEELS" >> "$PEERS_TSV"
  else
    printf '%s\tnot run\tinstalled from %s but does not import: %s\n' "$name" "$WHEELS" "$(detail_of "$module")" >> "$PEERS_TSV"
  fi
done <<< "$PEERS"
while IFS=$'\t' read -r name st why; do log "peer $name: $st: $why"; done < "$PEERS_TSV"
SETUP_S=$(elapsed)

# ------------------------------------------------------------------------------------- 3. CUDA tests
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
T_TESTS=$(date +%s)
if [ $TESTS = 1 ]; then
  # (a session selecting -m gpu alone neither builds nor loads the C++ CPU extension at collection:
  # tests/helpers.backends() then looks the build up in the cache, see tests/conftest.py)
  log "pytest -m gpu over ${GPU_TESTS[*]} (timeout ${TESTS_TIMEOUT}s)"
  timeout -k 5 "$TESTS_TIMEOUT" "$PY" "${PYF[@]}" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$SCRATCH/pytest-gpu.xml" "${GPU_TESTS[@]}" >"$OUT/pytest-gpu.log" 2>&1
  TESTS_RC=$?
  log "tests: exit $TESTS_RC in $(( $(date +%s) - T_TESTS ))s: $(tail -1 "$OUT/pytest-gpu.log")"
else
  echo "not run: --no-tests" > "$OUT/pytest-gpu.log"
  TESTS_RC=-1
  log "tests: not run (--no-tests)"
fi
TESTS_S=$(( $(date +%s) - T_TESTS ))

# ------------------------------------------------------------------------------------- 4. benchmarks
LEFT=$(( BUDGET - $(elapsed) - 10 ))  # 10 s kept for the report
[ $LEFT -lt 20 ] && LEFT=20
BENCH_ARGS=(--gpu-check --budget-s "$LEFT" --json "$OUT/throughput.json" --no-plot)
[ $DRY = 1 ] && BENCH_ARGS+=(--dry-run --device cpu)
log "benchmarks/throughput.py ${BENCH_ARGS[*]}"
T_BENCH=$(date +%s)
timeout -k 5 $(( LEFT + 30 )) "$PY" benchmarks/throughput.py "${BENCH_ARGS[@]}" >"$OUT/throughput.log" 2>&1
BENCH_RC=$?
BENCH_S=$(( $(date +%s) - T_BENCH ))
grep '^\[throughput\]' "$OUT/throughput.log" | while read -r line; do log "$line"; done
log "benchmarks: exit $BENCH_RC in ${BENCH_S}s"

# ------------------------------------------------------------------------------------- 5. report
"$PY" benchmarks/gpu_report.py --out "$OUT" --scratch "$SCRATCH" --dry-run "$DRY" --tests-rc="$TESTS_RC" \
  --bench-rc "$BENCH_RC" --elapsed "setup=$SETUP_S" "tests=$TESTS_S" "benchmarks=$BENCH_S" \
  >>"$OUT/gpu_check.log" 2>&1
REPORT_RC=$?
log "report: exit $REPORT_RC; total $(elapsed)s; $OUT/gpu_check.md"
[ -f "$OUT/gpu_check.md" ] && cat "$OUT/gpu_check.md"
rm -rf "$SCRATCH"
if [ $REPORT_RC -ne 0 ] || [ $BENCH_RC -ne 0 ] || { [ $TESTS_RC -gt 0 ] && [ $TESTS_RC -ne 5 ]; }; then exit 1; fi
exit 0
