"""Backbone tokens on Anthropic-HH per batch layout (issue 15): padded, packed, shared prompts.

    .venv/bin/python benchmarks/hh_tokens.py                     # 4k BPE, max length 512, 8 pairs a batch
    .venv/bin/python benchmarks/hh_tokens.py --json out.json --max-length 1024 --pairs-per-batch 4

See benchmarks/_hh.py for the data, the tokenizer and what each count means.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def main(argv=None):
    import _hh

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=_hh.DATA)
    ap.add_argument("--vocab-size", type=int, default=_hh.HH_BPE_VOCAB)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pairs-per-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42, help="data order seed (TRDPOConfig's default seed)")
    ap.add_argument("--truncation-mode", default="keep_prompt_end", choices=("keep_prompt_end", "keep_start"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not os.path.exists(args.data):
        raise SystemExit(f"HH data not found at {args.data}")
    counts = _hh.hh_token_counts(max_length=args.max_length, pairs_per_batch=args.pairs_per_batch, seed=args.seed,
                                 vocab_size=args.vocab_size, truncation_mode=args.truncation_mode, path=args.data)
    print(_hh.format_counts(counts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(counts, f, indent=1)
    return counts


if __name__ == "__main__":
    main()
