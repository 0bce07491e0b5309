"""LoRA via peft (init, save/load through diffusers, disable, per-sample scale) and TACA's per-sample rank gate."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from ops.diffusion import lora, taca, training
from ops.diffusion.backbone import load_backbone

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bb():
    return load_backbone("tiny", device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="module")
def batch(bb):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        cond = bb.encode_prompt(["a photo of a bottle", "a scratch on metal"])
    return x, torch.tensor([20, 870]), cond


def _run(unet, batch):
    x, t, cond = batch
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


def _trained_lora(bb, batch, rank=4, alpha=8.0, steps=3):
    unet = copy.deepcopy(bb.unet)
    params = lora.add_lora(unet, rank=rank, alpha=alpha, seed=1)
    x, _, cond = batch
    training.train(params, lambda s, rng: training.denoising_loss(unet, bb.scheduler, x, cond, rng),
                   steps=steps, lr=5e-2, seed=0, frozen_modules=[unet])
    return unet, params


def test_fresh_lora_has_zero_B_and_leaves_the_output_bit_identical(bb, batch):
    unet = copy.deepcopy(bb.unet)
    base = _run(unet, batch)
    params = lora.add_lora(unet, rank=4, alpha=4)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(names) == len(params)
    assert {n.split(".")[-4] for n in names if "lora_A" in n} >= {"to_q", "to_k", "to_v"}
    assert any(".to_out.0.lora_A" in n for n in names)
    lora_b = [p for n, p in unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    assert torch.equal(_run(unet, batch), base)


def test_trained_lora_saved_and_loaded_into_a_fresh_pipeline_reproduces_the_output(bb, batch, tmp_path):
    unet, _ = _trained_lora(bb, batch, rank=4, alpha=8.0)  # alpha != rank: the scale must survive the file
    trained = _run(unet, batch)
    assert (trained - _run(bb.unet, batch)).abs().max() > 1e-3  # training moved the output
    path = lora.save_lora(unet, tmp_path / "adapter")
    assert path.name == lora.LORA_WEIGHT_NAME and not list(path.parent.glob(".lora-*"))

    fresh = load_backbone("tiny", device="cpu", dtype="float32", cache=False)
    pipe = fresh.to_pipeline()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    torch.testing.assert_close(_run(pipe.unet, batch), trained, rtol=0, atol=1e-6)

    bare = copy.deepcopy(bb.unet)
    lora.load_lora(bare, path)
    torch.testing.assert_close(_run(bare, batch), trained, rtol=0, atol=1e-6)
    # TACA gates work on a loaded adapter exactly as on the trained one
    with taca.taca_context(unet, batch[1], 1, 4, 1000):
        gated = _run(unet, batch)
    with taca.taca_context(bare, batch[1], 1, 4, 1000):
        torch.testing.assert_close(_run(bare, batch), gated, rtol=0, atol=1e-6)


def test_load_lora_names_a_missing_file(bb, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        lora.load_lora(copy.deepcopy(bb.unet), tmp_path / "nothing.safetensors")


def test_lora_disabled_gives_the_base_output_and_restores_state(bb, batch):
    base = _run(bb.unet, batch)
    unet, params = _trained_lora(bb, batch)
    adapted = _run(unet, batch)
    with lora.lora_disabled(unet):
        assert torch.equal(_run(unet, batch), base)
        assert not any(p.requires_grad for p in params)
    assert all(p.requires_grad for p in params)
    assert torch.equal(_run(unet, batch), adapted)


def test_per_sample_scale_mixes_reference_and_adapted_branches_in_one_call(bb, batch):
    base = _run(bb.unet, batch)
    unet, _ = _trained_lora(bb, batch)
    adapted = _run(unet, batch)
    with lora.lora_gates(unet, scale=[0.0, 1.0]):
        mixed = _run(unet, batch)
    torch.testing.assert_close(mixed[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], adapted[1], rtol=0, atol=1e-6)
    with lora.lora_gates(unet, scale=[0.5, 0.5]):
        half = _run(unet, batch)
    assert (half - base).abs().max() > 1e-4 and (half - adapted).abs().max() > 1e-4
    assert torch.equal(_run(unet, batch), adapted)  # hooks gone after the block
    x, t, cond = batch
    with lora.lora_gates(unet, scale=[1.0, 1.0, 1.0]), pytest.raises(ValueError, match="batch of 3"):
        unet(x, t, encoder_hidden_states=cond)


def test_active_rank_follows_the_formula():
    T = 1000
    assert taca.active_rank(torch.tensor([0, T // 2, T]), 1, 8, T).tolist() == [8, 4, 1]  # floor(1 + 7/2) = 4
    assert taca.active_rank(torch.tensor([0, T // 2, T]), 2, 6, T).tolist() == [6, 4, 2]
    t = torch.arange(0, T + 1)
    expected = [int(2 + (16 - 2) * (T - s) // T) for s in range(T + 1)]
    assert taca.active_rank(t, 2, 16, T).tolist() == expected
    assert taca.active_rank(torch.tensor([999.0]), 1, 4, T).tolist() == [1]
    with pytest.raises(ValueError, match="timesteps"):
        taca.active_rank(torch.tensor([T + 1]), 1, 4, T)
    with pytest.raises(ValueError, match="k_min"):
        taca.active_rank(torch.tensor([0]), 5, 4, T)


def _lora_grads(unet, batch, k_min, k_max, sample, gated=True):
    """Per-rank-dimension gradient magnitude (A rows + B columns, summed over layers) of one sample's loss."""
    unet.zero_grad(set_to_none=True)
    x, t, cond = batch
    ctx = taca.taca_context(unet, t, k_min, k_max, 1000) if gated else lora.lora_gates(unet, scale=[1.0, 1.0])
    with ctx:
        out = unet(x, t, encoder_hidden_states=cond).sample
        out[sample].pow(2).mean().backward()
    total = 0
    for name, p in unet.named_parameters():
        if "lora_A" in name:
            total = total + p.grad.abs().sum(1)
        elif "lora_B" in name:
            total = total + p.grad.abs().sum(0)
    return total


def test_taca_gives_zero_gradient_above_k_of_t_per_sample(bb, batch):
    unet = copy.deepcopy(bb.unet)
    params = lora.add_lora(unet, rank=6, seed=3)
    with torch.no_grad():  # nonzero B so that A receives gradient too
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    t = batch[1]
    k = taca.active_rank(t, 1, 5, 1000).tolist()
    assert k == [4, 1]  # t=20 -> floor(1 + 4*0.98) = 4; t=870 -> floor(1 + 4*0.13) = 1
    for sample in (0, 1):
        g = _lora_grads(unet, batch, 1, 5, sample)
        assert (g[: k[sample]] > 0).all(), (sample, g)
        assert torch.count_nonzero(g[k[sample]:]) == 0, (sample, g)
    ungated = _lora_grads(unet, batch, 1, 5, 1, gated=False)
    assert (ungated > 0).all()  # without the gate every dimension learns: the check above can fail
    assert all(p.requires_grad for p in params)
    with pytest.raises(ValueError, match="exceeds the LoRA rank"):
        with taca.taca_context(unet, t, 1, 7, 1000):
            pass


def test_the_wider_layer_set_adapts_convolutions_and_still_gates_and_round_trips(bb, batch, tmp_path):
    """"attention+conv+ff": LoRA on the ResNet convolutions, the transformer projections and feed-forward layers
    too; per-sample gates (the reference / adapted branches and TACA's rank) act on the conv LoRA's channel
    dimension, and the file loads back into a fresh pipeline."""
    base = _run(bb.unet, batch)
    unet = copy.deepcopy(bb.unet)
    params = lora.add_lora(unet, rank=4, target_modules=lora.lora_targets("attention+conv+ff"), seed=1)
    adapted_layers = {n.rsplit(".lora_A", 1)[0].split(".")[-1] for n, _ in unet.named_parameters() if ".lora_A" in n}
    assert {"conv1", "conv2", "to_q", "proj_in", "proj_out", "2"} <= adapted_layers  # "2": ff.net.2
    x, _, cond = batch
    training.train(params, lambda s, rng: training.denoising_loss(unet, bb.scheduler, x, cond, rng),
                   steps=3, lr=5e-2, seed=0, frozen_modules=[unet])
    adapted = _run(unet, batch)
    with lora.lora_gates(unet, scale=[0.0, 1.0]):
        mixed = _run(unet, batch)
    torch.testing.assert_close(mixed[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], adapted[1], rtol=0, atol=1e-6)
    with lora.lora_disabled(unet):
        conv_only = _run(unet, batch)
    assert torch.equal(conv_only, base)
    path = lora.save_lora(unet, tmp_path / "wide")
    fresh = load_backbone("tiny", device="cpu", dtype="float32", cache=False).to_pipeline()
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)
    torch.testing.assert_close(_run(fresh.unet, batch), adapted, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown LoRA layer set 'conv'"):
        lora.lora_targets("conv")


@pytest.mark.parametrize("layers", ["attention", "attention+conv+ff"])
def test_removing_the_last_adapter_gives_back_the_plain_unet(bb, batch, layers):
    """A shared backbone after a method's LoRA: SD's state-dict keys and outputs again, so the next method can copy
    its blocks (CADiff's ControlNetModel.from_unet) and add its own adapter."""
    from diffusers import ControlNetModel

    unet = copy.deepcopy(bb.unet)
    keys, base = sorted(unet.state_dict()), _run(unet, batch)
    lora.add_lora(unet, rank=2, target_modules=lora.lora_targets(layers), adapter_name="first")
    lora.remove_lora(unet, "first")
    assert sorted(unet.state_dict()) == keys
    assert torch.equal(_run(unet, batch), base)
    ControlNetModel.from_unet(unet, conditioning_channels=1)
    assert lora.add_lora(unet, rank=2, adapter_name="second")
