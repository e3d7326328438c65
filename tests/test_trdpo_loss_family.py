"""TRDPOLoss (both chunked paths) with the rest of TRL 1.16's loss family: batch losses (sft, aot, aot_unpaired)
and weighted lists, against a float64 reference, with the batch spread over >= 3 chunks.

Reference: test_trdpo_loss.py's float64 computation (full logits from the stored inputs, log_softmax, masked
sums, float64 autograd) with the per-pair losses of tests/test_loss_family.py's `ref_loss64` (TRL 1.16's
formulas, written independently of fasttrdpo.loss.preference); the loss is their (weighted) mean.
Tolerances: test_trdpo_loss.py's `_bounds` with `loss_of` — the same derivation its module docstring gives
(fp32 log-prob bound per token, sequence sums, first-order propagation through ∂L/∂x and the Hessian for
c = ∂L/∂logp, GEMM accumulation bounds), generalised to losses of the policy and reference sequence
log-probs x = [s, r] that need not depend on s − r alone (aot sorts them separately); backend="triton" adds
the logits-tile terms of `tile_units` (0 for fp32 inputs, as in test_trdpo_loss_cuda_path.py). aot's sort is
piecewise: the tests first check that no two sorted values lie within twice their error bound of each other,
so fp32 and float64 sort alike and the smooth bounds apply.
"""
import pytest
import torch

import fasttrdpo.loss as L
from fasttrdpo.loss import _chunked, token_list
from test_loss_family import ref_loss64
from test_trdpo_loss import _assert_within, _bounds, _run, _tiles, make_inputs, reference

SEED = 39  # (B=8) the policy's and the reference's pair margins rank differently: aot's sort is not trivial
BETA = 0.5
CASES = {  # name: (loss_type, loss_weights, label_smoothing, discopop_tau)
    "rpo": (["sigmoid", "sft"], None, 0.0, 0.05),
    "sft": ("sft", None, 0.0, 0.05),  # alone: nothing depends on the rejected rows (their gradient is 0)
    "aot": ("aot", None, 0.1, 0.05),
    "aot_unpaired": ("aot_unpaired", None, 0.0, 0.05),
    "weighted3": (["discopop", "sft", "aot"], [0.8, 0.3, 1.5], [0.0, 0.0, 0.05], 0.2),
}


def family_loss(loss_type, weights, eps, tau, beta=BETA):
    """Per-pair float64 losses Σ_k w_k·ref_loss64(type_k) (sft and aot: their batch terms; the mean is the loss)."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    ws = weights or [1.0] * len(types)
    es = eps if isinstance(eps, list) else [eps] * len(types)

    def loss_of(pc, pr, rc, rr, nc, nr):
        return sum(w * ref_loss64(t, pc, pr, rc, rr, beta, e, nc, nr, tau) for t, w, e in zip(types, ws, es))
    return loss_of


def _assert_sorts_agree(ref, s_err, r_err, loss_type):
    """The precondition of the smooth bounds for aot: adjacent sorted values further apart than 2× their error."""
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    s, r = ref["s"], ref["r"]
    P = s.shape[0] // 2
    sorted_pairs = []
    if "aot" in types:
        sorted_pairs += [(s[:P] - s[P:], s_err[:P] + s_err[P:]), (r[:P] - r[P:], r_err[:P] + r_err[P:])]
        assert not torch.equal(torch.argsort(s[:P] - s[P:]), torch.argsort(r[:P] - r[P:]))  # a real re-pairing
    if "aot_unpaired" in types:
        sorted_pairs += [(s[:P] - r[:P], s_err[:P] + r_err[:P]), (s[P:] - r[P:], s_err[P:] + r_err[P:])]
        assert not torch.equal(torch.argsort(s[:P] - r[:P]), torch.argsort(s[P:] - r[P:]))
    for v, e in sorted_pairs:
        assert float(torch.sort(v).values.diff().min()) > 2 * float(e.max())


class _ChunkSpy:
    """Records the chunk plans and the rows of every POLICY logits GEMM (told apart by the weight's storage)."""

    def __init__(self, monkeypatch, policy_weight):
        self.plans, self.policy_rows = [], []
        ptr = policy_weight.data_ptr()
        real_plan, real_project, real_logits = _chunked._plan_pair_chunks, _chunked._project, token_list._logits_

        def plan(*args):
            out = real_plan(*args)
            self.plans.append(out)
            return out

        def project(h, w, b, scale, out):
            if w.data_ptr() == ptr:
                self.policy_rows.append(out.shape[0])
            return real_project(h, w, b, scale, out)

        def logits(h, w, b, scale, softcap, out, t32):
            if w.data_ptr() == ptr:
                self.policy_rows.append(out.shape[0])
            return real_logits(h, w, b, scale, softcap, out, t32)
        for mod in (_chunked, token_list):
            monkeypatch.setattr(mod, "_plan_pair_chunks", plan)
        monkeypatch.setattr(_chunked, "_project", project)
        monkeypatch.setattr(token_list, "_logits_", logits)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_family_over_several_chunks_matches_float64(monkeypatch, backend, case):
    loss_type, weights, eps, tau = CASES[case]
    inputs = make_inputs(B=8, seed=SEED, bias=True)
    ph, pw, labels = inputs[:3]
    # chunk_bytes=1: every chunk is exactly one whole pair (the single-pass minimum): 4 chunks of the batch
    fn = L.TRDPOLoss(beta=BETA, loss_type=loss_type, loss_weights=weights, label_smoothing=eps, discopop_tau=tau,
                     backend=backend, chunk_bytes=1)
    w = pw.clone().requires_grad_()
    spy = _ChunkSpy(monkeypatch, w)
    loss, metrics, grads = _run(lambda h, _w, *a, **k: fn(h, w, *a, **k), inputs)
    grads[1] = w.grad
    loss_of = family_loss(loss_type, weights, eps, tau)
    ref = reference(*inputs, BETA, None, None, loss_of=loss_of)
    loss_tol, s_err, r_err, grad_tols = _bounds(ref, inputs, BETA, None, None, 1.0, None, [torch.float32] * 3,
                                                _tiles(backend, inputs), loss_of=loss_of)
    _assert_sorts_agree(ref, s_err, r_err, loss_type)
    assert len(spy.plans) == 1 and len(spy.plans[0]) >= 3  # the batch spans >= 3 chunks
    _assert_within(loss, ref["loss"], loss_tol, "loss")
    for got, exp, tol, name in zip(grads, ref["grads"], grad_tols, ["grad_hidden", "grad_weight", "grad_bias"]):
        _assert_within(got, exp, tol, name)
    P = labels.shape[0] // 2
    _assert_within(metrics["logps/chosen"], ref["metrics"]["logps/chosen"], s_err[:P].max(), "logps/chosen")
    _assert_within(metrics["logps/rejected"], ref["metrics"]["logps/rejected"], s_err[P:].max(), "logps/rejected")
    # cost: one policy logits GEMM per valid token (sft too: single pass); aot / aot_unpaired form them twice
    n_valid = int((labels != -100).sum())
    assert sum(spy.policy_rows) == (2 if L.needs_all_logps(loss_type) else 1) * n_valid


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_aot_with_pairs_longer_than_the_chunk(monkeypatch, backend):
    # max_pair_bytes=1 and a 4-token budget: every pair is split in blocks (the long-pair branch) inside both
    # passes. fp32: with a bf16 tile the worst-case sequence bound (~1.7 here) exceeds the gaps between the
    # sorted margins, so the sort precondition could not be checked (half tiles: test_trdpo_loss_cuda_path.py).
    dtype = torch.float32
    loss_type, weights, eps, tau = CASES["weighted3"]
    inputs = make_inputs(B=8, seed=SEED, bias=True, dtype=dtype)
    per_token = 67 * (4 if backend == "eager" else 8)  # fp32 logits; triton: policy + reference tiles
    fn = L.TRDPOLoss(beta=BETA, loss_type=loss_type, loss_weights=weights, label_smoothing=eps, discopop_tau=tau,
                     backend=backend, chunk_bytes=4 * per_token, max_pair_bytes=1)
    loss, metrics, grads = _run(fn, inputs)
    loss_of = family_loss(loss_type, weights, eps, tau)
    ref = reference(*inputs, BETA, None, None, loss_of=loss_of)
    loss_tol, s_err, r_err, grad_tols = _bounds(ref, inputs, BETA, None, None, 1.0, None, [dtype] * 3,
                                                _tiles(backend, inputs), loss_of=loss_of)
    _assert_sorts_agree(ref, s_err, r_err, loss_type)
    _assert_within(loss, ref["loss"], loss_tol, "loss")
    for got, exp, tol, name in zip(grads, ref["grads"], grad_tols, ["grad_hidden", "grad_weight", "grad_bias"]):
        assert got.dtype == dtype
        _assert_within(got, exp, tol, name)


def test_token_list_entry_takes_the_family():
    # trdpo_loss_from_tokens passes loss_weights / label_smoothing lists / discopop_tau through: the same tokens
    # in the same order as TRDPOLoss(backend="triton") give the same computation, bit for bit.
    from test_trdpo_loss_cuda_path import _token_list_args
    loss_type, weights, eps, tau = CASES["weighted3"]
    inputs = make_inputs(B=8, seed=SEED, bias=True)
    ph, pw, labels, rh, rw, pb, rb = inputs
    kw = dict(beta=BETA, loss_type=loss_type, loss_weights=weights, label_smoothing=eps, discopop_tau=tau)
    budget = 67 * 8 * 10  # ~10 tokens of fp32 tiles: several chunks; max_pair_bytes as the token entry sets it
    loss, metrics, grads = _run(L.TRDPOLoss(backend="triton", chunk_bytes=budget, max_pair_bytes=budget, **kw), inputs)
    h_tok, r_tok, y, rows, chosen, rejected, valid = _token_list_args(inputs)
    h, w = h_tok.clone().requires_grad_(), pw.clone().requires_grad_()
    loss_t, metrics_t = L.trdpo_loss_from_tokens(h, w, r_tok, rw, y, rows, chosen, rejected, policy_bias=pb,
                                                 ref_bias=rb, backend="triton", chunk_bytes=budget, **kw)
    loss_t.backward()
    assert torch.equal(loss_t, loss) and all(torch.equal(metrics_t[k], metrics[k]) for k in metrics)
    assert torch.equal(w.grad, grads[1])
    assert torch.equal(h.grad, grads[0].reshape(-1, ph.shape[-1])[valid])


def test_from_logits_takes_the_family():
    # trdpo_loss_from_logits forms the loss once on the whole batch; with logits = h @ Wᵀ (fp32, autograd) the
    # same float64 reference and bounds apply (fp32 GEMM logits, fp32 log-probs, fp32 gradient GEMMs).
    loss_type, weights, eps, tau = CASES["weighted3"]
    inputs = make_inputs(B=8, seed=SEED)
    ph, pw, labels, rh, rw, _, _ = inputs
    h, w = ph.clone().requires_grad_(), pw.clone().requires_grad_()
    loss, metrics = L.trdpo_loss_from_logits(h @ w.T, rh @ rw.T, labels, beta=BETA, loss_type=loss_type,
                                             loss_weights=weights, label_smoothing=eps, discopop_tau=tau,
                                             backend="eager")
    loss.backward()
    loss_of = family_loss(loss_type, weights, eps, tau)
    ref = reference(*inputs, BETA, None, None, loss_of=loss_of)
    loss_tol, _, _, grad_tols = _bounds(ref, inputs, BETA, None, None, 1.0, None, [torch.float32] * 2,
                                        loss_of=loss_of)
    _assert_within(loss, ref["loss"], loss_tol, "loss")
    _assert_within(h.grad, ref["grads"][0], grad_tols[0], "grad_hidden")
    _assert_within(w.grad, ref["grads"][1], grad_tols[1], "grad_weight")


BAD = [
    (dict(loss_type="dpo"), ValueError, "loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -1.0]), ValueError, "loss_weights"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=2.0), TypeError, "loss_weights"),
    (dict(loss_type=["exo_pair", "sft"], label_smoothing=[0.1]), ValueError, "label_smoothing"),
    (dict(loss_type=["exo_pair", "sft"], label_smoothing=0.1), ValueError, "label_smoothing"),  # sft has no ε
    (dict(loss_type="aot", label_smoothing=0.6), ValueError, "label_smoothing"),
    (dict(loss_type="discopop", discopop_tau=0.0), ValueError, "discopop_tau"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_family_config_raises_naming_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        L.TRDPOLoss(**kwargs)
    x = torch.zeros(4, 3, 5)
    with pytest.raises(exc, match=match):
        L.trdpo_loss_from_logits(x, x, torch.zeros(4, 3, dtype=torch.int64), **kwargs)
    from test_trdpo_loss_cuda_path import _tok_args
    with pytest.raises(exc, match=match):
        L.trdpo_loss_from_tokens(**_tok_args(), backend="eager", **kwargs)


def test_settings_are_read_only_and_shown():
    fn = L.TRDPOLoss(loss_type=["discopop", "sft"], loss_weights=[1.0, 0.5], discopop_tau=0.2)
    assert fn.loss_type == ["discopop", "sft"] and fn.loss_weights == [1.0, 0.5] and fn.discopop_tau == 0.2
    assert "loss_weights=[1.0, 0.5]" in repr(fn) and "discopop_tau=0.2" in repr(fn)
    with pytest.raises(AttributeError):
        fn.beta = 0.3  # validated at construction: a new TRDPOLoss for other settings, never an unchecked change
