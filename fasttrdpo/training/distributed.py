"""Data parallelism: the process group (torchrun sets WORLD_SIZE), the device of this rank, DDP wrapping
of the policy backbone, broadcasting the frozen models from rank 0, and cross-rank weight fingerprints."""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist


def requested_world_size() -> int:
    """The world size a trainer built now would run with (torchrun's WORLD_SIZE, or the live group's)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_pref: str) -> tuple[int, int, bool]:
    """(world_size, rank, owns_process_group): initialises the group itself under torchrun."""
    owns = False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_pref in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend=backend)
        owns = True
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return world_size, rank, owns


def pick_device(want: str) -> torch.device:
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(want)


def broadcast_frozen(*modules) -> None:
    """Make the reference (and initial model) bitwise identical on every rank (rank 0's copy)."""
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def wrap_ddp(module: torch.nn.Module, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def fingerprints(**modules) -> dict[str, str]:
    """sha256 of each module's parameter bytes (to compare ranks or runs). A sharded (DTensor) parameter is
    hashed whole: a collective then, every rank must call it."""
    out = {}
    for name, module in modules.items():
        h = hashlib.sha256()
        for pname, p in module.named_parameters():
            p = p.detach()
            p = p.full_tensor() if hasattr(p, "full_tensor") else p  # an FSDP2 shard: the whole parameter
            h.update(pname.encode())
            h.update(p.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def gather_and_compare(mine: dict, world_size: int) -> list[dict]:
    """Gather every rank's fingerprints; raise if the policy or the reference differ."""
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError(f"DDP ranks disagree on the policy or the reference weights: {gathered}")
    return gathered


def broadcast_object(obj, world_size: int):
    """Rank 0's `obj` on every rank (pickled); the object itself with one process."""
    if world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
