"""Conversational preference data (TRL's message-list format) against TRL 1.16's own processing of the same rows.

TRL's side is its real code: `DPOTrainer._prepare_dataset` (extract the prompt of full conversations, render
prompt / prompt + chosen / prompt + rejected with the chat template, split at the common prefix, no EOS added)
and `DataCollatorForPreference` (keep_start truncation); `maybe_extract_prompt` for a text prompt beside full
conversations. Tokenizers are the in-process ones of test_tokenize_like_trl (a byte-level BPE adding a BOS, the
same without it, ByT5) given small Jinja chat templates in-process:
  - "plain": BOS as text, one line per turn, a generation prompt that is a prefix of the finished turn;
  - "think": the generation prompt adds an empty thought block that a finished turn does not have (as Gemma's
    does), so the prompt alone is NOT a prefix of prompt + completion and the split must follow TRL's cut;
    it also reads a `chat_template_kwargs` variable (`system_note`).
"""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from test_tokenize_like_trl import _bpe  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.data_utils import extract_prompt, maybe_extract_prompt  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from fasttrdpo.data import (MalformedRowError, extract_conversation_prompt, load_preference_dataset,  # noqa: E402
                            tokenize_dataset, tokenize_pair)
from fasttrdpo.tiny import tiny_tokenizer  # noqa: E402

TEMPLATES = {
    "plain": ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
              "{% if add_generation_prompt %}[assistant] {% endif %}"),
    "think": ("{% if system_note is defined %}<<{{ system_note }}>>{% endif %}"
              "{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' %}<think></think>{% endif %}"
              "{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
              "{% if add_generation_prompt %}<assistant><think>\n\n</think>{% endif %}"),
}


def _m(role, content):
    return {"role": role, "content": content}


EXPLICIT = [
    {"prompt": [_m("user", "What is the sky?")], "chosen": [_m("assistant", "Blue.")],
     "rejected": [_m("assistant", "Green, said the sky!")]},
    {"prompt": [_m("system", "Be brief."), _m("user", "Say hello"), _m("assistant", "hello"), _m("user", "again")],
     "chosen": [_m("assistant", "hello world")], "rejected": [_m("assistant", "help me")]},
    {"prompt": [_m("user", "Café ☕?")], "chosen": [_m("assistant", "très bien")], "rejected": [_m("assistant", "☕☕")]},
]
# implicit prompt: chosen/rejected are whole conversations sharing their leading messages
IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in EXPLICIT]


@pytest.fixture(scope="module", params=[("bpe_bos", "plain"), ("bpe_plain", "think"), ("byt5", "plain"),
                                        ("byt5", "think")], ids=lambda p: "-".join(p))
def case(request):
    """(tokenizer name, template name, tokenizer with that chat template)."""
    name, template = request.param
    tok = {"bpe_bos": lambda: _bpe(True), "bpe_plain": lambda: _bpe(False), "byt5": tiny_tokenizer}[name]()
    tok.chat_template = TEMPLATES[template]
    return name, template, tok


def _trl_rows(tok, rows, max_length=None, truncation_mode="keep_start"):
    """TRL's DPOTrainer dataset processing (its own method, on a bare trainer namespace)."""
    args = DPOConfig(output_dir="unused", max_length=max_length, truncation_mode=truncation_mode, report_to=[],
                     use_cpu=True, dataset_num_proc=None)
    return list(DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), Dataset.from_list(rows), tok, args,
                                            "train"))


def _ids(pairs):
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


def _trl_ids(rows):
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]


@pytest.mark.parametrize("layout", ["explicit", "implicit"])
def test_conversational_rows_get_trls_token_ids(case, layout):
    name, template, tok = case
    rows = EXPLICIT if layout == "explicit" else IMPLICIT
    expected = _trl_ids(_trl_rows(tok, rows))
    assert len(expected) == len(rows)
    assert _ids(tokenize_dataset(Dataset.from_list(rows), tok, max_length=1024)) == expected
    for row, trl in zip(rows, expected):
        pair = tokenize_pair(tok, row.get("prompt"), row["chosen"], row["rejected"], max_length=1024)
        assert (pair.prompt, pair.chosen, pair.rejected) == trl
    # the cases are what they claim: the template's text is in the ids, no EOS was appended to a "think" turn
    p, c, _ = expected[0]
    if template == "plain":
        assert tok.decode(p + c).rstrip("\n").endswith("Blue." + tok.eos_token)
        if name == "bpe_bos":
            assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1  # the BOS of the template only
    else:
        assert tok.decode(p + c, skip_special_tokens=True).endswith("Blue.</assistant>")
        assert tok.eos_token_id not in c
        # the generation prompt's "<think>\n\n</think>" is not in prompt + completion: TRL's cut drops it
        gen = tok.apply_chat_template(rows[0]["prompt"] if layout == "explicit" else rows[0]["chosen"][:1],
                                      tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
        assert len(p) < len(gen) and gen[:len(p)] == p


def test_keep_start_truncation_and_template_kwargs_match_trl(case):
    """Per-row `chat_template_kwargs` and keep_start truncation (TRL's collator), conversational rows."""
    _, template, tok = case
    rows = [dict(r, chat_template_kwargs={"system_note": f"note {i}"}) for i, r in enumerate(EXPLICIT)]
    rows.append({"prompt": [_m("user", "why is the sky blue " * 12)], "chosen": [_m("assistant", "x")],
                 "rejected": [_m("assistant", "y")], "chat_template_kwargs": {"system_note": "long"}})
    full = _trl_rows(tok, rows)
    if template == "think":  # the kwarg reached the template, on both sides
        assert tok.decode(full[0]["prompt_ids"]).startswith("<<note 0>>")
    # room for every short prompt plus 2 completion tokens (so completions get cut), not for the long prompt
    L = max(len(r["prompt_ids"]) for r in full[:-1]) + 2
    assert len(full[-1]["prompt_ids"]) >= L
    trl_rows = _trl_rows(tok, rows, max_length=L)
    assert len(trl_rows) < len(rows)  # the long prompt fills max_length: TRL drops it
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=L)(trl_rows)
    pairs = tokenize_dataset(Dataset.from_list(rows), tok, max_length=L, truncation_mode="keep_start")
    n = len(trl_rows)
    assert len(pairs) == n
    for i, pair in enumerate(pairs):
        for j, completion in ((i, pair.chosen), (n + i, pair.rejected)):
            keep = batch["attention_mask"][j].bool()
            assert batch["input_ids"][j][keep].tolist() == pair.prompt + completion, (i, j)
    assert any(len(p.prompt) + len(p.chosen) == L for p in pairs)  # something was cut


def test_load_conversational_files(tmp_path, case, caplog):
    """load_preference_dataset keeps message lists (explicit and implicit prompt, and a text prompt beside full
    conversations, which TRL's maybe_extract_prompt ignores); the tokens equal TRL's."""
    _, _, tok = case
    for name, rows in (("explicit", EXPLICIT), ("implicit", IMPLICIT)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        ds = load_preference_dataset(str(path))
        assert ds.column_names == ["prompt", "chosen", "rejected"]
        assert [ds[i]["prompt"] for i in range(len(rows))] == [r["prompt"] for r in EXPLICIT]
        assert _ids(tokenize_dataset(ds, tok, max_length=1024)) == _trl_ids(_trl_rows(tok, EXPLICIT))
    text_prompt = [dict(r, prompt=e["prompt"][-1]["content"]) for r, e in zip(IMPLICIT, EXPLICIT)]
    path = tmp_path / "text_prompt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in text_prompt))
    with caplog.at_level(logging.WARNING, logger="fasttrdpo"):
        ds = load_preference_dataset(str(path))
    assert "maybe_extract_prompt" in caplog.text
    expected = [maybe_extract_prompt(r)["prompt"] for r in text_prompt]
    assert [ds[i]["prompt"] for i in range(len(text_prompt))] == expected
    assert _ids(tokenize_dataset(ds, tok, max_length=1024)) == _trl_ids(_trl_rows(tok, EXPLICIT))


def test_prompt_extraction_is_trls():
    cases = [(r["chosen"], r["rejected"]) for r in IMPLICIT]
    conv = IMPLICIT[1]["chosen"]
    cases += [(conv, conv),                       # identical: TRL keeps all but the last message as the prompt
              (conv[:3], conv),                   # one a prefix of the other
              (conv, conv[:2] + [_m("assistant", "other"), _m("user", "x")])]  # differing mid-conversation
    for chosen, rejected in cases:
        trl = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert extract_conversation_prompt(chosen, rejected) == (trl["prompt"], trl["chosen"], trl["rejected"])
    with pytest.raises(ValueError, match="first message"):
        extract_conversation_prompt([_m("user", "a")], [_m("user", "b")])


def test_bad_conversational_input_is_named(tmp_path):
    tok = tiny_tokenizer()  # ByT5 has no chat template
    row = EXPLICIT[0]
    with pytest.raises(ValueError, match="chat template") as err:
        tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"], max_length=64)
    assert "ByT5Tokenizer" in str(err.value)
    with pytest.raises(MalformedRowError, match="row 0: .*chat template"):
        tokenize_dataset(Dataset.from_list(EXPLICIT), tok, max_length=64)
    tok.chat_template = TEMPLATES["plain"]
    with pytest.raises(ValueError, match="add_eos"):
        tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"], max_length=64, add_eos=True)
    with pytest.raises(ValueError, match="'chosen'.*list of messages"):
        tokenize_pair(tok, row["prompt"], "Blue.", row["rejected"], max_length=64)
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        tokenize_pair(tok, "a", "b", "c", max_length=64, chat_template_kwargs={"x": 1})
    # a file mixing text and conversational rows: the odd row is named
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(EXPLICIT[0]) + "\n" + json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    with pytest.raises(MalformedRowError, match="row 1: a plain-text row among conversational rows") as err:
        load_preference_dataset(str(path))
    assert err.value.row_index == 1
    ds, skipped = load_preference_dataset(str(path), skip_malformed=True, return_skipped=True)
    assert skipped == [1] and len(ds) == 1
    path.write_text(json.dumps({"prompt": [], "chosen": row["chosen"], "rejected": row["rejected"]}) + "\n")
    with pytest.raises(MalformedRowError, match="row 0: field 'prompt' must be a non-empty list of messages"):
        load_preference_dataset(str(path))


def test_default_truncation_keeps_template_bos_and_prompt_end(case):
    """keep_prompt_end (the default) on a conversational row: the prompt keeps the template's BOS and its end,
    the completions their start; built from TRL's untruncated ids."""
    name, _, tok = case
    row = {"prompt": [_m("user", "why is the sky blue " * 12)], "chosen": [_m("assistant", "blue " * 12)],
           "rejected": [_m("assistant", "red")]}
    P, C, R = _trl_ids(_trl_rows(tok, [row]))[0]
    L = 32
    assert len(P) + max(len(C), len(R)) > L
    pair = tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"], max_length=L)
    lead = 1 if name == "bpe_bos" else 0
    keep = min(len(P), max(L - max(len(C), len(R)), L // 2))
    assert pair.prompt == P[:lead] + P[len(P) - (keep - lead):]
    assert pair.chosen == C[:L - keep] and pair.rejected == R[:L - keep]
    if lead:
        assert pair.prompt[0] == tok.bos_token_id


def test_trdpo_trainer_takes_conversational_rows(tmp_path):
    """TRDPOTrainer tokenizes conversational rows through tokenize_dataset unchanged: its pairs are TRL's ids."""
    from fasttrdpo.tiny import tiny_model
    from fasttrdpo.trainer import TRDPOConfig, TRDPOTrainer

    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATES["think"]
    cfg = TRDPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, max_length=256)
    trainer = TRDPOTrainer(tiny_model(0, hidden_size=32, num_hidden_layers=1, num_attention_heads=4), tok,
                           IMPLICIT, cfg)
    assert _ids(trainer.train_pairs) == _trl_ids(_trl_rows(tok, IMPLICIT))
