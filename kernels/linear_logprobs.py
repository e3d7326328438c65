"""Per-token log-probabilities at the lm_head, without ever storing the logits (Triton).

For hidden states h [N, H], an lm_head weight W [V, H] (optional bias b [V]) and labels y [N]:

    z      = h @ W.T + b                                    formed BLOCK_N x BLOCK_V at a time (tl.dot)
    zt     = softcap * tanh(scale * z / softcap)            if softcap is set, else scale * z
    lse    = logsumexp_v zt                                 online over the vocabulary tiles
    logp   = zt[y] - lse                                    0.0 where y == ignore_index, NaN if y not in [0, V)

Forward (`linear_logprobs_fwd_kernel`): grid (row blocks, models). The second grid axis picks the
policy (0) or the reference (1) tensors, so both models' log-probs come from ONE launch; each model has
its own pointers, strides, hidden size and storage dtypes (the two branches are compiled separately).
Memory traffic per model: W is read once per row block (N / BLOCK_N times, mostly from L2), h once per
vocabulary tile (V / BLOCK_V times, from L1/L2), labels once, and only 2 floats per token are written
(log-prob, log-sum-exp). Nothing of size N x V touches global memory.

Backward (policy only), dz = g * (onehot(y) - softmax(zt)) * dzt/dz with
dzt/dz = scale * (1 - tanh^2) under softcap, else scale:
  * `linear_logprobs_bwd_hidden_kernel`: grid over row blocks; each program walks all vocabulary tiles,
    recomputes its logits tile, and adds dz @ W[tile] into its own rows of an fp32 grad_hidden buffer;
  * `linear_logprobs_bwd_weight_kernel`: grid over vocabulary blocks; each program walks all row blocks,
    recomputes the same logits tiles, and adds dz.T @ h into its own rows of an fp32 grad_weight buffer
    (and sum_n dz into grad_bias).
Every output element is owned by exactly one program and summed in a fixed order, so the gradients are
bit-for-bit deterministic (needed for exact resume). The price: the logits matmul is recomputed twice,
so the backward costs 4 matmul-equivalents (2 recomputes + dh + dW) = 8·N·V·H FLOPs, against 3 for a
CCE-style single pass that scatters dh and dW with fp32 atomics (non-deterministic summation order).
Accumulator traffic: each program's fp32 accumulator rows are read and written once per tile, in all
8·N·V·H·(1/BLOCK_V + 1/BLOCK_N) bytes (grad_hidden + grad_weight) — twice the 4·N·V·H·(1/BLOCK_V +
1/BLOCK_N) bytes of fp32 atomics a CCE-style pass with the same tiles issues. At large H this traffic,
not the FLOPs, bounds the backward; larger tiles cut it proportionally (register budget permitting,
see `launch_config`). The fp32 buffers are cast to the input dtypes by the caller (round to nearest
even).

Precision: every accumulation is fp32. When hidden and weight are both bf16 (or both fp16) the dots run
on that dtype with an fp32 accumulator (products of half values are exact in fp32); in the backward the
fp32 dz tile is rounded to that dtype for the dot, as a half-precision autograd of the same expression
would. Otherwise both operands are converted to fp32 and the dot runs with `input_precision=PRECISION`
("ieee" unless the caller opted into "tf32"). Under TRITON_INTERPRET=1 half dots are not supported by
the interpreter, so `dot_kind` picks fp32 there (numerically the same products, exact in fp32).

Bad labels are never used as addresses: the label logit is picked by comparing column indices.
All offsets are 64-bit (V·H can exceed 2**31 elements).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Dot kinds (constexpr DOT): what both operands are converted to before tl.dot.
DOT_FP32, DOT_BF16, DOT_FP16 = 0, 1, 2

# Launch configurations, by kernel and dot kind: the launchers below use exactly these and `aot_specs`
# compiles exactly these. fp32 dots (IEEE or TF32) run on FMA units / tf32 MMA with both operands in
# registers, so their backward tiles are smaller; every config is spill-free under ptxas for sm_80 and
# sm_90 (tests/test_aot_compile.py; register counts in the README).
_HALF_CONFIGS = {
    "fwd": {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 2},
    "bwd_hidden": {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 2},
    "bwd_weight": {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2},
}
_FP32_CONFIGS = {
    "fwd": {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 2},
    "bwd_hidden": {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 1},
    "bwd_weight": {"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 1},
}


def launch_config(kernel: str, dot: int) -> dict:
    """Block sizes, warps and stages for kernel "fwd" | "bwd_hidden" | "bwd_weight" at a dot kind.
    The forward of a policy/reference pair uses the policy's dot kind (same blocks for both)."""
    return dict((_FP32_CONFIGS if dot == DOT_FP32 else _HALF_CONFIGS)[kernel])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_kind(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> int:
    """bf16/fp16 dot when both operands share that half dtype (and we are compiling), fp32 otherwise."""
    if hidden_dtype == weight_dtype and not _interpreting():
        if hidden_dtype == torch.bfloat16:
            return DOT_BF16
        if hidden_dtype == torch.float16:
            return DOT_FP16
    return DOT_FP32


# ------------------------------------------------------------------------------------------ helpers
@triton.jit
def _to_dot(x, DOT: tl.constexpr):
    if DOT == 1:
        return x.to(tl.bfloat16)
    elif DOT == 2:
        return x.to(tl.float16)
    else:
        return x.to(tl.float32)


@triton.jit
def _tanh(x):
    # tanh from one exp (no libdevice: keeps the interpreter and every backend on the same formula).
    # |error| <= a few ulp of 1 (absolute), which the softcap multiplies.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H,
                 stride_hn, stride_wv, scale, softcap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, VOCAB_MAJOR: tl.constexpr):
    """Transformed logits zt (fp32) and t = tanh(scale*z/softcap) (t = zt without softcap) for one
    tile: [BLOCK_N, BLOCK_V], or [BLOCK_V, BLOCK_N] when VOCAB_MAJOR (what the weight gradient
    consumes, so no register tile has to be transposed)."""
    row_mask = rows < N
    col_mask = cols < V
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
    ks = tl.arange(0, BLOCK_H)
    if VOCAB_MAJOR:
        acc = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + ks
        k_mask = k < H
        h = _to_dot(tl.load(h_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0), DOT)
        w = _to_dot(tl.load(w_rows + k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0), DOT)
        if VOCAB_MAJOR:
            acc = tl.dot(w, tl.trans(h), acc, input_precision=PRECISION, out_dtype=tl.float32)
        else:
            acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if VOCAB_MAJOR:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    z = acc * scale
    if SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    else:
        t = z
    return z, t


@triton.jit
def _fwd_rows(h_ptr, w_ptr, b_ptr, labels_ptr, logp_ptr, lse_ptr, N, V, H,
              stride_hn, stride_wv, ignore_index, scale, softcap,
              HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
              BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    in_range = (labels >= 0) & (labels < V)
    # 32-bit column to compare against (-1 never matches): int64 [BLOCK_N, BLOCK_V] compares cost registers
    target = tl.where(in_range, labels, -1).to(tl.int32)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z, _t = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H,
                             stride_hn, stride_wv, scale, softcap,
                             HAS_BIAS, SOFTCAP, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, False)
        z = tl.where((cols < V)[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        z_label += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    lse = m + tl.log(s)
    logp = tl.where(labels == ignore_index, 0.0, tl.where(in_range, z_label - lse, float("nan")))
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


# ------------------------------------------------------------------------------------------ forward
_NOT_SPECIALISED = ["N", "V", "ignore_index"]


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def linear_logprobs_fwd_kernel(
        p_h_ptr, p_w_ptr, p_b_ptr, p_H, p_stride_hn, p_stride_wv,
        r_h_ptr, r_w_ptr, r_b_ptr, r_H, r_stride_hn, r_stride_wv,
        labels_ptr, logp_ptr, lse_ptr, N, V, ignore_index, scale, softcap,
        P_HAS_BIAS: tl.constexpr, R_HAS_BIAS: tl.constexpr, P_DOT: tl.constexpr, R_DOT: tl.constexpr,
        HAS_REF: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """logp_ptr/lse_ptr: [models, N] fp32; row 0 = policy, row 1 = reference (when HAS_REF)."""
    if HAS_REF:
        if tl.program_id(1) == 1:
            _fwd_rows(r_h_ptr, r_w_ptr, r_b_ptr, labels_ptr, logp_ptr + N, lse_ptr + N, N, V, r_H,
                      r_stride_hn, r_stride_wv, ignore_index, scale,
                      softcap, R_HAS_BIAS, SOFTCAP, R_DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        else:
            _fwd_rows(p_h_ptr, p_w_ptr, p_b_ptr, labels_ptr, logp_ptr, lse_ptr, N, V, p_H,
                      p_stride_hn, p_stride_wv, ignore_index, scale,
                      softcap, P_HAS_BIAS, SOFTCAP, P_DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    else:
        _fwd_rows(p_h_ptr, p_w_ptr, p_b_ptr, labels_ptr, logp_ptr, lse_ptr, N, V, p_H,
                  p_stride_hn, p_stride_wv, ignore_index, scale, softcap,
                  P_HAS_BIAS, SOFTCAP, P_DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)


# ----------------------------------------------------------------------------------------- backward
@triton.jit
def _dz_tile(h_ptr, w_ptr, b_ptr, rows, cols, target, lse, g, N, V, H,
             stride_hn, stride_wv, scale, softcap,
             HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
             BLOCK_H: tl.constexpr, VOCAB_MAJOR: tl.constexpr):
    """g * d logp / d z for one tile (0 outside [0, N) x [0, V)), laid out as `_logits_tile`."""
    z, t = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H,
                        stride_hn, stride_wv, scale, softcap,
                        HAS_BIAS, SOFTCAP, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, VOCAB_MAJOR)
    if VOCAB_MAJOR:
        p = tl.exp(z - lse[None, :])
        dz = tl.where(cols[:, None] == target[None, :], g[None, :], 0.0) - g[None, :] * p
        inside = (cols < V)[:, None] & (rows < N)[None, :]
    else:
        p = tl.exp(z - lse[:, None])
        dz = tl.where(cols[None, :] == target[:, None], g[:, None], 0.0) - g[:, None] * p
        inside = (rows < N)[:, None] & (cols < V)[None, :]
    if SOFTCAP:
        dz = dz * (scale * (1.0 - t * t))
    else:
        dz = dz * scale
    return tl.where(inside, dz, 0.0)


@triton.jit
def _row_grad_inputs(labels_ptr, lse_ptr, grad_ptr, rows, N, V, ignore_index):
    """Label column (int32, -1 if outside [0, V)), lse and the effective incoming gradient
    (0 if ignored, NaN for a label outside [0, V))."""
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    in_range = (labels >= 0) & (labels < V)
    g = tl.where(labels == ignore_index, 0.0, tl.where(in_range, g, float("nan")))
    target = tl.where(in_range, labels, -1).to(tl.int32)  # column of the label, -1 if none
    return target, lse, g


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def linear_logprobs_bwd_hidden_kernel(
        h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, grad_ptr, gh_ptr,
        N, V, H, stride_hn, stride_wv, stride_ghn,
        ignore_index, scale, softcap,
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """gh_ptr: fp32 [N, H] (row stride stride_ghn, unit column stride), zero-initialised; gh += dz @ W."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target, lse, g = _row_grad_inputs(labels_ptr, lse_ptr, grad_ptr, rows, N, V, ignore_index)
    ks = tl.arange(0, BLOCK_H)
    gh_rows = gh_ptr + rows.to(tl.int64)[:, None] * stride_ghn
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        dz = _dz_tile(h_ptr, w_ptr, b_ptr, rows, cols, target, lse, g, N, V, H,
                      stride_hn, stride_wv, scale, softcap,
                      HAS_BIAS, SOFTCAP, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, False)
        dz = _to_dot(dz, DOT)
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
        for k0 in range(0, H, BLOCK_H):
            k = k0 + ks
            k_mask = k < H
            w = tl.load(w_rows + k[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            out_mask = row_mask[:, None] & k_mask[None, :]
            gh = tl.load(gh_rows + k[None, :], mask=out_mask, other=0.0)
            gh = tl.dot(dz, _to_dot(w, DOT), gh, input_precision=PRECISION, out_dtype=tl.float32)
            tl.store(gh_rows + k[None, :], gh, mask=out_mask)


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def linear_logprobs_bwd_weight_kernel(
        h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, grad_ptr, gw_ptr, gb_ptr,
        N, V, H, stride_hn, stride_wv, stride_gwv,
        ignore_index, scale, softcap,
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """gw_ptr: fp32 [V, H] zero-initialised, gw += dz.T @ h; gb_ptr: fp32 [V] (written if HAS_BIAS)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    ks = tl.arange(0, BLOCK_H)
    gw_rows = gw_ptr + cols.to(tl.int64)[:, None] * stride_gwv
    gb = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        target, lse, g = _row_grad_inputs(labels_ptr, lse_ptr, grad_ptr, rows, N, V, ignore_index)
        dz_t = _dz_tile(h_ptr, w_ptr, b_ptr, rows, cols, target, lse, g, N, V, H,
                        stride_hn, stride_wv, scale, softcap,
                        HAS_BIAS, SOFTCAP, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, True)
        if HAS_BIAS:
            gb += tl.sum(dz_t, axis=1)
        dz_t = _to_dot(dz_t, DOT)
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
        for k0 in range(0, H, BLOCK_H):
            k = k0 + ks
            k_mask = k < H
            h = tl.load(h_rows + k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            out_mask = col_mask[:, None] & k_mask[None, :]
            gw = tl.load(gw_rows + k[None, :], mask=out_mask, other=0.0)
            gw = tl.dot(dz_t, _to_dot(h, DOT), gw, input_precision=PRECISION, out_dtype=tl.float32)
            tl.store(gw_rows + k[None, :], gw, mask=out_mask)
    if HAS_BIAS:
        tl.store(gb_ptr + cols, gb, mask=col_mask)


# ------------------------------------------------------------------------------------------ launchers
def _launch_opts(cfg):
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _blocks(cfg):
    return {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_V": cfg["BLOCK_V"], "BLOCK_H": cfg["BLOCK_H"]}


def linear_logprobs_forward(hidden, weight, bias, labels, ref=None, *, ignore_index=-100,
                            logit_scale=1.0, softcap=None, precision="ieee"):
    """Launch the forward. hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 contiguous;
    ref = (ref_hidden [N, H_ref], ref_weight [V, H_ref], ref_bias or None) or None.
    Returns (logp, lse), both fp32 [models, N] (models = 2 with ref, row 1 the reference)."""
    N, H = hidden.shape
    V = weight.shape[0]
    models = 1 if ref is None else 2
    logp = torch.empty((models, N), dtype=torch.float32, device=hidden.device)
    lse = torch.empty((models, N), dtype=torch.float32, device=hidden.device)
    r_h, r_w, r_b = ref if ref is not None else (hidden, weight, bias)
    dummy = logp  # never read when the matching HAS_BIAS is False
    p_dot, r_dot = dot_kind(hidden.dtype, weight.dtype), dot_kind(r_h.dtype, r_w.dtype)
    cfg = launch_config("fwd", p_dot)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), models)
    linear_logprobs_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, H,
        hidden.stride(0), weight.stride(0),
        r_h, r_w, r_b if r_b is not None else dummy, r_h.shape[1],
        r_h.stride(0), r_w.stride(0),
        labels, logp, lse, N, V, ignore_index, float(logit_scale),
        float(softcap) if softcap is not None else 1.0,
        P_HAS_BIAS=bias is not None, R_HAS_BIAS=r_b is not None,
        P_DOT=p_dot, R_DOT=r_dot,
        HAS_REF=ref is not None, SOFTCAP=softcap is not None, PRECISION=precision,
        **_blocks(cfg), **_launch_opts(cfg))
    return logp, lse


def linear_logprobs_backward(grad, hidden, weight, bias, labels, lse, *, need_hidden=True,
                             need_weight=True, need_bias=True, ignore_index=-100, logit_scale=1.0, softcap=None,
                             precision="ieee"):
    """Launch the backward for one model. grad, lse: fp32-compatible [N] (lse from the forward).
    Returns fp32 (grad_hidden [N, H] or None, grad_weight [V, H] or None, grad_bias [V] or None);
    the bias (if any) always enters the recomputed logits, need_bias only asks for its gradient."""
    need_bias = need_bias and bias is not None
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dot = dot_kind(hidden.dtype, weight.dtype)
    common = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, DOT=dot, PRECISION=precision)
    scalars = (ignore_index, float(logit_scale), float(softcap) if softcap is not None else 1.0)
    grad = grad.contiguous()
    lse = lse.contiguous()
    gh = gw = gb = None
    if need_hidden:
        gh = torch.zeros((N, H), dtype=torch.float32, device=dev)
        cfg = launch_config("bwd_hidden", dot)
        linear_logprobs_bwd_hidden_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            hidden, weight, bias if bias is not None else gh, labels, lse, grad, gh,
            N, V, H, hidden.stride(0), weight.stride(0),
            gh.stride(0), *scalars, **common, **_blocks(cfg), **_launch_opts(cfg))
    if need_weight or need_bias:
        # a bias-only request still needs the [V, H] accumulator the kernel writes (rare: frozen W)
        gw = torch.zeros((V, H), dtype=torch.float32, device=dev)
        gb = torch.zeros((V,), dtype=torch.float32, device=dev) if bias is not None else None
        cfg = launch_config("bwd_weight", dot)
        linear_logprobs_bwd_weight_kernel[(triton.cdiv(V, cfg["BLOCK_V"]),)](
            hidden, weight, bias if bias is not None else gw, labels, lse, grad, gw,
            gb if gb is not None else gw,
            N, V, H, hidden.stride(0), weight.stride(0),
            gw.stride(0), *scalars, **common, **_blocks(cfg), **_launch_opts(cfg))
        if not need_weight:
            gw = None
        if not need_bias:
            gb = None
    return gh, gw, gb


# ------------------------------------------------------------------------------------------ AOT specs
_DOT_NAMES = {DOT_FP32: "fp32", DOT_BF16: "bf16", DOT_FP16: "fp16"}
_STORAGE = {DOT_FP32: "fp32", DOT_BF16: "bf16", DOT_FP16: "fp16"}


def aot_specs():
    """The configurations the launchers above use on a GPU: each kernel for each dot kind (fp32 in
    IEEE and TF32 precision, bf16, fp16), and with every option on (bias, softcap, and for the forward
    a reference model of the other dot family in the same launch)."""
    specs = []
    # (dot kind, precision, with every option on): the option flags change no block size, so the
    # all-options build is compiled for the two dot families (fp32 FMA and half-precision MMA) only.
    variants = [(DOT_FP32, "ieee", False), (DOT_FP32, "ieee", True), (DOT_FP32, "tf32", False),
                (DOT_BF16, "ieee", False), (DOT_BF16, "ieee", True), (DOT_FP16, "ieee", False)]
    for dot, precision, full in variants:
        tag = f"{_DOT_NAMES[dot]}{'_tf32' if precision == 'tf32' else ''}{'_bias_softcap' if full else ''}"
        st = _STORAGE[dot]
        # forward: the reference runs bf16 when the policy is fp32 (a typical mixed set-up) and
        # the other way round, so both branches of the kernel see two dot kinds in the full variant
        r_dot = (DOT_BF16 if dot == DOT_FP32 else DOT_FP32) if full else dot
        rst = _STORAGE[r_dot]
        fwd_sig = {
            "p_h_ptr": f"*{st}", "p_w_ptr": f"*{st}", "p_b_ptr": f"*{st}" if full else "*fp32",
            "p_H": "i32", "p_stride_hn": "i32", "p_stride_wv": "i32",
            "r_h_ptr": f"*{rst}", "r_w_ptr": f"*{rst}", "r_b_ptr": f"*{rst}" if full else "*fp32",
            "r_H": "i32", "r_stride_hn": "i32", "r_stride_wv": "i32",
            "labels_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32", "N": "i32", "V": "i32",
            "ignore_index": "i32", "scale": "fp32", "softcap": "fp32",
        }
        fwd_const = {"P_HAS_BIAS": full, "R_HAS_BIAS": full, "P_DOT": dot, "R_DOT": r_dot,
                     "HAS_REF": full, "SOFTCAP": full, "PRECISION": precision,
                     **_blocks(launch_config("fwd", dot))}
        specs.append(_spec(f"linear_logprobs_fwd_{tag}", linear_logprobs_fwd_kernel, fwd_sig,
                           fwd_const, launch_config("fwd", dot), no_spill=True))
        bwd_const = {"HAS_BIAS": full, "SOFTCAP": full, "DOT": dot, "PRECISION": precision}
        bh_sig = {
            "h_ptr": f"*{st}", "w_ptr": f"*{st}", "b_ptr": f"*{st}" if full else "*fp32",
            "labels_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32", "gh_ptr": "*fp32",
            "N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32", "stride_ghn": "i32",
            "ignore_index": "i32", "scale": "fp32", "softcap": "fp32",
        }
        specs.append(_spec(f"linear_logprobs_bwd_hidden_{tag}", linear_logprobs_bwd_hidden_kernel,
                           bh_sig, {**bwd_const, **_blocks(launch_config("bwd_hidden", dot))},
                           launch_config("bwd_hidden", dot),
                           no_spill=True))
        bw_sig = {
            "h_ptr": f"*{st}", "w_ptr": f"*{st}", "b_ptr": f"*{st}" if full else "*fp32",
            "labels_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32", "gw_ptr": "*fp32",
            "gb_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32", "stride_gwv": "i32",
            "ignore_index": "i32", "scale": "fp32", "softcap": "fp32",
        }
        specs.append(_spec(f"linear_logprobs_bwd_weight_{tag}", linear_logprobs_bwd_weight_kernel,
                           bw_sig, {**bwd_const, **_blocks(launch_config("bwd_weight", dot))},
                           launch_config("bwd_weight", dot),
                           no_spill=True))
    return specs


def _spec(name, fn, signature, constexprs, cfg, no_spill):
    signature = dict(signature)
    # What the JIT specialises on for production inputs: 16-byte aligned tensors, hidden sizes and
    # row strides that are multiples of 16. N, V and ignore_index are never specialised
    # (do_not_specialize), so one binary serves every batch.
    aligned = [k for k, t in signature.items()
               if t.startswith("*") or "stride" in k or k in ("H", "p_H", "r_H")]
    for k in constexprs:
        signature[k] = "constexpr"
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(constexprs),
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "no_spill": no_spill,
            "divisible_by_16": aligned}
