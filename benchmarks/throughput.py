"""Side-by-side throughput and memory of fasttrdpo against TRL, Liger and plain PyTorch.

    python benchmarks/throughput.py            # full run on the default device (CUDA if present)
    python benchmarks/throughput.py --quick    # sub-minute CPU run on tiny shapes (fewer repeats)
    python benchmarks/throughput.py --json benchmarks/results/cpu-2026-11-25.json --plot out.png
    python benchmarks/throughput.py --gpu-check --budget-s 200 --json out/throughput.json --md out/throughput.md
    python benchmarks/throughput.py --gpu-check --dry-run ...   # the same plan at tiny shapes (CPU plumbing;
                                                                # each implementation measured once)

Cases (see benchmarks/_cases.py and _e2e.py):
  loss_step    paired policy+reference log-probs at the lm_head level + sigmoid DPO loss, fwd+bwd
  lmhead_op    the per-token lm_head op alone (issue 2's memory figure) vs log_softmax(h @ W.T).gather
  logits_step  paired log-probs from logits + DPO loss, fwd+bwd
  blend        reference update over real models' parameter lists
  e2e          whole training steps: fasttrdpo trainer vs TRL's DPOTrainer(sync_ref_model=True)
  e2e_hh       whole training steps on real Anthropic-HH pairs (4k BPE trained on the file, max length 512,
               Pythia-70M shape): TRL's DPOTrainer, the padded TRDPOTrainer, packed and shared-prompt variants,
               in --e2e-rounds interleaved rounds (the machine may be shared: each round's ratios stand alone)

--gpu-check (what scripts/gpu_check.sh runs): issue 11's GPU primary shapes only: the loss step at N=16k,
H=4096, V=128256 bf16 with 60 % and 100 % valid rows (TRDPOLoss, the generic op, TRL's chunked path,
Liger's LigerFusedLinearDPOLoss, Apple's CCE, and the same cuBLAS GEMMs alone as the reachable roof), the
lm_head op forward against its GEMM, and the blend of the whole Llama-8B list against a same-run copy_
(blend_ with check_finite=False, the target's row, and with the default check_finite=True).
Repeats come from the traffic model (benchmarks/traffic.py) so the run fits --budget-s; what would not
fit is reported as not run, with the estimate. Each row carries the model's predicted time.

Every (case, shape, implementation) runs in its own child process (forked from a zygote that has only
imported the libraries): warm-up, then the median of the timed runs; peak memory is the growth over the
inputs in that process (RSS on CPU, the CUDA allocator on GPU). Ratios are to the best TRL path of the
same run (the faster / leaner of `trl` and `trl-chunked`). Implementations that cannot run are listed
as skipped with the reason.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

SCHEMA = "fasttrdpo-throughput/1"
MB = 1024 * 1024
# memory ratios need a baseline well above the RSS noise of a process (page-cache, allocator slack)
MIN_RATIO_BASE = 16 * MB

# Numerics agreement between implementations of one case and shape (all fp32 here): outputs are sums
# over up to V (lse) and H (matmul) fp32 terms taken in different orders; the worst-case bound for such
# a sum is ~n·eps_fp32·Σ|terms| (n=32000 -> 4e-3 of the magnitude), the typical error √n·eps (2e-5).
# 1e-3 of each quantity's scale sits between the two: a real bug (a missing term, a wrong sign, a
# gradient off by a factor) shows up as O(1e-2..1) and is caught.
NUMERICS_RTOL = 1e-3
# e2e cases: first-step losses of trainers doing the same fp32 computation (same weights, same tokens) differ by
# summation order only: measured 3.4e-6 (shared vs padded, HH), 4.4e-6 (TRL vs padded, HH), 9.7e-6 (the HH smoke
# shape), 1.2e-5 (e2e). One of them in bf16 autocast (TRL's default) differs by 1.8e-4 (smoke) to 2.4e-3 (HH).
# Not a derived worst case but a separator placed between the two measured populations, ~4x from each: 5e-5.
E2E_LOSS_RTOL = 5e-5
# bf16 shapes (the GPU check): gradients are stored in bf16 (0.5 ulp = 2^-9 relative) and an implementation
# may hold the logits in a bf16 tile, which moves each logit by <= 2^-9·|z| and so each softmax term by a
# relative ~2^-9·max|z| (logits here have std 2, max|z| over 128k columns ~ 9: 1.8e-2); with the output
# rounding that is ~2e-2. 3e-2 leaves room above it; a real bug (missing term, wrong sign, a factor) is O(1e-1..1).
NUMERICS_RTOL_BF16 = 3e-2
# blend: the formula's two operands and its result are bounded by M = max(|ref|, |policy|); each bf16
# rounding errs by <= 0.5 ulp(M), and the worst implementation (mul_ then add_) rounds twice: <= 1 ulp(M)
# (the fp32 intermediate error is 2^-16 of that).
BLEND_MAX_ULPS = 1.0 + 1e-3


# ============================================================================================ plan
def _pythia14m_shape(quick):
    if quick:
        return {"model": "tiny", "hidden": 32, "layers": 2, "vocab": 384, "pairs": 2, "prompt_chars": 24,
                "completion_chars": 16, "sync_steps": 2}
    return {"model": "pythia-14m", "hidden": 128, "layers": 6, "vocab": 50304, "pairs": 4, "prompt_chars": 120,
            "completion_chars": 100, "sync_steps": 2}


def _hh_shape(quick, steps, rnd):
    """Issue 15's end-to-end setting: Pythia-70M's shape (hidden 512, 6 layers, 8 heads, vocab 50304; the
    BPE's 4096 ids are a subset), 8 HH pairs a step, max length 512, tau = 2."""
    if quick:
        return {"model": "tiny", "data": "hh", "tokenizer": "hh-bpe", "bpe_vocab": 4096, "hidden": 32, "layers": 2,
                "heads": 4, "vocab": 4096, "pairs": 2, "max_length": 256, "steps": steps, "sync_steps": 2,
                "round": rnd}
    return {"model": "pythia-70m", "data": "hh", "tokenizer": "hh-bpe", "bpe_vocab": 4096, "hidden": 512,
            "layers": 6, "heads": 8, "vocab": 50304, "pairs": 8, "max_length": 512, "steps": steps, "sync_steps": 2,
            "round": rnd}


E2E_HH_IMPLS = ("fasttrdpo", "fasttrdpo-shared", "fasttrdpo-packed", "trl-dpotrainer")


def plan(args, device_type):
    """The (case, shapes, implementations) this run measures."""
    from _cases import CASES, param_list

    if getattr(args, "gpu_check", False):
        return plan_gpu_check(args, device_type)
    quick = args.quick
    cuda = device_type == "cuda"
    if quick:
        loss_shapes = [dict(pairs=2, seq=64, hidden=64, vocab=v) for v in (500, 2000)]
        op_shapes = [dict(tokens=256, hidden=64, vocab=2000)]
        logit_shapes = [dict(pairs=2, seq=64, vocab=2000)]
        blend_lists = [("pythia-160m", 0.0625)]
    elif cuda:
        loss_shapes = [dict(pairs=8, seq=1024, hidden=4096, vocab=v) for v in (32000, 64000, 128256)]
        op_shapes = [dict(tokens=16384, hidden=4096, vocab=128256)]
        logit_shapes = [dict(pairs=8, seq=1024, vocab=128256)]
        blend_lists = [("pythia-160m", 1.0), ("pythia-2.8b-layers", 1.0), ("llama-8b-layers", 1.0)]
    else:
        # the CPU target N=4096 (8 pairs x 2 rows x 256), H=512, V=32000, plus smaller V for the plot
        loss_shapes = [dict(pairs=8, seq=256, hidden=512, vocab=v) for v in (8000, 16000, 32000)]
        op_shapes = [dict(tokens=4096, hidden=256, vocab=32000)]  # issue 2's memory figure
        logit_shapes = [dict(pairs=8, seq=256, vocab=32000)]
        # Pythia-160M at full size (148 tensors, 162M elements); the big models' layers at 1/4 width
        blend_lists = [("pythia-160m", 1.0), ("pythia-2.8b-layers", 0.25), ("llama-8b-layers", 0.25)]
    blend_shapes = []
    for name, scale in blend_lists:
        shapes = [list(s) for s in param_list(name, scale)]
        for pdt, rdt in (("fp32", "bf16"), ("bf16", "bf16")):
            blend_shapes.append(dict(params=name, scale=scale, tensors=len(shapes),
                                     elements=sum(math.prod(s) for s in shapes), policy_dtype=pdt, ref_dtype=rdt,
                                     shapes=shapes))
    out = [
        ("loss_step", loss_shapes, CASES["loss_step"].IMPLS),
        ("lmhead_op", op_shapes, CASES["lmhead_op"].IMPLS),
        ("logits_step", logit_shapes, CASES["logits_step"].IMPLS),
        ("blend", blend_shapes, CASES["blend"].IMPLS),
        ("e2e", [_pythia14m_shape(quick)], ("trl-dpotrainer", "fasttrdpo")),
    ]
    steps = args.warmup + args.repeats
    if not quick or "e2e_hh" in (args.cases or "").split(","):  # --quick runs it only when named (BPE + 4 trainers)
        out += [("e2e_hh", [_hh_shape(quick, steps, k + 1)], E2E_HH_IMPLS) for k in range(args.e2e_rounds)]
    if args.cases:
        wanted = set(args.cases.split(","))
        out = [c for c in out if c[0] in wanted]
    tasks, skipped = [], []
    for case, shapes, impls in out:
        for shape in shapes:
            for impl in impls:
                if args.impls and impl not in args.impls.split(","):
                    continue
                task = dict(case=case, impl=impl, shape=shape, device=args.device_str, seed=args.seed,
                            warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                            order=len(tasks) + len(skipped))
                if quick and impl == "liger-compiled":
                    skipped.append(dict(task, status="skipped",
                                        reason="not run in --quick: torch.compile's first call takes ~12 s on CPU"))
                    continue
                tasks.append(task)
    # the measurements the issue's targets use run first: a run cut short still has them (e2e_hh: every round of
    # fasttrdpo's layouts, whose ratios are the targets, before TRL's DPOTrainer, the slowest)
    tasks.sort(key=lambda t: (0 if _primary(t, cuda) else 1,
                              t["case"] == "e2e_hh" and t["impl"] == "trl-dpotrainer"))
    if args.part != "all":
        keep = args.part == "primary"
        tasks = [t for t in tasks if _primary(t, cuda) == keep]
        skipped = [t for t in skipped if _primary(t, cuda) == keep]
    return tasks, skipped


def _primary(task, cuda):
    s = task["shape"]
    if task["case"] == "loss_step":
        return s["vocab"] == (128256 if cuda else 32000)
    if task["case"] == "blend":
        return s["params"] == "pythia-160m"
    if task["case"] == "logits_step":  # issue 7's C++-vs-eager target on CPU
        return not cuda
    return task["case"] in ("lmhead_op", "e2e", "e2e_hh")


# ============================================================================================ GPU check plan
# in the order they run: what the issue's targets need first (our loss step, its roof, TRL's chunked
# path, Liger's default compiled loss, CCE), then the secondary rows (Liger eager, the generic op)
GPU_LOSS_PRIMARY = ("gemm-chain", "fasttrdpo-auto", "trl-chunked", "liger-compiled", "cce")
GPU_LOSS_SECONDARY = ("liger", "fasttrdpo-op-auto")
GPU_LOSS_IMPLS = GPU_LOSS_PRIMARY + GPU_LOSS_SECONDARY
GPU_OP_IMPLS = ("gemm", "fasttrdpo-auto", "cce", "naive")
# blend_ twice: check_finite=False (the blend alone: the issue's >= 0.9 of copy_ is stated against it) and the
# default check_finite=True (a separate, documented safety pass that reads the policy once more)
GPU_BLEND_IMPLS = ("fasttrdpo-auto-unchecked", "fasttrdpo-auto", "trl-loop", "foreach-lerp")
# the traffic model's implementation for each measured one (the TRDPOLoss row: the issue's fp32-tile design;
# the generic op: kernels/linear_logprobs.py as retiled for issue 11 item 2)
MODEL_IMPL = {
    "loss_step": {"gemm-chain": "gemm-chain", "fasttrdpo-auto": "fasttrdpo-cuda (tile fp32)",
                  "fasttrdpo-triton": "fasttrdpo-cuda (tile fp32)", "trl-chunked": "trl-chunked", "liger": "liger",
                  "liger-compiled": "liger-compiled", "cce": "cce", "fasttrdpo-op-auto": "linear-retiled"},
    "lmhead_op": {"gemm": "gemm", "fasttrdpo-auto": "retiled", "naive": "naive", "cce": "cce"},
    "blend": {"fasttrdpo-auto": "fasttrdpo (check_finite=True)",
              "fasttrdpo-auto-unchecked": "fasttrdpo (check_finite=False)", "trl-loop": "trl-loop",
              "foreach-lerp": "foreach-lerp"},
}
# --dry-run proves the plumbing with each (case, implementation) measured once, at its first shape in the
# plan; these also run at every shape (our own paths: TRDPOLoss at both valid fractions is checked against
# float64 by tests/test_gpu_check_dryrun.py, and its GEMM roof; the blend targets' rows at both policy dtypes)
DRY_RUN_EVERY_SHAPE = {("loss_step", "fasttrdpo-auto"), ("loss_step", "gemm-chain"),
                       ("blend", "fasttrdpo-auto-unchecked"), ("blend", "fasttrdpo-auto")}
# seconds a child spends besides the timed steps: process, CUDA context, inputs (CPU dry run: ~1 s),
# plus a first-call cost (compilation, autotuning) for the implementations that have one
CHILD_OVERHEAD_S = {"cuda": 3.0, "cpu": 1.5}
# the first measurement of an implementation compiles (Triton, inductor) or autotunes (CCE); later ones
# find the kernels in the on-disk caches and pay FIRST_CALL_REPEAT of it
FIRST_CALL_S = {"cuda": {"liger-compiled": 45.0, "cce": 20.0, "fasttrdpo-auto": 10.0, "fasttrdpo-op-auto": 10.0},
                "cpu": {"liger-compiled": 15.0}}
FIRST_CALL_REPEAT = 0.25
# the roofline time is a floor: the measured step is planned at this multiple of it
MODEL_SLACK = 2.0
TIMED_S_PER_MEASUREMENT = 1.5  # repeats are chosen so the timed runs take about this long


def gpu_check_shapes(dry_run: bool):
    """(loss shapes, lm_head op shapes, blend shapes) of the GPU check; tiny ones for --dry-run."""
    from _cases import param_list

    if dry_run:
        base = dict(pairs=2, seq=32, hidden=64, vocab=1000, dtype="bf16")
        op = dict(tokens=256, hidden=64, vocab=1000, dtype="bf16", fwd_only=True)
        scale = 1 / 128  # the smallest width with one KV head per 32 heads (hidden // 32 * 8 >= 1)
    else:
        base = dict(pairs=8, seq=1024, hidden=4096, vocab=128256, dtype="bf16")
        op = dict(tokens=16384, hidden=4096, vocab=128256, dtype="bf16", fwd_only=True)
        scale = 1.0
    loss = [dict(base, valid=v) for v in (0.6, 1.0)]
    shapes = [list(x) for x in param_list("llama-8b", scale)]
    blend = [dict(params="llama-8b", scale=scale, tensors=len(shapes), elements=sum(math.prod(x) for x in shapes),
                  policy_dtype=pdt, ref_dtype="bf16", shapes=shapes) for pdt in ("fp32", "bf16")]
    return loss, [op], blend


def model_prediction(case, impl, shape):
    """The traffic model's serial time (s) of this measurement on H100, H200 and the H200's reachable roof,
    or None where the model has no such implementation."""
    import traffic

    name = MODEL_IMPL.get(case, {}).get(impl)
    if name is None:
        return None
    if case == "loss_step":
        models = traffic.loss_step_models(dict(shape, valid=shape.get("valid", 1.0)))
    elif case == "lmhead_op":
        models = traffic.lmhead_fwd_models(shape)
    elif case == "blend":
        models = traffic.blend_models(shape["policy_dtype"], shape["ref_dtype"], elements=shape["elements"])
    else:
        return None
    m = next((m for m in models if m.impl == name), None)
    if m is None:
        return None
    return {"model_impl": name, "bytes": m.bytes, "flops": m.flops,
            "serial_s": {g: m.serial_s(r) for g, r in traffic.ROOFS.items()},
            "roofline_s": {g: m.roofline_s(r) for g, r in traffic.ROOFS.items()}}


def plan_gpu_check(args, device_type):
    """Issue 11's GPU check: the primary GPU shapes, repeats sized from the traffic model."""
    loss, ops, blends = gpu_check_shapes(args.dry_run)
    order = []  # what the issue's targets need first: the 60 % loss step, the blend, the op, 100 %, the rest
    order += [("loss_step", loss[0], i) for i in GPU_LOSS_PRIMARY]
    order += [("blend", b, i) for b in blends for i in GPU_BLEND_IMPLS]
    order += [("lmhead_op", o, i) for o in ops for i in GPU_OP_IMPLS]
    order += [("loss_step", loss[1], i) for i in GPU_LOSS_PRIMARY]
    order += [("loss_step", x, i) for x in loss for i in GPU_LOSS_SECONDARY]
    if args.cases:
        wanted = set(args.cases.split(","))
        order = [t for t in order if t[0] in wanted]
    if args.impls:
        wanted = set(args.impls.split(","))
        order = [t for t in order if t[2] in wanted]
    kind = "cuda" if device_type == "cuda" else "cpu"
    tasks, skipped, seen = [], [], set()
    first_shape = {}
    for i, (case, shape, impl) in enumerate(order):
        task = dict(case=case, impl=impl, shape=shape, device=args.device_str, seed=args.seed, warmup=args.warmup,
                    repeats=args.repeats, threads=args.threads, order=i, part=case)
        pred = model_prediction(case, impl, shape)
        step = None
        if kind == "cuda" and pred is not None:
            step = MODEL_SLACK * pred["serial_s"]["H200-reachable"]
        elif kind == "cpu":
            step = 0.05  # tiny shapes
        if args.repeats_auto:
            if args.dry_run:  # plumbing only: one timed run after the warm-up
                task["repeats"] = 1
            else:
                task["repeats"] = 3 if step is None else int(min(10, max(3, round(TIMED_S_PER_MEASUREMENT / step))))
        first = FIRST_CALL_S[kind].get(impl, 0.0) * (FIRST_CALL_REPEAT if (case, impl) in seen else 1.0)
        seen.add((case, impl))
        task["estimate_s"] = (CHILD_OVERHEAD_S[kind] + first
                              + (task["warmup"] + task["repeats"]) * (step if step is not None else 1.0))
        if args.dry_run and impl == "liger-compiled":
            skipped.append(dict(task, status="skipped", model=pred,
                                reason="skipped by --dry-run: torch.compile's first call takes ~12 s on CPU"))
            continue
        if args.dry_run and (case, impl) in first_shape and (case, impl) not in DRY_RUN_EVERY_SHAPE:
            skipped.append(dict(task, status="skipped", model=pred,
                                reason="skipped by --dry-run: each implementation is measured once, at "
                                       + first_shape[(case, impl)]))
            continue
        first_shape.setdefault((case, impl), _shape_str(case, shape))
        tasks.append(task)
    return tasks, skipped


# ============================================================================================ running
def _child(conn, task):
    import gc

    from _cases import run_task

    # what the zygote imported is never garbage: frozen, the gc.collect() calls around the measurement
    # scan only this child's own objects (~0.2 s saved per call with trl/transformers imported)
    gc.freeze()
    try:
        conn.send(run_task(task))
    finally:
        conn.close()


def run_isolated(ctx, task, timeout):
    """One task in a fresh child process; a crash or a timeout is reported as an error."""
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, task))
    p.start()
    child.close()
    res = None
    try:
        if parent.poll(timeout):
            res = parent.recv()
    except EOFError:
        res = None
    p.join(5 if res is not None else 0.1)
    if p.is_alive():
        p.kill()
        p.join()
    if res is None:
        why = f"timed out after {timeout:.0f} s" if p.exitcode in (None, -9) else f"child exited with {p.exitcode}"
        res = {k: task[k] for k in ("case", "impl", "shape")}
        res.update(status="error", reason=why)
    return res


def _versions():
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for name in ("torch", "triton", "trl", "liger-kernel", "cut-cross-entropy", "transformers", "numpy", "fasttrdpo"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    return v


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# Dense peaks (TFLOP/s fp32 SIMT / tf32 / bf16, and HBM TB/s) from the vendors' datasheets
DEVICE_PEAKS = {
    "H100 80GB HBM3": {"fp32_tflops": 67.0, "tf32_tflops": 494.7, "bf16_tflops": 989.4, "hbm_tbps": 3.35},
    "H100 PCIe": {"fp32_tflops": 51.2, "tf32_tflops": 378.0, "bf16_tflops": 756.0, "hbm_tbps": 2.0},
    "H200": {"fp32_tflops": 67.0, "tf32_tflops": 494.7, "bf16_tflops": 989.4, "hbm_tbps": 4.8},
}


def device_info(device_str):
    import torch

    info = {"device": device_str, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if device_str.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        info.update(device_name=name, cuda=torch.version.cuda,
                    peaks=next((v for k, v in DEVICE_PEAKS.items() if k in name), None))
    else:
        info.update(device_name=info["cpu_model"])
    return info


# ============================================================================================ analysis
def _key(r):
    return r["case"], json.dumps({k: v for k, v in r["shape"].items() if k != "shapes"}, sort_keys=True)


def _rel(a, b, scale):
    return abs(a - b) / scale if scale > 0 else abs(a - b)


def compare_numerics(ref: dict, other: dict) -> float:
    """Largest difference between two implementations' numerics, relative to each quantity's scale."""
    worst = 0.0
    for k, rv in ref.items():
        ov = other.get(k)
        if ov is None or rv is None:
            continue
        if isinstance(rv, dict):  # gradient summary: norm and the sampled entries (sums cancel: skipped)
            worst = max(worst, _rel(rv["norm"], ov["norm"], abs(rv["norm"])))
            scale = max((abs(x) for x in rv["sample"]), default=0.0)
            worst = max([worst] + [_rel(a, b, scale) for a, b in zip(rv["sample"], ov["sample"])])
        elif isinstance(rv, list):
            if len(rv) != len(ov):
                return math.inf
            scale = max((abs(x) for x in rv), default=0.0)
            worst = max([worst] + [_rel(a, b, scale) for a, b in zip(rv, ov)])
        elif isinstance(rv, (int, float)):
            worst = max(worst, _rel(rv, ov, max(abs(rv), 1e-6)))
    return worst


# the implementation every other one is compared with: the first of these that was measured
_NUMERICS_REFERENCE = {"loss_step": ("naive", "trl-chunked", "liger", "fasttrdpo-eager", "fasttrdpo-auto"),
                       "lmhead_op": ("naive",), "logits_step": ("naive",)}


def analyse(results):
    """Ratios to the best TRL path, agreement of the numerics, per (case, shape)."""
    from _cases import CASES

    groups = {}
    for r in results:
        groups.setdefault(_key(r), []).append(r)
    for (case, _), rows in groups.items():
        ok = {r["impl"]: r for r in rows if r.get("status") == "ok"}
        baselines = CASES[case].BASELINES if case in CASES else ("trl-dpotrainer",)
        base_ok = [ok[b] for b in baselines if b in ok]
        metric = "tokens_per_s" if case in E2E_CASES else "median_s"
        best_t = None
        if base_ok:
            if case in E2E_CASES:
                best_t = max(b[metric] for b in base_ok)
            else:
                best_t = min(b[metric] for b in base_ok)
        mems = [b["peak_growth_bytes"] for b in base_ok if b.get("peak_growth_bytes") is not None]
        best_m = min(mems) if mems else None
        for r in rows:
            r["baseline"] = {"impls": list(baselines), "measured": [b["impl"] for b in base_ok]}
            if r.get("status") != "ok":
                continue
            rat = {}
            if best_t:
                if case in E2E_CASES:  # throughput ratio (> 1 is faster), and the step-time ratio beside it
                    rat["tokens_per_s_vs_trl"] = r[metric] / best_t
                    rat["time_vs_best_trl"] = r["median_s"] / min(b["median_s"] for b in base_ok)
                else:  # < 1 is faster
                    rat["time_vs_best_trl"] = r[metric] / best_t
            if case == "e2e_hh" and "fasttrdpo" in ok and r["impl"] != "fasttrdpo":
                # issue 15: the padding-free layouts against today's padded trainer of the same run
                rat["tokens_per_s_vs_padded"] = r["tokens_per_s"] / ok["fasttrdpo"]["tokens_per_s"]
            if best_m is not None and best_m >= MIN_RATIO_BASE and r.get("peak_growth_bytes") is not None:
                rat["mem_vs_best_trl"] = r["peak_growth_bytes"] / best_m
            roof = {"loss_step": "gemm-chain", "lmhead_op": "gemm"}.get(case)
            if roof in ok and roof != r["impl"]:  # > 1 is slower than the GEMMs alone
                rat[f"time_vs_{roof}"] = r["median_s"] / ok[roof]["median_s"]
            for peer in ("liger", "liger-compiled", "trl-chunked", "cce"):
                if case == "loss_step" and peer in ok and peer != r["impl"]:
                    rat[f"time_vs_{peer}"] = r["median_s"] / ok[peer]["median_s"]
                    if ok[peer]["peak_growth_bytes"] >= MIN_RATIO_BASE:
                        rat[f"mem_vs_{peer}"] = r["peak_growth_bytes"] / ok[peer]["peak_growth_bytes"]
            r["ratios"] = rat
        # numerics: every implementation against one reference implementation of the same case and shape
        if case == "blend":
            for r in ok.values():
                err = r["numerics"]["max_err_ulps_of_operand_max"]
                r["numerics_ok"] = err <= BLEND_MAX_ULPS
                r["numerics_note"] = f"max error {err:.3f} ulp(max(|ref|,|policy|)), bound {BLEND_MAX_ULPS}"
        elif case in _NUMERICS_REFERENCE:
            ref = next((ok[i] for i in _NUMERICS_REFERENCE[case] if i in ok), None)
            no_numerics = getattr(CASES[case], "NO_NUMERICS", ())
            shape = rows[0]["shape"]
            rtol = NUMERICS_RTOL_BF16 if shape.get("dtype") in ("bf16", "fp16") else NUMERICS_RTOL
            for r in ok.values():
                if r["impl"] in no_numerics:
                    r["numerics_ok"] = None
                    r["numerics_note"] = "GEMMs alone: no log-probs or loss to compare"
                    continue
                if ref is None:
                    r["numerics_ok"] = None
                    r["numerics_note"] = "reference implementation not measured"
                    continue
                d = compare_numerics(ref["numerics"], r["numerics"])
                r["numerics_max_rel_diff"] = d
                r["numerics_ok"] = d <= rtol
                r["numerics_note"] = f"max relative difference to {ref['impl']}: {d:.2e} (tolerance {rtol})"
        elif case == "e2e_hh":
            # the padded trainer is the reference: packed and shared layouts compute the same loss, and TRL does
            # on the same tokens (the case truncates as TRL does; compared only where the first batches agree)
            ref = ok.get("fasttrdpo")
            for r in ok.values():
                r["numerics_ok"] = None
                if ref is not None and r is not ref and r.get("first_loss") is not None:
                    d = _rel(ref["first_loss"], r["first_loss"], max(abs(ref["first_loss"]), 1e-6))
                    same_tokens = r["token_counts"][:1] == ref["token_counts"][:1]
                    r["numerics_max_rel_diff"] = d
                    r["numerics_ok"] = d <= E2E_LOSS_RTOL if same_tokens else None
                    r["numerics_note"] = (f"first-step loss vs fasttrdpo (padded): rel diff {d:.2e}"
                                          + ("" if same_tokens else " (first batches differ in tokens: not compared)"))
        elif case == "e2e":
            ref = ok.get("trl-dpotrainer")
            for r in ok.values():
                r["numerics_ok"] = None
                if ref is not None and "first_loss" in r and "first_loss" in ref:
                    d = _rel(ref["first_loss"], r["first_loss"], max(abs(ref["first_loss"]), 1e-6))
                    r["numerics_max_rel_diff"] = d
                    # both start from the same weights and batch: the first step's loss is the same function
                    r["numerics_ok"] = d <= E2E_LOSS_RTOL
                    r["numerics_note"] = f"first-step loss vs trl-dpotrainer: rel diff {d:.2e}"
    return results


E2E_CASES = ("e2e", "e2e_hh")


def device_fractions(results, peaks):
    """On a GPU with known datasheet peaks: useful TFLOP/s as a fraction of the fp32 peak (the CPU-plan
    cases run fp32 with IEEE dots, TF32 off) or of the bf16 peak (the GPU check's bf16 shapes), and blend
    GB/s as a fraction of the HBM peak."""
    if not peaks:
        return
    for r in results:
        if r.get("status") != "ok":
            continue
        if r.get("tflops") and r["shape"].get("dtype") in ("bf16", "fp16"):
            r["tflops_fraction_of_bf16_peak"] = r["tflops"] / peaks["bf16_tflops"]
        elif r.get("tflops"):
            r["tflops_fraction_of_fp32_peak"] = r["tflops"] / peaks["fp32_tflops"]
        if r.get("gbps"):
            r["fraction_of_hbm_peak"] = r["gbps"] / (peaks["hbm_tbps"] * 1000)


def _find(results, case, impl, **shape):
    for r in results:
        if r["case"] == case and r["impl"] == impl and all(r["shape"].get(k) == v for k, v in shape.items()):
            return r
    return None


def gpu_check_targets(results, dry_run):
    """Issue 11's GPU targets, from one --gpu-check run (met = None where not measured, and in a dry run,
    whose tiny CPU shapes say nothing about them: there the values only prove the arithmetic runs)."""
    out = []
    note = "dry run: tiny CPU shapes, not a measurement of the target" if dry_run else ""

    def add(name, value, target, ok):
        met = None if (value is None or dry_run) else bool(ok(value))
        out.append({"name": name, "measured": value, "target": target, "met": met,
                    "note": note if value is not None else "not measured"})

    def ok_row(case, impl, **shape):
        r = _find(results, case, impl, **shape)
        return r if r and r.get("status") == "ok" else None

    for valid in (0.6, 1.0):
        ours = ok_row("loss_step", "fasttrdpo-auto", valid=valid)
        tag = f"loss_step valid={valid:.0%} TRDPOLoss"
        roof = ok_row("loss_step", "gemm-chain", valid=valid)
        v = roof["median_s"] / ours["median_s"] if ours and roof else None
        add(f"{tag}: fraction of the same-run cuBLAS GEMM chain (time of the GEMMs / time of the loss)", v,
            ">= 0.85", lambda x: x >= 0.85)
        for peer, tgt in (("trl-chunked", 1.15), ("liger-compiled", 1.3)):
            p = ok_row("loss_step", peer, valid=valid)
            v = p["median_s"] / ours["median_s"] if ours and p else None
            add(f"{tag}: speed-up over {peer}", v, f">= {tgt}" + ("" if valid == 0.6 else " (issue: at ~60 %; reported)"),
                (lambda x, t=tgt: x >= t) if valid == 0.6 else (lambda x: True))
        if ours:
            mem = ours.get("peak_growth_bytes")
            add(f"{tag}: peak memory growth over the inputs (MiB; O(chunk))", None if mem is None else mem / MB,
                "reported", lambda x: True)
    op = ok_row("lmhead_op", "fasttrdpo-auto")
    g = ok_row("lmhead_op", "gemm")
    v = g["median_s"] / op["median_s"] if op and g else None
    add("lm_head op forward: rate as a fraction of its GEMM's (time of h @ W.T / time of the op)", v, ">= 0.6",
        lambda x: x >= 0.6)
    import traffic

    for pdt in ("fp32", "bf16"):
        b = ok_row("blend", "fasttrdpo-auto-unchecked", policy_dtype=pdt)
        v = b.get("fraction_of_copy") if b else None
        add(f"blend llama-8b {pdt}->bf16, check_finite=False (the blend alone): fraction of a same-run copy_ of "
            "the same bytes", v, ">= 0.9", lambda x: x >= 0.9)
        # the default screens the policy for NaN/inf first (one more read of it): the traffic model caps it at
        # copy bytes / (copy bytes + policy bytes) of a copy_, below 0.9 by design
        ms = {m.impl: m for m in traffic.blend_models(pdt, "bf16", elements=1)}
        cap = ms["copy_ (same bytes)"].bytes / ms["fasttrdpo (check_finite=True)"].bytes
        b = ok_row("blend", "fasttrdpo-auto", policy_dtype=pdt)
        v = b.get("fraction_of_copy") if b else None
        add(f"blend llama-8b {pdt}->bf16, check_finite=True (default: + the finite screen, a separate safety pass): "
            "fraction of a same-run copy_ of the same bytes", v, f"reported (traffic-model ceiling {cap:.2f})",
            lambda x: True)
    return out


def targets(results, device_type, quick, gpu_check=False, dry_run=False):
    """The issue's targets, evaluated on this run's numbers (met = None where not measured)."""
    if gpu_check:
        return gpu_check_targets(results, dry_run)
    out = []

    def add(name, value, target, met, note=""):
        out.append({"name": name, "measured": value, "target": target, "met": met, "note": note})

    cases = {r["case"] for r in results}
    if device_type == "cpu" and not quick and cases - {"e2e_hh"}:  # (not for a run of the e2e_hh case alone)
        shape = dict(pairs=8, seq=256, hidden=512, vocab=32000)
        r = _find(results, "loss_step", "fasttrdpo-eager", **shape)
        rat = (r or {}).get("ratios", {}) if (r or {}).get("status") == "ok" else {}
        for key, tgt in (("mem_vs_best_trl", 0.10), ("time_vs_best_trl", 0.90)):
            v = rat.get(key)
            add(f"loss_step N=4096 H=512 V=32000 fasttrdpo-eager {key}", v, f"<= {tgt}",
                None if v is None else v <= tgt)
        for peer in ("liger", "liger-compiled"):
            for kind in ("time", "mem"):
                v = rat.get(f"{kind}_vs_{peer}")
                add(f"loss_step N=4096 H=512 V=32000 fasttrdpo-eager {kind}_vs_{peer}", v, "< 1",
                    None if v is None else v < 1)
        op = _find(results, "lmhead_op", "fasttrdpo-eager", tokens=4096, hidden=256, vocab=32000)
        v = (op or {}).get("ratios", {}).get("mem_vs_best_trl") if (op or {}).get("status") == "ok" else None
        add("lmhead_op N=4096 H=256 V=32000 eager peak memory / naive (issue 2)", v, "<= 0.25",
            None if v is None else v <= 0.25)
        for impl in ("fasttrdpo-eager", "fasttrdpo-cpp"):
            for pdt in ("fp32", "bf16"):
                b = _find(results, "blend", impl, params="pythia-160m", policy_dtype=pdt)
                v = (b or {}).get("ratios", {}).get("time_vs_best_trl") if (b or {}).get("status") == "ok" else None
                add(f"blend pythia-160m {pdt}->bf16 {impl} speed-up over trl-loop", None if not v else 1 / v,
                    ">= 1.5", None if not v else 1 / v >= 1.5)
    if device_type == "cpu" and not quick:
        # issue 7: the C++ backend against the library's eager backend at the logits level (same
        # gradient semantics compared: out of place with out of place, in place with in place)
        shape = dict(pairs=8, seq=256, vocab=32000)
        for cpp_impl, eager_impl in (("fasttrdpo-cpp", "fasttrdpo-eager"), ("fasttrdpo-cpp-inplace", "fasttrdpo-eager"),
                                     ("fasttrdpo-cpp-inplace", "fasttrdpo-eager-inplace")):
            c, e = _find(results, "logits_step", cpp_impl, **shape), _find(results, "logits_step", eager_impl, **shape)
            if not (c and e and c.get("status") == e.get("status") == "ok"):
                continue
            speed = e["median_s"] / c["median_s"]
            lower = c["peak_growth_bytes"] < e["peak_growth_bytes"]
            add(f"logits_step N=4096 V=32000 {cpp_impl} speed-up over {eager_impl} (peak memory lower: {lower})",
                speed, ">= 2 with lower peak memory", speed >= 2 and lower)
        for pdt in ("fp32", "bf16"):
            c = _find(results, "blend", "fasttrdpo-cpp", params="pythia-160m", policy_dtype=pdt)
            f = _find(results, "blend", "foreach-lerp", params="pythia-160m", policy_dtype=pdt)
            if c and f and c.get("status") == f.get("status") == "ok":
                v = f["median_s"] / c["median_s"]
                add(f"blend pythia-160m {pdt}->bf16 fasttrdpo-cpp speed-up over foreach-lerp", v, ">= 1.2", v >= 1.2)
    e = [r for r in results if r["case"] == "e2e" and r["impl"] == "fasttrdpo" and r.get("status") == "ok"]
    if "e2e" not in cases:
        pass
    elif e and not quick:
        rat = e[0].get("ratios", {})
        v = rat.get("tokens_per_s_vs_trl")
        add("e2e tokens/s vs TRL DPOTrainer(sync_ref_model)", v, ">= 1.5", None if v is None else v >= 1.5)
        v = rat.get("mem_vs_best_trl")
        add("e2e peak memory growth vs TRL DPOTrainer", v, "<= 0.5", None if v is None else v <= 0.5)
    elif not quick:
        add("e2e tokens/s vs TRL DPOTrainer(sync_ref_model)", None, ">= 1.5", None, "fasttrdpo e2e not measured")
    out += e2e_hh_targets(results, quick)
    if device_type == "cuda":
        for r in results:
            if r["case"] == "blend" and r["impl"] == "fasttrdpo-triton" and r.get("status") == "ok":
                v = r.get("fraction_of_copy")
                add(f"blend {r['shape']['params']} {r['shape']['policy_dtype']} fraction of same-run copy_", v,
                    ">= 0.9", None if v is None else v >= 0.9)
            if r["case"] == "loss_step" and r["impl"] == "fasttrdpo-triton" and r.get("status") == "ok":
                for peer in ("trl-chunked", "liger", "liger-compiled"):
                    v = r.get("ratios", {}).get(f"time_vs_{peer}")
                    add(f"loss_step V={r['shape']['vocab']} triton speed-up over {peer}", None if not v else 1 / v,
                        ">= 1.3", None if not v else 1 / v >= 1.3)
    return out


def e2e_hh_targets(results, quick):
    """Issue 15: end-to-end tokens/s of the shared-prompt and packed layouts over the padded TRDPOTrainer of the
    same round, per round, with the load average around each measurement; 'unstable' when the rounds' ratios
    differ by more than 10 %."""
    out = []
    rounds = sorted({r["shape"].get("round", 1) for r in results if r["case"] == "e2e_hh"})
    for impl, want in (("fasttrdpo-shared", 1.6), ("fasttrdpo-packed", 1.3)):
        vals = []
        for k in rounds:
            r = next((x for x in results if x["case"] == "e2e_hh" and x["impl"] == impl
                      and x["shape"].get("round", 1) == k), None)
            pad = next((x for x in results if x["case"] == "e2e_hh" and x["impl"] == "fasttrdpo"
                        and x["shape"].get("round", 1) == k), None)
            v = (r or {}).get("ratios", {}).get("tokens_per_s_vs_padded") if (r or {}).get("status") == "ok" else None
            if v is None:
                why = (r or {}).get("reason") or (pad or {}).get("reason") or "not measured"
            else:
                loads = [round(x[0], 2) for x in (pad.get("loadavg_before"), pad.get("loadavg_after"),
                                                  r.get("loadavg_before"), r.get("loadavg_after")) if x]
                why = f"1-min load average around the two measurements {loads}"
                if quick:
                    why = "--quick: tiny model, a few pairs: not a measurement of the target; " + why
                vals.append(v)
            out.append({"name": f"e2e_hh round {k}: {impl} tokens/s / padded fasttrdpo tokens/s", "measured": v,
                        "target": f">= {want}", "met": None if (v is None or quick) else v >= want, "note": why})
        if len(vals) > 1:
            spread = max(vals) / min(vals) - 1
            out.append({"name": f"e2e_hh {impl} over padded: spread between rounds", "measured": spread,
                        "target": "<= 0.10 (else unstable)", "met": None if quick else spread <= 0.10,
                        "note": "unstable: rounds disagree by more than 10 %" if spread > 0.10 else "stable"})
    return out


# ============================================================================================ output
def _shape_str(case, s):
    if case == "loss_step":
        extra = (f" {s['dtype']}" if "dtype" in s else "") + (f" valid={s['valid']:.0%}" if "valid" in s else "")
        return f"N={2 * s['pairs'] * s['seq']} H={s['hidden']} V={s['vocab']}{extra}"
    if case == "lmhead_op":
        extra = (f" {s['dtype']}" if "dtype" in s else "") + (" fwd" if s.get("fwd_only") else "")
        return f"N={s['tokens']} H={s['hidden']} V={s['vocab']}{extra}"
    if case == "logits_step":
        return f"N={2 * s['pairs'] * s['seq']} V={s['vocab']}"
    if case == "blend":
        return f"{s['params']}x{s['scale']:g} {s['tensors']}t {s['elements'] / 1e6:.1f}M {s['policy_dtype']}->{s['ref_dtype']}"
    if case == "e2e":
        return f"{s['model']} {s['pairs']} pairs/step"
    if case == "e2e_hh":
        return f"{s['model']} HH {s['pairs']} pairs/step L<={s['max_length']} round {s.get('round', 1)}"
    return str(s)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(results) -> str:
    head = ["case", "shape", "impl", "median s", "peak MB", "1st MB", "t/bestTRL", "mem/bestTRL", "extra", "numerics"]
    rows = [head]
    for r in sorted(results, key=lambda r: r.get("order", 10 ** 6)):
        s = r.get("status")
        shape = _shape_str(r["case"], r["shape"])
        if s != "ok":
            rows.append([r["case"], shape, r["impl"], s.upper(), "", "", "", "", (r.get("reason") or "")[:70], ""])
            continue
        rat = r.get("ratios", {})
        peak = r.get("peak_growth_bytes")
        first = r.get("first_call_peak_growth_bytes")
        extra = ""
        if r["case"] == "blend":
            extra = f"{r['gbps']:.1f} GB/s ({r['fraction_of_copy']:.2f} of copy_)"
        elif r["case"] in E2E_CASES:
            extra = f"{r['tokens_per_s']:.0f} tok/s"
            if "tokens_per_s_vs_padded" in rat:
                extra += f" ({rat['tokens_per_s_vs_padded']:.2f}x padded)"
        elif r.get("tflops") and str(r.get("device", "")).startswith("cuda"):
            extra = f"{r['tflops']:.1f} TFLOP/s"
        elif r.get("tflops"):
            extra = f"{r['tflops'] * 1e3:.0f} GFLOP/s"
        tr = rat.get("time_vs_best_trl")
        num = {True: "ok", False: "MISMATCH", None: "-"}[r.get("numerics_ok")]
        rows.append([r["case"], shape, r["impl"], _fmt(r.get("median_s"), ".3f"),
                     _fmt(None if peak is None else peak / MB, ".0f"), _fmt(None if first is None else first / MB, ".0f"),
                     _fmt(tr, ".2f"), _fmt(rat.get("mem_vs_best_trl"), ".3f"), extra, num])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(doc) -> str:
    """A README-ready table of one result file (measured rows; skipped ones listed with the reason)."""
    env = doc["environment"]
    v = env["versions"]
    lines = [f"Run {doc['created_utc']} on {env.get('device_name')} ({env['device']}, {env['threads']} threads), "
             f"torch {v.get('torch')}, trl {v.get('trl')}, liger-kernel {v.get('liger-kernel')}; "
             f"{doc['repeats_note']}; load average {', '.join(f'{x:.2f}' for x in env['loadavg_start'])} at start, "
             f"max 1-min {env.get('loadavg_max_1min') or 0:.2f} during the run.", "",
             "| case | shape | implementation | median s | peak MiB | × best TRL time | × best TRL memory | extra |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    skipped = []
    for r in sorted(doc["results"], key=lambda r: r.get("order", 10 ** 6)):
        shape = _shape_str(r["case"], r["shape"])
        if r["status"] != "ok":
            skipped.append(f"{r['case']} / {r['impl']}: {r['status']} ({r.get('reason')})")
            continue
        rat = r.get("ratios", {})
        tr = rat.get("time_vs_best_trl")
        extra = ""
        if r["case"] == "blend":
            extra = f"{r['gbps']:.2f} GB/s"
        elif r["case"] == "e2e":
            extra = f"{r['tokens_per_s']:.0f} tok/s ({r['tokens_per_step']} tok/step)"
        elif r["case"] == "e2e_hh":
            extra = (f"{r['tokens_per_s']:.0f} tok/s"
                     + (f", {rat['tokens_per_s_vs_padded']:.2f}× padded" if "tokens_per_s_vs_padded" in rat else "")
                     + (f", backbone positions {r['backbone_positions_timed']} for {r['tokens_timed']} tok"
                        + (f" ({r['layout']})" if "layout" in r else "")
                        if "backbone_positions_timed" in r else f", {r['tokens_timed']} tok")
                     + f", load {r['loadavg_before'][0]:.1f}→{r['loadavg_after'][0]:.1f}")
        lines.append(f"| {r['case']} | {shape} | {r['impl']} | {r['median_s']:.3f} | "
                     f"{r['peak_growth_bytes'] / MB:.0f} | {_fmt(tr, '.2f')} | {_fmt(rat.get('mem_vs_best_trl'), '.3f')} | "
                     f"{extra} |")
    if skipped:
        lines += ["", "Not measured: " + "; ".join(sorted(set(skipped))) + "."]
    # the targets as this version of the script evaluates the stored results (the file keeps the run's own list)
    goals = (targets(doc["results"], torch_device_type(doc["environment"]["device"]), doc.get("quick", False))
             if doc.get("part", "all") != "secondary" else [])
    if goals:
        lines += ["", "| target | measured | wanted | met | note |", "|---|---:|---|---|---|"]
        for t in goals:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            lines.append(f"| {t['name']} | {_fmt(t['measured'], '.3f')} | {t['target']} | {met} | {t.get('note', '')} |")
    return "\n".join(lines)


def torch_device_type(device: str) -> str:
    return device.split(":")[0]


def gpu_markdown(doc) -> str:
    """The GPU check's report: every planned measurement (measured, or not run and why) beside the traffic
    model's prediction for the H100, the H200 and the H200's reachable roof, then the issue's targets."""
    env = doc["environment"]
    v = env["versions"]
    lines = [f"GPU check {doc['created_utc']} on {env.get('device_name')} ({env['device']}), torch {v.get('torch')}, "
             f"triton {v.get('triton')}, trl {v.get('trl')}, liger-kernel {v.get('liger-kernel')}, "
             f"cut-cross-entropy {v.get('cut-cross-entropy')}; {doc['repeats_note']}; "
             f"benchmarks took {env.get('wall_s', 0):.0f} s"
             + (f" of a {doc['budget_s']:.0f} s budget" if doc.get("budget_s") else "") + ".", "",
             "| case | shape | implementation | measured ms | peak MiB | model ms H100 / H200 / H200 reachable "
             "| × GEMM roof | numerics |",
             "|---|---|---|---:|---:|---|---:|---|"]
    for r in sorted(doc["results"], key=lambda r: r.get("order", 10 ** 6)):
        shape = _shape_str(r["case"], r["shape"])
        m = r.get("model")
        pred = "-" if not m else " / ".join(f"{m['serial_s'][g] * 1e3:.3g}" for g in ("H100", "H200", "H200-reachable"))
        if r.get("status") != "ok":
            lines.append(f"| {r['case']} | {shape} | {r['impl']} | not run: {r.get('reason')} | | {pred} | | |")
            continue
        rat = r.get("ratios", {})
        roof = rat.get("time_vs_gemm-chain", rat.get("time_vs_gemm"))
        num = {True: "ok", False: "MISMATCH", None: "-"}[r.get("numerics_ok")]
        peak = r.get("peak_growth_bytes")
        used = r.get("backend_used")  # which fasttrdpo backend each op ran (no silent fallback)
        impl = r["impl"] + (" (" + ", ".join(f"{k}: {b}" for k, b in sorted(used.items())) + ")" if used else "")
        lines.append(f"| {r['case']} | {shape} | {impl} | {r['median_s'] * 1e3:.3g} | "
                     f"{_fmt(None if peak is None else peak / MB, '.0f')} | {pred} | {_fmt(roof, '.2f')} | {num} |")
    if doc.get("targets"):
        lines += ["", "| target | measured | wanted | met |", "|---|---:|---|---|"]
        for t in doc["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            lines.append(f"| {t['name']} | {_fmt(t['measured'], '.3f')} | {t['target']} | {met} |")
    if doc.get("parts_elapsed_s"):
        lines += ["", "Elapsed per part: " + ", ".join(f"{k} {x:.1f} s" for k, x in doc["parts_elapsed_s"].items())
                  + "."]
    return "\n".join(lines)


def plot(results, path, note=None):
    """Time and peak memory of the loss step vs V (one line per implementation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["case"] == "loss_step" and r.get("status") == "ok"]
    if not rows:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["shape"]["vocab"], r["median_s"], r["peak_growth_bytes"] / MB) for r in rows if r["impl"] == impl)
        vs = [p[0] for p in pts]
        ax_t.plot(vs, [p[1] for p in pts], marker="o", label=impl)
        ax_m.plot(vs, [max(p[2], 0.1) for p in pts], marker="o", label=impl)
    s = rows[0]["shape"]
    ax_t.set(xlabel="vocabulary V", ylabel="median seconds (fwd+bwd)", title=f"loss step, N={2 * s['pairs'] * s['seq']} H={s['hidden']}")
    ax_m.set(xlabel="vocabulary V", ylabel="peak memory growth (MiB)", yscale="log", title="peak memory over inputs")
    ax_t.grid(alpha=0.3)
    ax_m.grid(alpha=0.3)
    ax_m.legend(fontsize=8)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ============================================================================================ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, fewer repeats: a sub-minute CPU run")
    ap.add_argument("--json", default=None, help="result file (default benchmarks/results/<device>-<date>[-quick].json)")
    ap.add_argument("--plot", default=None, help="PNG of time and memory vs V (default: beside the JSON)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; 3 in --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    ap.add_argument("--cases", default=None,
                    help="comma-separated subset of: loss_step,lmhead_op,logits_step,blend,e2e,e2e_hh")
    ap.add_argument("--e2e-rounds", type=int, default=None,
                    help="rounds of the e2e_hh case (each measures every implementation once, interleaved; "
                         "default 2, 1 with --quick)")
    ap.add_argument("--impls", default=None, help="comma-separated subset of implementations")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per measurement before it is an error")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--markdown", nargs="+", default=None, metavar="JSON",
                    help="print result files as markdown tables (runs nothing)")
    ap.add_argument("--part", choices=("all", "primary", "secondary"), default="all",
                    help="primary: the shapes the issue's targets use (loss step at the target V, lm_head op, "
                         "Pythia-160M blend, e2e, on CPU the logits level); secondary: the rest (V sweep, "
                         "other blends, on CUDA the logits level)")
    ap.add_argument("--gpu-check", action="store_true",
                    help="issue 11's GPU check: the GPU primary shapes only (see the module doc)")
    ap.add_argument("--dry-run", action="store_true",
                    help="with --gpu-check: the same plan at tiny shapes (on CPU: proves the plumbing)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget: a measurement whose estimate does not fit what is left is reported "
                         "as not run; each child's timeout is capped by what is left")
    ap.add_argument("--md", default=None, help="also write the markdown report to this file")
    ap.add_argument("--plot-with", nargs="*", default=[],
                    help="result JSONs of other runs whose loss-step points join the plot (e.g. a --part "
                         "secondary run); their ratios stay their own")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.markdown:
        for path in args.markdown:
            with open(path) as f:
                print(markdown(json.load(f)))
        return None
    # the children must run the compiled code paths, not the Triton interpreter the test-suite switches on
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("FASTTRDPO_BACKEND", None)
    import torch
    from tqdm import tqdm

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device_str = args.device
    device_type = torch.device(args.device).type
    args.repeats_auto = args.repeats is None and args.gpu_check
    if args.repeats is None:
        args.repeats = 3 if (args.quick or args.gpu_check) else 5
    if args.e2e_rounds is None:
        args.e2e_rounds = 1 if args.quick else 2
    if args.dry_run and not args.gpu_check:
        raise SystemExit("--dry-run goes with --gpu-check")
    if args.threads is None:
        args.threads = torch.get_num_threads()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    if args.json is None:
        tag = "-gpu-check" if args.gpu_check else ""
        tag += "-dry-run" if args.dry_run else ""
        args.json = os.path.join(HERE, "results", f"{device_type}-{date}{'-quick' if args.quick else ''}{tag}.json")
    if args.plot is None and not args.no_plot:
        args.plot = os.path.splitext(args.json)[0] + ".png"

    from _measure import loadavg

    tasks, skipped = plan(args, device_type)
    load_start = loadavg()
    t_start = time.time()
    ctx = mp.get_context("forkserver")
    # the zygote imports the heavy libraries once; each measurement is a fresh fork of it
    # (trl.kernels' backward imports trl.trainer.utils: preloading it saves each TRL child seconds)
    ctx.set_forkserver_preload(["torch", "_measure", "_cases", "trl.trainer.utils", "trl.kernels",
                                "liger_kernel.chunked_loss", "transformers", "fasttrdpo", "fasttrdpo.loss",
                                "cut_cross_entropy"])
    env = device_info(args.device_str)
    env.update(versions=_versions(), platform=platform.platform(), git_commit=_git_commit(),
               loadavg_start=load_start,
               isolation="one forked child process per (case, shape, implementation), from a zygote that only "
                         "imported libraries (multiprocessing forkserver)")
    loads = []  # the load average after every measurement: the machine may be shared

    def write(results, pending):
        """The JSON after every measurement: a run stopped early leaves a valid, marked-incomplete file."""
        rows = [dict(r) for r in results] + [dict(r) for r in skipped]
        analyse(rows)
        device_fractions(rows, env.get("peaks"))
        env.update(loadavg_end=loadavg(), loadavg_max_1min=max((x[0] for x in loads), default=None),
                   wall_s=time.time() - t_start,
                   memory_method=next((r["memory_method"] for r in rows if r.get("memory_method")), None))
        doc = {
            "schema": SCHEMA,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["benchmarks/throughput.py"] + (argv if argv is not None else sys.argv[1:])),
            "complete": not pending,
            "pending": [{k: t[k] for k in ("case", "impl")} | {"shape": _shape_str(t["case"], t["shape"])}
                        for t in pending],
            "quick": args.quick,
            "gpu_check": args.gpu_check,
            "dry_run": args.dry_run,
            "budget_s": args.budget_s,
            "parts_elapsed_s": dict(parts_elapsed),
            "part": args.part,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "repeats_note": ("--quick: median of 3 timed runs (fewer than the 5 of a full run), tiny shapes; not "
                             "for comparison" if args.quick and args.repeats < 5
                             else "--gpu-check --dry-run: tiny shapes on this device, one timed run, proves the "
                                  "plumbing only; not for comparison" if args.dry_run
                             else "median of 3-10 timed runs (sized from the traffic model to fit the budget) after "
                                  f"{args.warmup} warm-up run(s)" if args.repeats_auto
                             else f"median of {args.repeats} timed runs after {args.warmup} warm-up run(s)"),
            "environment": env,
            "implementations": _descriptions(),
            "results": rows,
        }
        doc["targets"] = (targets(rows, device_type, args.quick, gpu_check=args.gpu_check, dry_run=args.dry_run)
                          if args.part != "secondary" else [])
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, args.json)
        return doc, rows

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    results = []
    parts_elapsed = {}
    bar = tqdm(tasks, desc="benchmarks", unit="run", file=sys.stderr, dynamic_ncols=True)
    for i, task in enumerate(bar):
        bar.set_postfix_str(f"{task['case']}:{task['impl']}")
        timeout = args.timeout
        part = task.get("part", task["case"])
        t_task = time.time()
        left = None if args.budget_s is None else args.budget_s - (t_task - t_start)
        if left is not None and task.get("estimate_s", 0.0) > left:
            r = {k: task[k] for k in ("case", "impl", "shape")}
            r.update(status="skipped", reason=f"{left:.0f} s of the {args.budget_s:.0f} s budget left, this "
                                              f"measurement is estimated at {task['estimate_s']:.0f} s")
        else:
            if left is not None:
                timeout = max(1.0, min(timeout, left))
            r = run_isolated(ctx, task, timeout)
        parts_elapsed[part] = parts_elapsed.get(part, 0.0) + time.time() - t_task
        r["device"] = args.device_str
        r["order"] = task["order"]
        r["estimate_s"] = task.get("estimate_s")
        r["elapsed_s"] = time.time() - t_task
        if args.gpu_check:
            r["model"] = model_prediction(task["case"], task["impl"], task["shape"])
        r["loadavg_after"] = loadavg()
        loads.append(r["loadavg_after"] or [0.0])
        results.append(r)
        doc, rows = write(results, tasks[i + 1:])
        if i + 1 == len(tasks) or tasks[i + 1].get("part", tasks[i + 1]["case"]) != part:
            print(f"[throughput] {part}: {parts_elapsed[part]:.1f} s so far (run {time.time() - t_start:.1f} s)",
                  file=sys.stderr, flush=True)
    bar.close()
    if not tasks:
        doc, rows = write(results, [])
    results = rows
    if args.md:
        with open(args.md, "w") as f:
            f.write((gpu_markdown(doc) if args.gpu_check else markdown(doc)) + "\n")
    print(table(results))
    if doc["targets"]:
        print("\ntargets:")
        for t in doc["targets"]:
            mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
            print(f"  [{mark}] {t['name']}: {_fmt(t['measured'], '.3f')} (target {t['target']}) {t['note']}")
    if args.plot:
        extra = []
        for path in args.plot_with:
            with open(path) as f:
                extra += [r for r in json.load(f)["results"] if r["case"] == "loss_step"]
        note = None
        if args.plot_with:
            note = ("points from " + ", ".join(os.path.basename(x) for x in [args.json] + args.plot_with)
                    + " (each shape's implementations measured in the same run)")
        p = plot(results + extra, args.plot, note)
        if p:
            print(f"plot: {os.path.relpath(p)}")
    print(f"json: {os.path.relpath(args.json)}  (load average start {load_start}, end {env['loadavg_end']})")
    return doc


def _descriptions():
    from _cases import CASES

    d = {case: dict(cls.DESCRIPTIONS) for case, cls in CASES.items()}
    d["e2e"] = {"trl-dpotrainer": "trl.DPOTrainer(sync_ref_model=True, ref_model_sync_steps=2), fp32 (bf16=False), no "
                                     "gradient checkpointing (TRL 1.16 turns both on by default), CPU",
                "fasttrdpo": "fasttrdpo.trainer.TRDPOTrainer (TRDPOLoss + RefModelUpdater), same model and data"}
    d["e2e_hh"] = {"trl-dpotrainer": "trl.DPOTrainer(sync_ref_model=True, ref_model_sync_steps=2), fp32 (bf16=False), no "
                                     "gradient checkpointing (TRL 1.16 turns both on by default), sequential "
                                     "sampler, max_length 512 (keep_start)",
                   "fasttrdpo": "TRDPOTrainer, padded rows (today's layout), max_length 512 (keep_start, as TRL)",
                   "fasttrdpo-packed": "TRDPOTrainer(packing=True): rows packed into bins of <= max_length tokens",
                   "fasttrdpo-shared": "TRDPOTrainer(packing=True, share_prompt=True): prompt || chosen || rejected"}
    for case, cls in CASES.items():
        for peer, why in getattr(cls, "NOT_APPLICABLE", {}).items():
            d[case][peer] = f"not applicable: {why}"
    return d


if __name__ == "__main__":
    main()
