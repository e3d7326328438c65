"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for `TRDPOTrainer` (`TRDPOConfig(fsdp=True)`, torchrun).

What is sharded, and how (one 1-D device mesh over all ranks):
- the policy, the reference and the initial model (eval KL) are each sharded per decoder layer and at
  a root; with `bf16`, `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: bf16 compute,
  fp32 master weights (the optimizer steps the fp32 shards) and fp32 gradient reduction.
- the policy's root is `PolicyLoss`, a module whose forward runs the backbone AND the loss: FSDP
  unshards the root unit (embeddings, final norm, lm_head) for that forward, so the fused loss sees
  the full lm_head weight, and its gradient is reduce-scattered like every other. No weight is
  gathered by hand.
- the frozen models' root is `FrozenHidden`: its forward returns the last hidden states and the
  (unsharded) head weight and bias, which stay valid until `reshard()` is called (FSDP keeps the root
  unit unsharded after forward); `ShardedModels` reshards them as soon as the loss has consumed them.
- the reference update blends local shards (`RefModelUpdater` on DTensors: no communication but one
  all-reduce of a NaN flag).

Memory per rank: 1/world of policy + optimizer state + reference + initial model, plus one decoder
layer unsharded at a time (two around the backward) and each model's root unit during its forward.
Each rank loads the whole model into host memory before sharding (no meta-device loading).
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn

from .model_parts import causal_lm_parts


def check_fsdp_config(config, world_size: int) -> None:
    """Refuse, before anything is built, the combinations no test proves under FSDP2."""
    if not config.fsdp:
        return
    if world_size < 2:
        raise ValueError("TRDPOConfig: fsdp=True needs several processes: launch with torchrun "
                         "(e.g. torchrun --nproc_per_node 8 -m fasttrdpo train --fsdp ...)")
    if getattr(config, "trainer", "dpo") != "dpo":
        raise ValueError(f"TRDPOConfig: fsdp=True with trainer={config.trainer!r} is not supported (untested): "
                         "FSDP runs the DPO trainer")
    if config.gradient_checkpointing:
        raise ValueError("TRDPOConfig: fsdp=True with gradient_checkpointing=True is not supported (untested)")
    for name in ("packing", "share_prompt"):
        if getattr(config, name, False):
            raise ValueError(f"TRDPOConfig: fsdp=True with {name}=True is not supported (untested)")
    if getattr(config, "lora_r", 0) > 0:  # a PeftModel passed in is refused where the trainer sets LoRA up
        raise ValueError("TRDPOConfig: fsdp=True with LoRA (lora_r > 0) is not supported (untested): train LoRA "
                         "with DDP (torchrun without --fsdp)")


def decoder_layers(model) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM (the classes its `_no_split_modules` names, else
    the ModuleList of num_hidden_layers modules)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return list(m)
    raise ValueError(f"fsdp: cannot find the decoder layers of {type(model).__name__} (no _no_split_modules, "
                     "no ModuleList of num_hidden_layers modules)")


class PolicyLoss(nn.Module):
    """The policy's FSDP root: forward(input_ids, attention_mask, fn) runs the backbone and returns
    fn(hidden, head) with the lm_head unsharded (fn computes the loss, or evaluation figures)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, fn):
        backbone, head = causal_lm_parts(self.model)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return fn(hidden, head)


class FrozenHidden(nn.Module):
    """A frozen model's FSDP root: forward returns (hidden, head weight, head bias), all unsharded."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        backbone, head = causal_lm_parts(self.model)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden, head.weight, head.bias


def _shard(root: nn.Module, model, mesh, mp) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)


class ShardedModels:
    """Policy, reference and initial model sharded on one mesh, and the forwards the trainer calls."""

    def __init__(self, trainer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from .model_parts import tied_parameter_names

        for what, module in (("model", trainer.model), ("ref_model", trainer.ref_model)):
            if tied_parameter_names(module):  # untested under FSDP2 (sharing across FSDP units)
                raise ValueError(f"fsdp=True: {what} ties weights ({sorted(tied_parameter_names(module))[:2]}); "
                                 "tied embeddings are not supported under FSDP (untested)")
        self.trainer = trainer
        self.world_size = trainer.world_size
        self.mesh = init_device_mesh(trainer.device.type, (trainer.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if trainer.config.bf16 else MixedPrecisionPolicy())
        # every rank shards the same weights: rank 0's (as DDP broadcasts them). The models are still in
        # host memory; NCCL only moves device tensors, so each tensor travels through a device buffer.
        for module in (trainer.model, trainer.ref_model, trainer.init_model):
            if module is not None:
                for t in list(module.parameters()) + list(module.buffers()):
                    if t.device == trainer.device or trainer.device.type == "cpu":
                        dist.broadcast(t.data, src=0)
                    else:
                        buf = t.data.to(trainer.device)
                        dist.broadcast(buf, src=0)
                        t.data.copy_(buf)
        self.policy = PolicyLoss(trainer.model)
        _shard(self.policy, trainer.model, self.mesh, mp)
        self.ref = FrozenHidden(trainer.ref_model)
        _shard(self.ref, trainer.ref_model, self.mesh, mp)
        self.init = None
        if trainer.init_model is not None:
            self.init = FrozenHidden(trainer.init_model)
            _shard(self.init, trainer.init_model, self.mesh, mp)
        # buffers (rotary tables) were moved by fully_shard to the mesh's device with the parameters

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation: no reduce-scatter until the last micro-batch (as DDP's no_sync)."""
        self.policy.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.policy.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def frozen(self, which):
        """(hidden, weight, bias) of the reference or initial model for `batch`; resharded on exit."""
        module = self.ref if which == "ref" else self.init

        def run(batch):
            with torch.no_grad():
                return module(batch["input_ids"], batch["attention_mask"])
        try:
            yield run
        finally:
            module.reshard()

    def loss(self, batch):
        """The training loss of one micro-batch (the fused loss inside the policy's FSDP forward)."""
        t = self.trainer
        with self.frozen("ref") as ref, t._autocast():
            ref_hidden, ref_w, ref_b = ref(batch)

            def fn(hidden, head):
                return t.loss_fn(hidden, head.weight, batch["labels"], ref_hidden, ref_w,
                                 policy_bias=head.bias, ref_bias=ref_b)
            return self.policy(batch["input_ids"], batch["attention_mask"], fn)


# --- evaluation ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_sharded(trainer) -> dict:
    """`fasttrdpo.training.evaluate.evaluate` under FSDP2: every rank runs the same number of forwards
    (a rank without pairs left runs a pair with weight 0), heads unsharded inside the FSDP forwards."""
    from .evaluate import TRL_METRICS, finish_record, kl_sum

    if not trainer.eval_pairs:
        raise ValueError("evaluate() needs an eval_dataset")
    c, s = trainer.config, trainer.sharded
    was_training = trainer.model.training
    trainer.model.eval()
    mine = trainer.eval_pairs[trainer.rank::trainer.world_size]
    per_rank = -(-len(trainer.eval_pairs) // trainer.world_size)
    B = c.per_device_eval_batch_size
    n_metrics = 1 + len(TRL_METRICS)
    sums = torch.zeros(n_metrics + 6, dtype=torch.float64, device=trainer.device)
    for start in range(0, per_rank, B):
        pairs = mine[start:start + B]
        weight = len(pairs)
        if not pairs:
            pairs = trainer.eval_pairs[:1]  # keeps the collectives in step; counted with weight 0
        batch = trainer._batch(pairs)
        mask = batch["labels"] != trainer.collator.ignore_index
        use_init = c.eval_kl and s.init is not None
        with s.frozen("ref") as ref, s.frozen("init") if use_init else contextlib.nullcontext() as init, \
                trainer._autocast():
            ref_hidden, ref_w, ref_b = ref(batch)
            init_out = init(batch) if use_init else None

            def fn(hidden, head):
                out = {}
                out["loss"], out["metrics"] = trainer.loss_fn(hidden, head.weight, batch["labels"], ref_hidden,
                                                              ref_w, policy_bias=head.bias, ref_bias=ref_b)
                if c.eval_kl:
                    h = hidden[mask]
                    out["kl_ref"] = kl_sum(h, head, ref_hidden[mask], SimpleNamespace(weight=ref_w, bias=ref_b),
                                           c.kl_chunk_tokens)
                    if use_init:
                        ih, iw, ib = init_out
                        out["kl_init"] = kl_sum(h, head, ih[mask], SimpleNamespace(weight=iw, bias=ib),
                                                c.kl_chunk_tokens)
                        _, vs_init = trainer.loss_fn(hidden, head.weight, batch["labels"], ih, iw,
                                                     policy_bias=head.bias, ref_bias=ib)
                        out["vs_init"] = vs_init
                return out
            out = s.policy(batch["input_ids"], batch["attention_mask"], fn)
        s.policy.reshard()  # the root stays unsharded after a forward without backward
        metrics = out["metrics"]
        vec = torch.stack([out["loss"].float()] + [metrics[k].float().reshape(()) for k in TRL_METRICS])
        sums[:n_metrics] += vec.double() * weight
        sums[n_metrics] += weight
        if c.eval_kl and weight:
            sums[n_metrics + 1] += out["kl_ref"]
            if use_init:
                sums[n_metrics + 2] += out["kl_init"]
                sums[n_metrics + 4] += float(out["vs_init"]["rewards/accuracies"]) * weight
                sums[n_metrics + 5] += float(out["vs_init"]["rewards/margins"]) * weight
            sums[n_metrics + 3] += int(mask.sum())
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    if was_training:
        trainer.model.train()
    return finish_record(trainer, sums.tolist(), n_metrics)


# --- checks over the gathered state -------------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_state_bytes(trainer) -> dict[str, int]:
    """Bytes this rank holds, counted from the tensors: parameter shards of the policy, the optimizer's
    state, the reference (and the initial model)."""
    def size(tensors):
        return sum(_local(t).numel() * _local(t).element_size() for t in tensors)
    optim = [v for st in trainer.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    out = {"policy": size(trainer.model.parameters()), "optimizer": size(optim),
           "reference": size(trainer.ref_model.parameters())}
    out["init_model"] = size(trainer.init_model.parameters()) if trainer.init_model is not None else 0
    return out


def check_ranks_agree(trainer) -> list[dict]:
    """Every rank gathers the policy and the reference and hashes them; all hashes must agree."""
    from .distributed import fingerprints

    mine = fingerprints(policy=trainer.model, reference=trainer.ref_model)  # gathered: a collective
    trainer._gathered_fingerprints = mine
    gathered: list = [None] * trainer.world_size
    dist.all_gather_object(gathered, mine)
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError(f"FSDP ranks disagree on the gathered policy or reference weights: {gathered}")
    return gathered
