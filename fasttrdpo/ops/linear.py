"""Per-token log-probs at the lm_head: `linear_token_logprobs` and `paired_linear_token_logprobs`
(and `linear_token_stats`: per-token entropy and top-1 correctness, a metric, from the same kernels).

log p(y_t) = log_softmax(transform(h_t @ W.T + b))[y_t] without storing the [N, V] logits. Both
backends first gather the scored rows (label != ignore_index): prompt and padding rows never enter a
computation (neither their cost nor whatever NaN/inf they hold); their outputs are exactly 0.0 and
their grad_hidden exactly 0. TF32 is decided once per call (torch's flag, read in the forward) and the
backward uses that decision.
- backend "triton": `fasttrdpo.kernels.linear_logprobs` (forward: 2-D grid of logits tiles in
  registers, per-tile partial log-sum-exps merged in a fixed order; backward: vocabulary chunks of dz
  by a tile kernel, gradients by cuBLAS GEMMs; deterministic). A mixed pair (bf16 hidden with an fp32
  weight, as autocast produces) is cast to its half dtype, as autocast would;
- backend "eager": PyTorch over chunks of tokens, in fp32. Forward: per chunk, fp32 logits, log-sum-exp
  and the label logit; only the N log-sum-exps are saved. Backward: per chunk, recompute the logits,
  form g·(onehot − softmax)·d(transform) in place, and accumulate grad_hidden (per chunk), grad_weight
  and grad_bias (fp32 accumulators). Peak memory is a few chunk-sized buffers (`EAGER_CHUNK_BYTES` of
  logits each) plus the fp32 grad_weight accumulator, whatever N is. A half-precision weight is
  upcast to fp32 once per call (V·H·4 bytes);
- backend "cpp": the C++ extension covers the logits level and the blend only; asking for it here
  raises. When "auto" resolves to cpp (extension built, CPU tensors) this op runs eager.

Under torch.compile the op goes through torch.library custom ops (forward and backward, with fake
implementations and an autograd formula), so it traces as one opaque node; outside compile the same
functions run as a plain autograd.Function. The label range check (`validate=True`) reads
the labels on the host, which torch.compile turns into a graph break; `validate=False` traces fully.
Gathering the scored rows costs one host sync on CUDA (`nonzero`), inside the opaque op.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .._validate import (check_float, check_label_range, check_labels_tensor, check_logit_transform,
                         check_same_device)

# Each eager chunk holds at most this many bytes of fp32 logits, in one buffer reused by every chunk
# (the backward with softcap keeps a second one).
EAGER_CHUNK_BYTES = 32 * 2 ** 20

_OP_SINGLE = "linear_token_logprobs"
_OP_PAIRED = "paired_linear_token_logprobs"


# ------------------------------------------------------------------------------------------ eager
def _no_autocast(device: torch.device):
    """The eager path computes in fp32 by itself: an enclosing autocast must not downcast its matmuls."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _eager_chunk_rows(V: int) -> int:
    return max(1, EAGER_CHUNK_BYTES // (4 * V))


def _eager_logits(out: Tensor, h32: Tensor, w32: Tensor, b32: Optional[Tensor], scale: float,
                  softcap: Optional[float]) -> Tensor:
    """fp32 transformed logits of one chunk, written into (and transformed in) the buffer `out`."""
    if b32 is not None:
        torch.addmm(b32, h32, w32.T, out=out)
    else:
        torch.mm(h32, w32.T, out=out)
    if scale != 1.0:
        out.mul_(scale)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    return out


def _label_masks(labels: Tensor, V: int, ignore_index: int):
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < V)
    safe = torch.where(in_range, labels, torch.zeros_like(labels))
    return ignored, in_range, safe


# One logits buffer per call, reused by every chunk, and in-place math on it: no other [chunk, V]
# temporary is allocated (fresh chunk-sized temporaries also fragment the CPU heap, which keeps
# freed memory resident).
def _logit_chunks(hidden, w32, b32, scale, softcap):
    """(s, e, h32, z) per chunk of rows: h32 = hidden[s:e] in fp32, z its transformed fp32 logits, held in the
    one buffer every chunk reuses (valid until the next chunk)."""
    N, V = hidden.shape[0], w32.shape[0]
    step = min(N, _eager_chunk_rows(V))
    buf = torch.empty((step, V), dtype=torch.float32, device=hidden.device)
    for s in range(0, N, step):
        e = min(N, s + step)
        h32 = hidden[s:e].float()
        yield s, e, h32, _eager_logits(buf[: e - s], h32, w32, b32, scale, softcap)


def _eager_forward(hidden, weight, bias, labels, ignore_index, scale, softcap):
    N = hidden.shape[0]
    V = weight.shape[0]
    w32 = weight.float()
    b32 = bias.float() if bias is not None else None
    ignored, in_range, safe = _label_masks(labels, V, ignore_index)
    z_label = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    for s, e, _, z in _logit_chunks(hidden, w32, b32, scale, softcap):
        z_label[s:e] = z.gather(1, safe[s:e, None])[:, 0]
        m = z.amax(dim=1)
        lse[s:e] = m + z.sub_(m[:, None]).exp_().sum(dim=1).log_()
    logp = torch.where(ignored, torch.zeros_like(lse),
                       torch.where(in_range, z_label - lse, torch.full_like(lse, math.nan)))
    return logp, lse


def _eager_backward(grad, hidden, weight, bias, labels, lse, ignore_index, scale, softcap,
                    need_hidden, need_weight, need_bias):
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    w32 = weight.float()
    b32 = bias.float() if bias is not None else None
    ignored, in_range, safe = _label_masks(labels, V, ignore_index)
    # the incoming gradient as the kernels see it: 0 where ignored, NaN for a label outside [0, V)
    g = torch.where(ignored, torch.zeros_like(lse),
                    torch.where(in_range, grad.float(), torch.full_like(lse, math.nan)))
    gh = torch.empty((N, H), dtype=torch.float32, device=dev) if need_hidden else None
    gw = torch.zeros((V, H), dtype=torch.float32, device=dev) if need_weight else None
    gb = torch.zeros((V,), dtype=torch.float32, device=dev) if need_bias else None
    step = min(N, _eager_chunk_rows(V))
    deriv_buf = torch.empty((step, V), dtype=torch.float32, device=dev) if softcap is not None else None
    for s, e, h32, dz in _logit_chunks(hidden, w32, b32, scale, softcap):  # dz: transformed logits
        if softcap is not None:  # scale·(1 − tanh²), tanh = zt / softcap
            deriv = torch.div(dz, softcap, out=deriv_buf[: e - s]).square_().neg_().add_(1.0).mul_(scale)
        dz.sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])  # −g·softmax
        dz.scatter_add_(1, safe[s:e, None], g[s:e, None])  # + g·onehot (g = 0 on ignored rows)
        if softcap is not None:
            dz.mul_(deriv)
        elif scale != 1.0:
            dz.mul_(scale)
        if need_hidden:
            torch.mm(dz, w32, out=gh[s:e])
        if need_weight:
            gw.addmm_(dz.T, h32)
        if need_bias:
            gb.add_(dz.sum(dim=0))
    return gh, gw, gb


# ------------------------------------------------------------------------------------------ dispatch
@contextlib.contextmanager
def _matmul_precision(precision: str):
    """fp32 GEMMs (eager path) in the precision decided once per call, whatever the flag says later."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _scored_rows(labels: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices of the rows whose label is not ignore_index, or None when every row is scored.
    Ignored rows (prompt, padding) never enter a computation: not their cost, not their NaN/inf.
    (On CUDA `nonzero` syncs with the host once per call: the price of compacting.)"""
    scored = labels != ignore_index
    idx = scored.nonzero().squeeze(1)
    return None if idx.numel() == labels.numel() else idx


def _model_forward(hidden, weight, bias, labels, ignore_index, logit_scale, softcap, backend, precision):
    """(logp, lse) fp32 [n] for already compacted rows."""
    if backend == "triton":
        from fasttrdpo.kernels.linear_logprobs import linear_logprobs_forward

        return linear_logprobs_forward(hidden, weight, bias, labels, ignore_index=ignore_index,
                                       logit_scale=logit_scale, softcap=softcap, precision=precision)
    return _eager_forward(hidden, weight, bias, labels, ignore_index, logit_scale, softcap)


def _forward_impl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index,
                  logit_scale, softcap, backend, precision):
    N = labels.shape[0]
    models = [(hidden, weight, bias)] + ([] if ref_hidden is None else [(ref_hidden, ref_weight, ref_bias)])
    logp = torch.zeros((len(models), N), dtype=torch.float32, device=hidden.device)
    lse = torch.zeros((len(models), N), dtype=torch.float32, device=hidden.device)
    idx = _scored_rows(labels, ignore_index)
    if idx is not None and idx.numel() == 0:
        return logp, lse  # nothing scored: exactly 0.0 everywhere, nothing computed
    y = labels if idx is None else labels.index_select(0, idx)
    with _no_autocast(hidden.device), _matmul_precision(precision):
        for i, (h, w, b) in enumerate(models):
            h = h if idx is None else h.index_select(0, idx)
            m_logp, m_lse = _model_forward(h, w, b, y, ignore_index, logit_scale, softcap, backend, precision)
            if idx is None:
                logp[i], lse[i] = m_logp, m_lse
            else:
                logp[i].index_copy_(0, idx, m_logp)
                lse[i].index_copy_(0, idx, m_lse)
    return logp, lse


@torch.library.custom_op("fasttrdpo::linear_logprobs_fwd", mutates_args=())
def _linear_logprobs_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                         ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor],
                         ref_bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                         logit_scale: float, softcap: Optional[float],
                         backend: str, precision: str) -> tuple[Tensor, Tensor]:
    """(logp, lse), fp32 [models, N]; row 0 the policy, row 1 the reference when given."""
    return _forward_impl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels,
                         ignore_index, logit_scale, softcap, backend, precision)


@_linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, ignore_index, logit_scale,
      softcap, backend, precision):
    models = 1 if ref_hidden is None else 2
    shape = (models, hidden.shape[0])
    return hidden.new_empty(shape, dtype=torch.float32), hidden.new_empty(shape, dtype=torch.float32)


def _backward_impl(grad, hidden, weight, bias, labels, lse, ignore_index, logit_scale, softcap, backend,
                   precision, need_hidden, need_weight, need_bias):
    """(grad_hidden, grad_weight, grad_bias) in the input dtypes; an empty tensor where not needed.
    Only the scored rows enter; grad_hidden is exactly 0 on the ignored ones."""
    N, H = hidden.shape
    idx = _scored_rows(labels, ignore_index)
    empty = hidden.new_empty((0,))
    if idx is not None and idx.numel() == 0:
        return (torch.zeros_like(hidden) if need_hidden else empty,
                torch.zeros_like(weight) if need_weight else empty,
                torch.zeros_like(bias) if need_bias else empty)
    if idx is not None:
        hidden_s, labels_s = hidden.index_select(0, idx), labels.index_select(0, idx)
        grad_s, lse_s = grad.index_select(0, idx), lse.index_select(0, idx)
    else:
        hidden_s, labels_s, grad_s, lse_s = hidden, labels, grad, lse
    with _no_autocast(hidden.device), _matmul_precision(precision):
        if backend == "triton":
            from fasttrdpo.kernels.linear_logprobs import linear_logprobs_backward

            gh, gw, gb = linear_logprobs_backward(
                grad_s, hidden_s, weight, bias, labels_s, lse_s, need_hidden=need_hidden,
                need_weight=need_weight, need_bias=need_bias, ignore_index=ignore_index,
                logit_scale=logit_scale, softcap=softcap, precision=precision)
        else:
            gh, gw, gb = _eager_backward(grad_s, hidden_s, weight, bias, labels_s, lse_s, ignore_index,
                                         logit_scale, softcap, need_hidden, need_weight, need_bias)
    if need_hidden:
        gh = gh.to(hidden.dtype)  # fp32 accumulator -> storage dtype (round to nearest even)
        if idx is not None:
            gh = torch.zeros_like(hidden).index_copy_(0, idx, gh)
    return (gh if need_hidden else empty,
            gw.to(weight.dtype) if need_weight else empty,
            gb.to(bias.dtype) if need_bias else empty)


@torch.library.custom_op("fasttrdpo::linear_logprobs_bwd", mutates_args=())
def _linear_logprobs_bwd(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                         labels: Tensor, lse: Tensor, ignore_index: int, logit_scale: float,
                         softcap: Optional[float], backend: str, precision: str, need_hidden: bool,
                         need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(grad, hidden, weight, bias, labels, lse, ignore_index, logit_scale, softcap,
                          backend, precision, need_hidden, need_weight, need_bias)


@_linear_logprobs_bwd.register_fake
def _(grad, hidden, weight, bias, labels, lse, ignore_index, logit_scale, softcap, backend, precision,
      need_hidden, need_weight, need_bias):
    empty = hidden.new_empty((0,))
    return (torch.empty_like(hidden) if need_hidden else empty,
            torch.empty_like(weight) if need_weight else empty,
            torch.empty_like(bias) if need_bias else empty)


_N_INPUTS = 12


def _save(ctx, inputs, lse):
    hidden, weight, bias, _rh, _rw, _rb, labels, ignore_index, logit_scale, softcap, backend, precision = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    # the precision decided by the forward is the backward's too (TF32 is read once per call)
    ctx.args = (ignore_index, logit_scale, softcap, backend, precision)


def _grads(ctx, grad_logp, backward_fn):
    """Gradients for the forward inputs: the policy's hidden, weight, bias; None for the rest."""
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    ignore_index, logit_scale, softcap, backend, precision = ctx.args
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    if grad_logp is None or not (need_h or need_w or need_b):
        return (None,) * _N_INPUTS
    gh, gw, gb = backward_fn(grad_logp[0].contiguous(), hidden, weight, bias, labels, lse[0].contiguous(),
                             ignore_index, logit_scale, softcap, backend, precision, need_h, need_w, need_b)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * (_N_INPUTS - 3)


_linear_logprobs_fwd.register_autograd(
    lambda ctx, grad_logp, _grad_lse: _grads(ctx, grad_logp, _linear_logprobs_bwd),
    setup_context=lambda ctx, inputs, output: _save(ctx, inputs, output[1]))


class _LinearLogprobs(torch.autograd.Function):
    """The same forward/backward outside torch.compile, without the custom-op dispatch (whose first
    call imports torch's tracing stack: ~150 MB of resident memory a plain eager user does not need)."""

    @staticmethod
    def forward(ctx, *inputs):
        logp, lse = _forward_impl(*inputs)
        _save(ctx, inputs, lse)
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse):
        return _grads(ctx, grad_logp, _backward_impl)


def _linear_logprobs(*inputs):
    if torch.compiler.is_compiling():
        return _linear_logprobs_fwd(*inputs)
    return _LinearLogprobs.apply(*inputs)


# ------------------------------------------------------------------------------------------ validation
def _check_scalars(logit_scale, softcap, ignore_index):
    check_logit_transform(logit_scale, softcap)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2 ** 31 <= ignore_index < 2 ** 31:
        raise ValueError(f"ignore_index must fit in int32, got {ignore_index}")


def _check_model(prefix, hidden, weight, bias, vocab=None):
    """Validate one model's (hidden [..., H], weight [V, H], bias [V] | None); returns V."""
    check_float(f"{prefix}hidden", hidden, min_dim=1)
    check_float(f"{prefix}weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if V == 0 or H == 0:
        raise ValueError(f"{prefix}weight is empty (shape {tuple(weight.shape)}): need V >= 1 and H >= 1")
    if hidden.shape[-1] != H:
        raise ValueError(f"{prefix}hidden must end in the weight's hidden size {H} "
                         f"({prefix}weight is {tuple(weight.shape)}), got shape {tuple(hidden.shape)}")
    if vocab is not None and V != vocab:
        raise ValueError(f"{prefix}weight must have the policy's vocabulary size {vocab} rows, got {V}")
    if bias is not None:
        check_float(f"{prefix}bias", bias, min_dim=1)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{prefix}bias must have shape ({V},), got {tuple(bias.shape)}")
    return V


def _resolve(op, backend, device):
    # The C++ extension covers token_logprobs/paired_token_logprobs and blend_, not the lm_head level.
    return _backend.resolve_backend(op, backend, device, provides=("triton", "eager"))


def _flat_rows(t: Tensor) -> Tensor:
    """[..., H] -> [N, H] with a unit stride along H (what the kernels index)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _prepare_weight(w: Tensor) -> Tensor:
    return w if w.stride(-1) == 1 else w.contiguous()


def _prepare_bias(b: Optional[Tensor]) -> Optional[Tensor]:
    return b if b is None or b.stride(-1) == 1 else b.contiguous()


# ------------------------------------------------------------------------------------------ public ops
def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                          ignore_index: int = -100, logit_scale: float = 1.0,
                          softcap: Optional[float] = None, validate: bool = True,
                          backend: str = "auto") -> Tensor:
    """log_softmax(transform(hidden @ weight.T + bias)).gather(labels), without the logits.

    hidden [..., H] (fp32/bf16/fp16), weight [V, H], bias [V] or None, labels [...] int64 (already
    shifted; ignore_index marks prompt/padding). transform(z) = softcap·tanh(logit_scale·z/softcap) if
    softcap else logit_scale·z. Returns fp32 with the labels' shape, exactly 0.0 where ignored;
    differentiable in hidden, weight and bias. `validate=False` skips the label range check (a host
    sync on CUDA); a label outside [0, V) then gives NaN, never an out-of-bounds read.
    """
    _check_scalars(logit_scale, softcap, ignore_index)
    V = _check_model("", hidden, weight, bias)
    check_labels_tensor(labels, hidden.shape[:-1])
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    if validate:
        check_label_range(labels, V, ignore_index)
    chosen = _resolve(_OP_SINGLE, backend, hidden.device)
    logp, _lse = _linear_logprobs(_flat_rows(hidden), _prepare_weight(weight), _prepare_bias(bias), None,
                                  None, None, labels.reshape(-1).contiguous(), ignore_index,
                                  float(logit_scale), None if softcap is None else float(softcap),
                                  chosen, _backend.dot_precision())
    return logp[0].reshape(labels.shape)


def paired_linear_token_logprobs(policy_hidden: Tensor, policy_weight: Tensor, ref_hidden: Tensor,
                                 ref_weight: Tensor, labels: Tensor, *,
                                 policy_bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                                 ignore_index: int = -100, logit_scale: float = 1.0,
                                 softcap: Optional[float] = None, validate: bool = True,
                                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Policy and reference per-token log-probs for the same labels, in one fused launch (triton).

    Same semantics as `linear_token_logprobs` for each model; the reference may have its own hidden
    size and dtypes but must share the vocabulary. Returns (policy_logp, ref_logp), fp32 with the
    labels' shape; ref_logp never carries a gradient (the reference inputs are treated as constants).
    """
    _check_scalars(logit_scale, softcap, ignore_index)
    V = _check_model("policy_", policy_hidden, policy_weight, policy_bias)
    _check_model("ref_", ref_hidden, ref_weight, ref_bias, vocab=V)
    check_labels_tensor(labels, policy_hidden.shape[:-1])
    if tuple(ref_hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"ref_hidden must have shape {tuple(labels.shape)} + (H,) like the labels, "
                         f"got {tuple(ref_hidden.shape)}")
    check_same_device(policy_hidden=policy_hidden, policy_weight=policy_weight, policy_bias=policy_bias,
                      ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, labels=labels)
    if validate:
        check_label_range(labels, V, ignore_index)
    chosen = _resolve(_OP_PAIRED, backend, policy_hidden.device)
    logp, _lse = _linear_logprobs(
        _flat_rows(policy_hidden), _prepare_weight(policy_weight), _prepare_bias(policy_bias),
        _flat_rows(ref_hidden.detach()), _prepare_weight(ref_weight.detach()),
        None if ref_bias is None else _prepare_bias(ref_bias.detach()), labels.reshape(-1).contiguous(),
        ignore_index, float(logit_scale), None if softcap is None else float(softcap), chosen,
        _backend.dot_precision())  # TF32 or not: decided once here, for forward and backward alike
    return logp[0].reshape(labels.shape), logp[1].detach().reshape(labels.shape)


def _eager_stats(hidden, weight, bias, labels, scale, softcap):
    """(entropy, correct) fp32 [n] for compacted rows, chunk by chunk over one reused fp32 logits buffer."""
    N = hidden.shape[0]
    w32 = weight.float()
    b32 = bias.float() if bias is not None else None
    entropy = torch.empty(N, dtype=torch.float32, device=hidden.device)
    correct = torch.empty(N, dtype=torch.float32, device=hidden.device)
    for s, e, _, z in _logit_chunks(hidden, w32, b32, scale, softcap):
        correct[s:e] = (z.argmax(1) == labels[s:e]).to(torch.float32)  # first maximal index on ties
        torch._log_softmax(z, 1, False, out=z)
        # −Σ p·log p; p = 0 where log p = −inf contributes 0 (not 0·−inf)
        entropy[s:e] = -(z.exp() * torch.where(torch.isinf(z), torch.zeros((), device=z.device), z)).sum(1)
    return entropy, correct


@torch.no_grad()
def linear_token_stats(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                       ignore_index: int = -100, logit_scale: float = 1.0, softcap: Optional[float] = None,
                       validate: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-token entropy and top-1 correctness of softmax(transform(hidden @ weight.T + bias)), without logits.

    Same inputs and transform as `linear_token_logprobs`. Returns (entropy, correct), fp32 with the labels'
    shape: entropy = −Σ_v p_v log p_v; correct = 1.0 where the label is argmax_v (ties: the first maximal
    index, torch.argmax's rule), else 0.0; both exactly 0.0 where the label is ignored. No gradient (a metric).
    triton: the forward kernels of kernels/linear_logprobs.py with their STATS outputs (the same tiles as the
    log-probs); eager: fp32 logits a chunk of rows at a time.
    """
    _check_scalars(logit_scale, softcap, ignore_index)
    V = _check_model("", hidden, weight, bias)
    check_labels_tensor(labels, hidden.shape[:-1])
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    if validate:
        check_label_range(labels, V, ignore_index)
    chosen = _resolve("linear_token_stats", backend, hidden.device)
    flat = labels.reshape(-1).contiguous()
    entropy = torch.zeros(flat.shape, dtype=torch.float32, device=hidden.device)
    correct = torch.zeros(flat.shape, dtype=torch.float32, device=hidden.device)
    idx = _scored_rows(flat, ignore_index)
    if idx is not None and idx.numel() == 0:
        return entropy.reshape(labels.shape), correct.reshape(labels.shape)
    h = _flat_rows(hidden)
    h = h if idx is None else h.index_select(0, idx)
    y = flat if idx is None else flat.index_select(0, idx)
    w, b = _prepare_weight(weight), _prepare_bias(bias)
    scale, cap = float(logit_scale), None if softcap is None else float(softcap)
    precision = _backend.dot_precision()
    with _no_autocast(hidden.device), _matmul_precision(precision):
        if chosen == "triton":
            from fasttrdpo.kernels.linear_logprobs import linear_logprobs_forward

            _, _, ent, corr = linear_logprobs_forward(h, w, b, y, ignore_index=ignore_index, logit_scale=scale,
                                                      softcap=cap, precision=precision, stats=True)
        else:
            ent, corr = _eager_stats(h, w, b, y, scale, cap)
    if idx is None:
        entropy, correct = ent, corr
    else:
        entropy.index_copy_(0, idx, ent)
        correct.index_copy_(0, idx, corr)
    return entropy.reshape(labels.shape), correct.reshape(labels.shape)
