"""The pieces of the TR-DPO trainer, one concern per module (the loop itself is `fasttrdpo.trainer`):

    config.py       TRDPOConfig: every setting of a run, validated on construction
    model_parts.py  backbone / lm_head plumbing of a Hugging Face causal LM, frozen copies
    checkpoint.py   atomic checkpoints, weights in/out, RNG state, resume
    output_dir.py   the output directory's rules: writer lock, run id, refusal of another run, rotation
    schedule.py     learning-rate schedules (transformers.get_scheduler) and their continuation on resume
    distributed.py  process group, device, DDP wrapping, cross-rank fingerprints
    evaluate.py     held-out loss and rewards, exact full-vocabulary KL
    plot.py         training_curves.png
"""
