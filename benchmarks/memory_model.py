"""Memory per GPU of TR-DPO training state, computed (not measured): policy + AdamW + reference under DDP,
FSDP2 (`fasttrdpo train --fsdp`) and DeepSpeed ZeRO-3, for Llama-3-shaped 1B / 8B / 70B models.

    python benchmarks/memory_model.py            # the README's table (GiB per GPU, 8 GPUs)
    python benchmarks/memory_model.py --gpus 16

What is counted, per parameter (P parameters, mixed precision: bf16 compute, fp32 master weights):
  policy: fp32 weights 4 B + fp32 gradients 4 B + AdamW exp_avg and exp_avg_sq 8 B = 16 B
          (DeepSpeed's bf16 ZeRO-3 splits it as 2 B bf16 weights + 2 B bf16 gradients + 12 B fp32
          master and Adam: also 16 B)
  reference: bf16 (`--ref-dtype bfloat16`), 2 B.
  DDP: all of it on every GPU. FSDP2 / ZeRO-3: all of it divided by the number of GPUs.
  FSDP2 also holds, while a step runs, units gathered in bf16: the policy's and the reference's root
  units (embeddings + lm_head, both needed by the fused loss) and one decoder layer at a time (two
  with prefetching); `transient` counts the roots and two layers. ZeRO-3's gathered parameters are of the
  same order (its prefetch bucket size sets them). Not counted: activations (set by batch and sequence
  length), DDP's gradient buckets, allocator fragmentation, the optional initial model of the eval KL
  (another 2 B/parameter, sharded like the reference under FSDP2).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

GiB = 1024 ** 3
POLICY_BYTES = 4 + 4 + 8  # fp32 weights + fp32 gradients + AdamW's two moments
REF_BYTES = 2  # bf16 reference
GATHER_BYTES = 2  # units are all-gathered in the bf16 compute dtype


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: grouped-query attention, SwiGLU MLP, RMSNorm (weights only)."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv  # q, o; k, v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return attention + mlp + 2 * self.hidden  # two RMSNorm weights

    def root_params(self) -> int:
        """embeddings + final norm + lm_head (one matrix when tied): FSDP's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()


# the published shapes of Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B
SHAPES = (
    Shape("1B", hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True),
    Shape("8B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tied=False),
    Shape("70B", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256, tied=False),
)


def state_bytes(shape: Shape, mode: str, gpus: int) -> int:
    """Bytes per GPU of policy + AdamW + reference (no activations, no transient gathers)."""
    total = shape.params() * (POLICY_BYTES + REF_BYTES)
    if mode == "ddp":
        return total
    if mode in ("fsdp2", "zero3"):
        return -(-total // gpus)  # dim-0 shards, rounded up
    raise ValueError(f"mode must be 'ddp', 'fsdp2' or 'zero3', got {mode!r}")


def fsdp_transient_bytes(shape: Shape) -> int:
    """Gathered bf16 units during a step under FSDP2: policy and reference roots + two decoder layers."""
    return GATHER_BYTES * (2 * shape.root_params() + 2 * shape.layer_params())


def table(gpus: int = 8) -> list[dict]:
    rows = []
    for s in SHAPES:
        rows.append({"model": s.name, "params": s.params(), "gpus": gpus,
                     "ddp_gib": state_bytes(s, "ddp", gpus) / GiB,
                     "fsdp2_gib": state_bytes(s, "fsdp2", gpus) / GiB,
                     "fsdp2_transient_gib": fsdp_transient_bytes(s) / GiB,
                     "zero3_gib": state_bytes(s, "zero3", gpus) / GiB})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    args = p.parse_args()
    print(f"| model | parameters | DDP | FSDP2 (+ gathered while stepping) | ZeRO-3 |  (GiB per GPU, {args.gpus} GPUs)")
    print("|---|---|---|---|---|")
    for r in table(args.gpus):
        print(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['ddp_gib']:.1f} | {r['fsdp2_gib']:.1f} "
              f"(+ {r['fsdp2_transient_gib']:.1f}) | {r['zero3_gib']:.1f} |")


if __name__ == "__main__":
    main()
