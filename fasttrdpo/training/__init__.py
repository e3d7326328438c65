"""The pieces of the TR-DPO trainer, one concern per module (the loop itself is `fasttrdpo.trainer`):

    config.py       TRDPOConfig: every setting of a run, validated on construction
    model_parts.py  backbone / lm_head plumbing of a Hugging Face causal LM, frozen copies
    checkpoint.py   atomic checkpoints, rotation, weights in/out, RNG state, resume
    distributed.py  process group, device, DDP wrapping, cross-rank fingerprints
    evaluate.py     held-out loss and rewards, exact full-vocabulary KL
    plot.py         training_curves.png
"""
