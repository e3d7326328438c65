"""In-place blend of many tensors in one launch: ref <- ref + alpha * (policy - ref).

What it computes: for every pair (ref_t, policy_t) of a group of tensors that share one
(ref dtype, policy dtype) pair, every element of ref_t becomes `r + alpha * (p - r)` computed in fp32
and rounded to nearest even into the ref dtype. COPY=True (alpha = 1) stores `p` rounded into the
ref dtype instead: in fp32 `r + 1 * (p - r)` is not always `p` (r = 1e8, p = 1e-3 gives 0).
The one exception to the formula: where `p - r` is +-inf (it overflows fp32 for finite r = 3e38,
p = -3e38), the element is `alpha * p + (1 - alpha) * r`, finite for finite inputs; both forms are
computed in registers and selected per element, so the memory traffic is unchanged.

How many tensors in one launch: the host passes a table of device addresses (int64) of the ref and
policy tensors, their element counts and the cumulative number of programs before each tensor (one
program per CHUNK = BLOCKS_PER_PROGRAM x BLOCK elements). Program `pid` finds its tensor by binary
search over that cumulative table (log2(#tensors) dependent scalar loads, cache hits, paid once per
chunk), casts the addresses to typed pointers and blends its chunk block by block. No tensor is
copied or flattened: the table avoids the extra read+write a flat staging buffer would cost, and
one launch covers every tensor of a dtype pair (a launch cannot switch pointer element types).
A full block takes the unmasked path (vectorized: the host guarantees 16-byte aligned addresses
when ALIGNED=True); only the last block of each tensor runs the masked path.

Memory traffic: read policy + read ref + write ref, i.e. 6 B/element for bf16/bf16,
8 B/element for an fp32 policy into a bf16 ref, 12 B/element for fp32/fp32 (the floor), plus
4 x 8 B per tensor of table.

Rounding: fp32 -> bf16 is done with the integer round-to-nearest-even trick (the Triton interpreter
truncates bf16 casts, hardware rounds: the bit trick gives the same answer on both); fp32 -> fp16 and
fp32 -> fp32 use the ordinary casts, which round to nearest even on both.

Standalone: imports only torch and triton (`launch_blend` is the host-side launcher for one group).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 4096  # elements per loop iteration: 16 KiB of fp32 per operand
# Blocks per program: the tensor lookup (log2(T) dependent loads) is paid once per 16384 elements.
BLOCKS_PER_PROGRAM = 4
CHUNK = BLOCK_SIZE * BLOCKS_PER_PROGRAM
NUM_WARPS = 8  # 256 threads x 16 elements each: 4 x 16-byte fp32 vectors per operand per thread
ALIGN_BYTES = 16  # widest vector access; addresses must be multiples of this for ALIGNED=True

_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# (ref dtype, policy dtype) pairs the kernel is launched for (and compiled ahead of time).
SUPPORTED_PAIRS = (
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
)


@triton.jit
def _round_to_ref(x, REF_DTYPE: tl.constexpr):
    """fp32 -> REF_DTYPE, round to nearest even (NaN stays NaN)."""
    if REF_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # a NaN must not round into an infinity
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(REF_DTYPE)


@triton.jit
def _blend_fp32(r, p, alpha):
    """r + alpha * (p - r), or alpha * p + (1 - alpha) * r where p - r overflows to +-inf."""
    d = p - r
    overflow = (d == float("inf")) | (d == float("-inf"))
    return tl.where(overflow, alpha * p + (1.0 - alpha) * r, r + alpha * d)


@triton.jit
def blend_many_kernel(
    ref_addrs,  # *i64 [T]: address of each ref tensor (contiguous, written in place)
    policy_addrs,  # *i64 [T]: address of each policy tensor (contiguous, read only)
    numels,  # *i64 [T]: elements of each tensor
    block_starts,  # *i64 [T + 1]: programs (chunks) before tensor t; block_starts[T] = grid size
    num_tensors,  # i32: T
    search_steps,  # i32: ceil(log2(T)) binary-search steps
    alpha,  # fp32
    REF_DTYPE: tl.constexpr,
    POLICY_DTYPE: tl.constexpr,
    COPY: tl.constexpr,  # alpha == 1: store the policy rounded into the ref dtype
    ALIGNED: tl.constexpr,  # every address is a multiple of 16 bytes
    BLOCK: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # Largest t with block_starts[t] <= pid; invariant block_starts[lo] <= pid < block_starts[hi].
    lo = tl.zeros((), dtype=tl.int32)
    hi = num_tensors + tl.zeros((), dtype=tl.int32)
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(block_starts + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    t = lo
    chunk_start = (pid - tl.load(block_starts + t)) * (BLOCK * BLOCKS_PER_PROGRAM)
    n = tl.load(numels + t)
    ref_addr = tl.load(ref_addrs + t)
    policy_addr = tl.load(policy_addrs + t)
    ref_ptr = ref_addr.to(tl.pointer_type(REF_DTYPE))
    policy_ptr = policy_addr.to(tl.pointer_type(POLICY_DTYPE))
    if ALIGNED:  # the hint must sit on the pointer (after the cast) to reach the vectorizer
        ref_ptr = tl.multiple_of(ref_ptr, 16)
        policy_ptr = tl.multiple_of(policy_ptr, 16)
    offs = tl.arange(0, BLOCK)
    for b in range(BLOCKS_PER_PROGRAM):  # one search serves several blocks of the same tensor
        start = chunk_start + b * BLOCK
        if start + BLOCK <= n:  # full block: no mask, so the accesses vectorize
            p = tl.load(policy_ptr + start + offs).to(tl.float32)
            if COPY:
                out = p
            else:
                r = tl.load(ref_ptr + start + offs).to(tl.float32)
                out = _blend_fp32(r, p, alpha)
            tl.store(ref_ptr + start + offs, _round_to_ref(out, REF_DTYPE))
        elif start < n:  # the tail of a tensor
            mask = offs < n - start
            p = tl.load(policy_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
            if COPY:
                out = p
            else:
                r = tl.load(ref_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
                out = _blend_fp32(r, p, alpha)
            tl.store(ref_ptr + start + offs, _round_to_ref(out, REF_DTYPE), mask=mask)


def _search_steps(num_tensors: int) -> int:
    return max(1, (num_tensors - 1).bit_length())


def launch_blend(refs, policies, alpha: float) -> None:
    """Blend one group in place with one launch. Caller guarantees: same device, contiguous tensors,
    one (ref dtype, policy dtype) pair from SUPPORTED_PAIRS, matching numels, 0 < alpha <= 1, refs
    not overlapping each other or the policies."""
    refs = [r for r in refs if r.numel() > 0]
    policies = [p for p in policies if p.numel() > 0]
    if not refs:
        return
    device = refs[0].device
    ref_dtype, policy_dtype = refs[0].dtype, policies[0].dtype
    ref_addrs = [r.data_ptr() for r in refs]
    policy_addrs = [p.data_ptr() for p in policies]
    numels = [r.numel() for r in refs]
    block_starts = [0]
    for n in numels:
        block_starts.append(block_starts[-1] + triton.cdiv(n, CHUNK))
    aligned = all(a % ALIGN_BYTES == 0 for a in ref_addrs + policy_addrs)
    # One small host->device copy of the whole table (4 rows), then views into it.
    table = torch.tensor(ref_addrs + policy_addrs + numels + block_starts, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    T = len(refs)
    grid = (block_starts[-1],)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        blend_many_kernel[grid](
            table[0:T], table[T:2 * T], table[2 * T:3 * T], table[3 * T:],
            T, _search_steps(T), float(alpha),
            REF_DTYPE=_TORCH_TO_TL[ref_dtype], POLICY_DTYPE=_TORCH_TO_TL[policy_dtype],
            COPY=(alpha == 1.0), ALIGNED=aligned, BLOCK=BLOCK_SIZE,
            BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM, num_warps=NUM_WARPS,
        )
    # The kernel writes through raw addresses: tell autograd's version counter that refs changed.
    torch.autograd.graph.increment_version(refs)


def aot_specs():
    """The configurations launch_blend uses: every supported dtype pair x {blend, copy}, aligned
    (the common case: PyTorch allocations are 512-byte aligned) and unaligned."""
    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}
    signature = {
        "ref_addrs": "*i64", "policy_addrs": "*i64", "numels": "*i64", "block_starts": "*i64",
        "num_tensors": "i32", "search_steps": "i32", "alpha": "fp32",
        "REF_DTYPE": "constexpr", "POLICY_DTYPE": "constexpr", "COPY": "constexpr",
        "ALIGNED": "constexpr", "BLOCK": "constexpr", "BLOCKS_PER_PROGRAM": "constexpr",
    }
    specs = []
    for ref_dtype, policy_dtype in SUPPORTED_PAIRS:
        rt, pt = _TORCH_TO_TL[ref_dtype], _TORCH_TO_TL[policy_dtype]
        for copy in (False, True):
            for aligned in (True, False):
                specs.append({
                    "name": f"blend_many_kernel_{names[rt]}_ref_{names[pt]}_policy"
                            f"{'_copy' if copy else ''}{'' if aligned else '_unaligned'}",
                    "fn": blend_many_kernel,
                    "signature": dict(signature),
                    "constexprs": {"REF_DTYPE": rt, "POLICY_DTYPE": pt, "COPY": copy,
                                   "ALIGNED": aligned, "BLOCK": BLOCK_SIZE,
                                   "BLOCKS_PER_PROGRAM": BLOCKS_PER_PROGRAM},
                    "num_warps": NUM_WARPS,
                    "num_stages": 1,
                    "no_spill": True,
                })
    return specs
