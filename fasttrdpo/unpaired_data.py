"""Unpaired preference data for KTO / TR-KTO: TRL's `prompt` / `completion` / `label` rows.

`tokenize_unpaired_dataset` turns rows into `TokenizedExample`s exactly as TRL 1.16's `KTOTrainer._prepare_dataset`
does: paired rows (prompt/chosen/rejected, or full chosen/rejected conversations) are first unpaired in TRL's
order; plain text gets the EOS appended as text and is tokenized with the tokenizer's special tokens (BOS);
conversational rows (message lists) go through the chat template (prompt with the generation prompt, prompt +
completion as one conversation; per-row `tools` / `chat_template_kwargs` as TRL passes them); the prompt ends where
the prompt's and the whole sequence's tokens stop agreeing. `UnpairedCollator` batches examples with the
mismatched KL rows KTO needs: row i's prompt with row i−1's completion within the batch (cyclically), as TRL's
`add_kl_completion_ids` pairs them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .data import (MalformedRowError, PreferenceCollator, TokenizedPair, _check_lengths, _common_prefix_length,
                   _leading_special_count, _read_json_rows, _read_parquet_rows, _render_ids, _template_kwargs,
                   _truncate, conversational_triple, is_messages)

_log = logging.getLogger("fasttrdpo")

# datasets.Dataset.map's default batch size: TRL's unpair_preference_dataset unpairs blocks of this many pairs
# (all chosen rows of a block, then all its rejected rows), so the unpaired order depends on it
TRL_UNPAIR_BLOCK = 1000


@dataclass
class TokenizedExample:
    prompt: list[int]           # the prompt tokens the model sees (after truncation)
    completion: list[int]       # this row's completion tokens (+ EOS unless truncated)
    desirable: bool             # TRL's label
    kl_completion: list[int]    # the untruncated completion: what another row's KL sequence borrows


def is_unpaired(columns) -> bool:
    return {"completion", "label"} <= set(columns)


def unpair_rows(rows: Sequence[dict]) -> list[dict]:
    """Paired rows -> unpaired rows in TRL's order (`unpair_preference_dataset`: per block of 1000 pairs, the
    chosen rows then the rejected rows). A paired row without a prompt must be conversational (its prompt is the
    shared leading messages, TRL's `extract_prompt`)."""
    out = []
    for start in range(0, len(rows), TRL_UNPAIR_BLOCK):
        block = []
        for i, row in enumerate(rows[start:start + TRL_UNPAIR_BLOCK], start):
            extra = {k: row[k] for k in ("tools", "chat_template_kwargs") if row.get(k) is not None}
            try:
                if is_messages(row.get("chosen")) or is_messages(row.get("rejected")):
                    prompt, chosen, rejected = conversational_triple(row)
                elif isinstance(row.get("prompt"), str):
                    prompt, chosen, rejected = row["prompt"], row.get("chosen"), row.get("rejected")
                else:
                    raise ValueError("a plain-text pair needs a 'prompt' string (Anthropic-HH transcripts: load "
                                     "them with fasttrdpo.data.load_preference_dataset, which splits the prompt)")
            except ValueError as err:
                raise MalformedRowError(i, str(err)) from None
            block.append((prompt, chosen, rejected, extra))
        out += [{"prompt": p, "completion": c, "label": True, **e} for p, c, _, e in block]
        out += [{"prompt": p, "completion": r, "label": False, **e} for p, _, r, e in block]
    return out


def tokenize_example(tokenizer, prompt, completion, *, tools=None, chat_template_kwargs=None
                     ) -> tuple[list[int], list[int], int]:
    """(prompt ids, completion ids, leading special ids of the prompt) of one row, untruncated, as TRL 1.16's
    KTOTrainer tokenizes it."""
    if isinstance(prompt, list) or is_messages(completion):
        if not (is_messages(prompt) and is_messages(completion)):
            raise ValueError("a conversational row needs 'prompt' and 'completion' as non-empty message lists")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"conversational rows (message lists) need a tokenizer with a chat template, and this "
                             f"{type(tokenizer).__name__} has none (tokenizer.chat_template is None)")
        kwargs = _template_kwargs(tools, chat_template_kwargs)
        p = _render_ids(tokenizer, prompt, kwargs, add_generation_prompt=True)
        pc = _render_ids(tokenizer, prompt + completion, kwargs)
        n = _common_prefix_length(p, pc)
        bos = getattr(tokenizer, "bos_token_id", None)
        return p[:n], pc[n:], int(bos is not None and p[:1] == [bos])
    if tools is not None or chat_template_kwargs is not None:
        raise ValueError("tools / chat_template_kwargs apply to conversational rows (message lists) only")
    for key, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise TypeError(f"{key} must be a string or a list of messages, got {type(value).__name__}")
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("the tokenizer has no eos_token (TRL ends each text completion with it)")
    completion = completion if completion.endswith(eos) else completion + eos
    p = list(tokenizer(text=prompt)["input_ids"])
    pc = list(tokenizer(text=prompt + completion)["input_ids"])
    n = _common_prefix_length(p, pc)
    return p[:n], pc[n:], _leading_special_count(tokenizer, prompt, p[:n])


def _label(value, index: int) -> bool:
    if not isinstance(value, bool):
        raise MalformedRowError(index, f"field 'label' must be a bool (True = desirable), got {value!r}")
    return value


def tokenize_unpaired_dataset(dataset, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                              truncation_mode: str = "keep_prompt_end") -> list[TokenizedExample]:
    """Tokenize a KTO dataset (a `datasets.Dataset` or a list of dicts): unpaired rows (prompt, completion, label)
    or paired rows (unpaired first, in TRL's order). Truncation per `truncation_mode`:
      "keep_start" (TRL's): each sequence keeps its first max_length tokens; rows whose prompt alone fills
          max_length are dropped (counted in a WARNING), as TRL drops them;
      "keep_prompt_end": the prompt keeps its end (and its BOS) as `fasttrdpo.data.tokenize_pair` does.
    The KL sequence of a row (its prompt + another row's whole completion) keeps its first max_length tokens."""
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    rows = list(dataset)
    if not rows:
        raise ValueError("the dataset is empty")
    if not is_unpaired(rows[0]):
        if not {"chosen", "rejected"} <= set(rows[0]):
            raise ValueError(f"a KTO dataset needs columns prompt, completion, label (TRL's unpaired format) or "
                             f"prompt, chosen, rejected (unpaired as TRL does); got {sorted(rows[0])}")
        rows = unpair_rows(rows)
    examples, dropped = [], []
    for i, row in enumerate(rows):
        if "prompt" not in row:
            raise MalformedRowError(i, "missing field 'prompt'")
        try:
            p, c, lead = tokenize_example(tokenizer, row["prompt"], row.get("completion"), tools=row.get("tools"),
                                          chat_template_kwargs=row.get("chat_template_kwargs"))
        except (ValueError, TypeError) as err:
            raise MalformedRowError(i, str(err)) from err
        desirable = _label(row.get("label"), i)
        pair = _truncate(p, c, c, lead, max_length=max_length, max_prompt_length=max_prompt_length,
                         truncation_mode=truncation_mode)
        if pair is None:
            dropped.append(i)
        else:
            examples.append(TokenizedExample(pair.prompt, pair.chosen, desirable, c))
    if dropped:
        _log.warning("tokenize_unpaired_dataset: dropped %d of %d rows whose prompt alone fills max_length=%d "
                     "(truncation_mode='keep_start'; first: %s)", len(dropped), len(rows), max_length, dropped[:10])
    if not examples:
        raise ValueError(f"no row leaves a completion token within max_length={max_length}")
    return examples


def kl_partners(n: int, batch_size: int) -> list[int]:
    """TRL's KL pairing over a dataset of n rows batched by batch_size: within each batch, row i borrows the
    completion of row i−1 (the first row the last row's)."""
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        out += [idx[-1]] + idx[:-1]
    return out


class UnpairedCollator:
    """Batches TokenizedExamples (right-padded) with their KL rows.

    __call__(examples, kl_sources=None) -> input_ids / attention_mask / labels [B, T] (labels shifted,
    ignore_index on prompt and padding), kl_input_ids / kl_attention_mask / kl_labels [B, T] (row i: example i's
    prompt + kl_sources[i]'s completion, cut to max_length), desirable [B] bool. kl_sources defaults to the
    batch rotated by one (TRL's pairing within the batch)."""

    def __init__(self, pad_token_id: int, max_length: int, ignore_index: int = -100):
        self.rows = PreferenceCollator(pad_token_id, ignore_index)
        self.max_length = max_length
        self.ignore_index = ignore_index

    def __call__(self, examples: Sequence[TokenizedExample], kl_sources: Sequence[TokenizedExample] | None = None):
        if not examples:
            raise ValueError("cannot collate an empty batch")
        if kl_sources is None:
            kl_sources = [examples[-1]] + list(examples[:-1])
        if len(kl_sources) != len(examples):
            raise ValueError(f"kl_sources must have one example per row ({len(examples)}), got {len(kl_sources)}")
        # the collator's two halves: rows [0, B) the examples, rows [B, 2B) their KL sequences
        pairs = [TokenizedPair(e.prompt, e.completion, k.kl_completion[:max(self.max_length - len(e.prompt), 0)])
                 for e, k in zip(examples, kl_sources)]
        both = self.rows(pairs)
        B = len(examples)
        out = {k: v[:B] for k, v in both.items()}
        out.update({f"kl_{k}": v[B:] for k, v in both.items()})
        out["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
        return out


def load_unpaired_dataset(source: str, split: str = "train", *, format: str = "auto", skip_malformed: bool = False):
    """A KTO dataset from a file or hub id: unpaired rows (prompt, completion, label: text or message lists, plus
    TRL's per-row tools / chat_template_kwargs) as they are, anything else through
    `fasttrdpo.data.load_preference_dataset` (pairs, which the KTO trainer unpairs as TRL does)."""
    import datasets

    from .data import load_preference_dataset

    if isinstance(source, str) and os.path.isfile(source):
        base = source[:-3] if source.endswith(".gz") else source
        rows = (_read_json_rows(source) if base.endswith((".jsonl", ".json"))
                else _read_parquet_rows(source) if source.endswith(".parquet") else None)
    else:
        rows = None  # a hub id or an unsupported path: load_preference_dataset says what is wrong
    if not rows or not isinstance(rows[0], dict) or not is_unpaired(rows[0]):
        return load_preference_dataset(source, split=split, format=format, skip_malformed=skip_malformed)
    if format not in ("auto", "trl"):
        raise ValueError(f"format {format!r} is a paired format; {source} holds unpaired prompt/completion/label rows")
    keep, skipped = [], []
    for i, row in enumerate(rows):
        problem = str(row) if isinstance(row, Exception) else None
        if problem is None:
            if "prompt" not in row or "completion" not in row:
                problem = "missing field 'prompt' or 'completion'"
            elif not isinstance(row.get("label"), bool):
                problem = f"field 'label' must be true or false, got {row.get('label')!r}"
        if problem is not None:
            if not skip_malformed:
                raise MalformedRowError(i, problem)
            skipped.append(i)
            continue
        keep.append(row)
    if skipped:
        _log.warning("load_unpaired_dataset(%s): skipped %d malformed row(s) (first: %s)", source, len(skipped),
                     skipped[:10])
    columns = ["prompt", "completion", "label"] + [k for k in ("tools", "chat_template_kwargs")
                                                   if any(k in r for r in keep)]
    return datasets.Dataset.from_dict({k: [r.get(k) for r in keep] for k in columns})
