"""One source for every flag: each TRDPOConfig field is a flag of `fasttrdpo train` (and of `fasttrdpo eval`
where its metadata says so) and a `--config` key, built from its annotation and metadata. These tests walk
the dataclass, so a field added without a working flag (or without help text) fails here."""
import dataclasses
import importlib
import json
import os
import types
import typing

import pytest

from fasttrdpo import cli
from fasttrdpo.config_flags import field_flags, value_type
from fasttrdpo.training.config import TRDPOConfig, option

FIELDS = dataclasses.fields(TRDPOConfig)
HINTS = typing.get_type_hints(TRDPOConfig)

# Fields whose valid values are constrained (by TRDPOConfig's checks) beyond their type: (flags needed beside
# it, command-line text, the value TRDPOConfig must hold). Other fields get a value derived from their type
# below. A new constrained field whose derived value TRDPOConfig refuses needs a line here.
EXAMPLES = {
    "loss_type": ([], "sigmoid,sft", ["sigmoid", "sft"]),
    "label_smoothing": (["--loss-type", "sigmoid,ipo"], "0.1,0", [0.1, 0.0]),
    "loss_weights": (["--loss-type", "sigmoid,sft"], "1,0.5", [1.0, 0.5]),
    "lr_scheduler_type": ([], "cosine", "cosine"),
    "lr_scheduler_kwargs": ([], '{"min_lr_rate": 0.1, "note": [1, "a"]}', {"min_lr_rate": 0.1, "note": [1, "a"]}),
    "ref_dtype": ([], "bfloat16", "bfloat16"),
    "resume_from_checkpoint": ([], "runs/x/checkpoint-4", "runs/x/checkpoint-4"),
    "device": ([], "cpu", "cpu"),
    "alpha": ([], "0.25", 0.25),
    "desirable_weight": (["--trainer", "kto"], "1.5", 1.5),  # the KTO weights apply to trainer kto only
    "undesirable_weight": (["--trainer", "kto"], "1.33", 1.33),
}


def _derived(name, annotation, default):
    """(command-line text, value) of a field not in EXAMPLES, from its annotation: never the default, so a
    flag that is parsed but dropped on the way to TRDPOConfig shows."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    members = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [annotation]
    lists = [m for m in members if typing.get_origin(m) is list]
    base = lists[0] if lists else members[0]
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        if typing.get_origin(item) is typing.Literal:
            values = list(typing.get_args(item))[:2]
        else:
            values = {str: ["a", "b"], int: [3, 5], float: [0.5, 2.0]}[item]
        return ",".join(map(str, values)), values
    if typing.get_origin(base) is typing.Literal:
        value = next(c for c in typing.get_args(base) if c != default)
        return str(value), value
    if base is int:
        value = default + 3 if isinstance(default, int) else 3
        return str(value), value
    if base is float:
        value = default * 0.5 + 0.25  # inside [0, 1] for fractions of 1 and > 0 for rates: a valid value
        return repr(value), value
    if base is str:
        return f"example-{name}", f"example-{name}"
    if base is dict or typing.get_origin(base) is dict:
        return '{"k": 1}', {"k": 1}
    pytest.fail(f"TRDPOConfig.{name}: no representative value for {annotation!r}: add one to EXAMPLES")


def _example(f):
    if f.name in EXAMPLES:
        return EXAMPLES[f.name]
    if HINTS[f.name] is bool:  # the switch that is not the default
        return [], None, not f.default
    if f.metadata.get("choices"):
        value = next(c for c in f.metadata["choices"] if c != f.default)
        return [], str(value), value
    return ([], *_derived(f.name, HINTS[f.name], f.default))


def _argv(f, text, value):
    flag = "--" + f.name.replace("_", "-") if f.name != "resume_from_checkpoint" else "--resume"
    if text is None:  # a bool switch
        return [flag if value else "--no-" + f.name.replace("_", "-")]
    return [flag, text]


@pytest.mark.parametrize("f", FIELDS, ids=[f.name for f in FIELDS])
def test_every_field_is_a_flag_of_train_and_where_marked_of_eval_and_a_config_key(f, tmp_path):
    assert f.metadata.get("help"), f"TRDPOConfig.{f.name} has no help text: declare it with option(default, 'help')"
    assert f.metadata.get("eval") in (None, "flag", "recorded")
    companions, text, value = _example(f)
    assert value != f.default, f.name  # the value must show that the flag reached TRDPOConfig
    parser = cli.build_parser()

    # train: the flag parses into the field's type and reaches TRDPOConfig (--data FILE: no demo defaults)
    args = parser.parse_args(["train", "--data", "x.jsonl", *companions, *_argv(f, text, value)])
    assert getattr(args, f.name) == value and type(getattr(args, f.name)) is type(value), f.name
    assert getattr(cli.resolve_config(args), f.name) == value

    # --config FILE.json: the same value as JSON
    path = tmp_path / "run.json"
    path.write_text(json.dumps({f.name: value}))
    args = parser.parse_args(["train", "--data", "x.jsonl", "--config", str(path), *companions])
    cfg = cli.resolve_config(args)
    assert getattr(cfg, f.name) == value and type(getattr(cfg, f.name)) is type(value), f.name

    # eval: the fields marked eval take the flag (over the checkpoint's record); the others are no eval flag
    argv = ["eval", "--model", "ckpt", *companions, *_argv(f, text, value)]
    if f.metadata.get("eval"):
        args = parser.parse_args(argv)
        assert getattr(args, f.name) == value
        assert getattr(cli.eval_config(args, {}), f.name) == value
        assert getattr(cli.eval_config(args, {f.name: f.default}), f.name) == value  # the flag wins
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_eval_takes_recorded_fields_from_the_checkpoint_and_the_others_from_their_defaults():
    parser = cli.build_parser()
    args = parser.parse_args(["eval", "--model", "ckpt"])
    recorded = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.3, "max_length": 40,
                "truncation_mode": "keep_start", "seed": 7, "bf16": True,
                # a bf16-reference run is evaluated with its bf16 reference (the rewards depend on it)
                "ref_dtype": "bfloat16",
                # recorded but eval="flag": eval uses the default, not the training run's value
                "per_device_eval_batch_size": 3, "kl_chunk_tokens": 17,
                # not an eval field at all
                "tau": 5, "learning_rate": 0.5}
    cfg = cli.eval_config(args, recorded)
    recorded_fields = {f.name for f in FIELDS if f.metadata.get("eval") == "recorded"}
    assert recorded_fields == set(cli.EVAL_FROM_CHECKPOINT)
    assert {"loss_type", "beta", "label_smoothing", "loss_weights", "discopop_tau", "max_length", "max_prompt_length",
            "truncation_mode", "bf16", "seed"} <= recorded_fields  # what eval always took from the checkpoint
    for name in ("loss_type", "loss_weights", "beta", "max_length", "truncation_mode", "seed", "bf16", "ref_dtype"):
        assert getattr(cfg, name) == recorded[name], name
    for name in ("per_device_eval_batch_size", "kl_chunk_tokens", "tau", "learning_rate"):
        assert getattr(cfg, name) == getattr(TRDPOConfig(), name), name
    assert (cfg.plot, cfg.disable_tqdm) == (False, True)
    # a flag wins over the record, also `none`
    args = parser.parse_args(["eval", "--model", "ckpt", "--max-prompt-length", "none", "--beta", "0.2"])
    cfg = cli.eval_config(args, {"max_prompt_length": 64, "beta": 0.3, "max_length": 40})
    assert (cfg.max_prompt_length, cfg.beta, cfg.max_length) == (None, 0.2, 40)


def test_optional_fields_take_none_and_bad_values_are_refused_naming_the_field(tmp_path):
    parser = cli.build_parser()
    optional = [f for f in FIELDS if type(None) in typing.get_args(HINTS[f.name])]
    assert {"save_total_limit", "loss_weights", "lr_scheduler_kwargs", "ref_dtype"} <= {f.name for f in optional}
    for f in optional:
        flag = _argv(f, "none", None)
        companions = EXAMPLES.get(f.name, ([],))[0]
        args = parser.parse_args(["train", "--data", "x.jsonl", *companions, *flag])
        assert getattr(args, f.name) is None and getattr(cli.resolve_config(args), f.name) is None, f.name
    assert cli.resolve_config(parser.parse_args(["train", "--save-total-limit", "none"])).save_total_limit is None
    # the command line: argparse's usage error (exit 2)
    for argv in (["--loss-weights", "1,x"], ["--lr-scheduler-kwargs", "[1]"], ["--lr-scheduler-kwargs", "{"],
                 ["--truncation-mode", "keep_end"], ["--tau", "2.5"], ["--loss-type", "sigmoid,,sft"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", *argv])
    # --config: one line naming the field and what it takes
    path = tmp_path / "c.json"
    for bad, match in (({"lr_scheduler_kwargs": [1]}, "field lr_scheduler_kwargs must be a JSON object or null"),
                       ({"save_total_limit": 2.5}, "field save_total_limit must be int or null"),
                       ({"bf16": 1}, "field bf16 must be bool"),
                       ({"truncation_mode": "keep_end"}, "field truncation_mode must be one of 'keep_prompt_end'"),
                       ({"label_smoothing": ["0.1"]}, "field label_smoothing must be float or a list of float")):
        path.write_text(json.dumps(bad))
        with pytest.raises(cli.UsageError, match=match):
            cli.resolve_config(parser.parse_args(["train", "--config", str(path)]))


def test_value_types_from_annotations():
    from typing import Literal, Optional

    @dataclasses.dataclass
    class C:
        a: Literal["x", "y"] = option("x", "a")
        b: list[int] | None = option(None, "b")
        c: tuple[str, ...] = option(("p",), "c")
        d: dict[str, float] | None = option(None, "d")
        e: int | str = option(0, "e")
        f: Optional[bool] = option(None, "f")
        g: list[Literal["tensorboard", "wandb"]] | str = option("none", "g")
        h: Literal["a", "b"] | list[Literal["a", "b"]] = option("a", "h")

    specs = {s.name: s for s in field_flags(C)}
    assert specs["a"].type.parse_text("y") == "y"
    with pytest.raises(Exception, match="one of 'x', 'y'"):
        specs["a"].type.parse_text("z")
    assert specs["b"].type.parse_text("1,2") == [1, 2] and specs["b"].type.parse_text("7") == [7]
    assert specs["b"].type.parse_text("[3]") == [3] and specs["b"].type.parse_text("none") is None
    assert specs["c"].type.parse_text("u,v") == ("u", "v") and specs["c"].from_json(["w"], "j") == ("w",)
    assert specs["d"].type.parse_text('{"m": 1}') == {"m": 1.0}
    with pytest.raises(ValueError, match="field d must be a JSON object or null"):
        specs["d"].from_json({"m": "1"}, "j")
    assert specs["e"].type.parse_text("4") == 4 and specs["e"].type.parse_text("four") == "four"
    assert specs["f"].type.parse_text("true") is True and specs["f"].from_json(None, "j") is None
    assert specs["g"].type.parse_text("wandb") == "wandb" and specs["g"].type.parse_text("tensorboard,wandb") == [
        "tensorboard", "wandb"]
    with pytest.raises(ValueError, match="field g must be str or a list of one of 'tensorboard', 'wandb'"):
        specs["g"].from_json(["mlflow"], "j")
    assert specs["h"].type.parse_text("b") == "b" and specs["h"].type.parse_text("b,a") == ["b", "a"]
    assert specs["b"].type.metavar() == "INT[,INT...]" and specs["d"].type.metavar() == "JSON"
    for bad in (set[int], list[list[int]], dict[int, str], list, object):
        with pytest.raises(TypeError, match="C.z"):
            value_type(bad, "C.z")


def test_a_field_added_to_trdpoconfig_gets_its_flags_with_no_cli_edit(monkeypatch, tmp_path):
    """The CLI is rebuilt over a TRDPOConfig with fields as the parallel features add them (LoRA, logging,
    packing): each gets its train flag, its eval flag where marked, its --config key and its README row."""
    import fasttrdpo.trainer

    @dataclasses.dataclass
    class Extended(TRDPOConfig):
        lora_r: int = option(0, "LoRA rank (0: full fine-tuning)")
        lora_target_modules: list[str] | str | None = option(None, "modules that get adapters")
        report_to: list[typing.Literal["tensorboard", "wandb"]] | None = option(None, "where metrics also go")
        packing: bool = option(False, "pack pairs into rows", eval="flag")

    monkeypatch.setattr(fasttrdpo.trainer, "TRDPOConfig", Extended)
    try:
        extended_cli = importlib.reload(cli)
        parser = extended_cli.build_parser()
        args = parser.parse_args(["train", "--data", "x.jsonl", "--lora-r", "8", "--lora-target-modules",
                                  "q_proj,v_proj", "--report-to", "wandb", "--packing"])
        cfg = extended_cli.resolve_config(args)
        assert isinstance(cfg, Extended)
        assert (cfg.lora_r, cfg.lora_target_modules, cfg.report_to, cfg.packing) == (8, ["q_proj", "v_proj"],
                                                                                     ["wandb"], True)
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"lora_target_modules": "all-linear", "report_to": ["tensorboard"]}))
        cfg = extended_cli.resolve_config(parser.parse_args(["train", "--data", "x.jsonl", "--config", str(path)]))
        assert (cfg.lora_target_modules, cfg.report_to) == ("all-linear", ["tensorboard"])
        assert extended_cli.eval_config(parser.parse_args(["eval", "--model", "m", "--packing"]), {}).packing is True
        with pytest.raises(SystemExit):
            parser.parse_args(["eval", "--model", "m", "--lora-r", "8"])
        table = extended_cli.readme_flags()
        assert "| `--lora-target-modules STR[,STR...]` |  | modules that get adapters (default: none) |" in table
        assert "| `--packing` / `--no-packing` | yes | pack pairs into rows (default: False) |" in table
    finally:
        monkeypatch.undo()
        importlib.reload(cli)


def test_the_readme_lists_exactly_the_parsers_flags():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    table = cli.readme_flags()
    assert table in readme, "README.md's flag tables are out of date: run .venv/bin/python scripts/readme_flags.py"
    for spec in cli.CONFIG_FLAGS:  # every field's flag is in the table, with its help text
        assert f"`{spec.flag}" in table and spec.help.split("(")[0].strip()[:30] in table.replace("\\|", "|")
