"""FusedSyncRefModelCallback.replace_in inside TRL's GRPOTrainer, RLOOTrainer and KTOTrainer (sync_ref_model=True).

Each trainer is built on CPU from a tiny GPTNeoX saved once per module (GRPO/RLOO build their reference from
the policy's path, so the policy is passed as a path), fp32, 4 optimizer steps, τ = 2 (syncs at steps 2 and 4).
GRPO and RLOO generate 2 completions of at most 3 tokens per prompt and are rewarded by a Python function.

Peer: TRL's own SyncRefModelCallback runs in the same training run on copies of the initial reference, so both
callbacks blend toward the very same policy at the very same steps and the comparison isolates the blend (two
separate runs would also compare two training trajectories). One run per trainer covers α = 0.6 (the trainer's
own reference, ours through replace_in) and α = 1 (a copy each for ours and TRL's).

Bound (α < 1). TRL computes fl(fl(fl(1−α)·r) + fl(α)·p) (the scalars cast to fp32; the add with alpha rounds
once or twice), ours fl(r + fl(α)·fl(p − r)); u = 2^-24 is the fp32 unit roundoff, M the largest |weight| of
policy and references at a sync. TRL's result is within u·(2(1−α)|r| + 2α|p| + |r'|) ≤ 3uM of the exact
blend, ours within u·(3α|p − r| + |r'|) ≤ 7uM; an earlier difference e carries over as (1−α)·e ≤ e. After k
syncs the two differ by at most 10·k·u·M (measured: 1 ulp of a weight near 1, 1.2e-7, against 1.2e-6).
α = 1: TRL multiplies by 0 and adds 1·p, ours cast-copies p: both are exactly the policy, so equal bit for bit.
"""
from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402
from trl.trainer.callbacks import SyncRefModelCallback  # noqa: E402

from fasttrdpo.integrations.trl import FusedSyncRefModelCallback  # noqa: E402
from fasttrdpo.integrations.trl.callback import STATE_FILE  # noqa: E402
from fasttrdpo.tiny import tiny_model, tiny_tokenizer  # noqa: E402

STEPS, TAU, ALPHA = 4, 2, 0.6
SYNC_STEPS = [2, 4]
U_FP32 = 2.0 ** -24
MODEL_KW = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)


def length_reward(completions, **kwargs):
    """Longer completions score higher: a non-constant reward, so the advantages (and gradients) are non-zero."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_policy"))
    tiny_model(seed=0, **MODEL_KW).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _common(out, alpha, **kw):
    kw = {"save_strategy": "no", "beta": 0.1, "sync_ref_model": True, **kw}
    return dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=1e-2,
                ref_model_mixup_alpha=alpha, ref_model_sync_steps=TAU, report_to=[], use_cpu=True, seed=0,
                logging_steps=10 ** 6, lr_scheduler_type="constant", dataloader_num_workers=0,
                disable_dropout=True, **kw)


def _build(kind, model_dir, out, alpha, **kw):
    tok = tiny_tokenizer()
    if kind in ("grpo", "rloo"):
        Config, Trainer = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[kind]
        prompts = Dataset.from_list([{"prompt": f"Q{i}: 2+{i}="} for i in range(4)])
        args = Config(num_generations=2, max_completion_length=3, **_common(out, alpha, **kw))
        return Trainer(model=model_dir, reward_funcs=length_reward, args=args, train_dataset=prompts,
                       processing_class=tok)
    rows = [{"prompt": f"Q{i}: 2+{i}=", "completion": f" {2 + i}." if i % 2 == 0 else f" no{i}!",
             "label": i % 2 == 0} for i in range(8)]
    # KTO takes the reference as given: start it away from the policy (another seed)
    return KTOTrainer(model=tiny_model(seed=0, **MODEL_KW), ref_model=tiny_model(seed=1, **MODEL_KW),
                      args=KTOConfig(max_length=None, **_common(out, alpha, **kw)),
                      train_dataset=Dataset.from_list(rows), processing_class=tok)


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _callbacks(trainer, cls):
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, cls)]


class _Watch(TrainerCallback):
    """Added last: sees each step after every sync. Records the steps at which the trainer's reference changed
    and the largest |weight| of the policy and the references at each step (M of the bound)."""

    def __init__(self, trainer, *others):
        self.trainer, self.models, self.changed_at, self.max_abs = trainer, others, [], 0.0
        self.last = _state(trainer.ref_model)

    def on_step_end(self, args, state, control, **kwargs):
        now = _state(self.trainer.ref_model)
        if any(not torch.equal(now[n], self.last[n]) for n in now):
            self.changed_at.append(state.global_step)
        self.last = now
        for model in (self.trainer.model, self.trainer.ref_model) + self.models:
            self.max_abs = max(self.max_abs, max(p.detach().abs().max().item() for p in model.parameters()))


class _TRLSyncWithAlpha(SyncRefModelCallback):
    """TRL's callback, unchanged, reading α from its own args (the trainer's hold the other α)."""

    def __init__(self, ref_model, accelerator, alpha):
        super().__init__(ref_model=ref_model, accelerator=accelerator)
        self.alpha = alpha

    def on_step_end(self, args, state, control, **kwargs):
        own = SimpleNamespace(ref_model_sync_steps=args.ref_model_sync_steps, ref_model_mixup_alpha=self.alpha)
        super().on_step_end(own, state, control, **kwargs)


class _FusedNotSaved(FusedSyncRefModelCallback):
    """Ours for the α = 1 copy; it does not checkpoint, since it would write the same file as the trainer's own."""

    def on_save(self, args, state, control, **kwargs):
        pass


@pytest.mark.parametrize("kind", ["grpo", "rloo", "kto"])
def test_replace_in_matches_trl_sync_callback(kind, model_dir, tmp_path):
    """One run per trainer, four references synced toward the same policy at the same steps:
    the trainer's own (ours through replace_in, α = 0.6 from the args) vs a copy synced by TRL's callback, and
    α = 1: a copy synced by ours (alpha=1.0) vs a copy synced by TRL's callback (α = 1)."""
    trainer = _build(kind, model_dir, tmp_path, ALPHA, save_strategy="steps", save_steps=STEPS)
    assert len(_callbacks(trainer, SyncRefModelCallback)) == 1  # TRL's, added by sync_ref_model=True
    soft_trl, hard_ours, hard_trl = (copy.deepcopy(trainer.ref_model) for _ in range(3))
    initial = _state(soft_trl)
    ours = FusedSyncRefModelCallback.replace_in(trainer)
    assert _callbacks(trainer, SyncRefModelCallback) == []
    assert _callbacks(trainer, FusedSyncRefModelCallback) == [ours]
    assert ours.ref_model is trainer.ref_model  # ours blends the reference the trainer scores with
    acc = trainer.accelerator
    trainer.add_callback(SyncRefModelCallback(ref_model=soft_trl, accelerator=acc))
    hard = _FusedNotSaved(ref_model=hard_ours, accelerator=acc, alpha=1.0)
    trainer.add_callback(hard)
    trainer.add_callback(_TRLSyncWithAlpha(hard_trl, acc, alpha=1.0))
    watch = _Watch(trainer, soft_trl, hard_ours, hard_trl)
    trainer.add_callback(watch)
    trainer.train()

    assert trainer.state.global_step == STEPS
    assert watch.changed_at == SYNC_STEPS  # TRL's schedule: global_step % ref_model_sync_steps == 0
    for cb in (ours, hard):
        assert cb.updater.num_updates == len(SYNC_STEPS) and cb.updater.last_update_step == STEPS
    assert ours.updater.alpha == ALPHA and hard.updater.alpha == 1.0
    ref, peer = _state(trainer.ref_model), _state(soft_trl)
    assert ref.keys() == peer.keys() == initial.keys()
    moved = max((peer[n] - initial[n]).abs().max().item() for n in peer)
    assert moved > 1e-3  # the syncs did something far above the tolerance
    bound = 10 * len(SYNC_STEPS) * U_FP32 * watch.max_abs
    diff = max((ref[n] - peer[n]).abs().max().item() for n in ref)
    assert diff <= bound, (diff, bound)
    # α = 1: both are the policy of the last sync (the last step), bit for bit
    policy = {n: p.detach() for n, p in trainer.model.named_parameters()}
    hard_o, hard_t = _state(hard_ours), _state(hard_trl)
    for n in ref:
        assert torch.equal(hard_o[n], hard_t[n]) and torch.equal(hard_o[n], policy[n]), n

    # Checkpointing: the checkpoint of the last step holds the reference after its sync, bit for bit ...
    ckpt = os.path.join(tmp_path, f"checkpoint-{STEPS}")
    saved = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=True)
    assert saved["num_updates"] == len(SYNC_STEPS) and saved["last_update_step"] == STEPS
    assert saved["ref"].keys() == ref.keys()
    for n in ref:
        assert torch.equal(saved["ref"][n], ref[n]), n
    # ... and a fresh trainer resuming from it starts from that reference, not from its initial one
    again = _build(kind, model_dir, tmp_path, ALPHA)
    fresh = _state(again.ref_model)
    assert any(not torch.equal(fresh[n], ref[n]) for n in ref)  # restoring is observable
    resumed = FusedSyncRefModelCallback.replace_in(again)
    again.train(resume_from_checkpoint=ckpt)  # at max_steps already: no step runs, on_train_begin restores
    assert resumed.updater.num_updates == len(SYNC_STEPS)
    restored = _state(again.ref_model)
    for n in ref:
        assert torch.equal(restored[n], ref[n]), n


def test_replace_in_without_reference_model_is_an_error(model_dir, tmp_path):
    """GRPO with beta = 0 builds no reference model: nothing to sync, said at replace_in (before: an error about
    PEFT adapters at train begin)."""
    trainer = _build("grpo", model_dir, tmp_path, ALPHA, beta=0.0, sync_ref_model=False)
    assert trainer.ref_model is None
    with pytest.raises(ValueError, match="GRPOTrainer has no ref_model"):
        FusedSyncRefModelCallback.replace_in(trainer)
    assert _callbacks(trainer, FusedSyncRefModelCallback) == []
