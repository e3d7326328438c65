"""`fasttrdpo train` / `fasttrdpo eval` (also `python -m fasttrdpo ...`; `torchrun -m fasttrdpo train` = DDP).

With no arguments, `train` runs the embedded default: a tiny GPTNeoX (built from a config, byte-level
tokenizer, no download) on the synthetic reversal task, with demo hyper-parameters (DEMO_DEFAULTS) that
finish in a few minutes on a laptop CPU. Every TRDPOConfig field has a flag (--learning-rate, --tau, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from .trainer import TRDPOConfig

# Hyper-parameters of the embedded demo (tiny model + synthetic task), applied only where the user did
# not set the field. tau=30 with alpha=0.5 fires eight soft updates in 240 steps: enough to see the KL to
# the reference stay bounded while the KL to the initial model keeps growing.
DEMO_DEFAULTS = dict(
    learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=10, beta=0.1, alpha=0.5, tau=30,
    per_device_train_batch_size=16, per_device_eval_batch_size=128, max_steps=240, max_length=64,
    logging_steps=10, eval_steps=30, save_steps=120,
)
DEMO_TRAIN_PAIRS = 4096
DEMO_EVAL_PAIRS = 256
TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

_EXPLICIT = {"output_dir", "max_steps", "resume_from_checkpoint"}  # flags spelled out below


def _field_parser(type_name: str):
    base = type_name.replace(" | None", "").replace("None | ", "").strip()
    return {"float": float, "int": int, "str": str, "bool": bool}[base]


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("TRDPOConfig fields (see README)")
    for f in dataclasses.fields(TRDPOConfig):
        if f.name in _EXPLICIT:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_parser(str(f.type))
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default {f.default})")
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default {f.default})")
    group.add_argument("--lr", dest="learning_rate", type=float, default=None, help="alias of --learning-rate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttrdpo", description="TR-DPO training with fused kernels")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="train a policy with TR-DPO (no arguments: the embedded demo)")
    train.add_argument("--model", default="tiny", help="local path, hub id, or 'tiny' (default)")
    train.add_argument("--ref-model", default=None, help="reference model (default: a copy of --model)")
    train.add_argument("--data", default="synthetic", help="jsonl/json/parquet(.gz) file, hub id, or 'synthetic'")
    train.add_argument("--eval-data", default=None, help="held-out data (default: synthetic held-out set for "
                       "--data synthetic, else --eval-size pairs split off --data)")
    train.add_argument("--split", default="train", help="split of a hub dataset")
    train.add_argument("--eval-split", default=None, help="split of --eval-data when it is a hub id")
    train.add_argument("--eval-size", type=int, default=None, help="pairs held out of --data when no --eval-data")
    train.add_argument("--format", default="auto", choices=["auto", "trl", "hh", "tldr"])
    train.add_argument("--skip-malformed", action="store_true", help="skip (and count) malformed rows")
    train.add_argument("--train-size", type=int, default=None, help="use only the first N training pairs")
    train.add_argument("--output-dir", default=None, help=f"(default {TRDPOConfig.output_dir})")
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="resume from 'latest' (the default when given alone) or a checkpoint directory")
    train.add_argument("--attn-implementation", default="auto", help="auto = flash_attention_2 on CUDA when "
                       "flash-attn is installed, sdpa otherwise")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--config", default=None, help="JSON file of TRDPOConfig fields (flags override it)")
    _add_config_flags(train)

    ev = sub.add_parser("eval", help="held-out reward accuracy, margins and KL of a policy vs a reference")
    ev.add_argument("--model", required=True, help="policy: a checkpoint directory, path, hub id or 'tiny'")
    ev.add_argument("--ref-model", default=None, help="reference (default: <model>/reference if it exists)")
    ev.add_argument("--init-model", default=None, help="initial model for KL(policy || initial) (optional)")
    ev.add_argument("--data", default="synthetic")
    ev.add_argument("--split", default="test")
    ev.add_argument("--format", default="auto", choices=["auto", "trl", "hh", "tldr"])
    ev.add_argument("--skip-malformed", action="store_true")
    ev.add_argument("--eval-size", type=int, default=None, help="use only the first N pairs")
    ev.add_argument("--beta", type=float, default=None)
    ev.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    ev.add_argument("--max-length", type=int, default=None)
    ev.add_argument("--per-device-eval-batch-size", type=int, default=None)
    ev.add_argument("--attn-implementation", default="auto")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--seed", type=int, default=None)
    ev.add_argument("--output", default=None, help="write the metrics as JSON here")
    return parser


# ----------------------------------------------------------------------------------------------------

def _attn_implementation(requested: str, half_precision: bool = True) -> str:
    """auto: flash_attention_2 on CUDA when flash-attn imports and activations are bf16 (it has no fp32
    kernels), sdpa otherwise."""
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available() and half_precision:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model_and_tokenizer(name: str, *, seed: int = 0, attn_implementation: str = "auto", bf16: bool = True):
    """'tiny' = the in-process GPTNeoX + byte tokenizer; anything else goes to from_pretrained (fp32
    weights: the master copy; bf16 training autocasts)."""
    import torch

    attn = _attn_implementation(attn_implementation, bf16)
    if name == "tiny":
        from .tiny import tiny_model, tiny_tokenizer

        return tiny_model(seed=seed, attn_implementation=attn, **TINY_MODEL), tiny_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_data(source: str, split: str, fmt: str, skip: bool, *, synthetic_size: int, synthetic_seed: int):
    from .data import load_preference_dataset, synthetic_preference_dataset

    if source == "synthetic":
        return synthetic_preference_dataset(synthetic_size, seed=synthetic_seed)
    return load_preference_dataset(source, split=split, format=fmt, skip_malformed=skip)


def resolve_config(args) -> TRDPOConfig:
    """TRDPOConfig from (in increasing priority) defaults, demo defaults, --config JSON, flags."""
    values: dict = {}
    if args.model == "tiny" and args.data == "synthetic":
        values.update(DEMO_DEFAULTS)
    if args.config:
        with open(args.config) as f:
            values.update(json.load(f))
    for f in dataclasses.fields(TRDPOConfig):
        v = getattr(args, f.name, None)
        if f.name not in _EXPLICIT and v is not None:
            values[f.name] = v
    if args.output_dir is not None:
        values["output_dir"] = args.output_dir
    if args.max_steps is not None:
        values["max_steps"] = args.max_steps
    if args.resume is not None:
        values["resume_from_checkpoint"] = args.resume
    unknown = set(values) - {f.name for f in dataclasses.fields(TRDPOConfig)}
    if unknown:
        raise SystemExit(f"fasttrdpo: unknown config field(s) {sorted(unknown)}")
    return TRDPOConfig(**values)


def _summary(final: dict, seconds: float, output_dir: str) -> str:
    lines = [f"done in {seconds:.1f} s; outputs in {output_dir}/ (metrics.jsonl, checkpoint-*, training_curves.png)"]
    if final:
        lines.append(f"held-out reward accuracy: {final['eval_rewards/accuracies']:.3f} "
                     f"on {final['eval_pairs']} pairs (margin {final['eval_rewards/margins']:.3f}, "
                     f"loss {final['eval_loss']:.4f}, {final.get('ref_updates', 0)} reference updates)")
        if "eval_init_rewards/accuracies" in final:
            lines.append(f"  measured against the initial model instead: accuracy "
                         f"{final['eval_init_rewards/accuracies']:.3f}, margin {final['eval_init_rewards/margins']:.3f}")
        if "eval_kl/ref" in final:
            kl = f"per-token KL on held-out completions: KL(policy || reference) = {final['eval_kl/ref']:.4f}"
            if "eval_kl/init" in final:
                kl += f", KL(policy || initial) = {final['eval_kl/init']:.4f}"
            lines.append(kl)
    return "\n".join(lines)


def cmd_train(args) -> int:
    import torch

    from .trainer import TRDPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    config = resolve_config(args)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model, seed=config.seed, bf16=config.bf16,
                                                attn_implementation=args.attn_implementation)
    ref_model = None
    if args.ref_model:
        ref_model, _ = load_model_and_tokenizer(args.ref_model, seed=config.seed, bf16=config.bf16,
                                                attn_implementation=args.attn_implementation)
    train = _load_data(args.data, args.split, args.format, args.skip_malformed,
                       synthetic_size=DEMO_TRAIN_PAIRS, synthetic_seed=config.seed)
    if args.eval_data:
        evals = _load_data(args.eval_data, args.eval_split or args.split, args.format, args.skip_malformed,
                           synthetic_size=args.eval_size or DEMO_EVAL_PAIRS, synthetic_seed=config.seed + 1)
    elif args.data == "synthetic":
        # a different seed: held-out prompts (the task has ~1e11 distinct prompts, overlap is negligible)
        evals = _load_data("synthetic", "", "auto", False, synthetic_size=args.eval_size or DEMO_EVAL_PAIRS,
                           synthetic_seed=config.seed + 1_000_003)
    elif args.eval_size:
        if args.eval_size >= len(train):
            raise SystemExit(f"fasttrdpo: --eval-size {args.eval_size} leaves no training data ({len(train)} pairs)")
        evals = train.select(range(len(train) - args.eval_size, len(train)))
        train = train.select(range(len(train) - args.eval_size))
    else:
        evals = None
    if args.train_size:
        train = train.select(range(min(args.train_size, len(train))))
    trainer = TRDPOTrainer(model, tokenizer, train, config, ref_model=ref_model, eval_dataset=evals)
    try:
        final = trainer.train()
    finally:
        trainer.close()
    if trainer.is_main:
        summary = _summary(final, time.perf_counter() - t0, config.output_dir)
        with open(os.path.join(config.output_dir, "final_metrics.json"), "w") as f:
            json.dump({**final, "seconds": time.perf_counter() - t0, "world_size": trainer.world_size,
                       "fingerprints": trainer.fingerprints(), "rank_fingerprints": trainer.rank_fingerprints},
                      f, indent=1)
        print(summary, flush=True)
    return 0


def cmd_eval(args) -> int:
    import torch

    from .trainer import TRDPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    values = {k: getattr(args, k) for k in ("beta", "bf16", "max_length", "per_device_eval_batch_size", "seed")
              if getattr(args, k) is not None}
    config = TRDPOConfig(output_dir=os.path.join(os.getcwd(), "outputs", "fasttrdpo-eval"), plot=False, disable_tqdm=True,
                         **values)
    model, tokenizer = load_model_and_tokenizer(args.model, seed=config.seed, bf16=config.bf16,
                                                attn_implementation=args.attn_implementation)
    ref_path = args.ref_model
    if ref_path is None and os.path.isdir(os.path.join(args.model, "reference")):
        ref_path = os.path.join(args.model, "reference")
    if ref_path is None:
        raise SystemExit("fasttrdpo eval: give --ref-model (or a checkpoint directory that has reference/)")
    ref_model, _ = load_model_and_tokenizer(ref_path, seed=config.seed, bf16=config.bf16,
                                            attn_implementation=args.attn_implementation)
    init_model = None
    if args.init_model:
        init_model, _ = load_model_and_tokenizer(args.init_model, seed=config.seed, bf16=config.bf16,
                                                 attn_implementation=args.attn_implementation)
    data = _load_data(args.data, args.split, args.format, args.skip_malformed,
                      synthetic_size=args.eval_size or DEMO_EVAL_PAIRS, synthetic_seed=config.seed + 1_000_003)
    if args.eval_size:
        data = data.select(range(min(args.eval_size, len(data))))
    trainer = TRDPOTrainer(model, tokenizer, None, config, ref_model=ref_model, eval_dataset=data,
                           init_model=init_model if init_model is not None else False)
    try:
        result = trainer.evaluate()
    finally:
        trainer.close()
    if trainer.is_main:
        print(json.dumps(result, indent=1))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # no arguments = the embedded default
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="[fasttrdpo] %(message)s")
    return cmd_train(args) if args.command == "train" else cmd_eval(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
