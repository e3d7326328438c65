"""`fasttrdpo eval` on a LoRA run's checkpoint (adapters only): the base the run recorded + its adapters, the
reference as the run defined it (base / 'ref' adapter / merged weights), the same numbers as the trainer's own
evaluation at that step; an adapter without its run's settings (final/ as an adapter) is refused in one line."""
import json

import pytest

pytest.importorskip("peft")
from fasttrdpo import cli  # noqa: E402

MODES = {"base": ["--no-sync-ref-model"],
         "adapter": ["--lora-reference", "adapter", "--alpha", "1.0", "--tau", "2"],
         "merged": ["--lora-reference", "merged", "--alpha", "0.5", "--tau", "2"]}


@pytest.mark.parametrize("reference", sorted(MODES))
def test_eval_of_a_lora_checkpoint_reproduces_the_trainers_evaluation(tmp_path, reference, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "tiny", "--data", "synthetic", "--train-size", "16", "--eval-size", "8",
                   "--max-steps", "3", "--save-steps", "3", "--eval-steps", "3", "--logging-steps", "1",
                   "--per-device-train-batch-size", "4", "--lr", "0.05", "--lr-scheduler-type", "constant", "--lora-r", "4", "--lora-alpha", "8",
                   *MODES[reference], "--output-dir", str(out), "--disable-tqdm", "--no-plot", "--save-total-limit",
                   "none"])
    assert rc == 0
    evals = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if "eval_loss" in r}
    at3 = evals[3]
    # the run moved (policy off its start; with a reference that moved too, the reference is not the policy: a
    # non-zero margin), so evaluating the untrained base or against the wrong reference would not match
    assert evals[0]["eval_kl/init"] == 0.0 and at3["eval_kl/init"] > 1e-5
    assert abs(at3["eval_rewards/margins"]) > 1e-4
    rc = cli.main(["eval", "--model", str(out / "checkpoint-3"), "--output", str(tmp_path / "e.json")])
    assert rc == 0, capsys.readouterr().err
    ev = json.load(open(tmp_path / "e.json"))
    assert ev["step"] == 3 and ev["eval_pairs"] == 8
    # same weights, same pairs, same fp32 math in the same order: equal up to fp32 summation noise (the metrics
    # file rounds to 4 significant digits, so compare at that precision: 5e-4 relative)
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen"):
        assert abs(ev[key] - at3[key]) <= 5e-4 * abs(at3[key]) + 1e-9, (key, ev[key], at3[key])


def test_eval_of_an_adapter_without_its_runs_settings_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "tiny", "--data", "synthetic", "--train-size", "8", "--eval-size", "4",
                   "--max-steps", "1", "--save-steps", "0", "--per-device-train-batch-size", "4", "--lora-r", "4",
                   "--no-sync-ref-model", "--output-dir", str(out), "--disable-tqdm", "--no-plot"])
    assert rc == 0 and (out / "final" / "adapter_config.json").exists()
    capsys.readouterr()
    rc = cli.main(["eval", "--model", str(out / "final")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "LoRA adapter" in err and "not supported" in err


def test_lora_with_ddp_or_with_kto_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """Neither combination is proven yet (no equal-to-one-process DDP test, no KTO-vs-formula test with
    adapters): each raises at construction, naming LoRA, rather than running unchecked."""
    from fasttrdpo.tiny import tiny_model, tiny_tokenizer
    from fasttrdpo.trainer import TRDPOConfig, TRDPOTrainer, TRKTOTrainer

    rows = [{"prompt": f"Q: {w}?", "completion": f" {w} {w}.", "label": i % 2 == 0}
            for i, w in enumerate(["cat", "dog", "sun", "sky"])]
    cfg = TRDPOConfig(trainer="kto", output_dir=str(tmp_path / "kto"), per_device_train_batch_size=2, max_steps=1,
                      lora_r=4, sync_ref_model=False, plot=False, disable_tqdm=True)
    with pytest.raises(ValueError, match="LoRA .*trainer='kto' is not supported"):
        TRKTOTrainer(tiny_model(seed=0, hidden_size=32), tiny_tokenizer(), rows, cfg)

    pairs = [{"prompt": "Q: cat?", "chosen": " cat.", "rejected": " dog."}] * 4
    cfg = TRDPOConfig(output_dir=str(tmp_path / "ddp"), per_device_train_batch_size=2, max_steps=1, lora_r=4,
                      sync_ref_model=False, plot=False, disable_tqdm=True, device="cpu")
    # torchrun's environment for rank 0 of 2 (no rendezvous address: the refusal must come before any group is made)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="LoRA .*distributed training \\(world size 2\\) is not supported"):
        TRDPOTrainer(tiny_model(seed=0, hidden_size=32), tiny_tokenizer(), pairs, cfg)
    import torch.distributed as dist

    assert not dist.is_initialized()
