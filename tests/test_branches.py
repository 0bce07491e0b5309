"""Branches as one batched UNet call or sequential calls: same results, with attention control and adapters."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ops.diffusion.attention import AttentionController, Capture, Graft, Reweight
from ops.diffusion.backbone import build_backbone
from ops.diffusion.branches import Branch, BranchRunner, adapters_disabled, lora_scale, resolve_mode
from ops.diffusion.ddim import linear_guidance, sample

torch.set_num_threads(1)
T = 400


@pytest.fixture(scope="module")
def conds(bb):
    with torch.no_grad():
        return bb.encode_prompt(["a photo of a scratch"]), bb.null_embedding()


def _z(seed, n=1):
    return torch.randn(n, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def _box(y0, y1, x0, x1):
    m = np.zeros((128, 128), bool)
    m[y0:y1, x0:x1] = True
    return m


def _rules():
    m_t, m_r = _box(30, 90, 40, 100), _box(10, 60, 10, 60)
    return [Graft("tgt", "ref", m_t, m_r, normal="nrm"), Reweight(2.0, kind="self", query_mask=m_t, key_mask=m_t, branches=["tgt"]),
            Reweight(1.5, tokens=[5], query_mask=m_t, branches=["tgt"]), Capture("cross"), Capture("self")]


def test_auto_mode_is_batched_as_measured(bb):
    assert resolve_mode("auto", torch.device("cpu")) == "batched" == BranchRunner(bb).mode
    assert resolve_mode("auto", torch.device("cuda")) == "batched"
    assert resolve_mode("sequential", torch.device("cpu")) == "sequential"
    with pytest.raises(ValueError, match="unknown branch mode"):
        resolve_mode("parallel")


def test_batched_equals_sequential_three_branches(bb, conds):
    c, u = conds
    lat = {"ref": _z(1), "nrm": _z(2), "tgt": _z(3, n=2)}  # a branch may hold several samples
    branches = [Branch("tgt", c, "tgt"), Branch("nrm", u, "nrm"), Branch("ref", c, "ref")]  # targets listed first
    results, calls, maps = {}, {}, {}
    for mode in ("batched", "sequential"):
        ctl = AttentionController(bb.unet, rules=_rules())
        runner = BranchRunner(bb, mode=mode, controller=ctl)
        with ctl, torch.no_grad():
            results[mode] = runner(lat, T, branches)
        calls[mode] = runner.calls
        maps[mode] = ctl.captured
    assert calls == {"batched": 1, "sequential": 3}
    assert list(results["batched"]) == ["tgt", "nrm", "ref"]
    for name in ("ref", "nrm", "tgt"):
        torch.testing.assert_close(results["batched"][name], results["sequential"][name], atol=1e-5, rtol=1e-5)
    assert maps["batched"].keys() == maps["sequential"].keys() and len(maps["batched"]) == 3 * len(bb.unet.attn_processors)
    for k, v in maps["batched"].items():
        torch.testing.assert_close(v, maps["sequential"][k], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the untouched source branch is exactly what a plain call gives
        plain_nrm = bb.unet(lat["nrm"], T, encoder_hidden_states=u).sample
    torch.testing.assert_close(results["sequential"]["nrm"], plain_nrm, atol=1e-5, rtol=1e-5)


def test_batched_and_sequential_sampling_agree(bb, conds):
    c, _ = conds
    lat = {"ref": _z(4), "nrm": _z(5), "tgt": _z(6)}
    branches = [Branch(n, c, n) for n in ("ref", "nrm", "tgt")]
    guide = lambda eps, state: dict(eps)  # noqa: E731 - each stream follows its own branch
    out = {}
    for mode in ("batched", "sequential"):
        ctl = AttentionController(bb.unet, rules=_rules()[:2])
        with ctl:
            out[mode] = sample(bb, lat, branches, guide, num_steps=4, runner=BranchRunner(bb, mode, ctl))
    for k in lat:
        torch.testing.assert_close(out["batched"][k], out["sequential"][k], atol=1e-4, rtol=1e-4)


def test_adapter_states_per_branch(conds):
    from peft import LoraConfig

    c, u = conds
    base = build_backbone("tiny", "cpu")  # private copy: LoRA layers must not leak into the shared backbone
    lora = build_backbone("tiny", "cpu")
    torch.manual_seed(0)
    lora.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    z = _z(7)
    with torch.no_grad():
        eps_base_c = base.unet(z, T, encoder_hidden_states=c).sample
        eps_base_u = base.unet(z, T, encoder_hidden_states=u).sample
    branches = [Branch("ref_u", u, adapter="off"), Branch("ref_c", c, adapter="off"),
                Branch("theta_c", c), Branch("half_c", c, adapter="half"), Branch("zero_c", c, adapter="zero")]
    adapters = {"off": adapters_disabled(), "half": lora_scale(0.5), "zero": lora_scale(0.0)}
    out = {}
    for mode in ("batched", "sequential"):
        runner = BranchRunner(lora, mode=mode, adapters=adapters)
        with torch.no_grad():
            out[mode] = runner({"x": z}, T, branches)
        assert runner.calls == (4 if mode == "batched" else 5)  # one call per adapter state when batched
    for mode in out:
        e = out[mode]
        torch.testing.assert_close(e["ref_u"], eps_base_u, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e["ref_c"], eps_base_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e["zero_c"], eps_base_c, atol=1e-5, rtol=1e-5)
        d_full = (e["theta_c"] - eps_base_c).abs().max()
        assert d_full > 1e-3 and 0 < (e["half_c"] - eps_base_c).abs().max() < d_full
        for k in e:
            torch.testing.assert_close(e[k], out["sequential"][k], atol=1e-5, rtol=1e-5)
    # APO's hierarchical guidance as a linear combination of these branches, adapters still on afterwards
    g = linear_guidance("ref_u", [(3.0, "ref_c", "ref_u"), (2.0, "theta_c", "ref_c")])(out["batched"], None)["x"]
    e = out["batched"]
    torch.testing.assert_close(g, e["ref_u"] + 3 * (e["ref_c"] - e["ref_u"]) + 2 * (e["theta_c"] - e["ref_c"]))
    with torch.no_grad():
        torch.testing.assert_close(lora.unet(z, T, encoder_hidden_states=c).sample, e["theta_c"], atol=1e-5, rtol=1e-5)


def test_runner_errors(bb, conds):
    c, _ = conds
    runner = BranchRunner(bb)
    with pytest.raises(KeyError, match="adapter 'lora'"):
        runner({"x": _z(0)}, T, [Branch("a", c, adapter="lora")])
    with pytest.raises(ValueError, match="unique"):
        runner({"x": _z(0)}, T, [Branch("a", c), Branch("a", c)])
    with pytest.raises(KeyError, match=r"latent streams \['y'\]"):
        runner({"x": _z(0)}, T, [Branch("a", c, latent="y")])
    ctl = AttentionController(bb.unet, rules=[Graft("tgt", "ref", _box(0, 8, 0, 8), _box(0, 8, 0, 8))])
    with ctl, pytest.raises(RuntimeError, match="must run before"):
        ctl.set_step(0)
        BranchRunner(bb, "sequential", ctl)({"x": _z(0)}, T, [Branch("tgt", c)])
