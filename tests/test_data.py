"""fasttrdpo.data: format detection and conversion, malformed rows, the synthetic task, collation."""
import gzip
import json
import os

import pytest
import torch

from fasttrdpo.data import (MalformedRowError, PreferenceCollator, TokenizedPair, load_preference_dataset,
                            synthetic_preference_dataset, tokenize_pair)
from fasttrdpo.tiny import tiny_tokenizer

HH_TEST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf",
                       "harmless-base-test.jsonl.gz")
HH_TEST = os.path.normpath(os.environ.get("FASTTRDPO_HH_TEST", HH_TEST))


def _write_jsonl(path, rows, lines=None):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in lines or []:
            f.write(line + "\n")
    return str(path)


# --- Anthropic-HH -------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(HH_TEST), reason="HH test file not present")
def test_hh_harmless_test_split_reconstructs_every_transcript_exactly():
    ds = load_preference_dataset(HH_TEST)
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    assert len(raw) == 2312 and len(ds) == 2312
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    for i, (row, conv) in enumerate(zip(raw, ds)):
        assert conv["prompt"] + conv["chosen"] == row["chosen"], i
        assert conv["prompt"] + conv["rejected"] == row["rejected"], i
        assert conv["prompt"].endswith("\n\nAssistant:"), i
        # the prompt is the longest shared prefix cut back to an assistant turn: nothing shared is left
        # in the completions beyond the text of that final turn
        assert conv["chosen"] != conv["rejected"], i


def test_hh_prompt_is_cut_at_the_last_shared_assistant_turn(tmp_path):
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    rows = [{"chosen": shared + " Same start, good.", "rejected": shared + " Same start, bad."},
            # transcripts that already diverge in an earlier assistant turn
            {"chosen": "\n\nHuman: q\n\nAssistant: A\n\nHuman: r\n\nAssistant: x",
             "rejected": "\n\nHuman: q\n\nAssistant: B\n\nHuman: r\n\nAssistant: y"}]
    ds = load_preference_dataset(_write_jsonl(tmp_path / "hh.jsonl", rows))
    assert ds[0] == {"prompt": shared, "chosen": " Same start, good.", "rejected": " Same start, bad."}
    assert ds[1]["prompt"] == "\n\nHuman: q\n\nAssistant:"
    assert ds[1]["chosen"] == " A\n\nHuman: r\n\nAssistant: x"


# --- TRL and TL;DR ------------------------------------------------------------------------------------

TRL_ROWS = [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(5)]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.json.gz", "d.parquet"])
def test_trl_format_from_every_file_type(tmp_path, name):
    path = str(tmp_path / name)
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(TRL_ROWS), path)
    elif ".json." in name or name.endswith(".json"):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            json.dump(TRL_ROWS, f)
    else:
        _write_jsonl(path, TRL_ROWS)
    ds = load_preference_dataset(path)
    assert ds.to_list() == TRL_ROWS


def test_tldr_comparisons(tmp_path):
    rows = [
        {"info": {"id": "a", "post": "My cat ate my homework.", "title": "Cat", "subreddit": "pets"},
         "summaries": [{"text": " cat ate homework", "policy": "x"}, {"text": "dog did it", "policy": "y"}],
         "choice": 0},
        {"info": {"id": "b", "post": "Long post."}, "summaries": [{"text": " first"}, {"text": " second"}],
         "choice": 1},
    ]
    ds = load_preference_dataset(_write_jsonl(tmp_path / "tldr.jsonl", rows))
    assert ds[0] == {"prompt": "SUBREDDIT: r/pets\n\nTITLE: Cat\n\nPOST: My cat ate my homework.\n\nTL;DR:",
                     "chosen": " cat ate homework", "rejected": " dog did it"}  # a space is added after "TL;DR:"
    assert ds[1] == {"prompt": "POST: Long post.\n\nTL;DR:", "chosen": " second", "rejected": " first"}


# --- malformed rows -----------------------------------------------------------------------------------

def test_malformed_trl_row_names_its_index(tmp_path):
    rows = TRL_ROWS[:2] + [{"prompt": "x", "chosen": "y"}] + TRL_ROWS[2:]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MalformedRowError, match=r"row 2: missing field 'rejected'") as info:
        load_preference_dataset(path)
    assert info.value.row_index == 2
    ds, skipped = load_preference_dataset(path, skip_malformed=True, return_skipped=True)
    assert skipped == [2] and ds.to_list() == TRL_ROWS


def test_invalid_json_line_and_wrong_types_name_their_index(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", TRL_ROWS[:3], lines=['{"prompt": "x", "chosen": '])
    with pytest.raises(MalformedRowError, match=r"row 3: invalid JSON"):
        load_preference_dataset(path)
    path = _write_jsonl(tmp_path / "types.jsonl", TRL_ROWS[:1] + [{"prompt": "p", "chosen": 3, "rejected": "r"}])
    with pytest.raises(MalformedRowError, match=r"row 1: field 'chosen' must be a string"):
        load_preference_dataset(path)


def test_malformed_hh_and_tldr_rows(tmp_path):
    hh = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
          {"chosen": "no turns here", "rejected": "none here either"}]
    with pytest.raises(MalformedRowError, match=r"row 1: .*Assistant"):
        load_preference_dataset(_write_jsonl(tmp_path / "hh.jsonl", hh))
    tldr = [{"info": {"post": "p"}, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0},
            {"info": {"post": "p"}, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 2}]
    with pytest.raises(MalformedRowError, match=r"row 1: field 'choice' must be 0 or 1"):
        load_preference_dataset(_write_jsonl(tmp_path / "tldr.jsonl", tldr))
    ds, skipped = load_preference_dataset(str(tmp_path / "tldr.jsonl"), skip_malformed=True, return_skipped=True)
    assert len(ds) == 1 and skipped == [1]


def test_unknown_format_and_bad_sources(tmp_path):
    with pytest.raises(MalformedRowError, match=r"row 0: unknown preference format"):
        load_preference_dataset(_write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}]))
    with pytest.raises(FileNotFoundError):
        load_preference_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_preference_dataset(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="format must be one of"):
        load_preference_dataset(_write_jsonl(tmp_path / "y.jsonl", TRL_ROWS), format="csv")


# --- synthetic task -----------------------------------------------------------------------------------

def test_synthetic_task_ground_truth():
    ds = synthetic_preference_dataset(300, seed=3)
    assert ds.to_list() == synthetic_preference_dataset(300, seed=3).to_list()
    assert ds.to_list() != synthetic_preference_dataset(300, seed=4).to_list()
    for row in ds:
        word = row["prompt"][:-1]
        assert row["prompt"].endswith("=") and word.isalpha() and len(set(word)) == len(word)
        assert row["chosen"] == word[::-1]
        diffs = sum(a != b for a, b in zip(row["chosen"], row["rejected"]))
        assert len(row["rejected"]) == len(row["chosen"]) and 1 <= diffs <= 2
        assert any(a == b for a, b in zip(row["rejected"], row["rejected"][1:]))  # a stutter


# --- tokenization and collation -----------------------------------------------------------------------

def test_collation_layout_and_shifted_labels():
    tok = tiny_tokenizer()
    pairs = [tokenize_pair(tok, "abc=", "cba", "cca", max_length=32),
             tokenize_pair(tok, "hello=", "ol", "oooo", max_length=32)]
    enc = lambda s: [b + 3 for b in s.encode()]  # ByT5: byte + 3; EOS = 1, pad = 0
    assert pairs[0] == TokenizedPair(enc("abc="), enc("cba") + [1], enc("cca") + [1])
    batch = PreferenceCollator(tok.pad_token_id)(pairs)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape == (4, 11)
    # rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    expect_rows = [enc("abc=cba") + [1], enc("hello=ol") + [1], enc("abc=cca") + [1], enc("hello=oooo") + [1]]
    prompt_lens = [4, 6, 4, 6]
    for r, (row, plen) in enumerate(zip(expect_rows, prompt_lens)):
        L = len(row)
        assert ids[r, :L].tolist() == row and (ids[r, L:] == 0).all()
        assert mask[r, :L].all() and not mask[r, L:].any()
        expected = [-100] * 11
        for t in range(plen - 1, L - 1):  # position t predicts token t+1, completion tokens only
            expected[t] = row[t + 1]
        assert labels[r].tolist() == expected


def test_truncation_keeps_the_end_of_the_prompt():
    tok = tiny_tokenizer()
    long_prompt = "".join(chr(ord("a") + i % 26) for i in range(40)) + "="
    p = tokenize_pair(tok, long_prompt, "xyz", "xy", max_length=16)
    assert p.prompt == tok(long_prompt[-12:], add_special_tokens=False)["input_ids"]  # 16 - (3 + EOS)
    assert p.chosen[-1] == tok.eos_token_id and len(p.prompt) + len(p.chosen) == 16
    # completions longer than what is left after max_prompt_length: they keep their start, lose EOS
    q = tokenize_pair(tok, long_prompt, "k" * 30, "j", max_length=16, max_prompt_length=6)
    assert len(q.prompt) == 6 and q.chosen == tok("k" * 10, add_special_tokens=False)["input_ids"]
    assert q.rejected == tok("j", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = PreferenceCollator(0)([q])
    assert batch["input_ids"].shape == (2, 16)
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pair(tok, "a", "b", "c", max_length=8, max_prompt_length=8)


def test_collator_rejects_bad_input():
    with pytest.raises(ValueError, match="pad_token_id"):
        PreferenceCollator(None)
    with pytest.raises(ValueError, match="empty batch"):
        PreferenceCollator(0)([])
    batch = PreferenceCollator(0, pad_to_multiple_of=8)([TokenizedPair([5], [6, 1], [7, 1])])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0, :3].tolist() == [6, 1, -100]
    assert torch.equal(batch["labels"][1, :2], torch.tensor([7, 1]))
