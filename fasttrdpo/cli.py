"""`fasttrdpo train` / `fasttrdpo eval` (also `python -m fasttrdpo ...`; `torchrun -m fasttrdpo train` = DDP).

With no arguments, `train` runs the embedded default: a tiny GPTNeoX (built from a config, byte-level
tokenizer, no download) on the synthetic reversal task, with demo hyper-parameters (DEMO_DEFAULTS) that
finish in a few minutes on a laptop CPU. Every TRDPOConfig field has a flag (--learning-rate, --tau, ...), built
from the dataclass by fasttrdpo.config_flags (`eval` gets the fields whose metadata marks them for evaluation),
and `--config FILE.json` may hold any of them plus the run's description (model, data, eval_size, ...).

A user error (a bad flag or config value, a missing file, an output directory in use, a full disk)
prints one line naming the problem and exits with status 2; FASTTRDPO_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time

from .config_flags import field_flags
from .trainer import TRDPOConfig

_log = logging.getLogger("fasttrdpo")

# Hyper-parameters of the embedded demo (tiny model + synthetic task), applied only where the user did
# not set the field. tau=30 with alpha=0.5 fires eight soft updates in 240 steps: enough to see the KL to
# the reference stay bounded while the KL to the initial model keeps growing.
DEMO_DEFAULTS = dict(
    learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=10, beta=0.1, alpha=0.5, tau=30,
    per_device_train_batch_size=16, per_device_eval_batch_size=128, max_steps=240, max_length=64,
    logging_steps=10, eval_steps=30, save_steps=120, run_name="fasttrdpo-demo",
)
DEMO_RUN_NAME = DEMO_DEFAULTS["run_name"]
DEMO_TRAIN_PAIRS = 4096
DEMO_EVAL_PAIRS = 256
DEFAULT_EVAL_FRACTION = 0.05  # held out of --data FILE when no --eval-data / --eval-size is given
TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
SYNTHETIC_EVAL_SEED_OFFSET = 1_000_003  # held-out prompts: a different seed (~1e11 distinct prompts)

# the run's description besides TRDPOConfig: flags of `train`, also accepted as keys of --config
RUN_ARGS = {"model": "tiny", "ref_model": None, "data": "synthetic", "eval_data": None, "split": "train",
            "eval_split": None, "eval_size": None, "format": "auto", "skip_malformed": False, "train_size": None,
            "attn_implementation": "auto", "threads": None}
_RUN_ARG_TYPES = {"eval_size": int, "train_size": int, "threads": int, "skip_malformed": bool}
# Every TRDPOConfig field is a flag of `train` (and a --config key), built from its annotation and metadata
# (fasttrdpo.config_flags; declare a field with fasttrdpo.training.config.option). `eval` takes the fields whose
# metadata says eval="flag" or eval="recorded"; the latter default to the checkpoint's recorded value.
CONFIG_FLAGS = field_flags(TRDPOConfig)
EVAL_FLAGS = [spec for spec in CONFIG_FLAGS if spec.eval]
# what `fasttrdpo eval` takes from a checkpoint's recorded config (a flag overrides it, with a notice)
EVAL_FROM_CHECKPOINT = tuple(spec.name for spec in CONFIG_FLAGS if spec.eval == "recorded")


class UsageError(Exception):
    """A mistake in the command line or the --config file: reported in one line, exit status 2."""


def _add_config_flags(p: argparse.ArgumentParser, specs) -> None:
    group = p.add_argument_group("TRDPOConfig fields (see README)")
    for spec in specs:
        spec.add_to(group)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasttrdpo", description="TR-DPO training with fused kernels")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="train a policy with TR-DPO (no arguments: the embedded demo)")
    train.add_argument("--model", default=None, metavar="tiny|PATH|HUB_ID",
                       help="local path, hub id, or 'tiny' (default)")
    train.add_argument("--ref-model", default=None, metavar="PATH|HUB_ID",
                       help="reference model (default: a copy of --model)")
    train.add_argument("--data", default=None, metavar="synthetic|FILE|HUB_ID",
                       help="jsonl/json/parquet(.gz) file, hub id, or 'synthetic' (default)")
    train.add_argument("--eval-data", default=None, metavar="FILE|HUB_ID",
                       help="held-out data (default: synthetic held-out set for --data synthetic, else the last "
                            "--eval-size pairs of --data)")
    train.add_argument("--split", default=None, metavar="NAME", help="split of a hub dataset (default train)")
    train.add_argument("--eval-split", default=None, metavar="NAME", help="split of --eval-data when it is a hub id")
    train.add_argument("--eval-size", type=int, default=None, metavar="N",
                       help=f"pairs held out of --data (its last N) when no --eval-data; default "
                            f"{DEFAULT_EVAL_FRACTION:.0%}% of --data; 0: no held-out set")
    train.add_argument("--format", default=None, choices=["auto", "trl", "hh", "tldr"],
                       help="row format of --data (default auto: detected from the first row)")
    train.add_argument("--skip-malformed", action="store_true", default=None, help="skip (and count) malformed rows")
    train.add_argument("--train-size", type=int, default=None, metavar="N", help="use only the first N training pairs")
    train.add_argument("--attn-implementation", default=None, metavar="auto|sdpa|eager|flash_attention_2",
                       help="auto (default) = flash_attention_2 on CUDA when flash-attn is installed, sdpa otherwise")
    train.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    train.add_argument("--config", default=None, metavar="FILE.json", help="JSON file: any TRDPOConfig field and any "
                       "flag above (model, data, eval_size, ...); flags override it")
    _add_config_flags(train, CONFIG_FLAGS)

    ev = sub.add_parser("eval", help="held-out reward accuracy, margins and KL of a policy vs a reference (a TR-KTO "
                        "checkpoint: the KTO loss and metrics on unpaired rows)")
    ev.add_argument("--model", required=True, metavar="CHECKPOINT_DIR|PATH|HUB_ID|tiny",
                    help="policy: a checkpoint directory, path, hub id or 'tiny'")
    ev.add_argument("--ref-model", default=None, metavar="PATH|HUB_ID",
                    help="reference (default: <model>/reference if it exists)")
    ev.add_argument("--init-model", default=None, metavar="PATH|HUB_ID|tiny",
                    help="initial model for KL(policy || initial) (optional)")
    ev.add_argument("--data", default=None, metavar="synthetic|FILE|HUB_ID",
                    help="default: the held-out set the checkpoint's run trained with (else synthetic)")
    ev.add_argument("--split", default="test", metavar="NAME",
                    help="split of --data when it is a hub id (default test)")
    ev.add_argument("--format", default="auto", choices=["auto", "trl", "hh", "tldr"],
                    help="row format of --data (default auto: detected from the first row)")
    ev.add_argument("--skip-malformed", action="store_true", help="skip (and count) malformed rows")
    ev.add_argument("--eval-size", type=int, default=None, metavar="N",
                    help="the last N pairs (TR-KTO: rows) of --data: those `train --eval-size N` held out of the "
                         "same file")
    ev.add_argument("--attn-implementation", default="auto", metavar="auto|sdpa|eager|flash_attention_2",
                    help="as for train (default auto)")
    ev.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    ev.add_argument("--output", default=None, metavar="FILE.json", help="write the metrics as JSON here")
    _add_config_flags(ev, EVAL_FLAGS)

    ex = sub.add_parser("export", help="a sharded (--fsdp) checkpoint -> plain save_pretrained folders")
    ex.add_argument("checkpoint", help="checkpoint-<step> directory of an --fsdp run")
    ex.add_argument("out_dir", help="new folder: the policy, and reference/ (both load with from_pretrained)")
    return parser


README_FLAGS_BEGIN = "<!-- flags: generated by `python scripts/readme_flags.py`; do not edit by hand -->"
README_FLAGS_END = "<!-- end of generated flags -->"


def _md(text: str) -> str:
    return " ".join(text.replace("%%", "%").split()).replace("|", "\\|")


def _flag_cell(action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return " / ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0:  # store_true
        return f"`{action.option_strings[0]}`"
    if action.metavar is not None:
        value = action.metavar
    elif action.choices is not None:
        value = "{" + ",".join(action.choices) + "}"
    else:
        value = action.dest.upper()
    if action.nargs == "?":
        value = f"[{value}]"
    return ", ".join(f"`{o} {_md(value)}`" for o in action.option_strings)


def _flag_rows(parser: argparse.ArgumentParser, skip: set, eval_mode: dict | None = None) -> list[str]:
    """One markdown row per flag of `parser` (in the order they were added), bar the dests in `skip`;
    with eval_mode (dest -> None/"flag"/"recorded"), an `eval` column."""
    rows = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or isinstance(action, argparse._HelpAction):
            continue
        cells = [_flag_cell(action)]
        if eval_mode is not None:
            cells.append({None: "", "flag": "yes", "recorded": "checkpoint's"}[eval_mode.get(action.dest)])
        cells.append(_md(action.help or ""))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def readme_flags() -> str:
    """The README's flag tables, built from the parser (tests/test_cli_flags.py checks that the README holds
    exactly this text; `python scripts/readme_flags.py` writes it)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train, ev = sub.choices["train"], sub.choices["eval"]
    config_names = {spec.name for spec in CONFIG_FLAGS}
    eval_mode = {spec.name: spec.eval for spec in CONFIG_FLAGS}
    lines = [README_FLAGS_BEGIN, "",
             "`fasttrdpo train`: the run's description, then every TRDPOConfig field. `eval` column: `fasttrdpo eval` "
             "takes the flag too; *checkpoint's*: by default `eval` uses the value the checkpoint recorded.", "",
             "| flag | eval | meaning |", "|---|---|---|"]
    lines += _flag_rows(train, set(), eval_mode)
    lines += ["", "`fasttrdpo eval`: these, and the TRDPOConfig flags marked in the `eval` column above.", "",
              "| flag | meaning |", "|---|---|"]
    lines += _flag_rows(ev, config_names)
    lines += ["", README_FLAGS_END]
    return "\n".join(lines)


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


def load_model_and_tokenizer(name: str, *, seed: int = 0, attn_implementation: str = "auto", bf16: bool = True,
                             with_tokenizer: bool = True):
    """'tiny' = the in-process GPTNeoX + byte tokenizer; anything else goes to from_pretrained (fp32
    weights: the master copy; bf16 training autocasts). with_tokenizer=False returns (model, None)."""
    import torch

    attn = _attn_implementation(attn_implementation, bf16)
    if name == "tiny":
        from .tiny import tiny_model, tiny_tokenizer

        return tiny_model(seed=seed, attn_implementation=attn, **TINY_MODEL), tiny_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn, dtype=torch.float32)
    if not with_tokenizer:
        return model, None
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_data(source: str, split: str, fmt: str, skip: bool, *, synthetic_size: int, synthetic_seed: int,
               unpaired: bool = False):
    from .data import load_preference_dataset, synthetic_preference_dataset
    from .unpaired_data import load_unpaired_dataset

    if source == "synthetic":
        return synthetic_preference_dataset(synthetic_size, seed=synthetic_seed)
    if unpaired:  # --trainer kto: prompt/completion/label rows as they are, pairs (unpaired by the trainer)
        return load_unpaired_dataset(source, split=split, format=fmt, skip_malformed=skip)
    return load_preference_dataset(source, split=split, format=fmt, skip_malformed=skip)


def split_held_out(dataset, eval_size: int):
    """(train, held_out): the last `eval_size` pairs are held out. `fasttrdpo eval --eval-size N` on the
    same file takes the same last N pairs."""
    if not 0 < eval_size < len(dataset):
        raise UsageError(f"--eval-size {eval_size} must be between 1 and the {len(dataset)} pairs of --data minus one")
    n = len(dataset)
    return dataset.select(range(n - eval_size)), dataset.select(range(n - eval_size, n))


def _coerce(name: str, value, kind, optional: bool, where: str):
    """A --config value checked against its field's type (ints are accepted for floats)."""
    if value is None and optional:
        return None
    ok = (isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))) or \
        (kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise UsageError(f"{where}: field {name} must be {kind.__name__}{' or null' if optional else ''}, "
                         f"got {value!r}")
    return float(value) if kind is float else value


def _read_config_file(path: str) -> dict:
    try:
        with open(path) as f:
            values = json.load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a JSON object of field: value")
    return values


def resolve_run(args) -> tuple[TRDPOConfig, dict, dict]:
    """(config, run, origin): TRDPOConfig from (in increasing priority) defaults, demo defaults, --config
    JSON, flags; `run` the description besides it (model, data, eval_size, ...) resolved the same way;
    `origin` says where output_dir came from ("default", "config" or "flag")."""
    file_values = _read_config_file(args.config) if args.config else {}
    fields = {f.name: f for f in dataclasses.fields(TRDPOConfig)}
    unknown = set(file_values) - set(fields) - set(RUN_ARGS)
    if unknown:
        raise UsageError(f"--config {args.config}: unknown config field(s) {sorted(unknown)}")
    where = f"--config {args.config}"
    run = dict(RUN_ARGS)
    for key in RUN_ARGS:
        if key in file_values:
            kind = _RUN_ARG_TYPES.get(key, str)
            run[key] = _coerce(key, file_values[key], kind, RUN_ARGS[key] is None, where)
        if getattr(args, key, None) is not None:
            run[key] = getattr(args, key)
    values: dict = {}
    if run["model"] == "tiny" and run["data"] == "synthetic":
        values.update(DEMO_DEFAULTS)
    for spec in CONFIG_FLAGS:
        if spec.name in file_values:
            try:
                values[spec.name] = spec.from_json(file_values[spec.name], where)
            except ValueError as e:
                raise UsageError(str(e)) from None
    for spec in CONFIG_FLAGS:
        if spec.name in vars(args):  # given (`--save-total-limit none` gives None)
            values[spec.name] = getattr(args, spec.name)
    origin = {"output_dir": "flag" if "output_dir" in vars(args) else
              "config" if "output_dir" in file_values else "default"}
    return TRDPOConfig(**values), run, origin


def resolve_config(args) -> TRDPOConfig:
    """TRDPOConfig from (in increasing priority) defaults, demo defaults, --config JSON, flags."""
    return resolve_run(args)[0]


def _reference_note(final: dict, config: TRDPOConfig) -> str:
    """What the held-out rewards are measured against: the reference as it stands at the end."""
    step = final.get("step", 0)
    if not config.sync_ref_model:
        return "measured against the fixed reference (plain DPO)"
    if not final.get("ref_updates"):
        return "measured against the reference = the initial model (no reference update yet)"
    last = (step // config.tau) * config.tau
    if last == step:
        text = (f"measured against the reference updated at this very step {step} "
                f"(alpha = {config.alpha})")
        if config.alpha == 1.0:
            text += (": the reference equals the policy, so every reward is 0 and the accuracy 0 by "
                     "construction; the initial-model figures below say what was learnt")
        else:
            text += ": it sits close to the policy, so rewards are small by construction"
        return text
    return (f"measured against the reference last updated at step {last} ({step - last} steps before the end, "
            f"alpha = {config.alpha})")


def _summary(final: dict, seconds: float, output_dir: str, config: TRDPOConfig | None = None,
             plotted: bool = True) -> str:
    config = config or TRDPOConfig()
    outputs = "metrics.jsonl, checkpoint-*, final/" + (", training_curves.png" if plotted else "")
    lines = [f"done in {seconds:.1f} s; outputs in {output_dir}/ ({outputs})"]
    if "eval_loss" in final and "eval_rewards/accuracies" not in final:  # TR-KTO: unpaired rows, no accuracy
        lines.append(f"held-out KTO loss {final['eval_loss']:.4f} on {final['eval_rows']} rows (reward margin "
                     f"{final.get('eval_rewards/margins', float('nan')):.3f}, KL estimate "
                     f"{final.get('eval_kl', float('nan')):.4f}, {final.get('ref_updates', 0)} reference updates)")
        if "eval_kl/ref" in final:
            lines.append(f"per-token KL on held-out completions: KL(policy || reference) = {final['eval_kl/ref']:.4f}")
    elif "eval_loss" in final:
        lines.append(f"held-out reward accuracy: {final['eval_rewards/accuracies']:.3f} "
                     f"on {final['eval_pairs']} pairs (margin {final['eval_rewards/margins']:.3f}, "
                     f"loss {final['eval_loss']:.4f}, {final.get('ref_updates', 0)} reference updates)")
        lines.append("  " + _reference_note(final, config))
        if "eval_init_rewards/accuracies" in final:
            lines.append(f"  measured against the initial model instead: accuracy "
                         f"{final['eval_init_rewards/accuracies']:.3f}, margin {final['eval_init_rewards/margins']:.3f}")
        if "eval_kl/ref" in final:
            kl = f"per-token KL on held-out completions: KL(policy || reference) = {final['eval_kl/ref']:.4f}"
            if "eval_kl/init" in final:
                kl += f", KL(policy || initial) = {final['eval_kl/init']:.4f}"
            lines.append(kl)
    elif "loss" in final:
        lines.append(f"no held-out set (--eval-data FILE or --eval-size N): last training record at step "
                     f"{final['step']}: loss {final['loss']:.4f}, reward accuracy "
                     f"{final.get('rewards/accuracies', float('nan')):.3f}, "
                     f"{final.get('ref_updates', 0)} reference updates")
    return "\n".join(lines)


def _demo_overwrite(config: TRDPOConfig, run: dict, origin: dict) -> bool:
    """The README's main command re-runs cleanly: the embedded demo in the default output directory
    replaces a previous demo run there (never anything else)."""
    from .training.output_dir import checkpoint_run, checkpoints

    if config.resume_from_checkpoint or config.overwrite_output_dir or origin["output_dir"] != "default":
        return False
    if config.run_name != DEMO_RUN_NAME or not (run["model"] == "tiny" and run["data"] == "synthetic"):
        return False
    found = checkpoints(config.output_dir)
    return bool(found) and all(checkpoint_run(p).get("run_name") == DEMO_RUN_NAME for p in found.values())


def cmd_train(args) -> int:
    import torch

    from .trainer import TRDPOTrainer, TRKTOTrainer

    config, run, origin = resolve_run(args)
    if run["threads"]:
        torch.set_num_threads(run["threads"])
    if _demo_overwrite(config, run, origin):
        print(f"fasttrdpo: replacing the previous demo run in {config.output_dir}/ (give --output-dir DIR to "
              "keep runs apart)", file=sys.stderr, flush=True)
        config = dataclasses.replace(config, overwrite_output_dir=True)
    if not (config.resume_from_checkpoint or config.overwrite_output_dir):
        # before a model or data set is loaded (minutes for a large one); the trainer checks again under its lock
        from .training.output_dir import refuse_other_runs

        refuse_other_runs(config.output_dir)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(run["model"], seed=config.seed, bf16=config.bf16,
                                                attn_implementation=run["attn_implementation"])
    ref_model = None
    if run["ref_model"]:
        ref_model, _ = load_model_and_tokenizer(run["ref_model"], seed=config.seed, bf16=config.bf16,
                                                attn_implementation=run["attn_implementation"],
                                                with_tokenizer=False)
    train, evals, held_out = _training_data(run, config)
    trainer_cls = TRKTOTrainer if config.trainer == "kto" else TRDPOTrainer
    trainer = trainer_cls(model, tokenizer, train, config, ref_model=ref_model, eval_dataset=evals)
    trainer.run_info = {k: run[k] for k in ("model", "ref_model", "data", "split", "format", "skip_malformed",
                                            "eval_data", "eval_split", "train_size")}
    trainer.run_info["eval_size"] = held_out
    try:
        final = trainer.train()
    finally:
        trainer.close()
    if trainer.is_main:
        plotted = config.plot and os.path.exists(os.path.join(config.output_dir, "training_curves.png"))
        summary = _summary(final, time.perf_counter() - t0, config.output_dir, config, plotted)
        with open(os.path.join(config.output_dir, "final_metrics.json"), "w") as f:
            json.dump({**final, "seconds": time.perf_counter() - t0, "world_size": trainer.world_size,
                       "fingerprints": trainer.fingerprints(), "rank_fingerprints": trainer.rank_fingerprints,
                       "rank_state_bytes": trainer.rank_state_bytes},
                      f, indent=1)
        print(summary, flush=True)
    return 0


def _training_data(run: dict, config: TRDPOConfig):
    """(train, evals or None, held-out size recorded for `fasttrdpo eval`)."""
    train = _load_data(run["data"], run["split"], run["format"], run["skip_malformed"],
                       synthetic_size=DEMO_TRAIN_PAIRS, synthetic_seed=config.seed, unpaired=config.trainer == "kto")
    eval_size = run["eval_size"]
    if eval_size is not None and eval_size < 0:
        raise UsageError(f"--eval-size must be >= 0, got {eval_size}")
    if run["eval_data"]:
        evals = _load_data(run["eval_data"], run["eval_split"] or run["split"], run["format"], run["skip_malformed"],
                           synthetic_size=eval_size or DEMO_EVAL_PAIRS, synthetic_seed=config.seed + 1,
                           unpaired=config.trainer == "kto")
        if eval_size:
            evals = evals.select(range(max(0, len(evals) - eval_size), len(evals)))
    elif eval_size == 0:
        evals = None
    elif run["data"] == "synthetic":
        evals = _load_data("synthetic", "", "auto", False, synthetic_size=eval_size or DEMO_EVAL_PAIRS,
                           synthetic_seed=config.seed + SYNTHETIC_EVAL_SEED_OFFSET)
    else:
        if eval_size is None:
            eval_size = max(1, math.ceil(DEFAULT_EVAL_FRACTION * len(train)))
            if eval_size < len(train):
                _log.info("held out the last %d of the %d pairs of %s (%.0f%%) for evaluation; --eval-size N "
                          "chooses N, --eval-size 0 none", eval_size, len(train), run["data"],
                          100 * DEFAULT_EVAL_FRACTION)
        if eval_size < len(train):
            train, evals = split_held_out(train, eval_size)
        else:
            raise UsageError(f"--data {run['data']} has {len(train)} pairs: too few to hold out {eval_size} "
                             "(give --eval-data, or --eval-size 0)")
    if run["train_size"]:
        train = train.select(range(min(run["train_size"], len(train))))
    return train, evals, (len(evals) if evals is not None else 0)


def _checkpoint_state(path: str) -> dict:
    from .training.checkpoint import read_state_json

    return read_state_json(path) if os.path.isdir(path) else {}


def _eval_data(args, state: dict, config: TRDPOConfig):
    """The evaluation pairs (TR-KTO: rows): --data (its last --eval-size pairs), else the held-out set the
    checkpoint's run used (recorded in its trainer_state.json), else the synthetic held-out set. With
    config.trainer "kto" a file is read as TR-KTO training reads it (unpaired rows as they are, pairs unpaired by
    the trainer)."""
    seed, unpaired = config.seed, config.trainer == "kto"
    info = state.get("run_info") or {}
    if args.data is None and info:
        run = {**RUN_ARGS, **info}
        if args.eval_size is not None:
            run["eval_size"] = args.eval_size
        if run["data"] != "synthetic" and not run["eval_data"] and not run["eval_size"]:
            raise UsageError("the checkpoint's run had no held-out set: give --data")
        run["train_size"] = None
        _log.info("evaluating on the held-out set of the checkpoint's run (%s)",
                  run["eval_data"] or f"{run['data']}, {run['eval_size']} pairs")
        cfg = TRDPOConfig(seed=seed, trainer=config.trainer)
        _, evals, _ = _training_data(run, cfg)
        return evals
    source = args.data or "synthetic"
    data = _load_data(source, args.split, args.format, args.skip_malformed,
                      synthetic_size=args.eval_size or DEMO_EVAL_PAIRS,
                      synthetic_seed=seed + SYNTHETIC_EVAL_SEED_OFFSET, unpaired=unpaired)
    if args.eval_size:
        n = min(args.eval_size, len(data))
        data = data.select(range(len(data) - n, len(data)))
    return data


def eval_config(args, recorded: dict) -> TRDPOConfig:
    """The TRDPOConfig `fasttrdpo eval` evaluates with: each eval="recorded" field from its flag, else the
    checkpoint's recorded config, else its default; each eval="flag" field from its flag, else its default."""
    values = {}
    for spec in EVAL_FLAGS:
        key, saved = spec.name, recorded.get(spec.name)
        if key in vars(args):  # given (`--max-prompt-length none` gives None)
            flag = values[key] = getattr(args, key)
            if spec.eval == "recorded" and key in recorded and flag != saved:
                _log.warning("%s %s overrides the checkpoint's %s = %s", spec.flag, flag, key, saved)
        elif spec.eval == "recorded" and key in recorded:
            values[key] = saved
    return TRDPOConfig(**{"output_dir": os.path.join(os.getcwd(), "outputs", "fasttrdpo-eval"), "plot": False,
                          "disable_tqdm": True, **values})


def cmd_eval(args) -> int:
    import torch

    from .trainer import TRDPOTrainer, TRKTOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    state = _checkpoint_state(args.model)
    if state.get("sharded"):
        raise UsageError(f"{args.model} is a sharded (--fsdp) checkpoint: `fasttrdpo export {args.model} OUT_DIR` "
                         "writes folders that `fasttrdpo eval --model OUT_DIR` takes")
    config = eval_config(args, state.get("config") or {})
    kto = config.trainer == "kto"
    if not kto and "per_device_train_batch_size" in vars(args):
        raise UsageError("--per-device-train-batch-size applies to the evaluation of TR-KTO (--trainer kto) only: "
                         "it sets the blocks the KL rows are paired in")
    if os.path.exists(os.path.join(args.model, "adapter_config.json")):
        return _eval_lora(args, state, config)
    model, tokenizer = load_model_and_tokenizer(args.model, seed=config.seed, bf16=config.bf16,
                                                attn_implementation=args.attn_implementation)
    ref_path = args.ref_model
    if ref_path is None and os.path.isdir(os.path.join(args.model, "reference")):
        ref_path = os.path.join(args.model, "reference")
    if ref_path is None:
        raise UsageError("give --ref-model (or a checkpoint directory that has reference/)")
    ref_model, _ = load_model_and_tokenizer(ref_path, seed=config.seed, bf16=config.bf16,
                                            attn_implementation=args.attn_implementation, with_tokenizer=False)
    init_model = None
    if args.init_model:
        init_model, _ = load_model_and_tokenizer(args.init_model, seed=config.seed, bf16=config.bf16,
                                                 attn_implementation=args.attn_implementation, with_tokenizer=False)
    data = _eval_data(args, state, config)
    trainer_cls = TRKTOTrainer if kto else TRDPOTrainer
    trainer = trainer_cls(model, tokenizer, None, config, ref_model=ref_model, eval_dataset=data,
                          init_model=init_model if init_model is not None else False)
    return _run_eval(args, state, config, trainer)


# the recorded fields that rebuild a LoRA run's network and reference exactly as its trainer built them
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_reference", "lora_soft",
               "sync_ref_model", "alpha", "tau", "ref_dtype", "disable_dropout")


def _eval_lora(args, state: dict, config: TRDPOConfig) -> int:
    """A LoRA checkpoint (adapters only): the base model its run recorded + the trainer's own LoRA set-up,
    then the checkpoint's adapters (and merged reference layers) restored bit for bit, so the reference is the
    run's: base = adapters off, adapter = the 'ref' adapter, merged = the saved merged weights."""
    from .trainer import TRDPOTrainer, TRKTOTrainer

    recorded = state.get("config") or {}
    if not recorded.get("lora_r"):
        raise UsageError(f"{args.model} holds a LoRA adapter but no trainer_state.json recording its run's LoRA "
                         "settings (e.g. final/ saved as an adapter): evaluating it is not supported; evaluate a "
                         "checkpoint-N of the run, or save the final model with save_merged=True")
    if args.ref_model is not None:
        raise UsageError(f"--ref-model does not apply to a LoRA checkpoint: its reference is the run's "
                         f"(lora_reference={recorded.get('lora_reference') or 'base'})")
    with open(os.path.join(args.model, "adapter_config.json")) as f:
        base = (state.get("run_info") or {}).get("model") or json.load(f).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{args.model}: neither trainer_state.json nor adapter_config.json names the base model")
    config = dataclasses.replace(config, **{k: recorded[k] for k in LORA_FIELDS if k in recorded})
    model, tokenizer = load_model_and_tokenizer(base, seed=config.seed, bf16=config.bf16,
                                                attn_implementation=args.attn_implementation)
    init_model = None
    if args.init_model:
        init_model, _ = load_model_and_tokenizer(args.init_model, seed=config.seed, bf16=config.bf16,
                                                 attn_implementation=args.attn_implementation, with_tokenizer=False)
    data = _eval_data(args, state, config)
    trainer_cls = TRKTOTrainer if config.trainer == "kto" else TRDPOTrainer
    trainer = trainer_cls(model, tokenizer, None, config, eval_dataset=data,
                          init_model=init_model if init_model is not None else False)
    if trainer.lora is None:
        raise UsageError(f"{args.model}: the recorded config (lora_r={recorded.get('lora_r')}) built no LoRA model")
    trainer.lora.load_checkpoint_weights(trainer, args.model)
    return _run_eval(args, state, config, trainer)


def _run_eval(args, state: dict, config: TRDPOConfig, trainer) -> int:
    kto = config.trainer == "kto"
    try:
        result = trainer.evaluate()
    finally:
        trainer.close()
    # the checkpoint's own step and reference updates, and the settings the figures were computed with
    result["step"] = state.get("global_step", 0)
    result["ref_updates"] = state.get("ref_updates", 0)
    settings = (("trainer", "beta", "desirable_weight", "undesirable_weight", "per_device_train_batch_size") if kto
                else ("trainer", "loss_type", "beta", "label_smoothing", "loss_weights", "discopop_tau"))
    result.update({k: getattr(config, k) for k in settings + ("max_length",)})
    if trainer.is_main:
        print(json.dumps(result, indent=1))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=1)
    return 0


def cmd_export(args) -> int:
    from .training.sharded_checkpoint import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out_dir), flush=True)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import MalformedRowError
    from .training.output_dir import OutputDirError

    # ValueError: bad values (TRDPOConfig names the field); OSError: missing files, a full disk
    return (UsageError, OutputDirError, MalformedRowError, ValueError, OSError, NotImplementedError)


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
    try:
        return {"train": cmd_train, "eval": cmd_eval, "export": cmd_export}[args.command](args)
    except _user_errors() as e:
        if os.environ.get("FASTTRDPO_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message's layout
        print(f"fasttrdpo {args.command}: error: {message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
