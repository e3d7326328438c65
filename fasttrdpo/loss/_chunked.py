"""TRDPOLoss's eager path: policy+reference log-probs, the preference loss and its gradient, chunk by chunk.

No [tokens × vocab] tensor beyond one chunk ever exists, and nothing is recomputed:
- only completion tokens (label ≠ ignore_index) are projected;
- reference log-probs: under no_grad, in token chunks; only one float per token survives;
- policy: chunks of *whole pairs*, so that each chunk knows its pairs' Δ and can finish the loss and
  its gradient at once (Liger-style): the forward already accumulates grad_hidden / grad_weight /
  grad_bias, and the backward only scales them by grad_output. (Only a pair whose logits exceed
  max_pair_bytes is recomputed: log-probs first, gradients in a second pass.)

Per policy chunk, with z the fp32 logits (formed once into a reused buffer) and c_t = ∂loss/∂logp_t
(a per-row constant, from a tiny autograd graph of the pair losses, so every loss_type works):
    ∂loss/∂z_t = c_t·(onehot(y_t) − p_t)
Instead of scaling that [chunk × V] gradient by c, the buffer becomes p − onehot in place (softmax
over z, then one scatter of n elements) and c_t is applied on the thin [chunk × H] side:
    grad_h[t]  = −c_t·((p − onehot) @ W)[t]
    grad_W    += −(p − onehot)ᵀ(c⊙h)                  (addmm_ into the accumulator)
so each policy chunk costs its three matmuls plus one fused in-place log_softmax (log p_y is read from
it at full precision) and one in-place exp; a reference chunk costs one matmul and the log_softmax. With softcap the transform's derivative is elementwise, so p is multiplied by it
in place (one more buffer and a few passes; only models with a softcap pay that).

Loss types (every TRL 1.16 type, and weighted lists; `pair_losses_and_grads` below):
- pairwise types (a pair's loss depends on that pair alone): finished per chunk as above;
- sft (mean NLL over ALL chosen tokens of the batch): still per chunk, single pass: every chunk's
  preference_loss gets the whole batch's batch_mean_chosen_length = max(Σ chosen lengths, 1) / P, known
  from the labels up front, so the chunk terms add up to the batch loss;
- aot, aot_unpaired (they sort log-ratios over the batch: needs_all_logps): two passes. Pass 1 computes
  every row's policy log-prob chunk by chunk (the reference's are computed once up front, as always, and
  never again); then preference_loss runs once on the whole batch, under autograd on detached [P] leaves,
  giving ∂loss/∂logp of every row; pass 2 forms each chunk's policy logits again and accumulates the
  gradients. Extra cost, only for these types: one more policy logits GEMM (+ its log-softmax) per chunk.
"""
from __future__ import annotations

import torch

from .preference import LOSS_TYPES, check_loss_config, needs_all_logps, preference_loss

# Size of one chunk's fp32 logits. A chunk holds at least one whole pair (its logits are needed together
# to finish its loss without recompute), up to MAX_PAIR_BYTES; a pair longer than that is done in two
# passes over chunk-sized token blocks (its policy logits formed twice), so memory stays bounded.
DEFAULT_CHUNK_BYTES = 32 << 20
DEFAULT_MAX_PAIR_BYTES = 256 << 20
# The eager paths' block of fp32 rows for passes after the GEMM (softmax statistics, entropy): with a scratch
# buffer it stays in a core's L2 (2 MiB here); smaller blocks pay torch's per-op cost (measured on 2 cores,
# V = 50304: 256 KiB blocks 2-3x slower than 1 MiB).
EAGER_BLOCK_BYTES = 1 << 20


def eager_block_rows(V: int) -> int:
    """Rows of a [*, V] fp32 block of EAGER_BLOCK_BYTES (at least 1)."""
    return max(1, EAGER_BLOCK_BYTES // (4 * V))


def loss_config(beta, loss_type, label_smoothing, loss_weights, discopop_tau) -> dict:
    """Validate (check_loss_config over every TRL 1.16 type: ValueError/TypeError naming the argument) and
    return preference_loss's keywords: loss_type / label_smoothing / loss_weights as tuples (or one value)."""
    check_loss_config(beta, loss_type, label_smoothing, loss_weights=loss_weights, discopop_tau=discopop_tau,
                      accept=LOSS_TYPES)
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return dict(beta=float(beta), loss_type=as_tuple(loss_type),
                label_smoothing=tuple(float(e) for e in label_smoothing)
                if isinstance(label_smoothing, (list, tuple)) else float(label_smoothing),
                loss_weights=None if loss_weights is None else tuple(float(w) for w in loss_weights),
                discopop_tau=float(discopop_tau))


def batch_mean_chosen_length(chosen_counts) -> float:
    """sft's n̄_c for a chunked caller: (Σ chosen lengths of the whole batch, clamped to >= 1) / pairs.
    From host ints (the chunk plan's counts): no host sync."""
    return max(sum(chosen_counts), 1) / max(len(chosen_counts), 1)


def pair_losses_and_grads(loss_kw, pol_rows, ref_chosen, ref_rejected, len_chosen, len_rejected, n_pairs,
                          need_grad, mean_len_chosen):
    """Σ pair losses / n_pairs of the pairs in pol_rows ([chosen rows..., rejected rows...]) and, when need_grad,
    its gradient in those row log-probs, by autograd on detached leaves (so every loss_type works).
    mean_len_chosen: the whole batch's batch_mean_chosen_length (sft), or None. Returns (loss, (g_c, g_r) | None)."""
    k = pol_rows.shape[0] // 2
    with torch.enable_grad():
        lc = pol_rows[:k].detach().requires_grad_(True)
        lr = pol_rows[k:].detach().requires_grad_(True)
        losses, _, _ = preference_loss(lc, lr, ref_chosen, ref_rejected, chosen_lengths=len_chosen,
                                       rejected_lengths=len_rejected, batch_mean_chosen_length=mean_len_chosen,
                                       **loss_kw)
        chunk_loss = losses.sum() / n_pairs
        grads = None
        if need_grad:  # sft alone does not read the rejected rows: their gradient is 0, not an error
            grads = torch.autograd.grad(chunk_loss, (lc, lr), allow_unused=True)
            grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (lc, lr)))
    return chunk_loss.detach(), grads


def _types(loss_kw) -> tuple:
    t = loss_kw["loss_type"]
    return (t,) if isinstance(t, str) else tuple(t)


def _plan_pair_chunks(row_counts: list[int], n_pairs: int, max_tokens: int) -> list[tuple[int, int]]:
    """Greedy runs of consecutive pairs whose completion tokens fit max_tokens (one pair at least)."""
    chunks, start, tokens = [], 0, 0
    for i in range(n_pairs):
        pair_tokens = row_counts[i] + row_counts[n_pairs + i]
        if i > start and tokens + pair_tokens > max_tokens:
            chunks.append((start, i))
            start, tokens = i, 0
        tokens += pair_tokens
    chunks.append((start, n_pairs))
    return chunks


def _project(h32, weight32, bias32, logit_scale, out):
    """out = logit_scale·(h @ Wᵀ + b), formed by one matmul into the reused buffer."""
    if bias32 is not None:
        torch.addmm(bias32, h32, weight32.T, beta=logit_scale, alpha=logit_scale, out=out)
    else:
        torch.mm(h32 if logit_scale == 1.0 else h32 * logit_scale, weight32.T, out=out)
    return out


def _softcap_(z, softcap):
    """z ← softcap·tanh(z/softcap), in place."""
    return z.div_(softcap).tanh_().mul_(softcap)


def _token_stats(lsm, correct):
    """[n, 2]: per token the entropy −Σ_v p·log p from log_softmax rows lsm [n, V] (p = 0 where lsm = −inf
    contributes 0, not 0·−inf) beside `correct` [n] (label is the first argmax, taken on the logits before
    log_softmax: z − lse could round two distinct logits to one value). By blocks of EAGER_BLOCK_BYTES of
    rows in one reused buffer (an [n, V] temporary per pass would stream each pass from memory)."""
    n, V = lsm.shape
    rows = eager_block_rows(V)
    buf = torch.empty(min(rows, n), V, dtype=lsm.dtype, device=lsm.device)
    entropy = torch.empty(n, dtype=lsm.dtype, device=lsm.device)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        # p·log p; 0·(−inf) (and a NaN row's NaN) → 0, as where(p > 0, p·log p, 0)
        entropy[s:e] = torch.exp(lsm[s:e], out=buf[: e - s]).mul_(lsm[s:e]).nan_to_num_(nan=0.0).sum(1).neg_()
    return torch.stack([entropy, correct], 1)


def _label_logprobs_(z, y):
    """log p(y) per row from logits z [n, V]; leaves log_softmax(z) in z (in place, one fused pass)."""
    torch._log_softmax(z, 1, False, out=z)
    return z.gather(1, y.unsqueeze(1)).squeeze(1)


class ChunkedTRDPOFunction(torch.autograd.Function):
    """(loss, policy_logps[B], ref_logps[B], mean_logit_sums[B], stat_sums[B, 2] or [0, 2]); only loss is
    differentiable. stat_sums (cfg's stats): per row Σ policy entropy, Σ [label is the argmax] over its tokens."""

    @staticmethod
    def forward(ctx, policy_hidden, policy_weight, policy_bias, ref_hidden, ref_weight, ref_bias, labels, cfg):
        loss_kw, ignore_index, logit_scale, softcap, chunk_bytes, max_pair_bytes, grad_enabled, stats = cfg
        B = labels.shape[0]
        P = B // 2
        device = labels.device
        flat_labels = labels.reshape(-1)
        L = flat_labels.numel() // B
        H = policy_hidden.shape[-1]
        V = policy_weight.shape[0]
        pol_h = policy_hidden.reshape(-1, H)
        ref_h = ref_hidden.reshape(-1, ref_hidden.shape[-1])

        mask = flat_labels != ignore_index
        valid = mask.nonzero().squeeze(1)  # sorted: rows in order, so each row's tokens are contiguous
        rows = torch.div(valid, L, rounding_mode="floor")
        y = flat_labels[valid]
        lengths = mask.view(B, L).sum(1)
        row_counts = lengths.tolist()
        offsets = [0]
        for c in row_counts:
            offsets.append(offsets[-1] + c)

        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and policy_bias is not None and ctx.needs_input_grad[2]

        f32 = torch.float32
        w32 = policy_weight.to(f32)
        b32 = policy_bias.to(f32) if policy_bias is not None else None
        rw32 = ref_weight.to(f32)
        rb32 = ref_bias.to(f32) if ref_bias is not None else None

        # Buffer rows: at least the chunk budget, and a whole pair when it fits max_pair_bytes (single pass,
        # no recompute); a longer pair is done in two passes over budget-sized token chunks instead.
        budget_rows = max(1, chunk_bytes // (4 * V))
        cap_rows = max(budget_rows, max_pair_bytes // (4 * V))
        max_pair = max((row_counts[i] + row_counts[P + i] for i in range(P)), default=0)
        chunk_rows = max(budget_rows, min(max_pair, cap_rows))
        buf = torch.empty(chunk_rows, V, dtype=f32, device=device)
        tbuf = torch.empty(chunk_rows, V, dtype=f32, device=device) if softcap is not None else None

        # Reference log-probs: token chunks, no grad, one float per token kept.
        n_valid = valid.numel()
        ref_tok = torch.empty(n_valid, dtype=f32, device=device)
        for s in range(0, n_valid, chunk_rows):
            e = min(s + chunk_rows, n_valid)
            z = _project(ref_h[valid[s:e]].to(f32), rw32, rb32, logit_scale, buf[: e - s])
            if softcap is not None:
                _softcap_(z, softcap)
            ref_tok[s:e] = _label_logprobs_(z, y[s:e])
        ref_logps = torch.zeros(B, dtype=f32, device=device).index_add_(0, rows, ref_tok)

        # Mean logit over the vocabulary, without logits (linear case): mean_v(s·(h·W_v + b_v)) = s·(h·mean_v W + mean b).
        w_mean = w32.mean(0) if softcap is None else None
        b_mean = b32.mean() if (softcap is None and b32 is not None) else None

        need_grad = need_h or need_w or need_b
        grad_h = torch.zeros(pol_h.shape, dtype=f32, device=device) if need_h else None
        grad_w = torch.zeros(V, H, dtype=f32, device=device) if need_w else None
        grad_b = torch.zeros(V, dtype=f32, device=device) if need_b else None
        gh_buf = torch.empty(chunk_rows, H, dtype=f32, device=device) if need_h else None
        arange_n = torch.arange(chunk_rows, device=device)

        def logits_(h, n):
            """fp32 logits of h [n, H] into buf (softcapped), tanh into tbuf; per-token vocabulary mean."""
            z = _project(h, w32, b32, logit_scale, buf[:n])
            if softcap is None:
                tok_mean = h @ w_mean
                if b_mean is not None:
                    tok_mean = tok_mean + b_mean
                return z, None, tok_mean * logit_scale
            t = tbuf[:n]
            t.copy_(z.div_(softcap).tanh_())
            z.mul_(softcap)
            return z, t, z.mean(1)

        def accumulate_grads_(z, t, h, yc, c, sel):
            """z holds softmax p; c = ∂loss/∂logp per token. Adds this chunk's gradients (h is overwritten)."""
            n = z.shape[0]
            if softcap is None:
                c = c * logit_scale  # ∂z/∂(h·W) = logit_scale
                g_y = 1.0
            else:
                # ∂z/∂u = logit_scale·(1 − tanh²), elementwise: p ← p·∂z/∂u, and the onehot term needs it at y
                t.square_().neg_().add_(1.0).mul_(logit_scale)
                g_y = t[arange_n[:n], yc]
                z.mul_(t)
            # z ← (p − onehot)·∂z/∂u, so that ∂loss/∂u = −c ⊙ z: one tiny scatter instead of extra passes
            z[arange_n[:n], yc] -= g_y
            if need_h:
                grad_h[sel] = torch.mm(z, w32, out=gh_buf[:n]).mul_(c.neg().unsqueeze(1))
            if need_w:
                grad_w.addmm_(z.T, h.mul_(c.unsqueeze(1)), alpha=-1.0)  # h is a private fp32 copy
            if need_b:
                grad_b.addmv_(z.T, c, alpha=-1.0)

        policy_logps = torch.empty(B, dtype=f32, device=device)
        mean_logit_sums = torch.empty(B, dtype=f32, device=device)
        # per row: Σ policy entropy and Σ [label is the argmax] over its tokens, when stats (else empty)
        stat_sums = torch.zeros((B if stats else 0, 2), dtype=f32, device=device)
        loss = torch.zeros((), dtype=f32, device=device)

        def label_logprobs_(z, yc):
            """_label_logprobs_, plus the tokens' [n, 2] stats when asked (else None)."""
            correct = (z.argmax(1) == yc).to(f32) if stats else None
            logp = _label_logprobs_(z, yc)
            return logp, (_token_stats(z, correct) if stats else None)
        # aot / aot_unpaired: every pair's log-probs before any loss (module docstring: two passes)
        deferred = needs_all_logps(loss_kw["loss_type"])
        mean_len_c = batch_mean_chosen_length(row_counts[:P]) if "sft" in _types(loss_kw) else None
        pending = []  # deferred: what pass 2 needs per chunk

        def second_pass(sel, yc, c, n):
            """The chunk's policy logits again, block by block, and its gradients (c = ∂loss/∂logp per token)."""
            for s in range(0, n, chunk_rows):
                e = min(s + chunk_rows, n)
                h = pol_h[sel[s:e]].to(f32)
                z, t, _ = logits_(h, e - s)
                _label_logprobs_(z, yc[s:e])
                z.exp_()
                accumulate_grads_(z, t, h, yc[s:e], c[s:e], sel[s:e])

        for p0, p1 in _plan_pair_chunks(row_counts, P, chunk_rows):
            k = p1 - p0
            sel = torch.cat([valid[offsets[p0]:offsets[p1]], valid[offsets[P + p0]:offsets[P + p1]]])
            tok_slice = torch.cat([torch.arange(offsets[p0], offsets[p1], device=device),
                                   torch.arange(offsets[P + p0], offsets[P + p1], device=device)])
            chunk_rows_ids = torch.cat([torch.arange(p0, p1, device=device), torch.arange(P + p0, P + p1, device=device)])
            local_row = torch.repeat_interleave(
                torch.arange(2 * k, device=device),
                torch.as_tensor(row_counts[p0:p1] + row_counts[P + p0:P + p1], device=device))
            n = sel.numel()
            yc = y[tok_slice]
            single_pass = n <= chunk_rows and not deferred

            if single_pass:
                h = pol_h[sel].to(f32)
                z, t, tok_mean = logits_(h, n)
                logp, tok_stats = label_logprobs_(z, yc)
                z.exp_()  # softmax, in place: what the gradient needs
            else:  # a pair longer than the buffer, or a deferred loss: log-probs now, gradients in a second pass
                logp = torch.empty(n, dtype=f32, device=device)
                tok_mean = torch.empty(n, dtype=f32, device=device)
                tok_stats = torch.empty((n, 2), dtype=f32, device=device) if stats else None
                for s in range(0, n, chunk_rows):
                    e = min(s + chunk_rows, n)
                    z, _, tok_mean[s:e] = logits_(pol_h[sel[s:e]].to(f32), e - s)
                    logp[s:e], block_stats = label_logprobs_(z, yc[s:e])
                    if stats:
                        tok_stats[s:e] = block_stats

            pol_rows = torch.zeros(2 * k, dtype=f32, device=device).index_add_(0, local_row, logp)
            policy_logps[chunk_rows_ids] = pol_rows
            mean_logit_sums[chunk_rows_ids] = torch.zeros(2 * k, dtype=f32, device=device).index_add_(
                0, local_row, tok_mean)
            if stats:
                stat_sums[chunk_rows_ids] = torch.zeros(2 * k, 2, dtype=f32, device=device).index_add_(
                    0, local_row, tok_stats)

            if deferred:
                pending.append((chunk_rows_ids, sel, yc, local_row, n))
                continue
            # Pair losses of this chunk and ∂loss/∂(row log-prob), by autograd on [k] tensors.
            chunk_loss, g = pair_losses_and_grads(loss_kw, pol_rows, ref_logps[p0:p1], ref_logps[P + p0:P + p1],
                                                  lengths[p0:p1], lengths[P + p0:P + p1], P, need_grad, mean_len_c)
            loss += chunk_loss
            if not need_grad:
                continue

            c = torch.cat(g)[local_row]  # ∂loss/∂logp_t, per token
            if single_pass:
                accumulate_grads_(z, t, h, yc, c, sel)
            else:
                second_pass(sel, yc, c, n)

        if deferred:  # the whole batch's loss once, then pass 2 chunk by chunk
            batch_loss, g = pair_losses_and_grads(loss_kw, policy_logps, ref_logps[:P], ref_logps[P:], lengths[:P],
                                                  lengths[P:], P, need_grad, mean_len_c)
            loss += batch_loss
            if need_grad:
                c_rows = torch.cat(g)  # ∂loss/∂(row log-prob), rows in batch order
                for chunk_rows_ids, sel, yc, local_row, n in pending:
                    second_pass(sel, yc, c_rows[chunk_rows_ids][local_row], n)

        ctx.grads = (
            grad_h.view(policy_hidden.shape) if grad_h is not None else None,
            grad_w,
            grad_b,
        )
        ctx.dtypes = (policy_hidden.dtype, policy_weight.dtype, policy_bias.dtype if policy_bias is not None else None)
        ctx.mark_non_differentiable(policy_logps, ref_logps, mean_logit_sums, stat_sums)
        return loss, policy_logps, ref_logps, mean_logit_sums, stat_sums

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if ctx.grads is None:
            raise RuntimeError("TRDPOLoss (eager): backward called twice; its gradients are consumed by the first call")
        grads, ctx.grads = ctx.grads, None
        out = []
        scale_needed = grad_loss.device.type != "cpu" or float(grad_loss) != 1.0
        for g, dtype in zip(grads, ctx.dtypes):
            if g is None:
                out.append(None)
                continue
            if scale_needed:
                g.mul_(grad_loss)
            out.append(g if g.dtype == dtype else g.to(dtype))
        return out[0], out[1], out[2], None, None, None, None, None
