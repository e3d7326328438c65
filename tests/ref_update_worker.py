"""Subprocess worker for the ref-update tests (save/kill/resume and 2-process DDP/FSDP2 on CPU).

    python ref_update_worker.py train  OUT.pt STEPS                 run STEPS optimizer steps, save the end state
    python ref_update_worker.py save   CKPT.pt STEPS                run STEPS steps, checkpoint, print SAVED, then
                                                                    keep running until killed
    python ref_update_worker.py resume CKPT.pt STEPS OUT.pt         resume from CKPT, run up to STEPS, save
    python ref_update_worker.py ddp    OUT_PREFIX STEPS             2 ranks (gloo), DDP, one file per rank
    python ref_update_worker.py fsdp2  OUT_PREFIX STEPS             2 ranks (gloo), fully_shard, one file per rank
    python ref_update_worker.py single OUT.pt STEPS                 1 process, gradients averaged over the 2 ranks'
                                                                    batches by hand (what DDP/FSDP2 compute)

Deterministic: one thread, data drawn from a per-(step, rank) seed. Policy fp32, reference bf16 in the
save/resume run (the fp32 -> bf16 blend path); fp32/fp32 in the distributed runs.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fasttrdpo  # noqa: E402

ALPHA, TAU, WORLD = 0.6, 2, 2


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def loss_fn(model, step, rank):
    x, y = batch(step, rank)
    return ((model(x) - y) ** 2).mean()


def setup(ref_dtype=torch.bfloat16):
    policy = make_model(0)
    ref = make_model(0).to(ref_dtype)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    updater = fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=ALPHA, tau=TAU)
    return policy, ref, opt, updater


def train_steps(policy, opt, updater, first, last, rank=0):
    for step in range(first, last + 1):
        opt.zero_grad(set_to_none=True)
        loss_fn(policy, step, rank).backward()
        opt.step()
        updater.step(global_step=step)


def end_state(ref, updater):
    return {"ref": {k: v.clone() for k, v in ref.state_dict().items()},
            "updater": updater.state_dict(ref_weights=False)}


def checkpoint(policy, opt, updater, step):
    return {"step": step, "policy": policy.state_dict(), "optimizer": opt.state_dict(),
            "ref_update": updater.state_dict()}


def _init_dist(rank):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    return dist


def run_ddp(rank, prefix, steps):
    dist = _init_dist(rank)
    policy, ref, _, _ = setup(torch.float32)
    ddp = nn.parallel.DistributedDataParallel(policy)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    # The DDP wrapper's names carry "module.": the updater unwraps it and still pairs with the plain ref.
    updater = fasttrdpo.RefModelUpdater(policy=ddp, ref=ref, alpha=ALPHA, tau=TAU)
    fired = []
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss_fn(ddp, step, rank).backward()  # each rank its own batch; DDP averages the gradients
        opt.step()
        fired.append(updater.step(global_step=step))
    torch.save({"ref": ref.state_dict(), "fired": fired}, f"{prefix}.rank{rank}.pt")
    dist.destroy_process_group()


def run_fsdp2(rank, prefix, steps):
    dist = _init_dist(rank)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    policy, ref, _, _ = setup(torch.float32)
    for model in (policy, ref):
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    updater = fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=ALPHA, tau=TAU)
    # No all-gather during an update: count the gathers the process group is asked for.
    gathers = {"n": 0}
    originals = {}
    for name in ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object"):
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)

            def counting(*a, _orig=originals[name], **k):
                gathers["n"] += 1
                return _orig(*a, **k)
            setattr(dist, name, counting)
    fired, gathers_in_updates = [], 0
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss_fn(policy, step, rank).backward()  # FSDP2 reduce-scatters the averaged gradient
        opt.step()
        before = gathers["n"]
        fired.append(updater.step(global_step=step))
        gathers_in_updates += gathers["n"] - before
    for name, fn in originals.items():
        setattr(dist, name, fn)
    assert all(isinstance(p, DTensor) for p in ref.parameters())
    local = {n: p.to_local().clone() for n, p in ref.named_parameters()}
    # A NaN in one rank's policy shard: every rank must raise (agreed by one all-reduce), none may write.
    with torch.no_grad():
        if rank == 1:
            next(iter(policy.parameters())).to_local().view(-1)[0] = float("nan")
    try:
        updater.update()
        nan_raised = False
    except ValueError:
        nan_raised = True
    nan_left_ref_unchanged = all(torch.equal(p.to_local(), local[n]) for n, p in ref.named_parameters())
    full = {n: p.full_tensor().clone() for n, p in ref.named_parameters()}  # for the test only
    torch.save({"ref_local": local, "ref": full, "fired": fired, "gathers_in_updates": gathers_in_updates,
                "nan_raised": nan_raised, "nan_left_ref_unchanged": nan_left_ref_unchanged},
               f"{prefix}.rank{rank}.pt")
    dist.destroy_process_group()


def run_single(out, steps):
    """What 2 ranks compute, in one process: the gradient is the mean of the two ranks' gradients."""
    policy, ref, opt, updater = setup(torch.float32)
    fired = []
    for step in range(1, steps + 1):
        grads = []
        for rank in range(WORLD):
            policy.zero_grad(set_to_none=True)
            loss_fn(policy, step, rank).backward()
            grads.append([p.grad.clone() for p in policy.parameters()])
        for p, g0, g1 in zip(policy.parameters(), *grads):
            p.grad = (g0 + g1) / WORLD
        opt.step()
        fired.append(updater.step(global_step=step))
    torch.save({"ref": ref.state_dict(), "fired": fired}, out)


def main(argv):
    torch.set_num_threads(1)
    mode, path, steps = argv[0], argv[1], int(argv[2])
    if mode == "train":
        policy, ref, opt, updater = setup()
        train_steps(policy, opt, updater, 1, steps)
        torch.save(end_state(ref, updater), path)
    elif mode == "save":
        policy, ref, opt, updater = setup()
        train_steps(policy, opt, updater, 1, steps)
        torch.save(checkpoint(policy, opt, updater, steps), path + ".tmp")
        os.replace(path + ".tmp", path)
        print("SAVED", flush=True)
        step = steps
        while True:  # keep training (and mutating the models) until the parent kills us
            step += 1
            train_steps(policy, opt, updater, step, step)
            time.sleep(0.05)
    elif mode == "resume":
        out = argv[3]
        policy, ref, opt, updater = setup()  # fresh process: ref is the *initial* model again
        ckpt = torch.load(path, weights_only=True)
        policy.load_state_dict(ckpt["policy"])
        opt.load_state_dict(ckpt["optimizer"])
        updater.load_state_dict(ckpt["ref_update"])  # restores the blended ref weights and counters
        train_steps(policy, opt, updater, ckpt["step"] + 1, steps)
        torch.save(end_state(ref, updater), out)
    elif mode in ("ddp", "fsdp2"):
        import torch.multiprocessing as mp

        os.environ["MASTER_PORT"] = argv[3]
        mp.spawn(run_ddp if mode == "ddp" else run_fsdp2, args=(path, steps), nprocs=WORLD, join=True)
    elif mode == "single":
        run_single(path, steps)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
