"""forge-base: the shipped weights load like a real SD folder, match their record, and the trainer resumes exactly."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ops import forge_base
from ops.forge_base.train import META_FILE, BaseTrainConfig, train_base


@pytest.fixture(scope="module")
def fb():
    from ops.diffusion.backbone import load_backbone

    return load_backbone("forge-base", device="cpu")


def test_forge_base_loads_through_the_local_folder_path(monkeypatch):
    import ops.diffusion.backbone as backbone

    seen = []
    real = backbone._load_components
    monkeypatch.setattr(backbone, "_load_components", lambda src: seen.append(src) or real(src))
    bb = backbone.load_backbone("forge-base", device="cpu", cache=False)
    assert seen == [str(forge_base.model_dir())]  # the same code path a user's SD folder takes
    assert bb.model_id == "forge-base" and bb.resolution == 128 and bb.latent_size == 32
    assert bb.dtype == torch.float32  # fp16 on disk, fp32 on the CPU


def test_forge_base_loads_with_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(forge_base.model_dir()), safety_checker=None,
                                                   requires_safety_checker=False)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert pipe.tokenizer("a photo of a brick").input_ids[0] == 49406  # CLIP's start token
    assert pipe.vae.config.scaling_factor == pytest.approx(forge_base.recorded()["scaling_factor"], rel=1e-6)


def test_forge_base_has_self_and_cross_attention_at_three_resolutions(fb):
    tokens = {"attn1": set(), "attn2": set()}
    hooks = [module.register_forward_pre_hook(lambda _m, args, kind=name.rsplit(".", 1)[-1]:
                                              tokens[kind].add(args[0].shape[1]))
             for name, module in fb.unet.named_modules() if name.endswith((".attn1", ".attn2"))]
    try:
        with torch.no_grad():
            fb.unet(torch.zeros(1, 4, 32, 32), 500, encoder_hidden_states=fb.encode_prompt("a photo of a brick"))
    finally:
        for h in hooks:
            h.remove()
    assert tokens["attn1"] == tokens["attn2"] == {32 * 32, 16 * 16, 8 * 8}


def test_forge_base_files_match_their_recorded_sha256():
    record = forge_base.recorded()
    assert record["files"], "the record lists no files"
    assert forge_base.verify() == []
    assert "train-base" in record["command"]


def test_forge_base_generation_round_trips_better_than_tiny(fb, bb):
    """A short generation decodes images the VAE reproduces; the untrained tiny's decodes it cannot."""
    from ops.diffusion.ddim import cfg_branches, sample
    from ops.diffusion.vae import decode, encode

    def round_trip_psnr(model):
        g = torch.Generator().manual_seed(0)
        zT = torch.randn((2, 4, model.latent_size, model.latent_size), generator=g)
        cond = model.encode_prompt("a photo of a brick").expand(2, -1, -1)
        branches, guidance = cfg_branches(cond, model.null_embedding().expand(2, -1, -1), 3.0)
        images = decode(model, sample(model, zT, branches, guidance, num_steps=8)["x"])
        again = decode(model, encode(model, images))
        mse = np.mean((images.astype(np.float64) - again.astype(np.float64)) ** 2)
        return 10 * np.log10(255.0 ** 2 / mse)

    assert round_trip_psnr(fb) > round_trip_psnr(bb) + 3.0


TINY_RUN = BaseTrainConfig(pool_size=6, vae_steps=3, vae_batch=2, vae_crop=32, unet_steps=3, unet_batch=2,
                           warmup=1, ckpt_every=1, dtype="float32")


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".train" not in p.parts}


def test_train_base_resumes_to_the_same_files_after_an_interruption(tmp_path, monkeypatch):
    import ops.diffusion.training as training

    whole = train_base(tmp_path / "whole", TINY_RUN, command="anomaly-forge train-base (test)")

    calls = {"n": 0}
    real = training.denoising_loss

    def interrupted(*a, **kw):  # dies in the middle of the UNet stage, after the VAE stage finished
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(training, "denoising_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_base(tmp_path / "resumed", TINY_RUN, command="anomaly-forge train-base (test)")
    assert not (tmp_path / "resumed" / META_FILE).exists()  # nothing claims to be finished
    monkeypatch.setattr(training, "denoising_loss", real)
    resumed = train_base(tmp_path / "resumed", TINY_RUN, command="anomaly-forge train-base (test)")
    assert _digests(resumed) == _digests(whole)
    assert forge_base.verify(resumed) == []


def test_train_base_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="vae_crop"):
        train_base(tmp_path, BaseTrainConfig(vae_crop=30))


def test_demo_test_images_come_only_from_columns_forge_base_never_trains_on(tmp_path, monkeypatch):
    """Demo test/ crops are cut from the held-out columns; forge-base's copies of the demo photos stop before them."""
    import skimage.data

    import ops.demo_data as demo_data
    from ops.forge_base.data import DEMO_PHOTOS, _load_photo
    from ops.samples import read_rgb

    for name in DEMO_PHOTOS:
        width = getattr(skimage.data, name)().shape[1]
        train_cols, heldout_cols = demo_data.column_range(width, False), demo_data.column_range(width, True)
        assert train_cols[1] <= heldout_cols[0] and _load_photo(name).shape[1] == train_cols[1]
    photo = np.zeros((512, 512, 3), np.float32)
    photo[:, demo_data.column_range(512, True)[0]:] = 1.0  # held-out columns white, the rest black
    monkeypatch.setattr(demo_data, "_photo", lambda _cat: photo)
    root = demo_data.build_demo_dataset(tmp_path, ["grass"], size=32)
    for path in sorted((root / "grass").rglob("*.png")):
        if "ground_truth" in path.parts:
            continue
        image = read_rgb(path)
        mask_path = root / "grass" / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        keep = ~read_rgb(mask_path)[..., 0].astype(bool) if mask_path.exists() else np.ones(image.shape[:2], bool)
        if path.parts[-3] == "test":
            assert image[keep].min() > 200, path
        else:
            assert image[keep].max() < 40, path


TINY_V2 = BaseTrainConfig.for_recipe("v2", pool_size=6, vae_steps=2, vae_batch=2, vae_crop=32, unet_crop_steps=2,
                                     unet_crop_batch=2, unet_steps=2, unet_batch=2, warmup=1, ckpt_every=1,
                                     dtype="float32")


def test_recipe_v2_resumes_in_its_crop_phase_to_the_same_files(tmp_path, monkeypatch):
    import ops.diffusion.training as training

    whole = train_base(tmp_path / "whole", TINY_V2, command="anomaly-forge train-base --recipe v2 (test)")
    assert sorted(p.name for p in (whole / ".train" / "unet").iterdir()) == ["crop", "full"]
    calls, real, shapes = {"n": 0}, training.denoising_loss, []

    def interrupted(unet, scheduler, latents, *a, **kw):  # dies at the crop phase's second step
        calls["n"] += 1
        shapes.append(tuple(latents.shape[-2:]))
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(unet, scheduler, latents, *a, **kw)

    monkeypatch.setattr(training, "denoising_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_base(tmp_path / "resumed", TINY_V2, command="anomaly-forge train-base --recipe v2 (test)")
    calls["n"] = -100
    shapes.clear()
    resumed = train_base(tmp_path / "resumed", TINY_V2, command="anomaly-forge train-base --recipe v2 (test)")
    # the resumed run performs only the remaining steps: one crop step on 16-cell windows, then the two full steps
    assert shapes == [(16, 16), (32, 32), (32, 32)]
    assert _digests(resumed) == _digests(whole)


def test_v2_demo_surfaces_come_only_from_the_train_columns(monkeypatch):
    """Both of v2's ways to a demo photograph (the demo's own crop and the wider random-tint crop) stay left."""
    import skimage.data

    import ops.demo_data as demo_data
    from ops.forge_base.data import DEMO_PHOTOS, Sampler

    photo = np.zeros((512, 512), np.uint8)
    photo[:, demo_data.column_range(512, True)[0]:] = 255  # held-out columns white
    for name in DEMO_PHOTOS:
        monkeypatch.setattr(skimage.data, name, lambda: photo)
    sampler = Sampler(64, seed=0, recipe="v2")
    demo_items = [it for it in (sampler.item(i) for i in range(80))
                  if it.caption.removeprefix("a photo of a ").split(" with")[0] in DEMO_PHOTOS and it.mark is None]
    assert len(demo_items) >= 8
    assert max(int(it.image.max()) for it in demo_items) < 40


def test_v1_recipe_and_defaults_are_the_shipped_weights_record():
    record = forge_base.recorded()
    cfg = BaseTrainConfig()
    assert cfg.recipe == "v1"
    for key, value in record["config"].items():
        assert getattr(cfg, key) == value, key  # the shipped weights are train-base's default arguments


def test_vae_loss_weighs_marked_pixels_and_edges():
    from ops.forge_base.train import vae_loss

    x = torch.zeros(1, 3, 16, 16)
    x[..., 8, :] = -1.0  # a thin dark line
    alpha = torch.zeros(1, 1, 16, 16)
    alpha[..., 8, :] = 1.0
    blurred = x.clone()
    blurred[..., 7:10, :] = -1.0 / 3  # the line smeared over three rows: same mean, lost edges
    shifted = x + 0.05  # a uniform error of the same order, no line lost
    plain = vae_loss(blurred, x, alpha, 0.0, 0.0) / vae_loss(shifted, x, alpha, 0.0, 0.0)
    weighted = vae_loss(blurred, x, alpha, 4.0, 0.0) / vae_loss(shifted, x, alpha, 4.0, 0.0)
    edged = vae_loss(blurred, x, alpha, 4.0, 1.0) / vae_loss(shifted, x, alpha, 4.0, 1.0)
    assert plain < weighted < edged  # each term makes losing the line cost more, relative to a harmless error


def test_latent_crops_cover_the_mark():
    from ops.forge_base.train import _crop_latents, mark_centres

    alphas = np.zeros((3, 128, 128), np.uint8)
    alphas[0, 100:110, 10:20] = 255  # latent cell (26, 3)
    alphas[1, 4:8, 120:126] = 255  # latent cell (1, 30)
    centres = mark_centres(alphas)
    assert centres.tolist() == [[26, 3], [1, 30], [-1, -1]]
    latents = torch.zeros(3, 4, 32, 32)
    for i, (y, x) in enumerate(centres.tolist()[:2]):
        latents[i, :, y, x] = 1.0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        crops = _crop_latents(latents, centres, 16, g)
        assert crops.shape == (3, 4, 16, 16) and crops[0].sum() == 4 and crops[1].sum() == 4
