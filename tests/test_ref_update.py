"""RefModelUpdater: schedule, pairing by name, validation before writing, checkpoints, PEFT/LoRA."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fasttrdpo
from helpers import assert_close_tol, blend_tolerance, ref_blend64

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref_update_worker.py")
BACKENDS = ["eager", "triton"]


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3)).to(dtype)


def _digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _perturb(policy, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.bfloat16])
def test_fires_exactly_at_multiples_of_tau(backend, ref_dtype):
    policy, ref = _mlp(0), _mlp(1, ref_dtype)
    tau, alpha = 3, 0.6
    upd = fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=alpha, tau=tau, backend=backend)
    fired = []
    for step in range(0, 11):
        _perturb(policy, step)  # the policy moves every step, so a wrong firing step changes the ref
        before = {n: p.detach().clone() for n, p in ref.named_parameters()}
        did = upd.step(global_step=step)
        fired.append(did)
        pol = dict(policy.named_parameters())
        for n, p in ref.named_parameters():
            if did:
                assert_close_tol(p, ref_blend64(before[n], pol[n], alpha).to(ref_dtype),
                                 blend_tolerance(before[n], pol[n], alpha), f"step {step} {n}")
            else:
                assert torch.equal(p, before[n]), f"step {step}: {n} changed without an update"
        assert upd.step(global_step=step) is False  # at most once per step
    assert [s for s, f in enumerate(fired) if f] == [3, 6, 9]
    assert upd.num_updates == 3 and upd.last_update_step == 9


def test_update_forces_and_hard_update_copies():
    policy, ref = _mlp(0), _mlp(1, torch.bfloat16)
    upd = fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=1.0, tau=1000)
    upd.update()
    for (n, p), r in zip(policy.named_parameters(), ref.parameters()):
        assert torch.equal(r, p.detach().to(torch.bfloat16)), n
    assert upd.num_updates == 1 and upd.last_update_step is None


def test_buffers_are_not_blended():
    policy, ref = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    policy.running_mean.fill_(3.0)
    with torch.no_grad():
        policy.weight.fill_(2.0)
    fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=1.0, tau=1).update()
    assert torch.equal(ref.weight, policy.weight.detach())
    assert torch.equal(ref.running_mean, torch.zeros(4))


def test_wrapped_policy_pairs_by_name():
    # DataParallel (like DDP) prefixes names with "module."; the updater unwraps it.
    policy, ref = _mlp(0), _mlp(1)
    wrapped = nn.DataParallel(policy)
    assert next(iter(dict(wrapped.named_parameters()))).startswith("module.")
    fasttrdpo.RefModelUpdater(policy=wrapped, ref=ref, alpha=1.0, tau=1).update()
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), policy.parameters()))


class _Extra(nn.Module):
    def __init__(self, extra_shape=None, rename=False):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2) if not rename else None
        if rename:
            self.c = nn.Linear(5, 2)
        if extra_shape is not None:
            self.extra = nn.Parameter(torch.zeros(extra_shape))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: (_Extra(extra_shape=3), _Extra()), id="extra_param_in_policy"),
    pytest.param(lambda: (_Extra(), _Extra(extra_shape=3)), id="extra_param_in_ref"),
    pytest.param(lambda: (_Extra(), _Extra(rename=True)), id="renamed_param"),
    pytest.param(lambda: (_Extra(extra_shape=3), _Extra(extra_shape=4)), id="shape_mismatch"),
])
def test_pairing_mismatch_raises_at_construction(make):
    policy, ref = make()
    before = _digest(ref)
    with pytest.raises(ValueError, match="pair|shape"):
        fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=0.5, tau=1)
    assert _digest(ref) == before


@pytest.mark.parametrize("kwargs,exc", [
    ({"tau": 0}, ValueError), ({"tau": -3}, ValueError), ({"tau": 2.0}, TypeError), ({"tau": True}, TypeError),
    ({"alpha": -0.01}, ValueError), ({"alpha": 1.01}, ValueError), ({"alpha": float("nan")}, ValueError),
    ({"lora_soft": "maybe"}, ValueError),
])
def test_bad_config_raises(kwargs, exc):
    ref = _mlp(1)
    before = _digest(ref)
    with pytest.raises(exc):
        fasttrdpo.RefModelUpdater(policy=_mlp(0), ref=ref, **{"alpha": 0.6, "tau": 4, **kwargs})
    assert _digest(ref) == before


def test_bad_global_step():
    upd = fasttrdpo.RefModelUpdater(policy=_mlp(0), ref=_mlp(1), alpha=0.6, tau=4)
    with pytest.raises(ValueError):
        upd.step(global_step=-4)
    with pytest.raises(TypeError):
        upd.step(global_step=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_policy_or_late_mismatch_leaves_ref_and_state_unchanged(backend):
    policy, ref = _mlp(0), _mlp(1)
    upd = fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=0.6, tau=2, backend=backend)
    assert upd.step(global_step=2)
    with torch.no_grad():
        policy[2].bias[1] = float("nan")
    before = _digest(ref)
    with pytest.raises(ValueError, match="NaN"):
        upd.step(global_step=4)
    assert _digest(ref) == before and upd.num_updates == 1 and upd.last_update_step == 2
    # A model changed after construction (a parameter added) is caught before writing too.
    with torch.no_grad():
        policy[2].bias[1] = 0.0
    ref.register_parameter("late", nn.Parameter(torch.zeros(2)))
    before = _digest(ref)
    with pytest.raises(ValueError, match="pair"):
        upd.update()
    assert _digest(ref) == before


def test_same_module_without_adapters_raises():
    m = _mlp(0)
    with pytest.raises(ValueError, match="PEFT|adapter"):
        fasttrdpo.RefModelUpdater(policy=m, ref=m, alpha=1.0, tau=1)


def test_state_dict_round_trip_in_process():
    policy, ref = _mlp(0), _mlp(1, torch.bfloat16)
    upd = fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=0.6, tau=2)
    for step in range(1, 6):
        _perturb(policy, step)
        upd.step(global_step=step)
    state = {k: ({n: t.clone() for n, t in v.items()} if k == "ref" else v) for k, v in upd.state_dict().items()}
    saved_digest = _digest(ref)
    ref2 = _mlp(7, torch.bfloat16)
    upd2 = fasttrdpo.RefModelUpdater(policy=policy, ref=ref2, alpha=0.6, tau=2)
    upd2.load_state_dict(state)
    assert _digest(ref2) == saved_digest
    assert (upd2.last_update_step, upd2.num_updates) == (4, 2)
    assert upd2.step(global_step=4) is False  # already fired at 4 before the save
    # A different alpha is refused (strict) before writing; wrong shapes too.
    upd3 = fasttrdpo.RefModelUpdater(policy=policy, ref=_mlp(8, torch.bfloat16), alpha=0.5, tau=2)
    d3 = _digest(upd3.ref)
    with pytest.raises(ValueError, match="alpha"):
        upd3.load_state_dict(state)
    bad = dict(state, ref={**state["ref"], "0.weight": torch.zeros(2, 2, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="0.weight"):
        fasttrdpo.RefModelUpdater(policy=policy, ref=upd3.ref, alpha=0.6, tau=2).load_state_dict(bad)
    assert _digest(upd3.ref) == d3


def _worker(*args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "FASTTRDPO_BACKEND"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]


def test_save_kill_resume_is_bit_exact(tmp_path):
    """8 steps straight vs 5 steps + checkpoint + SIGKILL + resume in a fresh process for 3 more: the bf16
    reference weights and the updater state agree bit for bit (tau = 2: updates at 2, 4 | 6, 8)."""
    straight = _worker("train", tmp_path / "straight.pt", 8)
    ckpt = tmp_path / "ckpt.pt"
    victim = _worker("save", ckpt, 5)
    line = victim.stdout.readline()
    assert line.strip() == "SAVED", line + victim.stderr.read()[-3000:]
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    _finish(_worker("resume", ckpt, 8, tmp_path / "resumed.pt"))
    _finish(straight)
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a["updater"] == b["updater"]
    assert a["updater"]["last_update_step"] == 8 and a["updater"]["num_updates"] == 4
    for k in a["ref"]:
        assert a["ref"][k].dtype == torch.bfloat16
        assert torch.equal(a["ref"][k].view(torch.int16), b["ref"][k].view(torch.int16)), k
    # Without restoring the ref (what TRL does on resume) the result differs: the test can tell.
    c = torch.load(ckpt, weights_only=True)
    sys.path.insert(0, os.path.dirname(WORKER))
    from ref_update_worker import make_model

    init = make_model(0).to(torch.bfloat16).state_dict()
    assert any(not torch.equal(init[k], c["ref_update"]["ref"][k]) for k in init)


# ----------------------------------------------------------------------------------------------- PEFT
peft = pytest.importorskip("peft")


def _peft_model():
    from fasttrdpo.tiny import tiny_model

    base = tiny_model(seed=0, num_hidden_layers=1, hidden_size=32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_4h_to_h"],
                          lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg)  # trained adapter "default"
    model.add_adapter("ref", cfg)  # TRL's DPOTrainer uses an adapter named "ref" as the reference
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # LoRA B starts at zero: give both adapters distinct non-trivial factors
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.set_adapter("default")
    return model, cfg


def _lora(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n}


def _base_digest(model):
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _logits(model, adapter):
    model.set_adapter(adapter)
    ids = torch.tensor([[5, 9, 33, 7, 100, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_hard_update_is_exact():
    model, _ = _peft_model()
    assert not torch.equal(_logits(model, "default"), _logits(model, "ref"))
    base = _base_digest(model)
    upd = fasttrdpo.RefModelUpdater(policy=model, ref=model, alpha=1.0, tau=1)
    assert len(upd._pairs) == 2 * 2  # (A, B) x 2 target modules in 1 layer
    assert upd.step(global_step=1)
    pol, ref = _lora(model, "default"), _lora(model, "ref")
    for n, p in pol.items():
        assert torch.equal(ref[n.replace(".default.", ".ref.")], p), n
    assert _base_digest(model) == base  # the shared base is not touched
    assert torch.equal(_logits(model, "default"), _logits(model, "ref"))  # the reference computes the policy


def test_lora_soft_update_needs_opt_in_and_blends_factors():
    model, _ = _peft_model()
    before = _lora(model, "ref")
    with pytest.raises(ValueError, match="lora_soft"):
        fasttrdpo.RefModelUpdater(policy=model, ref=model, alpha=0.6, tau=1)
    assert all(torch.equal(p, _lora(model, "ref")[n]) for n, p in before.items())
    pol = _lora(model, "default")
    upd = fasttrdpo.RefModelUpdater(policy=model, ref=model, alpha=0.6, tau=1, lora_soft="factors")
    upd.update()
    after = _lora(model, "ref")
    for n, r0 in before.items():
        p = pol[n.replace(".ref.", ".default.")]
        assert_close_tol(after[n], ref_blend64(r0, p, 0.6).float(), blend_tolerance(r0, p, 0.6), n)
    # What the docs say: the blended factors' product is not the blend of the products.
    a_name = next(n for n in before if "lora_A" in n)
    b_name = a_name.replace("lora_A", "lora_B")
    pd = lambda d, a, b: d[b].double() @ d[a].double()  # noqa: E731
    exact_delta = 0.6 * pd(pol, a_name.replace(".ref.", ".default."), b_name.replace(".ref.", ".default.")) \
        + 0.4 * pd(before, a_name, b_name)
    factor_delta = pd(after, a_name, b_name)
    assert (factor_delta - exact_delta).abs().max() > 1e-3 * exact_delta.abs().max()


def test_lora_adapter_mismatch_raises():
    from fasttrdpo.tiny import tiny_model

    base = tiny_model(seed=0, num_hidden_layers=1, hidden_size=32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"]))
    model.add_adapter("ref", peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match="differ in r"):
        fasttrdpo.RefModelUpdater(policy=model, ref=model, alpha=1.0, tau=1)
    with pytest.raises(ValueError, match="not an adapter"):
        fasttrdpo.RefModelUpdater(policy=model, ref=model, alpha=1.0, tau=1, ref_adapter="nope")


def test_positional_call_raises_and_writes_nothing():
    """RefModelUpdater(ref, policy) used to build an updater that blended the reference INTO the policy;
    now any positional model argument is a TypeError showing the keyword form, and neither model changes."""
    import inspect

    policy, ref = _mlp(0), _mlp(1)
    digests = _digest(policy), _digest(ref)
    for args in [(ref, policy), (policy, ref), (ref, policy, 1.0, 1)]:
        with pytest.raises(TypeError, match=r"keywords only.*RefModelUpdater\(policy=\.\.\., ref=\.\.\."):
            fasttrdpo.RefModelUpdater(*args)
    with pytest.raises(TypeError, match="keywords only"):
        fasttrdpo.RefModelUpdater(ref, policy=policy, alpha=1.0, tau=1)
    assert (_digest(policy), _digest(ref)) == digests
    params = inspect.signature(fasttrdpo.RefModelUpdater).parameters  # DESIGN §4: (*, policy, ref, alpha=0.6, tau=512)
    assert list(params)[:4] == ["policy", "ref", "alpha", "tau"]
    assert params["alpha"].default == 0.6 and params["tau"].default == 512
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    upd = fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=1.0, tau=1)
    assert upd.step(global_step=1) and _digest(ref) == _digest(policy) == digests[0]  # hard update: ref := policy
