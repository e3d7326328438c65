"""The C++ CPU kernels (csrc/, loaded by fasttrdpo._cpp) against float64 references.

The extension is built once per session (`cpp` fixture; a cold build takes 20-40 s and is part of
the CI budget), through a subprocess first so that the build report on stderr can be checked.
Tolerances come from tests/helpers.py (derivations there) and `grad_tolerance` below.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import (
    SUBNORMAL_SPACING,
    U32,
    UNIT_ROUNDOFF,
    assert_close_tol,
    blend_tolerance,
    logprob_tolerance,
    ref_blend64,
    ref_token_logprobs,
)

import fasttrdpo
from fasttrdpo import _cpp

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BUILD_MESSAGE = "fasttrdpo: building the C++ CPU kernels"


def _run_python(code: str, _timeout: float = 600, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=_timeout)


@pytest.fixture(scope="session")
def cpp_build():
    """Build (or find cached) the extension in a fresh process, then load it here.

    Returns (was_cold, stderr of the building process)."""
    was_cold = not _cpp.is_built()
    proc = _run_python("import fasttrdpo._cpp as c; c.load(); print(c.is_loaded())")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "True"
    _cpp.load()
    return was_cold, proc.stderr


@pytest.fixture
def cpp(cpp_build):
    return _cpp


# ----------------------------------------------------------------------------------------------
# build, cache, backend selection
# ----------------------------------------------------------------------------------------------


def test_build_reported_once_then_cached(cpp_build):
    was_cold, build_stderr = cpp_build
    # The first process builds (announced, with the time taken) only if the cache was cold.
    assert (BUILD_MESSAGE in build_stderr) == was_cold, build_stderr
    if was_cold:
        assert "C++ CPU kernels built in" in build_stderr
    assert _cpp.is_built()
    # A second process loads from the cache: no build message, and no compiler ran (every build output
    # keeps its modification time; a timing bound would only measure the machine's load).
    outputs = sorted(p for p in Path(_cpp.build_dir()).iterdir() if p.suffix in (".o", ".so"))
    assert outputs, "the build directory holds no objects"
    before = {p.name: p.stat().st_mtime_ns for p in outputs}
    proc = _run_python("""
        import fasttrdpo._cpp as c
        c.load()
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert BUILD_MESSAGE not in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in outputs} == before
    # Loading again in the same process returns the same op namespace.
    assert _cpp.load() is _cpp.load() is torch.ops.fasttrdpo


def test_auto_picks_cpp_only_after_build(cpp_build):
    proc = _run_python("""
        import torch, fasttrdpo
        from fasttrdpo import _cpp
        from fasttrdpo._backend import resolve_backend
        cpu = torch.device("cpu")
        print(_cpp.is_loaded(), resolve_backend("op", None, cpu), resolve_backend("op", "auto", cpu))
        path = fasttrdpo.build_cpp()
        print(_cpp.is_loaded(), resolve_backend("op", None, cpu), path == _cpp.build_dir())
    """, FASTTRDPO_BACKEND="auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = proc.stdout.split("\n")[:2]
    assert before == "False eager eager"  # importing fasttrdpo builds and loads nothing
    assert after == "True cpp True"


def test_env_switch_loads_cpp(cpp_build):
    proc = _run_python("""
        import torch
        from fasttrdpo import _cpp
        from fasttrdpo._backend import resolve_backend
        print(_cpp.is_loaded(), resolve_backend("op", None, torch.device("cpu")), _cpp.is_loaded())
    """, FASTTRDPO_BACKEND="cpp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False cpp True"


def test_stale_build_lock_is_cleared(cpp_build, tmp_path):
    """A lock left by a killed build would make torch wait forever: removed (reported) at once, even when
    it is seconds old, since no fasttrdpo process holds the build guard (the kernel drops a dead holder's
    flock); before the guard it took STALE_LOCK_S (10 min) of waiting."""
    import shutil

    cache = tmp_path / "cache"
    bdir = cache / _cpp.build_dir().name
    shutil.copytree(_cpp.build_dir(), bdir)  # a built cache (mtimes kept: ninja has nothing to do)
    (bdir / "lock").unlink(missing_ok=True)
    (bdir / "lock").touch()  # fresh: as a build killed a moment ago leaves it
    proc = _run_python("import fasttrdpo._cpp as c; c.load(); print(c.is_loaded())",
                       FASTTRDPO_CACHE=str(cache), _timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "True"
    assert "removing a stale build lock" in proc.stderr and BUILD_MESSAGE not in proc.stderr
    assert not (bdir / "lock").exists()


def test_build_failure_raises_with_compiler_summary(cpp_build, tmp_path, monkeypatch):
    """A source that does not compile: RuntimeError naming the compiler error; nothing is loaded."""
    bad = tmp_path / "src"
    bad.mkdir()
    for name in _cpp.SOURCES + _cpp.HEADERS:
        (bad / name).write_text("#error fasttrdpo_deliberate_failure\n")
    monkeypatch.setattr(_cpp, "source_dir", lambda: bad)
    monkeypatch.setattr(_cpp, "_ext", None)
    monkeypatch.setenv("FASTTRDPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="fasttrdpo_deliberate_failure"):
        _cpp.load()
    assert not _cpp.is_loaded()


# ----------------------------------------------------------------------------------------------
# forward: paired log-probs and lse
# ----------------------------------------------------------------------------------------------

# V below, at and around the vector step (32 fp32 lanes x 2 on AVX512) and the 8-step block.
# N < 64 with V ≥ 8192 splits rows into vector-aligned segments (csrc/logprobs.cpp split_rows):
# (1, 20000) in 5 segments, (3, 9000) in 3 with a ragged last one.
SHAPES = [(1, 1), (1, 5), (3, 31), (4, 32), (2, 33), (5, 255), (3, 256), (2, 257), (6, 1000), (2, 4099),
          (1, 20000), (3, 9000)]


def _make(n, v, dtype, seed, scale=4.0, ignore_frac=0.25, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    policy = (torch.randn(n, v, generator=g) * scale).to(dtype)
    ref = (torch.randn(n, v, generator=g) * scale + 1.0).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < ignore_frac
    labels[ignored] = ignore_index
    return policy, ref, labels


def _check_forward(policy, ref, labels, ignore_index, out):
    lp, lse, lr = out
    assert lp.dtype == lse.dtype == torch.float32 and lp.shape == labels.shape
    tol_p = logprob_tolerance(policy.double())
    assert_close_tol(lp, ref_token_logprobs(policy, labels, ignore_index), tol_p, "policy logp")
    valid = labels != ignore_index
    # lse carries the same error terms as the log-prob (see helpers.logprob_tolerance).
    assert_close_tol(lse[valid], torch.logsumexp(policy.double(), -1)[valid], tol_p[valid], "policy lse")
    if ref is None:
        assert lr is None
    else:
        assert_close_tol(lr, ref_token_logprobs(ref, labels, ignore_index), logprob_tolerance(ref.double()),
                         "ref logp")
    # Ignored tokens are exactly 0.0 (also the sign: no -0.0 surprises in sums).
    assert torch.equal(lp[~valid], torch.zeros_like(lp[~valid]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", SHAPES)
def test_forward_matches_float64(cpp, n, v, dtype):
    policy, ref, labels = _make(n, v, dtype, seed=n * 10007 + v)
    _check_forward(policy, ref, labels, -100, cpp.paired_logprobs_forward(policy, ref, labels, -100))


@pytest.mark.parametrize("policy_dtype", DTYPES)
@pytest.mark.parametrize("ref_dtype", DTYPES)
def test_forward_mixed_policy_and_reference_dtypes(cpp, policy_dtype, ref_dtype):
    policy, _, labels = _make(5, 333, policy_dtype, seed=21)
    _, ref, _ = _make(5, 333, ref_dtype, seed=22)
    _check_forward(policy, ref, labels, -100, cpp.paired_logprobs_forward(policy, ref, labels, -100))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_without_reference_and_custom_ignore_index(cpp, dtype):
    policy, _, labels = _make(7, 300, dtype, seed=3, ignore_index=0)  # 0 is also a valid token id
    labels[1] = 0
    out = cpp.paired_logprobs_forward(policy, None, labels, 0)
    _check_forward(policy, None, labels, 0, out)
    assert out[0][1].item() == 0.0


def test_forward_all_rows_ignored(cpp):
    policy, ref, labels = _make(4, 100, torch.float32, seed=5)
    labels.fill_(-100)
    lp, lse, lr = cpp.paired_logprobs_forward(policy, ref, labels, -100)
    assert torch.equal(lp, torch.zeros(4)) and torch.equal(lr, torch.zeros(4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_labels_give_nan_without_reading_out_of_bounds(cpp, dtype):
    # The rows are views into a wider buffer whose extra columns hold huge finite values: reading
    # one past the row (label V) or before it (label -1) would give a finite log-prob, not NaN.
    v = 70
    buf = torch.full((5, v + 9), 3.0e4).to(dtype)
    buf[:, :v] = torch.randn(5, v).to(dtype)
    policy, ref = buf[:, :v], buf.clone()[:, :v]
    labels = torch.tensor([3, v, -1, 2**40, -100])
    lp, lse, lr = cpp.paired_logprobs_forward(policy, ref, labels, -100)
    assert torch.isfinite(lp[0]) and torch.isfinite(lr[0])
    assert torch.isnan(lp[1:4]).all() and torch.isnan(lr[1:4]).all()
    assert lp[4].item() == 0.0 and lr[4].item() == 0.0
    # The lse of a bad-label row is still the row's lse (the row itself is fine).
    assert_close_tol(lse[1:4], torch.logsumexp(policy.double(), -1)[1:4],
                     logprob_tolerance(policy.double())[1:4], "lse of bad-label rows")


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_masked_vocabulary_minus_inf(cpp, dtype):
    """-inf logits (masked tokens), including whole vector blocks of them, are just excluded."""
    n, v = 4, 700
    policy, ref, labels = _make(n, v, dtype, seed=11, ignore_frac=0.0)
    policy[:, :300] = float("-inf")  # whole blocks -inf at the start of every row
    policy[1, 400:] = float("-inf")  # row 1: only a middle band is finite
    policy[2, 650:] = float("-inf")  # -inf in the scalar tail
    labels[:] = torch.tensor([310, 350, 600, 100])  # row 3: the label itself is masked
    lp, lse, _ = cpp.paired_logprobs_forward(policy, None, labels, -100)
    finite = torch.where(torch.isinf(policy), torch.zeros_like(policy), policy).double()
    expect = ref_token_logprobs(policy, labels)
    assert torch.isfinite(expect[:3]).all() and expect[3].item() == float("-inf")
    assert_close_tol(lp[:3], expect[:3], logprob_tolerance(finite)[:3], "logp with -inf logits")
    assert lp[3].item() == float("-inf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_anywhere_in_a_row_makes_its_lse_nan(cpp, dtype):
    """The running max does not propagate NaN (one instruction); the running sum must. NaN at the first
    element, inside and at the edges of a vector step and of a block, and in the scalar tail, of
    otherwise ordinary rows (one task per row, no segments): exactly those rows' outputs are NaN."""
    n, v = 72, 1000  # 1000 = 3 blocks of 256 + 7 steps of 32 + a tail of 8
    policy, ref, labels = _make(n, v, dtype, seed=21, ignore_frac=0.0)
    cols = [0, 15, 16, 31, 32, 255, 256, 511, 767, 768, 991, 992, 999]
    for row, col in enumerate(cols):
        policy[row, col] = float("nan")
    ref[len(cols), 500] = float("nan")  # a NaN reference row leaves the policy row alone
    lp, lse, lr = cpp.paired_logprobs_forward(policy, ref, labels, -100)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[: len(cols)] = True
    assert torch.isnan(lp[bad]).all() and torch.isnan(lse[bad]).all()
    assert not torch.isnan(lp[~bad]).any() and torch.isnan(lr[len(cols)])
    good = ~bad
    assert_close_tol(lp[good], ref_token_logprobs(policy[good], labels[good]),
                     logprob_tolerance(policy[good].double()), "logp beside NaN rows")


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_rows_masked_segments_and_bad_labels(cpp, dtype):
    """Short batch, long rows (segmented): whole -inf segments, a NaN row, bad labels, in-place grad."""
    n, v = 4, 20000
    policy, ref, labels = _make(n, v, dtype, seed=13, ignore_frac=0.0)
    policy[0, :12288] = float("-inf")  # the first three 4096-segments of row 0 hold only -inf
    policy[1, 17000] = float("nan")    # NaN in the last segment: the whole row's lse is NaN
    labels[:] = torch.tensor([19999, 5, v, 4096])  # row 2: bad label
    lp, lse, lr = cpp.paired_logprobs_forward(policy, ref, labels, -100)
    finite = torch.where(torch.isinf(policy), torch.zeros_like(policy), policy).double()
    expect = ref_token_logprobs(policy, labels.clamp(max=v - 1))
    tol = logprob_tolerance(finite)
    assert_close_tol(lp[[0, 3]], expect[[0, 3]], tol[[0, 3]], "segmented logp")
    assert torch.isnan(lp[1]) and torch.isnan(lse[1]) and torch.isnan(lp[2]) and torch.isnan(lr[2])
    assert_close_tol(lr[[0, 1, 3]], ref_token_logprobs(ref, labels.clamp(max=v - 1))[[0, 1, 3]],
                     logprob_tolerance(ref.double())[[0, 1, 3]], "segmented ref logp")
    grad = torch.randn(n)
    buf = policy.clone()
    cpp.logprobs_backward(grad, buf, lse, labels, -100, True)
    keep = [0, 3]
    expect_g = ref_grad64(policy[keep], labels[keep], grad[keep])
    assert_close_tol(buf[keep], expect_g, grad_tolerance(policy[keep], tol[keep], grad[keep], labels[keep]),
                     "segmented in-place grad")
    assert torch.isnan(buf[2]).all()


def test_forward_strided_rows_and_bad_arguments(cpp):
    buf = torch.randn(6, 130)
    policy = buf[:, 1:101]  # row stride 130, unit stride along V
    labels = torch.randint(0, 100, (6,))
    lp, _, _ = cpp.paired_logprobs_forward(policy, None, labels, -100)
    assert_close_tol(lp, ref_token_logprobs(policy, labels), logprob_tolerance(policy.double()), "strided")
    with pytest.raises(RuntimeError, match="contiguous along the vocabulary"):
        cpp.paired_logprobs_forward(buf.T, None, torch.zeros(130, dtype=torch.long), -100)
    with pytest.raises(RuntimeError, match="shape"):
        cpp.paired_logprobs_forward(policy, buf[:5, :100], labels, -100)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpp.paired_logprobs_forward(policy.double(), None, labels, -100)
    with pytest.raises(RuntimeError, match="labels"):
        cpp.paired_logprobs_forward(policy, None, labels.int(), -100)


# ----------------------------------------------------------------------------------------------
# backward: g·(onehot − softmax)
# ----------------------------------------------------------------------------------------------


def grad_tolerance(logits: torch.Tensor, lse_tol: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor):
    """Bound on |kernel grad − float64 grad| per element, for a kernel given an lse within lse_tol.

    The kernel forms d = fl(z − lse) (error ≤ lse_tol + u·|z − lse|), p = exp(d) (≤ 2u relative:
    test_vector_exp_error_bound), then fl(−g·p) or fl(g·(1 − p)) (≤ 2 more roundings, relative to |g|·p and
    |g|·|1 − p|), then one rounding into the logits dtype (u_dtype relative + half a subnormal
    spacing); fp32 exp of very negative arguments may flush below 2^-126 (absolute |g|·2^-126).
    e^x − 1 ≤ 1.01·x for the small x involved.
    """
    z = logits.double()
    lse = torch.logsumexp(z, -1, keepdim=True)
    p = torch.exp(z - lse)
    g = grad.double().abs().unsqueeze(-1)
    rel_p = 1.01 * (lse_tol.unsqueeze(-1) + U32 * (z - lse).abs()) + 2 * U32
    onehot = torch.zeros_like(z)
    valid = (labels >= 0) & (labels < z.shape[-1])
    onehot[valid] = torch.nn.functional.one_hot(labels[valid], z.shape[-1]).double()
    exact = g * (onehot - p).abs()
    p_err = torch.where(p == 0, torch.zeros_like(p), p * rel_p)  # a -inf logit: p = 0 exactly, no error
    fp32_err = g * p_err + 2 * U32 * exact + g * 2.0 ** -126
    u = UNIT_ROUNDOFF[logits.dtype]
    return fp32_err + u * (exact + fp32_err) + SUBNORMAL_SPACING[logits.dtype]


def ref_grad64(logits, labels, grad, ignore_index=-100):
    z = logits.double().requires_grad_()
    ref_token_logprobs(z, labels, ignore_index).backward(grad.double())
    return z.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", SHAPES)
def test_backward_matches_float64(cpp, n, v, dtype):
    policy, _, labels = _make(n, v, dtype, seed=n * 31 + v)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(v))
    _, lse, _ = cpp.paired_logprobs_forward(policy, None, labels, -100)
    out = cpp.logprobs_backward(grad, policy, lse, labels, -100, False)
    assert out.dtype == dtype and out.shape == policy.shape
    expect = ref_grad64(policy, labels, grad)
    tol = grad_tolerance(policy, logprob_tolerance(policy.double()), grad, labels)
    assert_close_tol(out, expect, tol, "grad logits")
    ignored = labels == -100
    assert torch.equal(out[ignored], torch.zeros_like(out[ignored]))  # exactly 0, not just small


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_in_place_matches_out_of_place(cpp, dtype):
    policy, _, labels = _make(9, 517, dtype, seed=17)
    labels[4] = 517  # bad label: NaN row
    grad = torch.randn(9)
    _, lse, _ = cpp.paired_logprobs_forward(policy, None, labels, -100)
    out = cpp.logprobs_backward(grad, policy, lse, labels, -100, False)
    buf = policy.clone()
    version = buf._version
    ret = cpp.logprobs_backward(grad, buf, lse, labels, -100, True)
    assert ret.data_ptr() == buf.data_ptr()
    assert buf._version > version  # autograd knows the buffer was overwritten
    assert torch.equal(torch.nan_to_num(buf, nan=7.0), torch.nan_to_num(out, nan=7.0))
    assert torch.isnan(buf[4]).all() and not torch.isnan(buf[[0, 1, 2, 3, 5, 6, 7, 8]]).any()


def test_backward_in_place_strided_leaves_other_columns(cpp):
    buf = torch.randn(5, 90)
    logits = buf[:, 5:85]
    labels = torch.tensor([0, 79, -100, 40, 3])
    grad = torch.randn(5)
    _, lse, _ = cpp.paired_logprobs_forward(logits, None, labels, -100)
    before = buf.clone()
    cpp.logprobs_backward(grad, logits, lse, labels, -100, True)
    assert torch.equal(buf[:, :5], before[:, :5]) and torch.equal(buf[:, 85:], before[:, 85:])
    expect = ref_grad64(before[:, 5:85], labels, grad)
    assert_close_tol(logits, expect, grad_tolerance(before[:, 5:85], logprob_tolerance(before[:, 5:85].double()),
                                                    grad, labels), "strided in-place grad")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), v=st.integers(1, 600), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2**31 - 1))
def test_random_forward_backward(cpp_build, n, v, dtype, scale, seed):
    policy, ref, labels = _make(n, v, dtype, seed, scale=scale)
    out = _cpp.paired_logprobs_forward(policy, ref, labels, -100)
    _check_forward(policy, ref, labels, -100, out)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    gz = _cpp.logprobs_backward(grad, policy, out[1], labels, -100, False)
    tol = grad_tolerance(policy, logprob_tolerance(policy.double()), grad, labels)
    assert_close_tol(gz, ref_grad64(policy, labels, grad), tol, "grad logits")


# ----------------------------------------------------------------------------------------------
# blend_
# ----------------------------------------------------------------------------------------------

PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
         (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
BLEND_SHAPES = [(), (1,), (31,), (33,), (4, 17), (70001,)]  # 70001 > one chunk of 32768 elements


def _blend_pairs(ref_dtype, pol_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    refs, pols = [], []
    for shape in BLEND_SHAPES:
        r = torch.randn(shape, generator=g) * 2.0
        # Policy close to the reference (what training produces) for half the elements, far for the rest,
        # plus exact ties and cancellations.
        p = r + torch.randn(shape, generator=g) * torch.where(torch.rand(shape, generator=g) < 0.5, 1e-3, 3.0)
        refs.append(r.to(ref_dtype))
        pols.append(p.to(pol_dtype))
    refs[-1].view(-1)[:4] = torch.tensor([1.0, -2.0, 0.0, 65504.0 / 4]).to(ref_dtype)
    pols[-1].view(-1)[:4] = torch.tensor([1.0, 2.0, -0.0, -65504.0 / 4]).to(pol_dtype)
    return refs, pols


@pytest.mark.parametrize("alpha", [0.6, 0.5, 1e-3, 0.999])
@pytest.mark.parametrize("ref_dtype,pol_dtype", PAIRS)
def test_blend_matches_float64_and_fp32_formula(cpp, ref_dtype, pol_dtype, alpha):
    refs, pols = _blend_pairs(ref_dtype, pol_dtype, seed=int(alpha * 1000) + len(str(ref_dtype)))
    originals = [r.clone() for r in refs]
    cpp.blend_(refs, pols, alpha)
    for r0, p, r in zip(originals, pols, refs):
        assert r.dtype == ref_dtype
        expect = ref_blend64(r0, p, alpha).to(ref_dtype)
        assert_close_tol(r, expect, blend_tolerance(r0, p, alpha), f"blend {ref_dtype}/{pol_dtype}")
        # The documented formula, evaluated by torch in fp32 one op at a time and rounded to nearest
        # even: the kernel does the same operations, so the results are identical (no FMA).
        r32, p32 = r0.float(), p.float()
        a32 = torch.tensor(alpha, dtype=torch.float32)
        assert torch.equal(r, (r32 + a32 * (p32 - r32)).to(ref_dtype))


@pytest.mark.parametrize("ref_dtype,pol_dtype", PAIRS)
def test_blend_alpha_one_is_cast_copy_and_zero_writes_nothing(cpp, ref_dtype, pol_dtype):
    refs, pols = _blend_pairs(ref_dtype, pol_dtype, seed=1)
    pols[0].fill_(float("nan"))  # α = 0 must not even read into the result
    before = [r.clone() for r in refs]
    versions = [r._version for r in refs]
    cpp.blend_(refs, pols, 0.0)
    for r, b, ver in zip(refs, before, versions):
        assert torch.equal(r, b) and r._version == ver
    refs[2][0] = 1e30 if ref_dtype == torch.float32 else 1e3  # a huge ref value must not leak into a copy
    cpp.blend_(refs, pols, 1.0)
    for r, p, ver in zip(refs[1:], pols[1:], versions[1:]):
        assert torch.equal(r, p.to(ref_dtype)) and r._version > ver
    assert torch.isnan(refs[0]).all()


def test_blend_checks_every_pair_before_writing(cpp):
    refs = [torch.zeros(10), torch.zeros(5)]
    pols = [torch.ones(10), torch.ones(6)]
    with pytest.raises(RuntimeError, match="shapes differ"):
        cpp.blend_(refs, pols, 0.5)
    assert torch.equal(refs[0], torch.zeros(10))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpp.blend_([torch.zeros(4, 4).T], [torch.ones(4, 4)], 0.5)
    with pytest.raises(RuntimeError, match="alpha"):
        cpp.blend_(refs[:1], pols[:1], 1.5)
    with pytest.raises(RuntimeError, match="float32/bfloat16/float16"):
        cpp.blend_([torch.zeros(3, dtype=torch.float64)], [torch.ones(3, dtype=torch.float64)], 0.5)
    with pytest.raises(RuntimeError, match="2 reference tensors but 1"):
        cpp.blend_(refs, pols[:1], 0.5)
    cpp.blend_([], [], 0.5)  # nothing to do


def test_blend_many_tensors_in_one_call(cpp):
    """Chunks from many pairs share one parallel loop: every pair is updated, none twice."""
    g = torch.Generator().manual_seed(2)
    shapes = [(int(s),) for s in torch.randint(1, 5000, (60,), generator=g)] + [(300, 301)]
    refs = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
    pols = [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]
    before = [r.clone() for r in refs]
    cpp.blend_(refs, pols, 0.25)
    for r0, p, r in zip(before, pols, refs):
        r32, p32 = r0.float(), p.float()
        assert torch.equal(r, (r32 + torch.tensor(0.25) * (p32 - r32)).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_flags(cpp, dtype):
    """The check_finite pre-pass: agrees with torch.isfinite(t).all() for NaN/±inf anywhere (vector
    body, scalar tail, a later chunk of a multi-chunk tensor), empty tensors count as finite."""
    g = torch.Generator().manual_seed(4)
    sizes = [1, 31, 33, 1000, 70001, 0]
    ts = [(torch.randn(n, generator=g) * 100).to(dtype) for n in sizes]
    assert cpp.finite_flags(ts).tolist() == [True] * len(sizes)
    big = torch.finfo(dtype).max
    ts[0][0] = float("nan")
    ts[1][30] = float("inf")       # scalar tail
    ts[3][500] = float("-inf")     # vector body
    ts[4][69000] = float("nan")    # third chunk
    ts[2][0] = big                 # largest finite value is finite
    flags = cpp.finite_flags(ts)
    assert flags.tolist() == [bool(torch.isfinite(t).all()) for t in ts] == [False, False, True, False, False, True]
    assert cpp.finite_flags([]).numel() == 0


def test_vector_exp_error_bound(cpp):
    """The kernels' vector exp (tolerances above assume ≤ 2u relative in the normal range, ≤ 2^-126
    absolute below it): a dense grid over [ln FLT_MIN, 1], random points, and the special values."""
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.linspace(-87.33654475, 1.0, 2**22), torch.rand(2**20, generator=g) * -104.0,
                   torch.tensor([0.0, -0.0, -1e-30, float("-inf"), -1000.0])])
    y = torch.ops.fasttrdpo.vec_exp(x).double()
    e = torch.exp(x.double())
    normal = e >= 2.0 ** -126
    assert ((y - e).abs() / e)[normal].max().item() <= 2 * U32
    assert (y - e).abs()[~normal].max().item() <= 2.0 ** -126
    assert y[-5:].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert torch.isnan(torch.ops.fasttrdpo.vec_exp(torch.tensor([float("nan")] * 17))).all()


# The kernels have ISA-specific code (the AVX512 exp and max, AVX2 max) chosen at compile time from
# torch's CPU capability: the builds this machine does not pick by itself get the same tests, each
# in a child pytest with ATEN_CPU_CAPABILITY forced and a private cache (one cold build each).
_ISA_SUBSET = "vector_exp or forward_matches or backward_matches or masked or bad_labels or in_place or blend_matches"
_ISA_ORDER = ["default", "avx2", "avx512"]


@pytest.mark.skipif(bool(os.environ.get("FASTTRDPO_TEST_ISA")), reason="already inside a forced-ISA run")
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_other_isa_builds_pass_the_kernel_tests(cpp_build, isa, tmp_path):
    native = _cpp.capability().lower()
    if _ISA_ORDER.index(isa) >= _ISA_ORDER.index(native):
        pytest.skip(f"{isa} is this machine's own build ({native}) or beyond it")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa, FASTTRDPO_CACHE=str(tmp_path), FASTTRDPO_TEST_ISA=isa)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", _ISA_SUBSET],
                          capture_output=True, text=True, env=env, timeout=900,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert [d.name.split("-")[1] for d in tmp_path.iterdir()] == [isa]  # built for the forced ISA only
    passed = [line for line in proc.stdout.splitlines() if " passed" in line]
    assert passed and int(passed[-1].split()[0]) >= 60, proc.stdout[-2000:]
