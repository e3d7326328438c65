"""Per-token log-probs from logits, policy and reference rows in one launch, and their backward.

What it computes. For logits z [..., V] (any float dtype, last dimension contiguous, leading
dimensions described by at most two strides) and int64 labels y [...]:

    forward   lse_i  = log sum_v exp(z_iv)        online over vocabulary blocks of BLOCK_V
              logp_i = z_{i, y_i} - lse_i         exactly 0.0 where y_i == ignore_index,
                                                  NaN where y_i lies outside [0, V)
    optional  H_i    = -sum_v p_iv log p_iv        (policy entropy; p = softmax(z_i))
    (STATS)   acc_i  = 1.0 if y_i == argmax_v z_iv else 0.0   (first maximal index on ties)
              both in the same pass over the vocabulary (see `_row_logprob`), for the policy rows only
    backward  dz_iv  = g_i * (onehot(y_i)_v - exp(z_iv - lse_i))
                                                  0 on ignored rows, NaN on rows with a bad label

All math is fp32 whatever the storage dtype; log-softmax is never materialised. The forward grid is
(rows, 2): axis 1 picks the policy or the reference logits, so both models' rows run in the same
launch (axis 1 has size 1 when there is no reference). Only the policy gets an lse (the backward
needs it); the reference needs none, it is never differentiated. A label outside [0, V) is never
used as an address: its row is not scanned and its log-prob is NaN. Ignored rows are not read at all
(prompt and padding tokens cost no bandwidth).

The backward may write into the logits buffer itself (in place): each program reads one block and
then overwrites exactly that block. The gradient is stored in the logits dtype, rounded to nearest
even (for bf16 with an explicit integer rounding, because the Triton interpreter truncates bf16
casts while the hardware rounds: the bit trick gives the same answer on both).

Memory traffic, with b = bytes per logit (2 for bf16/fp16, 4 for fp32), counting non-ignored rows:
    forward   reads b per logit of the policy and of the reference (each element once), plus
              8 B of label and 4 + 4 (+ 4) B of output per row: the floor for this computation.
              STATS adds 8 B of output per row and a few FLOPs per logit, no extra read.
    backward  reads b and writes b per policy logit (2b: 4 B/elem for bf16), plus 20 B per row
              (label, g, lse); in place it allocates nothing. Ignored rows: b written, nothing read.

Standalone: imports only torch and triton. Host-side launchers: `launch_forward`, `launch_backward`.
Used by fasttrdpo.ops.logits (logits-level op) and by TRDPOLoss's chunked GEMM path
(fasttrdpo/loss/token_list.py: forward on the policy and reference tiles of a chunk of valid tokens,
then the backward with g = 1 in place, turning the policy tile into onehot − softmax).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FORWARD_BLOCK_V = 4096  # vocabulary elements per step: 16 elements per thread at 8 warps
FORWARD_NUM_WARPS = 8
BACKWARD_BLOCK_V = 4096  # vocabulary elements per program in the backward
BACKWARD_NUM_WARPS = 8

_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TORCH_TO_TL)


@triton.jit
def _row_offset(row, inner_size, stride_outer, stride_inner):
    """Element offset of row `row` when rows form an [outer, inner] grid with the given strides."""
    row = row.to(tl.int64)
    return (row // inner_size) * stride_outer + (row % inner_size) * stride_inner


@triton.jit
def _row_logprob(row_ptr, label, V, scan, BLOCK_V: tl.constexpr, STATS: tl.constexpr):
    """(z_label - lse, lse, entropy, argmax) of one row in fp32; when `scan` is False the row is not read.

    STATS (constexpr; off: no extra work is compiled in) adds, in the same pass over the vocabulary:
      entropy = -sum_v p_v log p_v = log S - T / S, with S = sum_v exp(z_v - m) and
                T = sum_v exp(z_v - m) (z_v - m) kept beside the running max m (every term <= 0: no
                cancellation against a large lse); when m grows by d = m_old - m_new (< 0) the running
                T becomes (T + S d) exp(d) and S becomes S exp(d);
      argmax  = the FIRST (lowest) vocabulary index of the maximal logit (torch.argmax's rule): each block
                contributes its first maximum, and a later block wins only with a strictly larger max.
    Without STATS, entropy is 0.0 and argmax 0.
    """
    offs = tl.arange(0, BLOCK_V)
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.full((), 0.0, tl.float32)
    run_ent = tl.full((), 0.0, tl.float32)
    run_arg = tl.full((), 0, tl.int32)
    v_end = tl.where(scan, V, 0)
    for start in range(0, v_end, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        # Load with a neutral `other` and apply -inf afterwards: the interpreter carries bf16 as
        # uint16, so an `other=-inf` would be cast to an integer there.
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        x = tl.where(in_row, x, float("-inf"))
        block_max = tl.max(x, axis=0)
        new_max = tl.maximum(run_max, block_max)
        # While every value seen is -inf, shift by 0: exp(-inf - (-inf)) would be NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        e = tl.exp(x - shift)
        if STATS:
            d = tl.where(run_max == float("-inf"), 0.0, run_max - shift)
            # e == 0 (masked or -inf logits) contributes 0, not 0 * -inf = NaN
            run_ent = (run_ent + run_sum * d) * rescale + tl.sum(e * tl.where(e > 0.0, x - shift, 0.0), axis=0)
            block_arg = tl.min(tl.where(x == block_max, cols, V), axis=0)
            run_arg = tl.where(block_max > run_max, block_arg, run_arg)
        run_sum = run_sum * rescale + tl.sum(e, axis=0)
        run_max = new_max
    safe_sum = tl.where(scan, run_sum, 1.0)  # an unscanned row has run_sum 0
    lse = run_max + tl.log(safe_sum)
    entropy = tl.log(safe_sum) - run_ent / safe_sum
    label_logit = tl.load(row_ptr + label, mask=scan, other=0.0).to(tl.float32)
    return label_logit - lse, lse, entropy, run_arg


@triton.jit
def token_logprobs_forward_kernel(
    policy_ptr,  # logits of the policy, [rows, V] through (outer, inner) strides, last dim contiguous
    ref_ptr,  # logits of the reference, same layout rules (ignored when HAS_REF is False)
    labels_ptr,  # *i64 [rows], contiguous
    policy_logp_ptr,  # *fp32 [rows]
    policy_lse_ptr,  # *fp32 [rows]
    ref_logp_ptr,  # *fp32 [rows] (ignored when HAS_REF is False)
    policy_entropy_ptr,  # *fp32 [rows]: policy entropy (written only when STATS)
    policy_correct_ptr,  # *fp32 [rows]: 1.0 where the label is the policy's argmax, else 0.0 (only when STATS)
    V,  # vocabulary size
    inner_size,  # rows per outer index (rows = outer * inner_size)
    policy_stride_outer, policy_stride_inner,
    ref_stride_outer, ref_stride_inner,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_REF: tl.constexpr,
    STATS: tl.constexpr,
):
    row = tl.program_id(0)
    model = tl.program_id(1)  # 0: policy, 1: reference
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < V)
    scan = in_range & (label != ignore_index)
    safe_label = tl.where(scan, label, 0)
    bad = tl.full((), float("nan"), tl.float32)
    if model == 0:
        row_ptr = policy_ptr + _row_offset(row, inner_size, policy_stride_outer, policy_stride_inner)
        logp, lse, entropy, argmax = _row_logprob(row_ptr, safe_label, V, scan, BLOCK_V, STATS)
        tl.store(policy_logp_ptr + row, tl.where(ignored, 0.0, tl.where(scan, logp, bad)))
        tl.store(policy_lse_ptr + row, tl.where(ignored, 0.0, tl.where(scan, lse, bad)))
        if STATS:
            tl.store(policy_entropy_ptr + row, tl.where(ignored, 0.0, tl.where(scan, entropy, bad)))
            correct = tl.where(argmax == safe_label, 1.0, 0.0)
            tl.store(policy_correct_ptr + row, tl.where(ignored, 0.0, tl.where(scan, correct, bad)))
    if HAS_REF:
        if model == 1:
            row_ptr = ref_ptr + _row_offset(row, inner_size, ref_stride_outer, ref_stride_inner)
            logp, _lse, _entropy, _argmax = _row_logprob(row_ptr, safe_label, V, scan, BLOCK_V, False)
            tl.store(ref_logp_ptr + row, tl.where(ignored, 0.0, tl.where(scan, logp, bad)))


@triton.jit
def _round_to(x, OUT_DTYPE: tl.constexpr):
    """fp32 -> OUT_DTYPE, round to nearest even on the hardware and in the interpreter alike."""
    if OUT_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (the carry could make it inf)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(OUT_DTYPE)


@triton.jit
def token_logprobs_backward_kernel(
    logits_ptr,  # policy logits, [rows, V] through (outer, inner) strides
    grad_logits_ptr,  # output, same dtype as the logits; may be the logits buffer itself
    grad_logp_ptr,  # *fp32 [rows], contiguous: upstream gradient g
    lse_ptr,  # *fp32 [rows]: the forward's log-sum-exp
    labels_ptr,  # *i64 [rows]
    V,
    inner_size,
    in_stride_outer, in_stride_inner,
    out_stride_outer, out_stride_inner,
    ignore_index,
    OUT_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    label = tl.load(labels_ptr + row)
    active = label != ignore_index
    g = tl.load(grad_logp_ptr + row)
    lse = tl.load(lse_ptr + row)  # NaN for a label outside [0, V): the row's gradient is NaN too
    z = tl.load(logits_ptr + _row_offset(row, inner_size, in_stride_outer, in_stride_inner) + cols,
                mask=in_row & active, other=0.0).to(tl.float32)
    prob = tl.exp(z - lse)
    onehot = tl.where(cols == label, 1.0, 0.0)  # the label is compared, never used as an address
    grad = tl.where(active, g * (onehot - prob), 0.0)
    out_ptr = grad_logits_ptr + _row_offset(row, inner_size, out_stride_outer, out_stride_inner)
    tl.store(out_ptr + cols, _round_to(grad, OUT_DTYPE), mask=in_row)


def launch_forward(policy, ref, labels, policy_logp, policy_lse, ref_logp, *, rows, inner_size,
                   policy_strides, ref_strides, ignore_index, block_v=FORWARD_BLOCK_V,
                   policy_entropy=None, policy_correct=None):
    """One launch for policy (and reference, when `ref` is not None) rows.

    policy_entropy / policy_correct (fp32 contiguous [rows], both or neither): when given, the same pass
    also writes each policy row's entropy and 1.0/0.0 for "the label is the argmax" (first maximal index
    on ties); 0.0 on ignored rows, NaN on bad labels. When not given the kernel is compiled without them.

    Caller guarantees: logits with stride 1 in the last dimension and row r at offset
    (r // inner_size) * strides[0] + (r % inner_size) * strides[1]; labels int64 contiguous [rows];
    outputs fp32 contiguous [rows]; everything on one device; rows > 0 and V > 0.
    """
    has_ref = ref is not None
    stats = policy_entropy is not None
    if stats != (policy_correct is not None):
        raise ValueError("give policy_entropy and policy_correct together (or neither)")
    grid = (rows, 2 if has_ref else 1)
    token_logprobs_forward_kernel[grid](
        policy, ref if has_ref else policy, labels,
        policy_logp, policy_lse, ref_logp if has_ref else policy_logp,
        policy_entropy if stats else policy_logp, policy_correct if stats else policy_logp,
        policy.shape[-1], inner_size,
        policy_strides[0], policy_strides[1],
        *(ref_strides if has_ref else policy_strides),
        ignore_index,
        BLOCK_V=block_v, HAS_REF=has_ref, STATS=stats, num_warps=FORWARD_NUM_WARPS,
    )


def launch_backward(grad_logp, logits, lse, labels, grad_logits, *, rows, inner_size, in_strides,
                    out_strides, ignore_index, block_v=BACKWARD_BLOCK_V):
    """Write g * (onehot - softmax) into `grad_logits` (may be `logits` itself, for in place).

    Caller guarantees: the layout rules of `launch_forward` for logits and grad_logits (same dtype),
    grad_logp / lse fp32 contiguous [rows], labels int64 contiguous [rows].
    """
    V = logits.shape[-1]
    grid = (rows, triton.cdiv(V, block_v))
    token_logprobs_backward_kernel[grid](
        logits, grad_logits, grad_logp, lse, labels,
        V, inner_size,
        in_strides[0], in_strides[1], out_strides[0], out_strides[1],
        ignore_index,
        OUT_DTYPE=_TORCH_TO_TL[grad_logits.dtype], BLOCK_V=block_v, num_warps=BACKWARD_NUM_WARPS,
    )
    # The kernel may have written through the logits' address: bump autograd's version counter.
    if grad_logits.data_ptr() == logits.data_ptr():
        torch.autograd.graph.increment_version(logits)


def aot_specs():
    """The configurations the launchers compile, as the JIT specialises them.

    "rows" variants: the usual launch — 2-D rows (inner_size == 1, which the JIT turns into the
    constant 1), 16-byte aligned pointers, V and strides multiples of 16 (padded vocabularies:
    32000, 50304, 128256, ...), so the loads vectorise. One per (policy dtype, reference dtype or
    none) for the forward and per dtype for the backward.
    "generic" variants: no divisibility and a runtime inner_size (odd vocabularies, [:, :-1] slices),
    for the forward (policy only, and paired with every reference dtype: TRDPOLoss's chunked path
    launches the paired forward on [n, V] tiles of any V) and the backward.
    """
    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}
    ptr = {t: "*" + names[t] for t in names}

    def forward_spec(pt, rt, rows, stats=False):
        sig = {
            "policy_ptr": ptr[pt], "ref_ptr": ptr[rt if rt is not None else pt],
            "labels_ptr": "*i64", "policy_logp_ptr": "*fp32", "policy_lse_ptr": "*fp32",
            "ref_logp_ptr": "*fp32", "policy_entropy_ptr": "*fp32", "policy_correct_ptr": "*fp32",
            "V": "i32", "inner_size": "i32",
            "policy_stride_outer": "i32", "policy_stride_inner": "i32",
            "ref_stride_outer": "i32", "ref_stride_inner": "i32", "ignore_index": "i32",
            "BLOCK_V": "constexpr", "HAS_REF": "constexpr", "STATS": "constexpr",
        }
        constexprs = {"BLOCK_V": FORWARD_BLOCK_V, "HAS_REF": rt is not None, "STATS": stats}
        spec = {
            "name": f"token_logprobs_forward_{names[pt]}" + (f"_ref_{names[rt]}" if rt is not None else "")
                    + ("_stats" if stats else "") + ("_rows" if rows else "_generic"),
            "fn": token_logprobs_forward_kernel, "signature": sig, "constexprs": constexprs,
            "num_warps": FORWARD_NUM_WARPS, "num_stages": 3, "no_spill": True,
        }
        if rows:
            sig["inner_size"] = "constexpr"
            constexprs["inner_size"] = 1
            spec["divisible_by_16"] = [k for k in sig if k.endswith("_ptr") or k == "V" or "stride" in k]
        return spec

    def backward_spec(pt, rows):
        sig = {
            "logits_ptr": ptr[pt], "grad_logits_ptr": ptr[pt], "grad_logp_ptr": "*fp32",
            "lse_ptr": "*fp32", "labels_ptr": "*i64", "V": "i32", "inner_size": "i32",
            "in_stride_outer": "i32", "in_stride_inner": "i32",
            "out_stride_outer": "i32", "out_stride_inner": "i32", "ignore_index": "i32",
            "OUT_DTYPE": "constexpr", "BLOCK_V": "constexpr",
        }
        constexprs = {"OUT_DTYPE": pt, "BLOCK_V": BACKWARD_BLOCK_V}
        spec = {
            "name": f"token_logprobs_backward_{names[pt]}" + ("_rows" if rows else "_generic"),
            "fn": token_logprobs_backward_kernel, "signature": sig, "constexprs": constexprs,
            "num_warps": BACKWARD_NUM_WARPS, "num_stages": 3, "no_spill": True,
        }
        if rows:
            sig["inner_size"] = "constexpr"
            constexprs["inner_size"] = 1
            spec["divisible_by_16"] = [k for k in sig if k.endswith("_ptr") or k == "V" or "stride" in k]
        return spec

    specs = []
    for pt in names:
        specs += [forward_spec(pt, rt, rows=True) for rt in [None, *names]]
        specs.append(backward_spec(pt, rows=True))
        specs += [forward_spec(pt, rt, rows=False) for rt in [None, *names]]
        specs.append(backward_spec(pt, rows=False))
        # entropy + token accuracy (TRDPOLoss's chunked path pairs each policy tile dtype with the reference's)
        specs += [forward_spec(pt, rt, rows=r, stats=True) for rt in names for r in (True, False)]
    return specs
