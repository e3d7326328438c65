"""Autograd ops and their backend dispatch (Triton on CUDA, eager PyTorch elsewhere, C++ on request)."""
