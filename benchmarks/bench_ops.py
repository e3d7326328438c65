"""The per-token log-prob ops, forward + backward, at small shapes, against plain PyTorch."""
from __future__ import annotations

import pytest
import torch

from conftest import backends_for_device, need, prepare_backend

N, H, V = 512, 64, 4000  # lm_head level
LOGIT_ROWS, LOGIT_V = 512, 4000  # logits level
IGNORE = -100


def pedantic(benchmark, step, setup):
    try:
        benchmark.pedantic(step, setup=setup, rounds=5, warmup_rounds=1)
    except NotImplementedError as e:  # the library does not offer this backend for this op
        pytest.skip(f"not provided: {e}")


def _lm_inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)
    y = torch.randint(0, V, (N,), generator=g)
    y[: N // 4] = IGNORE
    return h.to(device).requires_grad_(), w.to(device).requires_grad_(), y.to(device)


def _naive(h, w, y):
    lp = (h @ w.t()).log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(y == IGNORE, 0.0)


def _run_fwd_bwd(benchmark, fn, h, w, y):
    def setup():
        h.grad = None
        w.grad = None

    def step():
        fn(h, w, y).sum().backward()

    pedantic(benchmark, step, setup)
    # checked outside the timing: values and gradients as plain PyTorch computes them (fp32; a bug is O(1))
    h.grad = w.grad = None
    lp = fn(h, w, y)
    lp.sum().backward()
    got = (lp.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref = _naive(h, w, y)
    ref.sum().backward()
    for a, b, what in zip(got, (ref.detach(), h.grad, w.grad), ("logps", "grad_hidden", "grad_weight")):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), what


@pytest.mark.benchmark(group="linear_token_logprobs fwd+bwd N=512 H=64 V=4000")
def test_linear_naive(benchmark, device):
    h, w, y = _lm_inputs(device)
    _run_fwd_bwd(benchmark, _naive, h, w, y)


@pytest.mark.benchmark(group="linear_token_logprobs fwd+bwd N=512 H=64 V=4000")
@pytest.mark.parametrize("backend", backends_for_device())
def test_linear_fasttrdpo(benchmark, device, backend):
    ft = need("linear_token_logprobs")
    prepare_backend(backend, device)
    h, w, y = _lm_inputs(device)
    _run_fwd_bwd(benchmark, lambda a, b, c: ft.linear_token_logprobs(a, b, c, backend=backend), h, w, y)


def _logit_inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pl = 2.0 * torch.randn(LOGIT_ROWS, LOGIT_V, generator=g)
    rl = pl + 0.1 * torch.randn(LOGIT_ROWS, LOGIT_V, generator=g)
    y = torch.randint(0, LOGIT_V, (LOGIT_ROWS,), generator=g)
    y[: LOGIT_ROWS // 4] = IGNORE
    return pl.to(device).requires_grad_(), rl.to(device), y.to(device)


def _paired_naive(pl, rl, y):
    lp = pl.log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(y == IGNORE, 0.0)
    with torch.no_grad():
        rp = rl.log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(y == IGNORE, 0.0)
    return lp, rp


def _run_paired(benchmark, fn, pl, rl, y):
    def setup():
        pl.grad = None

    def step():
        lp, rp = fn(pl * 1.0, rl, y)  # a non-leaf policy buffer, as a model's last layer hands over
        (lp - rp).sum().backward()

    pedantic(benchmark, step, setup)
    pl.grad = None
    lp, rp = fn(pl * 1.0, rl, y)
    (lp - rp).sum().backward()
    got = (lp.detach(), rp.detach(), pl.grad.clone())
    pl.grad = None
    lp, rp = _paired_naive(pl, rl, y)
    (lp - rp).sum().backward()
    for a, b, what in zip(got, (lp.detach(), rp, pl.grad), ("policy", "ref", "grad_logits")):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), what


@pytest.mark.benchmark(group="paired_token_logprobs fwd+bwd N=512 V=4000")
def test_paired_logits_naive(benchmark, device):
    _run_paired(benchmark, _paired_naive, *_logit_inputs(device))


@pytest.mark.benchmark(group="paired_token_logprobs fwd+bwd N=512 V=4000")
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("backend", backends_for_device())
def test_paired_logits_fasttrdpo(benchmark, device, backend, inplace):
    ft = need("paired_token_logprobs")
    prepare_backend(backend, device)
    fn = lambda a, b, c: ft.paired_token_logprobs(a, b, c, inplace_backward=inplace, backend=backend)  # noqa: E731
    _run_paired(benchmark, fn, *_logit_inputs(device))
