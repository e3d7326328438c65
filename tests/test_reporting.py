"""report_to (TensorBoard, wandb offline) beside metrics.jsonl, and the trainer's TRL metric names including the
policy's entropy and mean token accuracy (checked against float64 from full logits)."""
import copy
import glob
import json
import os

import numpy as np
import pytest
import torch

from fasttrdpo.data import synthetic_preference_dataset
from fasttrdpo.tiny import tiny_model, tiny_tokenizer
from fasttrdpo.trainer import TRDPOConfig, TRDPOTrainer
from fasttrdpo.training.reporting import normalize_report_to, scalar_items

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                learning_rate=1e-3, logging_steps=1, save_steps=0, plot=False, disable_tqdm=True, tau=100)
    base.update(kw)
    return TRDPOConfig(**base)


def _records(cfg):
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_report_to_values_and_errors():
    assert normalize_report_to("none") == [] and normalize_report_to(None) == []
    assert normalize_report_to("tensorboard") == ["tensorboard"]
    assert normalize_report_to(["wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]
    with pytest.raises(ValueError, match="report_to.*unknown"):
        TRDPOConfig(report_to="mlflow")
    with pytest.raises(ValueError, match="report_to.*'none'"):
        TRDPOConfig(report_to=["none", "wandb"])
    with pytest.raises(ValueError, match="report_to"):
        TRDPOConfig(report_to=3)
    # the Trainer's names: eval_x -> eval/x, k -> train/k; step and non-numbers are not scalars
    assert dict(scalar_items({"step": 3, "loss": 1.5, "eval_loss": 2.0, "rewards/chosen": 0.1, "run": "x",
                              "flag": True})) == {"train/loss": 1.5, "eval/loss": 2.0, "train/rewards/chosen": 0.1}


def test_missing_package_fails_at_construction_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"fasttrdpo\[wandb\]"):
        TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(8, seed=0),
                     _config(tmp_path, report_to=["tensorboard", "wandb"]))
    assert not os.path.exists(tmp_path / "out")  # nothing was written


def test_trainer_logs_trl_names_with_entropy_and_token_accuracy_equal_to_float64(tmp_path):
    policy = tiny_model(0, **SMALL)
    policy0 = copy.deepcopy(policy).double().requires_grad_(False)
    trainer = TRDPOTrainer(policy, tiny_tokenizer(), synthetic_preference_dataset(8, seed=0), _config(tmp_path))
    batch = trainer.collator([trainer.train_pairs[i] for i in trainer._step_indices(0)[0]])
    logits = policy0(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    mask = labels != -100
    logp = torch.log_softmax(logits, -1)
    entropy = float((-(logp.exp() * logp).sum(-1))[mask].mean())
    P = labels.shape[0] // 2
    correct = (logits.argmax(-1) == labels)[:P][mask[:P]]
    accuracy = float(correct.double().mean())
    trainer.train()
    first = _records(trainer.config)[0]
    # TRL 1.16's DPOTrainer per-step names (trl/trainer/dpo_trainer.py, compute_loss), num_tokens aside
    trl_names = {"loss", "entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected", "rewards/chosen",
                 "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                 "grad_norm", "learning_rate", "epoch"}
    assert trl_names <= set(first)
    # fp32 logits of a tiny model (|z| < 10): ~1e-6 absolute on the entropy; 1e-5 leaves margin
    assert abs(first["entropy"] - entropy) < 1e-5
    assert first["mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-7)

    off = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(8, seed=0),
                       _config(tmp_path / "off", log_token_stats=False, max_steps=1))
    off.train()
    assert "entropy" not in _records(off.config)[0] and "mean_token_accuracy" not in _records(off.config)[0]


def test_tensorboard_event_file_holds_the_metrics_jsonl_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _config(tmp_path, report_to="tensorboard", max_steps=3)
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(8, seed=0), cfg)
    trainer.train()
    records = [r for r in _records(cfg) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    runs = glob.glob(os.path.join(cfg.output_dir, "runs", trainer.run_id, "events.out.tfevents.*"))
    assert len(runs) == 1
    acc = EventAccumulator(runs[0], size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("loss", "entropy", "mean_token_accuracy", "rewards/accuracies", "logps/chosen", "grad_norm"):
        assert f"train/{key}" in tags
    for tag in tags:
        key = tag[len("train/"):]
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in records]
        # TensorBoard stores scalars as float32: the jsonl value rounded to float32, exactly
        assert [e.value for e in events] == [float(np.float32(r[key])) for r in records], tag


def test_wandb_offline_run_holds_the_metrics_jsonl_values(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.makedirs(tmp_path / "wandb")
    cfg = _config(tmp_path, report_to="wandb", max_steps=2, run_name="tiny-run")
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(8, seed=0), cfg)
    logged = []
    real_init = wandb.init

    def init(*a, **kw):  # keep wandb's own run, and what the trainer hands it
        run = real_init(*a, **kw)
        real_log = run.log
        run.log = lambda data, step=None, **k: (logged.append((step, dict(data))), real_log(data, step=step, **k))[1]
        return run

    monkeypatch.setattr(wandb, "init", init)
    trainer.train()
    records = [r for r in _records(cfg) if "loss" in r]
    assert [s for s, _ in logged] == [r["step"] for r in records]
    for (step, data), r in zip(logged, records):
        assert data["train/loss"] == r["loss"] and data["train/entropy"] == r["entropy"]
        assert data["train/mean_token_accuracy"] == r["mean_token_accuracy"]
    # the offline run directory wandb wrote, under WANDB_DIR, with the run id of the trainer's run
    files = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / f"run-{trainer.run_id}.wandb"))
    assert len(files) == 1 and os.path.getsize(files[0]) > 0


def test_cli_report_to_flag_and_config_file(tmp_path):
    from fasttrdpo.cli import UsageError, build_parser, resolve_run

    parser = build_parser()
    cfg, _, _ = resolve_run(parser.parse_args(["train", "--report-to", "tensorboard,wandb", "--no-log-token-stats"]))
    assert cfg.report_to == ["tensorboard", "wandb"] and cfg.log_token_stats is False
    cfg, _, _ = resolve_run(parser.parse_args(["train", "--report-to", "none"]))
    assert cfg.report_to == "none"
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"report_to": ["tensorboard"]}))
    cfg, _, _ = resolve_run(parser.parse_args(["train", "--config", str(path)]))
    assert cfg.report_to == ["tensorboard"]
    path.write_text(json.dumps({"report_to": 3}))
    with pytest.raises(UsageError, match="report_to"):
        resolve_run(parser.parse_args(["train", "--config", str(path)]))
