"""output_dir/final/ (fasttrdpo.training.final): save_pretrained format, loads with from_pretrained and gives the
trainer's logits; LoRA as an adapter or merged; final/reference/ when asked; the output-directory rules."""
import logging
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttrdpo.data import synthetic_preference_dataset
from fasttrdpo.tiny import tiny_model, tiny_tokenizer
from fasttrdpo.trainer import TRDPOConfig, TRDPOTrainer

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)


def _config(out, **kw):
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=3e-2, max_length=48,
                logging_steps=1, save_steps=0, plot=False, disable_tqdm=True, eval_kl=False, tau=1, alpha=0.5)
    base.update(kw)
    return TRDPOConfig(**base)


def _ids():
    return torch.tensor([[3, 10, 20, 30, 40, 50]])


@torch.no_grad()
def _logits(model):
    return model.eval()(input_ids=_ids()).logits


def test_final_full_model_and_reference_load_with_from_pretrained(tmp_path):
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(8, seed=0),
                           _config(tmp_path, save_reference=True))
    trainer.train()
    final = tmp_path / "final"
    assert trainer.ref_updates == 2
    loaded = AutoModelForCausalLM.from_pretrained(final)
    ref = AutoModelForCausalLM.from_pretrained(final / "reference")
    # the same fp32 weights through the same forward: identical logits
    assert torch.equal(_logits(loaded), _logits(trainer.model))
    assert torch.equal(_logits(ref), _logits(trainer.ref_model))
    assert not torch.equal(_logits(ref), _logits(loaded))  # alpha = 0.5: the reference is not the policy
    tok = AutoTokenizer.from_pretrained(final)
    assert tok("abc")["input_ids"] == trainer.tokenizer("abc")["input_ids"]
    assert not os.path.exists(tmp_path / ".tmp-final")


def test_final_lora_as_adapter_and_merged(tmp_path):
    from peft import PeftModel

    rows = synthetic_preference_dataset(8, seed=0)
    kw = dict(lora_r=4, lora_alpha=8.0, lora_reference="adapter", alpha=1.0, tau=1, save_reference=True)
    adapter = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), rows, _config(tmp_path / "a", **kw))
    adapter.train()
    final = tmp_path / "a" / "final"
    assert sorted(f for f in os.listdir(final) if "safetensors" in f) == ["adapter_model.safetensors"]
    policy = PeftModel.from_pretrained(tiny_model(0, **SMALL), final)
    assert torch.equal(_logits(policy), _logits(adapter.model))  # same base, same adapter, same forward
    reference = PeftModel.from_pretrained(tiny_model(0, **SMALL), final / "reference")
    with adapter.lora.active_adapter_context("ref"):
        expected_ref = _logits(adapter.model)
    assert torch.equal(_logits(reference), expected_ref)

    merged = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), rows,
                          _config(tmp_path / "m", save_merged=True, **kw))
    merged.train()
    final = tmp_path / "m" / "final"
    assert not os.path.exists(final / "adapter_config.json")
    full = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in n for n, _ in full.named_parameters())
    # W0 + s·B·A formed once in fp32 vs x·W0 + s·(x·A)·B: reassociated fp32 sums over 32-wide rows of logits of
    # magnitude ~1, a few 1e-7 each through one layer; 1e-5 leaves room and still catches a missing adapter
    # (that moves the logits by > 1e-3, checked below)
    torch.testing.assert_close(_logits(full), _logits(merged.model), rtol=0, atol=1e-5)
    assert float((_logits(full) - _logits(tiny_model(0, **SMALL))).abs().max()) > 1e-3
    ref_full = AutoModelForCausalLM.from_pretrained(final / "reference")
    with merged.lora.active_adapter_context("ref"):
        torch.testing.assert_close(_logits(ref_full), _logits(merged.model), rtol=0, atol=1e-5)


def test_final_follows_the_output_dir_rules(tmp_path, caplog):
    rows = synthetic_preference_dataset(8, seed=0)
    first = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), rows, _config(tmp_path))
    first.train()
    first_final = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "final"))
    # final/ alone is not another run: with the checkpoints gone, a new run starts and replaces it, with a notice
    for name in os.listdir(tmp_path):
        if name.startswith("checkpoint-"):
            shutil.rmtree(tmp_path / name)
    second = TRDPOTrainer(tiny_model(1, **SMALL), tiny_tokenizer(), rows, _config(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fasttrdpo"):
        second.train()
    assert any(f"of run {first.run_id}" in r.message for r in caplog.records)
    now = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "final"))
    assert torch.equal(now, _logits(second.model)) and not torch.equal(now, first_final)
    # a run killed after its last checkpoint but before final/: resuming the finished run writes final/
    shutil.rmtree(tmp_path / "final")
    resumed = TRDPOTrainer(tiny_model(1, **SMALL), tiny_tokenizer(), rows, _config(tmp_path, resume_from_checkpoint="latest"))
    resumed.train()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "final")), _logits(second.model))
    # overwrite_output_dir removes the previous run's final/ with its checkpoints (a debris .tmp-final too)
    os.makedirs(tmp_path / ".tmp-final")
    from fasttrdpo.training.output_dir import remove_run_outputs

    remove_run_outputs(str(tmp_path))
    assert not os.path.exists(tmp_path / "final") and not os.path.exists(tmp_path / ".tmp-final")


def test_save_merged_without_lora_raises(tmp_path):
    with pytest.raises(ValueError, match="save_merged"):
        TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), synthetic_preference_dataset(8, seed=0),
                     _config(tmp_path, save_merged=True))
