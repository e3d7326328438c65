"""Padding-free batches (`packing`) and shared prompts (`share_prompt`) for the TR-DPO trainer.

    from fasttrdpo.training.packing import plan_packing, count_backbone_tokens
    plan = plan_packing(pairs, max_length=512, share_prompt=True)   # pure: which row goes where
    plan.tokens, plan.computed_tokens, len(plan.bins)
    count_backbone_tokens(batches, max_length=512)                   # padded / packed / shared totals

The padded path runs every pair as two rows, prompt ‖ chosen and prompt ‖ rejected, each padded to the
longest row of the micro-batch. Here:

- packing: the same rows, without padding, first-fit-decreasing into bins of at most max_length tokens
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
    at most max_length tokens, first fit over the units sorted by decreasing length (ties: batch order),
    so the plan depends on the lengths only. Pairs must already fit max_length (`tokenize_dataset`
    truncates them); a shared unit that does not fit is split into the pair's two rows (`unshared_pairs`)."""
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
    return PackPlan(max_length, share_prompt, tuple(tuple(b) for b in bins), unshared)


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
