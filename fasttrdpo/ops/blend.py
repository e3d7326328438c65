"""`blend_`: in-place reference update `ref <- ref + alpha * (policy - ref)` over many tensors.

Contract (DESIGN.md §4): that formula, in fp32, rounded to nearest even into the ref dtype; alpha = 0
returns without writing; alpha = 1 is a cast-copy of the policy (exact). Every pair is validated
before anything is written; with check_finite=True a policy holding NaN/inf raises.

Backends (explicit `backend=` > FASTTRDPO_BACKEND > auto, see fasttrdpo._backend):
  triton  one launch of kernels/blend.py per (device, ref dtype, policy dtype) group: a table of
          device addresses, no copies. A model usually has one group, so one launch in all.
  eager   foreach ops per group. `_foreach_lerp_` computes `r + w·(p − r)` in fp32 only for w < 0.5
          (it switches to `p − (p − r)·(1 − w)` above, whose error is not bounded by |r| and
          |α(p − r)| when the result cancels), and p − r cannot overflow fp32 only for fp16 pairs,
          so it is used only for fp16/fp16 pairs with α < 0.5; otherwise the explicit fp32 formula
          runs over cache-sized blocks.
  cpp     fasttrdpo._cpp.blend_ (csrc/), CPU only, once built.
The backends agree within the bound of fp32 arithmetic plus one rounding (FMA or not changes the
last bit), not bit for bit; alpha = 0 and alpha = 1 are bit-exact on all of them.

The one exception to the formula (all backends): where p − r is ±inf in fp32 — it overflows for
finite values near the top of the fp32/bf16 range with opposite signs (r = 3e38, p = −3e38) — the
element is α·p + (1 − α)·r, which stays finite for finite inputs. Each backend selects it per element
from values it already holds: no extra pass over the tensors.

DTensors (FSDP2 `fully_shard`): a pair of DTensors with the same mesh and placements is blended
through their local shards (`to_local()` shares storage), with no communication.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .._backend import resolve_backend
from .._validate import provably_non_overlapping

# Kept in step with kernels/blend.py SUPPORTED_PAIRS (ref dtype, policy dtype).
SUPPORTED_PAIRS = (
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
)
_EAGER_BLOCK_ELEMS = 1 << 18  # 1 MiB fp32 scratch blocks for the explicit eager formula (cache-sized)


def _pairs_text() -> str:
    return ", ".join(f"{str(r).replace('torch.', '')} ref / {str(p).replace('torch.', '')} policy"
                     for r, p in SUPPORTED_PAIRS)


def _as_list(name: str, tensors) -> list:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of tensors, got a single Tensor (wrap it in a list)")
    if isinstance(tensors, (dict, torch.nn.Module)):
        raise TypeError(f"{name} must be a sequence of tensors, got {type(tensors).__name__}; "
                        "to pair parameters by name use fasttrdpo.RefModelUpdater")
    try:
        return list(tensors)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tensors, got {type(tensors).__name__}") from None


def check_alpha(alpha) -> float:
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a number in [0, 1], got a tensor of shape {tuple(alpha.shape)}")
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number in [0, 1], got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    return alpha


def _local(name: str, i: int, ref, policy):
    """Unwrap a DTensor pair into its local shards (same mesh and placements required)."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch without distributed
        return ref, policy
    ref_d, pol_d = isinstance(ref, DTensor), isinstance(policy, DTensor)
    if not (ref_d or pol_d):
        return ref, policy
    if ref_d != pol_d:
        raise ValueError(
            f"pair {i}{name}: ref is {'a DTensor' if ref_d else 'a plain tensor'} but policy is "
            f"{'a DTensor' if pol_d else 'a plain tensor'}; shard both models the same way")
    if ref.device_mesh != policy.device_mesh or tuple(ref.placements) != tuple(policy.placements):
        raise ValueError(
            f"pair {i}{name}: ref and policy DTensors are sharded differently (ref {ref.placements} on "
            f"{ref.device_mesh}, policy {policy.placements} on {policy.device_mesh})")
    if tuple(ref.shape) != tuple(policy.shape):
        raise ValueError(f"pair {i}{name}: ref has shape {tuple(ref.shape)} but policy has {tuple(policy.shape)}")
    return ref.to_local(), policy.to_local()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) that a tensor touches (strides are non-negative for parameters)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    extent = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _check_no_aliasing(refs, policies, names) -> None:
    """A ref may not overlap another ref or any policy: the blend would read what it just wrote."""
    spans = []
    for i, r in enumerate(refs):
        spans.append((*_span(r), r.device, True, i))
    for i, p in enumerate(policies):
        spans.append((*_span(p), p.device, False, i))
    by_device: dict = {}
    for s in spans:
        if s[1] > s[0]:
            by_device.setdefault(str(s[2]), []).append(s)
    for items in by_device.values():
        items.sort(key=lambda s: (s[0], s[1]))
        end_any = end_ref = -1
        owner_any = owner_ref = None
        for start, end, _, is_ref, i in items:
            if is_ref and start < end_any:
                other = owner_any
            elif not is_ref and start < end_ref:
                other = owner_ref
            else:
                other = None
            if other is not None:
                a = f"ref {i}{names(i)}" if is_ref else f"policy {i}{names(i)}"
                b = f"{'ref' if other[0] else 'policy'} {other[1]}{names(other[1])}"
                raise ValueError(f"ref_tensors must not share memory with each other or with policy_tensors: "
                                 f"{a} overlaps {b}")
            if end > end_any:
                end_any, owner_any = end, (is_ref, i)
            if is_ref and end > end_ref:
                end_ref, owner_ref = end, (True, i)


def _check_finite(policies, names) -> None:
    """Raise if any policy element is NaN/inf. One multi-tensor L2 norm per device (one launch on CUDA) and one host sync screen everything: a non-finite element makes the norm
    non-finite. The norm can also overflow for huge finite values, so a flagged tensor is confirmed
    exactly with isfinite before raising (no false alarm, no miss)."""
    by_device: dict = {}
    for i, p in enumerate(policies):
        if p.numel():
            by_device.setdefault(p.device, []).append(i)
    from .. import _cpp

    for device, idx in by_device.items():
        ts = [policies[i] for i in idx]
        if device.type == "cpu" and _cpp.is_loaded() and all(t.is_contiguous() for t in ts):
            # The built C++ extension checks exactly, in one vectorized multi-threaded read: on CPU the
            # foreach norm costs several times the blend itself.
            flagged = (~_cpp.finite_flags(ts)).nonzero().flatten().tolist()
        else:
            # fp32/bf16 norms in their own dtype (fp32 range: overflow only next to real overflow, and
            # a flag is confirmed exactly below); fp16's range would flag ordinary weights, so fp32 there.
            wide = any(t.dtype == torch.float16 for t in ts)
            norms = torch._foreach_norm(ts, 2, dtype=torch.float32) if wide else torch._foreach_norm(ts, 2)
            flagged = (~torch.isfinite(torch.stack([n.float() for n in norms]))).nonzero().flatten().tolist()
        for k in flagged:
            j = idx[k]
            bad = ~torch.isfinite(policies[j])
            if bool(bad.any()):
                kind = "NaN" if bool(torch.isnan(policies[j]).any()) else "inf"
                where = tuple(bad.nonzero()[0].tolist())
                raise ValueError(
                    f"policy_tensors[{j}]{names(j)} holds {kind} (first at index {where}): refusing to blend it "
                    "into the reference (pass check_finite=False to skip this check)")


def keyword_only(usage: str, *, bound: int = 0):
    """Decorator: `fn` takes keywords only (its own signature starts with `*`), and a positional call raises a
    TypeError that shows `usage`. Python's own message ("takes 0 positional arguments but 3 were given") does
    not say why: blend_ takes (ref, policy), RefModelUpdater (policy, ref), and a swapped positional call
    would silently overwrite the policy. `bound`: leading positionals that are fine (1 for `self`)."""
    def decorate(fn):
        @functools.wraps(fn)  # inspect.signature follows __wrapped__: the keyword-only signature shows
        def wrapper(*args, **kwargs):
            if len(args) > bound:
                raise TypeError(f"{fn.__qualname__.replace('.__init__', '')}() takes its arguments as keywords "
                                f"only, got {len(args) - bound} positional: call {usage}")
            return fn(*args, **kwargs)
        return wrapper
    return decorate


@keyword_only("blend_(ref_tensors=..., policy_tensors=..., alpha=...)")
def blend_(*, ref_tensors, policy_tensors, alpha, check_finite: bool = True, backend: str = "auto",
           names: Sequence[str] | None = None) -> None:
    """In place, for every pair: ref <- ref + alpha * (policy - ref) (fp32, round to nearest even).

    Keywords only (`blend_(ref_tensors=..., policy_tensors=..., alpha=...)`; a positional call raises a
    TypeError before anything is read): a swap would overwrite the policy. `names` (optional, one per
    pair) only makes error messages readable.
    Raises before writing anything on: alpha outside [0, 1]; lists that do not pair up; a shape,
    device or unsupported dtype mismatch; refs that alias each other or a policy, or a ref whose
    elements overlap each other (an expanded view); with
    check_finite=True a policy holding NaN/inf. Requesting a backend that cannot run raises too.
    """
    refs = _as_list("ref_tensors", ref_tensors)
    policies = _as_list("policy_tensors", policy_tensors)
    if names is not None and len(names) != len(refs):
        raise ValueError(f"names must give one name per pair: {len(names)} names for {len(refs)} pairs")
    label = (lambda i: f" ({names[i]})") if names is not None else (lambda i: "")
    alpha = check_alpha(alpha)
    if len(refs) != len(policies):
        raise ValueError(f"ref_tensors and policy_tensors must pair up: got {len(refs)} ref tensors and "
                         f"{len(policies)} policy tensors")
    local_refs, local_pols = [], []
    for i, (r, p) in enumerate(zip(refs, policies)):
        for what, t in (("ref_tensors", r), ("policy_tensors", p)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what}[{i}]{label(i)} must be a torch.Tensor, got {type(t).__name__}")
        r, p = _local(label(i), i, r, p)
        if (r.dtype, p.dtype) not in SUPPORTED_PAIRS:
            raise TypeError(f"pair {i}{label(i)}: ref dtype {r.dtype} with policy dtype {p.dtype} is not "
                            f"supported; supported: {_pairs_text()}")
        if tuple(r.shape) != tuple(p.shape):
            raise ValueError(f"pair {i}{label(i)}: ref_tensors[{i}] has shape {tuple(r.shape)} but "
                             f"policy_tensors[{i}] has shape {tuple(p.shape)}")
        if r.device != p.device:
            raise ValueError(f"pair {i}{label(i)}: ref_tensors[{i}] is on {r.device} but policy_tensors[{i}] "
                             f"is on {p.device}")
        if not provably_non_overlapping(r):
            raise ValueError(f"ref_tensors[{i}]{label(i)} overlaps itself in memory (shape {tuple(r.shape)}, strides "
                             f"{tuple(r.stride())}, e.g. an expand()ed view): an in-place blend would write its "
                             "shared elements more than once; pass a tensor with distinct elements")
        local_refs.append(r)
        local_pols.append(p.detach())
    _check_no_aliasing(local_refs, local_pols, label)
    if check_finite:
        _check_finite(local_pols, label)

    groups: dict = {}
    for i, (r, p) in enumerate(zip(local_refs, local_pols)):
        if r.numel():
            groups.setdefault((r.device, r.dtype, p.dtype), []).append(i)
    # Resolve every group's backend before the first write: a backend that cannot run raises here.
    plan = [(resolve_backend("blend_", backend, dev), idx) for (dev, _, _), idx in groups.items()]
    if alpha == 0.0:
        return
    with torch.no_grad():
        for chosen, idx in plan:
            rs = [local_refs[i] for i in idx]
            ps = [local_pols[i] for i in idx]
            if chosen == "eager":
                _blend_eager(rs, ps, alpha)
            else:
                _blend_contiguous(rs, ps, alpha, chosen)


def _blend_contiguous(refs, policies, alpha: float, backend: str) -> None:
    """triton/cpp work on contiguous memory: non-contiguous refs go through a staging copy."""
    staged = [(r, r if r.is_contiguous() else r.contiguous()) for r in refs]
    rs = [s for _, s in staged]
    ps = [p.contiguous() for p in policies]
    if backend == "triton":
        from fasttrdpo.kernels.blend import launch_blend

        launch_blend(rs, ps, alpha)
    else:  # cpp (its alpha = 1 is a cast-copy too)
        from .. import _cpp

        _cpp.blend_(rs, ps, alpha)
    for original, s in staged:
        if s is not original:
            original.copy_(s)


def _blend_eager(refs, policies, alpha: float) -> None:
    if alpha == 1.0:
        torch._foreach_copy_(refs, policies)
        return
    if refs[0].dtype == policies[0].dtype == torch.float16 and alpha < 0.5:
        # lerp with weight < 0.5 is r + w·(p − r) in the fp32 opmath, rounded once into the dtype;
        # fp16 values differ by at most 2·65504, so p − r never overflows fp32 here.
        torch._foreach_lerp_(refs, policies, alpha)
        return
    # The explicit fp32 formula, block by block through two small reused fp32 buffers: whole-tensor
    # fp32 temporaries would stream every element through memory several times (measured ~3x slower
    # than TRL's bf16 mul_ + add_ loop on CPU); blocks that stay in cache beat that loop instead.
    r32 = torch.empty(_EAGER_BLOCK_ELEMS, dtype=torch.float32, device=refs[0].device)
    d32 = torch.empty_like(r32)
    for r, p in zip(refs, policies):
        if not (r.is_contiguous() and p.is_contiguous()):
            r32_full = r.to(torch.float32, copy=True)  # copies: never write through to r or p early
            p32_full = p.to(torch.float32, copy=True)
            r.copy_(_blend_fp32_(r32_full, p32_full, torch.sub(p32_full, r32_full), alpha))
            continue
        rf, pf = r.view(-1), p.view(-1)
        n = rf.numel()
        for s in range(0, n, _EAGER_BLOCK_ELEMS):
            e = min(n, s + _EAGER_BLOCK_ELEMS)
            a, d = r32[: e - s], d32[: e - s]
            a.copy_(rf[s:e])
            d.copy_(pf[s:e]).sub_(a)  # p − r, one rounding
            rf[s:e].copy_(_blend_fp32_(a, pf[s:e], d, alpha))  # fp32 -> ref dtype rounds to nearest even


def _blend_fp32_(r32, p, d32, alpha: float):
    """r32 ← r32 + α·d32 (d32 = p − r in fp32; an FMA here only removes a rounding), and where d32 is
    ±inf (p − r overflowed) α·p + (1 − α)·r instead. The check reads the in-cache block once; the
    fix-up runs only for a block that holds such an element."""
    overflow = torch.isinf(d32)
    if not bool(overflow.any()):
        return r32.add_(d32, alpha=alpha)
    alt = p.to(torch.float32).mul(alpha).add_(r32, alpha=1.0 - alpha)  # before r32 is overwritten
    r32.add_(d32, alpha=alpha)
    return r32.copy_(torch.where(overflow, alt, r32))
