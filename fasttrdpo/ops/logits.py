"""Per-token log-probs from logits: `token_logprobs` and `paired_token_logprobs` (DESIGN.md §4).

    logp[...] = log_softmax(logits[..., :])[labels[...]]   fp32, 0.0 where labels == ignore_index

The gradient with respect to the policy logits is g·(onehot − softmax); the reference output never
carries a gradient. Three backends compute the same thing:
  * "triton": `fasttrdpo.kernels.token_logprobs` (policy and reference rows in one launch; backward
    optionally in place into the logits buffer);
  * "eager": fp32 PyTorch, chunked over rows so the fp32 temporaries stay bounded
    (EAGER_CHUNK_ELEMENTS per temporary) whatever N·V is;
  * "cpp": the C++ CPU kernels (`fasttrdpo._cpp`).

Layouts: every backend accepts every layout (any strides, expanded and overlapping views included).
The kernels address rows through at most two strides with the last dimension contiguous; any other
layout is copied first, and each such copy is logged at DEBUG level on the `fasttrdpo` logger.

`inplace_backward=True` writes the gradient over the logits only when that is safe and free: the
logits are provably non-overlapping (`provably_non_overlapping`: torch's internal-overlap check, with
"too hard" settled by a stride proof or counted as overlap) and the kernels can address them without
a copy. Otherwise the backward runs out of place, warns once per reason, and
`fasttrdpo.last_backend("token_logprobs_inplace_backward")` says "out of place: <why>" (else "in
place"; "out of place" when not requested).

Both ops are `torch.library` custom ops (`fasttrdpo::logits_logprobs_forward` and the backward ops)
with fake implementations and a registered autograd formula, so they trace into `torch.compile`
graphs (fullgraph) as opaque calls. The label range check runs inside the op (one host sync on CUDA),
so it costs nothing to trace and `validate=False` removes it; a bad label then yields NaN (log-prob
and gradient row) and is never used as an address.
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .._backend import resolve_backend
from .._validate import (check_float, check_label_range, check_labels_tensor, check_same_device,
                         provably_non_overlapping)

EAGER_CHUNK_ELEMENTS = 1 << 22  # logits per chunk in the eager twin: 16 MiB per fp32 temporary
INPLACE_STATUS = "token_logprobs_inplace_backward"  # last_backend key: how the last backward wrote

_log = logging.getLogger("fasttrdpo")
_inplace_warned: set[str] = set()

__all__ = ["token_logprobs", "paired_token_logprobs"]


# --------------------------------------------------------------------------------------------------
# Layout: describe the rows of a [..., V] tensor by at most two strides, so that common views
# (a [B, T-1, V] slice of [B, T, V] logits, a row-strided 2-D view) reach the kernel without a copy.
# --------------------------------------------------------------------------------------------------

def _row_layout(t: Tensor):
    """(inner_size, (stride_outer, stride_inner)) with row r at (r // inner)·s_outer + (r % inner)·s_inner,
    or None when the last dimension is not contiguous or the leading dims need more than two strides."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    merged: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if not merged:
        return 1, (0, 0)
    if len(merged) == 1:
        return 1, (merged[0][1], 0)
    if len(merged) == 2:
        return merged[1][0], (merged[0][1], merged[1][1])
    return None


def _layout_copy(t: Tensor, backend: str) -> Tensor:
    """A contiguous copy of logits whose layout the kernels cannot address (logged: it costs a read
    and a write of the whole tensor)."""
    _log.debug("fasttrdpo: %s backend copies logits of shape %s, strides %s (layout not addressable by "
               "two row strides with a contiguous last dimension)", backend, tuple(t.shape), tuple(t.stride()))
    return t.contiguous()


def _kernel_view(t: Tensor, backend: str = "triton"):
    """(tensor, inner_size, strides) usable by the kernels; copies only when the layout needs it."""
    layout = _row_layout(t)
    if layout is None:
        t = _layout_copy(t, backend)
        layout = _row_layout(t)
    return (t, *layout)


def _inplace_refusal(logits: Tensor) -> Optional[str]:
    """Why the backward may not write over `logits`, or None when it may (on every backend)."""
    if not provably_non_overlapping(logits):
        return ("the logits overlap themselves in memory (an expand()ed or overlapping as_strided view), "
                "or their strides do not prove otherwise")
    if _row_layout(logits) is None:
        return ("the logits' layout needs a copy for the kernels (last dimension not contiguous, or leading "
                "dimensions that need more than two strides)")
    return None


def _report_inplace(requested: bool, refusal: Optional[str]) -> None:
    if not requested:
        _backend.note(INPLACE_STATUS, "out of place")
        return
    if refusal is None:
        _backend.note(INPLACE_STATUS, "in place")
        return
    _backend.note(INPLACE_STATUS, f"out of place: {refusal}")
    if refusal not in _inplace_warned:
        _inplace_warned.add(refusal)
        warnings.warn(f"inplace_backward=True, but {refusal}: the backward ran out of place instead (correct "
                      f"values; the gradient gets its own buffer). last_backend({INPLACE_STATUS!r}) reports "
                      "this per call; this warning is shown once.", stacklevel=2)


# --------------------------------------------------------------------------------------------------
# Backends. Inputs: logits [..., V], labels [...] (labels' shape = logits' leading shape).
# Forward returns flat fp32 (logp, lse, ref_logp or None); backward returns / writes grad [..., V].
# --------------------------------------------------------------------------------------------------

def _contiguous_strides(inner: int, V: int):
    """Strides of a contiguous [rows, V] tensor in the (inner_size, strides) form of `_row_layout`."""
    return inner * V, V


def _new_outputs(rows: int, paired: bool, device):
    """Separate fp32 buffers for logp, lse (and ref logp): a custom op's outputs may not alias."""
    return [torch.empty(rows, dtype=torch.float32, device=device) for _ in range(3 if paired else 2)]


def _triton_forward(policy, ref, labels, ignore_index):
    from fasttrdpo.kernels import token_logprobs as kernels

    V = policy.shape[-1]
    rows = labels.numel()
    labels_flat = labels.reshape(-1).contiguous()
    policy, inner, policy_strides = _kernel_view(policy, "triton")
    ref_strides = None
    if ref is not None:
        ref, ref_inner, ref_strides = _kernel_view(ref, "triton")
        if ref_inner != inner:  # both are read on one row grid: express a contiguous one on the other's
            if ref.is_contiguous():
                ref_strides = _contiguous_strides(inner, V)
            else:
                policy = _layout_copy(policy, "triton")
                policy_strides = _contiguous_strides(ref_inner, V)
                inner = ref_inner
    out = _new_outputs(rows, ref is not None, policy.device)
    kernels.launch_forward(policy, ref, labels_flat, out[0], out[1], out[2] if ref is not None else None,
                           rows=rows, inner_size=inner, policy_strides=policy_strides,
                           ref_strides=ref_strides, ignore_index=ignore_index)
    return out[0], out[1], (out[2] if ref is not None else None)


def _triton_backward(grad_logp, logits, lse, labels, ignore_index, inplace):
    from fasttrdpo.kernels import token_logprobs as kernels

    V = logits.shape[-1]
    labels_flat = labels.reshape(-1).contiguous()
    # In place the caller has checked `_inplace_refusal`: src is then logits itself, never a copy.
    src, inner, in_strides = _kernel_view(logits, "triton")
    if inplace:
        out, out_strides = src, in_strides
    else:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        out_strides = _contiguous_strides(inner, V)
    kernels.launch_backward(grad_logp, src, lse, labels_flat, out, rows=labels_flat.numel(), inner_size=inner,
                            in_strides=in_strides, out_strides=out_strides, ignore_index=ignore_index)
    return out


def _row_chunks(t: Tensor, max_rows: int):
    """Yield (first_row, view): views of t ([n, V] or [k, inner, V]) whose rows, in order, are t's
    flattened rows first_row .. first_row + n − 1, never more than max(max_rows, 1) rows, never a copy.
    t must have a `_row_layout` (the caller makes a contiguous copy otherwise)."""
    V = t.shape[-1]
    rows = t.numel() // V
    inner, (s_outer, s_inner) = _row_layout(t)
    max_rows = max(1, max_rows)
    if inner == 1:
        rows_2d = t.as_strided((rows, V), (s_outer, 1), t.storage_offset())
        for start in range(0, rows, max_rows):
            yield start, rows_2d[start:start + max_rows]
        return
    rows_3d = t.as_strided((rows // inner, inner, V), (s_outer, s_inner, 1), t.storage_offset())
    if inner <= max_rows:  # whole outer slices at a time
        step = max_rows // inner
        for outer in range(0, rows // inner, step):
            yield outer * inner, rows_3d[outer:outer + step]
    else:
        for outer in range(rows // inner):
            for start in range(0, inner, max_rows):
                yield outer * inner + start, rows_3d[outer, start:start + max_rows]


def _eager_rows_forward(z: Tensor, labels: Tensor, ignore_index: int):
    """fp32 (logp, lse) of a chunk of rows z [..., V] with labels [...]."""
    V = z.shape[-1]
    ignored = labels == ignore_index
    scan = (labels >= 0) & (labels < V) & ~ignored
    # log_softmax is one fused pass over the chunk (several times faster on CPU than logsumexp's
    # max / subtract / exp / sum passes); the lse follows from any column: lse = z_y − logp_y.
    safe = torch.where(scan, labels, 0).unsqueeze(-1)
    logp = torch.log_softmax(z, dim=-1, dtype=torch.float32).gather(-1, safe).squeeze(-1)
    lse = z.gather(-1, safe).squeeze(-1).float() - logp
    nan = torch.full_like(lse, float("nan"))
    zero = torch.zeros_like(lse)
    logp = torch.where(ignored, zero, torch.where(scan, logp, nan))
    lse = torch.where(ignored, zero, torch.where(scan, lse, nan))
    return logp, lse


def _eager_forward(policy, ref, labels, ignore_index):
    V = policy.shape[-1]
    labels_flat = labels.reshape(-1)
    out = _new_outputs(labels_flat.numel(), ref is not None, policy.device)
    max_rows = EAGER_CHUNK_ELEMENTS // V
    for logits, logp_out, lse_out in ((policy, out[0], out[1]), (ref, out[2] if ref is not None else None, None)):
        if logits is None:
            continue
        if _row_layout(logits) is None:
            logits = _layout_copy(logits, "eager")
        for start, z in _row_chunks(logits, max_rows):
            n = z.numel() // V
            logp, lse = _eager_rows_forward(z, labels_flat[start:start + n].view(z.shape[:-1]), ignore_index)
            logp_out[start:start + n] = logp.reshape(-1)
            if lse_out is not None:
                lse_out[start:start + n] = lse.reshape(-1)
    return out[0], out[1], (out[2] if ref is not None else None)


def _eager_backward(grad_logp, logits, lse, labels, ignore_index, inplace):
    V = logits.shape[-1]
    labels_flat = labels.reshape(-1)
    # In place the caller has checked `_inplace_refusal`: src is then logits itself, never a copy.
    src = logits if _row_layout(logits) is not None else _layout_copy(logits, "eager")
    out = None if inplace else torch.empty(labels_flat.numel(), V, dtype=logits.dtype, device=logits.device)
    for start, z in _row_chunks(src, EAGER_CHUNK_ELEMENTS // V):
        n = z.numel() // V
        lab = labels_flat[start:start + n].view(z.shape[:-1])
        active = lab != ignore_index
        scan = active & (lab >= 0) & (lab < V)
        # g·(onehot − softmax) as −g·p + g at the label: the softmax is recomputed in one fused pass
        # (faster on CPU than exp(z − lse) in two; fp32 out of place it lands in the output directly),
        # scaled in place, and ignored / bad rows are fixed up by row index, not by a full masked pass.
        g = grad_logp[start:start + n].view(lab.shape)
        target = z if inplace else out[start:start + n].view(z.shape)
        if target.dtype == torch.float32 and not inplace:
            grad = torch.ops.aten._softmax.out(z, -1, False, out=target)
        else:
            grad = torch.softmax(z, dim=-1, dtype=torch.float32)
        grad.mul_(-g.unsqueeze(-1))
        grad.scatter_add_(-1, torch.where(scan, lab, 0).unsqueeze(-1), torch.where(scan, g, 0.0).unsqueeze(-1))
        rows_2d = grad.view(-1, V)
        # ignored rows are 0 whatever their logits; a label outside [0, V) (validate=False) gives a
        # NaN row, as its log-prob. (nonzero syncs on CUDA; auto never runs eager on CUDA.)
        rows_2d.index_fill_(0, (~active).reshape(-1).nonzero().squeeze(1), 0.0)
        rows_2d.index_fill_(0, (active & ~scan).reshape(-1).nonzero().squeeze(1), float("nan"))
        if grad is not target:  # each chunk is read above before it is overwritten here
            target.copy_(grad)  # rounds to nearest even on the cast
    return logits if inplace else out.view(logits.shape)


def _cpp_blocks(t: Tensor, rows_per_block: Optional[int] = None) -> Tensor:
    """A [blocks, rows_per_block, V] strided view of t's rows, in order, each block a 2-D [rows, V]
    view with a contiguous last dimension (what the C++ kernels take): one block when the rows are
    evenly spaced, one per outer index for a [B, T−1, V] slice. Copies (logged) only when t's layout
    has no such view, or cannot be cut into blocks of `rows_per_block` rows."""
    V = t.shape[-1]
    rows = t.numel() // V
    layout = _row_layout(t)
    if layout is None:
        t = _layout_copy(t, "cpp")
        layout = _row_layout(t)
    inner, (s_outer, s_inner) = layout
    per = inner if rows_per_block is None else rows_per_block
    if inner == 1:  # evenly spaced rows: any block size
        return t.as_strided((rows // per, per, V), (per * s_outer, s_outer, 1), t.storage_offset())
    if inner == per:
        return t.as_strided((rows // per, per, V), (s_outer, s_inner, 1), t.storage_offset())
    return _cpp_blocks(_layout_copy(t, "cpp"), per)


def _cpp_forward(policy, ref, labels, ignore_index):
    from .. import _cpp

    labels_flat = labels.reshape(-1).contiguous()
    pol = _cpp_blocks(policy)
    refb = _cpp_blocks(ref, pol.shape[1]) if ref is not None else None
    per = pol.shape[1]
    parts = [_cpp.paired_logprobs_forward(pol[b], refb[b] if refb is not None else None,
                                          labels_flat[b * per:(b + 1) * per], ignore_index)
             for b in range(pol.shape[0])]
    if len(parts) == 1:
        return parts[0]
    logp, lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return logp, lse, (torch.cat([p[2] for p in parts]) if ref is not None else None)


def _cpp_backward(grad_logp, logits, lse, labels, ignore_index, inplace):
    from .. import _cpp

    labels_flat = labels.reshape(-1).contiguous()
    # In place the caller has checked `_inplace_refusal`: the blocks are then views of logits.
    blocks = _cpp_blocks(logits)
    per = blocks.shape[1]
    out = None if inplace else torch.empty(blocks.shape, dtype=logits.dtype, device=logits.device)
    for b in range(blocks.shape[0]):
        rows = slice(b * per, (b + 1) * per)
        if inplace:
            _cpp.logprobs_backward(grad_logp[rows], blocks[b], lse[rows], labels_flat[rows], ignore_index, True)
        else:
            _cpp.logprobs_backward_into(grad_logp[rows], blocks[b], lse[rows], labels_flat[rows], ignore_index,
                                        out[b])
    return logits if inplace else out.view(logits.shape)


_FORWARD = {"triton": _triton_forward, "eager": _eager_forward, "cpp": _cpp_forward}
_BACKWARD = {"triton": _triton_backward, "eager": _eager_backward, "cpp": _cpp_backward}


def _op_name(paired: bool) -> str:
    return "paired_token_logprobs" if paired else "token_logprobs"


# --------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and their autograd.
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("fasttrdpo::logits_logprobs_forward", mutates_args=())
def _forward_op(policy: Tensor, ref: Optional[Tensor], labels: Tensor, ignore_index: int, validate: bool,
                inplace_backward: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(policy logp, policy lse, ref logp) with labels' shape; ref logp is empty when ref is None.
    `inplace_backward` is only read by the autograd formula."""
    chosen = resolve_backend(_op_name(ref is not None), backend, policy.device)
    if validate:
        check_label_range(labels, policy.shape[-1], ignore_index)
    logp, lse, ref_logp = _FORWARD[chosen](policy, ref, labels, ignore_index)
    shape = labels.shape
    ref_logp = ref_logp.view(shape) if ref_logp is not None else logp.new_empty(0)
    return logp.view(shape), lse.view(shape), ref_logp


@_forward_op.register_fake
def _(policy, ref, labels, ignore_index, validate, inplace_backward, backend):
    out = lambda: labels.new_empty(labels.shape, dtype=torch.float32)  # noqa: E731
    return out(), out(), (out() if ref is not None else labels.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("fasttrdpo::logits_logprobs_backward", mutates_args=())
def _backward_op(grad_logp: Tensor, logits: Tensor, lse: Tensor, labels: Tensor, ignore_index: int,
                 backend: str) -> Tensor:
    """g·(onehot − softmax(logits)) in a new contiguous tensor of the logits' shape and dtype."""
    chosen = resolve_backend("token_logprobs_backward", backend, logits.device)
    grad = _BACKWARD[chosen](grad_logp.reshape(-1).float().contiguous(), logits, lse.reshape(-1).contiguous(),
                             labels, ignore_index, False)
    return grad.contiguous()


@_backward_op.register_fake
def _(grad_logp, logits, lse, labels, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("fasttrdpo::logits_logprobs_backward_", mutates_args=("logits",))
def _backward_inplace_op(grad_logp: Tensor, logits: Tensor, lse: Tensor, labels: Tensor, ignore_index: int,
                         backend: str) -> None:
    """Same as the backward op, written over `logits` (which `_inplace_refusal` must accept)."""
    refusal = _inplace_refusal(logits)
    if refusal is not None:  # the autograd formula never gets here; a direct call must not corrupt memory
        raise ValueError(f"logits cannot take the gradient in place: {refusal}")
    chosen = resolve_backend("token_logprobs_backward", backend, logits.device)
    _BACKWARD[chosen](grad_logp.reshape(-1).float().contiguous(), logits, lse.reshape(-1).contiguous(),
                      labels, ignore_index, True)


@_backward_inplace_op.register_fake
def _(grad_logp, logits, lse, labels, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output):
    policy, _ref, labels, ignore_index, _validate, inplace_backward, backend = inputs
    _logp, lse, _ref_logp = output
    ctx.save_for_backward(policy, lse, labels)
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = inplace_backward
    ctx.backend = backend


def _autograd_backward(ctx, grad_logp, _grad_lse, _grad_ref_logp):
    policy, lse, labels = ctx.saved_tensors
    refusal = _inplace_refusal(policy) if ctx.inplace_backward else None
    _report_inplace(ctx.inplace_backward, refusal)
    if ctx.inplace_backward and refusal is None:
        _backward_inplace_op(grad_logp, policy, lse, labels, ctx.ignore_index, ctx.backend)
        grad_policy = policy
    else:
        grad_policy = _backward_op(grad_logp, policy, lse, labels, ctx.ignore_index, ctx.backend)
    # Only the policy logits get a gradient: the reference is never differentiated.
    return grad_policy, None, None, None, None, None, None


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------

def _check_common(labels, logits_name, logits, ignore_index, inplace_backward, validate):
    check_float(logits_name, logits)
    if logits.shape[-1] == 0:
        raise ValueError(f"{logits_name} has an empty vocabulary dimension: shape {tuple(logits.shape)}")
    check_labels_tensor(labels, logits.shape[:-1])
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, flag in (("inplace_backward", inplace_backward), ("validate", validate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def _check_backend_arg(backend):
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")


def token_logprobs(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, inplace_backward: bool = False,
                   validate: bool = True, backend: str = "auto") -> Tensor:
    """Per-token log-probs log_softmax(logits)[labels] in fp32 with labels' shape, 0.0 where ignored.

    logits [..., V] (fp32/bf16/fp16, any layout), labels [...] int64. `inplace_backward=True` lets the
    backward write the gradient g·(onehot − softmax) into the logits buffer (do not reuse the logits
    after backward) when the logits are provably non-overlapping and need no copy; otherwise it runs
    out of place, warns once, and `last_backend("token_logprobs_inplace_backward")` says why. `validate=False` skips the label range check (a host sync on CUDA); a label outside
    [0, V) other than ignore_index then gives NaN instead of an error.
    """
    _check_common(labels, "logits", logits, ignore_index, inplace_backward, validate)
    check_same_device(logits=logits, labels=labels)
    _check_backend_arg(backend)
    logp, _lse, _ = _forward_op(logits, None, labels, ignore_index, validate, inplace_backward, backend)
    return logp


def paired_token_logprobs(policy_logits: Tensor, ref_logits: Tensor, labels: Tensor, *, ignore_index: int = -100,
                          inplace_backward: bool = False, validate: bool = True,
                          backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(policy log-probs, reference log-probs) for the same labels, both rows in one pass.

    Same contract as `token_logprobs` for each model; the reference output never requires grad and
    only the policy logits receive a gradient. The two logits tensors must share shape and device;
    their dtypes may differ.
    """
    _check_common(labels, "policy_logits", policy_logits, ignore_index, inplace_backward, validate)
    check_float("ref_logits", ref_logits)
    if tuple(ref_logits.shape) != tuple(policy_logits.shape):
        raise ValueError(f"ref_logits must have the shape of policy_logits {tuple(policy_logits.shape)}, "
                         f"got {tuple(ref_logits.shape)}")
    check_same_device(policy_logits=policy_logits, ref_logits=ref_logits, labels=labels)
    _check_backend_arg(backend)
    logp, _lse, ref_logp = _forward_op(policy_logits, ref_logits, labels, ignore_index, validate,
                                       inplace_backward, backend)
    return logp, ref_logp.detach()
