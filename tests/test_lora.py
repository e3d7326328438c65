"""LoRA in TRDPOTrainer (fasttrdpo.training.lora): against TRL's DPOTrainer + peft on the same rows, the exact
hard update of a reference adapter, the merged full-weight soft update against float64, adapter-only
checkpoints and a bit-exact resume, and every combination that cannot apply raising."""
import os

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("trl")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fasttrdpo.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from fasttrdpo.trainer import TRDPOConfig, TRDPOTrainer  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
STEPS = 3
ROWS = 4  # one batch of the whole data set per step: the same pairs in TRL's and our step, whatever the order


def _rows(n=ROWS):
    from test_trl_dpo_integration import _dataset

    return _dataset(n)


def _config(tmp_path, name="ours", **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=ROWS,
                learning_rate=3e-2, lr_scheduler_type="constant", logging_steps=1, max_length=48, save_steps=0,
                plot=False, disable_tqdm=True, eval_kl=False, lora_r=4, lora_alpha=8.0, seed=0)
    base.update(kw)
    return TRDPOConfig(**base)


def _trl_losses(tmp_path, model, **kw):
    from test_trl_dpo_integration import _args
    from trl import DPOTrainer

    callbacks = kw.pop("callbacks", [])
    trainer_kw = kw.pop("trainer_kw", {})
    trainer = DPOTrainer(model=model, args=_args(tmp_path, "trl", max_steps=STEPS, per_device_train_batch_size=ROWS,
                                                 learning_rate=3e-2, **kw),
                         train_dataset=_rows(), processing_class=tiny_tokenizer(), **trainer_kw)
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer


def _logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def _assert_same_trajectory(ours, trl_logs):
    assert len(ours.history) == len(trl_logs) == STEPS
    a = torch.tensor([h["loss"] for h in ours.history], dtype=torch.float64)
    b = torch.tensor([h["loss"] for h in trl_logs], dtype=torch.float64)
    assert float((b - b[0]).abs().max()) > 1e-3  # the adapter moved the loss, or equal curves would prove nothing
    # fp32 log-probs summed in another order (~1e-7 relative per row) through 3 Adam steps: 1e-5 relative
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    for key in ("logps/chosen", "logps/rejected", "rewards/accuracies"):
        torch.testing.assert_close(torch.tensor([h[key] for h in ours.history], dtype=torch.float64),
                                   torch.tensor([h[key] for h in trl_logs], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=key)


def test_base_reference_matches_trl_dpo_with_peft_config(tmp_path):
    """lora_reference='base' (sync off) = TRL's DPOTrainer(peft_config=...): the reference is the base with the
    adapter off. Same initial adapter (ours copied into TRL's), same rows, fp32."""
    ours = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), _rows(), _config(tmp_path, sync_ref_model=False))
    initial = {k: v.clone() for k, v in get_peft_model_state_dict(ours.model).items()}
    assert sorted(ours.model.peft_config["default"].target_modules) == ["query_key_value"]  # peft's GPTNeoX default
    trl = _trl_losses(tmp_path, tiny_model(0, **SMALL), sync_ref_model=False,
                      trainer_kw=dict(peft_config=LoraConfig(r=4, lora_alpha=8.0, task_type="CAUSAL_LM")))
    set_peft_model_state_dict(trl.model, initial)
    assert "ref" not in trl.model.peft_config  # TRL's reference here: adapters disabled
    trl.train()
    ours.train()
    _assert_same_trajectory(ours, _logs(trl))
    # only the adapter trained: the optimizer holds the LoRA factors of "default" and nothing else
    trained = {id(p) for g in ours.optimizer.param_groups for p in g["params"]}
    lora = {id(p) for n, p in ours.model.named_parameters() if ".default." in n}
    assert trained == lora and len(lora) == 2  # lora_A, lora_B of the one query_key_value


class _CopyAdapterEveryTau:
    """The hard update written out independently of fasttrdpo: copy adapter 'default' into 'ref' every tau steps."""

    def __new__(cls, tau):
        from transformers import TrainerCallback

        class Cb(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % tau == 0:
                    with torch.no_grad():
                        for n, p in model.named_parameters():
                            if ".default." in n:
                                model.get_parameter(n.replace(".default.", ".ref.")).copy_(p)
        return Cb()


def test_adapter_reference_hard_update_matches_trl_and_is_exact(tmp_path):
    """lora_reference='adapter', alpha=1, tau=2 vs TRL's DPOTrainer on a PeftModel (it adds the "ref" adapter,
    a copy of "default", as reference) with the copy done every 2 steps (TRL refuses sync_ref_model with PEFT)."""
    peft_cfg = LoraConfig(r=4, lora_alpha=8.0, task_type="CAUSAL_LM")
    torch.manual_seed(3)
    start = get_peft_model(tiny_model(0, **SMALL), peft_cfg)
    with torch.no_grad():  # a non-zero starting delta, so the reference adapter matters from step 1
        for n, p in start.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    initial = {k: v.clone() for k, v in get_peft_model_state_dict(start).items()}
    ours = TRDPOTrainer(start, tiny_tokenizer(), _rows(),
                        _config(tmp_path, lora_r=0, lora_alpha=32.0, lora_reference="adapter", alpha=1.0, tau=2))
    trl_model = get_peft_model(tiny_model(0, **SMALL), peft_cfg)
    set_peft_model_state_dict(trl_model, initial)
    trl = _trl_losses(tmp_path, trl_model, sync_ref_model=False, callbacks=[_CopyAdapterEveryTau(2)])
    assert "ref" in trl.model.peft_config
    copies = []
    original = ours.updater.update

    def checked_update():  # right after each update: the reference adapter equals the policy's, bit for bit
        original()
        copies.append([(n, torch.equal(ours.model.get_parameter(n.replace(".default.", ".ref.")), p))
                       for n, p in ours.model.named_parameters() if ".default." in n and "lora_" in n])

    ours.updater.update = checked_update
    trl.train()
    ours.train()
    _assert_same_trajectory(ours, _logs(trl))
    assert ours.ref_updates == 1 and len(copies) == 1 and len(copies[0]) == 2
    assert all(equal for _, equal in copies[0]), copies
    # step 3 moved the policy only: the reference adapter still holds step 2's factors
    assert not torch.equal(*[p for n, p in ours.model.named_parameters() if "lora_B" in n and (".default." in n
                                                                                                 or ".ref." in n)])
    # the "init" view (KL to the initial policy) is the starting adapter, a frozen copy
    assert ours.lora.init_adapter == "init"


def test_merged_reference_soft_update_equals_the_float64_formula(tmp_path):
    """lora_reference='merged', alpha=0.5, tau=1: after each step ref <- ref + 0.5·(W0 + s·B·A - ref) on the full
    weights of every LoRA layer, checked against the float64 recurrence over the adapters the steps produced."""
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), _rows(),
                           _config(tmp_path, lora_reference="merged", alpha=0.5, tau=1))
    seen = []
    original = trainer.updater.update

    def capture():
        layer = trainer.model.get_base_model().gpt_neox.layers[0].attention.query_key_value
        seen.append((layer.lora_B["default"].weight.detach().double().clone(),
                     layer.lora_A["default"].weight.detach().double().clone()))
        original()

    trainer.updater.update = capture
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    qkv = trainer.model.get_base_model().gpt_neox.layers[0].attention.query_key_value
    init_B, init_A = qkv.lora_B["default"].weight.detach().double().clone(), qkv.lora_A["default"].weight.detach().double().clone()
    assert not init_B.any()
    w0 = ref_before[name].double()
    trainer.train()
    assert len(seen) == STEPS and trainer.ref_updates == STEPS
    s = 8.0 / 4  # lora_alpha / r
    ref64, bound = w0.clone(), torch.zeros_like(w0)
    u = 2.0 ** -24
    for B, A in seen:
        weff = w0 + s * (B @ A)
        ref64 = ref64 + 0.5 * (weff - ref64)
        # per update: the fp32 product B·A (r = 4 terms, gamma_4 = 4u/(1-4u)) scaled by s, the sum W0 + delta,
        # and the blend r + a(p - r) (3 roundings of values <= |r| + |p|); earlier errors shrink by (1 - a)
        bound = 0.5 * bound + s * (4 * u / (1 - 4 * u)) * (B.abs() @ A.abs()) + 4 * u * (ref64.abs() + weff.abs())
    got = dict(trainer.ref_model.named_parameters())[name].double()
    assert float((got - w0).abs().max()) > 1e-4  # the reference moved
    assert bool(((got - ref64).abs() <= bound + 1e-30).all()), float((got - ref64).abs().max())
    # a factor blend (what lora_soft='factors' does on a reference adapter) lands elsewhere: the cross terms
    Br, Ar = init_B, init_A  # a reference adapter starts as the initial adapter (B = 0)
    for B, A in seen:
        Br, Ar = Br + 0.5 * (B - Br), Ar + 0.5 * (A - Ar)
    assert float((w0 + s * (Br @ Ar) - ref64).abs().max()) > 100 * float(bound.max())
    for n, p in trainer.ref_model.named_parameters():  # weights outside the LoRA layers never move
        if n != name:
            assert torch.equal(p, ref_before[n]), n


@pytest.mark.parametrize("reference", ["adapter", "merged"])
def test_checkpoint_holds_adapters_only_and_resume_is_bit_exact(tmp_path, reference):
    kw = dict(lora_reference=reference, alpha=1.0 if reference == "adapter" else 0.5, tau=2, max_steps=4,
              per_device_train_batch_size=2, save_steps=2, save_total_limit=None)
    rows = _rows(8)
    straight = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), rows, _config(tmp_path, "a", **kw))
    straight.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    tensors = {}
    for root, _, files in os.walk(ckpt):
        for f in files:
            if f.endswith(".safetensors"):
                tensors.update({f"{os.path.relpath(root, ckpt)}/{f}:{k}": v
                                for k, v in load_file(os.path.join(root, f)).items()})
    adapters = [k for k in tensors if "lora_" in k.split(":")[1]]
    if reference == "adapter":
        assert len(tensors) == len(adapters) == 4  # lora_A/lora_B of "default" and of "ref", nothing else
        assert sorted(k.split(":")[0] for k in tensors) == ["./adapter_model.safetensors"] * 2 + \
            ["ref/adapter_model.safetensors"] * 2
    else:  # the adapter + the merged reference's LoRA-layer weight (the only reference weight that moves)
        assert len(adapters) == 2 and len(tensors) == 3
        assert any(k.endswith("reference_lora_layers.safetensors:gpt_neox.layers.0.attention.query_key_value.weight")
                   for k in tensors)
    assert not os.path.exists(ckpt / "model.safetensors") and not os.path.exists(ckpt / "reference")

    part = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), rows, _config(tmp_path, "b", **{**kw, "max_steps": 2}))
    part.train()
    resumed = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), rows,
                           _config(tmp_path, "b", **{**kw, "resume_from_checkpoint": "latest"}))
    resumed.train()
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    for (n, p), (_, q) in zip(straight.ref_model.named_parameters(), resumed.ref_model.named_parameters()):
        assert torch.equal(p, q), n
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    assert straight.fingerprints() == resumed.fingerprints()


def test_combinations_that_cannot_apply_raise(tmp_path):
    tok, rows = tiny_tokenizer(), _rows()

    def make(model=None, **kw):
        return TRDPOTrainer(model or tiny_model(0, **SMALL), tok, rows, _config(tmp_path, **kw))

    with pytest.raises(ValueError, match="never moves"):
        make()  # lora_reference 'base' (default) with sync_ref_model=True (default)
    with pytest.raises(ValueError, match="lora_soft='factors'"):
        make(lora_reference="adapter", alpha=0.6)
    make(lora_reference="adapter", alpha=0.6, lora_soft="factors")  # the labelled approximation, opted into
    with pytest.raises(ValueError, match="applies only"):
        make(lora_reference="merged", alpha=0.6, lora_soft="factors")
    with pytest.raises(ValueError, match="lm_head"):
        make(sync_ref_model=False, lora_target_modules=["query_key_value", "lm_head"])
    with pytest.raises(ValueError, match="ref_model is given"):
        TRDPOTrainer(tiny_model(0, **SMALL), tok, rows, _config(tmp_path, sync_ref_model=False),
                     ref_model=tiny_model(0, **SMALL))
    with pytest.raises(ValueError, match="already a PeftModel"):
        make(get_peft_model(tiny_model(0, **SMALL), LoraConfig(r=2, task_type="CAUSAL_LM")), sync_ref_model=False)
    with pytest.raises(ValueError, match="no adapter to save"):
        make(sync_ref_model=False, save_reference=True, save_merged=False)
    with pytest.raises(ValueError, match="no separate copy"):
        make(sync_ref_model=False, ref_dtype="bfloat16")
    with pytest.raises(ValueError, match="LoRA training only"):
        make(lora_r=0, lora_alpha=32.0, save_merged=True)
    with pytest.raises(ValueError, match="lora_target_modules is set but lora_r = 0"):
        _config(tmp_path, lora_r=0, lora_alpha=32.0, lora_target_modules=["dense"])
    with pytest.raises(ValueError, match="lora_dropout > 0 with disable_dropout"):
        _config(tmp_path, lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_reference must be"):
        _config(tmp_path, lora_reference="frozen")
    for packing in ({"packing": True}, {"share_prompt": True}):  # untested together: refused, never run
        with pytest.raises(ValueError, match="packing / share_prompt with LoRA"):
            make(sync_ref_model=False, **packing)


def test_cli_lora_flags(tmp_path):
    from fasttrdpo.cli import build_parser, resolve_config

    args = build_parser().parse_args(["train", "--lora-r", "8", "--lora-alpha", "16", "--lora-target-modules",
                                      "query_key_value,dense", "--lora-reference", "adapter", "--alpha", "1.0",
                                      "--save-merged", "--save-reference", "--output-dir", str(tmp_path)])
    c = resolve_config(args)
    assert (c.lora_r, c.lora_alpha, c.lora_target_modules, c.lora_reference) == (8, 16.0, ["query_key_value", "dense"],
                                                                                   "adapter")
    assert c.save_merged is True and c.save_reference is True and c.alpha == 1.0


def test_merged_updater_validates_before_writing_the_reference(tmp_path):
    """The merged reference is written only after every input is checked: a NaN in a trained non-LoRA
    parameter, or an updater state missing a key, raises with the reference untouched."""
    trainer = TRDPOTrainer(tiny_model(0, **SMALL), tiny_tokenizer(), _rows(),
                           _config(tmp_path, lora_reference="merged", alpha=0.5, tau=1))
    updater = trainer.updater
    qkv = trainer.model.get_base_model().gpt_neox.layers[0].attention.query_key_value
    with torch.no_grad():
        qkv.lora_B["default"].weight.fill_(0.25)  # the LoRA layers would move the reference
        norm = trainer.model.get_base_model().gpt_neox.final_layer_norm.weight
        norm.requires_grad_(True)  # a trained non-LoRA parameter (as modules_to_save makes one) ...
        norm[0] = float("nan")  # ... holding a NaN
    before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}

    def unchanged():
        return all(torch.equal(p, before[n]) for n, p in trainer.ref_model.named_parameters())

    with pytest.raises(ValueError, match="final_layer_norm.weight holds NaN/inf"):
        updater.update()
    assert unchanged() and updater.num_updates == 0
    state = updater.state_dict(ref_weights=True)
    state["ref"] = {n: t + 1 for n, t in state["ref"].items()}  # would change the reference if copied
    del state["num_updates"]
    with pytest.raises(ValueError, match="missing \\['num_updates'\\]"):
        updater.load_state_dict(state)
    assert unchanged()


def test_the_adapters_random_start_follows_config_seed(tmp_path):
    """Two trainers with the same config start from the same adapter whatever the global RNG held before
    (peft draws lora_A at random), and the caller's RNG stream is left where it was."""
    tok, rows = tiny_tokenizer(), _rows()
    adapters = []
    for burn in (0, 5):
        torch.manual_seed(1234)
        torch.rand(burn)
        before = torch.get_rng_state()
        trainer = TRDPOTrainer(tiny_model(0, **SMALL), tok, rows, _config(tmp_path, name=f"seed{burn}",
                                                                          sync_ref_model=False))
        assert torch.equal(torch.get_rng_state(), before)
        adapters.append(get_peft_model_state_dict(trainer.model))
    assert adapters[0].keys() == adapters[1].keys()
    assert any(bool(t.abs().sum() > 0) for t in adapters[0].values())  # lora_A is random, not zero
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
