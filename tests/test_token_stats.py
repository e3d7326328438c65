"""Policy entropy and mean token accuracy (TRL's `entropy`, `mean_token_accuracy`) computed inside the fused
loss without logits, on every backend TRDPOLoss dispatches to, against a float64 reference from full logits."""
import math

import pytest
import torch
from helpers import U32, dot_error_bound

from fasttrdpo.loss import TRDPOLoss
from fasttrdpo.loss.token_list import trdpo_loss_from_tokens


def entropy_tolerance(z64, dot_err=0.0):
    """Per-token bound on |fp32 entropy − float64 entropy| from the float64 transformed logits z64 [..., V]
    (DESIGN.md: derived, not tuned). entropy = log S − T/S with S, T sums of V terms (relative error ≤ V·u
    each): ≤ V·u·(1 + 2·E_p|z − m|). Each fp32 logit is off by ≤ dot_err (helpers.dot_error_bound, 0 for
    given logits), and ∂entropy/∂z_v = −p_v·(z_v − E_p z), so that adds ≤ dot_err·Σ_v p_v|z_v − E_p z|
    (first order; ×2 for the second-order terms and the transforms)."""
    p = torch.softmax(z64, -1)
    m = z64.amax(-1, keepdim=True)
    spread = (p * (z64 - m).abs()).sum(-1)
    dev = (p * (z64 - (p * z64).sum(-1, keepdim=True)).abs()).sum(-1)
    V = z64.shape[-1]
    return 2 * (V * U32 * (1 + 2 * spread) + torch.as_tensor(dot_err, dtype=torch.float64) * dev)

def _inputs(B=6, T=9, H=16, V=67, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    ph = torch.randn(B, T, H, generator=g)
    pw = torch.randn(V, H, generator=g) / math.sqrt(H) * 3
    rh = ph + 0.3 * torch.randn(B, T, H, generator=g)
    rw = pw + 0.1 * torch.randn(V, H, generator=g)
    pb = 0.5 * torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    # some labels at the argmax (scale > 0 and softcap keep the order) so that accuracy is neither 0 nor 1
    z = ph @ pw.T + (pb if bias else 0.0)
    labels[:, 3::2] = z.argmax(-1)[:, 3::2]
    labels[:, :3] = -100            # prompt
    labels[1, 6:] = -100            # padding in a chosen row
    labels[B // 2 + 2, :] = -100    # a fully ignored rejected row
    return ph, pw, pb, labels, rh, rw


def _reference(ph, pw, pb, labels, scale=1.0, cap=None):
    """float64 from the full logits: (entropy over all completion tokens, accuracy over chosen ones, min top-2 gap)."""
    z = ph.double() @ pw.double().T
    if pb is not None:
        z = z + pb.double()
    z = z * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    logp = torch.log_softmax(z, -1)
    ent = -(logp.exp() * logp).sum(-1)
    correct = (z.argmax(-1) == labels).double()
    mask = labels != -100
    P = labels.shape[0] // 2
    top2 = z.topk(2, -1).values
    gap = (top2[..., 0] - top2[..., 1])[mask].min()
    entropy = ent[mask].sum() / mask.sum()
    acc = correct[:P][mask[:P]].sum() / mask[:P].sum()
    # the mean's error is at most the largest token's
    tol = entropy_tolerance(z, dot_error_bound(ph, pw, pb, scale))[mask].max()
    return entropy, acc, gap, float(tol)


# chunk_bytes: None = one chunk; 4 KiB = several chunks of whole pairs and (eager) pairs done in two passes
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("chunk_bytes,cap", [(None, None), (4096, None), (4096, 5.0)])
def test_trdpo_loss_token_stats_match_float64(backend, chunk_bytes, cap):
    ph, pw, pb, labels, rh, rw = _inputs(seed=1)
    exp_ent, exp_acc, gap, tol = _reference(ph, pw, pb, labels, scale=0.9, cap=cap)
    # fp32 logits are off by ~1e-6·|z|: a top-2 gap far above that leaves no argmax to a rounding decision
    assert gap > 1e-4
    loss_fn = TRDPOLoss(beta=0.1, backend=backend, chunk_bytes=chunk_bytes, token_stats=True, logit_scale=0.9,
                        softcap=cap)
    _, m = loss_fn(ph, pw, labels, rh, rw, policy_bias=pb, ref_bias=None)
    assert abs(float(m["entropy"]) - float(exp_ent)) <= tol, (float(m["entropy"]), float(exp_ent))
    assert float(m["mean_token_accuracy"]) == pytest.approx(float(exp_acc), abs=1e-7)
    # a non-trivial check: not every chosen token is (in)correct
    assert 0.0 < float(exp_acc) < 1.0


def test_token_stats_off_by_default_and_loss_unchanged():
    ph, pw, pb, labels, rh, rw = _inputs(seed=2)
    loss_off, m_off = TRDPOLoss(backend="eager")(ph, pw, labels, rh, rw, policy_bias=pb)
    loss_on, m_on = TRDPOLoss(backend="eager", token_stats=True)(ph, pw, labels, rh, rw, policy_bias=pb)
    assert "entropy" not in m_off and "mean_token_accuracy" not in m_off
    assert {"entropy", "mean_token_accuracy"} <= set(m_on)
    assert float(loss_on) == float(loss_off)
    with pytest.raises(TypeError, match="token_stats"):
        TRDPOLoss(token_stats=1)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_token_stats_ties_take_the_first_maximal_index(backend):
    """Vocabulary rows 2 and 60 are equal and carry a bias that makes them the maximum for every token: the
    argmax is 2 (torch.argmax's and TRL's rule), so label 2 counts as correct and label 60 does not."""
    ph, pw, pb, labels, rh, rw = _inputs(seed=3)
    pw[60] = pw[2]
    pb[2] = pb[60] = 50.0
    P = labels.shape[0] // 2
    labels[:P, 3:5] = 2
    labels[:P, 5:] = 60
    labels[1, 6:] = -100
    z = ph @ pw.T + pb
    assert bool((z[..., 2] == z[..., 60]).all())  # an exact tie in the fp32 logits too
    mask = labels[:P] != -100
    expected = float(((labels[:P] == 2) & mask).sum() / mask.sum())
    _, m = TRDPOLoss(backend=backend, token_stats=True)(ph, pw, labels, rh, rw, policy_bias=pb)
    assert float(m["mean_token_accuracy"]) == pytest.approx(expected, abs=1e-7)
    assert 0.0 < expected < 1.0
    exp_ent, _, _, tol = _reference(ph, pw, pb, labels)
    assert abs(float(m["entropy"]) - float(exp_ent)) <= tol


@pytest.mark.parametrize("chunk_bytes", [None, 4096])
def test_eager_paths_stats_across_row_blocks(monkeypatch, chunk_bytes):
    """Both eager paths (TRDPOLoss's padded chunks, the token-list middle) work in blocks of EAGER_BLOCK_BYTES
    rows: forced to 3 rows a block (V = 67; chunks of 4 KiB: blocks of chunks), entropy and accuracy still
    equal float64 (at the default 1 MiB every test shape is one block)."""
    from fasttrdpo.loss import _chunked

    ph, pw, pb, labels, rh, rw = _inputs(seed=6)
    monkeypatch.setattr(_chunked, "EAGER_BLOCK_BYTES", 3 * 4 * pw.shape[0])
    assert _chunked.eager_block_rows(pw.shape[0]) == 3
    exp_ent, exp_acc, gap, tol = _reference(ph, pw, pb, labels)
    assert gap > 1e-4 and 0.0 < float(exp_acc) < 1.0
    B, T = labels.shape
    mask = labels.reshape(-1) != -100
    assert int(mask.sum()) > 3 * 3  # several blocks
    _, padded = TRDPOLoss(backend="eager", token_stats=True, chunk_bytes=chunk_bytes)(ph, pw, labels, rh, rw,
                                                                                     policy_bias=pb)
    kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    _, listed = trdpo_loss_from_tokens(ph.reshape(-1, ph.shape[-1])[mask], pw, rh.reshape(-1, rh.shape[-1])[mask],
                                       rw, labels.reshape(-1)[mask], torch.arange(B).repeat_interleave(T)[mask],
                                       torch.arange(B // 2), torch.arange(B // 2, B), policy_bias=pb,
                                       backend="eager", token_stats=True, **kw)
    for m in (padded, listed):
        assert abs(float(m["entropy"]) - float(exp_ent)) <= tol, (float(m["entropy"]), float(exp_ent))
        assert float(m["mean_token_accuracy"]) == pytest.approx(float(exp_acc), abs=1e-7)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_trdpo_loss_from_tokens_token_stats(backend):
    ph, pw, pb, labels, rh, rw = _inputs(seed=4, bias=False)
    exp_ent, exp_acc, gap, tol = _reference(ph, pw, None, labels)
    assert gap > 1e-4
    B, T = labels.shape
    mask = labels.reshape(-1) != -100
    rows = torch.arange(B).repeat_interleave(T)[mask]
    P = B // 2
    _, m = trdpo_loss_from_tokens(ph.reshape(-1, ph.shape[-1])[mask], pw, rh.reshape(-1, rh.shape[-1])[mask], rw,
                                  labels.reshape(-1)[mask], rows, torch.arange(P), torch.arange(P, B),
                                  backend=backend, token_stats=True, chunk_bytes=4096)
    assert abs(float(m["entropy"]) - float(exp_ent)) <= tol
    assert float(m["mean_token_accuracy"]) == pytest.approx(float(exp_acc), abs=1e-7)


def test_forward_kernel_stats_across_blocks_ignored_rows_and_masked_vocab():
    """The kernel itself with BLOCK_V = 16 (V = 50: four blocks, the last partial): ties between blocks, a
    row whose maximum is only in a later block, −inf logits (masked vocabulary), an ignored row."""
    from fasttrdpo.kernels import token_logprobs as kernels

    g = torch.Generator().manual_seed(5)
    V = 50
    z = torch.randn(5, V, generator=g) * 3
    z[0, 3] = z[0, 40] = 20.0           # tie across blocks: argmax 3
    z[1, 3] = z[1, 40] = 20.0
    z[2, 45] = 30.0                     # maximum in the last, partial block
    z[3, :20] = float("-inf")           # masked vocabulary: 0·log 0 = 0, not NaN
    labels = torch.tensor([3, 40, 45, 25, -100])
    n = labels.numel()
    logp, lse, ent, corr = (torch.full((n,), 7.0) for _ in range(4))
    kernels.launch_forward(z, None, labels, logp, lse, None, rows=n, inner_size=1, policy_strides=(V, 0),
                           ref_strides=(V, 0), ignore_index=-100, block_v=16, policy_entropy=ent, policy_correct=corr)
    z64 = z.double()
    lp = torch.log_softmax(z64, -1)
    exp_ent = -torch.where(lp > -math.inf, lp.exp() * lp, torch.zeros((), dtype=torch.float64)).sum(-1)
    exp_corr = (z64.argmax(-1) == labels).double()
    exp_ent[4] = exp_corr[4] = 0.0     # ignored row: exactly 0
    tol = entropy_tolerance(torch.where(torch.isinf(z64), -1e30, z64))  # logits given: no dot error
    assert bool(((ent.double() - exp_ent).abs() <= tol).all()), (ent, exp_ent, tol)
    assert corr.tolist() == exp_corr.tolist() == [1.0, 0.0, 1.0, float(exp_corr[3]), 0.0]
    with pytest.raises(ValueError, match="together"):
        kernels.launch_forward(z, None, labels, logp, lse, None, rows=n, inner_size=1, policy_strides=(V, 0),
                               ref_strides=(V, 0), ignore_index=-100, policy_entropy=ent)


@pytest.mark.parametrize("cap", [None, 4.0])
def test_linear_logprobs_kernels_stats_match_float64(cap, monkeypatch):
    """kernels/linear_logprobs.py (the lm_head-level kernels): the partial kernel's per-block entropy and argmax
    partials merged in block order. The interpreter's BLOCK_V is shrunk to 32 so V = 101 spans four blocks (the
    last partial); vocabulary rows 5 and 70 (different blocks) tie at the maximum for every row; one row ignored."""
    from fasttrdpo.kernels import linear_logprobs as lk

    monkeypatch.setitem(lk.INTERPRETER_CONFIG, "BLOCK_V", 32)
    g = torch.Generator().manual_seed(6)
    N, H, V = 7, 16, 101
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / 2
    b = 0.3 * torch.randn(V, generator=g)
    w[70] = w[5]
    b[5] = b[70] = 40.0
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0], labels[1], labels[2] = 5, 70, -100
    logp, lse, ent, corr = lk.linear_logprobs_forward(h, w, b, labels, logit_scale=0.8, softcap=cap, stats=True)
    z = (h.double() @ w.double().T + b.double()) * 0.8
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    lp = torch.log_softmax(z, -1)
    exp_ent = -(lp.exp() * lp).sum(-1)
    exp_corr = (z.argmax(-1) == labels).double()
    exp_ent[2] = exp_corr[2] = 0.0
    tol = entropy_tolerance(z, dot_error_bound(h, w, b, 0.8))
    assert bool(((ent.double() - exp_ent).abs() <= tol).all()), (ent, exp_ent, tol)
    assert corr.tolist() == exp_corr.tolist()
    assert corr[0] == 1.0 and corr[1] == 0.0  # the tie goes to the first maximal column, 5
    logp2, lse2 = lk.linear_logprobs_forward(h, w, b, labels, logit_scale=0.8, softcap=cap)
    assert torch.equal(logp, logp2) and torch.equal(lse, lse2)  # stats change nothing else


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_linear_token_stats_op_matches_float64(backend):
    """fasttrdpo.ops.linear_token_stats (the lm_head-level op) on both backends: [B, T] labels with ignored
    positions (exactly 0.0 there), scale + softcap, and the tie rule."""
    import fasttrdpo
    from fasttrdpo.ops import linear_token_stats

    ph, pw, pb, labels, _, _ = _inputs(seed=7)
    pw[60] = pw[2]
    pb[2] = pb[60] = 50.0
    labels[0, 3], labels[0, 4] = 2, 60
    ent, corr = linear_token_stats(ph, pw, labels, bias=pb, logit_scale=0.7, softcap=30.0, backend=backend)
    assert fasttrdpo.last_backend("linear_token_stats") == backend
    z = 30.0 * torch.tanh((ph.double() @ pw.double().T + pb.double()) * 0.7 / 30.0)
    lp = torch.log_softmax(z, -1)
    mask = labels != -100
    exp_ent = torch.where(mask, -(lp.exp() * lp).sum(-1), torch.zeros((), dtype=torch.float64))
    exp_corr = torch.where(mask, (z.argmax(-1) == labels).double(), torch.zeros((), dtype=torch.float64))
    tol = entropy_tolerance(z, dot_error_bound(ph, pw, pb, 0.7))
    assert bool(((ent.double() - exp_ent).abs() <= tol).all()), (ent, exp_ent, tol)
    assert corr.double().tolist() == exp_corr.tolist()
    assert corr[0, 3] == 1.0 and corr[0, 4] == 0.0
    assert bool((ent[~mask] == 0).all()) and bool((corr[~mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_middle_in_row_blocks_matches_float64(monkeypatch, dtype):
    """The eager middle of trdpo_loss_from_tokens works on L2-sized blocks of rows: forced to 3 rows a block
    (11 rows: 4 blocks, the last partial), with a row of −inf logits (masked vocabulary), ties and a huge
    logit, its log-probs, lse, entropy, argmax flags and onehot − p equal float64 within derived bounds.
    Bounds: lse from a sum of V exps, relative error ≤ (V + 2)·u32, so |Δlogp| ≤ (V + 2)·u32 + u32·(|z_y| + |lse|);
    onehot − p: |Δp_v| ≤ p_v·((V + 4)·u32 + u32·(|z_v| + |lse|)) + u32·|onehot − p| (the add of the onehot), plus
    one rounding into a bf16 tile (u = 2^-8)."""
    from fasttrdpo.loss import _chunked, token_list

    n, V = 11, 67
    monkeypatch.setattr(_chunked, "EAGER_BLOCK_BYTES", 3 * 4 * V)
    assert _chunked.eager_block_rows(V) == 3
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(n, V, generator=g) * 4).to(dtype)
    zr = (torch.randn(n, V, generator=g) * 4).to(dtype)
    z[2, :30] = float("-inf")
    z[5, 3] = z[5, 9] = 25.0  # tie: argmax is the first
    z[8, 0] = 80.0            # p ~ onehot: exp underflows everywhere else
    y = torch.randint(0, V, (n,), generator=g)
    y[2], y[5], y[8] = 40, 9, 0
    logp, lse, rlogp, ent, corr = (torch.full((n,), 7.0) for _ in range(5))
    token_list._EagerMiddle.forward(z, zr, y, logp, lse, rlogp, ent, corr)
    z64, zr64 = z.double(), zr.double()
    lsm, rlsm = z64.log_softmax(-1), zr64.log_softmax(-1)
    lse64 = z64.logsumexp(-1)
    u = U32
    for got, want, zz in ((logp, lsm.gather(1, y[:, None]).squeeze(1), z64), (rlogp, rlsm.gather(1, y[:, None]).squeeze(1), zr64)):
        l64 = zz.logsumexp(-1)
        tol = (V + 2) * u + u * (zz.gather(1, y[:, None]).squeeze(1).abs() + l64.abs())
        assert bool(((got.double() - want).abs() <= tol).all()), (got, want)
    assert bool(((lse.double() - lse64).abs() <= (V + 2) * u + u * lse64.abs()).all())
    exp_ent = -torch.where(lsm > -math.inf, lsm.exp() * lsm, torch.zeros((), dtype=torch.float64)).sum(-1)
    tol = entropy_tolerance(torch.where(torch.isinf(z64), -1e30, z64))
    assert bool(((ent.double() - exp_ent).abs() <= tol).all()), (ent, exp_ent, tol)
    assert corr.tolist() == (z64.argmax(-1) == y).double().tolist()
    assert corr[5] == 0.0 and corr[8] == 1.0

    d = z.clone()
    token_list._EagerMiddle.backward_(d, lse, y, torch.ones(n))
    p64 = lsm.exp()
    want = torch.nn.functional.one_hot(y, V).double() - p64
    zabs = torch.where(torch.isinf(z64), torch.zeros((), dtype=torch.float64), z64.abs())
    tol = p64 * ((V + 4) * u + u * (zabs + lse64.abs()[:, None])) + u * want.abs()  # + the onehot add's rounding
    if dtype != torch.float32:
        tol = tol + 2.0 ** -8 * want.abs()
    tol = tol + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the tile's subnormal spacing
    assert d.dtype == dtype
    assert bool(((d.double() - want).abs() <= tol).all()), float(((d.double() - want).abs() - tol).max())
