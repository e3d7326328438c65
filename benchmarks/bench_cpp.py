"""Benchmarks of the C++ CPU backend (issue 7), same run, same machine:

  1. the machine's bandwidth: a multi-threaded `copy_` of the bytes the blend moves, and a bf16
     `out = a + b` stream with the blend's traffic pattern (2 reads + 1 write per element);
  2. logits-level paired log-probs, forward + backward, N=4096, V=32000, fp32: fasttrdpo with
     backend="cpp" (out of place and in place) against backend="eager" (the library's chunked fp32
     PyTorch, out of place and in place) and the plain PyTorch recipe (log_softmax + gather); time
     and peak memory growth;
  3. bf16 blend over a Pythia-160M-shaped parameter list (the 148 tensors of GPTNeoX 768x12,
     vocab 50304, built on the meta device): fasttrdpo.blend_(backend="cpp") against
     `torch._foreach_lerp_` and the library's eager backend, with the copy bandwidth as the limit.

    .venv/bin/python -m pytest benchmarks/bench_cpp.py --benchmark-only -q -s

The last test prints the ratios; with FASTTRDPO_BENCH_CPP_JSON=PATH it also writes them there (the
committed benchmarks/results/bench_cpp.json is such a run; a plain suite run leaves it alone). Timings are
the minimum over rounds (the machine is shared: the minimum is the least disturbed run); no
assertion depends on a timing.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _measure import MemoryMeter  # noqa: E402

import fasttrdpo  # noqa: E402
from fasttrdpo import _cpp  # noqa: E402

N, V = 4096, 32000
ALPHA = 0.6
ROUNDS = 5          # log-probs: ~0.3-1 s per round
FAST_ROUNDS = 15    # bandwidth and blend: ~50-200 ms per round
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def built():
    fasttrdpo.build_cpp()


def _record(benchmark, key, **extra):
    stats = benchmark.stats.stats
    RESULTS[key] = {"min_s": stats.min, "median_s": stats.median, "rounds": stats.rounds, **extra}
    benchmark.extra_info.update(extra)


def _peak_growth(step, before_each=None) -> int:
    """Peak RSS growth of one call of `step` (after one warm-up call), over the inputs already held."""
    meter = MemoryMeter(torch.device("cpu"))
    if before_each:
        before_each()
    step()
    if before_each:
        before_each()
    meter.start()
    step()
    return meter.peak_growth()


# ---------------------------------------------------------------------------------------- bandwidth
def pythia160m_shapes():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        vocab_size=50304)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(cfg)
    return [tuple(p.shape) for p in model.parameters()]


def _check_blend(fn):
    """Outside the timed region: `fn(refs, pols)` on a few small bf16 pairs gives the fp32 formula
    rounded to nearest even (what every fasttrdpo backend computes, up to the last bit; foreach_lerp_
    uses other formulas, so all are checked within one bf16 ulp of the operands)."""
    g = torch.Generator().manual_seed(5)
    refs = [torch.randn(n, generator=g).to(torch.bfloat16) for n in (1, 77, 5000)]
    pols = [torch.randn(n, generator=g).to(torch.bfloat16) for n in (1, 77, 5000)]
    expect = [(r.float() + torch.tensor(ALPHA) * (p.float() - r.float())).to(torch.bfloat16) for r, p in zip(refs, pols)]
    scale = [torch.maximum(r.float().abs(), p.float().abs()) for r, p in zip(refs, pols)]
    fn(refs, pols)
    for r, e, sc in zip(refs, expect, scale):
        assert ((r.float() - e.float()).abs() <= 2.0 ** -7 * sc).all()  # one bf16 ulp of the operands


@pytest.fixture(scope="module")
def blend_lists():
    g = torch.Generator().manual_seed(0)
    shapes = pythia160m_shapes()
    refs = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
    pols = [(r.float() + 0.01 * torch.randn(s, generator=g)).to(torch.bfloat16) for r, s in zip(refs, shapes)]
    return refs, pols


def _blend_bytes(refs):
    return sum(r.numel() for r in refs) * 6  # read policy + read ref + write ref, 2 B each


def test_copy_bandwidth(benchmark, blend_lists):
    """dst.copy_(src) over the bytes the blend moves (half read, half written): the machine's limit."""
    refs, _ = blend_lists
    nbytes = _blend_bytes(refs)
    src = torch.ones(nbytes // 2 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    benchmark.pedantic(dst.copy_, args=(src,), rounds=FAST_ROUNDS, iterations=1, warmup_rounds=1)
    _record(benchmark, "copy", bytes=nbytes, GBps=nbytes / benchmark.stats.stats.min / 1e9,
            threads=torch.get_num_threads())


def test_stream_add_bandwidth(benchmark, blend_lists):
    """out = a + b over flat bf16 buffers of the blend's element count: the blend's exact traffic
    pattern (two streams read, one written, 6 B per element) with trivial arithmetic."""
    refs, _ = blend_lists
    n = sum(r.numel() for r in refs)
    a = torch.ones(n, dtype=torch.bfloat16)
    b = torch.ones(n, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    torch.add(a, b, out=out)
    benchmark.pedantic(torch.add, args=(a, b), kwargs={"out": out}, rounds=FAST_ROUNDS, iterations=1,
                       warmup_rounds=1)
    _record(benchmark, "stream_add", GBps=6 * n / benchmark.stats.stats.min / 1e9)


# ---------------------------------------------------------------------------------------- blend
def test_blend_foreach_lerp(benchmark, blend_lists):
    refs, pols = blend_lists
    _check_blend(lambda r, p: torch._foreach_lerp_(r, p, ALPHA))
    benchmark.pedantic(torch._foreach_lerp_, args=(refs, pols, ALPHA), rounds=FAST_ROUNDS, iterations=1,
                       warmup_rounds=1)
    _record(benchmark, "blend_foreach_lerp", GBps=_blend_bytes(refs) / benchmark.stats.stats.min / 1e9)


@pytest.mark.parametrize("backend,check_finite", [("cpp", False), ("cpp", True), ("eager", False)])
def test_blend_fasttrdpo(benchmark, blend_lists, backend, check_finite):
    """The public op; check_finite=False is the like-for-like comparison with `_foreach_lerp_`, True
    (the default) adds the NaN/inf pre-pass over the policy."""
    refs, pols = blend_lists
    _check_blend(lambda r, p: fasttrdpo.blend_(ref_tensors=r, policy_tensors=p, alpha=ALPHA, backend=backend))
    benchmark.pedantic(
        lambda: fasttrdpo.blend_(ref_tensors=refs, policy_tensors=pols, alpha=ALPHA, check_finite=check_finite,
                                 backend=backend),
        rounds=FAST_ROUNDS if backend == "cpp" else ROUNDS, iterations=1, warmup_rounds=1)
    assert fasttrdpo.last_backend("blend_") == backend
    key = f"blend_{backend}" + ("_check_finite" if check_finite else "")
    _record(benchmark, key, GBps=_blend_bytes(refs) / benchmark.stats.stats.min / 1e9)


def test_blend_cpp_kernel_only(benchmark, blend_lists):
    """The C++ op alone (no Python validation or aliasing checks)."""
    refs, pols = blend_lists
    _check_blend(lambda r, p: _cpp.blend_(r, p, ALPHA))
    benchmark.pedantic(_cpp.blend_, args=(refs, pols, ALPHA), rounds=FAST_ROUNDS, iterations=1, warmup_rounds=1)
    _record(benchmark, "blend_cpp_kernel", GBps=_blend_bytes(refs) / benchmark.stats.stats.min / 1e9)


# ---------------------------------------------------------------------------------------- log-probs
@pytest.fixture(scope="module")
def logits_inputs():
    g = torch.Generator().manual_seed(1)
    policy = torch.randn(N, V, generator=g) * 2
    ref = torch.randn(N, V, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)  # every token counted: the full cost
    return policy, ref, labels


def _fasttrdpo_step(policy, ref, labels, backend, inplace):
    def run():
        lp, rl = fasttrdpo.paired_token_logprobs(policy.leaf, ref, labels, inplace_backward=inplace,
                                                 backend=backend)
        return torch.autograd.grad((lp - rl).sum(), policy.leaf)[0]

    return run


def _torch_step(policy, ref, labels):
    def run():
        logp = torch.log_softmax(policy.leaf, -1).gather(1, labels[:, None])[:, 0]
        with torch.no_grad():
            ref_logp = torch.log_softmax(ref, -1).gather(1, labels[:, None])[:, 0]
        return torch.autograd.grad((logp - ref_logp).sum(), policy.leaf)[0]

    return run


class _Leaf:
    """A fresh leaf per round (the in-place backward overwrites its logits). The gradient is taken with
    `torch.autograd.grad`, as the logits' gradient reaches the lm_head backward in a model: no
    accumulation into a `.grad` buffer (which would copy the in-place result)."""

    def __init__(self, source, copy):
        self.source, self.copy, self.leaf = source, copy, None

    def reset(self):
        self.leaf = None
        self.leaf = (self.source.clone() if self.copy else self.source.detach()).requires_grad_()


CASES = {
    "torch": lambda p, r, l: _torch_step(p, r, l),
    "eager": lambda p, r, l: _fasttrdpo_step(p, r, l, "eager", False),
    "eager_inplace": lambda p, r, l: _fasttrdpo_step(p, r, l, "eager", True),
    "cpp": lambda p, r, l: _fasttrdpo_step(p, r, l, "cpp", False),
    "cpp_inplace": lambda p, r, l: _fasttrdpo_step(p, r, l, "cpp", True),
}


@pytest.mark.parametrize("impl", list(CASES))
def test_paired_logprobs_fwd_bwd(benchmark, logits_inputs, impl):
    policy_src, ref, labels = logits_inputs
    leaf = _Leaf(policy_src, copy=impl.endswith("_inplace"))
    step = CASES[impl](leaf, ref, labels)
    peak = _peak_growth(step, leaf.reset)
    benchmark.pedantic(step, setup=leaf.reset, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    # Outside the timed region: a fast wrong kernel fails instead of winning. d(Σ logp)/dz of the
    # first rows against float64 onehot − softmax (fp32 errors are ~1e-9 here; a wrong row or index
    # gives O(1/V) to O(1)).
    leaf.reset()
    grad = step()[:8].double()
    z = policy_src[:8].double()
    expect = torch.nn.functional.one_hot(labels[:8], V).double() - torch.softmax(z, -1)
    assert (grad - expect).abs().max().item() < 1e-6, impl
    grad = None
    leaf.leaf = None
    _record(benchmark, f"logprobs_{impl}", peak_growth_MiB=peak / 2**20)


# ---------------------------------------------------------------------------------------- summary
def test_summary(benchmark):
    """Prints the issue-7 ratios and writes them next to the other results (runs last in the file)."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    r = RESULTS
    need = ["copy", "blend_foreach_lerp", "blend_cpp", "logprobs_eager", "logprobs_cpp"]
    if any(k not in r for k in need):
        pytest.skip("run the whole file to get the summary")
    summary = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_capability": _cpp.capability(), "torch": torch.__version__,
                    "loadavg": list(os.getloadavg()),
                    # PyTorch's switch for 2 MiB-aligned, MADV_HUGEPAGE CPU allocations (read at start-up)
                    "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "copy_GBps": r["copy"]["GBps"],
        "stream_add_GBps": r.get("stream_add", {}).get("GBps"),
        "blend": {k: r[k]["GBps"] for k in r if k.startswith("blend_")},
        "blend_speedup_cpp_vs_foreach_lerp": r["blend_foreach_lerp"]["min_s"] / r["blend_cpp"]["min_s"],
        "blend_foreach_lerp_fraction_of_copy": r["blend_foreach_lerp"]["GBps"] / r["copy"]["GBps"],
        "blend_cpp_fraction_of_copy": r["blend_cpp"]["GBps"] / r["copy"]["GBps"],
        "blend_cpp_kernel_fraction_of_stream_add": (r["blend_cpp_kernel"]["GBps"] / r["stream_add"]["GBps"]
                                                    if "stream_add" in r and "blend_cpp_kernel" in r else None),
        "logprobs_min_s": {k[len("logprobs_"):]: r[k]["min_s"] for k in r if k.startswith("logprobs_")},
        "logprobs_peak_growth_MiB": {k[len("logprobs_"):]: r[k]["peak_growth_MiB"] for k in r
                                     if k.startswith("logprobs_")},
        "logprobs_speedup_cpp_vs_eager": r["logprobs_eager"]["min_s"] / r["logprobs_cpp"]["min_s"],
    }
    if "logprobs_cpp_inplace" in r:
        summary["logprobs_speedup_cpp_inplace_vs_eager"] = (r["logprobs_eager"]["min_s"]
                                                            / r["logprobs_cpp_inplace"]["min_s"])
        if "logprobs_eager_inplace" in r:  # like for like: both write the gradient over the logits
            summary["logprobs_speedup_cpp_inplace_vs_eager_inplace"] = (r["logprobs_eager_inplace"]["min_s"]
                                                                        / r["logprobs_cpp_inplace"]["min_s"])
    if "logprobs_torch" in r:
        summary["logprobs_speedup_cpp_vs_torch"] = r["logprobs_torch"]["min_s"] / r["logprobs_cpp"]["min_s"]
    print("\n" + json.dumps(summary, indent=2))
    target = os.environ.get("FASTTRDPO_BENCH_CPP_JSON")
    if target:
        out = Path(target)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
