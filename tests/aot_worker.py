"""Ahead-of-time compile every kernel configuration the library launches (run by test_aot_compile.py).

Must run WITHOUT TRITON_INTERPRET (under the interpreter `@triton.jit` yields objects the compiler does
not take). For every module of `fasttrdpo.kernels` that defines `aot_specs()`, each spec is compiled
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` for cc 80 and 90, and the PTX
is assembled by the wheel's ptxas (`-v`) to read registers and spill bytes.

Spec keys (COMMON rules): name, fn, signature, constexprs, num_warps, num_stages, no_spill; optional
`divisible_by_16`: argument names the JIT sees as multiples of 16 at the library's launches (aligned
pointers, strides) — passed as `tt.divisibility` attributes, exactly as the JIT specialises them;
optional `ccs`: the architectures the spec is launched on (a per-architecture config list; default
80 and 90); optional `expect_wgmma`: the spec's dots must lower to Hopper `wgmma` (read from the PTX).

Prints one JSON object: {"triton": version, "modules": [...], "results": [{module, name, cc, ok, error,
registers, spill_stores, spill_loads, shared, wgmma, expect_wgmma, no_spill, seconds}, ...]}.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

CCS = (80, 90)


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _spec_modules():
    import fasttrdpo.kernels as pkg

    out = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"fasttrdpo.kernels.{info.name}")
        if callable(getattr(mod, "aot_specs", None)):
            out.append(info.name)
    return out


def _compile_one(job):
    module, index, cc = job
    import triton
    from triton.backends.compiler import GPUTarget

    spec = importlib.import_module(f"fasttrdpo.kernels.{module}").aot_specs()[index]
    res = {"module": module, "name": spec["name"], "cc": cc, "no_spill": bool(spec["no_spill"]),
           "num_warps": spec["num_warps"], "num_stages": spec["num_stages"], "ok": False, "error": None,
           "registers": None, "spill_stores": None, "spill_loads": None, "shared": None, "wgmma": None,
           "expect_wgmma": bool(spec.get("expect_wgmma", False))}
    t0 = time.time()
    try:
        fn = spec["fn"]
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.get("divisible_by_16", ())}
        src = triton.compiler.ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                                        attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        arch = "sm_90a" if cc == 90 else f"sm_{cc}"
        with tempfile.TemporaryDirectory() as d:
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            proc = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(d, "k.cubin")],
                                  capture_output=True, text=True)
        report = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed: {report[-2000:]}")
        regs = re.findall(r"Used (\d+) registers", report)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        if len(regs) != 1 or len(spills) != 1:
            raise RuntimeError(f"unexpected ptxas report: {report[-2000:]}")
        # wgmma instructions in the PTX (Hopper tensor-core MMA; sm_80 has none)
        wgmma = len(re.findall(r"\bwgmma\.mma_async", compiled.asm["ptx"]))
        res.update(ok=True, registers=int(regs[0]), spill_stores=int(spills[0][0]), spill_loads=int(spills[0][1]),
                   shared=int(compiled.metadata.shared), wgmma=wgmma)
    except Exception as e:  # reported, the test fails on it
        res["error"] = f"{type(e).__name__}: {e}"[:4000]
    res["seconds"] = round(time.time() - t0, 2)
    return res


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_worker: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    modules = _spec_modules()
    jobs = []
    for module in modules:
        specs = importlib.import_module(f"fasttrdpo.kernels.{module}").aot_specs()
        jobs += [(module, i, cc) for i, spec in enumerate(specs) for cc in spec.get("ccs", CCS)]
    workers = int(os.environ.get("AOT_WORKERS", "2"))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_compile_one, jobs))
    import triton

    json.dump({"triton": triton.__version__, "modules": modules, "results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
