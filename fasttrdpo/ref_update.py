"""RefModelUpdater: the "TR" of TR-DPO. Every τ optimizer steps, θ_ref ← θ_ref + α·(θ − θ_ref).

    updater = fasttrdpo.RefModelUpdater(policy=model, ref=ref_model, alpha=0.6, tau=512)
    for step in range(1, num_steps + 1):     # step counts optimizer steps (after accumulation)
        ...; optimizer.step()
        updater.step(global_step=step)       # fires at τ, 2τ, ...: one fused blend over all parameters

Pairing. Parameters are paired by name (`named_parameters()` after unwrapping DDP/DataParallel and
torch.compile wrappers, so a `module.` prefix never breaks the pairing). Any name present on one side
only, or a shape mismatch, raises a ValueError at construction and again before every update (the
check is cheap and catches models re-wrapped after construction), always before anything is written.
Buffers (running statistics, rotary tables, ...) are NOT blended: they are not trained by the
optimizer; copy them yourself if your model trains any.

Sharded training.
- DDP: every rank holds the full policy and a full reference, and every rank blends its own copy (no
  communication). The policy is identical on all ranks after each optimizer step, so the references
  stay identical too.
- FSDP2 (`torch.distributed.fsdp.fully_shard` on both models with the same mesh): parameters are
  DTensors; each rank blends only its local shards (`to_local()` shares storage) - no all-gather.
  With check_finite, the NaN/inf verdict is agreed through one all-reduce of a single flag, so either
  every rank blends or every rank raises (a rank-local check could leave the shards inconsistent).
- FSDP1 (FullyShardedDataParallel) flattens parameters and is not supported: use fully_shard.

PEFT / LoRA (TRL refuses `sync_ref_model` with PEFT; here it works). Two layouts:
- one PeftModel with the trained adapter (`policy_adapter`, default "default") and a reference
  adapter (`ref_adapter`, TRL's DPOTrainer uses an adapter named "ref" as the reference when present):
  pass the same model as policy and ref. Only the adapter weights are updated; the base is shared.
- two separate models (PEFT or not): paired by name as usual.
What is exact: the hard update (α = 1) copies the factors, so the reference adapter then computes
exactly what the policy adapter computes (B_ref·A_ref = B·A). What is not: a soft update of the
factors, A_ref ← blend(A_ref, A), B_ref ← blend(B_ref, B), gives
B_ref'·A_ref' = α²·B·A + (1−α)²·B_ref·A_ref + α(1−α)·(B·A_ref + B_ref·A), which is not the soft update
α·B·A + (1−α)·B_ref·A_ref of the weight delta (the exact one would need rank r_ref + r, growing every
update). So α < 1 with LoRA factors raises unless `lora_soft="factors"` opts into the factor blend.
`modules_to_save` copies are ordinary weights and blend exactly.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from .ops.blend import blend_, check_alpha, keyword_only

STATE_FORMAT = "fasttrdpo.RefModelUpdater/1"


def unwrap_model(module: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers (their names carry `module.` / `_orig_mod.`)."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(getattr(module, "_orig_mod"), nn.Module):
            module = module._orig_mod
        else:
            break
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except Exception:  # pragma: no cover - torch without distributed
        FSDP1 = ()
    if FSDP1 and isinstance(module, FSDP1):
        raise TypeError("FSDP1 (FullyShardedDataParallel) flattens parameters and is not supported: shard the "
                        "policy and the reference with torch.distributed.fsdp.fully_shard (FSDP2) instead")
    return module


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _lora_role(name: str, adapter: str) -> str | None:
    """'factor' for LoRA factors of `adapter`, 'copy' for its modules_to_save weights, else None."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] == adapter:
            if parts[i - 1].startswith("lora_"):
                return "factor"
            if parts[i - 1] == "modules_to_save":
                return "copy"
    return None


def _is_lora_factor(name: str) -> bool:
    parts = name.split(".")
    return any(p.startswith("lora_") for p in parts[:-1])


def pair_by_name(policy_params: dict, ref_params: dict) -> list[tuple[str, str]]:
    """[(ref name, policy name)] of two models' parameters, which must carry the same names (ValueError otherwise)."""
    only_policy = sorted(set(policy_params) - set(ref_params))
    only_ref = sorted(set(ref_params) - set(policy_params))
    if only_policy or only_ref:
        raise ValueError(
            "policy and ref parameters do not pair up by name: "
            f"{len(only_policy)} only in policy (e.g. {only_policy[:3]}), "
            f"{len(only_ref)} only in ref (e.g. {only_ref[:3]})")
    return [(n, n) for n in policy_params]


class RefModelUpdater:
    """Blend the reference model toward the policy every `tau` optimizer steps (see module docstring).

    Args (keywords only, a positional call raises a TypeError: the updater takes (policy, ref) while blend_
    takes (ref, policy), so a positional swap would blend the reference into the policy):
        policy, ref: nn.Module (DDP/compile wrappers are unwrapped); the same PeftModel for both with
            `policy_adapter`/`ref_adapter` to update a reference adapter.
        alpha: α ∈ [0, 1]; 1 is the hard update (copy). tau: τ ≥ 1 optimizer steps between updates.
        check_finite: refuse to blend a policy holding NaN/inf (raises, nothing written).
        backend: "auto" | "triton" | "eager" | "cpp", passed to blend_.
        lora_soft: "error" (α < 1 with LoRA factors raises) or "factors" (blend A and B separately).
    """

    @keyword_only("RefModelUpdater(policy=..., ref=..., alpha=..., tau=...)", bound=1)
    def __init__(self, *, policy: nn.Module, ref: nn.Module, alpha: float = 0.6, tau: int = 512,
                 check_finite: bool = True, backend: str = "auto", policy_adapter: str | None = None,
                 ref_adapter: str | None = None, lora_soft: str = "error"):
        for what, m in (("policy", policy), ("ref", ref)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{what} must be a torch.nn.Module, got {type(m).__name__}")
        self.alpha = check_alpha(alpha)
        if isinstance(tau, bool) or not isinstance(tau, int):
            raise TypeError(f"tau must be an int >= 1 (optimizer steps between updates), got {type(tau).__name__}")
        if tau < 1:
            raise ValueError(f"tau must be >= 1 (optimizer steps between updates), got {tau}")
        if lora_soft not in ("error", "factors"):
            raise ValueError(f"lora_soft must be 'error' or 'factors', got {lora_soft!r}")
        self.tau = tau
        self.check_finite = bool(check_finite)
        self.backend = backend
        self.lora_soft = lora_soft
        self.policy = policy
        self.ref = ref
        self.policy_adapter, self.ref_adapter = policy_adapter, ref_adapter
        self.last_update_step: int | None = None
        self.num_updates = 0
        self._pairs = self._pair_names()  # raises on any mismatch, before anything is written

    # ----------------------------------------------------------------------------- pairing
    def _adapter_mode(self) -> bool:
        return unwrap_model(self.policy) is unwrap_model(self.ref)

    def _pair_names(self) -> list[tuple[str, str]]:
        """[(ref name, policy name)] - validated: every name pairs, shapes match."""
        policy_params = dict(unwrap_model(self.policy).named_parameters())
        if self._adapter_mode():
            pairs = self._adapter_pairs(policy_params)
            ref_params = policy_params
        else:
            if self.policy_adapter is not None or self.ref_adapter is not None:
                raise ValueError("policy_adapter/ref_adapter apply when policy and ref are the same PeftModel "
                                 "(a reference adapter beside the trained one); here they are different modules")
            ref_params = dict(unwrap_model(self.ref).named_parameters())
            pairs = pair_by_name(policy_params, ref_params)
        if not pairs:
            raise ValueError("no parameters to update: policy and ref have no parameters")
        for ref_name, pol_name in pairs:
            r, p = ref_params[ref_name], policy_params[pol_name]
            if tuple(r.shape) != tuple(p.shape):
                raise ValueError(f"parameter {ref_name!r}: ref shape {tuple(r.shape)} != policy shape "
                                 f"{tuple(p.shape)} ({pol_name!r})")
        factors = [n for n, _ in pairs if _is_lora_factor(n)]
        if factors and self.alpha < 1.0 and self.lora_soft == "error":
            raise ValueError(
                f"alpha={self.alpha} would blend LoRA factors ({factors[0]!r}, ...) one by one, which is not the "
                "soft update of the weight delta B·A (cross terms appear). Use alpha=1.0 for the exact hard update, "
                "or pass lora_soft='factors' to accept the factor blend")
        return pairs

    def _adapter_pairs(self, params: dict) -> list[tuple[str, str]]:
        model = unwrap_model(self.policy)
        pa, ra = self.policy_adapter or "default", self.ref_adapter or "ref"
        if pa == ra:
            raise ValueError(f"policy_adapter and ref_adapter must differ, both are {pa!r}")
        configs = getattr(model, "peft_config", None)
        if not isinstance(configs, dict):
            raise ValueError("policy and ref are the same module but it has no PEFT adapters: pass a separate "
                             "reference model, or a PeftModel with a reference adapter")
        for what, name in (("policy_adapter", pa), ("ref_adapter", ra)):
            if name not in configs:
                raise ValueError(f"{what}={name!r} is not an adapter of the model (adapters: {sorted(configs)})")
        for field in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "modules_to_save"):
            a, b = getattr(configs[pa], field, None), getattr(configs[ra], field, None)
            if a != b:
                raise ValueError(f"adapters {pa!r} and {ra!r} differ in {field} ({a!r} vs {b!r}): the reference "
                                 "adapter would not compute what the copied weights mean")
        pairs = []
        for name in params:
            role = _lora_role(name, pa)
            if role is None:
                continue
            parts = name.split(".")
            parts = [ra if (i > 0 and part == pa and (parts[i - 1].startswith("lora_")
                                                      or parts[i - 1] == "modules_to_save")) else part
                     for i, part in enumerate(parts)]
            ref_name = ".".join(parts)
            if ref_name not in params:
                raise ValueError(f"adapter parameter {name!r} has no counterpart {ref_name!r} in adapter {ra!r}")
            pairs.append((ref_name, name))
        ref_side = {n for n in params if _lora_role(n, ra) is not None}
        missing = sorted(ref_side - {r for r, _ in pairs})
        if missing:
            raise ValueError(f"adapter {ra!r} has parameters with no counterpart in {pa!r}: {missing[:3]}")
        return pairs

    def _tensors(self):
        """Current (ref tensors, policy tensors, names); re-resolved each time (models may be re-wrapped)."""
        pairs = self._pair_names()
        policy_params = dict(unwrap_model(self.policy).named_parameters())
        ref_params = policy_params if self._adapter_mode() else dict(unwrap_model(self.ref).named_parameters())
        return ([ref_params[r] for r, _ in pairs], [policy_params[p] for _, p in pairs], [r for r, _ in pairs])

    # ----------------------------------------------------------------------------- updates
    def should_update(self, global_step: int) -> bool:
        if isinstance(global_step, bool) or not isinstance(global_step, int):
            raise TypeError(f"global_step must be an int (optimizer steps), got {type(global_step).__name__}")
        if global_step < 0:
            raise ValueError(f"global_step must be >= 0, got {global_step}")
        return global_step > 0 and global_step % self.tau == 0 and global_step != self.last_update_step

    def step(self, global_step: int) -> bool:
        """Call after every optimizer step; blends (and returns True) iff global_step > 0,
        global_step % tau == 0 and this step has not fired yet."""
        if not self.should_update(global_step):
            return False
        self.update()
        self.last_update_step = global_step
        return True

    def update(self) -> None:
        """Blend now, whatever the step: ref ← ref + α·(policy − ref) over every paired parameter."""
        refs, pols, names = self._tensors()
        check_finite = self.check_finite
        if check_finite and any(_is_dtensor(p) for p in pols):
            self._check_finite_all_ranks(pols, names)
            check_finite = False  # agreed above; blend_ would repeat the same (local) check
        blend_(ref_tensors=refs, policy_tensors=pols, alpha=self.alpha, check_finite=check_finite,
               backend=self.backend, names=names)
        self.num_updates += 1

    @staticmethod
    def _check_finite_all_ranks(pols, names) -> None:
        import torch.distributed as dist

        local = [p.to_local() if _is_dtensor(p) else p for p in pols]
        bad_local = [i for i, t in enumerate(local) if t.numel() and not bool(torch.isfinite(t).all())]
        flag = torch.tensor([1.0 if bad_local else 0.0], device=local[0].device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            where = f"{names[bad_local[0]]!r} on this rank" if bad_local else "a shard on another rank"
            raise ValueError(f"the policy holds NaN/inf ({where}): refusing to blend it into the reference "
                             "(check_finite=False skips this check)")

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self, ref_weights: bool = True) -> dict:
        """Counters and config, plus (ref_weights=True) the blended reference parameters by name (tensors
        sharing storage with the model, as nn.Module.state_dict; DTensor shards under FSDP2). After the
        first update the reference is no longer the initial model, so a resume needs these."""
        state = {"format": STATE_FORMAT, "alpha": self.alpha, "tau": self.tau,
                 "last_update_step": self.last_update_step, "num_updates": self.num_updates}
        if ref_weights:
            refs, _, names = self._tensors()
            state["ref"] = {n: r.detach() for n, r in zip(names, refs)}
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore counters and (if present) the reference weights, bit-exactly. Everything is checked
        before anything is written. strict=False accepts a different alpha/tau (keeps this updater's)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state must be a dict from RefModelUpdater.state_dict() (format {STATE_FORMAT!r})")
        for key in ("alpha", "tau", "last_update_step", "num_updates"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        # Every field is checked here, before the reference weights below are touched.
        alpha, tau = state["alpha"], state["tau"]
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"state['alpha'] must be a number in [0, 1], got {alpha!r}")
        last, num_updates = state["last_update_step"], state["num_updates"]
        for key, value, optional in (("tau", tau, False), ("last_update_step", last, True),
                                     ("num_updates", num_updates, False)):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (1 if key == "tau" else 0):
                raise ValueError(f"state[{key!r}] must be an int >= {1 if key == 'tau' else 0}"
                                 f"{' or None' if optional else ''}, got {value!r}")
        if strict and (float(alpha) != self.alpha or int(tau) != self.tau):
            raise ValueError(f"state was saved with alpha={state['alpha']}, tau={state['tau']} but this updater has "
                             f"alpha={self.alpha}, tau={self.tau} (strict=False keeps this updater's)")
        saved = state.get("ref")
        copies = []
        if saved is not None:
            refs, _, names = self._tensors()
            if set(saved) != set(names):
                missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
                raise ValueError(f"state['ref'] does not match the reference parameters: missing {missing[:3]}, "
                                 f"unexpected {extra[:3]}")
            for name, r in zip(names, refs):
                s = saved[name]
                dst = r.to_local() if _is_dtensor(r) else r
                src = s.to_local() if _is_dtensor(s) else s
                if not isinstance(src, torch.Tensor) or tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                    raise ValueError(f"state['ref'][{name!r}]: expected {dst.dtype} of shape {tuple(dst.shape)}, got "
                                     f"{getattr(src, 'dtype', type(src).__name__)} of shape "
                                     f"{tuple(getattr(src, 'shape', ()))}")
                copies.append((dst, src))
        with torch.no_grad():
            for dst, src in copies:
                dst.copy_(src)
        self.last_update_step = None if last is None else int(last)
        self.num_updates = int(num_updates)

    def __repr__(self) -> str:
        return (f"RefModelUpdater(alpha={self.alpha}, tau={self.tau}, pairs={len(self._pairs)}, "
                f"num_updates={self.num_updates}, last_update_step={self.last_update_step})")


__all__ = ["RefModelUpdater", "unwrap_model"]
