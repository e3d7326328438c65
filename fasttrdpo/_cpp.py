"""Loader for the C++ CPU kernels in csrc/ (torch ops `torch.ops.fasttrdpo.*`).

Nothing is built at import. `load()` (also reached through `fasttrdpo.build_cpp()`, `backend="cpp"`
or `FASTTRDPO_BACKEND=cpp`) compiles the sources with `torch.utils.cpp_extension.load` into a cache
directory — `$FASTTRDPO_CACHE`, else `~/.cache/fasttrdpo` — and loads them into the process. The cold
build takes about 40 s and is announced on stderr; later loads (this process or a new one) reuse the
cached library in well under a second. A machine without a compiler keeps working on the eager
backend: only an explicit request for "cpp" raises.

Vectorization follows torch's own runtime CPU detection (`torch.backends.cpu.get_cpu_capability()`,
which honours `ATEN_CPU_CAPABILITY`): AVX512 or AVX2 code through ATen's `Vectorized<float>`, or the
portable DEFAULT build, never `-march=native`. The cache key covers the sources, the flags, the
capability and the torch version, so a changed source or another machine sharing the cache rebuilds.

Python wrappers below take 2-D logits (the ops in `fasttrdpo/ops` flatten leading dims) and are the
interface the ops call; they do no validation beyond what the C++ side checks cheaply.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import torch

_ext = None  # torch.ops.fasttrdpo once the library is loaded in this process
_lock = threading.Lock()

SOURCES = ("logprobs.cpp", "blend.cpp")
HEADERS = ("vec_io.h",)

# Flags per torch CPU capability: the same ISA sets ATen compiles its own AVX2/AVX512 kernels with.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
# -ffp-contract=off: the blend formula ref + α·(policy − ref) must not become a fused multiply-add.
_COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]


def is_loaded() -> bool:
    """True once the extension is built and loaded in this process (auto then picks "cpp" on CPU)."""
    return _ext is not None


def source_dir() -> Path:
    """The csrc/ sources: the `fasttrdpo.csrc` package (package_dir maps csrc/ to it)."""
    import importlib.resources

    return Path(str(importlib.resources.files("fasttrdpo.csrc")))


def cache_root() -> Path:
    env = os.environ.get("FASTTRDPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fasttrdpo"


def capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _ISA_FLAGS else "DEFAULT"


def build_flags() -> list[str]:
    return _COMMON_FLAGS + _ISA_FLAGS[capability()]


def _build_key(src: Path, flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (src / name).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """Where this source/flag/torch combination is (or will be) built."""
    flags = build_flags()
    return cache_root() / f"cpp-{capability().lower()}-{_build_key(source_dir(), flags)}"


def _library_name() -> str:
    return f"fasttrdpo_cpu_{capability().lower()}"


def is_built() -> bool:
    """True when the cache already holds the built library (loading it is then fast)."""
    return (build_dir() / f"{_library_name()}.so").is_file()


STALE_LOCK_S = 600  # without flock (not Linux/macOS): a cold build takes under a minute; older = left by a kill


@contextlib.contextmanager
def _build_guard(bdir: Path):
    """Hold an flock on `<build dir>/fasttrdpo.guard` while torch builds or loads there: fasttrdpo processes
    take turns, and the kernel drops the flock when its holder dies, however it dies. Yields True when the
    guard is held (so no other fasttrdpo process is inside cpp_extension.load for this directory), False
    where flock is not available."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield False
        return
    fd = os.open(bdir / "fasttrdpo.guard", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process builds
        yield True
    finally:
        os.close(fd)  # releases the flock


def _clear_stale_lock(bdir: Path, guarded: bool) -> None:
    """torch's build lock (`<build dir>/lock`) is removed only by the process that took it: a build
    killed mid-way leaves it behind and every later load would wait on it forever. Under the build guard
    any such lock is stale (its builder is gone: the guard would still be held otherwise), so it goes at
    once; without the guard only once it is STALE_LOCK_S old."""
    lock = bdir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if guarded or age > STALE_LOCK_S:
        print(f"fasttrdpo: removing a stale build lock ({age:.0f} s old, left by an interrupted build): {lock}",
              file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)


def _error_summary(exc: BaseException, max_lines: int = 20) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return "\n".join((errors or lines)[-max_lines:])


def load():
    """Build if needed (announced on stderr), load, and return `torch.ops.fasttrdpo`.

    Raises RuntimeError with a summary of the compiler errors when the extension cannot be built.
    """
    global _ext
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        from torch.utils import cpp_extension

        src = source_dir()
        flags = build_flags()
        bdir = build_dir()
        cold = not is_built()
        if cold:
            print(f"fasttrdpo: building the C++ CPU kernels ({capability()}) into {bdir}; "
                  "this takes about 40 s once, later loads reuse the cache", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            bdir.mkdir(parents=True, exist_ok=True)
            with _build_guard(bdir) as guarded:
                _clear_stale_lock(bdir, guarded)
                cpp_extension.load(
                    name=_library_name(),
                    sources=[str(src / s) for s in SOURCES],
                    extra_cflags=flags,
                    extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(src)],
                    build_directory=str(bdir),
                    is_python_module=False,
                    verbose=False,
                )
        except Exception as exc:  # compiler missing, ninja missing, compile error
            raise RuntimeError(
                "backend='cpp': could not build the fasttrdpo C++ extension (the eager backend still works; "
                f"building needs a C++ compiler and ninja). Build directory: {bdir}\n{_error_summary(exc)}"
            ) from exc
        if cold:
            print(f"fasttrdpo: C++ CPU kernels built in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                  flush=True)
        _ext = torch.ops.fasttrdpo
        return _ext


def _ops():
    return _ext if _ext is not None else load()


def paired_logprobs_forward(policy_2d: torch.Tensor, ref_2d: torch.Tensor | None, labels_1d: torch.Tensor,
                            ignore_index: int):
    """(policy_logp fp32 [N], policy_lse fp32 [N], ref_logp fp32 [N] or None), one pass per row.

    0.0 where the label is ignored (the lse is 0 there too: no gradient flows through such a row);
    NaN where the label lies outside [0, V) (never read out of bounds).
    """
    return _ops().paired_logprobs_forward(policy_2d, ref_2d, labels_1d, int(ignore_index))


def logprobs_backward(grad_1d: torch.Tensor, logits_2d: torch.Tensor, lse_1d: torch.Tensor,
                      labels_1d: torch.Tensor, ignore_index: int, inplace: bool) -> torch.Tensor:
    """g·(onehot − softmax) in the logits dtype (rounded to nearest even); written into logits_2d
    when `inplace`. Ignored rows get 0, rows with an out-of-range label NaN."""
    ops = _ops()
    if inplace:
        out = ops.logprobs_backward_(grad_1d, logits_2d, lse_1d, labels_1d, int(ignore_index))
        # The kernel writes through a raw pointer; tell autograd the buffer changed (a second use of
        # logits saved for backward then raises instead of reading gradients).
        torch.autograd.graph.increment_version(logits_2d)
        return out
    return ops.logprobs_backward(grad_1d, logits_2d, lse_1d, labels_1d, int(ignore_index))


def logprobs_backward_into(grad_1d: torch.Tensor, logits_2d: torch.Tensor, lse_1d: torch.Tensor,
                           labels_1d: torch.Tensor, ignore_index: int, out_2d: torch.Tensor) -> torch.Tensor:
    """`logprobs_backward` written into `out_2d` (logits' shape and dtype, contiguous last dimension,
    any row stride): one block of rows of a larger gradient, no copy."""
    return _ops().logprobs_backward_out(grad_1d, logits_2d, lse_1d, labels_1d, int(ignore_index), out_2d)


def blend_(ref_list, policy_list, alpha: float) -> None:
    """In place, for each pair: ref ← ref + α·(policy − ref) in fp32, rounded to nearest even (where
    policy − ref overflows to ±inf: α·policy + (1 − α)·ref)."""
    ops = _ops()
    refs, pols = list(ref_list), list(policy_list)
    if not refs and not pols:
        return
    with torch.no_grad():
        ops.blend_(refs, pols, float(alpha))
    if float(alpha) != 0.0:  # α = 0 writes nothing; otherwise autograd must learn the refs changed
        torch.autograd.graph.increment_version(refs)


def finite_flags(tensors) -> torch.Tensor:
    """Bool [len(tensors)]: True where the tensor holds no NaN/inf (contiguous CPU float tensors).

    One multi-threaded vectorized read of each tensor: the check_finite pass of `blend_`."""
    ts = list(tensors)
    if not ts:
        return torch.ones(0, dtype=torch.bool)
    return _ops().finite_flags(ts)


def build_cpp() -> Path:
    """Build (once, cached; about 40 s cold, announced on stderr) and load the C++ CPU kernels.

    Afterwards `backend="auto"` runs CPU tensors on them. Returns the build directory. Raises
    RuntimeError with the compiler's error summary when the machine cannot build them.
    """
    load()
    return build_dir()
