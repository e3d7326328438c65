"""fasttrdpo: fused kernels for TR-DPO.

Public API (a contract; see README): token_logprobs, paired_token_logprobs, linear_token_logprobs,
paired_linear_token_logprobs, blend_, RefModelUpdater; fasttrdpo.loss for the losses.
"""
from ._backend import last_backend
from ._cpp import build_cpp
from .ops.blend import blend_
from .ops.logits import paired_token_logprobs, token_logprobs
from .ops.linear import linear_token_logprobs, paired_linear_token_logprobs
from .ref_update import RefModelUpdater

__version__ = "0.1.0"
__all__ = ["last_backend", "__version__", "blend_", "token_logprobs", "paired_token_logprobs", "build_cpp", "RefModelUpdater",
           "linear_token_logprobs", "paired_linear_token_logprobs"]
