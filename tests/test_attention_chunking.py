"""Query chunking of the attention controller's explicit path (issue 15): chunked == unchunked, chunks are real.

Every rule is run once with ``query_chunk=None`` (whole score matrices) and with ragged chunks (37 rows: the
last chunk of a 16x16 or 8x8 layer is shorter), on the tiny backbone; outputs and captured maps must agree to float
rounding of the row-sliced matmuls.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ops.diffusion.attention import (AttentionController, Capture, ControlledProcessor, Graft, Reweight,
                                     TokenRegions)
from ops.diffusion.blend import latent_mask
from ops.diffusion.branches import Branch, BranchRunner

torch.set_num_threads(1)
T = 500
CHUNK = 37


@pytest.fixture(scope="module")
def cond(bb):
    with torch.no_grad():
        return bb.encode_prompt(["a photo of a scratch on metal"])


def _z(seed, n=1):
    return torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def _box(y0, y1, x0, x1, size=128):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def _run(bb, latents, branches, rules, query_chunk, chunk_bytes=None):
    ctl = AttentionController(bb.unet, rules=rules, query_chunk=query_chunk, chunk_bytes=chunk_bytes)
    with ctl, torch.no_grad():
        out = BranchRunner(bb, mode="batched", controller=ctl)(latents, T, branches)
    return out, ctl.captured


@pytest.fixture()
def row_log(monkeypatch):
    """Query rows seen by each explicit softmax (recorded through _reweight, which every rule set below uses)."""
    seen: list[int] = []
    orig = ControlledProcessor._reweight

    def spy(self, r, info, probs, n, dev, *a, **kw):
        seen.append(probs.shape[-2])
        return orig(self, r, info, probs, n, dev, *a, **kw)

    monkeypatch.setattr(ControlledProcessor, "_reweight", spy)
    return seen


def _assert_same(a, b):
    out_a, cap_a = a
    out_b, cap_b = b
    assert out_a.keys() == out_b.keys() and cap_a.keys() == cap_b.keys() and cap_a
    for k in out_a:
        torch.testing.assert_close(out_a[k], out_b[k], atol=2e-6, rtol=1e-5)
    for k in cap_a:
        torch.testing.assert_close(cap_a[k], cap_b[k], atol=1e-7, rtol=1e-5)


def _rules_reweight(cond_tokens=(4, 5)):
    q = np.stack([_box(20, 70, 10, 90), _box(60, 120, 40, 100)])  # per-sample query masks (batch of 2)
    return [Reweight(2.5, kind="cross", tokens=list(cond_tokens), query_mask=q),
            Reweight(1.7, kind="self", query_mask=q, key_mask=_box(0, 64, 0, 128), renormalize=True),
            Capture("cross"), Capture("self", name="s")]


def test_reweight_and_capture_chunked_equal_unchunked(bb, cond, row_log):
    lat, br = {"x": _z(0, 2)}, [Branch("x", cond)]
    full = _run(bb, lat, br, _rules_reweight(), None)
    assert set(row_log) == {256, 64}  # unchunked: whole 16x16 and 8x8 layers
    row_log.clear()
    chunked = _run(bb, lat, br, _rules_reweight(), CHUNK)
    assert set(row_log) == {CHUNK, 256 - 6 * CHUNK, 64 - CHUNK}  # ragged last chunks at 16x16 and 8x8
    _assert_same(full, chunked)
    # the re-weighting acted (otherwise equality would prove little)
    plain = _run(bb, lat, br, [Capture("cross")], None)[0]
    assert (plain["x"] - full[0]["x"]).abs().max() > 1e-4


def test_graft_and_dae_chunked_equal_unchunked(bb, cond, row_log):
    lat = {"ref": _z(1), "nrm": _z(2), "tgt": _z(3, 2)}
    branches = [Branch("ref", cond, "ref"), Branch("nrm", cond, "nrm"), Branch("tgt", cond, "tgt")]
    m_t = np.stack([_box(30, 90, 30, 90), _box(10, 50, 60, 120)])

    def rules():
        return [Graft("tgt", "ref", m_t, _box(20, 80, 20, 80), normal="nrm"),
                Reweight(2.0, kind="self", query_mask=m_t, branches=["tgt"]),
                Reweight(3.0, kind="cross", tokens=[5], query_mask=m_t, branches=["tgt"]),
                Capture("self", branches=["tgt"]), Capture("cross", branches=["tgt"], tokens=[5])]

    full = _run(bb, lat, branches, rules(), None)
    row_log.clear()
    chunked = _run(bb, lat, branches, rules(), CHUNK)
    assert max(row_log) == CHUNK
    _assert_same(full, chunked)
    # the captured self maps are the stitched ones: rows inside M_T put no mass on reference keys outside M_R
    seen = set()
    for (kind, branch, *_), p in chunked[1].items():
        if kind == "self":
            r = int(round(p.shape[-1] ** 0.5))  # the layer's grid: 16 or 8
            seen.add(r)
            rows = latent_mask(torch.as_tensor(m_t), (r, r), rule="majority").flatten(1)  # (2, r*r)
            keys = latent_mask(torch.as_tensor(_box(20, 80, 20, 80)), (r, r), rule="majority").flatten()
            inside = p[rows]  # (rows in M_T, r*r keys)
            assert inside[:, ~keys].abs().max() == 0 and inside[:, keys].sum(-1).min() > 0.5
            assert p[~rows][:, ~keys].sum() > 0  # rows outside M_T attend to the normal branch's keys
    assert seen == {16, 8}


def test_token_regions_chunked_equal_unchunked(bb, cond):
    lat, br = {"x": _z(4)}, [Branch("x", cond)]

    def rules():
        return [TokenRegions([(_box(0, 64, 0, 128), [1, 2, 3]), (None, [0, 4, 5, 6])]), Capture("cross")]

    full = _run(bb, lat, br, rules(), None)
    chunked = _run(bb, lat, br, rules(), CHUNK)
    _assert_same(full, chunked)
    cross = next(v for k, v in full[1].items() if k[0] == "cross")
    assert cross[0, :8, :, 4:].sum() == 0  # top half only attends to tokens 1-3: the region rule is in force


def test_auto_chunks_by_score_bytes(bb, cond, row_log):
    ctl = AttentionController(bb.unet)
    assert ctl.chunk_rows(3, 8, 256, 256) == 256  # tiny: 6 MiB of scores, never chunked by default
    assert ctl.chunk_rows(8, 8, 4096, 4096) == 256  # SD 64x64 self-attention, 8 samples: 4 GiB -> 16 chunks
    assert ctl.chunk_rows(1, 1, 10, 10) == 10
    assert AttentionController(bb.unet, query_chunk=None).chunk_rows(8, 8, 4096, 4096) == 4096
    assert AttentionController(bb.unet, chunk_bytes=1).chunk_rows(2, 8, 256, 77) == 1
    with pytest.raises(ValueError, match="query_chunk"):
        AttentionController(bb.unet, query_chunk=0)
    # "auto" under a 64 KiB budget chunks the real run: self rows 2 samples x 8 heads x 256 keys x 4 B = 16 KiB
    # -> 4 rows per chunk; cross rows 2 x 8 x 77 x 4 B -> 13 rows per chunk (last one 256 - 19 x 13 = 9); at 8x8
    # self rows of 64 keys -> 16 rows per chunk (4 whole chunks), cross -> 13 rows (last one 64 - 4 x 13 = 12)
    lat, br = {"x": _z(0, 2)}, [Branch("x", cond)]
    full = _run(bb, lat, br, _rules_reweight(), None)
    row_log.clear()
    auto = _run(bb, lat, br, _rules_reweight(), "auto", chunk_bytes=64 * 2**10)
    assert set(row_log) == {4, 13, 9, 16, 12}
    _assert_same(full, auto)


def test_env_sets_the_budget(bb, monkeypatch):
    monkeypatch.setenv("ANOMALY_FORGE_ATTN_CHUNK_MB", "0.5")
    assert AttentionController(bb.unet).chunk_bytes == 2**19
