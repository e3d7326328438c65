"""Ahead-of-time compilation of every Triton kernel at the configurations the library launches.

DESIGN.md §5: the compiled GPU path is checked on this CPU machine. A subprocess WITHOUT
TRITON_INTERPRET (tests/aot_worker.py) imports every module of `fasttrdpo.kernels` that defines
`aot_specs()`, compiles each spec for its architectures (sm_80 and sm_90 unless the spec names its
own: per-architecture config lists), and reads registers and spill bytes from the wheel's
`ptxas -v`, the shared memory from the compiled metadata and the `wgmma` instructions from the PTX.

It runs twice: under the pinned triton of this environment, and under triton 3.6.0 (what CUDA images
with torch 2.11 ship), from a second small environment that `scripts/triton36_venv.sh` builds on
demand (only triton; torch and the package come from this environment). If that environment cannot
be built the test FAILS: the 3.6 check is never silently skipped.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
TRITON_36 = "3.6.0"
# Largest shared memory one block may use (opt-in): A100 163 KB, H100/H200 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _modules_defining_aot_specs() -> set[str]:
    """Independent discovery from the sources: which kernel files define a top-level aot_specs()."""
    found = set()
    for path in KERNELS.glob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "aot_specs" for n in tree.body):
            found.add(path.stem)
    return found


def _triton36_python() -> str:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "triton36_venv.sh"), sys.executable],
                          capture_output=True, text=True, cwd=str(REPO), timeout=900)
    assert proc.returncode == 0, f"could not build the triton {TRITON_36} environment:\n{proc.stderr[-4000:]}"
    return str(REPO / proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def aot_reports():
    """{"pinned": report, "3.6": report}; both workers run at once (each with AOT_WORKERS processes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    worker = str(Path(__file__).with_name("aot_worker.py"))
    pythons = {"pinned": sys.executable, "3.6": _triton36_python()}
    procs = {tag: subprocess.Popen([py, worker], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env, cwd=str(REPO))
             for tag, py in pythons.items()}
    reports = {}
    for tag, proc in procs.items():
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"aot_worker ({tag}) failed:\n{err[-4000:]}"
        reports[tag] = json.loads(out)
    assert reports["3.6"]["triton"] == TRITON_36
    for tag, report in reports.items():  # a readable table in the test log (pytest -s / -rA)
        for r in report["results"]:
            print(f"triton {report['triton']:>6} {r['module']:>16} {r['name']:<62} sm_{r['cc']}  "
                  f"regs={r['registers']} spill={r['spill_stores']}/{r['spill_loads']} smem={r['shared']} "
                  f"wgmma={r['wgmma']}  {r['seconds']}s")
    return reports


@pytest.fixture(params=["pinned", "3.6"])
def aot_report(request, aot_reports):
    return aot_reports[request.param]


@pytest.mark.slow
def test_every_kernel_module_is_compiled(aot_report):
    expected = _modules_defining_aot_specs()
    assert {"linear_logprobs", "token_logprobs", "blend"} <= expected
    assert set(aot_report["modules"]) == expected
    per_module = {m: 0 for m in expected}
    for r in aot_report["results"]:
        per_module[r["module"]] += 1
    empty = [m for m, n in per_module.items() if n == 0]
    assert not empty, f"aot_specs() returned nothing for {empty}"


@pytest.mark.slow
def test_all_specs_compile_for_their_architectures(aot_report):
    failed = [f"{r['module']}.{r['name']} sm_{r['cc']}: {r['error']}" for r in aot_report["results"] if not r["ok"]]
    assert not failed, "\n".join(failed)
    by_module_cc = {}
    for r in aot_report["results"]:
        by_module_cc.setdefault(r["module"], set()).add(r["cc"])
    assert all(ccs == {80, 90} for ccs in by_module_cc.values())  # every module builds for both
    # ptxas reports a real register allocation for every kernel (at most 255 per thread)
    assert all(1 <= r["registers"] <= 255 for r in aot_report["results"])


@pytest.mark.slow
def test_no_spills_where_required(aot_report):
    spilling = [f"{r['module']}.{r['name']} sm_{r['cc']}: {r['spill_stores']} B stores, "
                f"{r['spill_loads']} B loads ({r['registers']} regs)"
                for r in aot_report["results"]
                if r["ok"] and r["no_spill"] and (r["spill_stores"] or r["spill_loads"])]
    assert not spilling, "\n".join(spilling)


@pytest.mark.slow
def test_shared_memory_fits_each_architecture(aot_report):
    over = [f"{r['module']}.{r['name']} sm_{r['cc']}: {r['shared']} B > {SHARED_LIMIT[r['cc']]} B"
            for r in aot_report["results"] if r["ok"] and r["shared"] > SHARED_LIMIT[r["cc"]]]
    assert not over, "\n".join(over)
    # the sm_90 list really uses the larger shared memory (a 4-stage 128 x 128 x 64 tile: 128 KB > 99 KB)
    ours = [r for r in aot_report["results"] if r["module"] == "linear_logprobs" and r["cc"] == 90]
    assert max(r["shared"] for r in ours) > 99 * 1024


@pytest.mark.slow
def test_half_dots_lower_to_wgmma_on_sm90(aot_report):
    """The bf16 and fp16 lm_head tiles run on Hopper's warpgroup MMA, read from the PTX."""
    ours = [r for r in aot_report["results"] if r["module"] == "linear_logprobs"]
    expected = [r for r in ours if r["expect_wgmma"]]
    for dtype in ("bf16", "fp16"):
        for kernel in ("partial", "dz"):  # forward tiles and backward tiles, every config
            hits = [r for r in expected if r["name"].startswith(f"linear_logprobs_{kernel}_{dtype}_")]
            assert hits and all(r["cc"] == 90 for r in hits), (kernel, dtype)
    missing = [f"{r['name']} sm_{r['cc']}" for r in expected if not r["wgmma"]]
    assert not missing, "no wgmma in the PTX of:\n" + "\n".join(missing)
    # sm_80 has no wgmma: the PTX reader does not find one everywhere
    assert all(r["wgmma"] == 0 for r in ours if r["cc"] == 80)


@pytest.mark.slow
def test_lm_head_kernels_are_spill_checked(aot_report):
    """The lm_head forward (tiles + merge) and backward tile kernels are all held to zero spills."""
    ours = [r for r in aot_report["results"] if r["module"] == "linear_logprobs"]
    kinds = {r["name"].split("_")[2] for r in ours}
    assert kinds == {"partial", "merge", "dz"}
    assert all(r["no_spill"] for r in ours)


def test_launch_configs_are_the_compiled_ones():
    """The launchers autotune over exactly the per-architecture lists that aot_specs compiles."""
    from fasttrdpo.kernels import linear_logprobs as k

    keys = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "GROUP_N")
    for cc in k.CONFIGS:
        for dot in (k.DOT_FP32, k.DOT_BF16, k.DOT_FP16):
            launched = {tuple(c[n] for n in keys) + (c["num_warps"], c["num_stages"])
                        for c in k.config_list(cc, dot)}
            for kernel in ("partial", "dz"):
                compiled = {tuple(s["constexprs"][n] for n in keys) + (s["num_warps"], s["num_stages"])
                            for s in k.aot_specs()
                            if s["name"].startswith(f"linear_logprobs_{kernel}_")
                            and s["ccs"] == [cc] and s["constexprs"]["DOT"] == dot}
                assert compiled == launched, (cc, dot, kernel)
                assert all(s["constexprs"]["NUM_STAGES"] == s["num_stages"] for s in k.aot_specs()
                           if s["name"].startswith(f"linear_logprobs_{kernel}_"))
    # devices of another capability take the nearest lower list (sm_86/89 -> sm_80, sm_100 -> sm_90)
    assert k.config_list(86, k.DOT_BF16) == k.config_list(80, k.DOT_BF16)
    assert k.config_list(100, k.DOT_BF16) == k.config_list(90, k.DOT_BF16)
    # one BLOCK_V per list (the forward's partial buffers are sized by it)
    assert all(len({c["BLOCK_V"] for c in lst}) == 1 for lists in k.CONFIGS.values() for lst in lists.values())
