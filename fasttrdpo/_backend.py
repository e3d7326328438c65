"""Backend selection shared by every op: explicit argument > FASTTRDPO_BACKEND > auto.

auto = "triton" for CUDA tensors when triton imports; on CPU "cpp" once the C++ extension has been
built in this process (`fasttrdpo.build_cpp()`), "eager" otherwise. A backend that cannot run raises:
nothing falls back silently. The backend each op last ran is kept for inspection
(`fasttrdpo.last_backend(op)`), and logged at DEBUG level.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "eager", "cpp")
ENV_VAR = "FASTTRDPO_BACKEND"

_log = logging.getLogger("fasttrdpo")
_last_used: dict[str, str] = {}
_env_warned: set[tuple[str, str]] = set()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cpp_ready() -> bool:
    from . import _cpp

    return _cpp.is_loaded()


def resolve_backend(op: str, backend: str | None, device: torch.device,
                    provides: tuple[str, ...] = ("triton", "eager", "cpp")) -> str:
    """Return the concrete backend ("triton" | "eager" | "cpp") that `op` runs on `device`.

    `provides` lists the backends `op` implements. An explicit `backend=` the op does not provide
    raises. FASTTRDPO_BACKEND is a process-wide preference: for an op that does not provide it (the
    lm_head level has no C++ path) the op resolves as auto among what it provides, and says so once
    in a warning. auto only picks among `provides`.
    """
    requested = backend if backend is not None else "auto"
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if requested != "auto" and requested not in provides:
        raise NotImplementedError(f"{op}: backend={requested!r} is not provided for this op "
                                  f"(it provides {', '.join(provides)})")
    if requested == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        if env != "auto" and env not in provides:
            if (op, env) not in _env_warned:
                _env_warned.add((op, env))
                warnings.warn(f"{ENV_VAR}={env}: {op} has no {env} backend (it provides "
                              f"{', '.join(provides)}); it runs on its auto choice", stacklevel=3)
            env = "auto"
        requested = env
    if requested == "auto":
        if device.type == "cuda" and triton_available() and "triton" in provides:
            chosen = "triton"
        elif device.type == "cpu" and "cpp" in provides and _cpp_ready():
            chosen = "cpp"
        else:
            chosen = "eager"
    elif requested == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' requested but triton does not import")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (got {device.type}); on CPU set "
                "TRITON_INTERPRET=1 before importing fasttrdpo to run the kernels in the interpreter"
            )
        chosen = "triton"
    elif requested == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"{op}: backend='cpp' runs on CPU tensors only (got {device.type})")
        from . import _cpp

        _cpp.load()  # builds on first use (reported), raises if it cannot be built
        chosen = "cpp"
    else:
        chosen = "eager"
    if _last_used.get(op) != chosen:
        _log.debug("fasttrdpo.%s runs on backend %s (%s tensors)", op, chosen, device.type)
    _last_used[op] = chosen
    return chosen


def note(key: str, value: str) -> None:
    """Record how an op ran beyond its backend (read back with `last_backend(key)`), e.g.
    "token_logprobs_inplace_backward" -> "in place" / "out of place: <why>"."""
    if _last_used.get(key) != value:
        _log.debug("fasttrdpo.%s: %s", key, value)
    _last_used[key] = value


def last_backend(op: str | None = None):
    """The backend an op last ran on (or a dict of all ops when `op` is None)."""
    return dict(_last_used) if op is None else _last_used.get(op)


def dot_precision() -> str:
    """Precision for fp32 `tl.dot`: IEEE unless the caller enabled TF32 in torch."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
