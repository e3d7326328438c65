"""The benchmark cases and every implementation of each, ours and the peers'.

A case builds its inputs once (deterministic from a seed), then exposes `step()` (one timed unit of work),
`before_each()` (untimed reset: gradients, inputs an in-place implementation overwrote) and
`numerics(out)` (small, comparable numbers: loss, per-sequence log-probs, gradient samples and norms)
so that `throughput.py` can check that every implementation computes the same thing.

An implementation whose code cannot be imported raises `Skip(reason)` while the case is built; it is
then reported as skipped with that reason, never left out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100
BETA = 0.1  # DPO β for the loss-step cases
ALPHA = 0.6  # TR-DPO soft-update weight (the paper's best α range is 0.5–0.6)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# GEMM chunk of the "gemm-chain" roof: the valid tokens per chunk issue 11 asks TRDPOLoss to hold on CUDA
GEMM_CHAIN_CHUNK_TOKENS = 4096


class Skip(Exception):
    """The implementation cannot run here (not installed, needs CUDA, API not landed yet)."""


def _need_cuda(device):
    if device.type != "cuda":
        raise Skip("needs a CUDA device")


def _fasttrdpo(*names):
    """Import fasttrdpo and check the named attributes exist (other engineers land them in parallel)."""
    try:
        import fasttrdpo
    except Exception as e:  # pragma: no cover - the package is in the repo
        raise Skip(f"fasttrdpo does not import: {type(e).__name__}: {e}")
    import importlib

    for name in names:
        obj, path = fasttrdpo, "fasttrdpo"
        for part in name.split("."):
            path = f"{path}.{part}"
            if not hasattr(obj, part) and isinstance(obj, type(fasttrdpo)):
                try:
                    importlib.import_module(path)
                except ModuleNotFoundError as e:
                    if e.name != path:
                        raise Skip(f"{path} not importable: {type(e).__name__}: {e}")
                except Exception as e:
                    raise Skip(f"{path} not importable: {type(e).__name__}: {e}")
            if not hasattr(obj, part):
                raise Skip(f"{path} does not exist (yet)")
            obj = getattr(obj, part)
    return fasttrdpo


def _build_cpp():
    fasttrdpo = _fasttrdpo("build_cpp")
    try:
        fasttrdpo.build_cpp()
    except Exception as e:
        raise Skip(f"fasttrdpo.build_cpp() failed: {type(e).__name__}: {e}")
    return fasttrdpo


def _fasttrdpo_backend(impl: str, device: torch.device, attr: str):
    """(backend, fasttrdpo) for an implementation named "fasttrdpo-<backend>[-variant]" that calls
    fasttrdpo.<attr>: skips what this device cannot run and builds the C++ extension when it is asked for."""
    parts = impl.split("-")
    backend = parts[2] if parts[1] == "op" else parts[1]
    if backend == "triton":
        _need_cuda(device)
    ft = _fasttrdpo(attr)
    if backend == "cpp":
        if device.type != "cpu":
            raise Skip("the C++ backend runs on CPU tensors only")
        _build_cpp()
    return backend, ft


def _sample(t: torch.Tensor, k: int = 64) -> list[float]:
    """k entries spread over the tensor (same positions for every implementation)."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // k)
    return flat[::step][:k].double().cpu().tolist()


def _grad_summary(t: torch.Tensor | None) -> dict | None:
    if t is None:
        return None
    g = t.detach().double()
    return {"norm": g.norm().item(), "sum": g.sum().item(), "sample": _sample(g)}


# ==================================================================================== lm_head-level inputs
def lm_head_inputs(pairs: int, seq: int, hidden: int, vocab: int, device, dtype=torch.float32, seed=0,
                   prompt: int | None = None, valid: float | None = None):
    """Hidden states, weights and labels of a DPO batch: rows [0, P) chosen, [P, 2P) rejected.

    Each row starts with an ignored prompt (a quarter of the row) and rows end with varying padding
    (also ignored), as real preference batches do. With `valid` (the GPU shapes) each row instead has
    an ignored prompt of round((1 - valid) * seq) positions and no padding, so exactly that fraction
    of the tokens is valid. Logits come out with a std of ~2. On CUDA the data is drawn on the device
    (a CPU draw of the GPU shapes' 1e9 values would dominate the run); elsewhere on the CPU generator.
    """
    device = torch.device(device)
    rows = 2 * pairs
    if valid is not None:
        prompt = int(round((1.0 - valid) * seq))
    else:
        prompt = seq // 4 if prompt is None else prompt
    if device.type == "cuda":
        g = torch.Generator(device=device).manual_seed(seed)
        kw = dict(generator=g, device=device)
    else:
        g = torch.Generator().manual_seed(seed)
        kw = dict(generator=g)
    h = torch.randn(rows, seq, hidden, **kw)
    w = torch.randn(vocab, hidden, **kw) * (2.0 / math.sqrt(hidden))
    ref_h = h + 0.1 * torch.randn(rows, seq, hidden, **kw)
    ref_w = w + 0.02 * torch.randn(vocab, hidden, **kw) / math.sqrt(hidden)
    labels = torch.randint(0, vocab, (rows, seq), **kw)
    labels[:, :prompt] = IGNORE
    if valid is None:
        for r in range(rows):
            pad = (r * 13) % max(1, seq // 8)
            if pad:
                labels[r, seq - pad:] = IGNORE
    out = {
        "hidden": h.to(device=device, dtype=dtype).requires_grad_(),
        "weight": w.to(device=device, dtype=dtype).requires_grad_(),
        "ref_hidden": ref_h.to(device=device, dtype=dtype),
        "ref_weight": ref_w.to(device=device, dtype=dtype),
        "labels": labels.to(device),
    }
    return out


def dpo_sigmoid(policy_tok, ref_tok, beta=BETA):
    """Mean sigmoid DPO loss over pairs from per-token log-probs [2P, T] (0 at ignored positions)."""
    pol = policy_tok.sum(-1)
    ref = ref_tok.sum(-1)
    p = pol.shape[0] // 2
    delta = (pol[:p] - ref[:p]) - (pol[p:] - ref[p:])
    return -F.logsigmoid(beta * delta).mean(), pol.detach(), ref.detach()


# -------------------------------------------------------------------- per-token log-prob functions (peers)
def _naive_tok(h, w, labels):
    logits = h @ w.t()
    lp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(labels == IGNORE, 0.0)


def _trl_tok_fn():
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception as e:
        raise Skip(f"trl not importable: {type(e).__name__}: {e}")

    def tok(h, w, labels):
        # what TRL's DPOTrainer did before 1.16: full logits, then its selective_log_softmax
        logits = h @ w.t()
        lp = selective_log_softmax(logits, labels.clamp(min=0))
        return lp.masked_fill(labels == IGNORE, 0.0)

    return tok


def _trl_chunked_tok_fn():
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except Exception as e:
        raise Skip(f"trl.kernels.ChunkedLogProbFunction not importable: {type(e).__name__}: {e}")

    def tok(h, w, labels):
        # TRL >= 1.16's fused lm-head path: only the non-ignored positions are scored, results are
        # scattered back (as trl.trainer.utils.add_fused_lm_head does on Triton devices). Only
        # log-probs are requested (the leanest configuration; DPOTrainer also asks for entropy etc.).
        mask = labels != IGNORE
        lp = ChunkedLogProbFunction.apply(h[mask], w, None, labels[mask], 1.0, chunk, None, 1.0, ("log_probs",))[0]
        return lp.new_zeros(mask.shape).masked_scatter(mask, lp)

    return tok


def _cce_tok_fn(device):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        raise Skip(f"cut-cross-entropy not importable: {type(e).__name__}: {e}")
    if device.type != "cuda":
        raise Skip("cut-cross-entropy's cce implementation is Triton on CUDA tensors: needs a CUDA device")

    def tok(h, w, labels):
        # -log p per token (0 at ignored positions); its default gradient filtering (filter_eps="high")
        # skips the backward tiles whose softmax - onehot is below bf16 resolution
        nll = linear_cross_entropy(h, w, labels, ignore_index=IGNORE, reduction="none")
        return (-nll.float()).masked_fill(labels == IGNORE, 0.0)

    return tok


def _addmm_fp32_(acc, a, b):
    """acc += a @ b into an fp32 accumulator without rounding the product to the operands' half dtype
    (cuBLAS with an fp32 output on CUDA, torch >= 2.8); fp32 operands elsewhere."""
    if acc.device.type == "cuda" and a.dtype != torch.float32:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except TypeError as e:  # older torch: reported as an error of this implementation, not hidden
            raise RuntimeError(f"torch.addmm(out_dtype=float32) unavailable: {e}") from e
    return acc.addmm_(a.float(), b.float())


def gemm_chain(x, chunk_tokens=GEMM_CHAIN_CHUNK_TOKENS):
    """The cuBLAS GEMMs of the chunked TRDPOLoss, alone: per chunk of valid tokens, policy and reference
    logits, grad_hidden = dz @ W and grad_W += dz^T h (fp32 accumulation), with the policy logits
    standing in for dz. Nothing else: the reachable roof of the loss step on this device."""
    mask = x["labels"] != IGNORE
    hp, hr = x["hidden"].detach()[mask], x["ref_hidden"][mask]
    wp, wr = x["weight"].detach(), x["ref_weight"]
    gw = torch.zeros(wp.shape, dtype=torch.float32, device=wp.device)
    gh = torch.empty_like(hp)
    for s in range(0, hp.shape[0], chunk_tokens):
        h = hp[s:s + chunk_tokens]
        z = h @ wp.T
        hr[s:s + chunk_tokens] @ wr.T
        torch.mm(z, wp, out=gh[s:s + chunk_tokens])
        _addmm_fp32_(gw, z.T, h)
    return {"grad_weight_fp32": gw, "grad_hidden": gh}


def _tiny_lm_head(device):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 3, 8, generator=g).to(device).requires_grad_()
    w = torch.randn(16, 8, generator=g).to(device).requires_grad_()
    y = torch.randint(0, 16, (2, 3), generator=g).to(device)
    return h, w, y, h.detach(), w.detach()


def _probe_backend(call, backend):
    """One call on tiny inputs: a backend the library does not provide for this op raises here, and the
    implementation is reported as skipped with the library's own message (not as a benchmark error)."""
    if backend in ("eager", "auto"):
        return
    try:
        call()
    except (NotImplementedError, ValueError, RuntimeError) as e:
        raise Skip(f"backend {backend!r} not provided here: {type(e).__name__}: {e}")


# ==================================================================================== case 1: loss step
class _Case:
    """What every case shares: the fasttrdpo backends its last run used, and no FLOP count by default."""

    impl: str

    def backend(self):
        if self.impl.startswith("fasttrdpo"):
            import fasttrdpo

            return fasttrdpo.last_backend()
        return None

    @staticmethod
    def useful_flops(shape):
        return None


class LossStep(_Case):
    """Paired policy+reference log-probs at the lm_head level + sigmoid DPO loss, forward + backward."""

    IMPLS = ("naive", "trl", "trl-chunked", "liger", "liger-compiled", "fasttrdpo-eager",
             "fasttrdpo-op-eager", "fasttrdpo-cpp", "fasttrdpo-triton")
    # run by the GPU check (throughput.py --gpu-check), not by the CPU plans
    EXTRA_IMPLS = ("fasttrdpo-auto", "fasttrdpo-op-auto", "cce", "gemm-chain")
    DESCRIPTIONS = {
        "naive": "h @ W.T -> log_softmax -> gather, policy and reference",
        "trl": "h @ W.T -> trl.trainer.utils.selective_log_softmax (TRL's pre-1.16 DPO path)",
        "trl-chunked": "trl.kernels.ChunkedLogProbFunction on non-ignored positions (TRL 1.16 DPOTrainer)",
        "liger": "liger_kernel.chunked_loss.LigerFusedLinearDPOLoss(compiled=False)",
        "liger-compiled": "liger_kernel.chunked_loss.LigerFusedLinearDPOLoss(compiled=True)",
        "fasttrdpo-eager": "fasttrdpo.loss.TRDPOLoss(backend='eager') (loss and gradient finished per chunk of pairs)",
        "fasttrdpo-op-eager": "fasttrdpo.paired_linear_token_logprobs(backend='eager') + sigmoid DPO loss",
        "fasttrdpo-cpp": "fasttrdpo.loss.TRDPOLoss(backend='cpp') after fasttrdpo.build_cpp()",
        "fasttrdpo-triton": "fasttrdpo.loss.TRDPOLoss(backend='triton') (CUDA)",
        "fasttrdpo-auto": "fasttrdpo.loss.TRDPOLoss() (backend auto: triton on CUDA, eager on CPU)",
        "fasttrdpo-op-auto": "fasttrdpo.paired_linear_token_logprobs() (backend auto) + sigmoid DPO loss: the generic "
                             "lm_head op",
        "cce": "cut_cross_entropy.linear_cross_entropy(reduction='none') twice (policy, reference under no_grad) "
               "+ sigmoid DPO loss",
        "gemm-chain": "the cuBLAS GEMMs alone (policy + reference logits, dz@W, dz^T h into fp32) per 4096 valid "
                      "tokens: the reachable roof",
    }
    BASELINES = ("trl", "trl-chunked")
    NO_NUMERICS = ("gemm-chain",)

    def __init__(self, impl: str, shape: dict, device, dtype=torch.float32, seed=0):
        self.impl = impl
        self.shape = shape
        self.device = device
        self.backend_used = None
        self._fn = self._make_fn(impl, device)  # raises Skip before any allocation
        dtype = _DTYPES[shape["dtype"]] if "dtype" in shape else dtype
        self.x = lm_head_inputs(shape["pairs"], shape["seq"], shape["hidden"], shape["vocab"], device, dtype, seed,
                                valid=shape.get("valid"))

    @staticmethod
    def tokens(shape):
        return 2 * shape["pairs"] * shape["seq"]

    def _make_fn(self, impl, device):
        if impl == "gemm-chain":
            def fn(x):
                gemm_chain(x)
                return {}

            return fn
        if impl in ("naive", "trl", "trl-chunked", "cce") or impl.startswith("fasttrdpo-op-"):
            if impl == "naive":
                tok = _naive_tok
            elif impl == "trl":
                tok = _trl_tok_fn()
            elif impl == "trl-chunked":
                tok = _trl_chunked_tok_fn()
            elif impl == "cce":
                tok = _cce_tok_fn(device)
            else:
                backend, ft = _fasttrdpo_backend(impl, device, "paired_linear_token_logprobs")

                def fn(x):
                    pol, ref = ft.paired_linear_token_logprobs(x["hidden"], x["weight"], x["ref_hidden"],
                                                               x["ref_weight"], x["labels"], backend=backend)
                    loss, pol_s, ref_s = dpo_sigmoid(pol, ref)
                    loss.backward()
                    return {"loss": loss.detach(), "policy_logps": pol_s, "ref_logps": ref_s}

                return fn

            def fn(x):
                pol = tok(x["hidden"], x["weight"], x["labels"])
                with torch.no_grad():
                    ref = tok(x["ref_hidden"], x["ref_weight"], x["labels"])
                loss, pol_s, ref_s = dpo_sigmoid(pol, ref)
                loss.backward()
                return {"loss": loss.detach(), "policy_logps": pol_s, "ref_logps": ref_s}

            return fn
        if impl in ("liger", "liger-compiled"):
            try:
                from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
            except Exception as e:
                raise Skip(f"liger-kernel not importable: {type(e).__name__}: {e}")
            mod = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, compiled=impl == "liger-compiled",
                                          use_ref_model=True)

            def fn(x):
                loss, aux = mod(x["weight"], x["hidden"], x["labels"], None, x["ref_hidden"], x["ref_weight"], None)
                loss.backward()
                pol = torch.cat([aux[0], aux[1]]).detach()  # chosen_logps, rejected_logps (summed)
                return {"loss": loss.detach(), "policy_logps": pol}

            return fn
        if impl.startswith("fasttrdpo-"):
            backend, ft = _fasttrdpo_backend(impl, device, "loss.TRDPOLoss")
            loss_mod = ft.loss.TRDPOLoss(beta=BETA, loss_type="sigmoid", ignore_index=IGNORE, backend=backend)
            _probe_backend(lambda: loss_mod.forward(*_tiny_lm_head(device)), backend)

            def fn(x):
                loss, metrics = loss_mod.forward(x["hidden"], x["weight"], x["labels"], x["ref_hidden"], x["ref_weight"])
                loss.backward()
                return {"loss": loss.detach(), "logps_chosen_mean": float(metrics["logps/chosen"]),
                        "logps_rejected_mean": float(metrics["logps/rejected"])}

            return fn
        raise ValueError(f"unknown implementation {impl!r}")

    def before_each(self):
        self.x["hidden"].grad = None
        self.x["weight"].grad = None

    def step(self):
        return self._fn(self.x)

    def numerics(self, out):
        if self.impl in self.NO_NUMERICS:
            return {}
        res = {"loss": float(out["loss"])}
        if "policy_logps" in out:
            pol = out["policy_logps"].double().cpu()
            res["policy_logps"] = pol.tolist()
            half = pol.shape[0] // 2
            res["logps_chosen_mean"] = pol[:half].mean().item()
            res["logps_rejected_mean"] = pol[half:].mean().item()
        else:  # the loss module reports TRL's metrics (means over pairs) instead of per-sequence values
            res["logps_chosen_mean"] = out["logps_chosen_mean"]
            res["logps_rejected_mean"] = out["logps_rejected_mean"]
        res["grad_hidden"] = _grad_summary(self.x["hidden"].grad)
        res["grad_weight"] = _grad_summary(self.x["weight"].grad)
        return res

    @staticmethod
    def valid_tokens(shape):
        if "valid" not in shape:
            return None
        return 2 * shape["pairs"] * (shape["seq"] - int(round((1.0 - shape["valid"]) * shape["seq"])))

    @staticmethod
    def useful_flops(shape):
        # policy forward + backward (h@W^T, grad_h, grad_W: 6NHV) + reference forward (2NHV); recompute is not
        # useful, and where the shape fixes the valid fraction neither are the ignored rows
        n = LossStep.valid_tokens(shape) or LossStep.tokens(shape)
        return 8 * n * shape["hidden"] * shape["vocab"]


# ==================================================================================== issue 2: lm_head op memory
class LmHeadOp(_Case):
    """The per-token op alone, fwd+bwd (or forward only when the shape says fwd_only):
    fasttrdpo.linear_token_logprobs vs log_softmax(h @ W.T).gather."""

    IMPLS = ("naive", "fasttrdpo-eager", "fasttrdpo-cpp", "fasttrdpo-triton")
    EXTRA_IMPLS = ("fasttrdpo-auto", "gemm", "cce")
    DESCRIPTIONS = {
        "naive": "log_softmax(h @ W.T).gather(...) (fp32 log_softmax), backward of the sum",
        "fasttrdpo-eager": "fasttrdpo.linear_token_logprobs(backend='eager')",
        "fasttrdpo-cpp": "fasttrdpo.linear_token_logprobs(backend='cpp')",
        "fasttrdpo-triton": "fasttrdpo.linear_token_logprobs(backend='triton') (CUDA)",
        "fasttrdpo-auto": "fasttrdpo.linear_token_logprobs() (backend auto)",
        "gemm": "h @ W.T alone (the op's GEMM, logits written): the op forward's target denominator",
        "cce": "-cut_cross_entropy.linear_cross_entropy(h, W, y, reduction='none')",
    }
    BASELINES = ("naive",)
    NO_NUMERICS = ("gemm",)

    def __init__(self, impl, shape, device, dtype=torch.float32, seed=0):
        self.impl = impl
        self.device = device
        self.fwd_only = bool(shape.get("fwd_only"))
        dtype = _DTYPES[shape["dtype"]] if "dtype" in shape else dtype
        if impl == "naive":
            self._tok = lambda h, w, y: _naive_tok(h, w, y)
        elif impl == "gemm":
            if not self.fwd_only:
                raise Skip("the GEMM alone is the forward's denominator (fwd_only shapes)")
            self._tok = lambda h, w, y: h @ w.T
        elif impl == "cce":
            self._tok = _cce_tok_fn(device)
        else:
            backend, ft = _fasttrdpo_backend(impl, device, "linear_token_logprobs")
            self._tok = lambda h, w, y: ft.linear_token_logprobs(h, w, y, backend=backend)
        n, hdim, v = shape["tokens"], shape["hidden"], shape["vocab"]
        if torch.device(device).type == "cuda":  # drawn on the device (see lm_head_inputs)
            g = torch.Generator(device=device).manual_seed(seed)
            kw = dict(generator=g, device=device)
        else:
            g = torch.Generator().manual_seed(seed)
            kw = dict(generator=g)
        h = torch.randn(n, hdim, **kw)
        w = torch.randn(v, hdim, **kw) * (2.0 / math.sqrt(hdim))
        y = torch.randint(0, v, (n,), **kw)
        y[: n // 8] = IGNORE
        grad = not self.fwd_only
        self.x = {"hidden": h.to(device, dtype).requires_grad_(grad), "weight": w.to(device, dtype).requires_grad_(grad),
                  "labels": y.to(device)}

    @staticmethod
    def tokens(shape):
        return shape["tokens"]

    def before_each(self):
        self.x["hidden"].grad = None
        self.x["weight"].grad = None

    def step(self):
        if self.fwd_only:
            with torch.no_grad():
                out = self._tok(self.x["hidden"], self.x["weight"], self.x["labels"])
            return {} if self.impl == "gemm" else {"logps": out}
        lp = self._tok(self.x["hidden"], self.x["weight"], self.x["labels"])
        lp.sum().backward()
        return {"logps": lp.detach()}

    def numerics(self, out):
        if self.impl in self.NO_NUMERICS:
            return {}
        return {"logps_sum": out["logps"].double().sum().item(), "logps": _sample(out["logps"]),
                "grad_hidden": _grad_summary(self.x["hidden"].grad),
                "grad_weight": _grad_summary(self.x["weight"].grad)}

    @staticmethod
    def useful_flops(shape):
        return (2 if shape.get("fwd_only") else 6) * shape["tokens"] * shape["hidden"] * shape["vocab"]


# ==================================================================================== case 2: logits level
class LogitsStep(_Case):
    """Paired log-probs from logits [2P, T, V] (policy with grad, reference without) + DPO loss, fwd+bwd."""

    IMPLS = ("naive", "trl", "fasttrdpo-eager", "fasttrdpo-eager-inplace", "fasttrdpo-cpp", "fasttrdpo-cpp-inplace",
             "fasttrdpo-triton")
    DESCRIPTIONS = {
        "naive": "log_softmax -> gather on policy and reference logits",
        "trl": "trl.trainer.utils.selective_log_softmax on both",
        "fasttrdpo-eager": "fasttrdpo.paired_token_logprobs(backend='eager')",
        "fasttrdpo-eager-inplace": "fasttrdpo.paired_token_logprobs(backend='eager', inplace_backward=True)",
        "fasttrdpo-cpp": "fasttrdpo.paired_token_logprobs(backend='cpp')",
        "fasttrdpo-cpp-inplace": "fasttrdpo.paired_token_logprobs(backend='cpp', inplace_backward=True)",
        "fasttrdpo-triton": "fasttrdpo.paired_token_logprobs(backend='triton') (CUDA)",
    }
    BASELINES = ("trl",)
    NOT_APPLICABLE = {"liger": "Liger has no logits-level log-prob op (its DPO loss starts from hidden states)"}

    def __init__(self, impl, shape, device, dtype=torch.float32, seed=0):
        self.impl = impl
        self.device = device
        self.inplace = impl.endswith("-inplace")
        if impl == "naive":
            def pair(pl, rl, y):
                with torch.no_grad():
                    ref = _naive_lp(rl, y)
                return _naive_lp(pl, y), ref
        elif impl == "trl":
            try:
                from trl.trainer.utils import selective_log_softmax
            except Exception as e:
                raise Skip(f"trl not importable: {type(e).__name__}: {e}")

            def pair(pl, rl, y):
                m = y == IGNORE
                with torch.no_grad():
                    ref = selective_log_softmax(rl, y.clamp(min=0)).masked_fill(m, 0.0)
                return selective_log_softmax(pl, y.clamp(min=0)).masked_fill(m, 0.0), ref
        else:
            backend, ft = _fasttrdpo_backend(impl, device, "paired_token_logprobs")

            def pair(pl, rl, y):
                return ft.paired_token_logprobs(pl, rl, y, inplace_backward=self.inplace, backend=backend)
        self._pair = pair
        g = torch.Generator().manual_seed(seed)
        rows, t, v = 2 * shape["pairs"], shape["seq"], shape["vocab"]
        pl = 2.0 * torch.randn(rows, t, v, generator=g)
        rl = pl + 0.1 * torch.randn(rows, t, v, generator=g)
        y = torch.randint(0, v, (rows, t), generator=g)
        y[:, : t // 4] = IGNORE
        # the policy logits are the output of a layer (not a leaf), as in a model: `base` is the leaf
        self.base = pl.to(device, dtype).requires_grad_()
        self.ref_logits = rl.to(device, dtype)
        self.labels = y.to(device)

    @staticmethod
    def tokens(shape):
        return 2 * shape["pairs"] * shape["seq"]

    def before_each(self):
        self.base.grad = None

    def step(self):
        # `* 1` gives a non-leaf buffer the op may overwrite in place in backward (what a model's last
        # layer hands over); its cost is the same for every implementation
        logits = self.base * 1.0
        pol, ref = self._pair(logits, self.ref_logits, self.labels)
        loss, pol_s, ref_s = dpo_sigmoid(pol, ref)
        del logits
        loss.backward()
        return {"loss": loss.detach(), "policy_logps": pol_s, "ref_logps": ref_s}

    def numerics(self, out):
        return {"loss": float(out["loss"]), "policy_logps": out["policy_logps"].double().cpu().tolist(),
                "ref_logps": out["ref_logps"].double().cpu().tolist(), "grad_logits": _grad_summary(self.base.grad)}


def _naive_lp(logits, y):
    lp = logits.log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(y == IGNORE, 0.0)


# ==================================================================================== case 3: reference update
def pythia_param_shapes(hidden=768, layers=12, vocab=50304, heads=12, intermediate=None):
    """Parameter shapes of a GPTNeoX (Pythia) model, from its config on the meta device (no download)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate or 4 * hidden, tie_word_embeddings=False)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(cfg)
    return [tuple(p.shape) for p in model.parameters()]


def llama_layer_shapes(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=1):
    """Parameter shapes of Llama decoder layers (q, k, v, o, gate, up, down, 2 RMSNorms)."""
    kv = hidden // heads * kv_heads
    one = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (intermediate, hidden),
           (intermediate, hidden), (hidden, intermediate), (hidden,), (hidden,)]
    return one * layers


def param_list(name: str, scale: float = 1.0):
    """Named parameter lists: Pythia-160M (148 tensors), Pythia-2.8B and Llama-8B layers, the whole Llama-8B
    (291 tensors, 8.03e9 elements at scale 1), widths scaled by `scale`."""
    def s(x):
        return max(8, int(round(x * scale / 8)) * 8)

    if name == "pythia-160m":
        return pythia_param_shapes(hidden=s(768), layers=12, vocab=s(50304), heads=12)
    if name == "pythia-2.8b-layers":  # hidden 2560, 32 layers; `layers` of them, width scaled
        return pythia_param_shapes(hidden=s(2560), layers=4, vocab=8, heads=32)[1:-3]  # layers only
    if name == "llama-8b-layers":
        return llama_layer_shapes(hidden=s(4096), intermediate=s(14336), heads=32, kv_heads=8, layers=2)
    if name == "llama-8b":  # the whole model: embedding, 32 layers, final norm, untied lm_head (291 tensors)
        hid, vocab = s(4096), s(128256)
        return [(vocab, hid)] + llama_layer_shapes(hidden=hid, intermediate=s(14336), layers=32) + [(hid,), (vocab, hid)]
    raise ValueError(f"unknown parameter list {name!r}")


_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


class Blend(_Case):
    """θ_ref ← θ_ref + α(θ − θ_ref) over a whole parameter list, in place."""

    IMPLS = ("trl-loop", "foreach-lerp", "fasttrdpo-eager", "fasttrdpo-cpp", "fasttrdpo-triton")
    DESCRIPTIONS = {
        "trl-loop": "for each tensor: p_ref.mul_(1 - α).add_(p, alpha=α) (trl SyncRefModelCallback)",
        "foreach-lerp": "torch._foreach_lerp_(refs, policies, α) (policy cast to the ref dtype first when they differ)",
        "fasttrdpo-eager": "fasttrdpo.blend_(ref_tensors=refs, policy_tensors=policies, alpha=α, backend='eager') "
                           "(check_finite=True, the default)",
        "fasttrdpo-cpp": "fasttrdpo.blend_(..., backend='cpp') after fasttrdpo.build_cpp() (check_finite=True)",
        "fasttrdpo-triton": "fasttrdpo.blend_(..., backend='triton') (CUDA; check_finite=True)",
        "fasttrdpo-auto": "fasttrdpo.blend_(...) (backend auto; check_finite=True)",
        "fasttrdpo-auto-unchecked": "fasttrdpo.blend_(..., check_finite=False) (backend auto): the blend alone, "
                                    "without the finite screen's extra read of the policy",
    }
    EXTRA_IMPLS = ("fasttrdpo-auto", "fasttrdpo-auto-unchecked")
    BASELINES = ("trl-loop",)

    def __init__(self, impl, shape, device, dtype=None, seed=0):
        self.impl = impl
        self.device = device
        pdt, rdt = _DTYPES[shape["policy_dtype"]], _DTYPES[shape["ref_dtype"]]
        if impl.startswith("fasttrdpo-"):
            backend, ft = _fasttrdpo_backend(impl, device, "blend_")
            # check_finite=True (the default) screens the policy for NaN/inf before writing: one more read
            check = not impl.endswith("-unchecked")
            self._blend = lambda refs, pols, a: ft.blend_(ref_tensors=refs, policy_tensors=pols, alpha=a,
                                                         backend=backend, check_finite=check)
        elif impl == "trl-loop":
            def loop(refs, pols, a):
                for r, p in zip(refs, pols):
                    r.mul_(1.0 - a).add_(p, alpha=a)
            self._blend = loop
        elif impl == "foreach-lerp":
            def lerp(refs, pols, a):
                if pols and pols[0].dtype != refs[0].dtype:
                    pols = [p.to(refs[0].dtype) for p in pols]
                torch._foreach_lerp_(refs, pols, a)
            self._blend = lerp
        else:
            raise ValueError(impl)
        shapes = [tuple(s) for s in shape["shapes"]]
        if torch.device(device).type == "cuda":  # drawn on the device: the Llama-8B list is 8e9 values
            g = torch.Generator(device=device).manual_seed(seed)
            kw = dict(generator=g, device=device)
        else:
            g = torch.Generator().manual_seed(seed)
            kw = dict(generator=g)
        self.policy, self.ref = [], []
        for s in shapes:
            p = torch.randn(s, **kw) * 0.05
            self.policy.append(p.to(device, pdt))
            self.ref.append((p + 0.01 * torch.randn(s, **kw)).to(device, rdt))
            del p
        # snapshot of a few small tensors to check the arithmetic after timing (the timed runs blend repeatedly)
        order = sorted(range(len(shapes)), key=lambda i: math.prod(shapes[i]))
        self._check_idx = sorted({order[0], order[len(order) // 2], order[-2] if len(order) > 1 else order[0]})
        self._check_ref = [self.ref[i].clone() for i in self._check_idx]
        self.elements = sum(math.prod(s) for s in shapes)
        self.bytes_moved = sum(math.prod(s) * (2 * self.ref[i].element_size() + self.policy[i].element_size())
                               for i, s in enumerate(shapes))

    def before_each(self):
        pass

    def step(self):
        self._blend(self.ref, self.policy, ALPHA)
        return None

    def numerics(self, out):
        refs = [r.clone() for r in self._check_ref]
        pols = [self.policy[i] for i in self._check_idx]
        self._blend(refs, pols, ALPHA)
        worst_ulps, total = 0.0, 0.0
        for r0, p, r in zip(self._check_ref, pols, refs):
            r0d, pd = r0.double(), p.double()
            exact = r0d + ALPHA * (pd - r0d)
            err = (r.double() - exact).abs()
            # bound unit: one ulp (of the ref dtype) of max(|ref|, |policy|) per element — every operand and
            # intermediate of the formula is bounded by that magnitude, so a single rounding errs by <= 0.5
            mag = torch.maximum(r0d.abs(), pd.abs()).clamp_min(torch.finfo(r.dtype).tiny)
            ulp = torch.exp2(torch.floor(torch.log2(mag)) - _MANTISSA_BITS[r.dtype])
            worst_ulps = max(worst_ulps, (err / ulp).max().item())
            total += r.double().sum().item()
        return {"checked_tensors": len(refs), "max_err_ulps_of_operand_max": worst_ulps, "checksum": total}


# ==================================================================================== registry
CASES = {"loss_step": LossStep, "lmhead_op": LmHeadOp, "logits_step": LogitsStep, "blend": Blend}


def build(case: str, impl: str, shape: dict, device, seed: int = 0):
    cls = CASES[case]
    known = cls.IMPLS + getattr(cls, "EXTRA_IMPLS", ())
    if impl not in known:
        raise ValueError(f"{case}: unknown implementation {impl!r} (known: {known})")
    return cls(impl, shape, device, seed=seed)


# ==================================================================================== one measurement
def run_task(task: dict) -> dict:
    """Build one (case, implementation, shape), time it and measure its peak memory growth. Runs in a
    fresh child process (see throughput.py), so the memory it reports belongs to this case alone."""
    import time
    import traceback

    from _measure import MemoryMeter, copy_bandwidth, median, timed_runs

    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    device = torch.device(task["device"])
    res = {"case": task["case"], "impl": task["impl"], "shape": task["shape"]}
    try:
        if task["case"] in ("e2e", "e2e_hh"):
            from _e2e import run_e2e

            res.update(run_e2e(task))
            return res
        t0 = time.perf_counter()
        bench = build(task["case"], task["impl"], task["shape"], device, seed=task.get("seed", 0))
        res["setup_s"] = time.perf_counter() - t0
        meter = MemoryMeter(device)
        times, first_peak, steady_peak, out = timed_runs(
            bench.step, warmup=task["warmup"], repeats=task["repeats"], device=device, meter=meter,
            before_each=bench.before_each)
        res.update(status="ok", times_s=times, median_s=median(times), peak_growth_bytes=steady_peak,
                   first_call_peak_growth_bytes=first_peak, memory_method=meter.method)
        res["numerics"] = bench.numerics(out)
        res["backend_used"] = bench.backend()
        flops = bench.useful_flops(task["shape"])
        if flops:
            res["useful_flops"] = flops
            res["tflops"] = flops / res["median_s"] / 1e12
        if task["case"] == "blend":
            res["elements"] = bench.elements
            res["bytes_moved"] = bench.bytes_moved
            res["gbps"] = bench.bytes_moved / res["median_s"] / 1e9
            del bench, out
            copy_s = copy_bandwidth(res["bytes_moved"], device, repeats=task["repeats"])
            res["copy_same_bytes_s"] = copy_s
            res["copy_gbps"] = res["bytes_moved"] / copy_s / 1e9
            res["fraction_of_copy"] = res["gbps"] / res["copy_gbps"]
    except Skip as e:
        res.update(status="skipped", reason=str(e))
    except ImportError as e:  # code that imports lazily, on its first call, and cannot: not importable here
        res.update(status="skipped", reason=f"not importable when called: {type(e).__name__}: {e}")
    except NotImplementedError as e:  # the library says it does not provide this combination
        res.update(status="skipped", reason=f"not provided: {e}")
    except Exception as e:  # reported, never hidden: the table shows it and the JSON keeps the traceback
        res.update(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    return res
