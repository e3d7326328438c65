"""The paired TR-DPO loss on a list of VALID tokens: GEMM tiles + the fused log-prob kernels, chunk by chunk.

    import fasttrdpo.loss
    # tokens 0..n-1 (completion tokens only), row_ids[t] = the sequence token t belongs to;
    # pair i = (row chosen_rows[i], row rejected_rows[i])
    loss, metrics = fasttrdpo.loss.trdpo_loss_from_tokens(
        policy_hidden, lm_head.weight, ref_hidden, ref_lm_head.weight, labels, row_ids, chosen_rows, rejected_rows)

`TRDPOLoss(backend="triton")` (what auto picks on CUDA) is a thin wrapper: it passes the full hidden
states and the positions of the valid tokens, and the same code runs. Packed and shared-prompt batches
call `trdpo_loss_from_tokens` directly, without a [2P, T] layout.

Design, per chunk of WHOLE pairs (so the chunk knows its pairs' Δ and finishes loss and gradient at once,
nothing recomputed), over the gathered valid rows only (ignored positions are never read: NaN there
cannot leak into anything):
  1. policy and reference logits by GEMM (torch: cuBLAS on CUDA) into two reused tiles [n, V]:
     half operands (bf16/fp16) with fp32 accumulation, the tile stored in the half dtype (see below);
     fp32 operands stay fp32 (IEEE unless torch's allow_tf32 is on; every GEMM of a call runs inside
     the forward, so the precision is decided once per call);
  2. one launch of `token_logprobs_forward_kernel` on both tiles: policy lse + label log-prob,
     reference label log-prob;
  3. pair losses of the chunk and c_t = ∂loss/∂logp_t (a tiny autograd graph on [pairs] tensors, so
     every loss_type works); row sums by segment sums over the slot-sorted tokens (no atomics);
  4. `token_logprobs_backward_kernel` with g = 1, in place: the policy tile becomes onehot − p (·∂z/∂u
     with a softcap); since ∂loss/∂z_t = c_t·(onehot − p_t), c is applied on the thin [n × H] side:
        grad_h[t] = c_t·(D @ W)[t]          grad_W += Dᵀ(c ⊙ h)  (fp32 accumulator)     grad_b += Dᵀc
  A pair whose tokens do not fit the budget alone is done in two passes over budget-sized blocks
  (its policy logits formed twice), so memory stays O(chunk) whatever the sequence length.

Loss types: every TRL 1.16 type and weighted lists. Pairwise types are finished per chunk as above; sft
too, each chunk's preference_loss given the whole batch's mean chosen length (from the host counts, no
sync). aot / aot_unpaired sort over the batch: pass 1 runs steps 1-2 on every chunk (row log-probs and the
policy lse; reference log-probs are final after it), preference_loss runs once on the whole batch (autograd
on detached [2P] leaves → ∂loss/∂logp of every row), and pass 2 forms each chunk's policy logits again and
runs step 4. Extra cost, only for those two types: one more policy logits GEMM per chunk (2·n·H·V FLOPs,
+25% of the 4 GEMMs) and the tile traffic it writes; the reference GEMM and kernels are not repeated.

Tile dtype: the half dtype of the GEMM (bf16 for a bf16 model), decided by the traffic arithmetic
below: an fp32 tile would need a second (half) buffer for the backward GEMMs' operand and moves
26 B per logit instead of 16. What it costs in precision: each logit is rounded once to the half
dtype (cuBLAS rounds the fp32 accumulator in its epilogue; u = 2^-8 for bf16, 2^-11 for fp16), so a
token's log-prob is off by at most u·(|z_y| + max_v|z_v|) beyond the fp32 bound, and D = onehot − p
is stored with one more rounding (relative u). tests/test_trdpo_loss_cuda_path.py derives its
tolerances from exactly these terms. An fp32 weight with a half hidden (autocast over fp32 parameters)
is rounded to the half dtype for the GEMMs only, as autocast would: the one tested exception to
"fp32 math" (its extra error u·Σ_k|h_k·W_vk| per logit); its gradient still accumulates in fp32.

Traffic and FLOPs at N = 16384 valid tokens, H = H' = 4096, V = 128256, bf16, the default budget
(4 GiB of tiles → 8372 tokens per chunk → 2 chunks of ~8192):
  FLOPs: 4 GEMMs of 2·n·H·V per chunk (policy logits, reference logits, grad_h, grad_W):
         8·N·H·V = 6.89e13 → 69.6 ms at 989 TFLOP/s (H100/H200 dense bf16), 87 ms at the ~790
         a bare torch GEMM reaches on the H200.
  policy tile, per logit: written by the GEMM (2 B), read by the forward kernel (2 B), read and
         written by the backward kernel (4 B), read by the two gradient GEMMs (4 B) = 12 B;
  reference tile: written (2 B) and read once (2 B) = 4 B;        → 16 B × N·V (2.10e9) = 33.6 GB,
         of which the fused kernels move 8 B/logit = 16.8 GB (5.0 ms at 3.35 TB/s, 3.5 ms at 4.8 TB/s)
         and the GEMMs the rest, hidden under their compute (each is compute-bound: n·H·V·2 FLOPs
         against 2·n·V bytes of tile, ~4000 FLOP/B).
  per chunk besides: W read by two GEMMs (logits, grad_h) and W_ref by one: 3 × 1.05 GB; the grad_W
         GEMM writes bf16 partials (1.05 GB, in blocks of GRAD_W_BLOCK_ROWS) that are added into the fp32
         accumulator (read 1.05 + 2.1, write 2.1 GB = 5.25 GB): 9.45 GB per chunk, 18.9 GB for 2 chunks;
         the final cast of grad_W to bf16 3.15 GB; hidden-side tensors (n × H) are negligible.
         Total ≈ 33.6 + 18.9 + 3.15 ≈ 56 GB.
  Roofline (sum over kernels of max(compute, memory)): H100 (989 TFLOP/s, 3.35 TB/s) 69.6 GEMMs
         + 5.0 fused kernels + 3.1 accumulate + 0.9 cast ≈ 78.7 ms = 1.13× the 8·N·H·V floor;
         H200 (4.8 TB/s) ≈ 76 ms = 1.09×. An fp32 tile (with a bf16 copy of D for the gradient GEMMs)
         moves 26 B per logit, 14 B of them in the fused kernels (29.4 GB, 8.8 ms on H100) → ≈ 82.4 ms
         = 1.18×: over the 1.15× target, hence the half tile. Today's generic lm_head kernels move
         ~2 TB for the same step (issue 11): ~1/35 of it here, and nothing is recomputed.

Determinism: fixed chunk plan, GEMMs (cuBLAS is run-to-run deterministic on one GPU), the Triton kernels
(one program per row / block, no atomics), segment sums (`torch.segment_reduce`), gathers and
index_put_ (accumulate=False) with unique indices. No index_add_ / scatter_add_ / accumulating index_put_.
"""
from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._validate import check_float, check_label_range, check_same_device
from . import _chunked
from ._chunked import _plan_pair_chunks, _types, batch_mean_chosen_length, loss_config, pair_losses_and_grads
from .preference import needs_all_logps

# Memory budget for one chunk's logits tiles (policy + reference, + two fp32 tanh buffers with a softcap).
# 4 GiB holds >= 4096 tokens for V <= 128256 in any dtype (8372 in bf16), so the GEMMs stay compute-bound.
DEFAULT_TILE_BYTES = 4 << 30
# The grad_W GEMM of a half-dtype model writes its partial in blocks of this many vocabulary rows before
# adding it into the fp32 accumulator (bounds that temporary to 32768·H half floats).
GRAD_W_BLOCK_ROWS = 32768
# Label value the kernels treat as "ignored": every token handed to them is valid, so none may match.
_NO_IGNORE = -(2 ** 31)
_HALF = (torch.bfloat16, torch.float16)


def gemm_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The operand (and logits tile) dtype of one model's GEMMs: the stored dtype when both agree; the half
    dtype when one side is fp32 (what autocast would run); fp32 for a bf16/fp16 mix (no lossy choice)."""
    if hidden_dtype == weight_dtype:
        return hidden_dtype
    halves = [d for d in (hidden_dtype, weight_dtype) if d in _HALF]
    return halves[0] if len(halves) == 1 else torch.float32


def _logits_(h, w, b, scale, softcap, out, t32):
    """out ← transform(h @ wᵀ + b) (one GEMM, fp32 accumulation, one rounding into out's dtype).
    With a softcap, t32 (fp32) keeps tanh(scale·u/softcap) for the derivative."""
    if b is not None:
        torch.addmm(b, h, w.T, beta=scale, alpha=scale, out=out)
    elif scale != 1.0:
        torch.addmm(out, h, w.T, beta=0.0, alpha=scale, out=out)  # beta=0: out's old contents are ignored
    else:
        torch.mm(h, w.T, out=out)
    if softcap is not None:
        torch.div(out, softcap, out=t32).tanh_()
        torch.mul(t32, softcap, out=out)
    return out


class _TritonMiddle:
    """The paired Triton kernels of kernels/token_logprobs.py (CUDA, or CPU under TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(zp, zr, y, logp, lse, rlogp, entropy=None, correct=None):
        """entropy / correct (or None): the policy's per-token entropy and label-is-argmax, same launch."""
        from fasttrdpo.kernels import token_logprobs as kernels

        V = zp.shape[1]
        kernels.launch_forward(zp, zr, y, logp, lse, rlogp, rows=zp.shape[0], inner_size=1,
                               policy_strides=(V, 0), ref_strides=(V, 0), ignore_index=_NO_IGNORE,
                               policy_entropy=entropy, policy_correct=correct)

    @staticmethod
    def backward_(zp, lse, y, ones):
        """zp ← onehot − softmax(zp) in place (g = 1), rounded to nearest even into zp's dtype."""
        from fasttrdpo.kernels import token_logprobs as kernels

        V = zp.shape[1]
        kernels.launch_backward(ones, zp, lse, y, zp, rows=zp.shape[0], inner_size=1, in_strides=(V, 0),
                                out_strides=(V, 0), ignore_index=_NO_IGNORE)


class _EagerMiddle:
    """The same two steps in fp32 torch ops (the token-list entry point on CPU without the interpreter).

    By bytes, as the kernels: the tiles ([n, V], tens to hundreds of MB) are read from memory once per step
    and every further pass runs on a block of `_chunked.EAGER_BLOCK_BYTES` of rows (L2-sized) held in one
    reused fp32 buffer: forward = per block max, exp(z − max) into the buffer, its sum, the label's logit;
    with stats Σ exp(z − max)·(max − z) and argmax on the same block. Backward = exp(z − lse) in place per
    block. (Whole-tile torch ops allocate [n, V] temporaries and stream each pass from memory: 3-5x slower.)
    entropy = log S + T/S with S = Σ e^(z−m), T = Σ e^(z−m)·(m − z): two non-negative terms, no cancellation;
    a −inf logit contributes 0 (its 0·inf is set to 0). A row of all −inf or with a NaN or +inf logit (its
    log-prob already NaN or infinite) gets a NaN or +inf entropy, not the 0 the whole-tile code gave."""

    @staticmethod
    def forward(zp, zr, y, logp, lse, rlogp, entropy=None, correct=None):
        n, V = zp.shape
        f32 = torch.float32
        rows = _chunked.eager_block_rows(V)
        buf = torch.empty(min(rows, n), V, dtype=f32, device=zp.device)
        buf2 = torch.empty(min(rows, n), V, dtype=f32, device=zp.device) if entropy is not None else None
        for s in range(0, n, rows):
            e = min(s + rows, n)
            yb = y[s:e].unsqueeze(1)
            for z, lp, ls in ((zp, logp, lse), (zr, rlogp, None)):
                zb = z[s:e].float()  # no copy for an fp32 tile
                t = buf[: e - s]
                m = zb.amax(1, keepdim=True)
                m = torch.where(torch.isfinite(m), m, torch.zeros((), device=m.device))  # all −inf / inf rows
                sums = torch.sub(zb, m, out=t).exp_().sum(1, keepdim=True)
                log_s = sums.log()
                row_lse = log_s + m
                lp[s:e] = (zb.gather(1, yb) - row_lse).squeeze(1)
                if ls is None:
                    continue
                ls[s:e] = row_lse.squeeze(1)
                if entropy is not None:
                    gap = torch.sub(m, zb, out=buf2[: e - s])  # m − z ≥ 0
                    spread = t.mul_(gap).nan_to_num_(nan=0.0).sum(1, keepdim=True)  # 0·inf (z = −inf) → 0
                    entropy[s:e] = (log_s + spread / sums).squeeze(1)
                    correct[s:e] = (zb.argmax(1) == y[s:e]).to(f32)

    @staticmethod
    def backward_(zp, lse, y, ones):
        n, V = zp.shape
        rows = _chunked.eager_block_rows(V)
        arange = torch.arange(min(rows, n), device=zp.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            d = zp[s:e].float().sub_(lse[s:e].unsqueeze(1)).exp_().neg_()  # in place for an fp32 tile
            d[arange[: e - s], y[s:e]] += 1.0
            if zp.dtype != torch.float32:  # half tile: fp32 math, one rounding (nearest even) into it
                zp[s:e].copy_(d)


_MIDDLES = {"triton": _TritonMiddle, "eager": _EagerMiddle}


class TokenChunkedTRDPOFunction(torch.autograd.Function):
    """(loss, policy_logps[2P], ref_logps[2P], mean_logit_sums[2P], stat_sums[2P, 2] or [0, 2]); only loss is
    differentiable (stat_sums: `run_token_chunks`).

    Slots: 0..P-1 the chosen rows of pairs 0..P-1, P..2P-1 their rejected rows. pol_index / ref_index [n]
    are the rows of policy_hidden / ref_hidden ([M, H], [M', H']) of the tokens sorted by slot (unique
    indices), y [n] their labels, counts the tokens per slot (host ints, sum n).
    """

    @staticmethod
    def forward(ctx, policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias,
                pol_index, ref_index, y, counts, cfg):
        loss_kw, logit_scale, softcap, chunk_bytes, max_pair_bytes, middle_name, grad_enabled, stats = cfg
        middle = _MIDDLES[middle_name]
        device = y.device
        f32 = torch.float32
        n_slots = len(counts)
        P = n_slots // 2
        V, H = policy_weight.shape
        n_total = y.numel()

        pdt = gemm_dtype(policy_hidden.dtype, policy_weight.dtype)
        rdt = gemm_dtype(ref_hidden.dtype, ref_weight.dtype)
        pw = policy_weight.to(pdt)  # no copy when already in pdt; else the cast autocast would make
        pb = policy_bias.to(pdt) if policy_bias is not None else None
        rw = ref_weight.to(rdt)
        rb = ref_bias.to(rdt) if ref_bias is not None else None

        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and policy_bias is not None and ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b

        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        bytes_per_token = V * (pdt.itemsize + rdt.itemsize + (8 if softcap is not None else 0))
        budget_rows = max(1, chunk_bytes // bytes_per_token)
        cap_rows = max(budget_rows, max_pair_bytes // bytes_per_token)
        max_pair = max((counts[i] + counts[P + i] for i in range(P)), default=0)
        rows = max(budget_rows, min(max_pair, cap_rows))
        rows = max(1, min(rows, n_total))
        # empty: every GEMM writes its rows in full (addmm with beta=0 does not read them, NaN included)
        ptile = torch.empty(rows, V, dtype=pdt, device=device)
        rtile = torch.empty(rows, V, dtype=rdt, device=device)
        t32 = torch.empty(rows, V, dtype=f32, device=device) if softcap is not None else None
        rt32 = torch.empty(rows, V, dtype=f32, device=device) if softcap is not None else None
        ones = torch.ones(rows, dtype=f32, device=device)

        # Mean logit over the vocabulary (a metric), without logits in the linear case:
        # mean_v(s·(h·W_v + b_v)) = s·(h·mean_v W + mean b).
        w_mean = policy_weight.mean(0, dtype=f32) if softcap is None else None
        b_mean = policy_bias.float().mean() if (softcap is None and policy_bias is not None) else None

        grad_h_tok = torch.empty(n_total, H, dtype=f32, device=device) if need_h else None
        grad_w = torch.zeros(V, H, dtype=f32, device=device) if need_w else None
        grad_b = torch.zeros(V, dtype=f32, device=device) if need_b else None
        gw_rows = min(V, GRAD_W_BLOCK_ROWS)
        gw_tmp = torch.empty(gw_rows, H, dtype=pdt, device=device) if (need_w and pdt != f32) else None

        policy_logps = torch.zeros(n_slots, dtype=f32, device=device)
        ref_logps = torch.zeros(n_slots, dtype=f32, device=device)
        mean_logit_sums = torch.zeros(n_slots, dtype=f32, device=device)
        # per slot: Σ entropy, Σ [label is argmax] over its tokens (policy), when stats; else empty
        stat_sums = torch.zeros((n_slots if stats else 0, 2), dtype=f32, device=device)
        lengths = torch.as_tensor(counts, dtype=torch.int64, device=device)
        loss = torch.zeros((), dtype=f32, device=device)
        all_tokens = torch.arange(n_total, device=device)

        def policy_logits(tok):
            h = policy_hidden.index_select(0, pol_index[tok])
            return h, _logits_(h.to(pdt), pw, pb, logit_scale, softcap, ptile[: tok.numel()],
                               t32[: tok.numel()] if t32 is not None else None)

        def accumulate_grads(h, z, lse, yb, c, tok):
            """z: the policy tile of these tokens (logits, lse known); c = ∂loss/∂logp per token."""
            n = z.shape[0]
            middle.backward_(z, lse, yb, ones[:n])  # z ← onehot − p
            if softcap is None:
                c = c * logit_scale  # ∂z/∂u = logit_scale
            else:  # ∂z/∂u = logit_scale·(1 − tanh²), elementwise on the tile
                tb = t32[:n]
                z.mul_(tb.square_().neg_().add_(1.0).mul_(logit_scale))
            if need_h:
                grad_h_tok[tok] = torch.mm(z, pw).float().mul_(c.unsqueeze(1))
            if need_w:
                ch = h.float().mul_(c.unsqueeze(1)).to(pdt)
                if gw_tmp is None:
                    grad_w.addmm_(z.T, ch)
                else:
                    for v0 in range(0, V, gw_rows):
                        v1 = min(V, v0 + gw_rows)
                        torch.mm(z[:, v0:v1].T, ch, out=gw_tmp[: v1 - v0])
                        grad_w[v0:v1] += gw_tmp[: v1 - v0]
            if need_b:
                grad_b.add_(torch.mv(z.T, c.to(z.dtype)))

        # aot / aot_unpaired: every pair's log-probs before any loss (module docstring: two passes)
        deferred = needs_all_logps(loss_kw["loss_type"])
        mean_len_c = batch_mean_chosen_length(counts[:P]) if "sft" in _types(loss_kw) else None
        pending = []  # deferred: what pass 2 needs per chunk

        def second_pass(tok, lse, yc, c, blocks):
            """The chunk's policy logits again, block by block, and its gradients (lse kept from pass 1)."""
            for s, e in blocks:
                h, zp = policy_logits(tok[s:e])
                accumulate_grads(h, zp, lse[s:e], yc[s:e], c[s:e], tok[s:e])

        for p0, p1 in _plan_pair_chunks(counts, P, rows):
            k = p1 - p0
            tok = torch.cat([all_tokens[offsets[p0]:offsets[p1]], all_tokens[offsets[P + p0]:offsets[P + p1]]])
            # device-side slices (no host-to-device copy per chunk: a pageable copy would stall the stream)
            seg_lengths = torch.cat([lengths[p0:p1], lengths[P + p0:P + p1]])
            n = tok.numel()
            yc = y[tok]
            logp = torch.zeros(n, dtype=f32, device=device)
            lse = torch.zeros(n, dtype=f32, device=device)
            rlogp = torch.zeros(n, dtype=f32, device=device)
            tok_mean = torch.zeros(n, dtype=f32, device=device)
            tok_stats = torch.zeros((2, n) if stats else (2, 0), dtype=f32, device=device)
            blocks = [(s, min(s + rows, n)) for s in range(0, n, rows)]
            kept = None
            for s, e in blocks:  # one block unless a single pair exceeds the budget
                h, zp = policy_logits(tok[s:e])
                hr = ref_hidden.index_select(0, ref_index[tok[s:e]]).to(rdt)
                zr = _logits_(hr, rw, rb, logit_scale, softcap, rtile[: e - s],
                              rt32[: e - s] if rt32 is not None else None)
                middle.forward(zp, zr, yc[s:e], logp[s:e], lse[s:e], rlogp[s:e],
                               *((tok_stats[0, s:e], tok_stats[1, s:e]) if stats else ()))
                if softcap is None:
                    m = h.float() @ w_mean
                    if b_mean is not None:
                        m += b_mean
                    tok_mean[s:e] = m * logit_scale
                else:
                    tok_mean[s:e] = zp.mean(1, dtype=f32)
                if len(blocks) == 1 and not deferred:
                    kept = h

            slots = torch.cat([torch.arange(p0, p1, device=device), torch.arange(P + p0, P + p1, device=device)])
            pol_rows = torch.segment_reduce(logp, "sum", lengths=seg_lengths, unsafe=True)
            policy_logps[slots] = pol_rows
            ref_logps[slots] = torch.segment_reduce(rlogp, "sum", lengths=seg_lengths, unsafe=True)
            mean_logit_sums[slots] = torch.segment_reduce(tok_mean, "sum", lengths=seg_lengths, unsafe=True)
            if stats:
                stat_sums[slots] = torch.segment_reduce(tok_stats.T.contiguous(), "sum", lengths=seg_lengths, unsafe=True)

            if deferred:
                pending.append((slots, seg_lengths, tok, lse, yc, blocks, n))
                continue
            # Pair losses of this chunk and ∂loss/∂(row log-prob), by autograd on [k] tensors.
            chunk_loss, g = pair_losses_and_grads(loss_kw, pol_rows, ref_logps[p0:p1], ref_logps[P + p0:P + p1],
                                                  lengths[p0:p1], lengths[P + p0:P + p1], P, need_grad, mean_len_c)
            loss += chunk_loss
            if not need_grad or n == 0:
                continue
            c = torch.repeat_interleave(torch.cat(g), seg_lengths, output_size=n)
            if kept is not None:  # the tile still holds this chunk's policy logits: no recompute
                accumulate_grads(kept, ptile[:n], lse, yc, c, tok)
            else:  # a pair longer than the budget: its policy logits again, block by block
                second_pass(tok, lse, yc, c, blocks)

        if deferred:  # the whole batch's loss once, then pass 2 chunk by chunk
            batch_loss, g = pair_losses_and_grads(loss_kw, policy_logps, ref_logps[:P], ref_logps[P:], lengths[:P],
                                                  lengths[P:], P, need_grad, mean_len_c)
            loss += batch_loss
            if need_grad:
                c_rows = torch.cat(g)  # ∂loss/∂(row log-prob), slot order
                for slots, seg_lengths, tok, lse, yc, blocks, n in pending:
                    if n:
                        second_pass(tok, lse, yc, torch.repeat_interleave(c_rows[slots], seg_lengths, output_size=n),
                                    blocks)

        ctx.grads = (grad_h_tok, grad_w, grad_b)
        ctx.save_for_backward(pol_index)
        ctx.hidden_shape = policy_hidden.shape
        ctx.dtypes = (policy_hidden.dtype, policy_weight.dtype, policy_bias.dtype if policy_bias is not None else None)
        ctx.mark_non_differentiable(policy_logps, ref_logps, mean_logit_sums, stat_sums)
        return loss, policy_logps, ref_logps, mean_logit_sums, stat_sums

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if ctx.grads is None:
            raise RuntimeError("TRDPOLoss (token chunks): backward called twice; its gradients are consumed "
                               "by the first call")
        (grad_h_tok, grad_w, grad_b), ctx.grads = ctx.grads, None
        (pol_index,) = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_h = None
        if grad_h_tok is not None:
            # every row not in pol_index (ignored positions) gets exactly 0; unique indices: no accumulation
            grad_h = torch.zeros(ctx.hidden_shape, dtype=h_dtype, device=grad_h_tok.device)
            grad_h[pol_index] = grad_h_tok.mul_(grad_loss).to(h_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(w_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def run_token_chunks(policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, pol_index,
                     ref_index, y, counts, *, loss_kw, logit_scale, softcap, chunk_bytes, max_pair_bytes, middle,
                     token_stats=False):
    """Shared by TRDPOLoss and trdpo_loss_from_tokens: inputs already validated, tokens sorted by slot;
    loss_kw from `_chunked.loss_config`. Returns (loss, policy_logps, ref_logps, mean_logit_sums, stat_sums):
    stat_sums [slots, 2] = per slot Σ policy entropy and Σ [label is the policy's argmax] over its tokens
    when token_stats (computed in the forward kernel's pass, no logits kept), else an empty [0, 2]."""
    cfg = (loss_kw, logit_scale, softcap, chunk_bytes, max_pair_bytes, middle, torch.is_grad_enabled(),
           bool(token_stats))
    with torch.autocast(device_type=y.device.type, enabled=False):
        return TokenChunkedTRDPOFunction.apply(
            policy_hidden, policy_weight, policy_bias, ref_hidden.detach(), ref_weight.detach(),
            None if ref_bias is None else ref_bias.detach(), pol_index, ref_index, y, counts, cfg)


def _check_index(name, t, n=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if t.dim() != 1 or (n is not None and t.numel() != n):
        raise ValueError(f"{name} must be 1-D" + (f" with {n} entries" if n is not None else "")
                         + f", got shape {tuple(t.shape)}")


def trdpo_loss_from_tokens(policy_hidden, policy_weight, ref_hidden, ref_weight, labels, row_ids, chosen_rows,
                           rejected_rows, *, policy_bias=None, ref_bias=None, beta: float = 0.1,
                           loss_type="sigmoid", label_smoothing=0.0, loss_weights=None, discopop_tau: float = 0.05,
                           logit_scale: float = 1.0, softcap: float | None = None,
                           chunk_bytes: int = DEFAULT_TILE_BYTES, validate: bool = True, backend: str = "auto",
                           token_stats: bool = False):
    """TR-DPO loss and TRL's metrics from the VALID tokens only (no [rows, T] layout, no ignore_index).

    policy_hidden [n, H], ref_hidden [n, H'] (token t's last hidden states), labels [n] int64 in [0, V)
    (the token each position predicts), row_ids [n] int64: the sequence each token belongs to (any order);
    chosen_rows [P], rejected_rows [P] int64: pair i is (chosen_rows[i], rejected_rows[i]); every row id
    of a token must be in one of them, and no row in two places. A row with no token is allowed (its
    log-prob is 0). policy_weight [V, H], ref_weight [V, H'], optional biases [V]; logit_scale / softcap
    as in `fasttrdpo.linear_token_logprobs`.

    Returns (loss, metrics): loss = mean over pairs of the preference loss (DESIGN.md §4, lengths = token
    counts per row for ipo, sigmoid_norm and sft), metrics as TRDPOLoss (chosen = the chosen rows). Gradients
    reach policy_hidden, policy_weight and policy_bias only. loss_type: any TRL 1.16 type or a list, with
    loss_weights, per-type label_smoothing and discopop_tau as in `preference_loss`; aot / aot_unpaired cost
    one more policy logits GEMM per chunk (module docstring).

    backend: "triton" (the paired kernels; CUDA, or CPU under TRITON_INTERPRET=1), "eager" (the same
    chunked GEMMs with torch ops in the middle), "auto" (triton on CUDA, eager otherwise).
    chunk_bytes: memory budget of one chunk's logits tiles (default 4 GiB, ≥ 4096 tokens at V = 128256);
    a chunk holds whole pairs; a pair larger than the budget alone is done in two passes.
    Precision: see the module docstring (tile in the GEMM's half dtype: one rounding per logit).
    Deterministic: the same inputs give bit-identical loss and gradients (no atomics).
    token_stats: metrics also hold TRL's `entropy` and `mean_token_accuracy` (as TRDPOLoss).
    """
    from .trdpo import _check_transform, _pair_metrics

    loss_kw = loss_config(beta, loss_type, label_smoothing, loss_weights, discopop_tau)
    _check_transform(logit_scale, softcap)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    for name, t in (("policy_hidden", policy_hidden), ("ref_hidden", ref_hidden)):
        check_float(name, t, min_dim=2)
        if t.dim() != 2:
            raise ValueError(f"{name} must be [tokens, H], got shape {tuple(t.shape)}")
    for name, w in (("policy_weight", policy_weight), ("ref_weight", ref_weight)):
        check_float(name, w, min_dim=2)
        if w.dim() != 2:
            raise ValueError(f"{name} must be [V, H], got shape {tuple(w.shape)}")
    n = policy_hidden.shape[0]
    V, H = policy_weight.shape
    if policy_hidden.shape[1] != H:
        raise ValueError(f"policy_hidden's last dim must equal policy_weight's H={H}, got {policy_hidden.shape[1]}")
    if ref_weight.shape[0] != V:
        raise ValueError(f"ref_weight must have V={V} rows like policy_weight, got {ref_weight.shape[0]}")
    if ref_hidden.shape != (n, ref_weight.shape[1]):
        raise ValueError(f"ref_hidden must have shape ({n}, {ref_weight.shape[1]}), got {tuple(ref_hidden.shape)}")
    _check_index("labels", labels, n)
    _check_index("row_ids", row_ids, n)
    _check_index("chosen_rows", chosen_rows)
    _check_index("rejected_rows", rejected_rows, chosen_rows.numel())
    P = chosen_rows.numel()
    if P == 0:
        raise ValueError("chosen_rows is empty: at least one pair is needed")
    for name, b in (("policy_bias", policy_bias), ("ref_bias", ref_bias)):
        if b is not None:
            check_float(name, b)
            if tuple(b.shape) != (V,):
                raise ValueError(f"{name} must have shape ({V},), got {tuple(b.shape)}")
    check_same_device(policy_hidden=policy_hidden, policy_weight=policy_weight, ref_hidden=ref_hidden,
                      ref_weight=ref_weight, labels=labels, row_ids=row_ids, chosen_rows=chosen_rows,
                      rejected_rows=rejected_rows, policy_bias=policy_bias, ref_bias=ref_bias)
    chosen_backend = resolve_backend("trdpo_loss_from_tokens", backend, labels.device, provides=("triton", "eager"))
    if validate or chosen_backend == "eager":  # the eager middle indexes by label: always checked there
        check_label_range(labels, V, _NO_IGNORE)
        if n and bool((labels == _NO_IGNORE).any()):
            raise ValueError(f"labels must lie in [0, {V})")

    # Slots: pair i's chosen row -> i, its rejected row -> P + i. One host sync for the plan.
    pair_rows = torch.cat([chosen_rows, rejected_rows])
    if bool((pair_rows < 0).any()):
        raise ValueError("chosen_rows / rejected_rows must be >= 0")
    n_rows = int(torch.cat([pair_rows, row_ids]).max()) + 1 if n else int(pair_rows.max()) + 1
    if n and bool((row_ids < 0).any()):
        raise ValueError("row_ids must be >= 0")
    slot_of_row = torch.full((n_rows,), -1, dtype=torch.int64, device=labels.device)
    if int(torch.bincount(pair_rows, minlength=n_rows).max()) > 1:
        raise ValueError("chosen_rows / rejected_rows must name each row at most once")
    slot_of_row[pair_rows] = torch.arange(2 * P, device=labels.device)
    slot = slot_of_row[row_ids]
    if n and bool((slot < 0).any()):
        bad = int(row_ids[slot < 0][0])
        raise ValueError(f"row_ids: row {bad} is in no pair (not in chosen_rows or rejected_rows)")
    order = torch.sort(slot, stable=True).indices  # rows contiguous, tokens of a row in their given order
    counts = torch.bincount(slot, minlength=2 * P).tolist()
    loss, policy_logps, ref_logps, mean_logit_sums, stat_sums = run_token_chunks(
        policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, order, order, labels[order],
        counts, loss_kw=loss_kw, logit_scale=float(logit_scale), softcap=None if softcap is None else float(softcap),
        chunk_bytes=chunk_bytes, max_pair_bytes=chunk_bytes, middle=chosen_backend, token_stats=token_stats)
    lengths = torch.as_tensor(counts, device=labels.device)
    return loss, _pair_metrics(policy_logps, ref_logps, float(beta), mean_logit_sums, lengths,
                               stat_sums if token_stats else None)
