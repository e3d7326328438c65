"""Anthropic-HH pairs, a BPE trained on them, and how many tokens a backbone computes per layout.

    .venv/bin/python benchmarks/hh_tokens.py      # the counts of issue 15 (2,308 pairs, max length 512, 8 pairs a batch)

The pairs are read at run time from ../shared/data/hh-rlhf (never copied into the repository); a pair is the
two transcripts split by `fasttrdpo.data.split_hh_transcripts`, and the 4 pairs of the file whose chosen or
rejected completion is only whitespace are dropped (nothing to score): 2,312 rows -> 2,308 pairs.

The tokenizer, named `HH_BPE_NAME` in every output, is a byte-level BPE (Hugging Face `tokenizers`, in-process,
no download) trained on the file's chosen and rejected transcripts in file order: the same file gives the same
vocabulary and merges in every process (tests/test_bench_hh.py checks two trainings agree). Its one special
token `<|endoftext|>` is the EOS (appended to each completion as TRL does) and the padding.

Backbone tokens of one batch of pairs, lengths (prompt p, chosen c, rejected r) after truncation:
  padded  2B x T with T = max over the batch of p + max(c, r)  (chosen and rejected rows padded to one width,
          what `PreferenceCollator` builds and TRL's DPOTrainer pads alike)
  packed  sum of 2p + c + r                                   (every row's own tokens, no padding)
  shared  sum of p + c + r                                    (prompt || chosen || rejected: the prompt once)
"Tokens" in the throughput figures are counted as the e2e case counts them since issue 6: the non-pad tokens of
the chosen and rejected rows, the prompt counted in each = the packed count, whatever layout computed them.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from typing import Iterable, Sequence

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
EOS = "<|endoftext|>"
HH_BPE_VOCAB = 4096


def hh_bpe_name(vocab_size: int = HH_BPE_VOCAB, path: str = DATA) -> str:
    return (f"hh-bpe-{vocab_size}: byte-level BPE (tokenizers), vocab {vocab_size} incl. {EOS} (EOS = pad), "
            f"trained in-process on the chosen+rejected transcripts of {os.path.basename(path)}")


def read_hh_rows(path: str = DATA) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hh_pairs(path: str = DATA) -> tuple[list[dict], int]:
    """(pairs as prompt/chosen/rejected text, number of rows dropped for a whitespace-only completion)."""
    from fasttrdpo.data import split_hh_transcripts

    pairs, dropped = [], 0
    for row in read_hh_rows(path):
        prompt, chosen, rejected = split_hh_transcripts(row["chosen"], row["rejected"])
        if not chosen.strip() or not rejected.strip():
            dropped += 1
            continue
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs, dropped


def train_bpe(texts: Iterable[str], vocab_size: int = HH_BPE_VOCAB):
    """A byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer (EOS = pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.padding_side = "right"
    return fast


def tokenizer_fingerprint(tok) -> str:
    """sha256 (first 16 hex digits) of the tokenizer's serialized vocabulary, merges and settings."""
    import hashlib

    return hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _hh_bpe_json(vocab_size: int, path: str) -> str:
    texts = []
    for row in read_hh_rows(path):
        texts += [row["chosen"], row["rejected"]]
    return train_bpe(texts, vocab_size).backend_tokenizer.to_str()


def hh_bpe_tokenizer(vocab_size: int = HH_BPE_VOCAB, path: str = DATA):
    """The BPE of `hh_bpe_name`, trained on the HH file's transcripts (about a second; once per process)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_hh_bpe_json(vocab_size, path)),
                                   eos_token=EOS, pad_token=EOS)
    fast.padding_side = "right"
    return fast


def pair_lengths(tokenized_pairs) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of `fasttrdpo.data.TokenizedPair`s."""
    return [(len(p.prompt), len(p.chosen), len(p.rejected)) for p in tokenized_pairs]


def backbone_tokens(lengths: Sequence[tuple[int, int, int]], pairs_per_batch: int) -> dict:
    """Tokens a backbone computes over `lengths` (in batch order, consecutive batches of `pairs_per_batch`
    pairs, the last one possibly shorter) padded, packed and with shared prompts (see the module doc)."""
    if pairs_per_batch < 1:
        raise ValueError(f"pairs_per_batch must be >= 1, got {pairs_per_batch}")
    padded = packed = shared = 0
    for i in range(0, len(lengths), pairs_per_batch):
        batch = lengths[i:i + pairs_per_batch]
        width = max(p + max(c, r) for p, c, r in batch)
        padded += 2 * len(batch) * width
        packed += sum(2 * p + c + r for p, c, r in batch)
        shared += sum(p + c + r for p, c, r in batch)
    n = len(lengths)
    return {"pairs": n, "pairs_per_batch": pairs_per_batch, "batches": -(-n // pairs_per_batch),
            "padded": padded, "packed": packed, "shared": shared,
            "padded_over_packed": padded / packed if packed else None,
            "padded_over_shared": padded / shared if shared else None,
            "fraction_saved_packed": 1 - packed / padded if padded else None,
            "fraction_saved_shared": 1 - shared / padded if padded else None,
            "mean_prompt": sum(x[0] for x in lengths) / n if n else None,
            "mean_chosen": sum(x[1] for x in lengths) / n if n else None,
            "mean_rejected": sum(x[2] for x in lengths) / n if n else None}


def hh_token_counts(*, max_length: int = 512, pairs_per_batch: int = 8, seed: int = 42,
                    vocab_size: int = HH_BPE_VOCAB, truncation_mode: str = "keep_prompt_end", path: str = DATA) -> dict:
    """Issue 15's figures: every usable pair of the file tokenized as the trainer tokenizes it
    (`fasttrdpo.data.tokenize_dataset`, TRL's tokenization, then truncation to max_length), batched in the
    trainer's first-epoch order (`torch.randperm(n, generator=manual_seed(seed))`, TRDPOConfig's default
    seed 42) and in file order."""
    import datasets
    import torch

    from fasttrdpo.data import tokenize_dataset

    pairs, dropped = hh_pairs(path)
    tok = hh_bpe_tokenizer(vocab_size, path)
    tokenized = tokenize_dataset(datasets.Dataset.from_list(pairs), tok, max_length=max_length,
                                 truncation_mode=truncation_mode)
    lengths = pair_lengths(tokenized)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    planned = None
    try:  # the trainer's own packing plan (issue 15): bins of <= max_length, and their padding in the mask layout
        from fasttrdpo.training.packing import count_backbone_tokens
    except ImportError:
        count_backbone_tokens = None
    if count_backbone_tokens is not None:
        batches = [[tokenized[i] for i in order[k:k + pairs_per_batch]] for k in range(0, len(order), pairs_per_batch)]
        planned = count_backbone_tokens(batches, max_length).as_dict()
    return {"trainer_plan": planned,"tokenizer": hh_bpe_name(vocab_size, path), "tokenizer_sha256_16": tokenizer_fingerprint(tok),
            "data": os.path.basename(path), "rows_dropped": dropped,
            "max_length": max_length, "truncation_mode": truncation_mode, "seed": seed,
            "trainer_order": backbone_tokens([lengths[i] for i in order], pairs_per_batch),
            "file_order": backbone_tokens(lengths, pairs_per_batch)}


def format_counts(counts: dict) -> str:
    lines = [f"tokenizer: {counts['tokenizer']} (sha256 {counts['tokenizer_sha256_16']})",
             f"max_length {counts['max_length']} ({counts['truncation_mode']}), {counts['rows_dropped']} row(s) "
             "dropped for a whitespace-only completion"]
    for key, what in (("trainer_order", f"trainer order (randperm seed {counts['seed']})"), ("file_order", "file order")):
        c = counts[key]
        lines.append(f"{what}: {c['pairs']} pairs, {c['pairs_per_batch']} a batch ({c['batches']} batches): backbone "
                     f"tokens padded {c['padded'] / 1e6:.3f} M, packed {c['packed'] / 1e6:.3f} M "
                     f"({c['padded_over_packed']:.2f}x fewer, {c['fraction_saved_packed']:.1%} saved), shared prompts "
                     f"{c['shared'] / 1e6:.3f} M ({c['padded_over_shared']:.2f}x fewer, "
                     f"{c['fraction_saved_shared']:.1%} saved); mean prompt {c['mean_prompt']:.1f}, chosen "
                     f"{c['mean_chosen']:.1f}, rejected {c['mean_rejected']:.1f} tokens")
    plan = counts.get("trainer_plan")
    if plan:
        lines.append(f"trainer's packing plan (fasttrdpo.training.packing, trainer order): padded {plan['padded'] / 1e6:.3f} M,"
                     f" packed {plan['packed'] / 1e6:.3f} M ({plan['packed_computed'] / 1e6:.3f} M with each batch's bins "
                     f"padded to its widest), shared {plan['shared'] / 1e6:.3f} M ({plan['shared_computed'] / 1e6:.3f} M "
                     f"padded; {plan['unshared_pairs']} pair(s) whose prompt+chosen+rejected exceeds max_length run as "
                     "two rows)")
    return "\n".join(lines)
