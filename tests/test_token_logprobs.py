"""token_logprobs / paired_token_logprobs (logits level) against float64 references, every backend.

Tolerances (derivations in tests/helpers.py):
  * log-probs: `logprob_tolerance(z64)` — fp32 arithmetic on the stored logits, ≈ u·(8(|lse| + max|z|)
    + V + 4) per token; the reference is computed in float64 from the same stored values, so storage
    rounding of the inputs is not an error.
  * gradients: `logprob_grad_tolerance` — |g|·(p·(expm1(e) + 8u) + 2u) for the fp32 value, with e the
    exponent error (the lse error plus the rounding of z − lse), plus half an ulp of the gradient's
    storage dtype (the kernels round to nearest even, the interpreter included).
Kernel tests run on CPU tensors in the Triton interpreter (tests/conftest.py), or on CUDA tensors when
there is a GPU; shapes are kept small because the interpreter's cost grows with the number of programs.
"""
from __future__ import annotations

import warnings
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fasttrdpo
from fasttrdpo.kernels import token_logprobs as kernels
from helpers import (
    assert_close_tol,
    backend_device,
    backends,
    logprob_grad_tolerance,
    logprob_tolerance,
    ref_token_logprobs,
)

BACKENDS = backends()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORE = -100


def make_logits(shape, dtype, device, seed, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def make_labels(shape, V, device, seed, ignore_frac=0.25):
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, V, shape, generator=gen)
    ignored = torch.rand(shape, generator=gen) < ignore_frac
    return torch.where(ignored, torch.full_like(labels, IGNORE), labels).to(device)


def ref_logp_and_grad(logits, labels, grad_logp, ignore_index=IGNORE):
    """float64 values and d(Σ g·logp)/dlogits through autograd of log_softmax(...).gather(...)."""
    z = logits.detach().double().cpu().requires_grad_(True)
    logp = ref_token_logprobs(z, labels.cpu(), ignore_index)
    (logp * grad_logp.double().cpu()).sum().backward()
    return logp.detach(), z.grad


def check_values(actual, logits, labels, what):
    z64 = logits.detach().double().cpu()
    expected = ref_token_logprobs(z64, labels.cpu())
    assert actual.dtype == torch.float32 and actual.shape == labels.shape
    ignored = labels.cpu() == IGNORE
    assert bool((actual.cpu()[ignored] == 0.0).all()), f"{what}: ignored positions must be exactly 0.0"
    assert_close_tol(actual.cpu(), expected, logprob_tolerance(z64), what)


def check_grad(grad, logits, labels, grad_logp, what):
    _, expected = ref_logp_and_grad(logits, labels, grad_logp)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    tol = logprob_grad_tolerance(logits.detach().double().cpu(), labels.cpu(), grad_logp.cpu(), logits.dtype)
    assert_close_tol(grad.cpu(), expected, tol, what)


# Shapes: N = 1; V below, at and above one vocabulary block (4096) and not a multiple of it;
# leading dims [B, T] with a fully ignored sequence.
SHAPES = [
    pytest.param((1,), 37, id="N1-V37"),
    pytest.param((7,), 256, id="N7-V256"),
    pytest.param((2, 5), 300, id="B2T5-V300"),
    pytest.param((3,), 2 * kernels.FORWARD_BLOCK_V + 37, id="N3-V2blocks+37"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,V", SHAPES)
def test_token_logprobs_values_and_grad(backend, dtype, lead, V):
    device = backend_device(backend)
    seed = zlib.crc32(repr((lead, V)).encode()) % 1000
    logits = make_logits((*lead, V), dtype, device, seed).requires_grad_(True)
    labels = make_labels(lead, V, device, seed)
    if len(lead) == 2:
        labels[1] = IGNORE  # a fully ignored sequence
    logp = fasttrdpo.token_logprobs(logits, labels, backend=backend)
    assert fasttrdpo.last_backend("token_logprobs") == backend
    check_values(logp, logits, labels, f"{backend} {dtype} logp")
    g = make_logits(lead, torch.float32, device, seed + 7, scale=1.0)
    (logp * g).sum().backward()
    check_grad(logits.grad, logits, labels, g, f"{backend} {dtype} grad")
    if len(lead) == 2:
        assert bool((logits.grad[1] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,V", SHAPES)
def test_paired_values_and_grad(backend, dtype, lead, V):
    device = backend_device(backend)
    seed = zlib.crc32(repr((lead, V, "paired")).encode()) % 1000
    policy = make_logits((*lead, V), dtype, device, seed).requires_grad_(True)
    ref = make_logits((*lead, V), dtype, device, seed + 3, scale=2.0)
    labels = make_labels(lead, V, device, seed)
    policy_logp, ref_logp = fasttrdpo.paired_token_logprobs(policy, ref, labels, backend=backend)
    assert fasttrdpo.last_backend("paired_token_logprobs") == backend
    check_values(policy_logp, policy, labels, f"{backend} {dtype} policy logp")
    check_values(ref_logp, ref, labels, f"{backend} {dtype} ref logp")
    assert policy_logp.requires_grad and not ref_logp.requires_grad
    g = make_logits(lead, torch.float32, device, seed + 7, scale=1.0)
    (policy_logp * g).sum().backward()
    check_grad(policy.grad, policy, labels, g, f"{backend} {dtype} policy grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_output_never_requires_grad(backend):
    device = backend_device(backend)
    policy = make_logits((4, 50), torch.float32, device, 1).requires_grad_(True)
    ref = make_logits((4, 50), torch.float32, device, 2).requires_grad_(True)  # e.g. forgot no_grad
    labels = make_labels((4,), 50, device, 1, ignore_frac=0.0)
    policy_logp, ref_logp = fasttrdpo.paired_token_logprobs(policy, ref, labels, backend=backend)
    assert ref_logp.grad_fn is None and not ref_logp.requires_grad
    (policy_logp.sum() + ref_logp.sum()).backward()
    assert ref.grad is None
    assert policy.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_strided_layouts(backend):
    """fp32 policy with a bf16 reference; the policy is the usual [:, :-1] slice of [B, T, V] logits
    (no 2-D view exists) and the reference is a transposed (last dim not contiguous) tensor."""
    device = backend_device(backend)
    B, T, V = 2, 6, 130
    full = make_logits((B, T + 1, V), torch.float32, device, 5).requires_grad_(True)
    policy = full[:, :-1]
    ref = make_logits((B, V, T), torch.bfloat16, device, 6).transpose(1, 2)
    assert ref.stride(-1) != 1
    labels = make_labels((B, T), V, device, 5)
    policy_logp, ref_logp = fasttrdpo.paired_token_logprobs(policy, ref, labels, backend=backend)
    check_values(policy_logp, policy, labels, f"{backend} sliced policy")
    check_values(ref_logp, ref, labels, f"{backend} transposed bf16 ref")
    g = make_logits((B, T), torch.float32, device, 9, scale=1.0)
    (policy_logp * g).sum().backward()
    check_grad(full.grad[:, :-1], policy, labels, g, f"{backend} sliced policy grad")
    assert bool((full.grad[:, -1] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
def test_inplace_backward(backend, dtype, layout):
    """The gradient is written into the logits buffer and equals the out-of-place gradient, for a
    contiguous buffer and a [:, :-1] slice (two row strides). A last-dim-strided view needs a copy
    for the kernels: the backward then runs out of place (the buffer keeps the logits) and
    last_backend("token_logprobs_inplace_backward") says so (issue 13, item 4)."""
    device = backend_device(backend)
    B, T, V = 2, 4, 90
    labels = make_labels((B, T), V, device, 3)
    g = make_logits((B, T), torch.float32, device, 4, scale=1.0)
    base = make_logits((B, T + 1, V), dtype, device, 3)

    def run(inplace):
        leaf = base.clone().requires_grad_(True)
        inner = leaf * 1  # a non-leaf buffer, as a model's logits are
        if layout == "sliced":
            logits = inner[:, :-1]
        elif layout == "contiguous":
            logits = inner[:, 1:].contiguous()
        else:
            logits = inner.transpose(1, 2).contiguous().transpose(1, 2)[:, 1:]
            assert logits.stride(-1) != 1
        logp = fasttrdpo.token_logprobs(logits, labels, backend=backend, inplace_backward=inplace)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-time "ran out of place" warning (transposed)
            (logp * g).sum().backward()
        return leaf.grad, logits.detach()

    grad_out_of_place, logits_after = run(False)
    assert fasttrdpo.last_backend("token_logprobs_inplace_backward") == "out of place"
    grad_in_place, buffer_after = run(True)
    status = fasttrdpo.last_backend("token_logprobs_inplace_backward")
    sliced = layout == "sliced"
    expected_logits = base[:, :-1] if sliced else base[:, 1:]
    assert torch.equal(logits_after, expected_logits), "out-of-place backward must not touch the logits"
    policy_grad = grad_in_place[:, :-1] if sliced else grad_in_place[:, 1:]
    if layout == "transposed":
        assert status.startswith("out of place: ") and "copy" in status, status
        assert torch.equal(buffer_after, expected_logits), "a refused in-place backward must not touch the logits"
    else:
        assert status == "in place", status
        assert torch.equal(buffer_after, policy_grad), "in-place backward must leave the gradient in the logits buffer"
    assert torch.equal(grad_in_place, grad_out_of_place)
    check_grad(policy_grad, expected_logits, labels, g, f"{backend} {dtype} in-place grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    device = backend_device(backend)
    logits = make_logits((3, 4, 40), torch.bfloat16, device, 8).requires_grad_(True)
    labels = torch.full((3, 4), IGNORE, device=device)
    logp = fasttrdpo.token_logprobs(logits, labels, backend=backend)
    assert torch.equal(logp, torch.zeros(3, 4, device=device))
    logp.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_never_leak(backend):
    """Padding positions may hold anything (here NaN and inf): an ignored row still gives exactly 0
    in the log-prob and the gradient, and the other rows are unaffected."""
    device = backend_device(backend)
    V = 50
    clean = make_logits((4, V), torch.float32, device, 12)
    dirty = clean.clone()
    dirty[1] = float("nan")
    dirty[3, :7] = float("inf")
    labels = torch.tensor([3, IGNORE, 49, IGNORE], device=device)
    outs = []
    for z in (clean, dirty):
        z = z.clone().requires_grad_(True)
        logp = fasttrdpo.token_logprobs(z, labels, backend=backend)
        (logp * torch.tensor([1.0, 2.0, -1.0, 3.0], device=device)).sum().backward()
        outs.append((logp.detach(), z.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert bool((outs[1][1][[1, 3]] == 0).all()) and outs[1][0][1].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_scalar_label(backend):
    device = backend_device(backend)
    logits = make_logits((5, 33), torch.float32, device, 10)
    labels = make_labels((5,), 33, device, 10, ignore_frac=0.0)
    labels[2] = -1
    logp = fasttrdpo.token_logprobs(logits, labels, ignore_index=-1, backend=backend)
    expected = ref_token_logprobs(logits.double().cpu(), labels.cpu(), ignore_index=-1)
    assert_close_tol(logp.cpu(), expected, logprob_tolerance(logits.double().cpu()), "ignore_index=-1")
    assert logp[2].item() == 0.0
    # a single position: logits [V], labels [] (0-dim)
    one = fasttrdpo.token_logprobs(logits[0], labels[0], backend=backend)
    assert one.shape == () and torch.equal(one, logp[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_false_bad_label_gives_nan(backend):
    device = backend_device(backend)
    V = 60
    policy = make_logits((6, V), torch.float32, device, 11).requires_grad_(True)
    ref = make_logits((6, V), torch.float32, device, 12)
    labels = make_labels((6,), V, device, 11, ignore_frac=0.0)
    labels[1], labels[4] = V, -7  # just past the vocabulary, and a negative label that is not ignore_index
    with pytest.raises(ValueError, match="labels"):
        fasttrdpo.paired_token_logprobs(policy, ref, labels, backend=backend)
    policy_logp, ref_logp = fasttrdpo.paired_token_logprobs(policy, ref, labels, validate=False, backend=backend)
    bad = torch.zeros(6, dtype=torch.bool)
    bad[[1, 4]] = True
    for out, z, name in ((policy_logp, policy, "policy"), (ref_logp, ref, "ref")):
        out = out.detach().cpu()
        assert bool(out[bad].isnan().all()), f"{name}: a bad label must give NaN"
        good_labels = torch.where(bad.to(labels.device), IGNORE, labels)
        expected = ref_token_logprobs(z.detach().double().cpu(), good_labels.cpu())
        assert_close_tol(out[~bad], expected[~bad], logprob_tolerance(z.detach().double().cpu())[~bad], name)
    policy_logp.sum().backward()
    grad = policy.grad.cpu()
    assert bool(grad[bad].isnan().all()), "the gradient row of a bad label is NaN"
    assert bool(grad[~bad].isfinite().all())


@pytest.mark.parametrize("chunk_rows", [1, 3, 7])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
def test_eager_chunking(monkeypatch, chunk_rows, layout):
    """The eager twin walks views of chunk_rows rows (whole [inner] slices when they fit, parts of
    one otherwise) without copying the logits: chunked results equal the one-chunk results exactly
    (rows are independent) and the float64 reference within the bound."""
    from fasttrdpo.ops import logits as logits_ops

    B, T, V = 3, 5, 40
    base = make_logits((B, T + 1, V), torch.bfloat16, "cpu", 40)
    labels = make_labels((B, T), V, "cpu", 40)
    g = make_logits((B, T), torch.float32, "cpu", 41, scale=1.0)

    def view_of(buffer):
        if layout == "sliced":
            return buffer[:, :-1]
        if layout == "contiguous":
            return buffer[:, 1:].contiguous()
        return buffer.transpose(1, 2).contiguous().transpose(1, 2)[:, 1:]

    def run(inplace):
        leaf = base.clone().requires_grad_(True)
        ref = view_of(base.flip(-1))
        policy_logp, ref_logp = fasttrdpo.paired_token_logprobs(view_of(leaf * 1), ref, labels, backend="eager",
                                                                inplace_backward=inplace)
        (policy_logp * g).sum().backward()
        return policy_logp.detach(), ref_logp, leaf.grad

    whole = run(False)
    monkeypatch.setattr(logits_ops, "EAGER_CHUNK_ELEMENTS", chunk_rows * V)
    for inplace in (False, True):
        chunked = run(inplace)
        for a, b in zip(whole, chunked):
            assert torch.equal(a, b)
    check_values(chunked[0], view_of(base), labels, "chunked policy")
    check_values(chunked[1], view_of(base.flip(-1)), labels, "chunked ref")
    check_grad(view_of(chunked[2]), view_of(base), labels, g, "chunked grad")


# ---- validation: every error names the argument ----

def _bad_calls(device):
    z = torch.randn(2, 3, 10, device=device)
    y = torch.zeros(2, 3, dtype=torch.int64, device=device)
    tl = fasttrdpo.token_logprobs
    pl = fasttrdpo.paired_token_logprobs
    return [
        (lambda: tl(z.numpy() if device.type == "cpu" else z.tolist(), y), TypeError, "logits"),
        (lambda: tl(z.to(torch.float64), y), TypeError, "logits"),
        (lambda: tl(torch.randn((), device=device), y[0, 0]), ValueError, "logits"),
        (lambda: tl(z[..., :0], y), ValueError, "logits"),
        (lambda: tl(z, y.to(torch.int32)), TypeError, "labels"),
        (lambda: tl(z, y[:, :2]), ValueError, "labels"),
        (lambda: tl(z[:, :0], y[:, :0]), ValueError, "labels"),
        (lambda: tl(z, y + 10), ValueError, "labels"),
        (lambda: tl(z, y - 1), ValueError, "labels"),
        (lambda: tl(z, y, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: tl(z, y, inplace_backward=1), TypeError, "inplace_backward"),
        (lambda: tl(z, y, validate="no"), TypeError, "validate"),
        (lambda: tl(z, y, backend="cuda"), ValueError, "backend"),
        (lambda: tl(z, y, backend=None), TypeError, "backend"),
        (lambda: pl(z, z[..., :9], y), ValueError, "ref_logits"),
        (lambda: pl(z, z.to(torch.int64), y), TypeError, "ref_logits"),
        (lambda: pl(z.to(torch.int64), z, y), TypeError, "policy_logits"),
        (lambda: pl(z, z, y[0]), ValueError, "labels"),
        (lambda: pl(z, z, y + 10), ValueError, "labels"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_errors_name_the_argument(backend):
    device = backend_device(backend)
    for i, (call, exc, name) in enumerate(_bad_calls(device)):
        with pytest.raises(exc, match=name):
            call()


def test_device_mismatch_names_the_argument():
    if not torch.cuda.is_available():
        meta = torch.empty(4, 10, device="meta")
        labels = torch.zeros(4, dtype=torch.int64)
        with pytest.raises(ValueError, match="labels"):
            fasttrdpo.token_logprobs(meta, labels)
        with pytest.raises(ValueError, match="ref_logits"):
            fasttrdpo.paired_token_logprobs(torch.zeros(4, 10), meta, labels)
    else:
        z = torch.randn(4, 10, device="cuda")
        labels = torch.zeros(4, dtype=torch.int64)
        with pytest.raises(ValueError, match="labels"):
            fasttrdpo.token_logprobs(z, labels)
        with pytest.raises(ValueError, match="ref_logits"):
            fasttrdpo.paired_token_logprobs(z, z.cpu(), labels.cuda())


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU tensors with backend='triton' run in the interpreter only on a machine without a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        fasttrdpo.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.int64), backend="triton")


# ---- the kernels directly: several vocabulary blocks with a small BLOCK_V, -inf logits ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_small_blocks_and_masked_vocab(dtype):
    """BLOCK_V = 32 over V = 150 (4 full blocks + a tail of 22); rows 0-1 have their first 64 logits
    at -inf (a masked vocabulary: whole blocks that are -inf must not give NaN)."""
    device = backend_device("triton")
    N, V, block = 5, 150, 32
    policy = make_logits((N, V), dtype, device, 20)
    policy[:2, :64] = float("-inf")
    ref = make_logits((N, V), torch.float32, device, 21)
    labels = torch.tensor([70, 149, 0, IGNORE, 31], device=device)
    logp, lse, ref_logp = (torch.empty(N, device=device) for _ in range(3))
    kernels.launch_forward(policy, ref, labels, logp, lse, ref_logp, rows=N, inner_size=1,
                           policy_strides=(V, 0), ref_strides=(V, 0), ignore_index=IGNORE, block_v=block)
    z64 = policy.double().cpu()
    labels64 = labels.cpu()
    # -inf contributes exactly 0 to the sums: rows 0-1 are bounded over their finite columns only.
    masked, plain = slice(0, 2), slice(2, N)
    tol = torch.cat([logprob_tolerance(z64[masked, 64:]), logprob_tolerance(z64[plain])])
    assert_close_tol(logp.cpu(), ref_token_logprobs(z64, labels64), tol, "masked-vocab policy")
    live = [0, 1, 2, 4]  # the lse of an ignored row is not used (the backward writes zeros there)
    assert_close_tol(lse.cpu()[live], torch.logsumexp(z64, -1)[live], tol[live], "lse")
    assert_close_tol(ref_logp.cpu(), ref_token_logprobs(ref.double().cpu(), labels64),
                     logprob_tolerance(ref.double().cpu()), "ref")
    g = torch.linspace(-1.5, 2.0, N, device=device)
    grad = torch.empty_like(policy)
    kernels.launch_backward(g, policy, lse, labels, grad, rows=N, inner_size=1, in_strides=(V, 0),
                            out_strides=(V, 0), ignore_index=IGNORE, block_v=block)
    _, expected = ref_logp_and_grad(policy, labels, g)
    grad = grad.cpu()
    assert_close_tol(grad[plain], expected[plain],
                     logprob_grad_tolerance(z64[plain], labels64[plain], g.cpu()[plain], dtype), "grad")
    assert_close_tol(grad[masked, 64:], expected[masked, 64:],
                     logprob_grad_tolerance(z64[masked, 64:], labels64[masked] - 64, g.cpu()[masked], dtype),
                     "masked-vocab grad")
    assert bool((grad[:2, :64] == 0).all())


# ---- random sweep ----

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    V=st.integers(1, 200),
    dtype=st.sampled_from(DTYPES),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    paired=st.booleans(),
    inplace=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2 ** 16),
)
def test_random_shapes(lead, V, dtype, ignore_frac, paired, inplace, backend, seed):
    device = backend_device(backend)
    lead = tuple(lead)
    base = make_logits((*lead, V), dtype, device, seed)
    policy = base.clone().requires_grad_(True)
    labels = make_labels(lead, V, device, seed, ignore_frac)
    g = make_logits(lead, torch.float32, device, seed + 5, scale=1.0)
    if paired:
        ref = make_logits((*lead, V), dtype, device, seed + 9)
        logp, ref_logp = fasttrdpo.paired_token_logprobs(policy * 1, ref, labels, backend=backend,
                                                         inplace_backward=inplace)
        check_values(ref_logp, ref, labels, "ref")
    else:
        logp = fasttrdpo.token_logprobs(policy * 1, labels, backend=backend, inplace_backward=inplace)
    check_values(logp, base, labels, "policy")
    (logp * g).sum().backward()
    check_grad(policy.grad, base, labels, g, "policy grad")


# ---- torch.compile: the ops are custom ops, so they trace with fullgraph=True ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_torch_compile_matches_eager(backend, inplace):
    device = backend_device(backend)
    B, T, H, V = 2, 5, 8, 70
    weight = make_logits((V, H), torch.float32, device, 30, scale=0.5).requires_grad_(True)
    ref_weight = make_logits((V, H), torch.float32, device, 31, scale=0.5)
    hidden = make_logits((B, T, H), torch.float32, device, 32).requires_grad_(True)
    labels = make_labels((B, T), V, device, 30)

    def loss_fn(hidden, weight):
        policy_logp, ref_logp = fasttrdpo.paired_token_logprobs(
            hidden @ weight.T, (hidden @ ref_weight.T).detach(), labels, backend=backend, inplace_backward=inplace)
        single = fasttrdpo.token_logprobs(hidden @ weight.T, labels, backend=backend)
        return ((policy_logp - ref_logp).sum(-1) ** 2).sum() + single.mean()

    torch._dynamo.reset()
    # aot_eager runs the same dispatcher path as inductor (fake tensors, functionalization, the
    # autograd formula in a compiled backward graph) without inductor's slow cold start on CPU.
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    # Same kernels, same inputs, same order of operations: the compiled graph must agree exactly.
    assert torch.equal(l0, l1)
    assert torch.equal(gh0, gh1)
    assert torch.equal(gw0, gw1)


# ---- compiled kernels on a real GPU (skipped without one; the same kernels run above in the interpreter) ----

@pytest.mark.gpu
@pytest.mark.parametrize("V", [50304, 50277], ids=["V-mult-16", "V-odd"])  # vectorised and generic launches
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_realistic_shapes(V, dtype):
    B, T = 4, 256
    full = make_logits((B, T + 1, V), dtype, "cuda", 50).requires_grad_(True)
    ref = make_logits((B, T, V), torch.bfloat16, "cuda", 51)
    labels = make_labels((B, T), V, "cuda", 50)
    g = make_logits((B, T), torch.float32, "cuda", 52, scale=1.0)
    inner = full * 1
    policy_logp, ref_logp = fasttrdpo.paired_token_logprobs(inner[:, :-1], ref, labels, backend="triton",
                                                            inplace_backward=True)
    check_values(policy_logp, full[:, :-1], labels, f"gpu {dtype} policy")
    check_values(ref_logp, ref, labels, "gpu bf16 ref")
    (policy_logp * g).sum().backward()
    check_grad(full.grad[:, :-1], full[:, :-1], labels, g, f"gpu {dtype} grad")
