"""Loader for the C++ CPU kernels in csrc/ (issue 7 fills this in).

Until the extension exists, `is_loaded()` is False (auto never picks "cpp") and `load()` raises.
"""
from __future__ import annotations

_ext = None


def is_loaded() -> bool:
    return _ext is not None


def load():
    raise RuntimeError("backend='cpp': the C++ extension (csrc/) is not available yet")
