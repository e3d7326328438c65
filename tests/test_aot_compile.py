"""Ahead-of-time compilation of every Triton kernel at the configurations the library launches.

DESIGN.md §5: the compiled GPU path is checked on this CPU machine. A subprocess WITHOUT
TRITON_INTERPRET (tests/aot_worker.py) imports every module of `fasttrdpo.kernels` that defines
`aot_specs()`, compiles each spec for sm_80 and sm_90 (PTX + cubin), and reads registers and spill
bytes from the wheel's `ptxas -v`. Kernels whose spec says `no_spill` (the forward kernels at least)
must have zero spill stores and loads: a spill there is a real slowdown on every training step.
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


def _modules_defining_aot_specs() -> set[str]:
    """Independent discovery from the sources: which kernel files define a top-level aot_specs()."""
    found = set()
    for path in KERNELS.glob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "aot_specs" for n in tree.body):
            found.add(path.stem)
    return found


@pytest.fixture(scope="module")
def aot_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_worker.py"))],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=900)
    assert proc.returncode == 0, f"aot_worker failed:\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    # a readable table in the test log (pytest -s / -rA)
    for r in report["results"]:
        print(f"{r['module']:>16} {r['name']:<52} sm_{r['cc']}  regs={r['registers']} "
              f"spill={r['spill_stores']}/{r['spill_loads']}  {r['seconds']}s")
    return report


@pytest.mark.slow
def test_every_kernel_module_is_compiled(aot_report):
    expected = _modules_defining_aot_specs()
    assert "linear_logprobs" in expected
    assert set(aot_report["modules"]) == expected
    per_module = {m: 0 for m in expected}
    for r in aot_report["results"]:
        per_module[r["module"]] += 1
    empty = [m for m, n in per_module.items() if n == 0]
    assert not empty, f"aot_specs() returned nothing for {empty}"


@pytest.mark.slow
def test_all_specs_compile_for_sm80_and_sm90(aot_report):
    failed = [f"{r['module']}.{r['name']} sm_{r['cc']}: {r['error']}" for r in aot_report["results"] if not r["ok"]]
    assert not failed, "\n".join(failed)
    by_spec = {}
    for r in aot_report["results"]:
        by_spec.setdefault((r["module"], r["name"]), set()).add(r["cc"])
    assert all(ccs == {80, 90} for ccs in by_spec.values())
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
def test_forward_kernels_are_spill_checked(aot_report):
    """The lm_head forward (both models in one launch) and backward kernels are all held to zero spills."""
    ours = [r for r in aot_report["results"] if r["module"] == "linear_logprobs"]
    kinds = {r["name"].split("_")[2] for r in ours}  # fwd / bwd
    assert kinds == {"fwd", "bwd"}
    assert all(r["no_spill"] for r in ours)


def test_launch_configs_are_the_compiled_ones():
    """The launchers read their blocks/warps/stages from the same table aot_specs compiles."""
    from fasttrdpo.kernels import linear_logprobs as k

    for spec in k.aot_specs():
        kernel = spec["name"].split("_")[2]
        kernel = "fwd" if kernel == "fwd" else ("bwd_" + spec["name"].split("_")[3])
        dot = spec["constexprs"]["P_DOT" if kernel == "fwd" else "DOT"]
        cfg = k.launch_config(kernel, dot)
        assert {n: spec["constexprs"][n] for n in ("BLOCK_N", "BLOCK_V", "BLOCK_H")} == \
            {n: cfg[n] for n in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}
        assert (spec["num_warps"], spec["num_stages"]) == (cfg["num_warps"], cfg["num_stages"])
