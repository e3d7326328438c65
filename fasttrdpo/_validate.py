"""Argument checks shared by the ops. Every error names the argument and what was expected."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_labels_tensor(labels, expected_shape, name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {tuple(expected_shape)}, got {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError(f"{name} is empty: nothing to compute")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev0 = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev0:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {dev0}: all inputs must share a device")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """Labels must lie in [0, vocab) or equal ignore_index. Costs one host sync on CUDA."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"got {int(labels[tuple(idx)])} at index {tuple(idx)}"
        )


def provably_non_overlapping(t: torch.Tensor) -> bool:
    """True only when no two elements of `t` share memory, so that writing `t` in place is safe.

    torch's internal-overlap check answers "no" (non-overlapping and dense), "yes" (a stride 0 over a
    dimension of size > 1) or "too hard" (any other strided view). "Too hard" is settled here by a
    sufficient condition: with the dimensions of size > 1 sorted by stride, each stride exceeds the
    farthest offset the smaller ones reach (true for slices and permutations of dense tensors, e.g.
    logits[:, :-1] or a transpose). Whatever this cannot prove counts as overlapping.
    """
    verdict = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: too hard
    if verdict == 0:
        return True
    if verdict == 1:
        return False
    reach = 0
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def check_logit_transform(logit_scale, softcap=None) -> None:
    """logit_scale: a finite real number > 0; softcap: None or a finite real number > 0."""
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale must be a finite number > 0, got {type(logit_scale).__name__}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be None or a finite number > 0, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
