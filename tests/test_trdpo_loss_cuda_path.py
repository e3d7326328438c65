"""TRDPOLoss's CUDA path (backend="triton", fasttrdpo/loss/token_list.py) and trdpo_loss_from_tokens.

Here the same code runs on CPU: torch CPU matmuls for the GEMMs (bf16/fp16 CPU matmuls accumulate in fp32
and round their output once, like cuBLAS) and the paired Triton kernels under TRITON_INTERPRET=1.
Values and gradients are checked against test_trdpo_loss.py's float64 reference with its derived bounds,
including the half-dtype tile terms (`tile_units`, documented there): the tile is stored in the GEMM's
half dtype (one rounding per logit, u = 2^-8 bf16 / 2^-11 fp16), and an fp32 weight with a half hidden is
rounded to the half dtype for the GEMMs (u_cast), as autocast would.
"""
import math

import pytest
import torch

import fasttrdpo.loss as L
from fasttrdpo.loss import token_list
from test_trdpo_loss import _assert_within, _bounds, _run, make_inputs, reference, tile_units


def _check_against_float64(inputs, fn, beta=0.1, scale=1.0, cap=None, loss_type="sigmoid", eps=0.0):
    loss, metrics, grads = _run(fn, inputs)
    ref = reference(*inputs, beta, loss_type, eps, scale, cap)
    ph, pw, _, rh, rw, pb, _ = inputs
    tiles = (tile_units(ph.dtype, pw.dtype), tile_units(rh.dtype, rw.dtype))
    out_dtypes = [ph.dtype, pw.dtype] + ([pb.dtype] if pb is not None else [])
    loss_tol, s_err, _, grad_tols = _bounds(ref, inputs, beta, loss_type, eps, scale, cap, out_dtypes, tiles)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    _assert_within(loss, ref["loss"], loss_tol, "loss")
    for got, exp, tol, name, dt in zip(grads, ref["grads"], grad_tols, ["grad_hidden", "grad_weight", "grad_bias"],
                                       out_dtypes):
        assert got.dtype == dt, name
        _assert_within(got, exp, tol, name)
    P = inputs[2].shape[0] // 2
    _assert_within(metrics["logps/chosen"], ref["metrics"]["logps/chosen"], s_err[:P].max(), "logps/chosen")
    _assert_within(metrics["logps/rejected"], ref["metrics"]["logps/rejected"], s_err[P:].max(), "logps/rejected")
    return loss, metrics, grads


class _LaunchSpy:
    """Records the rows of every forward kernel launch and of every logits tile formed (policy and reference)."""

    def __init__(self, monkeypatch):
        self.rows, self.tile_rows = [], []
        real_forward, real_logits = token_list._TritonMiddle.forward, token_list._logits_

        def forward(zp, zr, y, logp, lse, rlogp):
            self.rows.append(zp.shape[0])
            return real_forward(zp, zr, y, logp, lse, rlogp)

        def logits(h, *args):
            out = real_logits(h, *args)
            self.tile_rows.append(out.shape[0])
            return out
        monkeypatch.setattr(token_list._TritonMiddle, "forward", staticmethod(forward))
        monkeypatch.setattr(token_list, "_logits_", logits)


@pytest.mark.parametrize("h_dtype,w_dtype,bias,scale,cap", [
    (torch.float32, torch.float32, True, 1.0, None),
    (torch.bfloat16, torch.bfloat16, True, 1.0, None),
    (torch.float16, torch.float16, False, 0.7, None),
    (torch.bfloat16, torch.float32, True, 1.0, None),     # autocast over fp32 parameters: W rounded for the GEMMs
    (torch.float32, torch.bfloat16, False, 1.3, 3.0),     # the other mix, with logit_scale and softcap
    (torch.bfloat16, torch.bfloat16, True, 1.3, 2.5),     # softcap in a half tile
])
def test_cuda_path_matches_float64(h_dtype, w_dtype, bias, scale, cap):
    ph, pw, labels, rh, rw, pb, rb = make_inputs(B=6, T=9, H=16, V=67, seed=21, bias=bias)  # odd V
    inputs = (ph.to(h_dtype), pw.to(w_dtype), labels, rh.to(h_dtype), rw.to(w_dtype),
              pb.to(w_dtype) if bias else None, rb.to(w_dtype) if bias else None)
    fn = L.TRDPOLoss(beta=0.1, backend="triton", logit_scale=scale, softcap=cap)
    _check_against_float64(inputs, fn, scale=scale, cap=cap)
    import fasttrdpo
    assert fasttrdpo.last_backend("TRDPOLoss") == "triton"


@pytest.mark.parametrize("loss_type,eps", [("ipo", 0.0), ("robust", 0.1)])
def test_cuda_path_several_chunks_and_long_pairs(monkeypatch, loss_type, eps):
    # chunk budget of ~7 tokens: several chunks of whole pairs; max_pair_bytes=1: the pairs longer than the
    # budget go through the two-pass branch (logits formed again block by block). ipo uses the row lengths.
    inputs = make_inputs(B=8, T=9, H=16, V=67, dtype=torch.bfloat16, seed=22, bias=True)
    budget_rows = 7
    fn = L.TRDPOLoss(beta=0.3, loss_type=loss_type, label_smoothing=eps, backend="triton",
                     chunk_bytes=budget_rows * 67 * 4, max_pair_bytes=1)  # bf16 + bf16 tiles: 4 B per logit
    spy = _LaunchSpy(monkeypatch)
    _check_against_float64(inputs, fn, beta=0.3, loss_type=loss_type, eps=eps)
    labels = inputs[2]
    n_valid = int((labels != -100).sum())
    assert max(spy.tile_rows) <= budget_rows and len(spy.rows) > 1  # several chunks, tiles within the budget
    assert sum(spy.rows) == n_valid  # each valid token through the forward kernel once
    # tiles: policy + reference of every token once, plus the policy logits again for the pairs longer than
    # the budget (their second pass); the kernel's lse of the first pass is kept, not recomputed
    pair_tokens = [int((labels[i] != -100).sum() + (labels[4 + i] != -100).sum()) for i in range(4)]
    long_tokens = sum(t for t in pair_tokens if t > budget_rows)
    assert long_tokens > 0 and sum(spy.tile_rows) == 2 * n_valid + long_tokens


def test_cuda_path_one_valid_token_and_empty_pairs():
    # N = 1 valid token in the whole batch; the other pairs have no valid token (Δ = 0: loss log 2 each).
    ph, pw, labels, rh, rw, pb, rb = make_inputs(B=6, T=5, H=16, V=67, seed=23, bias=True)
    labels[:] = -100
    labels[4, 2] = 11  # pair 1's rejected row, one token
    inputs = (ph, pw, labels, rh, rw, pb, rb)
    loss, metrics, grads = _check_against_float64(inputs, L.TRDPOLoss(beta=0.1, backend="triton"))
    mask = labels != -100
    assert bool((grads[0][~mask] == 0).all()) and bool((grads[0][mask] != 0).any())
    # all pairs empty: every pair's Δ = 0, so loss = log 2, no gradient anywhere
    labels[:] = -100
    h = ph.clone().requires_grad_()
    w = pw.clone().requires_grad_()
    loss, m = L.TRDPOLoss(backend="triton")(h, w, labels, rh, rw)
    loss.backward()
    assert math.isclose(float(loss.detach()), math.log(2.0), rel_tol=1e-6)
    assert float(h.grad.abs().max()) == 0.0 and float(w.grad.abs().max()) == 0.0


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_hidden_at_ignored_positions_is_never_read(backend, poison):
    # Issue 13 item 2 for TRDPOLoss: prompt / padding positions may hold anything (NaN from a masked
    # attention row, inf); loss, metrics and every gradient must be finite and identical to zeros there.
    ph, pw, labels, rh, rw, pb, rb = make_inputs(seed=24, bias=True)
    ignored = labels == -100
    runs = []
    for fill in (0.0, poison):
        h, r = ph.clone(), rh.clone()
        h[ignored] = fill
        r[ignored] = fill
        runs.append(_run(L.TRDPOLoss(beta=0.2, backend=backend), (h, pw, labels, r, rw, pb, rb)))
    (loss0, m0, g0), (loss1, m1, g1) = runs
    assert torch.isfinite(loss1) and torch.equal(loss0, loss1)
    for k in m0:
        assert torch.isfinite(m1[k]) and torch.equal(m0[k], m1[k]), k
    for a, b in zip(g0, g1):
        assert bool(torch.isfinite(b).all()) and torch.equal(a, b)
    assert bool((g1[0][ignored] == 0).all())


def _forbid_atomic_ops(monkeypatch):
    """Make the Python-level accumulating scatters raise (they are atomic on CUDA)."""
    def forbidden(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"{name} called: atomic (nondeterministic) on CUDA")
        return raiser
    for name in ("index_add_", "index_add", "scatter_add_", "scatter_add", "scatter_reduce_", "scatter_reduce",
                 "index_reduce_", "put_"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    for name in ("index_add", "scatter_add", "scatter_reduce", "index_reduce"):
        monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))
    real_index_put_ = torch.Tensor.index_put_

    def index_put_(self, indices, values, accumulate=False):
        assert not accumulate, "index_put_(accumulate=True) called: atomic on CUDA"
        return real_index_put_(self, indices, values, accumulate)
    monkeypatch.setattr(torch.Tensor, "index_put_", index_put_)


def test_cuda_path_is_deterministic_and_uses_no_atomics(monkeypatch):
    inputs = make_inputs(B=8, seed=25, dtype=torch.bfloat16, bias=True)
    fn = L.TRDPOLoss(beta=0.1, backend="triton", chunk_bytes=67 * 4 * 10, max_pair_bytes=1)  # chunks + two-pass
    _forbid_atomic_ops(monkeypatch)
    with pytest.raises(AssertionError, match="atomic"):  # the guard is live
        torch.zeros(3).index_add_(0, torch.tensor([0]), torch.ones(1))
    loss0, m0, g0 = _run(fn, inputs)
    loss1, m1, g1 = _run(fn, inputs)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def _token_list_args(inputs, perm_rows=False, seed=0):
    """The valid rows of a [B, T] batch as a token list: (hidden, ref hidden, labels, row_ids, chosen, rejected).
    perm_rows: rows renumbered and the tokens listed in a shuffled row order (each row's tokens in order)."""
    ph, pw, labels, rh, rw, pb, rb = inputs
    B, T = labels.shape
    P = B // 2
    valid = (labels != -100).reshape(-1).nonzero().squeeze(1)
    rows = valid // T
    chosen, rejected = torch.arange(P), torch.arange(P, B)
    if perm_rows:
        g = torch.Generator().manual_seed(seed)
        new_id = torch.randperm(B, generator=g) + 3        # row ids need not be 0..B-1
        order = torch.argsort(torch.randperm(B, generator=g)[rows], stable=True)  # rows listed in a random order
        valid, rows = valid[order], rows[order]
        rows, chosen, rejected = new_id[rows], new_id[chosen], new_id[rejected]
    H = ph.shape[-1]
    return (ph.reshape(-1, H)[valid], rh.reshape(-1, rh.shape[-1])[valid], labels.reshape(-1)[valid], rows,
            chosen, rejected, valid)


@pytest.mark.parametrize("perm_rows", [False, True])
def test_token_list_entry_equals_trdpo_loss(perm_rows):
    inputs = make_inputs(B=8, seed=26, dtype=torch.bfloat16, bias=True)
    ph, pw, labels, rh, rw, pb, rb = inputs
    kw = dict(beta=0.2, logit_scale=0.9)
    loss, metrics, grads = _run(L.TRDPOLoss(backend="triton", **kw), inputs)

    h_tok, r_tok, y, rows, chosen, rejected, valid = _token_list_args(inputs, perm_rows, seed=1)
    h = h_tok.clone().requires_grad_()
    w, b = pw.clone().requires_grad_(), pb.clone().requires_grad_()
    loss_t, metrics_t = L.trdpo_loss_from_tokens(h, w, r_tok, rw, y, rows, chosen, rejected, policy_bias=b,
                                                 ref_bias=rb, backend="triton", **kw)
    loss_t.backward()
    grad_h_full = torch.zeros_like(grads[0]).reshape(-1, ph.shape[-1])
    grad_h_full[valid] = h.grad
    got = [grad_h_full.view_as(grads[0]), w.grad, b.grad]
    if not perm_rows:  # the same tokens in the same order: the same computation, bit for bit
        assert torch.equal(loss_t, loss)
        assert all(torch.equal(metrics_t[k], metrics[k]) for k in metrics)
        assert all(torch.equal(a, e) for a, e in zip(got, grads))
    else:  # other row order: same chunks of pairs, same per-row token order; only the GEMM rows move
        ref = reference(*inputs, 0.2, "sigmoid", 0.0, 0.9)
        tiles = (tile_units(ph.dtype, pw.dtype),) * 2
        loss_tol, _, _, grad_tols = _bounds(ref, inputs, 0.2, "sigmoid", 0.0, 0.9, None, [torch.bfloat16] * 3, tiles)
        _assert_within(loss_t, ref["loss"], loss_tol, "loss")
        for g, e, tol in zip(got, ref["grads"], grad_tols):
            _assert_within(g, e, tol, "grad")
        for k in metrics:
            torch.testing.assert_close(metrics_t[k], metrics[k], rtol=1e-5, atol=1e-5)


def test_token_list_eager_matches_float64():
    inputs = make_inputs(B=6, seed=27, bias=True)
    ph, pw, labels, rh, rw, pb, rb = inputs
    h_tok, r_tok, y, rows, chosen, rejected, valid = _token_list_args(inputs, perm_rows=True, seed=2)
    h = h_tok.clone().requires_grad_()
    w = pw.clone().requires_grad_()
    loss, metrics = L.trdpo_loss_from_tokens(h, w, r_tok, rw, y, rows, chosen, rejected, policy_bias=pb,
                                             ref_bias=rb, beta=0.1, backend="eager", chunk_bytes=67 * 8 * 6)
    loss.backward()
    ref = reference(*inputs, 0.1, "sigmoid", 0.0)
    loss_tol, s_err, _, grad_tols = _bounds(ref, inputs, 0.1, "sigmoid", 0.0, 1.0, None, [torch.float32] * 3)
    _assert_within(loss, ref["loss"], loss_tol, "loss")
    _assert_within(h.grad, ref["grads"][0].reshape(-1, ph.shape[-1])[valid], grad_tols[0].reshape(-1, 16)[valid],
                   "grad_hidden")
    _assert_within(w.grad, ref["grads"][1], grad_tols[1], "grad_weight")
    P = labels.shape[0] // 2
    _assert_within(metrics["logps/chosen"], ref["metrics"]["logps/chosen"], s_err[:P].max(), "logps/chosen")


def _tok_args():
    g = torch.Generator().manual_seed(28)
    n, H, V = 7, 8, 11
    return dict(policy_hidden=torch.randn(n, H, generator=g), policy_weight=torch.randn(V, H, generator=g),
                ref_hidden=torch.randn(n, H, generator=g), ref_weight=torch.randn(V, H, generator=g),
                labels=torch.randint(0, V, (n,), generator=g), row_ids=torch.tensor([0, 0, 1, 1, 1, 2, 3]),
                chosen_rows=torch.tensor([0, 2]), rejected_rows=torch.tensor([1, 3]))


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(row_ids=torch.tensor([0, 0, 1, 1, 1, 2, 5])), ValueError, "row_ids"),
    (lambda a: a.update(rejected_rows=torch.tensor([1, 2])), ValueError, "at most once"),
    (lambda a: a.update(rejected_rows=torch.tensor([1])), ValueError, "rejected_rows"),
    (lambda a: a["labels"].__setitem__(3, 11), ValueError, "labels"),
    (lambda a: a["labels"].__setitem__(3, -100), ValueError, "labels"),
    (lambda a: a.update(labels=a["labels"].int()), TypeError, "labels"),
    (lambda a: a.update(row_ids=a["row_ids"][:5]), ValueError, "row_ids"),
    (lambda a: a.update(ref_hidden=a["ref_hidden"][:5]), ValueError, "ref_hidden"),
    (lambda a: a.update(policy_weight=a["policy_weight"][:, :5]), ValueError, "policy_hidden"),
    (lambda a: a.update(policy_hidden=a["policy_hidden"].long()), TypeError, "policy_hidden"),
    (lambda a: a.update(chosen_rows=torch.tensor([], dtype=torch.int64),
                        rejected_rows=torch.tensor([], dtype=torch.int64)), ValueError, "chosen_rows"),
])
def test_token_list_bad_inputs(mutate, exc, match):
    args = _tok_args()
    mutate(args)
    w_before = args["policy_weight"].clone()
    with pytest.raises(exc, match=match):
        L.trdpo_loss_from_tokens(**args, backend="eager")
    assert torch.equal(args["policy_weight"], w_before)


def test_token_list_without_tokens_and_unvalidated_bad_label():
    args = _tok_args()
    # no token at all: every pair's Δ = 0 → loss log 2, zero gradients
    empty = dict(args, policy_hidden=args["policy_hidden"][:0].clone().requires_grad_(),
                 ref_hidden=args["ref_hidden"][:0], labels=args["labels"][:0], row_ids=args["row_ids"][:0])
    w = args["policy_weight"].clone().requires_grad_()
    loss, m = L.trdpo_loss_from_tokens(**dict(empty, policy_weight=w), backend="triton")
    loss.backward()
    assert math.isclose(float(loss.detach()), math.log(2.0), rel_tol=1e-6) and float(w.grad.abs().max()) == 0.0
    # validate=False (no host sync for the range check): a label outside [0, V) is never used as an address;
    # its log-prob, hence the loss, is NaN instead of an error
    args["labels"][3] = 11
    loss, _ = L.trdpo_loss_from_tokens(**args, backend="triton", validate=False)
    assert math.isnan(float(loss))


def test_token_list_bad_config():
    args = _tok_args()
    with pytest.raises(ValueError, match="chunk_bytes"):
        L.trdpo_loss_from_tokens(**args, chunk_bytes=0)
    with pytest.raises(ValueError, match="logit_scale"):
        L.trdpo_loss_from_tokens(**args, logit_scale=float("inf"))
    with pytest.raises(ValueError, match="beta"):
        L.trdpo_loss_from_tokens(**args, beta=-1.0)


def test_default_budget_holds_4096_tokens_at_llama3_vocab():
    # bf16 or fp32 policy + reference tiles at V = 128256 (Llama 3): >= 4096 tokens per chunk.
    for itemsize in (2, 4):
        assert token_list.DEFAULT_TILE_BYTES // (128256 * 2 * itemsize) >= 4096


@pytest.mark.gpu
@pytest.mark.parametrize("h_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32)])
def test_cuda_path_on_gpu(h_dtype, w_dtype):
    # cuBLAS GEMMs + the compiled kernels against float64 with the same derived bounds; bit-identical twice.
    ph, pw, labels, rh, rw, pb, rb = make_inputs(B=8, T=65, H=64, V=1031, seed=29, bias=True)
    cpu = (ph.to(h_dtype), pw.to(w_dtype), labels, rh.to(h_dtype), rw.to(w_dtype), pb.to(w_dtype), rb.to(w_dtype))
    gpu = tuple(t.cuda() for t in cpu)
    fn = L.TRDPOLoss(beta=0.1, backend="triton", chunk_bytes=1031 * 8 * 100)  # several chunks
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs in IEEE: the fp32 bounds apply
    try:
        loss, metrics, grads = _run(fn, gpu)
        loss2, _, grads2 = _run(fn, gpu)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    ref = reference(*cpu, 0.1, "sigmoid", 0.0)
    tiles = (tile_units(h_dtype, w_dtype),) * 2
    loss_tol, _, _, grad_tols = _bounds(ref, cpu, 0.1, "sigmoid", 0.0, 1.0, None, [h_dtype, w_dtype, w_dtype], tiles)
    _assert_within(loss.cpu(), ref["loss"], loss_tol, "loss")
    for got, exp, tol, name in zip(grads, ref["grads"], grad_tols, ["grad_hidden", "grad_weight", "grad_bias"]):
        _assert_within(got.cpu(), exp, tol, name)
