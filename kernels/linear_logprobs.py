"""Per-token log-probabilities at the lm_head, without ever storing the full logits (Triton + cuBLAS).

Example (policy and reference alike; rows already compacted to the scored ones; labels int64 [N]):

    logp, lse = linear_logprobs_forward(hidden, weight, bias, labels, precision="ieee")  # fp32 [N] each
    gh, gw, gb = linear_logprobs_backward(g, hidden, weight, bias, labels, lse, precision="ieee")

For hidden states h [N, H], an lm_head weight W [V, H] (optional bias b [V]) and labels y [N]:

    z      = h @ W.T + b                                    formed BLOCK_N x BLOCK_V at a time (tl.dot)
    zt     = softcap * tanh(scale * z / softcap)            if softcap is set, else scale * z
    lse    = logsumexp_v zt
    logp   = zt[y] - lse                                    0.0 where y == ignore_index, NaN if y not in [0, V)
    optional (stats=True): entropy = -sum_v p log p, p = softmax(zt), and correct = [y == argmax_v zt]
             (first maximal column on ties), per row from the same tiles: each tile adds sum e·(zt - m)
             and its first argmax to its (max, sum) partial, the merge combines them in block order

Operand dtype (`dot_dtype`): when hidden or weight is bf16/fp16 both are cast to that half dtype, as
autocast would (a bf16 hidden with an fp32 weight runs bf16 tensor-core dots, never fp32 FMAs); fp32
with fp32 runs fp32 dots, IEEE unless the caller passes precision="tf32". The caller decides the
precision once per call and passes the same value to forward and backward. The launchers cast; the
kernels take the cast tensors. Accumulation is always fp32.

Forward, two kernels:
  * `linear_logprobs_partial_kernel`, grid = (row blocks x vocabulary blocks), grouped rasterization
    (GROUP_N row blocks sweep the vocabulary together, so each W tile is fetched from HBM once per
    group and served from L2 to the others). Each program forms one BLOCK_N x BLOCK_V logits tile with
    a pipelined K loop (NUM_STAGES), and writes per row the tile's max and sum of exp (8 B), and the
    label logit if the label column lies in its tile (the one program that owns it writes it);
  * `linear_logprobs_merge_kernel` merges the per-tile (max, sum) pairs of each row in a fixed order
    (vocabulary block 0, 1, ...): deterministic, whatever the schedule of the first kernel.
Backward (chunked over the vocabulary, C columns at a time with C from a VOCAB_CHUNK_BYTES budget of
dz; nothing is read-modified-written per tile): `linear_logprobs_dz_kernel` (the same tiles, an
epilogue instead of the reduction) writes dz = g * (onehot(y) - softmax(zt)) * dzt/dz for the chunk
into an [N, C] buffer in the operand dtype (bf16 rounded to nearest even), then cuBLAS (fp32
accumulation inside): grad_W[chunk] = dz.T @ h (complete: one rounding to the operand dtype),
grad_h += dz @ W[chunk] (one rounding per chunk, summed in an fp32 [N, H] accumulator),
grad_b[chunk] = sum_n dz in fp32. dzt/dz = scale * (1 - tanh^2) under softcap, else scale. The logits
are recomputed once (the forward keeps only lse): 6·N·V·H FLOPs. No atomics: bit-for-bit deterministic.

Memory traffic and FLOPs at N = 16384 scored rows, H = 4096, V = 128256, bf16 (e = 2 bytes), sm_90 list
(128 x 128 tiles, GROUP_N = 16), 3.35 TB/s and 790 TFLOP/s (H100 HBM, a bare bf16 GEMM's reachable rate):
  forward  HBM: h once (N·H·e = 0.13 GB); W once per group of GROUP_N·BLOCK_N = 2048 rows
           (V·H·e = 1.05 GB, 8 times: 8.4 GB); partials 8 B per row and vocabulary block, written and
           read (2 x 0.13 GB): ~8.8 GB, 2.6 ms, against 2·N·V·H = 17.2 TFLOP, 22 ms: compute-bound.
           (L2 -> SM, as for any GEMM with these tiles: N·V·H·e·(1/BLOCK_V + 1/BLOCK_N) = 269 GB.)
  backward 4 vocabulary chunks of C = 32768 columns (1 GiB of bf16 dz each, VOCAB_CHUNK_BYTES):
           dz kernel: W 8.4 GB (as the forward), h 0.13 GB per chunk (0.54 GB), dz written N·V·e = 4.2 GB;
           grad_W = dz.T @ h: dz 4.2 GB + h 0.54 GB read, grad_W V·H·e = 1.05 GB written;
           grad_h += dz @ W[chunk]: dz 4.2 GB + W 1.05 GB read, a bf16 [N, H] partial per chunk written
           and read (2 x 0.54 GB), the fp32 accumulator read and written per chunk (2.15 GB):
           ~27 GB in all, 8.2 ms, against 6·N·V·H = 51.6 TFLOP, 65 ms: compute-bound, no atomics.
           (The previous design, two kernels each recomputing the logits and read-modify-writing fp32
           accumulators per tile, moved ~2 TB: >= 600 ms.)
  memory   partials 8·N·V/BLOCK_V bytes (0.13 GB), dz chunk N·C·e (1 GiB), grad_h accumulator N·H·4
           (0.27 GB), plus the half copy of an fp32 weight when the pair is mixed (V·H·e).

Bad labels are never used as addresses: the label logit is picked by comparing column indices.
All offsets are 64-bit (V·H can exceed 2**31 elements). Rows whose label is ignore_index still cost a
row of every tile here: the caller compacts the scored rows first (fasttrdpo does), so prompt and
padding rows (and whatever NaN they hold) never enter any computation.

Interpreter (TRITON_INTERPRET=1): half operands are converted to fp32 before tl.dot (the interpreter
has no half dots; products of half values are exact in fp32, so only the summation order differs), the
config lists are replaced by one config with big blocks, and triton.autotune is not used.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Dot kinds (constexpr DOT): what both operands are converted to before tl.dot.
DOT_FP32, DOT_BF16, DOT_FP16 = 0, 1, 2
_DOT_OF_DTYPE = {torch.float32: DOT_FP32, torch.bfloat16: DOT_BF16, torch.float16: DOT_FP16}

# Backward: bytes of dz per vocabulary chunk (a [N, C] buffer in the operand dtype).
VOCAB_CHUNK_BYTES = 2 ** 30

# ------------------------------------------------------------------------------------------ configs
# Tile configs per architecture (compute capability major*10) and dot family ("half" = bf16/fp16
# tensor-core dots, "fp32" = IEEE FMA or TF32 MMA). Every config of one list shares BLOCK_V (the
# partial buffers are sized by it) and fits the architecture's shared memory (sm_80: 163 KB,
# sm_90: 227 KB): tests/test_aot_compile.py compiles each one for its architecture, checks spills,
# shared memory and (sm_90, half) the wgmma lowering. Devices of another capability take the list
# of the nearest lower one (each list ends with a small config that fits 99 KB parts, e.g. sm_86/89);
# triton.autotune skips a config that does not fit a device.
def _cfg(bn, bv, bh, group, warps, stages):
    return {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "GROUP_N": group,
            "num_warps": warps, "num_stages": stages}


CONFIGS = {
    90: {
        "half": [_cfg(128, 128, 64, 16, 8, 4), _cfg(64, 128, 64, 16, 4, 3)],
        "fp32": [_cfg(64, 128, 32, 16, 8, 3)],
    },
    80: {
        "half": [_cfg(128, 128, 64, 8, 8, 3), _cfg(64, 128, 64, 8, 4, 3)],
        "fp32": [_cfg(64, 128, 32, 8, 8, 3)],
    },
}
# Measured AOT (registers, spills) ruled out: 256 x 128 half tiles on sm_90 (255 registers and spills
# with bias + softcap) and 128 x 128 fp32 tiles (238-254 registers with IEEE FMA dots, ~10 s to
# compile each). fp32 dots are the slow, exact path; the half dots are the fast one.
# Under the interpreter: one config, big blocks (few programs), a small group so that the last
# group of row blocks is a partial one even at tiny N (the rasterization's tail is exercised).
INTERPRETER_CONFIG = _cfg(32, 128, 64, 4, 4, 1)

MERGE_BLOCK_N = 128
MERGE_NUM_WARPS = 4


def dot_family(dot: int) -> str:
    return "fp32" if dot == DOT_FP32 else "half"


def config_list(cc: int, dot: int) -> list[dict]:
    """The configs autotuned on a device of compute capability `cc` (e.g. 90) for dot kind `dot`."""
    arch = max((a for a in CONFIGS if a <= cc), default=min(CONFIGS))
    return [dict(c) for c in CONFIGS[arch][dot_family(dot)]]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of the dots, as autocast would pick it: the half dtype when either operand
    is half (bf16 when the pair mixes bf16 and fp16: the wider range), fp32 otherwise."""
    halves = {hidden_dtype, weight_dtype} & {torch.bfloat16, torch.float16}
    if not halves:
        return torch.float32
    return torch.bfloat16 if torch.bfloat16 in halves else torch.float16


def _kernel_dot(dtype: torch.dtype) -> int:
    """The DOT constexpr for operands of `dtype`: fp32 under the interpreter (no half dots there)."""
    return DOT_FP32 if _interpreting() else _DOT_OF_DTYPE[dtype]


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
def _round_to(x, OUT: tl.constexpr):
    """fp32 -> OUT (0 fp32, 1 bf16, 2 fp16), round to nearest even on the hardware and in the
    interpreter alike (the interpreter truncates fp32 -> bf16 casts; the integer trick does not)."""
    if OUT == 1:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (the carry could make it inf)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT == 2:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _tile_ids(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """(row block, vocabulary block) of this program: GROUP_N row blocks walk the vocabulary blocks
    together (column-major inside the group), so a W tile is reused from L2 by the whole group."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    group = pid // per_group
    first_n = group * GROUP_N
    group_rows = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    return pid_n, pid_v


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv, scale, softcap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Transformed logits zt (fp32 [BLOCK_N, BLOCK_V]) and t = tanh(scale*z/softcap) (zt without
    softcap). Rows/columns outside [0, N) x [0, V) load zeros (their values are masked by callers)."""
    row_mask = rows < N
    col_mask = cols < V
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
    ks = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in tl.range(0, H, BLOCK_H, num_stages=NUM_STAGES):
        k = k0 + ks
        k_mask = k < H
        h = _to_dot(tl.load(h_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0), DOT)
        w = _to_dot(tl.load(w_rows + k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0), DOT)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = acc * scale
    if SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    else:
        t = z
    return z, t


# ------------------------------------------------------------------------------------------ forward
@triton.jit(do_not_specialize=["N", "V"])
def linear_logprobs_partial_kernel(
        h_ptr, w_ptr, b_ptr, labels_ptr, m_ptr, s_ptr, zl_ptr, t_ptr, a_ptr,
        N, V, H, stride_hn, stride_wv, scale, softcap,
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
        NUM_STAGES: tl.constexpr, STATS: tl.constexpr = False):
    """m_ptr, s_ptr: fp32 [cdiv(V, BLOCK_V), N] (row max and sum of exp of each vocabulary block);
    zl_ptr: fp32 [N], the label logit, written only by the program whose tile holds the label.
    STATS (constexpr, off: not compiled in): also t_ptr fp32 [blocks, N] = sum exp(z - m)·(z - m) of the
    block (for the entropy) and a_ptr int32 [blocks, N] = the block's first column holding its max."""
    pid_n, pid_v = _tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    z, _t = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv, scale, softcap,
                         HAS_BIAS, SOFTCAP, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, NUM_STAGES)
    z = tl.where((cols < V)[None, :], z, float("-inf"))  # every tile holds at least one column < V
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, axis=1)
    part = pid_v.to(tl.int64) * N + rows
    tl.store(m_ptr + part, m, mask=row_mask)
    tl.store(s_ptr + part, s, mask=row_mask)
    if STATS:
        # e == 0 (columns past V, or z = -inf) contributes 0, not 0 * -inf = NaN
        t = tl.sum(e * tl.where(e > 0.0, z - m[:, None], 0.0), axis=1)
        arg = tl.min(tl.where(z == m[:, None], cols[None, :], V), axis=1)
        tl.store(t_ptr + part, t, mask=row_mask)
        tl.store(a_ptr + part, arg, mask=row_mask)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    # 32-bit column to compare against (-1 never matches): int64 [BLOCK_N, BLOCK_V] compares cost registers
    target = tl.where((labels >= 0) & (labels < V), labels, -1).to(tl.int32)
    owns = (target >= pid_v * BLOCK_V) & (target < pid_v * BLOCK_V + BLOCK_V)
    z_label = tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    tl.store(zl_ptr + rows, z_label, mask=row_mask & owns)


@triton.jit(do_not_specialize=["N", "V", "num_blocks", "ignore_index"])
def linear_logprobs_merge_kernel(m_ptr, s_ptr, zl_ptr, labels_ptr, logp_ptr, lse_ptr, t_ptr, a_ptr,
                                 entropy_ptr, correct_ptr, N, V, num_blocks, ignore_index, BLOCK_N: tl.constexpr,
                                 STATS: tl.constexpr = False):
    """lse = M + log(sum_j s_j exp(m_j - M)) over the vocabulary blocks j = 0, 1, ... in that order.
    STATS: entropy = log S - T / S with T = sum_j (t_j + s_j·d_j)·exp(d_j), d_j = m_j - M, S likewise (every
    term <= 0); argmax = the earliest block's first maximal column (a later block wins only with a strictly
    larger max): torch.argmax's first-index rule. correct = 1.0 where it equals the label."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    run_m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_a = tl.zeros((BLOCK_N,), dtype=tl.int32)
    m_at = m_ptr + rows  # advanced by N per block: 64-bit pointer arithmetic, no int32 product
    s_at = s_ptr + rows
    t_at = t_ptr + rows
    a_at = a_ptr + rows
    for _j in range(0, num_blocks):
        m = tl.load(m_at, mask=row_mask, other=0.0)
        s = tl.load(s_at, mask=row_mask, other=1.0)  # rows past N: log(1), not log(0)
        m_at += N
        s_at += N
        new_m = tl.maximum(run_m, m)
        if STATS:
            t = tl.load(t_at, mask=row_mask, other=0.0)
            a = tl.load(a_at, mask=row_mask, other=0)
            t_at += N
            a_at += N
            shift = tl.where(new_m == float("-inf"), 0.0, new_m)
            d_run = tl.where(run_m == float("-inf"), 0.0, run_m - shift)
            d_blk = tl.where(m == float("-inf"), 0.0, m - shift)
            run_t = (run_t + run_s * d_run) * tl.exp(run_m - shift) + (t + s * d_blk) * tl.exp(m - shift)
            run_a = tl.where(m > run_m, a, run_a)
        run_s = run_s * tl.exp(run_m - new_m) + s * tl.exp(m - new_m)
        run_m = new_m
    lse = run_m + tl.log(run_s)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    in_range = (labels >= 0) & (labels < V)
    z_label = tl.load(zl_ptr + rows, mask=row_mask & in_range, other=0.0)
    ignored = labels == ignore_index
    logp = tl.where(ignored, 0.0, tl.where(in_range, z_label - lse, float("nan")))
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if STATS:
        entropy = tl.log(run_s) - run_t / run_s
        correct = tl.where(run_a.to(tl.int64) == labels, 1.0, 0.0)
        tl.store(entropy_ptr + rows, tl.where(ignored, 0.0, tl.where(in_range, entropy, float("nan"))), mask=row_mask)
        tl.store(correct_ptr + rows, tl.where(ignored, 0.0, tl.where(in_range, correct, float("nan"))), mask=row_mask)


# ----------------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["N", "V", "ignore_index", "col0", "V_total"])
def linear_logprobs_dz_kernel(
        h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, grad_ptr, dz_ptr,
        N, V, H, col0, V_total, stride_hn, stride_wv, stride_dzn, ignore_index, scale, softcap,
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        GROUP_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    """dz [N, V] (row stride stride_dzn; OUT 0 fp32, 1 bf16, 2 fp16) for the vocabulary chunk
    [col0, col0 + V) of a V_total-column head; w_ptr/b_ptr point at the chunk's first row/element.
    g is 0 on ignored rows and NaN on rows whose label lies outside [0, V_total)."""
    pid_n, pid_v = _tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    z, t = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv, scale, softcap,
                        HAS_BIAS, SOFTCAP, DOT, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, NUM_STAGES)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    in_range = (labels >= 0) & (labels < V_total)
    g = tl.where(labels == ignore_index, 0.0, tl.where(in_range, g, float("nan")))
    target = tl.where(in_range, labels - col0, -1).to(tl.int32)  # chunk column of the label
    p = tl.exp(z - lse[:, None])
    dz = tl.where(cols[None, :] == target[:, None], g[:, None], 0.0) - g[:, None] * p
    if SOFTCAP:
        dz = dz * (scale * (1.0 - t * t))
    else:
        dz = dz * scale
    out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dzn + cols[None, :]
    tl.store(out, _round_to(dz, OUT), mask=row_mask[:, None] & col_mask[None, :])


# ------------------------------------------------------------------------------------------ launchers
_AUTOTUNED = {}


def _launcher(kernel, cc: int, dot: int):
    """`kernel` autotuned over the config list of (cc, dot), or the interpreter's single config."""
    if _interpreting():
        cfg = INTERPRETER_CONFIG

        def launch(grid_of, *args, **kwargs):
            kernel[grid_of(cfg)](*args, **kwargs, **_blocks(cfg), num_warps=cfg["num_warps"],
                                 NUM_STAGES=cfg["num_stages"])
            return cfg
        return launch
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, cc, dot)
    if key not in _AUTOTUNED:
        configs = [triton.Config({**_blocks(c), "NUM_STAGES": c["num_stages"]},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"])
                   for c in config_list(cc, dot)]
        # The tuning key: the hidden size and the options that change the code; N varies per batch
        # and is deliberately not a key (one tuning per model, not per batch size).
        _AUTOTUNED[key] = triton.autotune(
            configs=configs, key=["H", "HAS_BIAS", "SOFTCAP", "DOT", "PRECISION"])(kernel)
    tuned = _AUTOTUNED[key]
    block_v = config_list(cc, dot)[0]["BLOCK_V"]

    def launch(grid_of, *args, **kwargs):
        tuned[lambda meta: grid_of(meta)](*args, **kwargs)
        return {"BLOCK_V": block_v}
    return launch


def _blocks(cfg):
    return {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_V": cfg["BLOCK_V"], "BLOCK_H": cfg["BLOCK_H"],
            "GROUP_N": cfg["GROUP_N"]}


def _capability(device: torch.device) -> int:
    if device.type != "cuda":
        return 90  # interpreter: the list is not used
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _block_v(device: torch.device, dot: int) -> int:
    if _interpreting():
        return INTERPRETER_CONFIG["BLOCK_V"]
    blocks = {c["BLOCK_V"] for c in config_list(_capability(device), dot)}
    assert len(blocks) == 1, "every config of one list must share BLOCK_V (the partials are sized by it)"
    return blocks.pop()


def _cast_operands(hidden, weight, bias):
    dt = dot_dtype(hidden.dtype, weight.dtype)
    hidden = hidden.to(dt)
    weight = weight.to(dt)
    return hidden if hidden.stride(-1) == 1 else hidden.contiguous(), \
        weight if weight.stride(-1) == 1 else weight.contiguous(), dt


@contextlib.contextmanager
def matmul_precision(precision: str):
    """cuBLAS fp32 GEMMs in the given precision ("ieee" | "tf32") inside the block, restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def linear_logprobs_forward(hidden, weight, bias, labels, *, ignore_index=-100, logit_scale=1.0,
                            softcap=None, precision="ieee", stats=False):
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 contiguous, N >= 1.
    Returns (logp, lse), both fp32 [N]; with stats=True (logp, lse, entropy, correct): per row the entropy
    of softmax(zt) and 1.0 where the label is the first maximal column of zt (0.0 on ignored rows), from the
    same tiles (8 more bytes of partials per row and vocabulary block; nothing else is read)."""
    hidden, weight, dt = _cast_operands(hidden, weight, bias)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dot = _DOT_OF_DTYPE[dt]
    block_v = _block_v(dev, dot)
    num_blocks = triton.cdiv(V, block_v)
    m_part = torch.empty((num_blocks, N), dtype=torch.float32, device=dev)
    s_part = torch.empty((num_blocks, N), dtype=torch.float32, device=dev)
    z_label = torch.empty((N,), dtype=torch.float32, device=dev)
    t_part = torch.empty((num_blocks, N), dtype=torch.float32, device=dev) if stats else m_part
    a_part = torch.empty((num_blocks, N), dtype=torch.int32, device=dev) if stats else m_part
    launch = _launcher(linear_logprobs_partial_kernel, _capability(dev), dot)
    launch(lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * num_blocks,),
           hidden, weight, bias if bias is not None else z_label, labels, m_part, s_part, z_label, t_part, a_part,
           N, V, H, hidden.stride(0), weight.stride(0), float(logit_scale),
           float(softcap) if softcap is not None else 1.0,
           HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, DOT=_kernel_dot(dt), PRECISION=precision,
           STATS=bool(stats))
    logp = torch.empty((N,), dtype=torch.float32, device=dev)
    lse = torch.empty((N,), dtype=torch.float32, device=dev)
    entropy = torch.empty((N,), dtype=torch.float32, device=dev) if stats else logp
    correct = torch.empty((N,), dtype=torch.float32, device=dev) if stats else logp
    linear_logprobs_merge_kernel[(triton.cdiv(N, MERGE_BLOCK_N),)](
        m_part, s_part, z_label, labels, logp, lse, t_part, a_part, entropy, correct, N, V, num_blocks,
        ignore_index, BLOCK_N=MERGE_BLOCK_N, STATS=bool(stats), num_warps=MERGE_NUM_WARPS)
    return (logp, lse, entropy, correct) if stats else (logp, lse)


def vocab_chunk(N: int, V: int, dtype: torch.dtype, budget_bytes: int | None = None) -> int:
    """Columns per backward chunk: a [N, C] dz buffer of at most `budget_bytes` (a multiple of 128)."""
    budget = VOCAB_CHUNK_BYTES if budget_bytes is None else budget_bytes
    per_col = max(1, N) * torch.empty((), dtype=dtype).element_size()
    return min(V, max(128, (budget // per_col) // 128 * 128))


def linear_logprobs_backward(grad, hidden, weight, bias, labels, lse, *, need_hidden=True,
                             need_weight=True, need_bias=True, ignore_index=-100, logit_scale=1.0,
                             softcap=None, precision="ieee", chunk_bytes=None):
    """grad, lse: [N] (lse from the forward). Returns (grad_hidden [N, H] fp32, grad_weight [V, H] in
    the operand dtype, grad_bias [V] fp32), None where not asked; the bias (if any) always enters the
    logits, need_bias only asks for its gradient. The caller casts to the parameters' dtypes."""
    need_bias = need_bias and bias is not None
    h, w, dt = _cast_operands(hidden, weight, bias)
    N, H = h.shape
    V = w.shape[0]
    dev = h.device
    dot = _DOT_OF_DTYPE[dt]
    grad = grad.to(torch.float32).contiguous()
    lse = lse.contiguous()
    C = vocab_chunk(N, V, dt, chunk_bytes)
    dz_buf = torch.empty((N, C), dtype=dt, device=dev)
    gh = torch.zeros((N, H), dtype=torch.float32, device=dev) if need_hidden else None
    gw = torch.empty((V, H), dtype=dt, device=dev) if need_weight else None
    gb = torch.empty((V,), dtype=torch.float32, device=dev) if need_bias else None
    launch = _launcher(linear_logprobs_dz_kernel, _capability(dev), dot)
    with matmul_precision(precision):
        for c0 in range(0, V, C):
            Vc = min(V, c0 + C) - c0
            dz = dz_buf[:, :Vc]
            w_chunk = w[c0:c0 + Vc]
            launch(lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(Vc, meta["BLOCK_V"]),),
                   h, w_chunk, bias[c0:c0 + Vc] if bias is not None else lse, labels, lse, grad, dz,
                   N, Vc, H, c0, V, h.stride(0), w.stride(0), dz_buf.stride(0), ignore_index,
                   float(logit_scale), float(softcap) if softcap is not None else 1.0,
                   HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, DOT=_kernel_dot(dt),
                   PRECISION=precision, OUT=dot)
            if need_weight:
                torch.mm(dz.T, h, out=gw[c0:c0 + Vc])  # complete for this chunk: one rounding
            if need_bias:
                torch.sum(dz, dim=0, dtype=torch.float32, out=gb[c0:c0 + Vc])
            if need_hidden:
                if dt == torch.float32:
                    gh.addmm_(dz, w_chunk)
                else:  # half GEMM (fp32 accumulation inside), one half rounding per chunk, fp32 sum
                    gh.add_(torch.mm(dz, w_chunk))
    return gh, gw, gb


# ------------------------------------------------------------------------------------------ AOT specs
_DOT_NAMES = {DOT_FP32: "fp32", DOT_BF16: "bf16", DOT_FP16: "fp16"}


def _tile_variants():
    """(dot, precision, options on) built for each config: every dot kind plain; the all-options
    build (bias + softcap: the most registers) for the bf16 and fp32-IEEE families."""
    return [(DOT_FP32, "ieee", False), (DOT_FP32, "ieee", True), (DOT_FP32, "tf32", False),
            (DOT_BF16, "ieee", False), (DOT_BF16, "ieee", True), (DOT_FP16, "ieee", False)]


def aot_specs():
    """Every configuration the launchers can run on sm_80 and sm_90 devices: each kernel at each config
    of its architecture's list ("ccs" names the architecture), for the dot kinds and options above."""
    specs = []
    for cc, lists in CONFIGS.items():
        for dot, precision, full in _tile_variants():
            st = _DOT_NAMES[dot]
            for i, cfg in enumerate(lists[dot_family(dot)]):
                tag = (f"{st}{'_tf32' if precision == 'tf32' else ''}{'_bias_softcap' if full else ''}"
                       f"_cfg{i}_{cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_H']}_s{cfg['num_stages']}")
                common = {"HAS_BIAS": full, "SOFTCAP": full, "DOT": dot, "PRECISION": precision,
                          **_blocks(cfg), "NUM_STAGES": cfg["num_stages"]}
                b_st = st if full else "fp32"  # a bias is stored like the weight
                part_sig = {
                    "h_ptr": f"*{st}", "w_ptr": f"*{st}", "b_ptr": f"*{b_st}", "labels_ptr": "*i64",
                    "m_ptr": "*fp32", "s_ptr": "*fp32", "zl_ptr": "*fp32", "t_ptr": "*fp32", "a_ptr": "*i32",
                    "N": "i32", "V": "i32",
                    "H": "i32", "stride_hn": "i32", "stride_wv": "i32", "scale": "fp32", "softcap": "fp32",
                }
                # STATS (entropy + argmax partials) on the variants a trainer logging them runs: every
                # config, plain and with all options
                for stats in (False, True) if precision == "ieee" and dot != DOT_FP16 else (False,):
                    specs.append(_spec(f"linear_logprobs_partial_{tag}{'_stats' if stats else ''}",
                                       linear_logprobs_partial_kernel, part_sig, {**common, "STATS": stats},
                                       cfg, cc, dot))
                dz_sig = {
                    "h_ptr": f"*{st}", "w_ptr": f"*{st}", "b_ptr": f"*{b_st}", "labels_ptr": "*i64",
                    "lse_ptr": "*fp32", "grad_ptr": "*fp32", "dz_ptr": f"*{st}", "N": "i32", "V": "i32",
                    "H": "i32", "col0": "i32", "V_total": "i32", "stride_hn": "i32", "stride_wv": "i32",
                    "stride_dzn": "i32", "ignore_index": "i32", "scale": "fp32", "softcap": "fp32",
                }
                specs.append(_spec(f"linear_logprobs_dz_{tag}", linear_logprobs_dz_kernel, dz_sig,
                                   {**common, "OUT": dot}, cfg, cc, dot))
    merge_sig = {"m_ptr": "*fp32", "s_ptr": "*fp32", "zl_ptr": "*fp32", "labels_ptr": "*i64",
                 "logp_ptr": "*fp32", "lse_ptr": "*fp32", "t_ptr": "*fp32", "a_ptr": "*i32",
                 "entropy_ptr": "*fp32", "correct_ptr": "*fp32", "N": "i32", "V": "i32", "num_blocks": "i32",
                 "ignore_index": "i32"}
    for stats in (False, True):
        specs.append(_spec("linear_logprobs_merge" + ("_stats" if stats else ""), linear_logprobs_merge_kernel,
                           merge_sig, {"BLOCK_N": MERGE_BLOCK_N, "STATS": stats},
                           {"num_warps": MERGE_NUM_WARPS, "num_stages": 1}, None, None))
    return specs


def _spec(name, fn, signature, constexprs, cfg, cc, dot):
    signature = dict(signature)
    # What the JIT specialises on for production inputs: 16-byte aligned tensors, hidden sizes and
    # row strides that are multiples of 16. N, V (and the chunk offsets) are never specialised
    # (do_not_specialize), so one binary serves every batch.
    aligned = [k for k, t in signature.items() if t.startswith("*") or "stride" in k or k == "H"]
    for k in constexprs:
        signature[k] = "constexpr"
    spec = {"name": name, "fn": fn, "signature": signature, "constexprs": dict(constexprs),
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "no_spill": True,
            "divisible_by_16": aligned}
    if cc is not None:
        spec["ccs"] = [cc]
        spec["expect_wgmma"] = cc == 90 and dot in (DOT_BF16, DOT_FP16)
    return spec
