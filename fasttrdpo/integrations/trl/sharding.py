"""The TRL integration under sharded training: accelerate FSDP2 (`fully_shard`) and DeepSpeed ZeRO-3.

Two problems, one module:

1. The loss needs the FULL lm_head weight, which under FSDP2 is a sharded DTensor and under ZeRO-3 an
   empty placeholder outside the module's own forward. Gathering it by hand outside the forward would
   give a partitioned parameter a full-size gradient that neither FSDP2 nor ZeRO-3 reduces. So the loss
   runs *inside* the model's forward, as a call of the output-embedding module (`run_in_head`): FSDP2
   has unsharded it (the root unit, or its own unit), ZeRO-3's module hooks have gathered it, and both
   reduce-scatter its gradient in backward exactly as for every other parameter. The reference's head is
   read the same way (inside the reference's forward, no grad) and copied out, since it is resharded /
   released when that forward returns: one transient V×H copy of the reference head per step.

2. The reference update. FSDP2 parameters are DTensors, blended shard by shard by `RefModelUpdater`
   (`blend_` checks that mesh and placements agree). ZeRO-3 parameters hold their data in `ds_tensor`,
   the flat partition the rank owns (`param.data` is empty outside a gather): `Zero3RefModelUpdater`
   blends those partitions in place, with no gather. They line up when both models are partitioned the
   same way (same numel, same partition size, same rank in a process group of the same size): checked,
   ValueError otherwise. Parameters ZeRO-3 keeps gathered between forwards (small "persistent" ones,
   `stage3_param_persistence_threshold`) also hold a full copy in `param.data`, which the forward reads:
   that copy is blended too, from the policy's full copy (identical on every rank after each optimizer
   step, as ZeRO-3 re-gathers persistent parameters then) — local work as well.

Which settings run (each proven by tests/test_trl_sharded.py, 2 CPU processes): no sharding (DDP or one
process); accelerate FSDP2 in fp32 (policy wrapped per decoder layer + root, TRL wraps the reference at
its root); DeepSpeed ZeRO-3 in fp32, without parameter/optimizer offload. Everything else that changes how
the head or the reference is held raises at construction (`check_sharding`), not a silent wrong loss.
"""
from __future__ import annotations

import contextlib

import torch

from ...ref_update import RefModelUpdater, _is_dtensor, pair_by_name, unwrap_model

NONE, FSDP2, ZERO3 = "none", "fsdp2", "zero3"
_UNTESTED = ("is not tested with fasttrdpo's TRL integration, so it is refused rather than risk a silently wrong "
             "loss or reference")


def sharding_mode(trainer) -> str:
    """NONE, FSDP2 or ZERO3 for a (TRL/transformers) trainer; raises for a sharded set-up that is not supported."""
    accelerator = trainer.accelerator
    mixed = str(getattr(accelerator, "mixed_precision", "no") or "no")
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = accelerator.state.deepspeed_plugin
        zero = dict(plugin.deepspeed_config.get("zero_optimization", {}) or {})
        stage = int(zero.get("stage", 0))
        if stage != 3:
            raise NotImplementedError(f"DeepSpeed ZeRO stage {stage} {_UNTESTED}; use ZeRO-3 (stage 3) or FSDP2")
        for key in ("offload_param", "offload_optimizer"):
            device = (zero.get(key) or {}).get("device", "none")
            if device not in (None, "none"):
                raise NotImplementedError(f"DeepSpeed ZeRO-3 with {key}.device={device!r} {_UNTESTED}")
        if mixed != "no":
            raise NotImplementedError(f"DeepSpeed ZeRO-3 with mixed precision {mixed!r} {_UNTESTED}; train in fp32 "
                                      "(DPOConfig(bf16=False, fp16=False))")
        mode = ZERO3
    elif getattr(trainer, "is_fsdp_enabled", False):
        plugin = accelerator.state.fsdp_plugin
        version = int(getattr(plugin, "fsdp_version", 1) or 1)
        if version != 2:
            raise NotImplementedError("FSDP1 (FullyShardedDataParallel) flattens parameters: the reference cannot be "
                                      "updated shard by shard. Use FSDP2 (fsdp_config={'fsdp_version': 2, ...})")
        offload = getattr(plugin, "cpu_offload", None)  # FSDP2: OffloadPolicy() is "none", CPUOffloadPolicy offloads
        if offload is True or type(offload).__name__ == "CPUOffloadPolicy":
            raise NotImplementedError(f"FSDP2 with CPU offload {_UNTESTED}")
        if mixed != "no":
            raise NotImplementedError(f"FSDP2 with mixed precision {mixed!r} {_UNTESTED}; train in fp32 "
                                      "(DPOConfig(bf16=False, fp16=False))")
        mode = FSDP2
    else:
        return NONE
    from .dpo import _is_peft  # local: dpo imports this module

    if _is_peft(trainer.model) or trainer.ref_model is None:
        raise NotImplementedError(f"PEFT (a reference adapter or the adapter-free base) under {mode} {_UNTESTED}; "
                                  "pass a separate ref_model")
    return mode


@contextlib.contextmanager
def _head_forward(head: torch.nn.Module, forward):
    """Let `head(...)` run `forward` for one call (hooks included), then restore the module's own forward."""
    had_own = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = forward
    try:
        yield
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.forward


def run_in_head(model: torch.nn.Module, hidden: torch.Tensor, fn):
    """fn(head, hidden) run as a call of the model's output-embedding module, so that the sharding framework
    holds its full weight for the call (FSDP2 unshards, ZeRO-3's pre-forward hook gathers) and takes care of
    its gradient in backward (ZeRO-3's backward hooks are attached to the call's tensor inputs and outputs:
    keep `hidden` the only positional tensor). Without sharding this is just fn(head, hidden)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head): nothing to compute "
                         "log-probs with")
    with _head_forward(head, lambda h: fn(head, h)):
        return head(hidden)


def head_snapshot(head: torch.nn.Module, copy: bool):
    """(weight, bias) of the head, detached; copied when the framework frees the full weight after the call."""
    bias = getattr(head, "bias", None)
    take = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    return take(head.weight), (None if bias is None else take(bias))


# ------------------------------------------------------------------------------------------ ZeRO-3 reference
def is_zero3_param(p) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_tensor")


def _zero3_group(p):
    import torch.distributed as dist

    group = getattr(p, "ds_process_group", None)
    return dist.get_world_size(group=group), dist.get_rank(group=group)


def _is_available(p) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE


class Zero3RefModelUpdater(RefModelUpdater):
    """RefModelUpdater for two ZeRO-3 partitioned models: blends each rank's own partitions (`ds_tensor`), no gather.

    Same arguments and schedule as RefModelUpdater (no PEFT adapters). Pairing is by name as there, then each
    pair must be partitioned alike (ValueError naming the parameter otherwise, at construction and before
    every update, before anything is written). With check_finite the NaN/inf verdict is agreed by one
    all-reduce of a single flag (so every rank blends or every rank raises). state_dict() holds this rank's
    partitions and where they come from (rank, world size); load_state_dict refuses another layout.
    """

    def __init__(self, *, policy, ref, **kwargs):
        if kwargs.get("policy_adapter") is not None or kwargs.get("ref_adapter") is not None:
            raise ValueError("PEFT reference adapters are not supported under ZeRO-3")
        super().__init__(policy=policy, ref=ref, **kwargs)

    def _params(self):
        return (dict(unwrap_model(self.policy).named_parameters()), dict(unwrap_model(self.ref).named_parameters()))

    def _pair_names(self):
        """[(ref name, policy name)]: every name pairs (ZeRO-3 `.shape` is an empty placeholder outside a gather, so
        shapes are compared through `ds_shape`) and every pair is partitioned alike."""
        policy_params, ref_params = self._params()
        pairs = pair_by_name(policy_params, ref_params)
        if not pairs:
            raise ValueError("no parameters to update: policy and ref have no parameters")
        for ref_name, pol_name in pairs:
            r, p = ref_params[ref_name], policy_params[pol_name]
            if not (is_zero3_param(r) and is_zero3_param(p)):
                which = "ref" if not is_zero3_param(r) else "policy"
                raise ValueError(f"parameter {ref_name!r}: the {which} copy is not ZeRO-3 partitioned; both models "
                                 "must be (TRL's DPOTrainer prepares the reference with ZeRO-3 when the policy "
                                 "uses it)")
            if tuple(r.ds_shape) != tuple(p.ds_shape):
                raise ValueError(f"parameter {ref_name!r}: ref shape {tuple(r.ds_shape)} != policy shape "
                                 f"{tuple(p.ds_shape)}")
            if r.ds_tensor.numel() != p.ds_tensor.numel() or _zero3_group(r) != _zero3_group(p):
                raise ValueError(
                    f"parameter {ref_name!r}: ref and policy are partitioned differently (ref: {r.ds_tensor.numel()} "
                    f"elements as rank/world {_zero3_group(r)[::-1]}, policy: {p.ds_tensor.numel()} as "
                    f"{_zero3_group(p)[::-1]}): partition both models over the same data-parallel group")
            if getattr(r, "ds_persist", False) and not getattr(p, "ds_persist", False):
                # checked here (at construction), not only at the first update tau steps into training; the other
                # way round is fine: a persistent policy's partition is still its master copy
                raise ValueError(
                    f"parameter {ref_name!r}: the reference keeps it gathered between forwards (persistent) but the "
                    "policy does not, so the full copy the reference's forward reads is not kept current by an "
                    "update of the partitions; give both models the same stage3_param_persistence_threshold")
            if getattr(r.ds_tensor, "final_location", None) == "nvme" or \
                    getattr(p.ds_tensor, "final_location", None) == "nvme":
                raise ValueError(f"parameter {ref_name!r}: its partition lives on NVMe (offload_param), not supported")
        return pairs

    def _partitions(self):
        """(ref partitions, policy partitions, names): the flat `ds_tensor` each rank owns, pair by pair."""
        pairs = self._pair_names()
        policy_params, ref_params = self._params()
        return ([ref_params[r].ds_tensor for r, _ in pairs], [policy_params[p].ds_tensor for _, p in pairs],
                [r for r, _ in pairs])

    def _gathered(self):
        """(ref full copies, policy full copies, names) of the reference parameters ZeRO-3 keeps gathered between
        forwards (persistent ones), whose forward reads the full copy, not the partition. Their policy twins are
        persistent too (same threshold on the same shapes) and re-gathered by ZeRO-3 after every optimizer step,
        so the full copies blend locally; any other gathered reference parameter is refused (ValueError)."""
        policy_params, ref_params = self._params()
        refs, pols, names = [], [], []
        for ref_name, pol_name in self._pairs:
            r, p = ref_params[ref_name], policy_params[pol_name]
            if not (_is_available(r) and r.data.numel()):
                continue
            if not (getattr(r, "ds_persist", False) and getattr(p, "ds_persist", False) and _is_available(p)
                    and p.data.numel() == r.data.numel()):
                raise ValueError(
                    f"parameter {ref_name!r}: the reference holds it gathered (persistent: "
                    f"{getattr(r, 'ds_persist', False)}) but the policy's full copy is not kept current "
                    f"(persistent: {getattr(p, 'ds_persist', False)}); give both models the same "
                    "stage3_param_persistence_threshold")
            refs.append(r.data.view(r.ds_shape))
            pols.append(p.data.view(p.ds_shape))
            names.append(ref_name)
        return refs, pols, names

    def _tensors(self):
        """Everything an update writes: every pair's partitions, then the gathered full copies."""
        refs, pols, names = self._partitions()
        g_refs, g_pols, g_names = self._gathered()
        return refs + g_refs, pols + g_pols, names + [f"{n} (gathered copy)" for n in g_names]

    def update(self) -> None:
        refs, pols, names = self._tensors()
        if self.check_finite:
            self._check_finite_all_ranks(pols, names)
        from ...ops.blend import blend_

        blend_(ref_tensors=refs, policy_tensors=pols, alpha=self.alpha, check_finite=False, backend=self.backend,
               names=names)
        self.num_updates += 1

    @staticmethod
    def _layout() -> dict:
        import torch.distributed as dist

        return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}

    def state_dict(self, ref_weights: bool = True) -> dict:
        """Counters and config; with ref_weights this rank's reference partitions ("ref"), the full copies of
        gathered (persistent) reference parameters ("ref_gathered") and the layout they belong to."""
        state = super().state_dict(ref_weights=False)
        state["partitions"] = self._layout()
        if ref_weights:
            refs, _, names = self._partitions()
            state["ref"] = {n: r.detach() for n, r in zip(names, refs)}
            g_refs, _, g_names = self._gathered()
            state["ref_gathered"] = {n: r.detach() for n, r in zip(g_names, g_refs)}
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore counters and this rank's partitions (and the full copies of reference parameters gathered now).
        A state saved by another rank or world size is refused; everything is checked before anything is written."""
        if not isinstance(state, dict):
            raise ValueError("state must be a dict from Zero3RefModelUpdater.state_dict()")
        where, here = state.get("partitions"), self._layout()
        if where != here:
            raise ValueError(
                f"the saved reference holds the ZeRO-3 partitions of rank {(where or {}).get('rank')} of "
                f"{(where or {}).get('world_size')} processes, this is rank {here['rank']} of {here['world_size']}: "
                "the reference partitions cannot be resumed at another world size (or rank order); resume with the "
                "same number of processes")
        copies = []
        if state.get("ref") is not None:
            saved_gathered = state.get("ref_gathered") or {}
            groups = (("ref", self._partitions(), state["ref"], True),
                      ("ref_gathered", self._gathered(), saved_gathered, False))
            for key, (refs, _, names), saved, exact in groups:
                if (set(saved) != set(names)) if exact else not set(names) <= set(saved):
                    missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
                    raise ValueError(f"state[{key!r}] does not match this rank's reference: missing {missing[:3]}, "
                                     f"unexpected {extra[:3] if exact else []}")
                for name, dst in zip(names, refs):
                    src = saved[name]
                    if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
                        raise ValueError(f"state[{key!r}][{name!r}]: expected {dst.dtype} of shape {tuple(dst.shape)}, "
                                         f"got {getattr(src, 'dtype', type(src).__name__)} of shape "
                                         f"{tuple(getattr(src, 'shape', ()))}")
                    copies.append((dst, src))
        # counters, alpha/tau: checked (and then set) by the base class; the partitions are written after that
        super().load_state_dict({k: v for k, v in state.items() if k not in ("partitions", "ref", "ref_gathered")},
                                strict=strict)
        with torch.no_grad():
            for dst, src in copies:
                dst.copy_(src)


def _unwrap_engine(model):
    """The module inside a DeepSpeedEngine (TRL's reference under DeepSpeed is one), else the model itself."""
    import sys

    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module
    return model


def make_updater(*, policy, ref, **kwargs) -> RefModelUpdater:
    """The updater for these models: Zero3RefModelUpdater when the reference is ZeRO-3 partitioned, else
    RefModelUpdater (which blends FSDP2 DTensor shards locally and refuses FSDP1). DeepSpeed engines are
    unwrapped to their modules."""
    policy, ref = _unwrap_engine(policy), _unwrap_engine(ref)
    params = list(unwrap_model(policy).parameters()) + (list(unwrap_model(ref).parameters()) if ref is not None else [])
    if any(is_zero3_param(p) for p in params):  # either side: a half-partitioned pair is refused there, by name
        return Zero3RefModelUpdater(policy=policy, ref=ref, **kwargs)
    return RefModelUpdater(policy=policy, ref=ref, **kwargs)


def sharded_reference(updater: RefModelUpdater) -> bool:
    """True when each rank holds a different part of the reference (FSDP2 shards, ZeRO-3 partitions)."""
    if isinstance(updater, Zero3RefModelUpdater):
        return True
    return any(_is_dtensor(p) for p in updater._tensors()[0])
