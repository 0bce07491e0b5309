"""AnoGen: mask-guided embedding (loss, gradient, only one row, diffusers file), box-blended sampling, stage wiring."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from ops.diffusion import textual_inversion as ti
from ops.diffusion.backbone import load_backbone
from ops.methods.anogen import AnoGen, AnoGenConfig
from ops.methods.anogen.embedding import (FitSettings, fit_token, load_token, masked_loss, placeholder,
                                          support_tensors)
from ops.methods.anogen.sampling import generate, job_noise
from ops.types import Sample

torch.set_num_threads(1)


def _image(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _support(n: int = 2) -> list[Sample]:
    out = []
    for i in range(n):
        mask = np.zeros((64, 64), dtype=bool)
        mask[8 + 4 * i:24 + 4 * i, 30:50] = True  # top-right region: latent cells well away from the left half
        out.append(Sample(f"s{i}", "brick", "crack", _image(i), mask))
    return out


@pytest.fixture(scope="module")
def private():
    """A private tiny backbone: these tests add tokens to its tokenizer."""
    return load_backbone("tiny", device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="module")
def fitted(private, tmp_path_factory):
    bb = private
    before = bb.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    init = bb.text_encoder.get_input_embeddings().weight[bb.tokenizer("defect", add_special_tokens=False).input_ids[0]]
    settings = FitSettings(steps=3, lr=5e-2, seed=0, ckpt_every=0)
    out = tmp_path_factory.mktemp("anogen") / "crack"
    res = fit_token(bb, "brick", "crack", _support(), settings, out)
    return dict(bb=bb, before=before, unet_before=unet_before, init=init.detach().clone(), res=res, dir=out,
                settings=settings)


def test_masked_loss_with_full_mask_equals_plain_textual_inversion_loss(bb):
    latents, masks = support_tensors(bb, _support())
    full = torch.ones_like(masks)
    prompt = "a photo of a brick with a defect"
    with torch.no_grad():
        masked = masked_loss(bb, latents, full, prompt, 3, torch.Generator().manual_seed(5))
        plain = masked_loss(bb, latents, None, prompt, 3, torch.Generator().manual_seed(5))
        partial = masked_loss(bb, latents, masks, prompt, 3, torch.Generator().manual_seed(5))
    assert masked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert abs(partial.item() - plain.item()) > 1e-4  # the real masks do weight the loss


class _LeakyUNet(nn.Module):
    """The real UNet, plus a term that depends strongly on the text embedding at latent cells OUTSIDE the mask (a
    fixed projection of the states: their plain mean is nearly constant after CLIP's final LayerNorm)."""

    def __init__(self, unet: nn.Module, outside: torch.Tensor):
        super().__init__()
        self.unet, self.outside = unet, outside

    def forward(self, x, t, encoder_hidden_states):
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
        w = torch.randn(encoder_hidden_states.shape[-1], generator=torch.Generator().manual_seed(0))
        leak = 100.0 * (encoder_hidden_states @ w).mean(1).view(-1, 1, 1, 1) * self.outside
        return type("Out", (), {"sample": out + leak})


def test_prediction_outside_the_mask_gives_the_embedding_no_gradient(private):
    bb = private
    latents, masks = support_tensors(bb, _support(1))
    inv = ti.add_placeholder_tokens(bb.tokenizer, bb.text_encoder, ["<grad-test>"], "defect")
    prompt = "a photo of a brick with a <grad-test>"
    try:
        grads = []
        for unet in (bb.unet, _LeakyUNet(bb.unet, 1.0 - masks[:1])):
            inv.embeddings.grad = None
            loss = masked_loss(dataclasses.replace(bb, unet=unet), latents, masks, prompt, 1,
                               torch.Generator().manual_seed(3))
            loss.backward()
            grads.append(inv.embeddings.grad.clone())
        assert grads[0].abs().sum() > 0
        assert torch.equal(grads[0], grads[1])
        # without the mask the same leak does reach the embedding (the test can see a gradient from outside)
        inv.embeddings.grad = None
        masked_loss(dataclasses.replace(bb, unet=_LeakyUNet(bb.unet, 1.0 - masks[:1])), latents, None, prompt, 1,
                    torch.Generator().manual_seed(3)).backward()
        assert (inv.embeddings.grad - grads[0]).abs().max() > 10 * grads[0].abs().max()
    finally:
        inv.detach()


def _support_loss(bb, vec: torch.Tensor) -> float:
    """L'_LDM on the support at 32 fixed draws of (anomaly, t, noise), the placeholder's row set to ``vec``."""
    latents, masks = support_tensors(bb, _support())
    inv = ti.add_placeholder_tokens(bb.tokenizer, bb.text_encoder, ["<eval-row>"], "defect")
    try:
        with torch.no_grad():
            inv.embeddings.copy_(vec[None])
            return float(masked_loss(bb, latents, masks, "<eval-row>", 32, torch.Generator().manual_seed(99)))
    finally:
        inv.detach()


def test_fit_changes_only_the_new_embedding_row(fitted):
    bb, res = fitted["bb"], fitted["res"]
    weight = bb.text_encoder.get_input_embeddings().weight
    n = fitted["before"].shape[0]
    assert torch.equal(weight[:n], fitted["before"])  # every existing row bit-identical
    for k, v in bb.unet.state_dict().items():
        assert torch.equal(v, fitted["unet_before"][k]), k
    token, vec = ti.read_learned_embeds(fitted["dir"] / res.info["file"])
    assert token == placeholder("brick", "crack") == res.info["token"]
    assert vec.shape == (bb.text_encoder.config.hidden_size,)  # one row of the text width
    # three steps lower L'_LDM on the support (fixed draws, not the training ones) below the "defect" start
    assert _support_loss(bb, vec) < _support_loss(bb, fitted["init"]) - 1e-3
    assert res.info["prompt"] == token and len(res.info["losses"]) == 3


def test_saved_embedding_loads_with_load_textual_inversion_and_reproduces_training_output(fitted):
    fresh = load_backbone("tiny", device="cpu", dtype="float32", cache=False)
    pipe = fresh.to_pipeline()
    pipe.load_textual_inversion(str(fitted["dir"] / fitted["res"].info["file"]))
    with torch.no_grad():
        out = fresh.encode_prompt([fitted["res"].info["prompt"]])
    assert torch.allclose(out, fitted["res"].cond, atol=1e-6, rtol=0)
    other = load_backbone("tiny", device="cpu", dtype="float32", cache=False)
    load_token(other, fitted["dir"], fitted["res"].info)  # our own loader (synthesis) gives the same states
    with torch.no_grad():
        assert torch.allclose(other.encode_prompt([fitted["res"].info["prompt"]]), out, atol=1e-6, rtol=0)


def test_fit_resumes_an_interrupted_run_to_the_same_embedding(private, tmp_path):
    settings = FitSettings(steps=4, lr=5e-2, seed=1, ckpt_every=2)
    full = fit_token(private, "brick", "scratch", _support(), settings, tmp_path / "full")

    def stop_at_3(_desc, done, _total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_token(private, "brick", "scratch", _support(), settings, tmp_path / "cut", progress=stop_at_3)
    assert not (tmp_path / "cut" / "token.json").exists()
    resumed = fit_token(private, "brick", "scratch", _support(), settings, tmp_path / "cut")
    assert resumed.info["resumed_from"] == 2
    a = ti.read_learned_embeds(tmp_path / "full" / full.info["file"])[1]
    b = ti.read_learned_embeds(tmp_path / "cut" / resumed.info["file"])[1]
    assert torch.equal(a, b)
    again = fit_token(private, "brick", "scratch", _support(), settings, tmp_path / "cut")
    assert again.skipped  # a finished fit is reused


def test_outside_the_box_every_step_is_the_q_sampled_normal_and_the_image_is_the_normal(bb):
    normals = [_image(10), _image(11)]
    boxes = [np.zeros((64, 64), dtype=bool) for _ in normals]
    boxes[0][10:30, 20:44] = True
    boxes[1][33:60, 3:21] = True
    seeds = [123, 456]
    seen = []

    def record(state):
        seen.append((state.level_to, state.latents["x"].clone()))

    with torch.no_grad():
        cond = bb.encode_prompt(["a photo of a brick with a defect"])
        gen = generate(bb, cond, bb.null_embedding(), normals, boxes, seeds, steps=4, guidance=3.0,
                       callbacks=[record])
    outside = ~gen.latent_box.expand_as(gen.z0)
    assert 0 < int(outside.sum()) < outside.numel()
    # z_t^n is the q-sample of the normal latent with the job's own seeded noise (not an inversion)
    from ops.diffusion.vae import encode

    z0n = encode(bb, np.stack(normals)).float()
    eps = torch.cat([job_noise(s, tuple(z0n.shape[1:]))[1] for s in seeds])
    for level in (1, 4):
        a = float(gen.normal.grid.alphas[level])
        assert torch.allclose(gen.normal[level], a ** 0.5 * z0n + (1 - a) ** 0.5 * eps, atol=1e-6)
    assert len(seen) == 4
    for level, z in seen:
        assert torch.equal(z[outside], gen.normal[level][outside]), level
    assert torch.equal(gen.z0[outside], z0n[outside])
    for img, normal, box, dec in zip(gen.images, normals, boxes, gen.decoded):
        assert np.array_equal(img[~box], normal[~box])  # exactly the normal image outside the box
        assert np.array_equal(img[box], dec[box])  # the generated content inside it
        assert (img[box] != normal[box]).any()


def test_each_job_is_determined_by_its_seed(bb):
    normal = _image(3)
    box = np.zeros((64, 64), dtype=bool)
    box[16:40, 16:40] = True
    with torch.no_grad():
        cond = bb.encode_prompt(["a photo of a brick with a defect"])
        a = generate(bb, cond, None, [normal, normal], [box, box], [7, 8], steps=2, guidance=1.0).images
        b = generate(bb, cond, None, [normal], [box], [8], steps=2, guidance=1.0).images
    assert not np.array_equal(a[0], a[1])
    assert np.abs(a[1].astype(int) - b[0].astype(int)).max() <= 1  # batch-independent up to float rounding


def test_config_presets_and_bad_options():
    assert AnoGenConfig.from_dict({"preset": "paper"}).train_steps == 6000
    assert AnoGenConfig.from_dict({"preset": "paper"}).lr == 5e-3
    assert AnoGenConfig.from_dict({"preset": "paper"}).guidance == 10.0
    assert AnoGenConfig.from_dict({"preset": "paper", "lr": 1e-3}).lr == 1e-3
    with pytest.raises(ValueError, match="box_size"):
        AnoGenConfig.from_dict({"box_size": [0.5, 0.2]})
    with pytest.raises(ValueError, match="token"):
        AnoGenConfig.from_dict({"prompt": "a photo of a {category}"})
    m = AnoGen()
    cfg = AnoGenConfig.from_dict({"box_sizes": {"grass": [0.2, 0.4]}})
    assert m.target_mode == "box"
    assert m.target_options(cfg, "grass")["box_size"] == (0.2, 0.4)
    assert m.target_options(cfg, "brick") == {"box_size": (0.1, 0.15), "min_inside": 0.75}


def test_partition_uses_box_targets_and_keeps_the_normal_outside(tmp_path, demo_split, bb):
    from ops.generation import fit_adapter, synthesize_partition
    from ops.samples import read_mask, read_rgb
    from ops.storage import Storage

    storage = Storage(tmp_path)
    cfg = {"train_steps": 1, "steps": 2}
    adapters = fit_adapter(storage, "brick", "anogen", demo_split, bb, cfg)
    meta = json.loads(adapters["meta_json"].iloc[0])
    assert set(meta["defect_types"]) == set(demo_split[demo_split["role"] == "support"]["defect_type"])
    df = synthesize_partition(storage, "brick", "anogen", demo_split, adapters, bb, 3, 0, cfg,
                              target_mode="affine")  # the pipeline's mode; AnoGen overrides it with boxes
    assert len(df) == 3
    for row in df.itertuples():
        target = json.loads(row.target_params_json)
        assert target["mode"] == "box" and target["inside_fraction"] >= 0.75
        mask = read_mask(storage.path(row.mask_path))
        y0, x0, h, w = target["box"]
        assert mask.sum() == h * w and mask[y0:y0 + h, x0:x0 + w].all()
        image = read_rgb(storage.path(row.image_path))
        normal = read_rgb(f"{row.normal_dataset_root}/{row.normal_path}")
        assert np.array_equal(image[~mask], normal[~mask])
