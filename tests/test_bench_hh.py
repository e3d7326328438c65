"""Issue 15 item 5: the HH token counts of benchmarks/_hh.py and a smoke run of the e2e_hh benchmark case.

Counting is checked against a hand-computed toy example and against the tensors `PreferenceCollator`
actually builds (batch width x rows = padded, attention-mask sum = packed); on the HH file (when
../shared/data is present) the counts are printed and compared with the issue's figures. No timing is
asserted anywhere (speed is the benchmark's business).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import _hh  # noqa: E402

HAVE_HH = os.path.exists(_hh.DATA)


def test_backbone_tokens_hand_computed():
    # (prompt, chosen, rejected) lengths, 2 pairs a batch:
    #   batch 1: widths 3+max(2,4)=7 and 5+max(1,1)=6 -> T=7, padded 2*2*7=28; packed (6+2+4)+(10+1+1)=24;
    #            shared 9+7=16
    #   batch 2 (one pair): width 2+6=8 -> padded 2*1*8=16; packed 4+6+3=13; shared 11
    c = _hh.backbone_tokens([(3, 2, 4), (5, 1, 1), (2, 6, 3)], pairs_per_batch=2)
    assert (c["padded"], c["packed"], c["shared"], c["batches"]) == (44, 37, 27, 2)
    assert c["fraction_saved_packed"] == pytest.approx(1 - 37 / 44)
    assert c["padded_over_shared"] == pytest.approx(44 / 27)
    assert (c["mean_prompt"], c["mean_chosen"], c["mean_rejected"]) == pytest.approx((10 / 3, 3.0, 8 / 3))
    with pytest.raises(ValueError, match="pairs_per_batch"):
        _hh.backbone_tokens([(1, 1, 1)], 0)


def test_backbone_tokens_match_the_collated_batch():
    """padded = the collator's [2B, T] tensor, packed = its non-pad tokens (an independent peer)."""
    from fasttrdpo.data import PreferenceCollator, TokenizedPair

    lengths = [(3, 2, 4), (5, 1, 1), (2, 6, 3), (7, 3, 2), (1, 1, 9)]
    pairs = [TokenizedPair(list(range(10, 10 + p)), list(range(20, 20 + c)), list(range(30, 30 + r)))
             for p, c, r in lengths]
    collate = PreferenceCollator(pad_token_id=0)
    padded = packed = 0
    for i in range(0, len(pairs), 2):
        batch = collate(pairs[i:i + 2])
        padded += batch["input_ids"].numel()
        packed += int(batch["attention_mask"].sum())
    c = _hh.backbone_tokens(_hh.pair_lengths(pairs), 2)
    assert (c["padded"], c["packed"]) == (padded, packed)
    assert c["shared"] == sum(p + ch + r for p, ch, r in lengths)


def test_bpe_is_the_same_in_another_process():
    """The tokenizer is named by its training recipe: another process must train the same one (the Rust
    trainer's hash maps are seeded per process)."""
    texts = [f"\n\nHuman: question {i} about {w}?\n\nAssistant: answer {w} {i % 7}" for i in range(200)
             for w in ("cats", "tax law", "the moon")]
    here = _hh.tokenizer_fingerprint(_hh.train_bpe(texts, vocab_size=300))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _hh; texts = [f'\\n\\nHuman: question {i} about "
            "{w}?\\n\\nAssistant: answer {w} {i % 7}' for i in range(200) for w in ('cats', 'tax law', 'the moon')]; "
            "print(_hh.tokenizer_fingerprint(_hh.train_bpe(texts, vocab_size=300)))")
    there = subprocess.run([sys.executable, "-c", code, BENCH], capture_output=True, text=True, timeout=120)
    assert there.returncode == 0, there.stderr[-2000:]
    assert there.stdout.strip() == here


@pytest.mark.skipif(not HAVE_HH, reason=f"HH data not found at {_hh.DATA} (../shared/data absent)")
def test_hh_counts_reproduce_the_issue(capsys):
    counts = _hh.hh_token_counts()
    with capsys.disabled():
        print("\n" + _hh.format_counts(counts))
    c = counts["trainer_order"]
    assert counts["rows_dropped"] == 4 and c["pairs"] == 2308 and c["batches"] == 289
    # the issue's figures (rounded there to 2-3 digits): packed and shared do not depend on the order; padded
    # does (the batches' widths), within ~2 % between orders (file order 1.924 M, trainer order 1.892 M)
    assert c["packed"] / 1e6 == pytest.approx(0.82, abs=0.005)
    assert c["shared"] / 1e6 == pytest.approx(0.53, abs=0.005)
    assert c["padded"] / 1e6 == pytest.approx(1.90, rel=0.02)
    assert c["padded_over_packed"] == pytest.approx(2.31, rel=0.02)
    assert c["padded_over_shared"] == pytest.approx(3.60, rel=0.02)
    assert c["mean_prompt"] == pytest.approx(128, abs=1)
    assert c["mean_chosen"] == pytest.approx(45, abs=0.5)
    assert c["mean_rejected"] == pytest.approx(56, abs=0.5)
    assert counts["file_order"]["packed"] == c["packed"] and counts["file_order"]["shared"] == c["shared"]


@pytest.mark.skipif(not HAVE_HH, reason=f"HH data not found at {_hh.DATA} (../shared/data absent)")
def test_e2e_hh_smoke():
    """The e2e_hh case at a tiny shape (2 HH pairs a step, 2 steps, 2-layer model), in-process: every trainer
    sees the same tokens, the padded trainer's backbone gets exactly the [2B, T] batches counted, the packed and
    shared layouts give the backbone fewer positions and the same first-step loss as padded, and TRL too."""
    import torch

    import throughput
    from _e2e import run_e2e

    torch.manual_seed(0)
    shape = dict(throughput._hh_shape(True, steps=2, rnd=1), max_length=160)
    rows = []
    for impl in throughput.E2E_HH_IMPLS:
        task = dict(case="e2e_hh", impl=impl, shape=shape, device="cpu", warmup=1, repeats=1, seed=0)
        rows.append(dict(run_e2e(task), case="e2e_hh", impl=impl, shape=shape))
    throughput.analyse(rows)
    by = {r["impl"]: r for r in rows}
    for impl, r in by.items():
        assert r["status"] == "ok", (impl, r.get("reason"))
        assert r["tokens_per_s"] > 0 and len(r["times_s"]) == 1
    pad = by["fasttrdpo"]
    # tokens as counted today (prompt in each row) are the same for every trainer: TRL's collated non-pad tokens
    assert all(r["token_counts"] == pad["token_counts"] for r in rows)
    assert pad["backbone_tokens"] == [b * w for b, w in pad["backbone_shapes_seen"]]
    for impl in ("fasttrdpo-packed", "fasttrdpo-shared"):
        r = by[impl]
        assert r["numerics_ok"] is True, (impl, r["numerics_note"])
        seen = [b * w for b, w in r["backbone_shapes_seen"]]
        assert all(s < p for s, p in zip(seen, pad["backbone_tokens"])), (impl, seen, pad["backbone_tokens"])
        assert r["ratios"]["tokens_per_s_vs_padded"] > 0
    assert by["fasttrdpo-shared"]["backbone_tokens"] < by["fasttrdpo-packed"]["backbone_tokens"]
    assert by["trl-dpotrainer"]["numerics_ok"] is True, by["trl-dpotrainer"]["numerics_note"]


def test_counts_agree_with_the_trainers_packing_plan():
    """benchmarks/_hh.py counts vs fasttrdpo.training.packing's planner (written separately) on the toy."""
    from fasttrdpo.data import TokenizedPair
    from fasttrdpo.training.packing import count_backbone_tokens

    lengths = [(3, 2, 4), (5, 1, 1), (2, 6, 3), (7, 3, 2), (1, 1, 9)]
    pairs = [TokenizedPair([7] * p, [8] * c, [9] * r) for p, c, r in lengths]
    batches = [pairs[i:i + 2] for i in range(0, len(pairs), 2)]
    theirs = count_backbone_tokens(batches, max_length=16)  # every prompt+chosen+rejected fits 16: all shared
    ours = _hh.backbone_tokens(lengths, 2)
    assert (theirs.padded, theirs.packed, theirs.shared) == (ours["padded"], ours["packed"], ours["shared"])
    assert theirs.unshared_pairs == 0
