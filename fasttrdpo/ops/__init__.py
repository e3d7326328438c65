"""Autograd ops and their backend dispatch (Triton on CUDA, eager PyTorch elsewhere, C++ on request)."""
from .blend import blend_  # noqa: E402,F401
from .logits import paired_token_logprobs, token_logprobs  # noqa: F401
from .linear import linear_token_logprobs, linear_token_stats, paired_linear_token_logprobs  # noqa: F401
