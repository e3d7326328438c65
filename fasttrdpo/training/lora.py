"""LoRA (peft) in TRDPOTrainer: the adapter, the reference it trains against, its updates and its checkpoints.

The policy is a `peft.PeftModel` whose adapter "default" is trained (the base weights stay frozen). Three
references (`TRDPOConfig.lora_reference`):

- "base": the adapter-free base model, i.e. the same network run with the adapters switched off (TRL's
  DPOTrainer with `peft_config`: plain DPO). No second copy of anything; it cannot move, so
  `sync_ref_model=True` is refused.
- "adapter": a second adapter "ref" beside "default" (TRL's DPOTrainer adds one when given a PeftModel).
  The hard update (alpha = 1) copies the factors: exact (B_ref·A_ref = B·A). The soft update of the factors
  is not the soft update of the weight delta (B·A is bilinear: cross terms appear, see
  fasttrdpo.ref_update), so alpha < 1 raises unless `lora_soft="factors"` opts into that approximation.
- "merged": a full-weight reference model (a frozen copy of the base, in `ref_dtype`). Every update blends
  the policy's effective weight W0 + s·B·A of each LoRA layer into it, one layer at a time:
  ref <- ref + alpha·(W0 + s·B·A - ref), the exact TR-DPO update for any alpha. Cost: one more copy of the
  model in `ref_dtype` (what full fine-tuning's reference costs), plus one layer's fp32 W0 + s·B·A at a time
  during an update.

Switching the shared network between policy, reference adapter and base sets peft's per-layer
`_active_adapter` / `_disable_adapters` directly (inside `torch.no_grad`), never `set_adapter`, which also
flips `requires_grad` and would unfreeze the reference adapter or freeze the trained one mid-step.

Checkpoints hold the adapters only (`adapter_model.safetensors`, the "ref" adapter in `ref/`), plus, for
"merged", the blended reference weights of the LoRA layers (`reference_lora_layers.safetensors`: the only
reference weights that ever differ from the base). The base weights come from the model given at resume.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil

import torch

POLICY_ADAPTER = "default"
REF_ADAPTER = "ref"
INIT_ADAPTER = "init"
REFERENCES = ("base", "adapter", "merged")
MERGED_REF_FILE = "reference_lora_layers.safetensors"


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def lora_requested(model, config) -> bool:
    return config.lora_r > 0 or is_peft_model(model)


def check_config(config) -> None:
    """LoRA settings that cannot apply raise (called from TRDPOConfig.__post_init__)."""
    lora = config.lora_r > 0
    if config.lora_r < 0:
        raise ValueError("lora_r must be >= 0 (0: no LoRA)")
    if config.lora_reference is not None and config.lora_reference not in REFERENCES:
        raise ValueError(f"lora_reference must be None or one of {REFERENCES}, got {config.lora_reference!r}")
    if config.lora_soft not in ("error", "factors"):
        raise ValueError(f"lora_soft must be 'error' or 'factors', got {config.lora_soft!r}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError("lora_dropout must be in [0, 1)")
    if not lora:
        # these only mean something when the trainer creates the adapter (a PeftModel passed with lora_r = 0
        # brings its own); lora_reference, lora_soft and save_merged are checked against the model (check_no_lora)
        for name, default in (("lora_target_modules", None), ("lora_dropout", 0.0), ("lora_alpha", 32.0)):
            if getattr(config, name) != default:
                raise ValueError(f"{name} is set but lora_r = 0 (no LoRA): set lora_r > 0")
        return
    if config.lora_alpha <= 0:
        raise ValueError("lora_alpha must be > 0")
    if config.lora_dropout > 0 and config.disable_dropout:
        raise ValueError("lora_dropout > 0 with disable_dropout=True: the trainer turns every dropout off (as TRL); "
                         "set disable_dropout=False to keep LoRA dropout")
    tm = config.lora_target_modules
    if tm is not None and (not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm)):
        raise ValueError("lora_target_modules must be None (peft's default for the architecture) or a non-empty "
                         "list of module names ('all-linear' alone for every linear layer but the head)")


def check_no_lora(config) -> None:
    """A model trained without LoRA: the LoRA-only settings would be ignored, so they raise."""
    for name, default in (("lora_reference", None), ("lora_soft", "error"), ("save_merged", False)):
        if getattr(config, name) != default:
            raise ValueError(f"{name}={getattr(config, name)!r} applies to LoRA training only: set lora_r > 0 or "
                             "pass a PeftModel")


def reference_kind(config) -> str:
    return config.lora_reference or "base"


def check_for_model(config, peft_given: bool) -> None:
    """The combinations of reference, update and saving that cannot apply."""
    ref, sync = reference_kind(config), config.sync_ref_model
    if ref == "base" and sync:
        raise ValueError("lora_reference='base' is the adapter-free base model, which never moves: sync_ref_model="
                         "True needs lora_reference='adapter' (exact for alpha = 1) or 'merged' (exact for any alpha); "
                         "sync_ref_model=False trains plain DPO against the base")
    if config.lora_soft == "factors" and not (ref == "adapter" and sync and config.alpha < 1.0):
        raise ValueError("lora_soft='factors' (blend the LoRA factors, approximate) applies only to "
                         "lora_reference='adapter' with sync_ref_model=True and alpha < 1")
    if ref == "adapter" and sync and config.alpha < 1.0 and config.lora_soft == "error":
        raise ValueError(f"alpha={config.alpha} with lora_reference='adapter' would blend the LoRA factors A and B "
                         "one by one, which is not the soft update of the weight delta B·A (cross terms appear). "
                         "Use alpha=1.0 (exact hard update), lora_reference='merged' (exact, a full-weight "
                         "reference), or lora_soft='factors' to accept the approximation")
    if config.save_reference and ref == "base" and not config.save_merged:
        raise ValueError("save_reference with lora_reference='base': the reference is the base model, which has no "
                         "adapter to save; save_merged=True writes it in full, or leave save_reference off")
    if config.ref_dtype is not None and ref != "merged":
        raise ValueError(f"ref_dtype={config.ref_dtype!r} with lora_reference={ref!r}: the reference shares the policy's "
                         "base weights, there is no separate copy to store in another dtype (lora_reference='merged' "
                         "keeps one)")
    if peft_given and config.lora_r > 0:
        raise ValueError("the model is already a PeftModel: lora_r / lora_alpha / lora_target_modules would be "
                         "ignored; pass the base model, or keep lora_r = 0 to train its adapter 'default'")


def _tuner_layers(model):
    return [m for m in model.modules() if hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")]


@contextlib.contextmanager
def active_adapter(peft_model, adapter: str | None):
    """Run the shared network with `adapter` active (None: adapters off), then restore every layer."""
    layers = _tuner_layers(peft_model)
    saved = [(m, m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for m in layers:
            if adapter is None:
                m._disable_adapters = True
            else:
                m._active_adapter = [adapter]
                m._disable_adapters = False
        yield
    finally:
        for m, act, dis in saved:
            m._active_adapter, m._disable_adapters = act, dis


class _ViewBackbone:
    def __init__(self, view):
        self.view = view

    def __call__(self, **kwargs):
        with torch.no_grad(), active_adapter(self.view.peft_model, self.view.adapter):
            return self.view.hf_model.base_model(**kwargs)


class AdapterView:
    """The shared network seen as a frozen model: with adapter `adapter` active (None: the base). It offers
    what the trainer asks of a reference or initial model (backbone, lm_head, parameters)."""

    def __init__(self, peft_model, adapter: str | None):
        self.peft_model, self.adapter = peft_model, adapter
        self.hf_model = peft_model.get_base_model()
        self.config = self.hf_model.config
        self.base_model = _ViewBackbone(self)

    def get_output_embeddings(self):
        return self.hf_model.get_output_embeddings()

    def named_parameters(self):
        if self.adapter is None:
            return iter(())
        return ((n, p) for n, p in self.peft_model.named_parameters() if f".{self.adapter}." in n)

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def buffers(self):
        return iter(())

    def eval(self):
        return self


def adapter_parameters(peft_model, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if f".{adapter}." in n}


def _copy_adapter(peft_model, src: str, dst: str) -> None:
    with torch.no_grad():
        for name, p in adapter_parameters(peft_model, src).items():
            peft_model.get_parameter(name.replace(f".{src}.", f".{dst}.")).copy_(p)


class LoraSetup:
    """The peft side of a TRDPOTrainer: built before the trainer moves or copies the model."""

    def __init__(self, model, config):
        self.config = config
        peft_given = is_peft_model(model)
        check_for_model(config, peft_given)
        base_copy = None
        if peft_given:
            if POLICY_ADAPTER not in model.peft_config:
                raise ValueError(f"the PeftModel has no adapter {POLICY_ADAPTER!r} to train "
                                 f"(adapters: {sorted(model.peft_config)})")
            if reference_kind(config) == "merged":
                raise ValueError("lora_reference='merged' needs the base model (pass it with lora_r > 0), not a "
                                 "PeftModel: its full-weight reference is a copy of the base before the adapter")
            peft_model = model
        else:
            from peft import LoraConfig, get_peft_model

            if reference_kind(config) == "merged":
                base_copy = copy.deepcopy(model)  # the full-weight reference, taken before peft wraps the model
            targets = config.lora_target_modules
            if targets == ["all-linear"]:
                targets = "all-linear"
            # the adapter's random start follows config.seed, not whatever the global RNG holds (a run is
            # reproducible from its config); the caller's RNG streams are left as they were
            cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(config.seed)
                peft_model = get_peft_model(model, LoraConfig(
                    r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    target_modules=targets, task_type="CAUSAL_LM"))
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(peft_model.get_output_embeddings(), BaseTunerLayer):
            raise ValueError("a LoRA adapter on the lm_head is not supported: the loss reads lm_head.weight directly "
                             "(logits are never formed), so the adapter would be ignored; remove it from "
                             "lora_target_modules")
        pc = peft_model.peft_config[POLICY_ADAPTER]
        if getattr(pc, "use_dora", False) and reference_kind(config) == "merged":
            raise ValueError("lora_reference='merged' with DoRA: the effective weight is not W0 + s·B·A")
        self.peft_model = peft_model
        self.created = not peft_given
        self.merged_ref = base_copy
        if reference_kind(config) == "adapter" and REF_ADAPTER not in peft_model.peft_config:
            peft_model.add_adapter(REF_ADAPTER, pc)  # as TRL: a copy of the trained adapter
            _copy_adapter(peft_model, POLICY_ADAPTER, REF_ADAPTER)
        for name, p in peft_model.named_parameters():
            if f".{POLICY_ADAPTER}." not in name:
                p.requires_grad_(False)  # only the trained adapter reaches the optimizer
        # the initial policy (for KL(policy || initial)): the base when the adapter starts at zero (B = 0)
        self.init_adapter = None
        delta_zero = all(not bool(p.any()) for n, p in adapter_parameters(peft_model, POLICY_ADAPTER).items()
                         if "lora_B" in n)
        if not delta_zero:
            peft_model.add_adapter(INIT_ADAPTER, pc)
            _copy_adapter(peft_model, POLICY_ADAPTER, INIT_ADAPTER)
            for p in adapter_parameters(peft_model, INIT_ADAPTER).values():
                p.requires_grad_(False)
            self.init_adapter = INIT_ADAPTER

    @property
    def model(self):
        return self.peft_model

    def active_adapter_context(self, adapter: str | None):
        """Run the policy network with `adapter` active (None: the base) for the duration of a `with`."""
        return active_adapter(self.peft_model, adapter)

    # --- the frozen models ------------------------------------------------------------------------------

    def reference(self, frozen_copy, ref_model, ref_dtype, device):
        ref = reference_kind(self.config)
        if ref_model is not None and ref != "merged":
            raise ValueError(f"ref_model is given but lora_reference={ref!r} uses the shared network as the "
                             "reference: pass no ref_model, or lora_reference='merged' to blend into it")
        if ref == "base":
            return AdapterView(self.peft_model, None)
        if ref == "adapter":
            return AdapterView(self.peft_model, REF_ADAPTER)
        source = ref_model if ref_model is not None else self.merged_ref
        self.merged_ref = None
        return frozen_copy(source.to(device), ref_dtype)

    def initial(self):
        return AdapterView(self.peft_model, self.init_adapter)

    def updater(self, ref_model):
        c = self.config
        if not c.sync_ref_model:
            return None
        if reference_kind(c) == "adapter":
            from ..ref_update import RefModelUpdater

            return RefModelUpdater(policy=self.peft_model, ref=self.peft_model, alpha=c.alpha, tau=c.tau,
                                   policy_adapter=POLICY_ADAPTER, ref_adapter=REF_ADAPTER, lora_soft=c.lora_soft)
        return MergedLoraUpdater(policy=self.peft_model, ref=ref_model, alpha=c.alpha, tau=c.tau)

    # --- checkpoints --------------------------------------------------------------------------------------

    def saved_adapters(self) -> list[str]:
        return [POLICY_ADAPTER] + ([REF_ADAPTER] if reference_kind(self.config) == "adapter" else [])

    def save_checkpoint_weights(self, trainer, folder: str) -> None:
        """Adapters only (+ the merged reference's LoRA-layer weights)."""
        self.peft_model.save_pretrained(folder, selected_adapters=self.saved_adapters(), safe_serialization=True)
        if reference_kind(self.config) == "merged":
            from safetensors.torch import save_file

            layers = merged_reference_tensors(self.peft_model, trainer.ref_model)
            save_file({n: t.detach().contiguous() for n, t in layers.items()}, os.path.join(folder, MERGED_REF_FILE))

    def load_checkpoint_weights(self, trainer, folder: str) -> None:
        """Restore the adapters (and the merged reference's LoRA layers) bit for bit; all checked first."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        copies = []
        for adapter in self.saved_adapters():
            path = os.path.join(folder, "" if adapter == POLICY_ADAPTER else adapter, "adapter_model.safetensors")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: {folder} is not a LoRA checkpoint of this configuration")
            saved = load_file(path)
            live = get_peft_model_state_dict(self.peft_model, adapter_name=adapter)  # shares the parameters' storage
            copies += _pair_state(saved, live, path)
        if reference_kind(self.config) == "merged":
            path = os.path.join(folder, MERGED_REF_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing (the merged reference's weights)")
            copies += _pair_state(load_file(path), merged_reference_tensors(self.peft_model, trainer.ref_model), path)
        with torch.no_grad():
            for dst, src in copies:
                dst.copy_(src)

    # --- the final model -----------------------------------------------------------------------------------

    def save_final(self, folder: str, ref_model, save_reference: bool) -> None:
        """folder: the policy as an adapter (save_merged False) or merged into full weights; reference/
        alike (a merged reference is a full model either way)."""
        c = self.config
        merged = bool(c.save_merged)
        if merged:
            self._merged_copy(POLICY_ADAPTER).save_pretrained(folder, safe_serialization=True)
        else:
            self.peft_model.save_pretrained(folder, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)
        if not save_reference:
            return
        ref_dir = os.path.join(folder, "reference")
        if reference_kind(c) == "merged":
            ref_model.save_pretrained(ref_dir, safe_serialization=True)
        elif reference_kind(c) == "base":  # save_merged=True (checked): the base in full
            self._merged_copy(None).save_pretrained(ref_dir, safe_serialization=True)
        elif merged:
            self._merged_copy(REF_ADAPTER).save_pretrained(ref_dir, safe_serialization=True)
        else:  # the "ref" adapter saved under the default name, so it loads like any adapter
            tmp = ref_dir + ".tmp"
            self.peft_model.save_pretrained(tmp, selected_adapters=[REF_ADAPTER], safe_serialization=True)
            os.rename(os.path.join(tmp, REF_ADAPTER), ref_dir)
            shutil.rmtree(tmp)  # what peft writes beside the adapter folders (a model card)

    def _merged_copy(self, adapter: str | None):
        """A plain transformers model: the base with `adapter` merged in (None: the base alone). Costs one
        transient copy of the model."""
        twin = copy.deepcopy(self.peft_model)
        if adapter is None:
            return twin.unload()
        for name in list(twin.peft_config):
            if name != adapter:
                twin.delete_adapter(name)
        return twin.merge_and_unload()


def _pair_state(saved: dict, live: dict, where: str) -> list:
    if set(saved) != set(live):
        missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        raise ValueError(f"{where} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    pairs = []
    for name, dst in live.items():
        src = saved[name]
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise ValueError(f"{where}: {name} is {src.dtype} {tuple(src.shape)}, the model has {dst.dtype} "
                             f"{tuple(dst.shape)}")
        pairs.append((dst, src))
    return pairs


# --- the merged (full-weight) reference --------------------------------------------------------------------

def _lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """{module path in the plain model: LoRA layer} for every layer carrying the trained adapter."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and POLICY_ADAPTER in module.lora_A:
            out[path] = module
    return out


def merged_reference_tensors(peft_model, ref_model) -> dict[str, torch.Tensor]:
    """{name: the reference's parameter} for every weight an update writes: the LoRA layers' weights and any
    other trained parameter (modules_to_save, biases) under its plain name. Names that do not resolve raise."""
    ref_params = dict(ref_model.named_parameters())
    out = {}
    for path in _lora_layers(peft_model):
        name = f"{path}.weight"
        if name not in ref_params:
            raise ValueError(f"the merged reference has no parameter {name!r} for the LoRA layer {path!r}")
        out[name] = ref_params[name]
    for name, p in peft_model.get_base_model().named_parameters():
        if p.requires_grad and "lora_" not in name:
            plain = name.replace(f".modules_to_save.{POLICY_ADAPTER}", "").replace(".base_layer", "")
            if plain not in ref_params:
                raise ValueError(f"trained parameter {name!r} has no counterpart {plain!r} in the merged reference")
            out[plain] = ref_params[plain]
    return out


class MergedLoraUpdater:
    """Every tau optimizer steps: ref <- ref + alpha·(W0 + s·B·A - ref) for each LoRA layer (and ref <- ref +
    alpha·(p - ref) for any other trained parameter), one layer at a time through `fasttrdpo.blend_` (fp32
    math, one rounding into the reference dtype). The exact soft update of the effective weights."""

    def __init__(self, *, policy, ref, alpha: float, tau: int, check_finite: bool = True, backend: str = "auto"):
        from ..ops.blend import check_alpha

        self.policy, self.ref = policy, ref
        self.alpha, self.tau = check_alpha(alpha), int(tau)
        if self.tau < 1:
            raise ValueError(f"tau must be >= 1, got {tau}")
        self.check_finite, self.backend = check_finite, backend
        self.last_update_step: int | None = None
        self.num_updates = 0
        self._targets = merged_reference_tensors(policy, ref)  # raises on names that do not resolve
        for path, layer in _lora_layers(policy).items():
            w, r = layer.get_base_layer().weight, self._targets[f"{path}.weight"]
            if w.shape != r.shape:
                raise ValueError(f"{path}.weight: reference shape {tuple(r.shape)} != policy {tuple(w.shape)}")

    def should_update(self, global_step: int) -> bool:
        return global_step > 0 and global_step % self.tau == 0 and global_step != self.last_update_step

    def step(self, global_step: int) -> bool:
        if not self.should_update(global_step):
            return False
        self.update()
        self.last_update_step = global_step
        return True

    @torch.no_grad()
    def update(self) -> None:
        from ..ops.blend import blend_

        layers = _lora_layers(self.policy)
        others = [(n, p) for n, p in self.policy.get_base_model().named_parameters()
                  if p.requires_grad and "lora_" not in n]
        if self.check_finite:  # every source is checked before the first reference tensor is written
            for path, layer in layers.items():
                for p in (layer.lora_A[POLICY_ADAPTER].weight, layer.lora_B[POLICY_ADAPTER].weight):
                    if not bool(torch.isfinite(p).all()):
                        raise ValueError(f"the policy adapter holds NaN/inf ({path}): refusing to blend it into "
                                         "the reference")
            for n, p in others:
                if not bool(torch.isfinite(p).all()):
                    raise ValueError(f"the policy parameter {n} holds NaN/inf: refusing to blend it into the reference")
        for path, layer in layers.items():
            w0 = layer.get_base_layer().weight
            effective = w0.float() + layer.get_delta_weight(POLICY_ADAPTER).float()  # W0 + s·B·A, one layer at a time
            blend_(ref_tensors=[self._targets[f"{path}.weight"]], policy_tensors=[effective], alpha=self.alpha,
                   check_finite=False, backend=self.backend)
        if others:
            names = [n.replace(f".modules_to_save.{POLICY_ADAPTER}", "").replace(".base_layer", "") for n, _ in others]
            blend_(ref_tensors=[self._targets[n] for n in names], policy_tensors=[p for _, p in others],
                   alpha=self.alpha, check_finite=False, backend=self.backend)
        self.num_updates += 1

    def state_dict(self, ref_weights: bool = False) -> dict:
        from ..ref_update import STATE_FORMAT

        state = {"format": STATE_FORMAT, "alpha": self.alpha, "tau": self.tau,
                 "last_update_step": self.last_update_step, "num_updates": self.num_updates}
        if ref_weights:
            state["ref"] = {n: t.detach() for n, t in self._targets.items()}
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        from ..ref_update import STATE_FORMAT

        # every key is read and checked before the first reference tensor is written
        missing = [k for k in ("alpha", "tau", "last_update_step", "num_updates") if k not in state]
        if missing:
            raise ValueError(f"not a merged-LoRA updater state: missing {missing}")
        if state.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise ValueError(f"updater state format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        if strict and (float(state["alpha"]) != self.alpha or int(state["tau"]) != self.tau):
            raise ValueError(f"state was saved with alpha={state['alpha']}, tau={state['tau']}")
        last = state["last_update_step"]
        last_update_step = None if last is None else int(last)
        num_updates = int(state["num_updates"])
        copies = _pair_state(state["ref"], self._targets, "state['ref']") if "ref" in state else []
        with torch.no_grad():
            for dst, src in copies:
                dst.copy_(src)
        self.last_update_step, self.num_updates = last_update_step, num_updates
