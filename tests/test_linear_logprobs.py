"""linear_token_logprobs / paired_linear_token_logprobs against float64, both backends.

"triton" runs the kernels of kernels/linear_logprobs.py (under TRITON_INTERPRET=1 on CPU tensors here;
on a CUDA machine the `gpu` tests run them compiled); "eager" is the chunked PyTorch path, run here
with a tiny chunk so that several chunks are always exercised.

Shapes: N = 72 tokens (not a multiple of any BLOCK_N: 64, 32), H = 80 (not a multiple of BLOCK_H: 64,
32), V = 200 (not a multiple of BLOCK_V = 128, and more than one vocabulary tile).

Tolerances (derived; u = 2**-24, see tests/helpers.py for the value bound):
* values: `logprob_tolerance(z64, dot_err=...)` with dot_err = γ_H·Σ|h·W| (+ bias, scale) per logit,
  plus, with softcap, the error of the one-exp tanh: |t − tanh| <= 8u absolute, times softcap.
  Call it E (per token): it bounds the error of zt_v − lse for every v, not only the label.
* gradients, dz = g·(onehot − p)·D with p = softmax(zt), D = scale (or scale·(1 − t²) with softcap):
    |δp| <= p·expm1(E + 4u)                      (exp of an argument off by E, one rounding)
    |δD| <= scale·(2|t|·(8u + dot_err/softcap) + 3u)   (softcap only; t moves by the tanh and dot errors)
    |δdz| <= |g|·(|δp|·|D| + |onehot − p|·|δD|) + 3u·|dz| (+ u_dot·|dz| when the backward dot runs in
             bf16/fp16: dz is rounded to that dtype, as a half-precision autograd would)
  then the fp32 sums over V (grad_hidden) or N (grad_weight, grad_bias), in any order:
    |δgrad_h| <= |δdz| @ |W| + γ_{V+2}·(|dz| @ |W|),   |δgrad_W| <= |δdz|ᵀ @ |h| + γ_{N+2}·(|dz|ᵀ @ |h|)
  and the final rounding to the storage dtype: (1 + u_s)·bound + u_s·|grad| with u_s = 2**-8 (bf16),
  2**-11 (fp16), 0 (fp32).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings, strategies as st

import fasttrdpo
from fasttrdpo import _backend
from fasttrdpo.kernels import linear_logprobs as kernels
from fasttrdpo.ops import linear as linear_ops
from helpers import (U32, assert_close_tol, dot_error_bound, logprob_tolerance, ref_linear_logits,
                     ref_linear_token_logprobs)

N_B, N_T, H, V = 3, 24, 80, 200  # N = 72 tokens
STORE_U = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
BACKENDS = ["eager", "triton"]


@pytest.fixture(autouse=True)
def small_eager_chunks(monkeypatch):
    # 16 rows of V = 200 per chunk: the eager path always runs several chunks in these tests;
    # the triton backward runs vocabulary chunks of its minimum, 128 columns (V = 200: two chunks)
    monkeypatch.setattr(linear_ops, "EAGER_CHUNK_BYTES", 16 * 4 * V)
    monkeypatch.setattr(kernels, "VOCAB_CHUNK_BYTES", 1)


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _make(shape, H_, V_, h_dtype, w_dtype, bias_dtype=None, seed=0, ignore_frac=0.2):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H_, generator=gen).to(h_dtype)
    # logits with a spread of a few units, as real heads have
    weight = (torch.randn(V_, H_, generator=gen) * (3.0 / math.sqrt(H_))).to(w_dtype)
    bias = None if bias_dtype is None else torch.randn(V_, generator=gen).to(bias_dtype)
    labels = torch.randint(0, V_, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = -100
    return hidden, weight, bias, labels


def _dot_u(backend, hidden, weight):
    """Unit roundoff of the operand dtype of the triton path's dots (0 when they run in fp32, and on
    the eager path, which computes in fp32): dz is rounded to it for the backward GEMMs, and so are
    their outputs (grad_W once; grad_h once per vocabulary chunk, summed in fp32)."""
    if backend != "triton":
        return 0.0
    return STORE_U[kernels.dot_dtype(hidden.dtype, weight.dtype)]


def _as_computed(backend, hidden, weight):
    """The operands as the backend computes with them: the triton path casts a mixed pair to its half
    dtype, as autocast would (documented), so its float64 reference is built from the cast values;
    `test_mixed_pair_is_cast_like_autocast` proves the cast is exactly that."""
    if backend != "triton":
        return hidden, weight
    dt = kernels.dot_dtype(hidden.dtype, weight.dtype)
    return hidden.to(dt), weight.to(dt)


def _value_tol(hidden, weight, bias, logit_scale, softcap):
    z64 = ref_linear_logits(hidden, weight, bias, logit_scale, softcap)
    dot_err = dot_error_bound(hidden, weight, bias, logit_scale)
    if softcap is not None:
        dot_err = dot_err + 8 * U32 * softcap
    return logprob_tolerance(z64, dot_err=dot_err), dot_err


def _grad_tols(hidden, weight, bias, labels, g, ignore_index, logit_scale, softcap, dot_u, grads64,
               store_dtypes=None):
    """store_dtypes: (hidden, weight) dtypes of the returned gradients when `hidden`/`weight` are the
    cast operands the backend computed with (default: their own dtypes)."""
    Hh = hidden.shape[-1]
    h64 = hidden.double().reshape(-1, Hh)
    W64 = weight.double()
    y = labels.reshape(-1)
    E, dot_err = _value_tol(h64, W64, bias, logit_scale, softcap)
    z64 = ref_linear_logits(h64, W64, bias, logit_scale, softcap)
    Nn, Vv = z64.shape
    active = y != ignore_index
    g64 = torch.where(active, g.reshape(-1).double(), 0.0)
    p = torch.softmax(z64, dim=-1)
    onehot = torch.zeros_like(p)
    onehot[active.nonzero()[:, 0], y[active]] = 1.0
    if softcap is not None:
        t = z64 / softcap
        D = logit_scale * (1 - t * t)
        dD = logit_scale * (2 * t.abs() * (8 * U32 + dot_err[:, None] / softcap) + 3 * U32)
    else:
        D = torch.full_like(p, logit_scale)
        dD = torch.zeros_like(p)
    dz = g64[:, None] * (onehot - p) * D
    dp = p * torch.expm1(E[:, None] + 4 * U32)
    ddz = g64.abs()[:, None] * (dp * D.abs() + (onehot - p).abs() * dD) + (3 * U32 + dot_u) * dz.abs()
    if dot_u == 2.0 ** -11:  # fp16 dz: values below the subnormal range flush (half an fp16 ulp at 0)
        ddz = ddz + 2.0 ** -25
    # + dot_u·|dz|·|operand|: the GEMM outputs rounded to the dot dtype (grad_W once; grad_h once per
    # vocabulary chunk: Σ_c u·|dz_c @ W_c| <= u·|dz| @ |W|)
    tols = {
        "hidden": ddz @ W64.abs() + (_gamma(Vv + 2) + dot_u) * (dz.abs() @ W64.abs()),
        "weight": ddz.T @ h64.abs() + (_gamma(Nn + 2) + dot_u) * (dz.abs().T @ h64.abs()),
    }
    if bias is not None:
        tols["bias"] = ddz.sum(0) + _gamma(Nn + 2) * dz.abs().sum(0)
    out = {}
    for name, tol in tols.items():
        h_dt, w_dt = store_dtypes or (hidden.dtype, weight.dtype)
        dtype = {"hidden": h_dt, "weight": w_dt, "bias": bias.dtype if bias is not None else None}[name]
        us = STORE_U[dtype]
        ref = grads64[name].reshape(tol.shape).abs()
        out[name] = (1 + us) * tol + us * ref
    return out


def _leaves(hidden, weight, bias):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    bias = None if bias is None else bias.detach().clone().requires_grad_(True)
    return hidden, weight, bias


def _ref_grads(hidden, weight, bias, labels, g, ignore_index, logit_scale, softcap):
    """float64 autograd of log_softmax(transform(h @ W.T + b)).gather(labels)."""
    h64, W64, b64 = _leaves(hidden.double(), weight.double(), None if bias is None else bias.double())
    ref = ref_linear_token_logprobs(h64, W64, labels, bias=b64, ignore_index=ignore_index,
                                    logit_scale=logit_scale, softcap=softcap)
    inputs = [h64, W64] + ([b64] if b64 is not None else [])
    grads = torch.autograd.grad((ref * g.double()).sum(), inputs)
    names = ["hidden", "weight", "bias"]
    return ref.detach(), dict(zip(names, grads))


def check_linear_op(backend, hidden, weight, labels, bias=None, ignore_index=-100, logit_scale=1.0,
                    softcap=None, seed=1):
    """Values and gradients of linear_token_logprobs against float64; returns (out, grads)."""
    h, w, b = _leaves(hidden, weight, bias)
    out = fasttrdpo.linear_token_logprobs(h, w, labels, bias=b, ignore_index=ignore_index,
                                          logit_scale=logit_scale, softcap=softcap, backend=backend)
    assert _backend.last_backend("linear_token_logprobs") == backend
    assert out.dtype == torch.float32 and out.shape == labels.shape
    ignored = labels == ignore_index
    assert torch.equal(out[ignored], torch.zeros_like(out[ignored])), "ignored tokens must be exactly 0.0"

    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed)).to(labels.device)
    c_hidden, c_weight = _as_computed(backend, hidden, weight)
    ref, grads64 = _ref_grads(c_hidden, c_weight, bias, labels, g, ignore_index, logit_scale, softcap)
    tol, _ = _value_tol(c_hidden.reshape(-1, hidden.shape[-1]), c_weight, bias, logit_scale, softcap)
    assert float(tol.max()) < 1e-3  # the bound is tight enough to catch any indexing/mask bug
    assert_close_tol(out, ref, tol.reshape(labels.shape), f"{backend} logp")

    inputs = [h, w] + ([b] if b is not None else [])
    grads = dict(zip(["hidden", "weight", "bias"], torch.autograd.grad((out * g).sum(), inputs)))
    tols = _grad_tols(c_hidden, c_weight, bias, labels, g, ignore_index, logit_scale, softcap,
                      _dot_u(backend, hidden, weight), grads64, (hidden.dtype, weight.dtype))
    for name, grad in grads.items():
        leaf = {"hidden": hidden, "weight": weight, "bias": bias}[name]
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        assert_close_tol(grad.reshape(tols[name].shape), grads64[name].reshape(tols[name].shape),
                         tols[name], f"{backend} grad_{name}")
    return out, grads


# ------------------------------------------------------------------------------------------ sweeps
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),  # autocast-style: half activations, fp32 master weight
    (torch.float32, torch.float16),
]
OPTIONS = [
    dict(bias=False, logit_scale=1.0, softcap=None),
    dict(bias=True, logit_scale=0.7, softcap=4.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_dtype,w_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "bias_scale_softcap"])
def test_values_and_grads(backend, h_dtype, w_dtype, opts):
    hidden, weight, bias, labels = _make((N_B, N_T), H, V, h_dtype, w_dtype,
                                         bias_dtype=w_dtype if opts["bias"] else None)
    labels[1] = -100  # a fully ignored row
    check_linear_op(backend, hidden, weight, labels, bias=bias, logit_scale=opts["logit_scale"],
                    softcap=opts["softcap"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token(backend):
    hidden, weight, bias, labels = _make((1,), H, V, torch.float32, torch.float32, torch.float32, ignore_frac=0)
    check_linear_op(backend, hidden, weight, labels, bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    hidden, weight, _, labels = _make((2, 5), H, V, torch.bfloat16, torch.bfloat16)
    labels.fill_(-100)
    out, grads = check_linear_op(backend, hidden, weight, labels)
    assert torch.equal(out, torch.zeros_like(out))
    assert not grads["hidden"].any() and not grads["weight"].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_inside_vocab(backend):
    hidden, weight, _, labels = _make((N_B, N_T), H, V, torch.float32, torch.float32, ignore_frac=0)
    labels[:, ::3] = 7  # ignore_index inside [0, V): those tokens are ignored, not scored
    check_linear_op(backend, hidden, weight, labels, ignore_index=7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_without_leading_dims(backend):
    hidden, weight, _, labels = _make((1,), H, V, torch.float32, torch.float32, ignore_frac=0)
    out = fasttrdpo.linear_token_logprobs(hidden[0], weight, labels[0], backend=backend)
    assert out.shape == ()
    ref = ref_linear_token_logprobs(hidden[0], weight, labels[0])
    tol, _ = _value_tol(hidden, weight, None, 1.0, None)
    assert_close_tol(out, ref, tol[0], "0-d labels")


def test_backends_agree_and_backward_is_deterministic():
    hidden, weight, bias, labels = _make((N_B, N_T), H, V, torch.float32, torch.float32, torch.float32)
    runs = []
    for _ in range(2):
        h, w, b = _leaves(hidden, weight, bias)
        out = fasttrdpo.linear_token_logprobs(h, w, labels, bias=b, softcap=5.0, backend="triton")
        runs.append((out,) + torch.autograd.grad(out.sum(), [h, w, b]))
    for a, c in zip(*runs):
        assert torch.equal(a, c), "the triton backward must be bit-for-bit reproducible"


# ------------------------------------------------------------------------------------------ paired
@pytest.mark.parametrize("backend", BACKENDS)
def test_paired_distinct_models(backend):
    check_paired(backend, torch.device("cpu"))


def check_paired(backend, device, shape=(N_B, N_T), H_=H, V_=V):
    # policy: fp32 with bias; reference: bf16 weights of its own, another hidden size, its own bias
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    hidden, weight, bias, labels = to(*_make(shape, H_, V_, torch.float32, torch.float32, torch.float32))
    r_hidden, r_weight, r_bias, _ = to(*_make(shape, 48, V_, torch.bfloat16, torch.bfloat16,
                                              torch.bfloat16, seed=5))
    labels[2, :10] = -100
    h, w, b = _leaves(hidden, weight, bias)
    rh, rw, rb = _leaves(r_hidden, r_weight, r_bias)  # even with requires_grad, no grad flows to ref
    pol, ref = fasttrdpo.paired_linear_token_logprobs(h, w, rh, rw, labels, policy_bias=b, ref_bias=rb,
                                                      logit_scale=0.9, softcap=6.0, backend=backend)
    assert _backend.last_backend("paired_linear_token_logprobs") == backend
    assert pol.requires_grad and not ref.requires_grad and ref.grad_fn is None
    assert pol.shape == ref.shape == labels.shape and ref.dtype == torch.float32

    exp_ref = ref_linear_token_logprobs(r_hidden, r_weight, labels, bias=r_bias, logit_scale=0.9, softcap=6.0)
    tol, _ = _value_tol(r_hidden.reshape(-1, 48), r_weight, r_bias, 0.9, 6.0)
    assert_close_tol(ref, exp_ref, tol.reshape(labels.shape), f"{backend} ref logp")

    # the policy half equals the single-model op (same kernel branch / same eager code): bit for bit
    single = fasttrdpo.linear_token_logprobs(hidden, weight, labels, bias=bias, logit_scale=0.9,
                                             softcap=6.0, backend=backend)
    assert torch.equal(pol.detach(), single)

    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3)).to(device)
    (pol * g).sum().backward()
    assert rh.grad is None and rw.grad is None and rb.grad is None
    _, grads64 = _ref_grads(hidden, weight, bias, labels, g, -100, 0.9, 6.0)
    tols = _grad_tols(hidden, weight, bias, labels, g, -100, 0.9, 6.0, _dot_u(backend, hidden, weight), grads64)
    for name, leaf in (("hidden", h), ("weight", w), ("bias", b)):
        assert_close_tol(leaf.grad.reshape(tols[name].shape), grads64[name].reshape(tols[name].shape),
                         tols[name], f"paired {backend} grad_{name}")


# ------------------------------------------------------------------------------------------ bad labels
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels(backend, device="cpu"):
    hidden, weight, _, labels = [t if t is None else t.to(device)
                                 for t in _make((2, 9), H, V, torch.float32, torch.float32, ignore_frac=0)]
    bad = labels.clone()
    bad[0, 3] = V + 5
    bad[1, 4] = -3
    with pytest.raises(ValueError, match="labels"):
        fasttrdpo.linear_token_logprobs(hidden, weight, bad, backend=backend)
    out = fasttrdpo.linear_token_logprobs(hidden, weight, bad, validate=False, backend=backend)
    clean = fasttrdpo.linear_token_logprobs(hidden, weight, labels, backend=backend)
    is_bad = bad != labels
    assert torch.isnan(out[is_bad]).all()
    assert torch.equal(out[~is_bad], clean[~is_bad])


# ------------------------------------------------------------------------------------------ validation
def _args():
    hidden, weight, bias, labels = _make((2, 4), 16, 10, torch.float32, torch.float32, torch.float32)
    return dict(hidden=hidden, weight=weight, labels=labels, bias=bias)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(weight=a["weight"][:, :8]), ValueError, "hidden"),
    (lambda a: a.update(weight=a["weight"][0]), ValueError, "weight"),
    (lambda a: a.update(labels=a["labels"][:, :3]), ValueError, "labels"),
    (lambda a: a.update(labels=a["labels"].int()), TypeError, "labels"),
    (lambda a: a.update(hidden=a["hidden"].double()), TypeError, "hidden"),
    (lambda a: a.update(weight=a["weight"].to(torch.int32)), TypeError, "weight"),
    (lambda a: a.update(bias=a["bias"][:5]), ValueError, "bias"),
    (lambda a: a.update(hidden=a["hidden"][:0], labels=a["labels"][:0]), ValueError, "empty"),
    (lambda a: a.update(weight=a["weight"][:0], bias=None), ValueError, "weight"),
    (lambda a: a.update(logit_scale=0.0), ValueError, "logit_scale"),
    (lambda a: a.update(logit_scale=float("nan")), ValueError, "logit_scale"),
    (lambda a: a.update(logit_scale=torch.tensor(1.0)), TypeError, "logit_scale"),
    (lambda a: a.update(softcap=-1.0), ValueError, "softcap"),
    (lambda a: a.update(softcap=float("inf")), ValueError, "softcap"),
    (lambda a: a.update(ignore_index=1.5), TypeError, "ignore_index"),
    (lambda a: a.update(hidden=a["hidden"].to("meta")), ValueError, "device"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend"),
])
def test_validation_errors(change, exc, match):
    a = _args()
    change(a)
    with pytest.raises(exc, match=match):
        fasttrdpo.linear_token_logprobs(a.pop("hidden"), a.pop("weight"), a.pop("labels"), **a)


def test_paired_validation_errors():
    a = _args()
    h, w, y = a["hidden"], a["weight"], a["labels"]
    with pytest.raises(ValueError, match="ref_weight"):
        fasttrdpo.paired_linear_token_logprobs(h, w, h, w[:7], y)
    with pytest.raises(ValueError, match="ref_hidden"):
        fasttrdpo.paired_linear_token_logprobs(h, w, h[:1], w, y)
    with pytest.raises(ValueError, match="ref_bias"):
        fasttrdpo.paired_linear_token_logprobs(h, w, h, w, y, ref_bias=a["bias"][:3])
    with pytest.raises(TypeError, match="policy_hidden"):
        fasttrdpo.paired_linear_token_logprobs(h.double(), w, h, w, y)


def test_cpp_backend_is_not_offered_here(monkeypatch):
    a = _args()
    with pytest.raises(NotImplementedError, match="linear_token_logprobs"):
        fasttrdpo.linear_token_logprobs(a["hidden"], a["weight"], a["labels"], backend="cpp")
    # FASTTRDPO_BACKEND=cpp is a process-wide preference: this op has no C++ path, so it warns once and
    # runs its auto choice (eager on CPU tensors), and last_backend says so.
    monkeypatch.setattr(_backend, "_env_warned", set())  # the warning is once per process and op
    monkeypatch.setenv("FASTTRDPO_BACKEND", "cpp")
    with pytest.warns(UserWarning, match="paired_linear_token_logprobs has no cpp backend"):
        fasttrdpo.paired_linear_token_logprobs(a["hidden"], a["weight"], a["hidden"], a["weight"], a["labels"])
    assert fasttrdpo.last_backend("paired_linear_token_logprobs") == "eager"
    # auto resolving to a built C++ extension runs eager here, and says so
    monkeypatch.delenv("FASTTRDPO_BACKEND")
    monkeypatch.setattr(_backend, "_cpp_ready", lambda: True)
    out = fasttrdpo.linear_token_logprobs(a["hidden"], a["weight"], a["labels"])
    assert fasttrdpo.last_backend("linear_token_logprobs") == "eager"
    assert torch.equal(out, fasttrdpo.linear_token_logprobs(a["hidden"], a["weight"], a["labels"], backend="eager"))


def test_env_override(monkeypatch):
    a = _args()
    monkeypatch.setenv("FASTTRDPO_BACKEND", "triton")
    fasttrdpo.linear_token_logprobs(a["hidden"], a["weight"], a["labels"])
    assert fasttrdpo.last_backend("linear_token_logprobs") == "triton"
    monkeypatch.setenv("FASTTRDPO_BACKEND", "eager")
    fasttrdpo.linear_token_logprobs(a["hidden"], a["weight"], a["labels"])
    assert fasttrdpo.last_backend("linear_token_logprobs") == "eager"


# ------------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_matches_eager(backend):
    hidden, weight, bias, labels = _make((2, 12), 24, 40, torch.float32, torch.float32, torch.float32)
    r_hidden, r_weight, _, _ = _make((2, 12), 24, 40, torch.float32, torch.float32, seed=9)

    def f(h, w, b, rh, rw):
        pol, ref = fasttrdpo.paired_linear_token_logprobs(h, w, rh, rw, labels, policy_bias=b,
                                                          softcap=3.0, validate=False, backend=backend)
        single = fasttrdpo.linear_token_logprobs(h, w, labels, bias=b, validate=False, backend=backend)
        return ((pol - ref) * 0.5 + single).sum(), pol, ref

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    results = []
    for fn in (f, compiled):
        h, w, b = _leaves(hidden, weight, bias)
        loss, pol, ref = fn(h, w, b, r_hidden, r_weight)
        results.append((loss, pol, ref) + torch.autograd.grad(loss, [h, w, b]))
    for eager_t, compiled_t in zip(*results):
        assert torch.equal(eager_t.detach(), compiled_t.detach())
    # one graph, in which both calls are the opaque custom op (not a trace through the Python code)
    assert counter.frame_count == 1
    assert str(counter.graphs[0].code).count("fasttrdpo.linear_logprobs_fwd") == 2


def test_torch_compile_with_validation_graph_breaks_cleanly():
    hidden, weight, _, labels = _make((2, 6), 16, 30, torch.float32, torch.float32)
    f = lambda h, w: fasttrdpo.linear_token_logprobs(h, w, labels, backend="eager").sum()  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager")
    h, w, _ = _leaves(hidden, weight, None)
    gc = torch.autograd.grad(compiled(h, w), [h, w])
    h2, w2, _ = _leaves(hidden, weight, None)
    ge = torch.autograd.grad(f(h2, w2), [h2, w2])
    assert all(torch.equal(a, c) for a, c in zip(gc, ge))


# ------------------------------------------------------------------------------------------ random sweep
@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 40), hdim=st.integers(1, 70), vocab=st.integers(1, 150),
    dtypes=st.sampled_from(DTYPE_PAIRS), backend=st.sampled_from(BACKENDS),
    softcap=st.sampled_from([None, 2.5]), with_bias=st.booleans(), seed=st.integers(0, 1000),
)
def test_random_shapes(n, hdim, vocab, dtypes, backend, softcap, with_bias, seed):
    hidden, weight, bias, labels = _make((n,), hdim, vocab, dtypes[0], dtypes[1],
                                         bias_dtype=dtypes[1] if with_bias else None, seed=seed)
    check_linear_op(backend, hidden, weight, labels, bias=bias, softcap=softcap, logit_scale=1.3)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("h_dtype,w_dtype", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "bias_scale_softcap"])
def test_gpu_compiled_kernels(h_dtype, w_dtype, opts):
    hidden, weight, bias, labels = _make((4, 75), 256, 1000, h_dtype, w_dtype,
                                         bias_dtype=w_dtype if opts["bias"] else None)
    to = lambda t: None if t is None else t.cuda()  # noqa: E731
    out, grads = check_linear_op("triton", to(hidden), to(weight), to(labels), bias=to(bias),
                                 logit_scale=opts["logit_scale"], softcap=opts["softcap"])
    assert out.is_cuda


# ------------------------------------------------------------------------------------------ layouts, frozen weights
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_noncontiguous_inputs(backend):
    """LoRA-style frozen lm_head (no weight grad asked), a sliced [B, T-1, H] hidden, a transposed
    weight view: same values and gradients as the contiguous inputs with everything trainable."""
    hidden, weight, bias, labels = _make((N_B, N_T + 1), H, V, torch.float32, torch.float32, torch.float32)
    labels = labels[:, :-1]
    h_full, w_t, b = _leaves(hidden, weight.T.contiguous(), bias)  # w_t: [H, V] storage
    h_view = h_full[:, :-1]                                       # non-contiguous [B, T, H]
    w_view = w_t.detach().T                                       # [V, H] view with stride (1, V), frozen
    out = fasttrdpo.linear_token_logprobs(h_view, w_view, labels, bias=b, backend=backend)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(4))
    gh, gb = torch.autograd.grad((out * g).sum(), [h_full, b])

    h2, w2, b2 = _leaves(hidden[:, :-1].contiguous(), weight, bias)
    out2 = fasttrdpo.linear_token_logprobs(h2, w2, labels, bias=b2, backend=backend)
    gh2, _gw2, gb2 = torch.autograd.grad((out2 * g).sum(), [h2, w2, b2])
    assert torch.equal(out, out2)
    assert torch.equal(gh[:, :-1], gh2) and not gh[:, -1].any()
    assert torch.equal(gb, gb2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_enclosing_autocast_changes_nothing(backend):
    """The op computes in fp32 itself: an autocast region around it must not downcast its matmuls."""
    hidden, weight, bias, labels = _make((2, 20), H, V, torch.float32, torch.float32, torch.float32)
    results = []
    for autocast in (False, True):
        h, w, b = _leaves(hidden, weight, bias)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fasttrdpo.linear_token_logprobs(h, w, labels, bias=b, backend=backend)
            grads = torch.autograd.grad(out.sum(), [h, w, b])
        results.append((out,) + grads)
    for a, c in zip(*results):
        assert a.dtype == c.dtype and torch.equal(a, c)


@pytest.mark.gpu
def test_gpu_paired_bad_labels_and_determinism():
    cuda = torch.device("cuda")
    check_paired("triton", cuda, shape=(3, 90), H_=256, V_=1000)
    test_out_of_range_labels("triton", device="cuda")
    hidden, weight, bias, labels = [t.cuda() for t in _make((2, 300), 256, 1000, torch.bfloat16, torch.bfloat16,
                                                           torch.bfloat16)]
    runs = []
    for _ in range(2):
        h, w, b = _leaves(hidden, weight, bias)
        out = fasttrdpo.linear_token_logprobs(h, w, labels, bias=b, backend="triton")
        runs.append((out,) + torch.autograd.grad(out.sum(), [h, w, b]))
    for a, c in zip(*runs):
        assert torch.equal(a, c), "the triton backward must be bit-for-bit reproducible"


# ------------------------------------------------------------------------------------------ scored rows only
def _poisoned(hidden, labels, ignore_index=-100):
    """hidden with NaN, +inf and -inf at ignored positions (what a padded batch may hold there)."""
    bad = hidden.clone()
    ignored = (labels == ignore_index).nonzero()
    assert len(ignored) >= 3
    for i, value in zip(range(len(ignored)), [math.nan, math.inf, -math.inf] * len(ignored)):
        bad[tuple(ignored[i])] = value
    clean = hidden.clone()
    clean[labels == ignore_index] = 0.0
    return bad, clean


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_hidden_at_ignored_rows_never_enters(backend):
    """Issue 13 item 2: NaN/inf at ignored positions leave the outputs and every gradient (hidden,
    weight, bias) finite and equal to a run with zeros there; ignored rows get exactly 0 gradient."""
    hidden, weight, bias, labels = _make((N_B, N_T), H, V, torch.bfloat16, torch.bfloat16, torch.bfloat16)
    r_hidden, r_weight, _, _ = _make((N_B, N_T), 48, V, torch.float32, torch.float32, seed=7)
    bad, clean = _poisoned(hidden, labels)
    r_bad, r_clean = _poisoned(r_hidden, labels)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    runs = []
    for h0, rh0 in ((bad, r_bad), (clean, r_clean)):
        h, w, b = _leaves(h0, weight, bias)
        single = fasttrdpo.linear_token_logprobs(h, w, labels, bias=b, softcap=5.0, backend=backend)
        pol, ref = fasttrdpo.paired_linear_token_logprobs(h, w, rh0, r_weight, labels, policy_bias=b,
                                                          softcap=5.0, backend=backend)
        grads = torch.autograd.grad(((single + pol) * g).sum(), [h, w, b])
        runs.append((single, pol, ref) + grads)
    for name, a, c in zip(["single", "policy", "ref", "grad_hidden", "grad_weight", "grad_bias"], *runs):
        assert torch.isfinite(a).all(), f"{backend} {name} is not finite"
        assert torch.equal(a, c), f"{backend} {name} depends on what ignored rows hold"
    grad_hidden = runs[0][3]
    assert not grad_hidden[labels == -100].any()


def test_mixed_pair_is_cast_like_autocast():
    """A bf16 hidden with an fp32 weight (autocast over fp32 parameters) runs the bf16 dots of the
    weight cast to bf16 — bit for bit the op on the cast weight; likewise fp32 hidden with fp16 weight."""
    for h_dtype, w_dtype, dot in ((torch.bfloat16, torch.float32, torch.bfloat16),
                                  (torch.float32, torch.float16, torch.float16)):
        assert kernels.dot_dtype(h_dtype, w_dtype) == dot
        hidden, weight, bias, labels = _make((2, 20), H, V, h_dtype, w_dtype, torch.float32)
        results = []
        for h0, w0 in ((hidden, weight), (hidden.to(dot), weight.to(dot))):
            h, w, b = _leaves(h0, w0, bias)
            out = fasttrdpo.linear_token_logprobs(h, w, labels, bias=b, softcap=4.0, backend="triton")
            gh, gw, gb = torch.autograd.grad(out.sum(), [h, w, b])
            assert gh.dtype == h0.dtype and gw.dtype == w0.dtype
            # the gradients are formed in the dot dtype's GEMMs (grad_h summed over vocabulary chunks
            # in fp32): the same values once both runs store them in that dtype
            results.append((out, gh.to(dot), gw.to(dot), gb))
        for a, c in zip(*results):
            assert torch.equal(a, c)
    assert kernels.dot_dtype(torch.float32, torch.float32) == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_tf32_is_decided_once_per_call(backend, monkeypatch):
    """The forward decides TF32 (from torch's flag) and the backward uses that decision, even if the
    flag changes in between (before: each read the flag on its own)."""
    seen = []
    if backend == "triton":
        real = kernels.linear_logprobs_backward

        def spy(*args, **kwargs):
            seen.append(kwargs["precision"])
            return real(*args, **kwargs)
        monkeypatch.setattr(kernels, "linear_logprobs_backward", spy)
    else:
        real = linear_ops._eager_backward

        def spy(*args, **kwargs):
            seen.append("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
            return real(*args, **kwargs)
        monkeypatch.setattr(linear_ops, "_eager_backward", spy)
    hidden, weight, _, labels = _make((2, 6), 16, 30, torch.float32, torch.float32)
    for forward_choice, backward_choice in (("tf32", "ieee"), ("ieee", "tf32")):
        h, w, _ = _leaves(hidden, weight, None)
        monkeypatch.setattr(_backend, "dot_precision", lambda: forward_choice)
        out = fasttrdpo.linear_token_logprobs(h, w, labels, backend=backend)
        monkeypatch.setattr(_backend, "dot_precision", lambda: backward_choice)
        torch.autograd.grad(out.sum(), [h, w])
    assert seen == ["tf32", "ieee"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_row_blocks(backend):
    """More scored rows than one group of row blocks (interpreter: 32 rows x 4 per group): a full
    group and a partial one, each sweeping two vocabulary blocks."""
    hidden, weight, bias, labels = _make((6, 30), 16, V, torch.float32, torch.float32, torch.float32)
    assert int((labels != -100).sum()) > 4 * kernels.INTERPRETER_CONFIG["BLOCK_N"]
    check_linear_op(backend, hidden, weight, labels, bias=bias)


def test_kernel_level_ignore_and_bad_labels():
    """The kernels' own contract, without the op's compaction: 0.0 at ignore_index, NaN for a label
    outside [0, V), the rest as the op computes it."""
    hidden, weight, _, labels = _make((40,), H, V, torch.float32, torch.float32, ignore_frac=0.3)
    labels[5] = V
    labels[6] = -7
    logp, lse = kernels.linear_logprobs_forward(hidden, weight, None, labels)
    ignored = labels == -100
    bad = (labels == V) | (labels == -7)
    assert torch.equal(logp[ignored], torch.zeros_like(logp[ignored]))
    assert torch.isnan(logp[bad]).all()
    good = ~ignored & ~bad
    ref = ref_linear_token_logprobs(hidden, weight, torch.where(good, labels, -100))
    tol, _ = _value_tol(hidden, weight, None, 1.0, None)
    assert_close_tol(logp[good], ref[good], tol[good], "kernel logp")
    assert_close_tol(lse, torch.logsumexp(ref_linear_logits(hidden, weight), dim=-1), tol, "kernel lse")
