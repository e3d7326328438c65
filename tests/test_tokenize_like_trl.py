"""fasttrdpo.data tokenization against TRL 1.16's own DPOTrainer processing of the same rows.

TRL's side is its real code: `DPOTrainer._prepare_dataset` (EOS as text, tokenize with special tokens,
split at the common prefix, drop rows whose prompt fills max_length) and `DataCollatorForPreference`
(per-sequence keep_start truncation). Tokenizers are built in-process (no download): a byte-level BPE that
adds a BOS (Llama-style), the same without special tokens (GPT-2-style), and ByT5 (T5-style, appends its
EOS itself). The rows include a BPE merge across the prompt/completion boundary, an empty prompt, a
completion that already ends with EOS, and non-ASCII text.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from fasttrdpo.data import tokenize_dataset, tokenize_pair  # noqa: E402
from fasttrdpo.tiny import tiny_tokenizer  # noqa: E402

ROWS = [
    {"prompt": "Question: what is the sky? Answer:", "chosen": " blue.", "rejected": " green, said the sky!"},
    # "hel" + "lo" merges into "Ġhello" across the boundary, and "hel" + "p" into "help": the prompt's last
    # token belongs to the completions (TRL cuts the prompt where the tokenizations diverge)
    {"prompt": "Say hel", "chosen": "lo world", "rejected": "p me"},
    {"prompt": "", "chosen": "hello there", "rejected": "help"},
    {"prompt": "Say ", "chosen": "ok</s>", "rejected": "no"},  # already ends with EOS: not appended twice
    {"prompt": "Café ☕ says:", "chosen": " très bien", "rejected": " ☕☕"},
]
LONG_PROMPT = "Question: " + " ".join(["what is the sky and why is it blue"] * 6) + "? Answer:"


def _bpe(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Say hello world", "hello there", "help me please", "Question: what is the sky? Answer: blue."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module", params=["bpe_bos", "bpe_plain", "byt5"])
def case(request):
    """(name, tokenizer): "bpe_bos" adds a BOS, "bpe_plain" adds nothing, "byt5" appends its EOS itself."""
    return request.param, {"bpe_bos": lambda: _bpe(True), "bpe_plain": lambda: _bpe(False),
                           "byt5": tiny_tokenizer}[request.param]()


def _trl_rows(tok, rows, max_length=None, truncation_mode="keep_start"):
    """TRL's DPOTrainer dataset processing (its own method, on a bare trainer namespace)."""
    args = DPOConfig(output_dir="unused", max_length=max_length, truncation_mode=truncation_mode, report_to=[],
                     use_cpu=True, dataset_num_proc=None)
    return list(DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), Dataset.from_list(rows), tok, args,
                                            "train"))


def _fit(pair):
    return pair.prompt, pair.chosen, pair.rejected


def test_rows_that_fit_get_trls_token_ids(case):
    name, tok = case
    expected = _trl_rows(tok, ROWS)
    assert len(expected) == len(ROWS)
    ours = [tokenize_pair(tok, r["prompt"], r["chosen"], r["rejected"], max_length=1024) for r in ROWS]
    for i, (pair, trl) in enumerate(zip(ours, expected)):
        assert _fit(pair) == (trl["prompt_ids"], trl["chosen_ids"], trl["rejected_ids"]), i
    assert [_fit(p) for p in tokenize_dataset(Dataset.from_list(ROWS), tok, max_length=1024)] == [_fit(p) for p in ours]
    # the cases are what they claim to be
    for pair in ours:
        assert pair.chosen[-1] == pair.rejected[-1] == tok.eos_token_id
    assert ours[3].chosen.count(tok.eos_token_id) == 1
    if name == "bpe_bos":  # every sequence starts with the BOS (before: never)
        assert all(pair.prompt[:1] == [tok.bos_token_id] for pair in ours)
    else:
        assert all(tok.bos_token_id not in pair.prompt for pair in ours)
    if name.startswith("bpe"):
        merged = tok(text="Say hel")["input_ids"]
        assert len(ours[1].prompt) < len(merged)  # the boundary merge happened: the prompt lost its last token
        assert ours[1].prompt + ours[1].chosen == tok(text="Say hello world</s>")["input_ids"]
        assert ours[1].prompt + ours[1].rejected == tok(text="Say help me</s>")["input_ids"]


def test_keep_start_truncation_matches_trls_collator(case):
    """truncation_mode="keep_start" is TRL's: each sequence keeps its first max_length tokens, and rows whose
    prompt alone fills max_length are dropped (TRL filters them out)."""
    _, tok = case
    rows = ROWS + [{"prompt": LONG_PROMPT, "chosen": " blue", "rejected": " red"},
                   {"prompt": "Say", "chosen": " hello world " * 8, "rejected": " help"}]
    L = 12
    trl_rows = _trl_rows(tok, rows, max_length=L)
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=L)(trl_rows)
    n = len(trl_rows)
    pairs = tokenize_dataset(Dataset.from_list(rows), tok, max_length=L, truncation_mode="keep_start")
    assert len(pairs) == n < len(rows)  # the long prompt's row is dropped by both
    for i, pair in enumerate(pairs):
        for j, completion in ((i, pair.chosen), (n + i, pair.rejected)):
            keep = batch["attention_mask"][j].bool()
            assert batch["input_ids"][j][keep].tolist() == pair.prompt + completion, (i, j)
            assert batch["completion_mask"][j][keep].tolist() == [0] * len(pair.prompt) + [1] * len(completion)
    assert any(len(p.prompt) + len(p.chosen) == L for p in pairs)  # something was actually cut
    long = rows[-2]
    with pytest.raises(ValueError, match="keep_start"):
        tokenize_pair(tok, long["prompt"], long["chosen"], long["rejected"], max_length=L, truncation_mode="keep_start")


def test_default_truncation_keeps_prompt_end_bos_and_every_completion(case, caplog):
    """The default ("keep_prompt_end", as documented before): the prompt keeps its end (and its BOS),
    down to max(max_length - longer completion, max_length // 2) tokens, completions keep their start;
    no row is dropped. Expected ids are built from TRL's untruncated tokenization."""
    name, tok = case
    rows = [{"prompt": LONG_PROMPT, "chosen": " blue", "rejected": " a red and green sky"},
            {"prompt": "Say", "chosen": " hello world " * 8, "rejected": " help"},
            {"prompt": LONG_PROMPT, "chosen": " hello world " * 8, "rejected": " help"}]
    L = 16
    full = _trl_rows(tok, rows)
    with caplog.at_level(logging.WARNING, logger="fasttrdpo"):
        pairs = tokenize_dataset(Dataset.from_list(rows), tok, max_length=L)
    assert len(pairs) == len(rows) and not caplog.records
    lead = 1 if name == "bpe_bos" else 0
    for row, trl, pair in zip(rows, full, pairs):
        P, C, R = trl["prompt_ids"], trl["chosen_ids"], trl["rejected_ids"]
        assert len(P) + max(len(C), len(R)) > L  # every row needs truncating
        keep = min(len(P), max(L - max(len(C), len(R)), L // 2))
        assert pair.prompt == P[:lead] + P[len(P) - (keep - lead):]
        assert pair.chosen == C[:L - keep] and pair.rejected == R[:L - keep]
        assert pair.chosen and pair.rejected and len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) <= L
        assert tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"], max_length=L) == pair
    if lead:
        assert all(p.prompt[0] == tok.bos_token_id for p in pairs)
    # max_prompt_length belongs to this mode only
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pair(tok, "a", "b", "c", max_length=8, max_prompt_length=4, truncation_mode="keep_start")
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_pair(tok, "a", "b", "c", max_length=8, truncation_mode="keep_end")
