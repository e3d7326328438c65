"""fasttrdpo inside TRL's DPOTrainer (the only module of fasttrdpo that imports trl).

callback.py: a drop-in for TRL's SyncRefModelCallback that blends with the fused kernel.
dpo.py: makes DPOTrainer compute its loss through fasttrdpo.loss.TRDPOLoss.
"""
from .callback import FusedSyncRefModelCallback  # noqa: F401
from .dpo import FusedDPOTrainer, use_trdpo_loss  # noqa: F401
