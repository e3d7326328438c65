"""End-to-end training steps: fasttrdpo's trainer vs TRL's DPOTrainer with a moving reference.

Two cases share this module.

e2e: both trainers train the same randomly initialised GPTNeoX (Pythia-14m's shape in a full run) from the
same policy and reference weights (the reference starts different from the policy, so the DPO loss is not
trivially log 2), on the same preference pairs from Anthropic-HH (harmless-base test split), cut to fixed
character lengths so that every sequence has the same number of tokens (the byte-level tokenizer makes
ASCII characters tokens one to one). The dataset holds exactly one batch of pairs, so every step of both
trainers sees the same batch and the first step's loss is the same function in both.

e2e_hh (issue 15): real Anthropic-HH pairs at their own lengths (benchmarks/_hh.py: the file's usable pairs in
a seeded random order, tokenized by a 4k BPE trained on the file), max length 512, a Pythia-70M-shaped model;
every trainer truncates as TRL does (each sequence keeps its start; pairs whose prompt alone fills max_length,
which TRL drops, are left out) and walks the same pairs in the same order (TRL: train_sampling_strategy="sequential"; fasttrdpo:
the step's indices are consecutive), one new batch per step. Implementations: TRL's DPOTrainer, today's padded
TRDPOTrainer (`fasttrdpo`), and the padding-free variants `fasttrdpo-packed` (TRDPOConfig.packing=True) and
`fasttrdpo-shared` (share_prompt=True: prompt || chosen || rejected, the prompt computed once); a variant
whose config field does not exist yet is reported as skipped with that reason.

Measured inside each trainer's own training loop: seconds between consecutive optimizer-step ends
(data collation, forward, backward, optimizer, reference sync all included), after `warmup` steps; tokens
per step = non-pad tokens of the chosen and rejected sequences, the prompt counted in each (counted from
TRL's collated batches, and from the pairs fasttrdpo's trainer used at each step: the same count whatever
layout computes them); tokens/s = tokens of the timed steps / their seconds. Backbone tokens (what each
layout actually runs through the model, benchmarks/_hh.py) are reported beside them, and the load average
before and after each measurement (the machine may be shared). Peak memory growth is over the state with
models and data loaded (the optimizer state counts).
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
import time

import torch

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
ALPHA = 0.6
BETA = 0.1
LR = 1e-5


def _split(text: str):
    i = text.rfind("\n\nAssistant:")
    if i < 0:
        return None, None
    j = i + len("\n\nAssistant:")
    return text[:j], text[j:]


def preference_pairs(n: int, prompt_chars: int, completion_chars: int, path: str = DATA):
    """`n` pairs (prompt, chosen, rejected), ASCII only, prompts cut to their last `prompt_chars`
    characters and completions to their first `completion_chars` characters."""
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            ex = json.loads(line)
            p, c = _split(ex["chosen"])
            p2, r = _split(ex["rejected"])
            if p is None or p != p2 or not (p + c + r).isascii():
                continue
            if len(p) < prompt_chars or len(c) < completion_chars or len(r) < completion_chars:
                continue
            # a completion cut right after a space would lose that space in TRL's tokenization (the
            # ByT5 tokenizer strips whitespace before the "</s>" TRL appends as text): both trainers
            # must see the same tokens, so such cuts are skipped
            if c[completion_chars - 1].isspace() or r[completion_chars - 1].isspace():
                continue
            out.append({"prompt": p[-prompt_chars:], "chosen": c[:completion_chars], "rejected": r[:completion_chars]})
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} usable pairs in {path}")


def _pairs(shape, tok=None):
    from _cases import Skip

    if shape.get("data") == "hh":
        import _hh

        from fasttrdpo.data import tokenize_pair

        if not os.path.exists(_hh.DATA):
            raise Skip(f"HH data not found at {_hh.DATA}")
        pairs, _ = _hh.hh_pairs()
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(shape.get("data_seed", 0)))
        n = shape["pairs"] * shape["steps"]
        out = []
        for i in order.tolist():
            # TRL (truncation_mode="keep_start", its only mode) drops a pair whose prompt alone fills max_length;
            # such pairs are left out here so that every trainer walks the same pairs in the same order
            x = pairs[i]
            if len(tokenize_pair(tok, x["prompt"], x["chosen"], x["rejected"], max_length=10 ** 9).prompt) \
                    < shape["max_length"]:
                out.append(x)
            if len(out) == n:
                break
        return out
    if not os.path.exists(DATA):
        raise Skip(f"preference data not found at {DATA}")
    return preference_pairs(shape["pairs"], shape["prompt_chars"], shape["completion_chars"])


def _tokenizer(shape):
    if shape.get("tokenizer", "byt5") == "byt5":
        from fasttrdpo.tiny import tiny_tokenizer

        return tiny_tokenizer()
    import _hh

    return _hh.hh_bpe_tokenizer(shape["bpe_vocab"])


def _models(shape, seed=0):
    from fasttrdpo.tiny import tiny_model

    kw = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
              num_attention_heads=shape.get("heads", 4), intermediate_size=4 * shape["hidden"],
              max_position_embeddings=2048)
    if shape.get("attn"):
        kw["attn_implementation"] = shape["attn"]
    policy = tiny_model(seed=seed, **kw)
    ref = tiny_model(seed=seed + 1, **kw)
    return policy, ref


class _StepClock:
    """Timestamps of optimizer-step ends, and the memory meter's peaks around them."""

    def __init__(self, warmup, meter):
        self.warmup = warmup
        self.meter = meter
        self.ends = []
        self.first_peak = None

    def step_end(self):
        if self.meter.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup:
            self.first_peak = self.meter.peak_growth()
            self.meter.reset_peak()

    def times(self):
        return [b - a for a, b in zip(self.ends[self.warmup - 1:], self.ends[self.warmup:])]


def _watch_backbone(model, seen):
    """Append (batch, width) of input_ids (or inputs_embeds) of every forward call of `model`'s backbone to
    `seen`: what the backbone really computes, padding and bin padding included."""
    backbone = model.base_model

    def hook(module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        seen.append(tuple(int(d) for d in x.shape[:2]) if x is not None else None)

    return backbone.register_forward_pre_hook(hook, with_kwargs=True)


def _count_tokens(collator, counts):
    def wrapped(features):
        batch = collator(features)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    return wrapped


def run_trl(shape, warmup, repeats, device, meter, seed=0):
    try:
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer
    except Exception as e:
        from _cases import Skip

        raise Skip(f"trl not importable: {type(e).__name__}: {e}")
    from datasets import Dataset

    tok = _tokenizer(shape)
    pairs = _pairs(shape, tok)
    policy, ref = _models(shape, seed)
    steps = warmup + repeats
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    hh = shape.get("data") == "hh"
    extra = dict(train_sampling_strategy="sequential") if hh else {}
    cfg = DPOConfig(output_dir=out_dir, per_device_train_batch_size=shape["pairs"], max_steps=steps,
                    learning_rate=LR, beta=BETA, sync_ref_model=True, ref_model_sync_steps=shape["sync_steps"],
                    ref_model_mixup_alpha=ALPHA, logging_steps=10 ** 6, save_strategy="no", report_to=[],
                    use_cpu=device.type == "cpu", seed=seed, dataloader_num_workers=0,
                    max_length=shape.get("max_length"), disable_dropout=True, lr_scheduler_type="constant",
                    warmup_steps=0,
                    # TRL 1.16 defaults to bf16 autocast and gradient checkpointing; fasttrdpo's trainer to
                    # neither: both off here, so that the two trainers do the same fp32 computation (first-step
                    # losses 4.4e-6 to 1.2e-5 apart; with TRL's defaults 1.8e-4 to 2.4e-3)
                    bf16=False, gradient_checkpointing=False, **extra)
    clock = _StepClock(warmup, meter)
    losses = []

    last_peak = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.step_end()
            if state.global_step == steps:
                last_peak.append(meter.peak_growth())

        def on_log(self, args, state, control, logs=None, **kw):
            pass

    trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(pairs),
                         processing_class=tok, callbacks=[Clock()])
    seen = []
    _watch_backbone(trainer.model, seen)
    counts = []
    trainer.data_collator = _count_tokens(trainer.data_collator, counts)
    # the first step's loss (same function in both trainers: same weights, same single batch)
    orig = trainer.compute_loss

    def compute_loss(*a, **k):
        res = orig(*a, **k)
        loss = res[0] if isinstance(res, tuple) else res
        losses.append(float(loss.detach()))
        return res

    trainer.compute_loss = compute_loss
    meter.start()
    trainer.train()
    return dict(times=clock.times(), first_peak=clock.first_peak, steady_peak=last_peak[0], token_counts=counts,
                first_loss=losses[0] if losses else None, losses=losses, tokenizer=type(tok).__name__,
                backbone_seen=seen)


# the TRDPOConfig fields each fasttrdpo implementation of the e2e cases sets (issue 15's layouts)
VARIANTS = {"fasttrdpo": {}, "fasttrdpo-packed": {"packing": True},
            "fasttrdpo-shared": {"packing": True, "share_prompt": True}}


def run_fasttrdpo(shape, warmup, repeats, device, meter, seed=0, impl="fasttrdpo"):
    import dataclasses

    from _cases import Skip, _fasttrdpo

    ft = _fasttrdpo("trainer.TRDPOTrainer", "trainer.TRDPOConfig")
    variant = VARIANTS[impl]
    fields = {f.name for f in dataclasses.fields(ft.trainer.TRDPOConfig)}
    missing = [k for k in variant if k not in fields]
    if missing:
        raise Skip(f"TRDPOConfig has no field {', '.join(missing)} (yet): issue 15's packing has not landed")
    import _hh

    tok = _tokenizer(shape)
    pairs = _pairs(shape, tok)
    policy, ref = _models(shape, seed)
    steps = warmup + repeats
    out_dir = tempfile.mkdtemp(prefix="bench-fasttrdpo-")
    # the HH case: TRL's truncation (each sequence keeps its start) so that every trainer computes the same tokens
    extra = {"truncation_mode": "keep_start"} if shape.get("data") == "hh" else {}
    cfg = ft.trainer.TRDPOConfig(output_dir=out_dir, per_device_train_batch_size=shape["pairs"], max_steps=steps,
                                 learning_rate=LR, beta=BETA, sync_ref_model=True, tau=shape["sync_steps"],
                                 alpha=ALPHA, logging_steps=10 ** 6, save_steps=0, eval_kl=False, plot=False,
                                 disable_tqdm=True, seed=seed, device=device.type,
                                 max_length=shape.get("max_length") or 2048, lr_scheduler_type="constant",
                                 warmup_steps=0, **variant, **extra)
    trainer = ft.trainer.TRDPOTrainer(policy, tok, pairs, cfg, ref_model=ref)
    del ref  # the trainer keeps its own frozen copy
    seen = []
    _watch_backbone(trainer.model, seen)
    clock = _StepClock(warmup, meter)
    counts, backbone, padded_shapes, planned, losses, last_peak = [], [], [], [], [], []
    try:
        from fasttrdpo.training.packing import count_backbone_tokens as plan_counts
    except ImportError:
        plan_counts = None
    B = shape["pairs"]
    lengths = _hh.pair_lengths(trainer.train_pairs)
    layout = "shared" if variant.get("share_prompt") else "packed" if variant.get("packing") else "padded"
    if shape.get("data") == "hh":  # the pairs in the order given, one new batch per step (as TRL's sequential sampler)
        trainer._step_indices = lambda step: [list(range(step * B, (step + 1) * B))]
    step_indices = trainer._step_indices

    def counted_indices(step):
        idx = step_indices(step)
        used = [lengths[i] for micro in idx for i in micro]
        # tokens as counted since issue 6 (non-pad tokens of chosen + rejected rows, prompt in each), and
        # what this layout runs through the backbone
        counts.append(sum(2 * p + c + r for p, c, r in used))
        backbone.append(_hh.backbone_tokens(used, B)[layout])
        padded_shapes.append((2 * len(used), max(p + max(c, r) for p, c, r in used)))
        if plan_counts is not None:  # the trainer's own plan: bins padded to the widest ("mask" layout) too
            planned.append(plan_counts([[trainer.train_pairs[i] for i in micro] for micro in idx],
                                       cfg.max_length).as_dict())
        return idx

    trainer._step_indices = counted_indices
    loss_of_batch = trainer._loss

    def loss_recorded(batch, policy_module):  # every layout's loss (padded: TRDPOLoss; packed: the token list)
        out = loss_of_batch(batch, policy_module)
        losses.append(float(out[0].detach()))
        return out

    trainer._loss = loss_recorded
    # the reference update is the last thing of an optimizer step: the step ends when it returns
    updater_step = trainer.updater.step

    def step_then_clock(global_step):
        fired = updater_step(global_step)
        clock.step_end()
        if global_step == steps:
            last_peak.append(meter.peak_growth())  # before the end-of-training checkpoint is written
        return fired

    trainer.updater.step = step_then_clock
    meter.start()
    trainer.train()
    return dict(times=clock.times(), first_peak=clock.first_peak, steady_peak=last_peak[0], token_counts=counts,
                backbone_tokens=backbone, layout=layout, first_loss=losses[0] if losses else None, losses=losses,
                tokenizer=type(tok).__name__, backbone_seen=seen, padded_shapes=padded_shapes, planned=planned)


def run_e2e(task):
    from _cases import Skip
    from _measure import MemoryMeter, loadavg, median

    device = torch.device(task["device"])
    meter = MemoryMeter(device)
    impl = task["impl"]
    load_before = loadavg()
    try:
        if impl == "trl-dpotrainer":
            r = run_trl(task["shape"], task["warmup"], task["repeats"], device, meter, seed=task.get("seed", 0))
        elif impl in VARIANTS:
            r = run_fasttrdpo(task["shape"], task["warmup"], task["repeats"], device, meter, seed=task.get("seed", 0),
                              impl=impl)
        else:
            raise ValueError(f"e2e: unknown implementation {impl!r}")
    except Skip as e:
        return {"status": "skipped", "reason": str(e), "loadavg_before": load_before}
    counts = r["token_counts"]
    warmup = task["warmup"]
    timed = counts[warmup:warmup + len(r["times"])]
    tokens_per_step = counts[0] if counts else None
    res = dict(status="ok", times_s=r["times"], median_s=median(r["times"]), peak_growth_bytes=r["steady_peak"],
               first_call_peak_growth_bytes=r["first_peak"], memory_method=meter.method,
               tokens_per_step=tokens_per_step, token_counts_seen=sorted(set(counts)), token_counts=counts,
               first_loss=r["first_loss"], losses=r["losses"], loadavg_before=load_before, loadavg_after=loadavg())
    if task["shape"].get("data") == "hh":
        import _hh

        res["tokenizer"] = _hh.hh_bpe_name(task["shape"]["bpe_vocab"])
    if r.get("backbone_tokens") is not None:
        res["backbone_tokens"] = r["backbone_tokens"]
        res["layout"] = r["layout"]
        res["backbone_tokens_timed"] = sum(r["backbone_tokens"][warmup:warmup + len(r["times"])])
    # what the policy backbone was given per forward call (input positions, padding included): one call a step
    if r.get("planned"):
        res["backbone_planned"] = r["planned"]
    seen = [tuple(x) for x in r.get("backbone_seen") or [] if x is not None]
    res["backbone_shapes_seen"] = seen
    if len(seen) == len(counts):
        res["backbone_positions_timed"] = sum(b * w for b, w in seen[warmup:warmup + len(r["times"])])
    if impl not in ("fasttrdpo", "trl-dpotrainer") and seen and seen == r.get("padded_shapes"):
        return {"status": "error", "loadavg_before": load_before, "backbone_shapes_seen": seen,
                "reason": f"{impl}: the policy backbone was given the padded batches at every step ({seen}): "
                          f"{VARIANTS[impl]} was set in TRDPOConfig but the trainer did not use it"}
    if timed and len(timed) == len(r["times"]) and sum(r["times"]) > 0:
        res["tokens_timed"] = sum(timed)
        if len(set(timed)) == 1:  # the same batch every step: tokens per step over the median step
            res["tokens_per_s"] = timed[0] / res["median_s"]
        else:  # a new batch each step: tokens of the timed steps over their seconds
            res["tokens_per_s"] = sum(timed) / sum(r["times"])
    res["numerics"] = {"first_loss": r["first_loss"]}
    return res
