"""Measurement utilities shared by `throughput.py` and the pytest-benchmark suite.

Peak memory is measured as growth over a case's inputs, in isolation:
- CPU: each (case, implementation) runs in its own child process (forked from a zygote that has only
  imported libraries, so no earlier case's allocations are in it). The child allocates its inputs, reads
  its resident set (RSS) and resets the kernel's peak-RSS counter to it (`/proc/self/clear_refs` "5";
  where that is not allowed, the peak since process start is used and the JSON says so). Peak growth is
  then VmHWM − RSS-with-inputs.
- CUDA: `torch.cuda.reset_peak_memory_stats` after the inputs, growth = max_memory_allocated − allocated.

Two peaks are kept: the first call's (warm-up: compilation, lazy caches, optimizer state) and the
steady state's (the counter is reset after warm-up to the then-current RSS, so whatever the warm-up
left behind still counts, and a one-off compiler peak does not). Tables and ratios use the steady state.
"""
from __future__ import annotations

import gc
import os
import re
import statistics
import time

_KB = 1024


# ----------------------------------------------------------------------------------------- CPU memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: fall back to the peak, the best we have
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * _KB


def peak_rss_bytes() -> int:
    """Peak resident set size since process start or since the last successful `reset_peak_rss`."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * _KB


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class MemoryMeter:
    """Peak growth over a baseline taken at `start()`: RSS on CPU, the caching allocator on CUDA."""

    def __init__(self, device):
        self.device = device
        self.cuda = getattr(device, "type", str(device)).startswith("cuda")
        self.base = 0
        self.reset_ok = True

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        gc.collect()
        self._sync()
        if self.cuda:
            import torch

            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = rss_bytes()
            self.reset_ok = reset_peak_rss() and self.reset_ok

    def reset_peak(self) -> None:
        """Restart peak tracking from the current usage, keeping the baseline."""
        self._sync()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.reset_ok = reset_peak_rss() and self.reset_ok

    def peak_growth(self) -> int:
        self._sync()
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        return int(peak_rss_bytes() - self.base)

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated - memory_allocated after inputs"
        if self.reset_ok:
            return "VmHWM (reset via /proc/self/clear_refs after inputs) - VmRSS after inputs"
        return "VmHWM since process start - VmRSS after inputs (peak reset not permitted)"


# ----------------------------------------------------------------------------------------- timing
def timed_runs(step, *, warmup: int, repeats: int, device, meter: MemoryMeter | None = None,
               before_each=None, progress=None):
    """Run `step()` warmup + repeats times; returns (seconds of the timed runs, first-call peak growth,
    steady-state peak growth, the last step's return value). `before_each()` runs untimed before every
    call (resetting gradients, restoring inputs an in-place implementation overwrote)."""
    cuda = getattr(device, "type", str(device)).startswith("cuda")
    if cuda:
        import torch

        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    else:
        sync = lambda: None  # noqa: E731
    out = None
    if meter is not None:
        meter.start()
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        out = None
        out = step()
        sync()
        if progress is not None:
            progress()
    first_peak = meter.peak_growth() if meter is not None else None
    times = []
    if meter is not None:
        gc.collect()
        meter.reset_peak()
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        out = None  # the previous step's outputs are freed before the next one starts
        sync()
        t0 = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t0)
        if progress is not None:
            progress()
    steady_peak = meter.peak_growth() if meter is not None else None
    return times, first_peak, steady_peak, out


def median(xs):
    return statistics.median(xs) if xs else None


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:  # pragma: no cover
        return None


def copy_bandwidth(bytes_moved: int, device, repeats: int = 5) -> float:
    """Median seconds of `dst.copy_(src)` moving `bytes_moved` bytes (half read, half written): the
    bandwidth a blend over the same bytes can reach on this device, measured in the same run."""
    import torch

    n = max(1, bytes_moved // 2)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cuda = device.type == "cuda"
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if cuda:
            torch.cuda.synchronize(device)
        if i:  # the first copy faults the pages in
            times.append(time.perf_counter() - t0)
    return median(times)
