"""Independent float64 references and derived tolerances shared by the tests.

Tolerances (DESIGN.md §4). The kernels compute in fp32 from inputs stored in any float dtype; the
references below compute in float64 from the *same stored values*, so storage rounding is not an error
and only fp32 arithmetic is. With u = 2**-24 (fp32 unit roundoff), a per-token log-prob
logp = z_y - (m + log Σ exp(z - m)) carries
  * the rounding of z_y, m and the final subtractions: a few u·(|lse| + max|z|);
  * the relative error of the exp-sum (Σ of positive terms, at most n sequential additions plus one
    rounding per exp), which becomes an absolute error in the log: (n_add + 4)·u;
  * when logits are formed in fp32 from hidden·weight (lm_head level), every logit is off by at most
    γ_H·Σ_k|h_k·W_vk| (γ_H = H·u/(1 − H·u), the classical dot-product bound); lse and z_y each move
    by at most that, so it enters twice.
The bound is worst-case (it holds for any summation order the kernels pick); observed errors are far
below it, so a failure means a real bug (a wrong index or mask gives O(1) errors), not noise.
"""
from __future__ import annotations

import math

import torch

U32 = 2.0 ** -24


def transform_logits64(z: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    z = z.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def ref_token_logprobs(logits, labels, ignore_index=-100, logit_scale=1.0, softcap=None):
    """float64 log_softmax(transform(logits)).gather(labels), 0.0 where ignored."""
    z = transform_logits64(logits, logit_scale, softcap)
    logp = torch.log_softmax(z, dim=-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, out, torch.zeros_like(out))


def ref_linear_logits(hidden, weight, bias=None, logit_scale=1.0, softcap=None):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return transform_logits64(z, logit_scale, softcap)


def ref_linear_token_logprobs(hidden, weight, labels, bias=None, ignore_index=-100, logit_scale=1.0, softcap=None):
    z = ref_linear_logits(hidden, weight, bias, logit_scale, softcap)
    return ref_token_logprobs(z, labels, ignore_index)


def logprob_tolerance(z64: torch.Tensor, n_add: int | None = None, dot_err: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-token absolute bound on |fp32 logp - float64 logp| given the float64 logits z64 [..., V].

    n_add: sequential additions in the exp-sum (default V, the worst case for any order).
    dot_err: per-token bound on the error of each fp32-formed logit (see `dot_error_bound`).
    """
    V = z64.shape[-1]
    n_add = V if n_add is None else n_add
    lse = torch.logsumexp(z64, dim=-1).abs()
    zmax = z64.abs().amax(dim=-1)
    return U32 * (8.0 * (lse + zmax) + (n_add + 4)) + 2.0 * torch.as_tensor(dot_err, dtype=torch.float64)


def dot_error_bound(hidden, weight, bias=None, logit_scale=1.0) -> torch.Tensor:
    """Per-token max over v of γ_H·Σ_k|h_k W_vk| (+ one rounding of the bias add and the scale)."""
    H = hidden.shape[-1]
    gamma = H * U32 / (1 - H * U32)
    absdot = hidden.double().abs() @ weight.double().abs().T
    if bias is not None:
        absdot = absdot + bias.double().abs()
    return (gamma + 2 * U32) * abs(logit_scale) * absdot.amax(dim=-1)


def assert_close_tol(actual: torch.Tensor, expected: torch.Tensor, tol, what: str = "") -> None:
    """|actual - expected| <= tol elementwise (tol broadcastable), with a readable failure."""
    err = (actual.double() - expected.double()).abs()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(err)
    bad = ~(err <= tol)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements exceed tolerance; first at flat index {i}: "
            f"actual={actual.flatten()[i].item()!r} expected={expected.flatten()[i].item()!r} "
            f"err={err.flatten()[i].item():.3e} tol={tol.flatten()[i].item():.3e}; max err/tol="
            f"{(err / tol.clamp_min(1e-300)).max().item():.3g}"
        )


# --- reference-model blend (blend_, RefModelUpdater) -------------------------------------------------
# Unit roundoff and smallest subnormal spacing of each storage dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
SUBNORMAL_SPACING = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}


def ref_blend64(ref: torch.Tensor, policy: torch.Tensor, alpha: float) -> torch.Tensor:
    """float64 `ref + alpha * (policy - ref)` from the stored values (not yet rounded)."""
    r, p = ref.double(), policy.double()
    return r + alpha * (p - r)


def blend_tolerance(ref: torch.Tensor, policy: torch.Tensor, alpha: float) -> torch.Tensor:
    """Elementwise bound on |blend_ result - round_ref_dtype(exact)|, exact = r + α(p − r).

    fp32 evaluation s of r + α(p − r) (α rounded to fp32, one rounding each for the subtraction, the
    product and the sum; an FMA only removes one) satisfies, with u = 2^-24 and γ3 = 3u/(1 − 3u),
        |s − exact| ≤ B = γ3·|α(p − r)| + u·(|r| + (1 + γ3)·|α(p − r)|).
    B is written with |r| and |α(p − r)|, not |exact|: when the result cancels to near zero the
    error is still relative to the operands (a bound in |result| breaks there). Then the kernel
    rounds s into the ref dtype and the reference rounds `exact`; the two roundings can land on
    neighbouring values (a midpoint between them), so
        |round(s) − round(exact)| ≤ B + u_ref·(2·|exact| + B) + η_ref
    (u_ref the unit roundoff of the ref dtype, η_ref its subnormal spacing).
    """
    u = UNIT_ROUNDOFF[torch.float32]
    g3 = 3 * u / (1 - 3 * u)
    r, p = ref.double(), policy.double()
    step = (alpha * (p - r)).abs()
    exact = (r + alpha * (p - r)).abs()
    b = g3 * step + u * (r.abs() + (1 + g3) * step)
    return b + UNIT_ROUNDOFF[ref.dtype] * (2 * exact + b) + SUBNORMAL_SPACING[ref.dtype]


# ---- per-token log-probs from logits: backends under test and the gradient bound ----

def cpp_loadable() -> bool:
    """True when the C++ extension builds/loads here (building it once, cached)."""
    try:
        from fasttrdpo import _cpp

        _cpp.load()
    except Exception:
        return False
    return True


# Set by tests/conftest.py before collection: True when the session's `-m` expression is exactly "gpu"
# (scripts/gpu_check.sh). Such a session runs only gpu-marked tests, and none of them takes its backend from
# backends(), so collection need not build (~40 s cold) or load the C++ extension: it looks the build up.
GPU_ONLY_SESSION = False


def cpp_built() -> bool:
    """True when the extension's cache already holds the library for these sources (a file lookup)."""
    try:
        from fasttrdpo import _cpp

        return _cpp.is_built()
    except Exception:
        return False


def backends() -> list[str]:
    """Backends the logits-level op tests run on: eager, triton (the interpreter on CPU tensors, compiled
    on CUDA), and cpp when the C++ extension builds here (building it once, cached, and loading it: from
    then on "auto" picks it for CPU tensors, as the tests expect). In a gpu-only session (see
    GPU_ONLY_SESSION) the same list is decided from the cache without building or loading anything;
    it differs only where the extension was never built, and then only for deselected tests."""
    names = ["eager", "triton"]
    if GPU_ONLY_SESSION:
        names += ["cpp"] if cpp_built() else []
    else:
        names += ["cpp"] if cpp_loadable() else []
    return names


def backend_device(backend: str) -> torch.device:
    """Where a backend's tests put their tensors: triton runs CUDA tensors when there is a GPU (the
    interpreter is only switched on without one), everything else runs on CPU."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def logprob_grad_tolerance(z64: torch.Tensor, labels: torch.Tensor, grad_logp: torch.Tensor,
                           out_dtype: torch.dtype, ignore_index: int = -100) -> torch.Tensor:
    """Elementwise bound on |stored d logp/dz − float64 g·(onehot − p)| for logits z64 [..., V].

    The kernels compute p' = exp(z − lse') with lse' off by at most T (`logprob_tolerance`, which
    bounds the lse error as it bounds the log-prob's); the fp32 subtraction z − lse' adds
    u·(|z| + |lse|) ≤ u·(max|z| + |lse|), so the exponent is off by e ≤ T + u·(max|z| + |lse|) and,
    with exp's own error ≤ 8u (ex2.approx on GPUs, libm / Sleef / the C++ kernels' ≤ 2u exp on CPU, plus the
    ·log2(e) rounding),
        |p' − p| ≤ p·(expm1(e) + 8u·(1 + expm1(e))).
    onehot − p' and g·(…) are one fp32 rounding each (≤ u·1 and ≤ u·|g|), so the fp32 result is off by
        E = |g|·(|p' − p| bound + 2u).
    Storing into out_dtype rounds to nearest even: ≤ u_out·(|ref| + E) + η_out (η the subnormal spacing).
    Ignored rows are exactly 0 (bound 0).
    """
    u = U32
    zmax = z64.abs().amax(dim=-1, keepdim=True)
    lse = torch.logsumexp(z64, dim=-1, keepdim=True)
    T = logprob_tolerance(z64).unsqueeze(-1)
    e = T + u * (zmax + lse.abs())
    p = torch.exp(z64 - lse)
    dp = p * (torch.expm1(e) + 8 * u * (1 + torch.expm1(e)))
    g = grad_logp.double().abs().unsqueeze(-1)
    fp32_err = g * (dp + 2 * u)
    onehot = torch.zeros_like(z64)
    active = labels != ignore_index
    onehot.scatter_(-1, torch.where(active, labels, 0).unsqueeze(-1), 1.0)
    ref = (grad_logp.double().unsqueeze(-1) * (onehot - p)).abs()
    tol = fp32_err + UNIT_ROUNDOFF[out_dtype] * (ref + fp32_err) + SUBNORMAL_SPACING[out_dtype]
    return torch.where(active.unsqueeze(-1), tol, torch.zeros_like(tol))
