"""Traffic/FLOP model of the lm_head loss step, the lm_head op and the reference blend on GPUs.

    python benchmarks/traffic.py                    # the table for the GPU primary shapes
    python benchmarks/traffic.py --json model.json  # the same numbers as JSON
    python benchmarks/traffic.py --markdown         # README-ready table

For every case, shape and implementation the model lists the kernels that run one after the other
(`Phase`: bytes each must move to and from HBM, FLOPs each does) and derives
  * roofline time  = max(total bytes / HBM bandwidth, total FLOPs / peak)       (perfect overlap)
  * serial time    = sum over phases of max(bytes / bandwidth, FLOPs / peak)    (kernels in sequence)
on H100 (989 TFLOP/s dense bf16, 3.35 TB/s), H200 (989, 4.8) and A100 (312, 2.0), plus an H200
"reachable" roof: the rates measured on the H200 here through torch (an 8192^3 bf16 matmul at ~790
TFLOP/s, a device-to-device copy at ~4.3 TB/s; DESIGN.md §5, KINDS.md). FLOPs are counted as 2 per
multiply-add of the matmuls; elementwise and exp work is not counted (it is far below the matmuls and,
per element, below the bytes at these shapes). "Useful" FLOPs are those of the valid rows done once
(8·N_valid·H·V for the loss step: policy forward, reference forward, two gradients); "extra" FLOPs
(printed as a fraction of the useful ones) are recompute plus the work spent on ignored rows.

What is counted as HBM traffic, and what is not (the model's assumptions, stated once):
  * every tensor an op materialises is written once and read once per reading op, at its storage dtype;
  * a cuBLAS GEMM reads its operands once per call and writes (or, accumulating, reads and writes) its
    output once; its internal tile re-reads are served by L2 and shared memory (this is what cuBLAS is
    good at), so they are not counted;
  * a Triton kernel's loads are HBM traffic unless the data is shared by the programs resident at the
    same time (one wave: SMS programs, one per SM at the register counts quoted in issue 11): an
    operand that every program of a wave walks in lock-step is counted once per wave, a block private
    to one program that it re-reads after touching more than the L2 holds is counted at every re-read.
    At these shapes a 64-row hidden block (64 x 4096 bf16 = 512 KiB) per program times 132 programs is
    66 MiB, above the 50 MiB (H100) / 60 MiB (H200) L2, so today's kernels' per-tile hidden re-reads
    come from HBM, as issue 11 says; the fp32 accumulators (N x H and V x H) do not fit at all.
All sizes are bytes, all times seconds (tables print GB = 1e9 bytes, TFLOP = 1e12, ms).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

# ----------------------------------------------------------------------------------------- GPUs
# dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s) from the datasheets
GPUS = {
    "H100": {"bf16_tflops": 989.4, "hbm_tbps": 3.35},
    "H200": {"bf16_tflops": 989.4, "hbm_tbps": 4.8},
    "A100": {"bf16_tflops": 312.0, "hbm_tbps": 2.0},
}
# what torch reaches on the H200 here: an 8192^3 bf16 matmul (769-798 TFLOP/s measured) and a
# device-to-device copy_ (~4.3 TB/s counting bytes read and written)
H200_REACHABLE = {"bf16_tflops": 790.0, "hbm_tbps": 4.3}
ROOFS = {**GPUS, "H200-reachable": H200_REACHABLE}
SMS = 132  # H100 SXM / H200 streaming multiprocessors: one wave of one-program-per-SM kernels

BF16, FP32 = 2, 4
DTYPE_BYTES = {"bf16": BF16, "fp16": BF16, "fp32": FP32}

# ----------------------------------------------------------------------------------------- shapes
# the GPU primary shapes of issue 11: N = 16k tokens (8 pairs x 2 rows x 1024), H = 4096, V = 128256, bf16
PRIMARY_LOSS = {"pairs": 8, "seq": 1024, "hidden": 4096, "vocab": 128256, "dtype": "bf16"}
VALID_FRACTIONS = (0.6, 1.0)
PRIMARY_OP = {"tokens": 16384, "hidden": 4096, "vocab": 128256, "dtype": "bf16"}
NEW_CHUNK_TOKENS = 4096  # issue 11: the CUDA default holds >= 4096 valid tokens per chunk


def llama8b_param_shapes(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256):
    """Parameter shapes of Llama-3-8B: embedding, 32 decoder layers, final norm, untied lm_head."""
    kv = hidden // heads * kv_heads
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (intermediate, hidden),
             (intermediate, hidden), (hidden, intermediate), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * layers + [(hidden,), (vocab, hidden)]


def llama8b_elements() -> int:
    return sum(math.prod(s) for s in llama8b_param_shapes())


# ----------------------------------------------------------------------------------------- phases
@dataclasses.dataclass
class Phase:
    """One kernel (or one group of identical kernels run back to back) of an implementation."""
    name: str
    bytes: float
    flops: float = 0.0
    useful_flops: float | None = None  # FLOPs on valid rows, done once (None: all of them)
    note: str = ""

    def time(self, roof) -> float:
        return max(self.bytes / (roof["hbm_tbps"] * 1e12), self.flops / (roof["bf16_tflops"] * 1e12))


@dataclasses.dataclass
class Model:
    case: str
    impl: str
    shape: dict
    phases: list
    description: str = ""

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.phases)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    @property
    def useful_flops(self) -> float:
        return sum(p.flops if p.useful_flops is None else p.useful_flops for p in self.phases)

    @property
    def recompute_flops(self) -> float:
        """FLOPs beyond the useful ones: recomputed logits and work on ignored rows."""
        return self.flops - self.useful_flops

    def roofline_s(self, roof) -> float:
        return max(self.bytes / (roof["hbm_tbps"] * 1e12), self.flops / (roof["bf16_tflops"] * 1e12))

    def serial_s(self, roof) -> float:
        return sum(p.time(roof) for p in self.phases)

    def to_dict(self) -> dict:
        d = {"case": self.case, "impl": self.impl, "shape": self.shape, "description": self.description,
             "bytes": self.bytes, "flops": self.flops, "useful_flops": self.useful_flops,
             "recompute_flops": self.recompute_flops,
             "roofline_s": {g: self.roofline_s(r) for g, r in ROOFS.items()},
             "serial_s": {g: self.serial_s(r) for g, r in ROOFS.items()},
             "phases": [dataclasses.asdict(p) for p in self.phases]}
        return d


def _valid_tokens(shape) -> int:
    n = 2 * shape["pairs"] * shape["seq"]
    return int(round(n * shape.get("valid", 1.0)))


# ================================================================================ loss step models
def new_trdpo_loss(shape, tile="fp32", chunk_tokens=NEW_CHUNK_TOKENS) -> Model:
    """The CUDA TRDPOLoss of issue 11 (branch i11-loss): chunks of whole pairs of VALID rows; per chunk
    policy and reference logits by cuBLAS into [n, V] tiles of `tile` dtype; one paired Triton forward
    reading both tiles (lse + label log-prob of each model); an in-place Triton backward reading the
    policy tile and writing softmax - onehot into it at the GEMM operand dtype; grad_hidden = dz @ W and
    grad_W += dz^T (c*h) by cuBLAS with fp32 accumulation. The loss is finished per chunk: no recompute."""
    s = DTYPE_BYTES[shape["dtype"]]
    t = DTYPE_BYTES[tile]
    H, V, N = shape["hidden"], shape["vocab"], 2 * shape["pairs"] * shape["seq"]
    Nv = _valid_tokens(shape)
    c = max(1, math.ceil(Nv / chunk_tokens))  # chunks (each reads the weights once per GEMM)
    gemm = 2.0 * Nv * H * V
    ph = [
        Phase("gather valid rows (policy + reference hidden)", 2 * 2 * Nv * H * s + N * 8,
              note="index_select of the valid rows: read + write, both models; labels read"),
        Phase("policy logits GEMM", Nv * H * s + c * V * H * s + Nv * V * t, gemm,
              note=f"{c} chunk(s): W read once per chunk, [n, V] tile written at {tile}"),
        Phase("reference logits GEMM", Nv * H * s + c * V * H * s + Nv * V * t, gemm),
        Phase("paired forward kernel (lse + label log-prob, both tiles)", 2 * Nv * V * t + Nv * 24,
              note="reads both tiles once, writes 2 floats per token and model"),
        Phase("in-place backward kernel (softmax - onehot into the policy tile)", Nv * V * t + Nv * V * s + Nv * 8,
              note=f"reads the policy tile ({tile}) again, writes dz at the GEMM operand dtype"),
        Phase("grad_hidden GEMM dz @ W", Nv * V * s + c * V * H * s + Nv * H * FP32, gemm),
        Phase("grad_W GEMM dz^T (c*h), fp32 accumulator", Nv * V * s + Nv * H * s + (2 * c - 1) * V * H * FP32, gemm,
              note="the fp32 [V, H] accumulator written by the first chunk, read+written by the others"),
        Phase("finish: grad_W fp32 -> weight dtype, grad_hidden scattered to [N, H]",
              V * H * (FP32 + s) + Nv * H * FP32 + N * H * s),
    ]
    return Model("loss_step", f"fasttrdpo-cuda (tile {tile})", dict(shape, tile=tile, chunk_tokens=chunk_tokens), ph,
                 new_trdpo_loss.__doc__.split("\n")[0])


def gemm_chain(shape, chunk_tokens=NEW_CHUNK_TOKENS) -> Model:
    """The same cuBLAS GEMMs as the new TRDPOLoss, alone (bf16 tiles): the reachable roof of the loss step."""
    m = new_trdpo_loss(shape, tile="bf16", chunk_tokens=chunk_tokens)
    ph = [p for p in m.phases if "GEMM" in p.name]
    return Model("loss_step", "gemm-chain", dict(shape, chunk_tokens=chunk_tokens), ph, gemm_chain.__doc__)


# kernels/linear_logprobs.py before the retile (issue 11 "today"): its launch configs for bf16 x bf16
TODAY_BLOCKS = {"fwd": (64, 128), "bwd_hidden": (64, 128), "bwd_weight": (64, 128)}  # (BLOCK_N, BLOCK_V)


def linear_today(shape, blocks=TODAY_BLOCKS) -> Model:
    """kernels/linear_logprobs.py before the retile (issue 11's "today", the acceptance figures' baseline): every row,
    ignored or not; forward 1-D grid over 64-row blocks x 2 models, each program re-reading its hidden
    block for every 128-wide V tile; backward two kernels, each recomputing the logits and
    read-modify-writing fp32 accumulators in global memory for every tile."""
    s = DTYPE_BYTES[shape["dtype"]]
    H, V = shape["hidden"], shape["vocab"]
    N = 2 * shape["pairs"] * shape["seq"]  # today's kernels compute ignored rows in full
    gemm = 2.0 * N * H * V
    Nv = _valid_tokens(shape)
    useful = 2.0 * Nv * H * V
    bn, bv = blocks["fwd"]
    fwd_programs = 2 * math.ceil(N / bn)
    # hidden: private block re-read per V tile (HBM, see module doc); W: streamed in lock-step by one wave
    fwd_bytes = 2 * N * H * s * math.ceil(V / bv) + 2 * V * H * s * math.ceil(fwd_programs / (2 * SMS)) + N * 24
    bhn, bhv = blocks["bwd_hidden"]
    bh_tiles = math.ceil(V / bhv)
    bh_bytes = (N * H * FP32  # zero-init of the fp32 grad_hidden
                + 2 * N * H * FP32 * bh_tiles  # accumulator read + write per V tile
                + N * H * s * bh_tiles  # hidden block re-read per V tile (logits recompute)
                + 2 * V * H * s * math.ceil(math.ceil(N / bhn) / SMS))  # W: recompute + dz@W, once per wave
    bwn, bwv = blocks["bwd_weight"]
    bw_tiles = math.ceil(N / bwn)
    bw_bytes = (V * H * FP32 + 2 * V * H * FP32 * bw_tiles + V * H * s * bw_tiles
                + 2 * N * H * s * math.ceil(math.ceil(V / bwv) / SMS))
    ph = [
        Phase("forward kernel (2 models, all rows)", fwd_bytes, 2 * gemm, 2 * useful,
              note=f"hidden re-read per V tile: {2 * N * H * s * math.ceil(V / bv) / 1e9:.0f} GB"),
        Phase("bwd_hidden kernel (recompute + dz@W, fp32 RMW per V tile)", bh_bytes, 2 * gemm, useful,
              note=f"accumulator RMW {2 * N * H * FP32 * bh_tiles / 1e9:.0f} GB, hidden re-reads "
                   f"{N * H * s * bh_tiles / 1e9:.0f} GB"),
        Phase("bwd_weight kernel (recompute + dz^T h, fp32 RMW per row block)", bw_bytes, 2 * gemm, useful,
              note=f"accumulator RMW {2 * V * H * FP32 * bw_tiles / 1e9:.0f} GB, W re-reads "
                   f"{V * H * s * bw_tiles / 1e9:.0f} GB"),
        Phase("casts of the fp32 gradients to the input dtypes", (N + V) * H * (FP32 + s)),
    ]
    return Model("loss_step", "linear-today", dict(shape, blocks={k: list(v) for k, v in blocks.items()}), ph,
                 linear_today.__doc__.split("\n")[0])


# kernels/linear_logprobs.py after the retile (issue 11 item 2), the sm_90 half-dtype list's first config
# (CONFIGS[90]["half"][0]) and its backward's dz budget (VOCAB_CHUNK_BYTES); tests/test_traffic_model.py
# checks these against the kernel module, so a retune there fails here until the model follows
RETILED = "retiled"
RETILED_TILE = {"BLOCK_N": 128, "BLOCK_V": 128, "GROUP_N": 16}
RETILED_VOCAB_CHUNK_BYTES = 2 ** 30


def retiled_vocab_chunk(n, V, s, budget=RETILED_VOCAB_CHUNK_BYTES) -> int:
    """Columns per backward chunk, as kernels/linear_logprobs.vocab_chunk picks them."""
    return min(V, max(128, (budget // (max(1, n) * s)) // 128 * 128))


def retiled_fwd_phases(n, H, V, s, model="") -> list:
    """The retiled forward over n (compacted) rows: the 2-D tile kernel reads h once and W once per group
    of GROUP_N row blocks (the group's other row blocks find the W tiles in L2), writes per row and
    vocabulary block the tile's (max, sum of exp) in fp32 (8 B); the merge kernel reads them back.
    Labels (8 B), the label logit (4 B, written and read) and logp, lse (8 B) per row: 24 B."""
    bn, bv, group = RETILED_TILE["BLOCK_N"], RETILED_TILE["BLOCK_V"], RETILED_TILE["GROUP_N"]
    groups = math.ceil(n / (group * bn))
    partials = n * math.ceil(V / bv) * 8
    tag = f"{model}: " if model else ""
    return [Phase(f"{tag}2-D tile kernel (h once, W once per group of {group * bn} rows)",
                  n * H * s + groups * V * H * s + partials + n * 12, 2.0 * n * H * V,
                  note=f"W read {groups} time(s)"),
            Phase(f"{tag}merge kernel (per-block max, sum -> lse, logp)", partials + n * 12)]


def retiled_bwd_phases(n, H, V, s) -> list:
    """The retiled backward over n rows, vocabulary-chunked (C columns per chunk, a [n, C] dz buffer of
    VOCAB_CHUNK_BYTES): per chunk the dz kernel recomputes the logits tile by tile (W chunk once per
    group, h once per chunk; labels, lse and g 16 B per row) and writes dz; cuBLAS grad_W[chunk] =
    dz^T h (complete, written once) and grad_h += dz W[chunk] (a half [n, H] product written and read,
    the fp32 accumulator read and written). The recompute is the only FLOPs beyond the useful ones
    (2 n H V)."""
    C = retiled_vocab_chunk(n, V, s)
    chunks = math.ceil(V / C)
    groups = math.ceil(n / (RETILED_TILE["GROUP_N"] * RETILED_TILE["BLOCK_N"]))
    gemm = 2.0 * n * H * V
    return [
        Phase("dz kernel (recompute, dz = g (onehot - softmax) written per chunk)",
              groups * V * H * s + chunks * n * H * s + n * V * s + chunks * n * 16, gemm, 0.0,
              note=f"{chunks} chunk(s) of {C} columns; W read {groups} time(s)"),
        Phase("grad_W[chunk] = dz^T h (cuBLAS)", n * V * s + chunks * n * H * s + V * H * s, gemm),
        Phase("grad_h += dz W[chunk] (cuBLAS, fp32 accumulator)",
              n * V * s + V * H * s + chunks * 2 * n * H * s + chunks * 2 * n * H * FP32, gemm),
    ]


def linear_retiled(shape) -> Model:
    """fasttrdpo.paired_linear_token_logprobs (backend triton) + a loss on top, the generic op after the
    retile: the valid rows are gathered (both models), the retiled forward runs on each model, the
    chunked backward on the policy (recomputing the logits once: 10 N_valid H V FLOPs, 8 of them useful);
    grad_h is zero-initialised at [N, H] and the valid rows copied in."""
    s = DTYPE_BYTES[shape["dtype"]]
    H, V, N = shape["hidden"], shape["vocab"], 2 * shape["pairs"] * shape["seq"]
    Nv = _valid_tokens(shape)
    ph = [Phase("gather valid rows (policy + reference hidden, labels)", 2 * 2 * Nv * H * s + N * 8 + Nv * 8)]
    ph += retiled_fwd_phases(Nv, H, V, s, "policy") + retiled_fwd_phases(Nv, H, V, s, "reference")
    ph += [Phase("backward: gather valid rows of h, g, lse", 2 * Nv * H * s + Nv * 16)]
    ph += retiled_bwd_phases(Nv, H, V, s)
    ph += [Phase("grad_h fp32 -> storage dtype, zeros [N, H], index_copy of the valid rows",
                 Nv * H * (FP32 + s) + N * H * s + 2 * Nv * H * s,
                 note="grad_W comes out in the operand dtype: no cast for a bf16 weight")]
    return Model("loss_step", "linear-retiled", dict(shape, **RETILED_TILE), ph,
                 linear_retiled.__doc__.split("\n")[0])


def trl_chunked(shape, token_chunk=4096, vocab_chunk=32768) -> Model:
    """TRL 1.16 (trl.kernels.ChunkedLogProbFunction on the non-ignored rows): cuBLAS tiles of 4096
    tokens x 32768 vocabulary written at the compute dtype, a Triton fold per tile, the reference in a
    second call; backward recomputes each tile, turns it into the logits gradient in place and
    accumulates grad_hidden / grad_W in fp32 with one addmm per tile."""
    s = DTYPE_BYTES[shape["dtype"]]
    H, V, N = shape["hidden"], shape["vocab"], 2 * shape["pairs"] * shape["seq"]
    Nv = _valid_tokens(shape)
    tc, vc = math.ceil(Nv / token_chunk), math.ceil(V / vocab_chunk)
    gemm = 2.0 * Nv * H * V
    tile_gemm_bytes = Nv * H * s * vc + V * H * s * tc + Nv * V * s  # h per vocab slice, W per token chunk, tile
    ph = [
        Phase("h[mask] for policy and reference", 2 * (N + 2 * Nv * H * s)),
        Phase("policy tile GEMMs", tile_gemm_bytes, gemm),
        Phase("policy folds (read each tile)", Nv * V * s + Nv * 64),
        Phase("reference tile GEMMs", tile_gemm_bytes, gemm),
        Phase("reference folds", Nv * V * s + Nv * 64),
        Phase("backward: recompute tile GEMMs", tile_gemm_bytes, gemm, 0.0),
        Phase("backward kernels (tile -> gradient in place)", 2 * Nv * V * s),
        Phase("grad_hidden addmm per tile (fp32 accumulator RMW)",
              Nv * V * s + V * H * s * tc + 2 * Nv * H * FP32 * vc, gemm),
        Phase("grad_W addmm per tile (fp32 accumulator RMW)",
              Nv * V * s + Nv * H * s * vc + 2 * V * H * FP32 * tc, gemm),
        Phase("zero-init, casts, masked_scatter backward", (Nv + V) * H * (2 * FP32 + s) + N * H * s),
    ]
    return Model("loss_step", "trl-chunked", dict(shape, token_chunk=token_chunk, vocab_chunk=vocab_chunk), ph,
                 trl_chunked.__doc__.split("\n")[0])


def liger_dpo(shape, compiled=False, chunk_pairs=1) -> Model:
    """Liger's LigerFusedLinearDPOLoss (chunk_size=1 pair): per chunk of whole rows (ignored positions
    included), logits = h @ W^T, .float(), log_softmax, gather under torch.func.grad_and_value; the
    reference under no_grad; grad_W accumulated per chunk with add_ in the weight dtype.
    Per [n, V] element, eager (each op reads its inputs and writes its output once, a lower bound):
    policy 48 B (GEMM write 2, .float() 2+4, log_softmax 4+4, logits sum 2, gather backward zeros 4,
    log_softmax backward 4+4+4, .float() backward 4+2, sum-backward accumulate 2+2, dh and dW GEMM
    reads 2+2), reference 16 B (2, 2+4, 4+4). Compiled (inductor fusing the elementwise ops): policy
    12 B (GEMM write, one fused read, one fused read+write of the bf16 gradient, two GEMM reads),
    reference 4 B."""
    s = DTYPE_BYTES[shape["dtype"]]
    H, V, N = shape["hidden"], shape["vocab"], 2 * shape["pairs"] * shape["seq"]
    Nv = _valid_tokens(shape)
    k = math.ceil(shape["pairs"] / chunk_pairs)
    gemm = 2.0 * N * H * V
    useful = 2.0 * Nv * H * V
    pol_b, ref_b = (12, 4) if compiled else (48, 16)
    ph = [
        Phase("torch.cat of the chunk inputs (policy, reference), grad_input cat",
              3 * 2 * N * H * s),
        Phase("policy logits GEMMs (all rows)", N * H * s + k * V * H * s + N * V * s, gemm, useful),
        Phase("reference logits GEMMs (all rows)", N * H * s + k * V * H * s + N * V * s, gemm, useful),
        Phase(f"elementwise/softmax passes ({'fused by torch.compile' if compiled else 'eager'})",
              N * V * (pol_b - 2 * s - 2 * s - s) + N * V * (ref_b - s)),
        Phase("grad_hidden GEMMs", N * V * s + k * V * H * s + N * H * s, gemm, useful),
        Phase("grad_W GEMMs + add_ into the bf16 accumulator", N * V * s + N * H * s + k * 4 * V * H * s, gemm,
              useful),
    ]
    name = "liger-compiled" if compiled else "liger"
    return Model("loss_step", name, dict(shape, chunk_pairs=chunk_pairs, compiled=compiled), ph,
                 liger_dpo.__doc__.split("\n")[0])


CCE_FWD_BLOCKS = (128, 256)  # (BLOCK_B, BLOCK_V): one of its autotune configs; GROUP_B = 8 rasterization
CCE_BWD_BLOCKS = (128, 128)


def _cce_phases(Nv, H, V, s, model, backward, filtered=False):
    gb = 8  # GROUP_B: a group of 8 row blocks sweeps V while its hidden rows stay in L2
    bb, bv = CCE_FWD_BLOCKS
    groups = math.ceil(Nv / (gb * bb))
    gemm = 2.0 * Nv * H * V
    fwd_bytes = Nv * H * s + groups * V * H * s + Nv * math.ceil(V / bv) * 8 + Nv * 2 * H * s
    ph = [Phase(f"{model}: lse forward (logits tiles in registers) + indexed dot", fwd_bytes, gemm)]
    if backward:
        bb, bv = CCE_BWD_BLOCKS
        groups = math.ceil(Nv / (gb * bb))
        operands = Nv * H * s + groups * V * H * s
        if filtered:
            ph.append(Phase(f"{model}: backward, every tile recomputed, all filtered out (lower bound)",
                            operands, gemm, 0.0))
        else:
            rmw = 2 * Nv * H * s * math.ceil(V / bv) + 2 * V * H * s * math.ceil(Nv / bb)
            ph.append(Phase(f"{model}: backward (recompute, locked bf16 RMW of dE and dC per tile)",
                            operands + rmw + 2 * (Nv + V) * H * s, 3 * gemm, 2 * gemm,
                            note=f"locked read-modify-writes {rmw / 1e9:.0f} GB"))
    return ph


def cce_pair(shape, filtered=False) -> Model:
    """Apple CCE (cut_cross_entropy.linear_cross_entropy(..., reduction="none")): no logits in memory;
    valid rows only; no reference pairing, so two calls (policy with grad, reference without).
    Backward unfiltered (filter_eps=None); with its default gradient filtering the backward skips tiles
    whose |softmax - onehot| is below eps: the `filtered` variant is that bound (every tile recomputed,
    none accumulated)."""
    s = DTYPE_BYTES[shape["dtype"]]
    H, V = shape["hidden"], shape["vocab"]
    Nv = _valid_tokens(shape)
    ph = _cce_phases(Nv, H, V, s, "policy", True, filtered) + _cce_phases(Nv, H, V, s, "reference", False)
    name = "cce (filter bound)" if filtered else "cce"
    return Model("loss_step", name, dict(shape), ph, cce_pair.__doc__.split("\n")[0])


def loss_step_models(shape) -> list:
    return [new_trdpo_loss(shape, "fp32"), new_trdpo_loss(shape, "bf16"), gemm_chain(shape), linear_today(shape),
            linear_retiled(shape), trl_chunked(shape), liger_dpo(shape, compiled=False),
            liger_dpo(shape, compiled=True), cce_pair(shape), cce_pair(shape, filtered=True)]


# ================================================================================ lm_head op forward
def lmhead_fwd_models(shape) -> list:
    """The per-token lm_head op forward alone (one model, every row)."""
    s = DTYPE_BYTES[shape["dtype"]]
    N, H, V = shape["tokens"], shape["hidden"], shape["vocab"]
    gemm = 2.0 * N * H * V
    bn, bv = TODAY_BLOCKS["fwd"]
    today = Model("lmhead_fwd", "linear-today", dict(shape), [
        Phase("forward kernel (1-D grid over 64-row blocks)",
              N * H * s * math.ceil(V / bv) + V * H * s * math.ceil(math.ceil(N / bn) / SMS) + N * 16, gemm)],
        "kernels/linear_logprobs.py forward before the retile (issue 11's 'today')")
    retiled = Model("lmhead_fwd", RETILED, dict(shape, **RETILED_TILE), retiled_fwd_phases(N, H, V, s),
                    "kernels/linear_logprobs.py forward: 2-D grid of 128x128 tiles, grouped rasterization "
                    "(GROUP_N=16), deterministic merge kernel")
    gemm_only = Model("lmhead_fwd", "gemm", dict(shape), [
        Phase("h @ W^T (cuBLAS, bf16 logits written)", N * H * s + V * H * s + N * V * s, gemm)],
        "the op's GEMM alone: its rate is the op's target denominator")
    naive = Model("lmhead_fwd", "naive", dict(shape), [
        Phase("h @ W^T", N * H * s + V * H * s + N * V * s, gemm),
        Phase("log_softmax (bf16 in, bf16 out) + gather", 2 * N * V * s + N * 16)],
        "log_softmax(h @ W^T).gather")
    cce = Model("lmhead_fwd", "cce", dict(shape), _cce_phases(N, H, V, s, "op", False),
                "cut_cross_entropy.linear_cross_entropy(reduction='none') forward")
    return [retiled, gemm_only, today, naive, cce]


# ================================================================================ blend
def blend_models(policy_dtype, ref_dtype="bf16", elements=None) -> list:
    """theta_ref <- theta_ref + alpha (theta - theta_ref) over the Llama-8B parameter list (291 tensors).
    Memory-bound: its 3 FLOPs per element are not counted."""
    E = llama8b_elements() if elements is None else elements
    p, r = DTYPE_BYTES[policy_dtype], DTYPE_BYTES[ref_dtype]
    shape = {"params": "llama-8b", "elements": E, "policy_dtype": policy_dtype, "ref_dtype": ref_dtype}
    floor = E * (2 * r + p)
    out = [
        Model("blend", "copy_ (same bytes)", shape, [Phase("dst.copy_(src) of the blend's floor bytes", floor)],
              "a plain device copy moving the same bytes: the blend's reachable floor"),
        Model("blend", "fasttrdpo (check_finite=True)", shape, [
            Phase("finite check: multi-tensor norm of the policy", E * p),
            Phase("fused blend (read ref, policy; write ref)", floor)],
            "fasttrdpo.blend_ default: the policy is screened for NaN/inf before anything is written"),
        Model("blend", "fasttrdpo (check_finite=False)", shape, [
            Phase("fused blend (read ref, policy; write ref)", floor)], "fasttrdpo.blend_ unchecked"),
        Model("blend", "trl-loop", shape, [
            Phase("p_ref.mul_(1 - alpha)", E * 2 * r), Phase("p_ref.add_(p, alpha=alpha)", floor)],
            "TRL SyncRefModelCallback: two kernels per tensor"),
        Model("blend", "foreach-lerp", shape,
              ([Phase("policy cast to the ref dtype", E * (p + r))] if p != r else [])
              + [Phase("torch._foreach_lerp_", E * 3 * r)],
              "torch._foreach_lerp_ (policy cast first when the dtypes differ)"),
    ]
    return out


# ================================================================================ the whole table
def primary_models() -> list:
    models = []
    for frac in VALID_FRACTIONS:
        models += loss_step_models(dict(PRIMARY_LOSS, valid=frac))
    models += lmhead_fwd_models(PRIMARY_OP)
    for pdt in ("fp32", "bf16"):
        models += blend_models(pdt)
    return models


def shape_label(m: Model) -> str:
    s = m.shape
    if m.case == "loss_step":
        return f"N={2 * s['pairs'] * s['seq']} H={s['hidden']} V={s['vocab']} {s['dtype']} valid={s['valid']:.0%}"
    if m.case == "lmhead_fwd":
        return f"N={s['tokens']} H={s['hidden']} V={s['vocab']} {s['dtype']}"
    return f"{s['params']} {s['elements'] / 1e9:.2f}G {s['policy_dtype']}->{s['ref_dtype']}"


def useful_flop_time(m: Model, roof) -> float:
    """Time of the implementation's useful FLOPs at the roof's peak (0 for the memory-bound blend)."""
    return m.useful_flops / (roof["bf16_tflops"] * 1e12)


def rows(models) -> list:
    out = []
    for m in models:
        d = m.to_dict()
        d["shape_label"] = shape_label(m)
        d["useful_flop_time_s"] = {g: useful_flop_time(m, r) for g, r in ROOFS.items()}
        out.append(d)
    return out


def table(models) -> str:
    head = ["case", "shape", "impl", "GB", "TFLOP", "extra", "H100 ms", "H100 ser", "H200 ms", "H200 ser",
            "H200 reach ser", "A100 ms", "ser/useful H100"]
    lines = [head]
    for m in models:
        ufl = useful_flop_time(m, GPUS["H100"])
        lines.append([m.case, shape_label(m), m.impl, f"{m.bytes / 1e9:.1f}", f"{m.flops / 1e12:.1f}",
                      f"{m.recompute_flops / max(m.useful_flops, 1):.2f}",
                      f"{m.roofline_s(GPUS['H100']) * 1e3:.1f}", f"{m.serial_s(GPUS['H100']) * 1e3:.1f}",
                      f"{m.roofline_s(GPUS['H200']) * 1e3:.1f}", f"{m.serial_s(GPUS['H200']) * 1e3:.1f}",
                      f"{m.serial_s(H200_REACHABLE) * 1e3:.1f}", f"{m.roofline_s(GPUS['A100']) * 1e3:.1f}",
                      "-" if ufl == 0 else f"{m.serial_s(GPUS['H100']) / ufl:.2f}"])
    w = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(x) for c, x in zip(r, w)).rstrip() for r in lines]
    text.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(text)


def markdown(models, measured=None) -> str:
    """README table: predicted times beside the measured ones (`measured`: {(case, shape_label, impl):
    seconds}; absent -> "not measured yet")."""
    measured = measured or {}
    out = ["| case | shape | implementation | GB moved | TFLOP | extra FLOPs | H100 roofline ms | H200 roofline ms "
           "| H200 reachable, serial ms | A100 roofline ms | measured |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in models:
        got = measured.get((m.case, shape_label(m), m.impl))
        out.append(f"| {m.case} | {shape_label(m)} | {m.impl} | {m.bytes / 1e9:.1f} | {m.flops / 1e12:.1f} | "
                   f"{m.recompute_flops / max(m.useful_flops, 1):.2f} | {m.roofline_s(GPUS['H100']) * 1e3:.1f} | "
                   f"{m.roofline_s(GPUS['H200']) * 1e3:.1f} | {m.serial_s(H200_REACHABLE) * 1e3:.1f} | "
                   f"{m.roofline_s(GPUS['A100']) * 1e3:.1f} | "
                   f"{'not measured yet' if got is None else f'{got * 1e3:.1f} ms'} |")
    return "\n".join(out)


def acceptance(models=None) -> dict:
    """Issue 11's figures for the model at N=16k, H=4096, V=128256 bf16: the new CUDA TRDPOLoss moves
    <= 1/5 of today's linear kernels' bytes, recomputes nothing, and its roofline time is within 1.15x of
    8 N_valid H V FLOPs at peak (checked for the roofline and, stricter, the serial sum)."""
    out = {}
    for frac in VALID_FRACTIONS:
        shape = dict(PRIMARY_LOSS, valid=frac)
        today = linear_today(shape)
        nv = _valid_tokens(shape)
        floor_flops = 8.0 * nv * shape["hidden"] * shape["vocab"]
        for tile in ("fp32", "bf16"):
            new = new_trdpo_loss(shape, tile)
            r = {"bytes_ratio_to_today": new.bytes / today.bytes, "recompute_flops": new.recompute_flops,
                 "useful_flops": new.useful_flops, "floor_flops": floor_flops}
            for g, roof in ROOFS.items():
                peak_t = floor_flops / (roof["bf16_tflops"] * 1e12)
                r[f"roofline_over_floor_{g}"] = new.roofline_s(roof) / peak_t
                r[f"serial_over_floor_{g}"] = new.serial_s(roof) / peak_t
            out[f"valid={frac:.0%} tile={tile}"] = r
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the model's rows (with phases) to this JSON file")
    ap.add_argument("--markdown", action="store_true", help="print the README table instead of the text table")
    args = ap.parse_args(argv)
    models = primary_models()
    print(markdown(models) if args.markdown else table(models))
    acc = acceptance()
    print("\nacceptance (issue 11): new TRDPOLoss vs today's linear kernels and the 8*N_valid*H*V floor")
    for k, r in acc.items():
        print(f"  {k}: bytes {r['bytes_ratio_to_today']:.3f} of today's, recompute {r['recompute_flops']:.0f} FLOP, "
              f"roofline/floor H100 {r['roofline_over_floor_H100']:.3f} H200 {r['roofline_over_floor_H200']:.3f}, "
              f"serial/floor H100 {r['serial_over_floor_H100']:.3f} H200 {r['serial_over_floor_H200']:.3f} "
              f"A100 {r['serial_over_floor_A100']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"schema": "fasttrdpo-traffic/1", "roofs": ROOFS, "rows": rows(models), "acceptance": acc},
                      f, indent=1)
        print(f"json: {args.json}")
    return models


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
