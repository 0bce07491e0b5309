"""Attention control: identity, capture, TriAG grafting, re-weighting, token regions, delayed focus."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from ops.diffusion.attention import (AttentionController, Capture, ControlledProcessor, DelayedFocus, Graft,
                                     LayerInfo, Reweight, TokenRegions)
from ops.diffusion.blend import latent_mask
from ops.diffusion.branches import Branch, BranchRunner
from ops.diffusion.ddim import sample

torch.set_num_threads(1)
T = 500


@pytest.fixture(scope="module")
def cond(bb):
    with torch.no_grad():
        return bb.encode_prompt(["a photo of a scratch"])


def _z(seed):
    return torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def _box(y0, y1, x0, x1, size=128):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def _eps(bb, latents, branches, rules=(), mode="sequential", explicit=False):
    ctl = AttentionController(bb.unet, rules=rules, explicit=explicit)
    with ctl, torch.no_grad():
        out = BranchRunner(bb, mode=mode, controller=ctl)(latents, T, branches)
    return out, ctl


def _plain(bb, z, c):
    with torch.no_grad():
        return bb.unet(z, T, encoder_hidden_states=c).sample


def test_identity_processor_matches_default_and_restores(bb, cond):
    z = _z(0)
    before = dict(bb.unet.attn_processors)
    ref = _plain(bb, z, cond)
    out, _ = _eps(bb, {"x": z}, [Branch("x", cond)], explicit=True)
    torch.testing.assert_close(out["x"], ref, atol=1e-5, rtol=1e-5)
    with AttentionController(bb.unet) as ctl:
        assert all(isinstance(p, ControlledProcessor) for p in bb.unet.attn_processors.values())
        with pytest.raises(RuntimeError, match="already installed"):
            ctl.__enter__()
    assert all(bb.unet.attn_processors[k] is p for k, p in before.items())


def _grid(bb, layer):
    """The query grid of an attention layer, from the UNet's block structure (latent 32, one /2 per down block)."""
    n = len(bb.unet.config.block_out_channels)
    block, idx = layer.split(".")[0], int(layer.split(".")[1]) if not layer.startswith("mid") else n - 1
    level = idx if block == "down_blocks" else n - 1 if block.startswith("mid") else n - 1 - idx
    return bb.latent_size // 2 ** level


def test_tiny_has_attention_at_two_resolutions(bb):
    from ops.diffusion.tiny import TINY_ATTENTION_RESOLUTIONS

    grids = sorted({_grid(bb, k) for k in bb.unet.attn_processors}, reverse=True)
    assert grids == list(TINY_ATTENTION_RESOLUTIONS) and len(grids) >= 2


def test_capture_shapes_and_normalisation(bb, cond):
    rules = [Capture("cross"), Capture("self", resolutions=[16]), Capture("cross", tokens=[1, 5], layers=["up"], name="sub")]
    out, ctl = _eps(bb, {"x": _z(1)}, [Branch("x", cond)], rules)
    torch.testing.assert_close(out["x"], _plain(bb, _z(1), cond), atol=1e-5, rtol=1e-5)  # capture only observes
    cross = {k[3]: v for k, v in ctl.captured.items() if k[0] == "cross" and k[4] == ""}
    selfm = {k[3]: v for k, v in ctl.captured.items() if k[0] == "self"}
    cross_layers = [k for k, i in ctl.infos.items() if i.kind == "cross"]
    assert sorted(cross) == sorted(cross_layers)  # every cross layer, at every resolution
    assert sorted(selfm) == sorted(k for k, i in ctl.infos.items() if i.kind == "self" and _grid(bb, k) == 16)
    for layer, m in cross.items():
        r = _grid(bb, layer)
        assert ctl.layer_hw[layer] == (r, r) and m.shape == (1, r, r, 77)
        torch.testing.assert_close(m.sum(-1), torch.ones(1, r, r), atol=1e-5, rtol=0)
    for m in selfm.values():
        assert m.shape == (1, 256, 256)
        torch.testing.assert_close(m.sum(-1), torch.ones(1, 256), atol=1e-5, rtol=0)
    assert ctl.maps("self", "x", 16).shape == (1, 256, 256)
    for r in (16, 8):  # maps() averages only the layers at the asked resolution
        at_r = [cross[k] for k in cross if _grid(bb, k) == r]
        assert at_r and ctl.maps("cross", "x", r).shape == (1, r, r, 77)
        torch.testing.assert_close(ctl.maps("cross", "x", r), torch.stack(at_r).mean(0))
    with pytest.raises(ValueError, match="pass a resolution"):
        ctl.maps("cross", "x")  # 16x16 and 8x8 maps cannot be averaged together
    sub = {k[3]: v for k, v in ctl.captured.items() if k[0] == "cross" and k[4] == "sub"}
    assert sorted(sub) == sorted(k for k in cross if k.startswith("up"))  # the up-block layers of both grids
    for layer, m in sub.items():
        torch.testing.assert_close(m, cross[layer][..., [1, 5]])
    assert {_grid(bb, k) for k in sub} == {16, 8}
    with pytest.raises(KeyError, match="no captured"):
        ctl.maps("cross", "other-branch")


def _three(cond):
    return [Branch("ref", cond, "ref"), Branch("nrm", cond, "nrm"), Branch("tgt", cond, "tgt")]


def test_graft_with_empty_target_mask_is_the_plain_target(bb, cond):
    lat = {"ref": _z(2), "nrm": _z(3), "tgt": _z(4)}
    empty, ref_mask = _box(0, 0, 0, 0), _box(20, 80, 20, 80)
    own = Graft("tgt", "ref", empty, ref_mask)
    for mode in ("sequential", "batched"):
        out, _ = _eps(bb, lat, _three(cond), [own], mode=mode)
        torch.testing.assert_close(out["tgt"], _plain(bb, lat["tgt"], cond), atol=1e-5, rtol=1e-5)
    same = dict(lat, nrm=lat["tgt"])  # normal K/V outside M_T == the target's own when the latents agree
    out, _ = _eps(bb, same, _three(cond), [Graft("tgt", "ref", empty, ref_mask, normal="nrm")])
    torch.testing.assert_close(out["tgt"], _plain(bb, lat["tgt"], cond), atol=1e-5, rtol=1e-5)
    grafted, _ = _eps(bb, lat, _three(cond), [Graft("tgt", "ref", _box(30, 90, 30, 90), ref_mask, normal="nrm")])
    assert (grafted["tgt"] - _plain(bb, lat["tgt"], cond)).abs().max() > 1e-3
    torch.testing.assert_close(grafted["ref"], _plain(bb, lat["ref"], cond), atol=1e-5, rtol=1e-5)


def _attn_layer():
    torch.manual_seed(0)
    return Attention(query_dim=8, heads=2, dim_head=4).eval()


def _softmax_attn(attn, q_in, kv_in, key_ok=None):
    q = attn.to_q(q_in).view(1, -1, 2, 4).transpose(1, 2)
    k = attn.to_k(kv_in).view(1, -1, 2, 4).transpose(1, 2)
    v = attn.to_v(kv_in).view(1, -1, 2, 4).transpose(1, 2)
    s = q @ k.transpose(-1, -2) * attn.scale
    if key_ok is not None:
        s = s.masked_fill(~key_ok, float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(1, -1, 8)
    return attn.to_out[0](o)


def test_graft_math_on_one_layer():
    """TriAG on a lone self-attention layer (4x4 grid): fg = softmax over reference keys inside M_R, bg = normal
    K/V, stitched by M_T; reference content outside M_R cannot leak in."""
    attn = _attn_layer()
    g = torch.Generator().manual_seed(1)
    ref, nrm, tgt = (torch.randn(1, 16, 8, generator=g) for _ in range(3))
    m_t, m_r = _box(0, 2, 0, 2, size=4), _box(2, 4, 1, 4, size=4)
    ctl = AttentionController(torch.nn.Module(), rules=[Graft("tgt", "ref", m_t, m_r, normal="nrm")])
    proc = ControlledProcessor(ctl, LayerInfo("a", "up", "self"), original=None)
    ctl.begin_call([("ref", 1), ("nrm", 1), ("tgt", 1)], (4, 4))
    with torch.no_grad():
        out = proc(attn, torch.cat([ref, nrm, tgt]))[2:]
        fg = _softmax_attn(attn, tgt, ref, torch.from_numpy(m_r.reshape(1, 1, 1, 16)))
        bg = _softmax_attn(attn, tgt, nrm)
        inside = torch.from_numpy(m_t.reshape(1, 16, 1))
        torch.testing.assert_close(out, torch.where(inside, fg, bg), atol=1e-6, rtol=1e-5)
        ref2 = ref.clone()
        ref2[:, ~torch.from_numpy(m_r.reshape(16))] += 5.0  # change the reference outside M_R only
        out2 = proc(attn, torch.cat([ref2, nrm, tgt]))[2:]
        torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-5)


def test_reweight_factor_one_is_neutral_and_two_is_not(bb, cond):
    z, m = _z(5), _box(32, 96, 32, 96)
    plain = _plain(bb, z, cond)
    for kind, extra in (("cross", {"tokens": [5]}), ("self", {"key_mask": m})):
        one, _ = _eps(bb, {"x": z}, [Branch("x", cond)], [Reweight(1.0, kind=kind, query_mask=m, **extra)])
        torch.testing.assert_close(one["x"], plain, atol=1e-5, rtol=1e-5)
        two, _ = _eps(bb, {"x": z}, [Branch("x", cond)], [Reweight(2.0, kind=kind, query_mask=m, **extra)])
        assert (two["x"] - plain).abs().max() > 1e-3
    off, _ = _eps(bb, {"x": z}, [Branch("x", cond)], [Reweight(2.0, tokens=[5], steps=[3])])  # not this step
    torch.testing.assert_close(off["x"], plain, atol=1e-5, rtol=1e-5)


def test_reweight_scales_only_masked_rows_and_chosen_tokens(bb, cond):
    m = _box(0, 64, 0, 128)  # top half of the image
    _, ctl = _eps(bb, {"x": _z(6)}, [Branch("x", cond)],
                  [Reweight(3.0, tokens=[5], query_mask=m, layers=["down"]), Capture("cross", layers=["down"])])
    _, base = _eps(bb, {"x": _z(6)}, [Branch("x", cond)], [Capture("cross", layers=["down"])])
    a, b = ctl.maps("cross", "x", 16), base.maps("cross", "x", 16)
    torch.testing.assert_close(a[:, :8, :, 5], 3 * b[:, :8, :, 5], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a[:, 8:], b[:, 8:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a[:, :8, :, :5], b[:, :8, :, :5], atol=1e-6, rtol=1e-5)


def test_token_regions_restrict_softmax_per_region(bb, cond):
    m = _box(0, 128, 0, 64)  # left half: defect tokens; right half: background tokens
    rules = [TokenRegions([(m, [0, 5]), (None, [0, 1, 2, 3])]), Capture("cross")]
    out, ctl = _eps(bb, {"x": _z(7)}, [Branch("x", cond)], rules)
    a = ctl.maps("cross", "x", 16)
    left, right = a[:, :, :8], a[:, :, 8:]
    torch.testing.assert_close(left[..., [0, 5]].sum(-1), torch.ones(1, 16, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(right[..., :4].sum(-1), torch.ones(1, 16, 8), atol=1e-5, rtol=0)
    assert left[..., 1:5].abs().max() == 0 and right[..., 4:].abs().max() == 0
    assert (out["x"] - _plain(bb, _z(7), cond)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="at least one token"):
        AttentionController(bb.unet, rules=[TokenRegions([(m, [])])])


def test_delayed_focus_switches_on_after_the_threshold(bb, cond):
    m = _box(32, 96, 32, 96)
    for thr, expect_on in ((-1.0, True), (1.01, False)):
        ctl = AttentionController(bb.unet)
        dfs = ctl.add(DelayedFocus(mask=m, token=5, branch="x", threshold=thr))
        ctl.add(Reweight(2.0, tokens=[5], query_mask=m, steps=dfs))
        with ctl:
            sample(bb, _z(8), [Branch("x", cond)], num_steps=3, runner=BranchRunner(bb, controller=ctl))
        assert len(dfs.history) == (1 if expect_on else 2)  # step 0 has no previous map; latched once on
        assert (dfs.on_since == 1) if expect_on else dfs.on_since is None
        assert all(0.0 <= a <= 1.0 for a in dfs.history)


# ------------------------------------------------------------------ several attention resolutions

def _cover(lo, hi, r, size=512):
    """Fraction of each of the r cells of [0, size) that [lo, hi) covers."""
    c = size / r
    edges = np.arange(r) * c
    return np.clip(np.minimum(edges + c, hi) - np.maximum(edges, lo), 0, None) / c


def test_grid_and_mask_at_on_every_sd_resolution():
    """SD's 64x64 latent has attention at 64/32/16/8: each query count maps to its grid, and a pixel mask lands on
    each grid by the majority rule (a cell is in when the mask covers at least half of it)."""
    ctl = AttentionController(torch.nn.Module())
    ctl.begin_call([("x", 2)], (64, 64))
    m = _box(100, 400, 40, 300, size=512)  # edges inside cells at every grid
    per_sample = np.stack([m, np.zeros_like(m)])
    for r in (64, 32, 16, 8):
        assert ctl.grid(r * r) == (r, r)
        got = ctl.mask_at(m, r, r, 2, torch.device("cpu")).reshape(r, r)
        expect = torch.from_numpy(np.outer(_cover(100, 400, r), _cover(40, 300, r)) >= 0.5)
        assert torch.equal(got, expect), r
        both = ctl.mask_at(per_sample, r, r, 2, torch.device("cpu"))
        assert both.shape == (2, r * r) and torch.equal(both[0].reshape(r, r), expect) and not both[1].any()
    with pytest.raises(RuntimeError, match="cannot map"):
        ctl.grid(100)
    with pytest.raises(ValueError, match="2 samples but the branch has 3"):
        ctl.mask_at(per_sample, 8, 8, 3, torch.device("cpu"))


def test_reweight_on_the_8x8_layers_only(bb, cond):
    """A rule restricted to resolution 8 scales the masked rows there and leaves the 16x16 layers untouched."""
    m = _box(0, 64, 0, 128)  # top half: rows 0..3 of the 8x8 grid
    first8 = next(k for k in bb.unet.attn_processors if _grid(bb, k) == 8 and k.endswith("attn2.processor"))
    _, ctl = _eps(bb, {"x": _z(6)}, [Branch("x", cond)],
                  [Reweight(3.0, tokens=[5], query_mask=m, resolutions=[8]), Capture("cross")])
    _, base = _eps(bb, {"x": _z(6)}, [Branch("x", cond)], [Capture("cross")])
    a, b = ctl.captured[("cross", "x", 0, first8, "")], base.captured[("cross", "x", 0, first8, "")]
    assert a.shape == (1, 8, 8, 77)
    torch.testing.assert_close(a[:, :4, :, 5], 3 * b[:, :4, :, 5], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a[:, 4:], b[:, 4:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a[:, :4, :, :5], b[:, :4, :, :5], atol=1e-6, rtol=1e-5)
    down16 = next(k for k in bb.unet.attn_processors if k.startswith("down") and _grid(bb, k) == 16
                  and k.endswith("attn2.processor"))  # runs before every 8x8 layer: exactly unchanged
    assert torch.equal(ctl.captured[("cross", "x", 0, down16, "")], base.captured[("cross", "x", 0, down16, "")])


def test_captured_token_map_refines_the_target_at_16_and_at_8(bb, cond):
    """Capture -> eq. 13 at both resolutions: token regions pin token 5's attention to a known region (1 inside,
    0 outside, on each layer's grid), so its captured map at 16 and at 8 IS that region, and eq. 13 on a larger
    target mask gives the region back at pixel level from either map."""
    from ops.masks.refine import attention_mask

    region = _box(32, 96, 48, 112)  # aligned to 16 px cells = 8x8 cells of the 128 px image
    target = _box(16, 112, 16, 128)
    rules = [TokenRegions([(region, [5]), (None, [0, 1, 2])]), Capture("cross", tokens=[5])]
    _, ctl = _eps(bb, {"x": _z(9)}, [Branch("x", cond)], rules)
    for r in (16, 8):
        a = ctl.maps("cross", "x", r)[0, ..., 0]
        expect = latent_mask(region, (r, r), rule="majority")[0, 0].float()
        torch.testing.assert_close(a, expect, atol=1e-6, rtol=0)
        refined = attention_mask(a.numpy(), target)
        # bilinear upsampling rounds the box's corners off (product of two edge ramps < 1/2): 97.7 % of it at 8, 99.4 % at 16
        assert not (refined & ~region).any() and refined.sum() > 0.97 * region.sum(), r
        assert not attention_mask(a.numpy(), _box(0, 0, 0, 0)).any()  # eq. 13 keeps only what m' allows


def test_a_batch_that_does_not_match_the_announced_layout_raises(bb, cond):
    ctl = AttentionController(bb.unet, rules=[Capture("cross", branches=["tgt"])])
    z = torch.cat([_z(1), _z(2)])
    with ctl, torch.no_grad():
        ctl.begin_call([("ref", 1), ("tgt", 2)], (32, 32))  # announces 3 samples, the call holds 2
        with pytest.raises(ValueError, match="announced branch layout"):
            bb.unet(z, T, encoder_hidden_states=cond.expand(2, -1, -1))
    assert not ctl.captured  # nothing was recorded under a wrong branch name
