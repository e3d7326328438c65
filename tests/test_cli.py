"""The CLI: a short `fasttrdpo train` writes metrics.jsonl, checkpoints, the plot and a summary;
`fasttrdpo eval` on its checkpoint reproduces the final evaluation; flags map onto TRDPOConfig."""
import json
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
