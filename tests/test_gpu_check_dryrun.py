"""scripts/gpu_check.sh --dry-run: the GPU check's plumbing, end to end on CPU at tiny shapes.

Runs the script exactly as on a GPU machine (reused torch, peers probed and installed from a wheel folder,
pytest -m gpu, benchmarks/throughput.py --gpu-check, the report) and checks what it leaves in --out:
every planned measurement is measured or reported as not run with a reason, each implementation is
measured at least once (the dry run measures each once, plus our own rows at every shape), the numbers
are real, the implementations agree, TRDPOLoss's loss matches a float64 computation, and a peer whose
wheel does not import is reported as not run with the import error (a fake cut_cross_entropy wheel,
built here). The run points FASTTRDPO_CACHE at an empty folder: nothing in the check (the -m gpu
collection included) may build the C++ CPU extension (a cold build takes ~40 s).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers import dot_error_bound, logprob_tolerance, ref_linear_token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

FAKE_CCE_ERROR = "fake cut_cross_entropy wheel of the dry-run test"


def _cce_importable() -> bool:
    proc = subprocess.run([sys.executable, "-c", "import cut_cross_entropy"], capture_output=True)
    return proc.returncode == 0


def _fake_wheel(folder) -> str:
    """A wheel named like cut-cross-entropy's whose module raises on import (pip installs it offline)."""
    name = "cut_cross_entropy-0.0.0-py3-none-any.whl"
    di = "cut_cross_entropy-0.0.0.dist-info"
    with zipfile.ZipFile(folder / name, "w") as z:
        z.writestr("cut_cross_entropy/__init__.py", f"raise ImportError({FAKE_CCE_ERROR!r})\n")
        z.writestr(f"{di}/METADATA", "Metadata-Version: 2.1\nName: cut-cross-entropy\nVersion: 0.0.0\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/RECORD", "")
    return name


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_check")
    wheels, out = base / "wheels", base / "out"
    wheels.mkdir()
    fake = not _cce_importable()
    if fake:
        _fake_wheel(wheels)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTTRDPO_BACKEND")}
    env["FASTTRDPO_CACHE"] = str(base / "cpp-cache")  # empty: a build would show up there
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--wheels", str(wheels), "--python", sys.executable, "--budget-s", "400"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    docs = {}
    for name in ("gpu_check.json", "throughput.json"):
        p = out / name
        docs[name] = json.loads(p.read_text()) if p.exists() else None
    return proc, out, docs, fake, base / "cpp-cache"


def test_script_succeeds_and_leaves_its_files(dry):
    proc, out, docs, _, _ = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(os.listdir(out))
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "pytest-gpu.log", "throughput.json",
                     "throughput.log"]
    assert len(files) <= 8  # what the device tool brings back from $OUT
    assert "# fasttrdpo GPU check" in proc.stdout  # the report is printed at the end


def test_nothing_builds_the_cpp_extension(dry):
    """The -m gpu collection decides tests/helpers.backends() from the cache (GPU_ONLY_SESSION) instead of
    building and loading the extension, and no benchmark row of the check runs the C++ backend."""
    proc, out, _, _, cache = dry
    assert proc.returncode == 0
    assert not cache.exists() or not any(cache.iterdir()), sorted(p.name for p in cache.iterdir())
    assert "building the C++" not in (out / "pytest-gpu.log").read_text()


def test_report_header_peers_and_tests(dry):
    _, _, docs, fake, _ = dry
    g = docs["gpu_check.json"]
    assert g["schema"] == "fasttrdpo-gpu-check/1" and g["dry_run"] is True and g["fatal"] is None
    assert set(g["elapsed_s"]) == {"setup", "tests", "benchmarks", "total"}
    for k in ("setup", "tests", "benchmarks", "total"):
        assert math.isfinite(g["elapsed_s"][k]) and g["elapsed_s"][k] >= 0
    peers = {p["name"]: p for p in g["peers"]}
    assert set(peers) == {"trl", "liger-kernel", "cut-cross-entropy"}
    for p in peers.values():
        assert p["status"] in ("ok", "not run") and p["detail"]
    assert peers["trl"]["status"] == "ok" and peers["liger-kernel"]["status"] == "ok"  # the test extra has them
    if fake:  # installed from the wheel folder, then reported with the import error, never dropped
        assert peers["cut-cross-entropy"]["status"] == "not run"
        assert "installed from" in peers["cut-cross-entropy"]["detail"]
        assert FAKE_CCE_ERROR in peers["cut-cross-entropy"]["detail"]
    t = g["tests"]
    assert t["xml"] and t["exit_code"] in (0, 5) and not t["timed_out"]
    assert t["failures"] == 0 and t["errors"] == 0
    # on CPU every CUDA-marked test is collected and skipped
    assert t["tests"] >= 4 and t["skipped"] == t["tests"]


def test_every_planned_measurement_is_measured_or_not_run_with_a_reason(dry):
    from throughput import GPU_BLEND_IMPLS, GPU_LOSS_IMPLS, GPU_OP_IMPLS

    _, out, docs, fake, _ = dry
    d = docs["throughput.json"]
    assert d["gpu_check"] is True and d["dry_run"] is True and d["complete"] is True
    want = {"loss_step": set(GPU_LOSS_IMPLS), "lmhead_op": set(GPU_OP_IMPLS), "blend": set(GPU_BLEND_IMPLS)}
    shapes = {}
    for r in d["results"]:
        shapes.setdefault((r["case"], json.dumps(r["shape"], sort_keys=True)), set()).add(r["impl"])
    assert sorted(c for c, _ in shapes) == ["blend", "blend", "lmhead_op", "loss_step", "loss_step"]
    for (case, _), impls in shapes.items():
        assert impls == want[case], case
    md = (out / "gpu_check.md").read_text()
    for r in d["results"]:
        if r["status"] != "ok":
            assert r["status"] == "skipped" and r["reason"], (r["impl"], r.get("traceback"))
            assert f"| {r['impl']} | not run: " in md
    by = {(r["case"], r["impl"], r["shape"].get("valid"), r["shape"].get("policy_dtype")): r for r in d["results"]}
    once = "skipped by --dry-run: each implementation is measured once, at "
    # every implementation is measured once (or says why it cannot run), at its first shape in the plan;
    # the other shapes' rows point to that one
    for case, impls in want.items():
        for impl in impls:
            rows = [r for r in d["results"] if r["case"] == case and r["impl"] == impl]
            measured = [r for r in rows if r["status"] == "ok" or not r["reason"].startswith(once)]
            assert measured, (case, impl)
            for r in rows:
                if r["status"] != "ok" and r["reason"].startswith(once):
                    assert r["order"] > measured[0]["order"]
    # the peers the test extra installs and our own implementations are measured at the first loss shape;
    # TRDPOLoss and its GEMM roof at both, the blend targets' rows (both check_finite) at both policy dtypes
    for impl in ("gemm-chain", "fasttrdpo-auto", "fasttrdpo-op-auto", "trl-chunked", "liger"):
        assert by[("loss_step", impl, 0.6, None)]["status"] == "ok", by[("loss_step", impl, 0.6, None)].get("reason")
    for impl in ("gemm-chain", "fasttrdpo-auto"):
        assert by[("loss_step", impl, 1.0, None)]["status"] == "ok", by[("loss_step", impl, 1.0, None)].get("reason")
    assert by[("loss_step", "trl-chunked", 1.0, None)]["reason"].startswith(once + "N=128 H=64 V=1000 bf16 valid=60%")
    for pdt in ("fp32", "bf16"):
        for impl in ("fasttrdpo-auto", "fasttrdpo-auto-unchecked"):
            assert by[("blend", impl, None, pdt)]["status"] == "ok", by[("blend", impl, None, pdt)].get("reason")
    cce = by[("loss_step", "cce", 0.6, None)]
    assert cce["status"] == "skipped"
    assert (FAKE_CCE_ERROR in cce["reason"]) if fake else ("CUDA" in cce["reason"])
    assert "torch.compile" in by[("loss_step", "liger-compiled", 0.6, None)]["reason"]
    # the traffic model's rows the measurements sit beside: the generic op is the retiled kernels' model
    assert by[("lmhead_op", "fasttrdpo-auto", None, None)]["model"]["model_impl"] == "retiled"
    assert by[("loss_step", "fasttrdpo-op-auto", 0.6, None)]["model"]["model_impl"] == "linear-retiled"
    assert by[("blend", "fasttrdpo-auto-unchecked", None, "fp32")]["model"]["model_impl"] == \
        "fasttrdpo (check_finite=False)"
    assert by[("blend", "fasttrdpo-auto", None, "fp32")]["model"]["model_impl"] == "fasttrdpo (check_finite=True)"


def test_measured_numbers_are_real_and_agree(dry):
    _, _, docs, _, _ = dry
    d = docs["throughput.json"]
    ok = [r for r in d["results"] if r["status"] == "ok"]
    assert len(ok) >= 16
    for r in ok:
        assert r["times_s"] and all(math.isfinite(t) and t > 0 for t in r["times_s"])
        assert isinstance(r["peak_growth_bytes"], int)
        assert r["estimate_s"] > 0 and r["elapsed_s"] > 0
        m = r["model"]  # the traffic model's prediction rides along with every modelled row
        assert m is not None and m["bytes"] > 0
        assert all(math.isfinite(x) and x > 0 for x in m["serial_s"].values())
        if r["case"] != "blend" and r["impl"] not in ("gemm-chain", "gemm"):
            assert r["numerics_ok"] is True, (r["case"], r["impl"], r.get("numerics_note"))
        if r["case"] == "blend":
            assert r["numerics_ok"] is True and 0 < r["fraction_of_copy"] and math.isfinite(r["gbps"])
    for t in d["targets"]:  # the arithmetic runs; a dry run claims nothing about the targets
        assert t["met"] is None
        assert t["measured"] is None or math.isfinite(t["measured"])
    assert sum(t["measured"] is not None for t in d["targets"]) >= 10
    assert set(d["parts_elapsed_s"]) == {"loss_step", "blend", "lmhead_op"}
    # the blend's >= 0.9-of-copy_ target is stated against check_finite=False; the default (check_finite=True,
    # one more read of the policy) is reported beside it with the traffic model's ceiling (8/12, 6/8)
    blend = [t for t in d["targets"] if t["name"].startswith("blend")]
    assert len(blend) == 4
    for t in blend:
        if "check_finite=False" in t["name"]:
            assert t["target"] == ">= 0.9"
        else:
            assert "check_finite=True" in t["name"]
            assert t["target"] == "reported (traffic-model ceiling " + ("0.67)" if "fp32" in t["name"] else "0.75)")
        assert t["measured"] is not None and t["measured"] > 0


@pytest.mark.parametrize("valid", [0.6, 1.0])
def test_trdpo_loss_matches_float64(dry, valid):
    """TRDPOLoss's dry-run loss vs float64 on the same inputs (rebuilt from the seed, bf16-rounded)."""
    from _cases import BETA, lm_head_inputs

    _, _, docs, _, _ = dry
    r = next(r for r in docs["throughput.json"]["results"]
             if r["case"] == "loss_step" and r["impl"] == "fasttrdpo-auto" and r["shape"]["valid"] == valid)
    s = r["shape"]
    x = lm_head_inputs(s["pairs"], s["seq"], s["hidden"], s["vocab"], torch.device("cpu"), torch.bfloat16, seed=0,
                       valid=valid)
    seqs, bounds = [], []
    for h, w in ((x["hidden"], x["weight"]), (x["ref_hidden"], x["ref_weight"])):
        h, w, y = h.detach().float(), w.detach().float(), x["labels"]
        lp = ref_linear_token_logprobs(h, w, y)
        z = h.double() @ w.double().T
        tol = logprob_tolerance(z, dot_err=dot_error_bound(h, w)).masked_fill(y == -100, 0.0)
        seqs.append(lp.sum(-1))
        bounds.append(tol.sum(-1))
    p = s["pairs"]
    delta = (seqs[0][:p] - seqs[1][:p]) - (seqs[0][p:] - seqs[1][p:])
    loss64 = -torch.nn.functional.logsigmoid(BETA * delta).mean().item()
    # |d loss / d delta_i| <= beta; delta_i sums four sequence log-probs; the fp32 loss arithmetic adds a few u
    dbound = bounds[0][:p] + bounds[1][:p] + bounds[0][p:] + bounds[1][p:]
    tol = (BETA * dbound).mean().item() + 8 * 2.0 ** -24 * (abs(loss64) + 1)
    assert abs(r["numerics"]["loss"] - loss64) <= tol, (r["numerics"]["loss"], loss64, tol)
