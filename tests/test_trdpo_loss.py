"""TRDPOLoss (hidden states + lm_head weight → loss, metrics, gradients) against a plain float64 computation.

Reference: full float64 logits from the *stored* inputs, log_softmax, gather, masked sums, the DESIGN.md §4
(= TRL) formula, float64 autograd for the gradients. Tolerances are derived worst-case bounds of fp32
arithmetic (see `_bounds`), built on tests/helpers.py's per-token log-prob bound:
  * per sequence: Σ_t token bound + fp32 summation (n·u·Σ|logp|);
  * loss: first-order propagation through ∂L/∂(sequence log-probs) (float64), ×2 for curvature, plus
    a few u of the loss evaluation itself;
  * gradients, with c_t = ∂L/∂logp_t and D = (p − onehot)·∂z/∂u (u = raw logit): the error of c (through
    the float64 Hessian of L in the sequence log-probs), the relative error of p (2·token bound + 4u) and
    of the softcap derivative, and the fp32 GEMM accumulation bound γ_K·Σ|terms|; bf16 outputs add one
    bf16 rounding (2^-8 relative).
The bounds hold for any summation order; a wrong index, mask, sign or scale is O(1) and fails them.

backend="triton" (fasttrdpo/loss/token_list.py) forms logits by GEMM in the pair's half dtype when the inputs
are half (bf16/fp16 operands, fp32 accumulation) and stores the tile in that dtype. `tile_units` gives, per
model, u (the tile's unit roundoff: 2^-8 bf16, 2^-11 fp16, 0 for an fp32 tile) and u_cast (u when an fp32
operand was rounded to the half dtype, as autocast would). Their terms, added to the fp32 ones above:
  * each logit: ≤ 2u·s·(Σ_k|h_k W_vk| + |b_v|) (rounding of s·(hW+b) into the tile, and of the softcap's
    argument) + u_cast·s·(Σ|hW| + |b|) — added to the per-token dot bound, so it enters lse and z_y;
  * D = onehot − p is stored in the tile: + u·|D|;
  * grad_h = (D @ W) rounded to the half dtype before ·c: + (u + u_cast)·|c|·(|D| @ |W|);
  * grad_W partial Dᵀ(c⊙h): (c⊙h) and the partial each rounded once: + 2u·|D|ᵀ|c⊙h|; grad_b likewise.
"""
import math

import pytest
import torch

import fasttrdpo.loss as L
from helpers import U32, dot_error_bound, logprob_tolerance
from test_loss import ref_preference_losses


BACKENDS = ["eager", "triton"]  # triton: fasttrdpo/loss/token_list.py, its kernels in the interpreter here


def make_inputs(B=6, T=9, H=16, V=67, dtype=torch.float32, seed=0, bias=False, ref_H=None, ignore_patterns=True):
    g = torch.Generator().manual_seed(seed)
    ref_H = ref_H or H
    ph = torch.randn(B, T, H, generator=g).to(dtype)
    pw = (torch.randn(V, H, generator=g) / math.sqrt(H) * 2).to(dtype)
    rh = torch.randn(B, T, ref_H, generator=g).to(dtype) if ref_H != H else \
        (ph.float() + 0.3 * torch.randn(B, T, H, generator=g)).to(dtype)
    rw = (torch.randn(V, ref_H, generator=g) / math.sqrt(ref_H) * 2).to(dtype) if ref_H != H else \
        (pw.float() + 0.1 * torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    if ignore_patterns:
        labels[:, :3] = -100      # prompt
        labels[1, 6:] = -100      # padding in a chosen row
        if B >= 6:
            labels[B // 2 + 2, :] = -100  # a fully ignored rejected row
    pb = (0.5 * torch.randn(V, generator=g)).to(dtype) if bias else None
    rb = (0.5 * torch.randn(V, generator=g)).to(dtype) if bias else None
    return ph, pw, labels, rh, rw, pb, rb


def _transform(zraw, scale, cap):
    u = zraw * scale
    return (cap * torch.tanh(u / cap)) if cap is not None else u


def reference(ph, pw, labels, rh, rw, pb, rb, beta, loss_type, eps, scale=1.0, cap=None, ignore_index=-100,
              loss_of=None):
    """float64: loss, per-row policy/ref log-probs, metrics, and ∂loss/∂(ph, pw, pb).
    loss_of: per-pair losses (pc, pr, rc, rr, len_c, len_r) -> [P] float64 in place of the classic four
    (tests/test_trdpo_loss_family.py: TRL's whole family); the loss is their mean."""
    leaves = [ph.double().requires_grad_(), pw.double().requires_grad_()]
    if pb is not None:
        leaves.append(pb.double().requires_grad_())
    zraw = leaves[0] @ leaves[1].T + (leaves[2] if pb is not None else 0.0)
    z = _transform(zraw, scale, cap)
    mask = labels != ignore_index
    safe = labels.clamp(min=0)
    tok = torch.log_softmax(z, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask
    with torch.no_grad():
        zr = _transform(rh.double() @ rw.double().T + (rb.double() if rb is not None else 0.0), scale, cap)
        rtok = torch.log_softmax(zr, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask
    s, r, n = tok.sum(1), rtok.sum(1), mask.sum(1)
    P = labels.shape[0] // 2
    if loss_of is None:
        loss = ref_preference_losses(s[:P], s[P:], r[:P], r[P:], beta, loss_type, eps, n[:P], n[P:]).mean()
    else:
        loss = loss_of(s[:P], s[P:], r[:P], r[P:], n[:P], n[P:]).mean()
    grads = torch.autograd.grad(loss, leaves)
    cr, rj = beta * (s[:P] - r[:P]).detach(), beta * (s[P:] - r[P:]).detach()
    zmean = (z.detach().mean(-1) * mask)
    metrics = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
        "rewards/accuracies": (cr > rj).double().mean(), "rewards/margins": (cr - rj).mean(),
        "logps/chosen": s[:P].detach().mean(), "logps/rejected": s[P:].detach().mean(),
        "logits/chosen": zmean[:P].sum() / mask[:P].sum().clamp(min=1),
        "logits/rejected": zmean[P:].sum() / mask[P:].sum().clamp(min=1),
    }
    return dict(loss=loss.detach(), s=s.detach(), r=r, n=n, tok=tok.detach(), rtok=rtok, z=z.detach(), zr=zr,
                grads=grads, metrics=metrics)


U_HALF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def tile_units(hidden_dtype, weight_dtype):
    """(u, u_cast) of backend="triton"'s logits tile for one model (module docstring)."""
    from fasttrdpo.loss.token_list import gemm_dtype
    dt = gemm_dtype(hidden_dtype, weight_dtype)
    u = U_HALF.get(dt, 0.0)
    cast = u if (hidden_dtype != dt or weight_dtype != dt) else 0.0
    return u, cast


def _tiles(backend, inputs):
    if backend != "triton":
        return None
    ph, pw, _, rh, rw, _, _ = inputs
    return tile_units(ph.dtype, pw.dtype), tile_units(rh.dtype, rw.dtype)


def _seq_err(z64, tok64, h, w, b, mask, scale, cap, tile=(0.0, 0.0)):
    dot = dot_error_bound(h, w, b, scale)
    if tile[0] or tile[1]:
        H = h.shape[-1]
        gamma = H * U32 / (1 - H * U32)
        dot = dot + (2 * tile[0] + tile[1]) * dot / (gamma + 2 * U32)  # dot / (γ+2u) = s·max_v(Σ|hW| + |b|)
    if cap is not None:
        dot = dot + 4 * U32 * cap  # tanh and the ·cap rounding
    tok_tol = logprob_tolerance(z64, dot_err=dot) * mask
    n = mask.sum(1, keepdim=True).double()
    seq = tok_tol.sum(1) + (n.squeeze(1) + 1) * U32 * tok64.abs().sum(1)
    return seq, tok_tol, dot


def _bounds(ref, inputs, beta, loss_type, eps, scale, cap, out_dtypes, tiles=None, loss_of=None):
    """Derived tolerances for (loss, policy seq logps, ref seq logps, grads...) — see the module docstring.
    tiles: None (fp32 logits) or ((u, u_cast) policy, (u, u_cast) reference) from `tile_units`.
    loss_of: as in `reference`; then the loss is a function of the policy AND reference sequence log-probs
    x = [s, r] that need not depend on them through s − r alone (aot sorts them separately), so the
    first-order terms use the float64 gradient and Hessian in x: loss error ≤ 2·Σ|∂L/∂x|·err(x) (+ its fp32
    evaluation: ≤ 16 roundings, each u relative to the inputs feeding it: 16u·(|L| + Σ|∂L/∂x|·|x|)); error of
    c = ∂L/∂s ≤ 2·|∂²L/∂s∂x|·err(x) + 16u·|∂²L/∂s∂x|·|x| (its arguments' rounding) + 8u·|c|."""
    ph, pw, labels, rh, rw, pb, rb = inputs
    mask = labels != -100
    P = labels.shape[0] // 2
    (u_t, u_c), rtile = tiles if tiles is not None else ((0.0, 0.0), (0.0, 0.0))
    s_err, tok_tol, dot = _seq_err(ref["z"], ref["tok"], ph, pw, pb, mask, scale, cap, (u_t, u_c))
    r_err, _, _ = _seq_err(ref["zr"], ref["rtok"], rh, rw, rb, mask, scale, cap, rtile)

    if loss_of is None:
        # ∂L/∂s and its Hessian in float64 (L as a function of the policy sequence log-probs)
        def L_of(s):
            return ref_preference_losses(s[:P], s[P:], ref["r"][:P], ref["r"][P:], beta, loss_type, eps,
                                         ref["n"][:P], ref["n"][P:]).mean()
        s = ref["s"].clone().requires_grad_()
        c_row = torch.autograd.grad(L_of(s), s)[0]
        hess = torch.autograd.functional.hessian(L_of, ref["s"].clone())
        err_sr = s_err + r_err
        loss_tol = 2 * (c_row.abs() * err_sr).sum() + 16 * U32 * (ref["loss"].abs() + beta * (ref["s"] - ref["r"]).abs().max())
        c_err_row = 2 * hess.abs() @ err_sr + 8 * U32 * c_row.abs()
    else:
        B = 2 * P

        def L_of(x):
            s_, r_ = x[:B], x[B:]
            return loss_of(s_[:P], s_[P:], r_[:P], r_[P:], ref["n"][:P], ref["n"][P:]).mean()
        x = torch.cat([ref["s"], ref["r"]])
        xg = x.clone().requires_grad_()
        g = torch.autograd.grad(L_of(xg), xg)[0]
        hess = torch.autograd.functional.hessian(L_of, x.clone())[:B].abs()  # rows: ∂/∂s
        err_x = torch.cat([s_err, r_err])
        c_row = g[:B]
        loss_tol = 2 * (g.abs() * err_x).sum() + 16 * U32 * (ref["loss"].abs() + (g.abs() * x.abs()).sum())
        c_err_row = 2 * hess @ err_x + 16 * U32 * hess @ x.abs() + 8 * U32 * c_row.abs()

    # token-level quantities [B, T, V]
    c = (c_row.unsqueeze(1) * mask)                   # ∂L/∂logp_t
    dc = (c_err_row.unsqueeze(1) * mask)
    z = ref["z"]
    p = torch.softmax(z, -1)
    onehot = torch.zeros_like(p).scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 1.0) * mask.unsqueeze(-1)
    if cap is None:
        g = torch.full_like(p, scale)
        rho_g = torch.zeros_like(p) + 2 * U32
    else:
        t = z / cap
        g = scale * (1 - t * t)
        rho_g = 2 * t.abs() * dot.unsqueeze(-1) / cap + 6 * U32
    D = (p - onehot) * g
    rho_p = (2 * tok_tol + 4 * U32).unsqueeze(-1)
    dD = rho_p * p * g.abs() + rho_g * D.abs() + (U32 + u_t) * D.abs()
    V, H = pw.shape
    N = int(mask.sum())
    gam = lambda k: k * U32 / (1 - k * U32)  # noqa: E731
    absW = pw.double().abs()
    absD = D.abs()
    gh = (dc.unsqueeze(-1) * (absD @ absW) + c.abs().unsqueeze(-1) * (dD @ absW)
          + c.abs().unsqueeze(-1) * (gam(V) + u_t + u_c) * (absD @ absW))
    absh = ph.double().abs()
    flatD, flatdD = absD.reshape(-1, V), dD.reshape(-1, V)
    ch = (c.abs().unsqueeze(-1) * absh).reshape(-1, H)
    gw = (flatD.T @ (dc.unsqueeze(-1) * absh).reshape(-1, H) + flatdD.T @ ch
          + (gam(N + 1) + 2 * u_t) * (flatD.T @ ch))
    tols = [gh, gw]
    if pb is not None:
        cb = c.abs().reshape(-1)
        tols.append(flatD.T @ dc.reshape(-1) + flatdD.T @ cb + (gam(N + 1) + 2 * u_t) * (flatD.T @ cb))
    out = []
    for tol, exact, dt in zip(tols, ref["grads"], out_dtypes):
        tol = tol + 4 * U32 * exact.abs()
        if dt in U_HALF:  # the output's own rounding
            tol = tol + U_HALF[dt] * (exact.abs() + tol)
        out.append(tol)
    return loss_tol, s_err, r_err, out


def _assert_within(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs()
    ratio = (err / tol.clamp_min(1e-300)).max().item()
    assert bool((err <= tol).all()), f"{what}: max err/tol = {ratio:.3g} (max err {err.max().item():.3e})"


def _run(fn, inputs, requires=(True, True, True)):
    ph, pw, labels, rh, rw, pb, rb = inputs
    a = [ph.clone().requires_grad_(requires[0]), pw.clone().requires_grad_(requires[1])]
    b = pb.clone().requires_grad_(requires[2]) if pb is not None else None
    loss, metrics = fn(a[0], a[1], labels, rh, rw, policy_bias=b, ref_bias=rb)
    loss.backward()
    grads = [a[0].grad, a[1].grad] + ([b.grad] if b is not None else [])
    return loss, metrics, grads


CASES = [("sigmoid", 0.0, 0.1), ("sigmoid", 0.2, 0.5), ("ipo", 0.0, 0.3), ("hinge", 0.0, 0.05), ("robust", 0.1, 0.2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,eps,beta", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trdpo_matches_float64(backend, loss_type, eps, beta, dtype):
    inputs = make_inputs(dtype=dtype, seed=1, bias=(loss_type == "sigmoid"))
    fn = L.TRDPOLoss(beta=beta, loss_type=loss_type, label_smoothing=eps, backend=backend)
    loss, metrics, grads = _run(fn, inputs)
    ref = reference(*inputs, beta, loss_type, eps)
    loss_tol, s_err, r_err, grad_tols = _bounds(ref, inputs, beta, loss_type, eps, 1.0, None,
                                                [inputs[0].dtype, inputs[1].dtype, inputs[1].dtype],
                                                _tiles(backend, inputs))
    assert loss.dtype == torch.float32 and loss.shape == ()
    _assert_within(loss, ref["loss"], loss_tol, "loss")
    for got, exp, tol, name in zip(grads, ref["grads"], grad_tols, ["grad_hidden", "grad_weight", "grad_bias"]):
        assert got.dtype == (inputs[0].dtype if name == "grad_hidden" else inputs[1].dtype)
        _assert_within(got, exp, tol, name)
    P = inputs[2].shape[0] // 2
    _assert_within(metrics["logps/chosen"], ref["metrics"]["logps/chosen"], s_err[:P].max(), "logps/chosen")
    _assert_within(metrics["logps/rejected"], ref["metrics"]["logps/rejected"], s_err[P:].max(), "logps/rejected")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,cap", [(0.7, None), (1.3, 3.0)])
def test_trdpo_logit_scale_and_softcap(backend, scale, cap):
    inputs = make_inputs(seed=2, bias=True)
    fn = L.TRDPOLoss(beta=0.2, backend=backend, logit_scale=scale, softcap=cap)
    loss, metrics, grads = _run(fn, inputs)
    ref = reference(*inputs, 0.2, "sigmoid", 0.0, scale, cap)
    loss_tol, _, _, grad_tols = _bounds(ref, inputs, 0.2, "sigmoid", 0.0, scale, cap, [torch.float32] * 3)
    _assert_within(loss, ref["loss"], loss_tol, "loss")
    for got, exp, tol, name in zip(grads, ref["grads"], grad_tols, ["grad_hidden", "grad_weight", "grad_bias"]):
        _assert_within(got, exp, tol, name)
    # logits metric: mean over completion tokens and vocabulary of the transformed logits
    for k in ("logits/chosen", "logits/rejected"):
        torch.testing.assert_close(metrics[k].double(), ref["metrics"][k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_bytes,max_pair_bytes,cap", [
    (1, 1 << 30, None),              # every chunk is one pair (the minimum for a single pass)
    (4 * 67 * 20, 1 << 30, None),    # ~20 tokens: a few pairs per chunk
    (1 << 30, 1 << 30, None),        # everything in one chunk
    (4 * 67 * 4, 1, None),           # pairs longer than max_pair_bytes: two passes over 4-token blocks
    (4 * 67 * 5, 4 * 67 * 7, 2.5),   # the same with a softcap (its derivative buffer), uneven blocks
])
def test_eager_chunking_does_not_change_results(chunk_bytes, max_pair_bytes, cap):
    inputs = make_inputs(B=8, seed=3, bias=True)
    ref = reference(*inputs, 0.1, "sigmoid", 0.0, 1.0, cap)
    loss_tol, _, _, grad_tols = _bounds(ref, inputs, 0.1, "sigmoid", 0.0, 1.0, cap, [torch.float32] * 3)
    fn = L.TRDPOLoss(beta=0.1, backend="eager", chunk_bytes=chunk_bytes, max_pair_bytes=max_pair_bytes, softcap=cap)
    loss, metrics, grads = _run(fn, inputs)
    _assert_within(loss, ref["loss"], loss_tol, "loss")
    for got, exp, tol in zip(grads, ref["grads"], grad_tols):
        _assert_within(got, exp, tol, "grad")
    for k in ("logits/chosen", "logps/rejected"):
        torch.testing.assert_close(metrics[k].double(), ref["metrics"][k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_follow_trl_definitions(backend):
    inputs = make_inputs(seed=4, bias=True)
    with torch.no_grad():
        loss, metrics = L.TRDPOLoss(beta=0.5, backend=backend)(*inputs[:5], policy_bias=inputs[5],
                                                               ref_bias=inputs[6])
    ref = reference(*inputs, 0.5, "sigmoid", 0.0)
    assert set(metrics) == set(ref["metrics"])
    for k, v in metrics.items():
        assert isinstance(v, torch.Tensor) and v.shape == () and not v.requires_grad, k
        # metric values are fp32 sums/means of per-sequence log-probs: 1e-5 relative to their scale
        scale = max(1.0, abs(float(ref["metrics"][k])))
        assert abs(float(v) - float(ref["metrics"][k])) <= 1e-5 * scale, (k, float(v), float(ref["metrics"][k]))


def test_gradients_only_to_policy_and_respect_requires_grad():
    ph, pw, labels, rh, rw, pb, rb = make_inputs(seed=5, bias=True)
    rh, rw, rb = (t.clone().requires_grad_() for t in (rh, rw, rb))
    fn = L.TRDPOLoss(backend="eager")
    # frozen lm_head (e.g. LoRA on the backbone): only grad_hidden
    h = ph.clone().requires_grad_()
    loss, _ = fn(h, pw, labels, rh, rw, policy_bias=pb, ref_bias=rb)
    loss.backward()
    assert h.grad is not None and rh.grad is None and rw.grad is None and rb.grad is None
    # weight only
    w = pw.clone().requires_grad_()
    loss2, _ = fn(ph, w, labels, rh, rw)
    loss2.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_grad_output_scales_gradients():
    inputs = make_inputs(seed=6)
    fn = L.TRDPOLoss(beta=0.3, backend="eager")
    _, _, g1 = _run(fn, inputs)
    ph, pw, labels, rh, rw, _, _ = inputs
    h, w = ph.clone().requires_grad_(), pw.clone().requires_grad_()
    loss, _ = fn(h, w, labels, rh, rw)
    (2.5 * loss).backward()
    torch.testing.assert_close(h.grad, 2.5 * g1[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(w.grad, 2.5 * g1[1], rtol=1e-6, atol=1e-9)


def test_ignored_positions_get_zero_gradient_and_ref_size_may_differ():
    inputs = make_inputs(seed=7, ref_H=24)
    ph, pw, labels, rh, rw, _, _ = inputs
    loss, _, grads = _run(L.TRDPOLoss(backend="eager"), inputs)
    assert bool((grads[0][labels == -100] == 0).all())
    ref = reference(*inputs, 0.1, "sigmoid", 0.0)
    loss_tol, _, _, _ = _bounds(ref, inputs, 0.1, "sigmoid", 0.0, 1.0, None, [torch.float32] * 2)
    _assert_within(loss, ref["loss"], loss_tol, "loss")


def test_all_tokens_ignored_gives_log2():
    ph, pw, labels, rh, rw, _, _ = make_inputs(B=4, seed=8)
    labels = torch.full_like(labels, -100)
    h = ph.clone().requires_grad_()
    loss, m = L.TRDPOLoss(backend="eager")(h, pw, labels, rh, rw)
    loss.backward()
    assert math.isclose(float(loss), math.log(2.0), rel_tol=1e-6)  # Δ = 0 → −log σ(0)
    assert float(h.grad.abs().max()) == 0.0 and float(m["logits/chosen"]) == 0.0


def test_liger_side_by_side():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    inputs = make_inputs(B=8, T=12, H=32, V=131, seed=9, bias=True)
    ph, pw, labels, rh, rw, pb, rb = inputs
    beta = 0.1
    # Liger's conventions: (weight, input, target, bias, ref_input, ref_weight, ref_bias); summed (not averaged)
    # log-probs with average_log_prob=False; the same -100 ignore_index; rows chosen-then-rejected.
    lg = liger.LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=True, average_log_prob=False,
                                       ignore_index=-100, loss_type="sigmoid")
    h1, w1, b1 = (t.clone().requires_grad_() for t in (ph, pw, pb))
    l_loss, aux = lg(w1, h1, labels, b1, rh, rw, rb)
    l_loss.backward()
    loss, metrics, grads = _run(L.TRDPOLoss(beta=beta, backend="eager"), inputs)
    torch.testing.assert_close(loss, l_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["logps/chosen"], aux[0].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["logps/rejected"], aux[1].mean(), rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, (h1.grad, w1.grad, b1.grad)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)


def test_liger_per_sequence_logps_side_by_side():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    ph, pw, labels, rh, rw, _, _ = make_inputs(B=6, T=10, H=32, V=101, seed=10)
    lg = liger.LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=True, average_log_prob=False)
    _, aux = lg(pw, ph, labels, None, rh, rw, None)
    from fasttrdpo.loss._chunked import ChunkedTRDPOFunction, loss_config
    cfg = (loss_config(0.1, "sigmoid", 0.0, None, 0.05), -100, 1.0, None, 1 << 20, 1 << 28, False, False)
    _, policy_logps, _, _, _ = ChunkedTRDPOFunction.apply(ph, pw, None, rh, rw, None, labels, cfg)
    torch.testing.assert_close(policy_logps[:3], aux[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy_logps[3:], aux[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(labels=a["labels"][:3], policy_hidden=a["policy_hidden"][:3], ref_hidden=a["ref_hidden"][:3]),
     ValueError, "even number of rows"),
    (lambda a: a.update(labels=a["labels"][:, :4]), ValueError, "labels"),
    (lambda a: a.update(labels=a["labels"].int()), TypeError, "int64"),
    (lambda a: a.update(policy_weight=a["policy_weight"][:, :5]), ValueError, "policy_hidden"),
    (lambda a: a.update(ref_weight=a["ref_weight"][:10]), ValueError, "ref_weight"),
    (lambda a: a.update(ref_hidden=a["ref_hidden"][:, :4]), ValueError, "ref_hidden"),
    (lambda a: a.update(policy_bias=torch.zeros(3)), ValueError, "policy_bias"),
    (lambda a: a.update(policy_hidden=a["policy_hidden"].long()), TypeError, "policy_hidden"),
    (lambda a: a["labels"].__setitem__((0, 5), 67), ValueError, "labels"),
    (lambda a: a["labels"].__setitem__((0, 5), -7), ValueError, "labels"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_trdpo_bad_inputs(mutate, exc, match, backend):
    ph, pw, labels, rh, rw, _, _ = make_inputs(seed=11)
    args = dict(policy_hidden=ph, policy_weight=pw, labels=labels.clone(), ref_hidden=rh, ref_weight=rw)
    mutate(args)
    with pytest.raises(exc, match=match):
        L.TRDPOLoss(backend=backend)(args["policy_hidden"], args["policy_weight"], args["labels"],
                                     args["ref_hidden"], args["ref_weight"], policy_bias=args.get("policy_bias"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta"), (dict(loss_type="dpo"), "loss_type"), (dict(label_smoothing=0.7), "label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"), (dict(logit_scale=0.0), "logit_scale"),
    (dict(softcap=-1.0), "softcap"), (dict(chunk_bytes=0), "chunk_bytes"), (dict(max_pair_bytes=-1), "max_pair_bytes"),
])
def test_trdpo_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L.TRDPOLoss(**kwargs)


def test_backend_selection():
    ph, pw, labels, rh, rw, _, _ = make_inputs(seed=12)
    with pytest.raises(ValueError, match="backend"):
        L.TRDPOLoss(backend="cuda")(ph, pw, labels, rh, rw)
    L.TRDPOLoss(backend="eager")(ph, pw, labels, rh, rw)
    import fasttrdpo
    assert fasttrdpo.last_backend("TRDPOLoss") == "eager"


# ---- trdpo_loss_from_logits (logits level, on fasttrdpo.ops.logits.paired_token_logprobs) ----

@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("loss_type,eps,beta", [("sigmoid", 0.0, 0.1), ("ipo", 0.0, 0.3), ("robust", 0.1, 0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trdpo_loss_from_logits_matches_float64(backend, loss_type, eps, beta, dtype):
    g = torch.Generator().manual_seed(13)
    B, T, V = 6, 7, 53
    policy = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    refl = (policy.float() + torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[4, :] = -100
    x = policy.clone().requires_grad_()
    loss, metrics = L.trdpo_loss_from_logits(x, refl, labels, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                             backend=backend)
    loss.backward()

    mask = labels != -100
    z = policy.double().requires_grad_()
    tok = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    rtok = torch.log_softmax(refl.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    s, r, n = tok.sum(1), rtok.sum(1), mask.sum(1)
    P = B // 2

    def L_of(s_):
        return ref_preference_losses(s_[:P], s_[P:], r[:P], r[P:], beta, loss_type, eps, n[:P], n[P:]).mean()
    exp_loss = L_of(s)
    (exp_grad,) = torch.autograd.grad(exp_loss, z)

    # Bounds (module docstring), logits level: no GEMM term, p's relative error 2·token bound + 4u.
    s_err = (logprob_tolerance(z.detach()) * mask).sum(1) + (n + 1) * U32 * tok.detach().abs().sum(1)
    r_err = (logprob_tolerance(refl.double()) * mask).sum(1) + (n + 1) * U32 * rtok.abs().sum(1)
    sd = s.detach().clone().requires_grad_()
    c_row = torch.autograd.grad(L_of(sd), sd)[0]
    hess = torch.autograd.functional.hessian(L_of, s.detach().clone())
    loss_tol = 2 * (c_row.abs() * (s_err + r_err)).sum() + 16 * U32 * (exp_loss.abs() + beta * (s - r).abs().max())
    _assert_within(loss, exp_loss.detach(), loss_tol, "loss")
    dc = (2 * hess.abs() @ (s_err + r_err) + 8 * U32 * c_row.abs()).unsqueeze(1) * mask
    p = torch.softmax(z.detach(), -1)
    onehot = torch.zeros_like(p).scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 1.0)
    rho = (2 * logprob_tolerance(z.detach()) + 4 * U32).unsqueeze(-1)
    tol = dc.unsqueeze(-1) * (p - onehot).abs() + (c_row.abs().unsqueeze(1) * mask).unsqueeze(-1) * rho * p \
        + 4 * U32 * exp_grad.abs()
    if dtype == torch.bfloat16:
        tol = tol + 2.0 ** -8 * (exp_grad.abs() + tol)
    assert x.grad.dtype == dtype
    _assert_within(x.grad, exp_grad, tol, "grad_logits")
    exp_logits_chosen = (z.detach().mean(-1) * mask)[:P].sum() / mask[:P].sum()
    torch.testing.assert_close(metrics["logits/chosen"].double(), exp_logits_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["logps/rejected"].double(), s[P:].detach().mean(), rtol=1e-5, atol=1e-5)


def test_trdpo_loss_from_logits_bad_args():
    x = torch.zeros(4, 3, 5)
    labels = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="beta"):
        L.trdpo_loss_from_logits(x, x, labels, beta=0)
    with pytest.raises(ValueError, match="even number of rows"):
        L.trdpo_loss_from_logits(x[:3], x[:3], labels[:3])
    with pytest.raises(ValueError, match="ref_logits"):
        L.trdpo_loss_from_logits(x, x[:, :2], labels)


def test_cpp_backend_is_not_offered_at_lm_head_level(monkeypatch):
    ph, pw, labels, rh, rw, _, _ = make_inputs(seed=12)
    with pytest.raises(NotImplementedError, match="cpp"):
        L.TRDPOLoss(backend="cpp")(ph, pw, labels, rh, rw)
    # the process-wide preference is not an error: the op says so once and runs its auto choice (eager on CPU)
    from fasttrdpo import _backend
    monkeypatch.setattr(_backend, "_env_warned", set())  # the warning is once per process and op
    monkeypatch.setenv("FASTTRDPO_BACKEND", "cpp")
    with pytest.warns(UserWarning, match="cpp"):
        L.TRDPOLoss()(ph, pw, labels, rh, rw)
    import fasttrdpo
    assert fasttrdpo.last_backend("TRDPOLoss") == "eager"


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_lower_precision(backend):
    # Under a bf16 autocast region (TRL's mixed precision) the loss still runs fp32 math on the stored inputs:
    # the same inputs give the same loss and gradients as outside autocast (same code path, same order).
    inputs = make_inputs(seed=14, bias=True)
    fn = L.TRDPOLoss(beta=0.1, backend=backend)
    loss0, _, grads0 = _run(fn, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss1, _, grads1 = _run(fn, inputs)
    assert loss1.dtype == torch.float32
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trdpo_on_cuda_matches_float64(backend, dtype):
    # The compiled kernels (and the eager path on CUDA) against the same float64 reference and bounds.
    inputs = make_inputs(B=8, T=33, H=64, V=1031, dtype=dtype, seed=15, bias=True)
    fn = L.TRDPOLoss(beta=0.1, backend=backend)
    loss, metrics, grads = _run(fn, tuple(t.cuda() if t is not None else None for t in inputs))
    ref = reference(*inputs, 0.1, "sigmoid", 0.0)
    loss_tol, s_err, _, grad_tols = _bounds(ref, inputs, 0.1, "sigmoid", 0.0, 1.0, None, [dtype] * 3,
                                            _tiles(backend, inputs))
    _assert_within(loss.cpu(), ref["loss"], loss_tol, "loss")
    for got, exp, tol, name in zip(grads, ref["grads"], grad_tols, ["grad_hidden", "grad_weight", "grad_bias"]):
        _assert_within(got.cpu(), exp, tol, name)
