"""Issue 13 items outside the logits-level ops (those are in test_contract_sweep.py):
3 (nothing written before an error: blend_ with an overlapping ref, RefModelUpdater.load_state_dict
with a corrupt counter), 5 (blend_ where p − r overflows fp32), 6 (logit_scale finite and > 0
everywhere), 7 (data files: invalid UTF-8, lone surrogates, a BOM). Each test failed on the code
before issue 13 (run once against c4ef412).
"""
from __future__ import annotations

import gzip
import hashlib
import json

import pytest
import torch

import fasttrdpo
from fasttrdpo.data import MalformedRowError, load_preference_dataset
from fasttrdpo.loss import TRDPOLoss
from helpers import (SUBNORMAL_SPACING, UNIT_ROUNDOFF, assert_close_tol, backend_device, blend_tolerance, cpp_loadable,
                     ref_blend64)

BLEND_BACKENDS = ["eager", "triton"] + (["cpp"] if cpp_loadable() else [])


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Item 3: validate everything, then write.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BLEND_BACKENDS)
def test_blend_rejects_overlapping_ref_before_writing(backend):
    """Before: pair 0 was blended, then torch raised a RuntimeError on the expanded ref (all backends)."""
    device = backend_device(backend)
    first = torch.zeros(4, device=device)
    overlapping = torch.zeros(1, 4, device=device).expand(3, 4)
    with pytest.raises(ValueError, match=r"ref_tensors\[1\].*overlaps itself"):
        fasttrdpo.blend_(ref_tensors=[first, overlapping], alpha=0.5, backend=backend,
                         policy_tensors=[torch.ones(4, device=device), torch.ones(3, 4, device=device)])
    assert bool((first == 0).all()), "pair 0 was written before the error"
    assert bool((overlapping == 0).all())


@pytest.mark.parametrize("field,value", [("num_updates", "x"), ("last_update_step", "x"), ("num_updates", -1),
                                         ("tau", 2.5), ("alpha", "0.6"), ("num_updates", True)])
def test_load_state_dict_validates_before_touching_the_reference(field, value):
    """Before: new reference weights were copied in, then int("x") raised."""
    torch.manual_seed(0)
    policy, ref = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    upd = fasttrdpo.RefModelUpdater(policy=policy, ref=ref, alpha=0.6, tau=2)
    state = upd.state_dict()
    state["ref"] = {k: torch.full_like(v, 7.0) for k, v in state["ref"].items()}  # new weights, not aliases
    state[field] = value
    before = {k: _digest(v) for k, v in ref.state_dict().items()}
    with pytest.raises(ValueError, match=field):
        upd.load_state_dict(state)
    assert {k: _digest(v) for k, v in ref.state_dict().items()} == before, "the reference was written"
    assert (upd.num_updates, upd.last_update_step) == (0, None)
    state[field] = {"num_updates": 3, "last_update_step": 4, "tau": 2, "alpha": 0.6}[field]
    upd.load_state_dict(state)  # the same state with a sound field loads, weights included
    assert (upd.num_updates, upd.last_update_step) == (state["num_updates"], state["last_update_step"])
    assert all(bool((v == 7.0).all()) for v in ref.state_dict().values())


# ---------------------------------------------------------------------------------------------------
# Item 5: where p − r overflows fp32, α·p + (1 − α)·r (one exception to the single formula).
# ---------------------------------------------------------------------------------------------------

OVERFLOW_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("alpha", [0.3, 0.6])
@pytest.mark.parametrize("ref_dtype,policy_dtype", OVERFLOW_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BLEND_BACKENDS)
def test_blend_where_difference_overflows(backend, ref_dtype, policy_dtype, alpha):
    """ref = 3e38, policy = −3e38, α = 0.6 gave −inf from finite inputs (p − r = −6e38 overflows).
    Now those elements are α·p + (1 − α)·r; the others keep r + α·(p − r). 5000 elements: full
    vector steps / kernel blocks and a tail, overflow elements in both.
    Bound for the exception (fp32, u = 2^-24): α and 1 − α rounded (≤ u each), two products and a sum
    (one rounding each): |s − exact| ≤ 4u·(|α·p| + |(1 − α)·r|), then one rounding into the ref dtype
    (≤ u_ref·(|exact| + that) + its subnormal spacing)."""
    n = 5000
    g = torch.Generator().manual_seed(13)
    ref = torch.randn(n, generator=g, dtype=torch.float64)
    pol = torch.randn(n, generator=g, dtype=torch.float64)
    hot = torch.tensor([0, 1, 17, 40, 2047, 4095, 4096, 4999])  # vector lanes, block edges, the tail
    ref[hot], pol[hot] = 3e38, -3e38
    ref[hot[::2]], pol[hot[::2]] = -3.1e38, 2.9e38
    r, p = ref.to(ref_dtype), pol.to(policy_dtype)
    r64, p64 = r.double(), p.double()
    device = backend_device(backend)
    out = r.clone().to(device)
    fasttrdpo.blend_(ref_tensors=[out], policy_tensors=[p.to(device)], alpha=alpha, backend=backend)
    out = out.cpu()
    assert bool(torch.isfinite(out).all()), f"{backend}: non-finite result from finite inputs"
    overflow = (p64 - r64).abs() > torch.finfo(torch.float32).max
    assert bool(overflow[hot].all()) and int(overflow.sum()) == len(hot)
    alt = alpha * p64 + (1 - alpha) * r64
    u, u_ref = UNIT_ROUNDOFF[torch.float32], UNIT_ROUNDOFF[ref_dtype]
    alt_err = 4 * u * ((alpha * p64).abs() + ((1 - alpha) * r64).abs())
    alt_tol = alt_err + u_ref * (alt.abs() + alt_err) + SUBNORMAL_SPACING[ref_dtype]
    expected = torch.where(overflow, alt, ref_blend64(r, p, alpha))
    tol = torch.where(overflow, alt_tol, blend_tolerance(r, p, alpha))
    assert_close_tol(out, expected, tol, f"{backend} {ref_dtype}/{policy_dtype} alpha={alpha}")


# ---------------------------------------------------------------------------------------------------
# Item 6: logit_scale must be finite and > 0, for every op and TRDPOLoss, on every backend.
# ---------------------------------------------------------------------------------------------------

BAD_SCALES = [-1.0, 0.0, float("inf"), float("nan")]


@pytest.mark.parametrize("scale", BAD_SCALES)
@pytest.mark.parametrize("backend", ["eager", "triton", "auto"])
def test_trdpo_loss_rejects_bad_logit_scale_at_construction(backend, scale):
    """Before: TRDPOLoss(logit_scale=-1.0) ran on eager and raised only at forward on triton."""
    with pytest.raises(ValueError, match="logit_scale"):
        TRDPOLoss(logit_scale=scale, backend=backend)


@pytest.mark.parametrize("scale", BAD_SCALES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_linear_ops_reject_bad_logit_scale(backend, scale):
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, -100])
    with pytest.raises(ValueError, match="logit_scale"):
        fasttrdpo.linear_token_logprobs(h, w, labels, logit_scale=scale, backend=backend)
    with pytest.raises(ValueError, match="logit_scale"):
        fasttrdpo.paired_linear_token_logprobs(h, w, h, w, labels, logit_scale=scale, backend=backend)


# ---------------------------------------------------------------------------------------------------
# Item 7: data files with bad Unicode fail (or skip) one row, with its index; a BOM is a BOM.
# ---------------------------------------------------------------------------------------------------

def _row(i: int) -> bytes:
    return json.dumps({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}).encode()


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_jsonl_bad_unicode_rows_are_reported_by_index(tmp_path, gz):
    """Row 1 holds an invalid UTF-8 byte, row 2 a lone surrogate escape. Before: the whole file
    failed with a bare UnicodeDecodeError (row 1), or inside pyarrow (row 2)."""
    bad_utf8 = b'{"prompt": "p1", "chosen": "c\xff1", "rejected": "r1"}'
    surrogate = b'{"prompt": "p2", "chosen": "c\\ud800", "rejected": "r2"}'
    body = b"\n".join([_row(0), bad_utf8, surrogate, _row(3)]) + b"\n"
    path = tmp_path / ("d.jsonl.gz" if gz else "d.jsonl")
    path.write_bytes(gzip.compress(body) if gz else body)
    with pytest.raises(MalformedRowError, match=r"row 1: invalid UTF-8 \(byte 0xff") as info:
        load_preference_dataset(str(path))
    assert info.value.row_index == 1
    ds, skipped = load_preference_dataset(str(path), skip_malformed=True, return_skipped=True)
    assert skipped == [1, 2] and ds["chosen"] == ["c0", "c3"]
    only_surrogate = tmp_path / "s.jsonl"
    only_surrogate.write_bytes(b"\n".join([_row(0), surrogate]))
    with pytest.raises(MalformedRowError, match=r"row 1: text is not valid Unicode") as info:
        load_preference_dataset(str(only_surrogate))
    assert info.value.row_index == 1


def test_json_list_bad_unicode_rows_are_reported_by_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[' + _row(0) + b', {"prompt": "p", "chosen": "\xc3", "rejected": "r"}, ' + _row(2) + b']')
    with pytest.raises(MalformedRowError, match=r"row 1: text is not valid Unicode") as info:
        load_preference_dataset(str(path))
    assert info.value.row_index == 1
    ds, skipped = load_preference_dataset(str(path), skip_malformed=True, return_skipped=True)
    assert skipped == [1] and ds["prompt"] == ["p0", "p2"]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_utf8_bom_is_read_as_a_bom(tmp_path, name):
    """Before: the BOM made row 0 "invalid JSON" and --skip-malformed dropped it."""
    path = tmp_path / name
    body = b"\n".join([_row(0), _row(1)]) if name.endswith("l") else b"[" + _row(0) + b"," + _row(1) + b"]"
    path.write_bytes(b"\xef\xbb\xbf" + body)
    ds, skipped = load_preference_dataset(str(path), skip_malformed=True, return_skipped=True)
    assert skipped == [] and ds["prompt"] == ["p0", "p1"]


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """A JSON string may hold a raw U+2028 / U+0085; str.splitlines() cut the row there before."""
    path = tmp_path / "d.jsonl"
    row = json.dumps({"prompt": "a\u2028b\x85c", "chosen": "c", "rejected": "r"}, ensure_ascii=False)
    path.write_text(row + "\n" + row + "\n", encoding="utf-8")
    ds = load_preference_dataset(str(path))
    assert ds["prompt"] == ["a\u2028b\x85c"] * 2
