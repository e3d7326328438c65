"""benchmarks/throughput.py runs end to end in --quick mode and writes a complete, consistent JSON.

What is asserted (never timings): every implementation of every case is either measured or reported
as skipped with a reason (the installed peers are measured); timed runs and medians are consistent;
every measured implementation agrees with the others (the script's own check), and the loss-step
losses agree with an independent float64 computation within a bound derived from fp32 arithmetic.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from helpers import dot_error_bound, logprob_tolerance, ref_linear_token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

PEERS_INSTALLED = {  # test extra: these must be measured, not skipped
    "loss_step": {"naive", "trl", "trl-chunked", "liger"},
    "lmhead_op": {"naive"},
    "logits_step": {"naive", "trl"},
    "blend": {"trl-loop", "foreach-lerp"},
    "e2e": {"trl-dpotrainer"},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    js, png = out / "quick.json", out / "quick.png"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTTRDPO_BACKEND")}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "throughput.py"), "--quick", "--json", str(js),
                           "--plot", str(png)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(js) as f:
        doc = json.load(f)
    return doc, proc.stdout, png


def test_json_header_records_the_environment(run):
    doc, _, _ = run
    assert doc["schema"] == "fasttrdpo-throughput/1"
    assert doc["quick"] is True and doc["repeats"] == 3 and "quick" in doc["repeats_note"]
    env = doc["environment"]
    assert env["device"] == "cpu" and env["threads"] >= 1 and env["cpu_count"] >= 1
    assert len(env["loadavg_start"]) == 3 and len(env["loadavg_end"]) == 3
    for pkg in ("torch", "trl", "liger-kernel", "transformers", "python"):
        assert env["versions"][pkg], pkg
    assert "VmHWM" in env["memory_method"]


def test_every_implementation_is_measured_or_skipped_with_a_reason(run):
    from _cases import CASES

    doc, stdout, _ = run
    rows = doc["results"]
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    assert set(by_case) == {"loss_step", "lmhead_op", "logits_step", "blend", "e2e"}
    for case, case_rows in by_case.items():
        impls = set(CASES[case].IMPLS) if case in CASES else {"trl-dpotrainer", "fasttrdpo"}
        shapes = {json.dumps(r["shape"], sort_keys=True) for r in case_rows}
        for shape in shapes:
            got = {r["impl"]: r for r in case_rows if json.dumps(r["shape"], sort_keys=True) == shape}
            assert set(got) == impls, (case, impls - set(got))
            for impl, r in got.items():
                assert r["status"] in ("ok", "skipped"), (case, impl, r.get("reason"), r.get("traceback"))
                if r["status"] == "skipped":
                    assert r["reason"], (case, impl)
                    assert impl not in PEERS_INSTALLED[case], f"{case}/{impl} is installed but skipped: {r['reason']}"
                    assert f"{impl}" in stdout  # listed in the table, not silently dropped
    # the CUDA-only implementation says why it did not run
    trit = [r for r in rows if r["impl"] == "fasttrdpo-triton"]
    assert trit and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in trit)


def test_timings_and_memory_are_consistent(run):
    doc, _, png = run
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert ok
    for r in ok:
        assert len(r["times_s"]) == doc["repeats"], r["impl"]
        assert all(t > 0 for t in r["times_s"])
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert isinstance(r["peak_growth_bytes"], int) and isinstance(r["first_call_peak_growth_bytes"], int)
    # ratios: the best TRL path of a shape has ratio 1 on the metric it is best at
    for r in ok:
        if r["case"] == "loss_step" and r["impl"] in ("trl", "trl-chunked"):
            assert r["ratios"]["time_vs_best_trl"] >= 1.0 - 1e-12
    e2e = [r for r in ok if r["case"] == "e2e"]
    for r in e2e:
        assert r["tokens_per_step"] > 0 and r["token_counts_seen"] == [r["tokens_per_step"]]
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["median_s"])
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_implementations_agree(run):
    doc, _, _ = run
    checked = 0
    for r in doc["results"]:
        if r["status"] != "ok" or r["case"] == "e2e":
            continue
        assert r["numerics_ok"] is True, (r["case"], r["impl"], r.get("numerics_note"))
        checked += 1
    assert checked >= 10
    blend = [r for r in doc["results"] if r["case"] == "blend" and r["status"] == "ok"]
    assert all(r["numerics"]["checked_tensors"] >= 2 for r in blend)


def test_loss_step_matches_float64(run):
    """Each implementation's loss vs float64 on the same inputs (rebuilt from the seed)."""
    from _cases import BETA, lm_head_inputs

    doc, _, _ = run
    rows = [r for r in doc["results"] if r["case"] == "loss_step" and r["status"] == "ok"]
    assert rows
    for shape in {json.dumps(r["shape"], sort_keys=True) for r in rows}:
        s = json.loads(shape)
        x = lm_head_inputs(s["pairs"], s["seq"], s["hidden"], s["vocab"], torch.device("cpu"), torch.float32, seed=0)
        seqs, bounds = [], []
        for h, w in ((x["hidden"], x["weight"]), (x["ref_hidden"], x["ref_weight"])):
            h, w, y = h.detach(), w.detach(), x["labels"]
            lp = ref_linear_token_logprobs(h, w, y)
            z = h.double() @ w.double().T
            tol = logprob_tolerance(z, dot_err=dot_error_bound(h, w)).masked_fill(y == -100, 0.0)
            seqs.append(lp.sum(-1))
            bounds.append(tol.sum(-1))  # a sequence's log-prob errs by at most the sum of its tokens' bounds
        p = s["pairs"]
        delta = (seqs[0][:p] - seqs[1][:p]) - (seqs[0][p:] - seqs[1][p:])
        loss64 = -torch.nn.functional.logsigmoid(BETA * delta).mean().item()
        # |d loss_i / d delta_i| <= beta; delta_i sums four sequence log-probs; fp32 loss arithmetic adds a few u
        dbound = bounds[0][:p] + bounds[1][:p] + bounds[0][p:] + bounds[1][p:]
        tol = (BETA * dbound).mean().item() + 8 * 2.0 ** -24 * (abs(loss64) + 1)
        for r in rows:
            if json.dumps(r["shape"], sort_keys=True) != shape:
                continue
            err = abs(r["numerics"]["loss"] - loss64)
            assert err <= tol, (r["impl"], r["numerics"]["loss"], loss64, err, tol)
            assert math.isfinite(r["numerics"]["grad_weight"]["norm"]) and r["numerics"]["grad_weight"]["norm"] > 0


def test_markdown_report_lists_every_row(run, tmp_path):
    doc, _, _ = run
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "throughput.py"), "--markdown", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| case | shape | implementation |" in out
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert out.count("\n| ") - 1 == len(ok)  # one table row per measured implementation (+ the header)
    for r in doc["results"]:
        if r["status"] != "ok":
            assert f"{r['case']} / {r['impl']}: skipped" in out
