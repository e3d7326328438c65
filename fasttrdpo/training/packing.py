"""Padding-free batches (`packing`) and shared prompts (`share_prompt`) for the TR-DPO trainer.

    from fasttrdpo.training.packing import plan_packing, count_backbone_tokens
    plan = plan_packing(pairs, max_length=512, share_prompt=True)   # pure: which row goes where
    plan.tokens, plan.computed_tokens, len(plan.bins)
    count_backbone_tokens(batches, max_length=512)                   # padded / packed / shared totals

The padded path runs every pair as two rows, prompt ‖ chosen and prompt ‖ rejected, each padded to the
longest row of the micro-batch. Here:

- packing: the same rows, without padding, in bins of at most max_length tokens (as many as first fit
  decreasing needs; then longest first into the least-filled bin when that narrows the widest bin)
  (bins, not one long sequence: attention cost grows with the square of a sequence's length). Each row
  keeps its own position ids (0, 1, ...) and attends only to itself (causally).
- share_prompt: each pair is ONE unit prompt ‖ chosen ‖ rejected. Chosen attends to the prompt and
  itself, rejected to the prompt and itself (never to chosen), and rejected's position ids continue from
  the prompt's end, so every completion token sees exactly what it sees in its padded row. The seam: the
  last prompt position predicts both chosen[0] and rejected[0], so its hidden state serves two labels
  (one token in each completion's list). A pair whose unit exceeds max_length is packed as its two rows.

Hidden states reach the loss through `fasttrdpo.loss.trdpo_loss_from_tokens` (valid tokens, their row
ids, the pair rows): the same preference loss and metrics as `TRDPOLoss` on the padded batch.

How the attention is kept inside rows (transformers' model classes, no forked model code):
- "mask" layout (sdpa / eager / flex_attention, any device): bins are the rows of an [n_bins, W] batch
  (W = the widest bin) with an explicit 4-D additive mask [n_bins, 1, W, W] (0 where a query may attend,
  the dtype's minimum elsewhere), which transformers passes to the attention as is;
- "varlen" layout (flash_attention_2/3, packing without shared prompts): every row one after the other
  in a single [1, n] sequence with position ids restarting at 0 per row and no mask: transformers' flash
  path reads the sequence boundaries off the position ids (varlen flash-attention; no bin padding).
Whether a model honours this is not assumed: `probe` compares packed and padded log-probs on a tiny
batch at start-up and refuses the model (naming its model_type) when they differ.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..data import TokenizedPair

_log = logging.getLogger("fasttrdpo")

CHOSEN, REJECTED, SHARED = "chosen", "rejected", "shared"
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


# ----------------------------------------------------------------------------------------------------
# The plan (pure Python: which unit goes into which bin)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One contiguous piece of a bin: a row (prompt ‖ chosen or prompt ‖ rejected) or a shared unit
    (prompt ‖ chosen ‖ rejected) of pair `pair` (its index in the batch), starting at `start`."""
    pair: int
    kind: str  # CHOSEN, REJECTED or SHARED
    start: int
    length: int


@dataclass(frozen=True)
class PackPlan:
    """Bins of units (each bin's units back to back from offset 0), for one micro-batch."""
    max_length: int
    share_prompt: bool
    bins: tuple[tuple[Unit, ...], ...]
    unshared_pairs: int  # share_prompt: pairs whose prompt ‖ chosen ‖ rejected exceeds max_length (two rows)

    @property
    def bin_lengths(self) -> list[int]:
        return [sum(u.length for u in b) for b in self.bins]

    @property
    def tokens(self) -> int:
        """Tokens the backbone computes with varlen attention (no padding at all)."""
        return sum(self.bin_lengths)

    @property
    def width(self) -> int:
        return max(self.bin_lengths, default=0)

    @property
    def computed_tokens(self) -> int:
        """Tokens the backbone computes in the "mask" layout: every bin padded to the widest bin."""
        return len(self.bins) * self.width


def _row_lengths(pair: TokenizedPair) -> tuple[int, int]:
    return len(pair.prompt) + len(pair.chosen), len(pair.prompt) + len(pair.rejected)


def _check_pair(i: int, pair, max_length: int) -> None:
    if not isinstance(pair, TokenizedPair):
        raise TypeError(f"pairs[{i}] must be a TokenizedPair, got {type(pair).__name__}")
    if not pair.chosen or not pair.rejected:
        raise ValueError(f"pairs[{i}] has an empty completion")
    longest = max(_row_lengths(pair))
    if longest > max_length:
        raise ValueError(f"pairs[{i}]: prompt + completion has {longest} tokens > max_length={max_length} "
                         "(tokenize_dataset truncates pairs to max_length; pack what it returns)")


def plan_packing(pairs: Sequence[TokenizedPair], max_length: int, *, share_prompt: bool = False) -> PackPlan:
    """Pack a micro-batch's rows (or, with share_prompt, its prompt ‖ chosen ‖ rejected units) into bins of
    at most max_length tokens: as many bins as first fit over the units sorted by decreasing length needs
    (ties: batch order), the units then balanced over them (longest first into the least-filled bin) when
    that narrows the widest bin, so the plan depends on the lengths only. Pairs must already fit max_length
    (`tokenize_dataset` truncates them); a shared unit that does not fit is split into the pair's two rows
    (`unshared_pairs`)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if not isinstance(share_prompt, bool):
        raise TypeError(f"share_prompt must be a bool, got {type(share_prompt).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty: nothing to pack")
    units: list[tuple[int, str, int]] = []  # (pair, kind, length)
    unshared = 0
    for i, pair in enumerate(pairs):
        _check_pair(i, pair, max_length)
        lc, lr = _row_lengths(pair)
        shared = len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
        if share_prompt and shared <= max_length:
            units.append((i, SHARED, shared))
        else:
            unshared += share_prompt
            units += [(i, CHOSEN, lc), (i, REJECTED, lr)]
    order = sorted(range(len(units)), key=lambda k: (-units[k][2], k))
    bins = _first_fit(units, order, max_length)
    # the same units, longest first, each into the least-filled of as many bins (ties: the first): the "mask"
    # layout pads every bin to the widest, so a narrower widest bin is fewer computed positions (on HH, 8 pairs
    # a batch: 0.918 -> 0.879 M packed, 0.671 -> 0.644 M shared). Kept only when it narrows the widest bin
    # (so it fits max_length too).
    balanced = _least_filled(units, order, len(bins))
    if _width(balanced) < _width(bins):
        bins = balanced
    return PackPlan(max_length, share_prompt, tuple(tuple(b) for b in bins), unshared)


def _width(bins) -> int:
    return max(sum(u.length for u in b) for b in bins)


def _least_filled(units, order, n_bins: int) -> list[list[Unit]]:
    bins: list[list[Unit]] = [[] for _ in range(n_bins)]
    fill = [0] * n_bins
    for k in order:
        i, kind, length = units[k]
        b = min(range(n_bins), key=lambda j: (fill[j], j))
        bins[b].append(Unit(i, kind, fill[b], length))
        fill[b] += length
    return bins


def _first_fit(units, order, max_length: int) -> list[list[Unit]]:
    bins: list[list[Unit]] = []
    fill: list[int] = []
    for k in order:
        i, kind, length = units[k]
        b = next((j for j, used in enumerate(fill) if used + length <= max_length), None)
        if b is None:
            bins.append([])
            fill.append(0)
            b = len(bins) - 1
        bins[b].append(Unit(i, kind, fill[b], length))
        fill[b] += length
    return bins


@dataclass(frozen=True)
class TokenCounts:
    """Backbone tokens computed per pass over some micro-batches, three ways (the prompt counted in each
    row it is computed in): padded (2 rows per pair, each padded to the micro-batch's longest row),
    packed (the rows without padding), shared (prompt ‖ chosen ‖ rejected once per pair; pairs whose
    unit exceeds max_length as two rows). `*_computed` adds the bin padding of the "mask" layout."""
    pairs: int
    padded: int
    packed: int
    shared: int
    packed_computed: int
    shared_computed: int
    unshared_pairs: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def padded_tokens(pairs: Sequence[TokenizedPair]) -> int:
    """What the padded collator computes: 2 rows per pair x the longest row of the micro-batch."""
    return 2 * len(pairs) * max(max(_row_lengths(p)) for p in pairs)


def count_backbone_tokens(batches: Iterable[Sequence[TokenizedPair]], max_length: int) -> TokenCounts:
    """Token counts of one backbone pass over each micro-batch in `batches` (see TokenCounts)."""
    totals = dict(pairs=0, padded=0, packed=0, shared=0, packed_computed=0, shared_computed=0, unshared_pairs=0)
    for pairs in batches:
        packed = plan_packing(pairs, max_length, share_prompt=False)
        shared = plan_packing(pairs, max_length, share_prompt=True)
        totals["pairs"] += len(pairs)
        totals["padded"] += padded_tokens(pairs)
        totals["packed"] += packed.tokens
        totals["shared"] += shared.tokens
        totals["packed_computed"] += packed.computed_tokens
        totals["shared_computed"] += shared.computed_tokens
        totals["unshared_pairs"] += shared.unshared_pairs
    return TokenCounts(**totals)


# ----------------------------------------------------------------------------------------------------
# Tensors of a packed micro-batch
# ----------------------------------------------------------------------------------------------------

def attention_layout(model) -> str:
    """"varlen" for flash-attention models (boundaries from position ids), "mask" for every other."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return "varlen" if impl in VARLEN_ATTENTION else "mask"


def _unit_tokens(pair: TokenizedPair, kind: str) -> tuple[list[int], list[int], list[int]]:
    """(ids, position ids, block) of a unit: block 0 = attended by every later token of the unit (the
    prompt, or a whole row), 1 = chosen, 2 = rejected of a shared unit (each sees block 0 and itself)."""
    p = len(pair.prompt)
    if kind == CHOSEN or kind == REJECTED:
        ids = pair.prompt + (pair.chosen if kind == CHOSEN else pair.rejected)
        return ids, list(range(len(ids))), [0] * len(ids)
    c, r = len(pair.chosen), len(pair.rejected)
    ids = pair.prompt + pair.chosen + pair.rejected
    pos = list(range(p + c)) + list(range(p, p + r))
    return ids, pos, [0] * p + [1] * c + [2] * r


def _unit_labels(pair: TokenizedPair, kind: str, offset: int, i: int, P: int):
    """(flat positions, labels, row ids) of the completion tokens a unit at `offset` predicts, as the padded
    collator labels them: position t predicts token t+1; the first completion token is predicted by the
    last prompt position (no predictor without a prompt). Row ids: pair i's chosen row i, rejected P + i."""
    p = len(pair.prompt)
    if kind != SHARED:
        comp = pair.chosen if kind == CHOSEN else pair.rejected
        ids = pair.prompt + comp
        first = p if p else 1
        pos = [offset + t - 1 for t in range(first, len(ids))]
        return pos, ids[first:], [i if kind == CHOSEN else P + i] * len(pos)
    c = len(pair.chosen)
    pos, lab, rows = [], [], []
    for j, tok in enumerate(pair.chosen):  # chosen[j] is predicted by position p + j - 1 of the unit
        if p + j >= 1:
            pos.append(offset + p + j - 1)
            lab.append(tok)
            rows.append(i)
    for j, tok in enumerate(pair.rejected):  # rejected[0] by the seam p - 1, rejected[j] by its block's j - 1
        if j == 0 and p == 0:
            continue
        pos.append(offset + (p - 1 if j == 0 else p + c + j - 1))
        lab.append(tok)
        rows.append(P + i)
    return pos, lab, rows


def build_packed_batch(pairs: Sequence[TokenizedPair], plan: PackPlan, *, pad_token_id: int, layout: str = "mask",
                       mask_dtype: torch.dtype = torch.float32, device=None) -> dict:
    """The tensors of `plan` for a model forward + `trdpo_loss_from_tokens`:

    input_ids, position_ids [n_bins, W] ("mask") or [1, n] ("varlen"); attention_mask: the 4-D additive
    mask [n_bins, 1, W, W] in mask_dtype ("mask"; a bin's padding attends to itself only) or None;
    token_index [n]: the flat positions (into input_ids.view(-1)) whose hidden states predict the
    completion tokens, with labels [n] and row_ids [n]; chosen_rows / rejected_rows [P]."""
    if layout not in ("mask", "varlen"):
        raise ValueError(f"layout must be 'mask' or 'varlen', got {layout!r}")
    if layout == "varlen" and plan.share_prompt:
        raise ValueError("layout 'varlen' cannot express shared prompts (rejected must not see chosen)")
    P = len(pairs)
    W = plan.width if layout == "mask" else plan.tokens
    n_rows = len(plan.bins) if layout == "mask" else 1
    ids = torch.full((n_rows, W), int(pad_token_id), dtype=torch.long)
    pos = torch.zeros((n_rows, W), dtype=torch.long)
    unit = torch.arange(n_rows * W, dtype=torch.long).view(n_rows, W).neg_().sub_(1)  # padding: its own unit
    block = torch.zeros((n_rows, W), dtype=torch.long)
    tok_pos, labels, row_ids = [], [], []
    base = 0  # varlen: bins one after the other in row 0
    for b, units in enumerate(plan.bins):
        row = b if layout == "mask" else 0
        for k, u in enumerate(units):
            u_ids, u_pos, u_block = _unit_tokens(pairs[u.pair], u.kind)
            s = base + u.start
            ids[row, s:s + u.length] = torch.tensor(u_ids)
            pos[row, s:s + u.length] = torch.tensor(u_pos)
            block[row, s:s + u.length] = torch.tensor(u_block)
            unit[row, s:s + u.length] = b * 1_000_000 + k  # unique per unit
            t, y, r = _unit_labels(pairs[u.pair], u.kind, row * W + s, u.pair, P)
            tok_pos += t
            labels += y
            row_ids += r
        if layout == "varlen":
            base += plan.bin_lengths[b]
    batch = {"input_ids": ids, "position_ids": pos, "attention_mask": None,
             "token_index": torch.tensor(tok_pos, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
             "row_ids": torch.tensor(row_ids, dtype=torch.long), "chosen_rows": torch.arange(P),
             "rejected_rows": torch.arange(P, 2 * P)}
    if layout == "mask":
        q = torch.arange(W)
        allowed = ((unit[:, :, None] == unit[:, None, :]) & (q[None, None, :] <= q[None, :, None])
                   & ((block[:, None, :] == 0) | (block[:, :, None] == block[:, None, :])))
        mask = torch.zeros((n_rows, 1, W, W), dtype=mask_dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
        batch["attention_mask"] = mask
    if device is not None:
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    batch["plan"] = plan
    return batch


def is_packed(batch) -> bool:
    return "token_index" in batch


def packed_loss(batch: dict, hidden: torch.Tensor, head, ref_hidden: torch.Tensor, ref_head, loss_kwargs: dict):
    """The TR-DPO loss and metrics of a packed batch: the hidden states at its token positions (the seam's
    twice under shared prompts) through `fasttrdpo.loss.trdpo_loss_from_tokens`."""
    from ..loss import trdpo_loss_from_tokens

    idx = batch["token_index"]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    hr = ref_hidden.reshape(-1, ref_hidden.shape[-1]).index_select(0, idx)
    return trdpo_loss_from_tokens(h, head.weight, hr, ref_head.weight, batch["labels"], batch["row_ids"],
                                  batch["chosen_rows"], batch["rejected_rows"], policy_bias=head.bias,
                                  ref_bias=ref_head.bias, **loss_kwargs)


# ----------------------------------------------------------------------------------------------------
# The start-up probe and the trainer's packer
# ----------------------------------------------------------------------------------------------------

# Probe pairs (prompt, chosen, rejected lengths): prompts longer and shorter than their completions, one
# of a single token; max_length 24 puts several rows (units) in each bin, so a leak across rows shows.
PROBE_LENGTHS = ((6, 3, 5), (2, 7, 4), (1, 4, 4), (9, 2, 3))
PROBE_MAX_LENGTH = 24


class PackingRefused(ValueError):
    """A model whose packed log-probs differ from its padded ones (it ignores the mask or position ids)."""


def _row_logps(model, hidden, index, labels, row_ids, n_rows):
    head = model.get_output_embeddings()
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).float()
    z = torch.nn.functional.linear(h, head.weight.float(), None if head.bias is None else head.bias.float())
    logp = z.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    scale = z.logsumexp(-1).abs() + z.abs().amax(-1)  # per-token magnitude of the log-prob's terms
    rows = torch.zeros(n_rows, dtype=torch.float64, device=h.device)
    mags = torch.zeros(n_rows, dtype=torch.float64, device=h.device)
    return rows.index_add_(0, row_ids, logp.double()), mags.index_add_(0, row_ids, scale.double())


def probe_tolerance(dtype: torch.dtype) -> float:
    """Relative bound, per row, on |packed - padded| / Σ_t(|lse_t| + max|z_t|) for a model that honours the
    packed mask: both forwards do the same arithmetic up to reduction order and the padding's placement,
    so they differ by rounding, κ·u per token, with u the dtype's unit roundoff and κ the growth through
    the layers. κ = 2^8 (fp32: 1.5e-5; bf16: 0.5) sits 300x above what tiny fp32 GPT-NeoX, Llama, Qwen2,
    GPT-2, OPT, GPT-J models show (<= 5e-8) and below a GPT-NeoX fed wrong position ids (4.5e-5). A model that
    attends across rows or ignores the position ids is off by O(1) of that scale."""
    return 256 * torch.finfo(dtype).eps / 2


@torch.no_grad()
def probe(model, *, share_prompt: bool, pad_token_id: int, device=None) -> float:
    """Packed (or shared-prompt) vs padded per-row log-probs of `model` on PROBE_LENGTHS random tokens.
    Returns the worst relative difference; raises PackingRefused (naming the model_type) over
    `probe_tolerance`, or when the model's forward does not take position ids / a 4-D mask."""
    from ..data import PreferenceCollator
    from .model_parts import causal_lm_parts

    backbone, head = causal_lm_parts(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    device = device if device is not None else head.weight.device
    V = head.weight.shape[0]
    g = torch.Generator().manual_seed(1234)
    rand = lambda n: torch.randint(0, V, (n,), generator=g).tolist()  # noqa: E731
    pairs = [TokenizedPair(rand(p), rand(c), rand(r)) for p, c, r in PROBE_LENGTHS]
    padded = {k: v.to(device) for k, v in PreferenceCollator(pad_token_id)(pairs).items()}
    layout = attention_layout(model)
    dtype = head.weight.dtype
    plan = plan_packing(pairs, PROBE_MAX_LENGTH, share_prompt=share_prompt)
    packed = build_packed_batch(pairs, plan, pad_token_id=pad_token_id, layout=layout, mask_dtype=dtype, device=device)
    was_training = model.training
    model.eval()
    try:
        ref_h = backbone(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                         use_cache=False).last_hidden_state
        try:
            h = backbone(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                         position_ids=packed["position_ids"], use_cache=False).last_hidden_state
        except (TypeError, ValueError, RuntimeError) as err:
            raise PackingRefused(f"packing refused for model_type {model_type!r}: its forward does not take "
                                 f"position ids and a {'4-D mask' if layout == 'mask' else 'varlen batch'} "
                                 f"({type(err).__name__}: {err})") from err
    finally:
        model.train(was_training)
    labels = padded["labels"]
    valid = (labels != -100).reshape(-1)
    flat = torch.arange(labels.numel(), device=device)[valid]
    B = len(pairs)
    row_of = torch.arange(2 * B, device=device)[:, None].expand_as(labels).reshape(-1)[valid]
    want, mag = _row_logps(model, ref_h, flat, labels.reshape(-1)[valid], row_of, 2 * B)
    got, _ = _row_logps(model, h, packed["token_index"], packed["labels"], packed["row_ids"], 2 * B)
    worst = float(((got - want).abs() / mag.clamp(min=1e-30)).max())
    tol = probe_tolerance(dtype)
    if not worst <= tol:
        raise PackingRefused(
            f"packing refused for model_type {model_type!r}: its {'shared-prompt' if share_prompt else 'packed'} "
            f"log-probs differ from the padded ones by {worst:.3g} (relative; rounding allows {tol:.3g}) on a probe "
            f"batch — the model does not keep attention inside rows ({layout} layout, attn_implementation="
            f"{getattr(model.config, '_attn_implementation', None)!r}) or ignores position ids")
    _log.debug("packing probe (%s, %s layout): relative difference %.3g <= %.3g", model_type, layout, worst, tol)
    return worst


class Packer:
    """What the trainer holds when config.packing / share_prompt: builds packed micro-batches for `model`
    (after `probe` accepted it) and counts the tokens it saves."""

    def __init__(self, model, config, *, pad_token_id: int):
        share_prompt = config.share_prompt
        self.layout = attention_layout(model)
        if share_prompt and self.layout == "varlen":
            raise ValueError(f"share_prompt: attn_implementation={model.config._attn_implementation!r} cannot "
                             "take the shared-prompt mask (rejected must not see chosen): load the model with "
                             "attn_implementation='sdpa' (--attn-implementation sdpa) or 'flex_attention'")
        self.max_length = config.max_length
        self.share_prompt = share_prompt
        # the loss settings TRDPOLoss gets from the config (fasttrdpo.trainer)
        self.loss_kwargs = dict(beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                                loss_weights=config.loss_weights, discopop_tau=config.discopop_tau,
                                token_stats=config.log_token_stats)
        self.pad_token_id = int(pad_token_id)
        self.mask_dtype = model.get_output_embeddings().weight.dtype
        self.tokens = {"padded": 0, "packed": 0, "computed": 0}

    def __call__(self, pairs: Sequence[TokenizedPair], device) -> dict:
        plan = plan_packing(pairs, self.max_length, share_prompt=self.share_prompt)
        self.tokens["padded"] += padded_tokens(pairs)
        self.tokens["packed"] += plan.tokens
        self.tokens["computed"] += plan.tokens if self.layout == "varlen" else plan.computed_tokens
        return build_packed_batch(pairs, plan, pad_token_id=self.pad_token_id, layout=self.layout,
                                  mask_dtype=self.mask_dtype, device=device)
