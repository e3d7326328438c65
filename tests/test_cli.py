"""The CLI: a short `fasttrdpo train` writes metrics.jsonl, checkpoints, the plot and a summary;
`fasttrdpo eval` on its checkpoint reproduces the final evaluation; flags map onto TRDPOConfig."""
import json
import math
import os
import subprocess
import sys

import pytest

from fasttrdpo import cli
from fasttrdpo.trainer import TRL_METRICS, TRDPOConfig, plot_metrics


def test_short_train_run_writes_metrics_checkpoint_and_plot_then_eval_reproduces_it(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "tiny", "--data", "synthetic", "--train-size", "128", "--eval-size", "16",
                   "--max-steps", "6", "--save-steps", "3", "--eval-steps", "3", "--logging-steps", "2",
                   "--per-device-train-batch-size", "4", "--tau", "2", "--output-dir", str(out), "--disable-tqdm"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "held-out reward accuracy:" in printed and "KL(policy || reference)" in printed
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [0, 3, 6]
    for r in train:
        assert all(k in r for k in TRL_METRICS + ("learning_rate", "grad_norm", "epoch", "ref_updates"))
    assert [r["ref_updates"] for r in train] == [1, 2, 3]
    assert evals[0]["eval_kl/ref"] == 0.0 and evals[-1]["eval_kl/init"] > 0
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-6"]
    png = (out / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    final = json.load(open(out / "final_metrics.json"))
    assert final["eval_rewards/accuracies"] == evals[-1]["eval_rewards/accuracies"]

    # `fasttrdpo eval` on the checkpoint (policy + its reference/) on the same held-out pairs
    rc = cli.main(["eval", "--model", str(out / "checkpoint-6"), "--data", "synthetic", "--eval-size", "16",
                   "--output", str(tmp_path / "eval.json")])
    assert rc == 0
    ev = json.load(open(tmp_path / "eval.json"))
    assert ev["eval_pairs"] == 16
    assert ev["eval_rewards/accuracies"] == final["eval_rewards/accuracies"]
    assert abs(ev["eval_kl/ref"] - final["eval_kl/ref"]) <= 1e-6  # same weights, same pairs, same fp32 math
    assert "eval_kl/init" not in ev  # no --init-model given


def test_no_arguments_is_the_embedded_demo_and_flags_override():
    args = cli.build_parser().parse_args(["train"])
    cfg = cli.resolve_config(args)
    for k, v in cli.DEMO_DEFAULTS.items():
        assert getattr(cfg, k) == v, k
    args = cli.build_parser().parse_args(["train", "--tau", "7", "--lr", "0.5", "--no-plot", "--bf16",
                                          "--ref-dtype", "bfloat16", "--resume"])
    cfg = cli.resolve_config(args)
    assert (cfg.tau, cfg.learning_rate, cfg.plot, cfg.bf16, cfg.ref_dtype) == (7, 0.5, False, True, "bfloat16")
    assert cfg.resume_from_checkpoint == "latest" and cfg.alpha == cli.DEMO_DEFAULTS["alpha"]
    # a real model or dataset gets the library defaults (TRL's / the paper's), not the demo's
    cfg = cli.resolve_config(cli.build_parser().parse_args(["train", "--data", "x.jsonl"]))
    assert cfg.learning_rate == TRDPOConfig.learning_rate and cfg.tau == TRDPOConfig.tau
    with pytest.raises(ValueError, match="alpha"):
        cli.resolve_config(cli.build_parser().parse_args(["train", "--alpha", "2"]))


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"tau": 64, "beta": 0.05, "bf16": True}))
    cfg = cli.resolve_config(cli.build_parser().parse_args(["train", "--data", "d.jsonl", "--config", str(path),
                                                            "--beta", "0.2"]))
    assert (cfg.tau, cfg.beta, cfg.bf16) == (64, 0.2, True)
    path.write_text(json.dumps({"taus": 3}))
    with pytest.raises(cli.UsageError, match="unknown config field"):
        cli.resolve_config(cli.build_parser().parse_args(["train", "--config", str(path)]))


def test_module_entry_point_help_lists_the_config_flags():
    res = subprocess.run([sys.executable, "-m", "fasttrdpo", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    for flag in ("--model", "--data", "--output-dir", "--max-steps", "--resume", "--tau", "--alpha", "--beta",
                 "--gradient-accumulation-steps", "--ref-dtype", "--bf16"):
        assert flag in res.stdout, flag


def test_plot_without_matplotlib_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_metrics([{"step": 1, "loss": 0.5, "rewards/accuracies": 1.0, "rewards/margins": 0.1}],
                        str(tmp_path / "x.png")) is None
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "x.png").exists()


def _jsonl(path, n, seed=0):
    from fasttrdpo.data import synthetic_preference_dataset

    with open(path, "w") as f:
        for row in synthetic_preference_dataset(n, seed=seed):
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_file_data_holds_out_5_percent_eval_reads_the_checkpoint_and_the_headline_says_what_it_measures(
        tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="fasttrdpo")
    data = _jsonl(tmp_path / "pairs.jsonl", 60)
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "tiny", "--data", data, "--max-steps", "4", "--per-device-train-batch-size", "4",
                   "--tau", "2", "--alpha", "1", "--loss-type", "hinge", "--beta", "0.2", "--max-length", "40",
                   "--lr", "1e-3", "--logging-steps", "2", "--save-steps", "0", "--no-plot", "--output-dir", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "held out the last 3 of the 60 pairs" in caplog.text  # ceil(5% of 60)
    assert "Writing model shards" not in captured.err  # no transformers bar through the training output
    printed = captured.out
    assert "training_curves.png" not in printed and not (out / "training_curves.png").exists()
    # a hard update (alpha 1) at the last step: the headline says the reference is the policy
    assert "held-out reward accuracy: 0.000 on 3 pairs" in printed
    assert "updated at this very step 4" in printed and "the reference equals the policy" in printed
    final = json.load(open(out / "final_metrics.json"))
    ckpt = str(out / "checkpoint-4")
    assert "tokenizer_config.json" in os.listdir(os.path.join(ckpt, "reference"))  # self-contained

    # eval with no --data: the run's own held-out pairs, its loss type, beta and max_length, its step
    rc = cli.main(["eval", "--model", ckpt, "--init-model", "tiny", "--output", str(tmp_path / "e1.json")])
    assert rc == 0
    e1 = json.load(open(tmp_path / "e1.json"))
    assert (e1["loss_type"], e1["beta"], e1["max_length"]) == ("hinge", 0.2, 40)
    assert (e1["step"], e1["ref_updates"], e1["eval_pairs"]) == (4, 2, 3)
    assert abs(e1["eval_loss"] - final["eval_loss"]) <= 1e-6  # same weights, pairs and loss: fp32 round-off
    # --data FILE --eval-size 3: the same last 3 pairs training held out
    rc = cli.main(["eval", "--model", ckpt, "--data", data, "--eval-size", "3", "--output", str(tmp_path / "e2.json")])
    assert rc == 0
    e2 = json.load(open(tmp_path / "e2.json"))
    assert e2["eval_loss"] == e1["eval_loss"] and e2["eval_kl/ref"] == e1["eval_kl/ref"]
    # a flag overrides the recorded setting, and says so
    rc = cli.main(["eval", "--model", ckpt, "--loss-type", "sigmoid", "--output", str(tmp_path / "e3.json")])
    assert rc == 0
    assert "--loss-type sigmoid overrides the checkpoint's loss_type = hinge" in caplog.text
    assert json.load(open(tmp_path / "e3.json"))["loss_type"] == "sigmoid"


def _tiny_llama_and_tokenizer():
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fasttrdpo.data import synthetic_preference_dataset

    texts = [r[k] for r in synthetic_preference_dataset(64, seed=1) for k in ("prompt", "chosen", "rejected")]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), tok


def test_eval_of_a_llama_checkpoint_loads_from_the_checkpoint_alone(tmp_path):
    from fasttrdpo.data import synthetic_preference_dataset
    from fasttrdpo.trainer import TRDPOTrainer

    model, tok = _tiny_llama_and_tokenizer()
    cfg = TRDPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, save_steps=0,
                      plot=False, disable_tqdm=True, max_length=48)
    TRDPOTrainer(model, tok, synthetic_preference_dataset(8, seed=0), cfg).train()
    ckpt = tmp_path / "run" / "checkpoint-1"
    rc = cli.main(["eval", "--model", str(ckpt), "--data", _jsonl(tmp_path / "ev.jsonl", 4, seed=2),
                   "--output", str(tmp_path / "e.json")])
    assert rc == 0
    ev = json.load(open(tmp_path / "e.json"))
    assert ev["eval_pairs"] == 4 and ev["step"] == 1 and ev["eval_kl/ref"] >= 0


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    def run(*argv):
        rc = cli.main(list(argv))
        err = capsys.readouterr().err.strip().splitlines()
        return rc, err

    rc, err = run("train", "--loss-type", "dpo", "--output-dir", str(tmp_path / "x"))
    assert rc == 2 and len(err) == 1 and "loss_type" in err[0] and "Traceback" not in err[0]
    rc, err = run("train", "--loss-type", "sigmoid,dpo", "--output-dir", str(tmp_path / "x"))  # in a list too
    assert rc == 2 and len(err) == 1 and "loss_type" in err[0] and "'dpo'" in err[0]
    rc, err = run("train", "--loss-type", "sigmoid,sft", "--loss-weights", "1.0", "--output-dir", str(tmp_path / "x"))
    assert rc == 2 and len(err) == 1 and "loss_weights" in err[0]
    assert not (tmp_path / "x").exists()  # refused before anything was written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"alpha": 2}))
    rc, err = run("train", "--config", str(bad))
    assert rc == 2 and len(err) == 1 and "alpha must be in [0, 1]" in err[0]
    bad.write_text(json.dumps({"tau": "8"}))
    rc, err = run("train", "--config", str(bad))
    assert rc == 2 and len(err) == 1 and "field tau must be int" in err[0]
    rc, err = run("train", "--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "y"))
    assert rc == 2 and len(err) == 1 and "missing.jsonl" in err[0]


def test_config_file_describes_the_whole_run(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "tiny", "data": "pairs.jsonl", "eval_size": 7, "train_size": 50,
                                "tau": 16, "output_dir": "o", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}))
    cfg, run, origin = cli.resolve_run(cli.build_parser().parse_args(["train", "--config", str(path), "--eval-size", "9"]))
    assert (run["model"], run["data"], run["eval_size"], run["train_size"]) == ("tiny", "pairs.jsonl", 9, 50)
    assert (cfg.tau, cfg.output_dir, cfg.lr_scheduler_kwargs, origin["output_dir"]) == (16, "o", {"min_lr_rate": 0.1},
                                                                                         "config")
    assert cfg.learning_rate == TRDPOConfig.learning_rate  # not the demo: --data is a file
    args = cli.build_parser().parse_args(["train", "--no-disable-dropout", "--lr-scheduler-type", "cosine_with_min_lr",
                                          "--lr-scheduler-kwargs", '{"min_lr": 1e-7}', "--overwrite-output-dir"])
    cfg = cli.resolve_config(args)
    assert (cfg.disable_dropout, cfg.lr_scheduler_kwargs, cfg.overwrite_output_dir) == (False, {"min_lr": 1e-7}, True)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    import torch

    out = tmp_path / "run"
    common = ["train", "--model", "tiny", "--data", "synthetic", "--train-size", "64", "--eval-size", "0",
              "--per-device-train-batch-size", "4", "--save-steps", "1", "--no-plot", "--disable-tqdm",
              "--output-dir", str(out)]
    assert cli.main(common + ["--max-steps", "1"]) == 0
    real_save = torch.save

    def full(obj, f, *a, **k):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    rc = cli.main(common + ["--max-steps", "2", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("fasttrdpo train: error:") and "No space left on device" in err[-1]
    assert "checkpoint-2" in err[-1] and "previous checkpoint is intact" in err[-1]
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1"]  # no debris


def test_the_readme_main_command_reruns_over_its_own_demo_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output dir outputs/fasttrdpo lands here
    demo = ["train", "--max-steps", "1", "--train-size", "32", "--eval-size", "4", "--no-plot", "--disable-tqdm"]
    assert cli.main(demo) == 0
    first = json.load(open("outputs/fasttrdpo/checkpoint-1/trainer_state.json"))["run_id"]
    capsys.readouterr()
    assert cli.main(demo) == 0
    assert "replacing the previous demo run in outputs/fasttrdpo/" in capsys.readouterr().err
    assert json.load(open("outputs/fasttrdpo/checkpoint-1/trainer_state.json"))["run_id"] != first
    # another run's checkpoints in the default dir are not the demo's to replace; refused before any model or
    # data is loaded (a large model would take minutes to load only to be refused)
    loaded = []
    monkeypatch.setattr(cli, "load_model_and_tokenizer", lambda *a, **k: loaded.append(a) or (None, None))
    rc = cli.main(["train", "--data", _jsonl(tmp_path / "x.jsonl", 20), "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "holds checkpoints of run" in err[-1] and "--overwrite-output-dir" in err[-1]
    assert loaded == []


def test_loss_lists_from_flags_and_config_and_a_short_rpo_run(tmp_path):
    # --loss-type / --loss-weights / --label-smoothing take comma-separated lists; --config takes JSON lists
    args = cli.build_parser().parse_args(["train", "--loss-type", "sigmoid,sft", "--loss-weights", "1.0,0.5",
                                          "--label-smoothing", "0.1,0", "--discopop-tau", "0.2"])
    cfg = cli.resolve_config(args)
    assert (cfg.loss_type, cfg.loss_weights, cfg.label_smoothing, cfg.discopop_tau) == (
        ["sigmoid", "sft"], [1.0, 0.5], [0.1, 0.0], 0.2)
    cfg = cli.resolve_config(cli.build_parser().parse_args(["train", "--loss-type", "aot"]))
    assert (cfg.loss_type, cfg.loss_weights) == ("aot", None)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"loss_type": ["discopop", "sft"], "loss_weights": [1, 0.5], "discopop_tau": 0.3}))
    cfg = cli.resolve_config(cli.build_parser().parse_args(["train", "--config", str(path)]))
    assert (cfg.loss_type, cfg.loss_weights, cfg.discopop_tau) == (["discopop", "sft"], [1.0, 0.5], 0.3)
    for bad, match in (({"loss_weights": "1,0.5"}, "field loss_weights must be a list of float"),
                       ({"loss_type": ["sigmoid", 3]}, "field loss_type must be str or a list of str")):
        path.write_text(json.dumps(bad))
        with pytest.raises(cli.UsageError, match=match):
            cli.resolve_config(cli.build_parser().parse_args(["train", "--config", str(path)]))

    # a short run of the tiny model with RPO (sigmoid + 0.5·sft): the trainer's TRDPOLoss gets the list. At step 1
    # policy = reference, so sigmoid's part is ln 2 exactly and the rest is 0.5 x the sft loss an sft-only run
    # (same seed: same batch, same model) logs at its step 1.
    def step_losses(name, *loss_flags, steps):
        out = tmp_path / name
        rc = cli.main(["train", "--model", "tiny", "--data", "synthetic", "--train-size", "16", "--eval-size", "0",
                       "--max-steps", str(steps), "--per-device-train-batch-size", "2", "--logging-steps", "1",
                       "--save-steps", "0", "--no-plot", "--disable-tqdm", "--output-dir", str(out), *loss_flags])
        assert rc == 0
        recorded = json.load(open(out / f"checkpoint-{steps}" / "trainer_state.json"))["config"]
        return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r], recorded
    rpo, recorded = step_losses("rpo", "--loss-type", "sigmoid,sft", "--loss-weights", "1.0,0.5", steps=2)
    assert (recorded["loss_type"], recorded["loss_weights"]) == (["sigmoid", "sft"], [1.0, 0.5])
    sft, _ = step_losses("sft", "--loss-type", "sft", steps=1)
    assert len(rpo) == 2 and all(math.isfinite(v) for v in rpo) and sft[0] > 1.0  # a mean NLL of ~ln V
    # fp32 losses of magnitude ~6: a few ulps (1e-6 relative) apart
    assert math.isclose(rpo[0], math.log(2.0) + 0.5 * sft[0], rel_tol=1e-6)
    # `fasttrdpo eval` evaluates with the checkpoint's list and weights
    rc = cli.main(["eval", "--model", str(tmp_path / "rpo" / "checkpoint-2"), "--data", "synthetic", "--eval-size", "4",
                   "--output", str(tmp_path / "e.json")])
    ev = json.load(open(tmp_path / "e.json"))
    assert rc == 0 and (ev["loss_type"], ev["loss_weights"]) == (["sigmoid", "sft"], [1.0, 0.5])
