"""The GPU fast-path switches, tested device-independently on the tiny backbone (CPU).

Each switch must change what it claims (layout, grad mode, precision, kernel choice) and nothing else.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ops.diffusion import vae
from ops.diffusion.attention import AttentionController, Capture, Graft, TokenRegions
from ops.diffusion.backbone import load_backbone
from ops.diffusion.branches import Branch, BranchRunner
from ops.diffusion.ddim import sample
from ops.diffusion.fastpath import FastPath, apply_fast_path, fp32_unet
from ops.diffusion.inversion import invert

torch.set_num_threads(1)
T = 500


def _z(seed, n=1):
    return torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def _box(y0, y1, x0, x1, size=128):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture(scope="module")
def cond(bb):
    with torch.no_grad():
        return bb.encode_prompt(["a photo of a scratch"])


def test_defaults_change_nothing(bb):
    assert bb.fast is None  # a loaded backbone has every switch off until apply_fast_path
    assert FastPath() == FastPath(channels_last=False, inference_mode=False, compile=False, vae_slicing=False,
                                  vae_tiling=False, fp32_inversion=False)


def test_channels_last_and_vae_slicing_keep_results(bb, cond):
    fastbb = apply_fast_path(load_backbone("tiny", device="cpu", cache=False),
                             FastPath(channels_last=True, vae_slicing=True, vae_tiling=True))
    conv_w = fastbb.unet.conv_in.weight
    assert conv_w.is_contiguous(memory_format=torch.channels_last) and not conv_w.is_contiguous()
    assert fastbb.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert fastbb.vae.use_slicing and fastbb.vae.use_tiling
    z = _z(0, 3)
    with torch.no_grad():
        ref = bb.unet(z, T, encoder_hidden_states=cond.expand(3, -1, -1)).sample
        out = fastbb.unet(z, T, encoder_hidden_states=cond.expand(3, -1, -1)).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # slicing decodes one image at a time; tiling is inactive at the VAE's own 128 px: the same pixels up to
    # the uint8 rounding of NHWC convolution's float differences
    diff = vae.decode(fastbb, z, batch_size=3).astype(int) - vae.decode(bb, z, batch_size=3).astype(int)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 1e-3


def test_inference_mode_switch(bb, cond):
    fastbb = load_backbone("tiny", device="cpu", cache=False)
    plain = sample(fastbb, _z(1), [Branch("x", cond)], num_steps=3)["x"]
    assert not plain.is_inference()
    apply_fast_path(fastbb, FastPath(inference_mode=True))
    fast = sample(fastbb, _z(1), [Branch("x", cond)], num_steps=3)["x"]
    assert fast.is_inference()
    torch.testing.assert_close(fast, plain, atol=0, rtol=0)
    assert invert(fastbb, _z(2), cond, num_steps=2).zT.is_inference()


def test_fp32_inversion_runs_half_weights_in_float32_and_restores_them(cond):
    half = load_backbone("tiny", device="cpu", dtype="bfloat16", cache=False)
    # the same bf16-rounded weights held in float32: what an fp32 inversion of the half model must compute
    ref = load_backbone("tiny", device="cpu", cache=False)
    ref.unet.load_state_dict({k: v.float() for k, v in half.unet.state_dict().items()})
    z0, c = _z(3), cond
    want = invert(ref, z0, c, num_steps=3).zT
    low = invert(half, z0, c, num_steps=3).zT
    apply_fast_path(half, FastPath(fp32_inversion=True))
    before = {n: (p.data_ptr(), p.dtype) for n, p in half.unet.named_parameters()}
    lora_like = torch.nn.Parameter(torch.ones(3))  # a float32 tensor beside bf16 weights keeps its dtype
    half.unet.register_parameter("extra_fp32", lora_like)
    with fp32_unet(half):
        assert half.dtype == torch.float32 and half.unet.conv_in.weight.dtype == torch.float32
    assert half.dtype == torch.bfloat16 and lora_like.dtype == torch.float32
    del half.unet.extra_fp32
    assert {n: (p.data_ptr(), p.dtype) for n, p in half.unet.named_parameters()} == before
    got = invert(half, z0, c, num_steps=3).zT
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (low - want).abs().max() > 1e-3  # bf16 arithmetic really differs: the switch is what closes the gap


def test_compile_flag_compiles_the_unet_in_place(monkeypatch):
    # torch.compile itself is not run here (importing dynamo costs tens of seconds on this CPU); the switch must
    # compile the UNet module in place with the chosen backend/mode, and nothing when off
    bb2 = load_backbone("tiny", device="cpu", cache=False)
    unet, seen = bb2.unet, []
    monkeypatch.setattr(unet, "compile", lambda **kw: seen.append(kw), raising=False)
    apply_fast_path(bb2, FastPath())
    assert seen == []
    apply_fast_path(bb2, FastPath(compile=True, compile_backend="eager", compile_mode="reduce-overhead"))
    assert bb2.unet is unet and seen == [{"backend": "eager", "mode": "reduce-overhead"}]


def _count_paths(monkeypatch):
    calls = {"sdpa": 0, "explicit": 0}
    sdpa = F.scaled_dot_product_attention

    def spy_sdpa(*a, **kw):
        calls["sdpa"] += 1
        return sdpa(*a, **kw)

    orig_rows = AttentionController.chunk_rows

    def spy_rows(self, *a):
        calls["explicit"] += 1
        return orig_rows(self, *a)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(AttentionController, "chunk_rows", spy_rows)
    return calls


@pytest.mark.parametrize("rules, captures, grafts", [
    ([], False, False),
    # TriAG: the target's self layers attend twice (reference K/V inside M_T, normal/own K/V outside), fused
    ([Graft("tgt", "ref", _box(30, 90, 30, 90), _box(20, 80, 20, 80))], False, True),
    ([TokenRegions([(_box(0, 64, 0, 128), [1, 2]), (None, [0, 3])])], False, False),
    ([Capture("cross", branches=["tgt"])], True, False),  # only the capturing branch's cross layers go explicit
])
def test_sdpa_wherever_no_scores_are_needed(bb, cond, monkeypatch, rules, captures, grafts):
    calls = _count_paths(monkeypatch)
    ctl = AttentionController(bb.unet, rules=rules)
    lat = {"ref": _z(4), "tgt": _z(5)}
    with ctl, torch.no_grad():
        BranchRunner(bb, mode="sequential", controller=ctl)(lat, T, [Branch("ref", cond, "ref"),
                                                                       Branch("tgt", cond, "tgt")])
    n_blocks = sum(1 for n, _ in bb.unet.named_modules() if n.endswith("attn1"))  # one self + one cross each
    explicit = n_blocks if captures else 0
    assert calls["explicit"] == explicit
    # two branches x (self + cross) layer calls, all on the fused kernel except the explicit ones
    assert calls["sdpa"] == 2 * 2 * n_blocks - explicit + (n_blocks if grafts else 0)
