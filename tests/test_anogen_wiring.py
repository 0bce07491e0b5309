"""AnoGen wired end to end through the method's own fit / synthesize on the tiny backbone: each support
anomaly's mask reaches L'_LDM, the token starts from "defect", synthesis reads the adapter FILE, classifier-free
guidance uses its scale, and the latents outside the box follow the noised normal from z_T to z_0."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save
from torch import nn

from ops.atomic import write_bytes_atomic
from ops.diffusion import textual_inversion as ti
from ops.diffusion.backbone import load_backbone
from ops.diffusion.ddim import ddim_grid
from ops.diffusion.vae import encode
from ops.methods.anogen import AnoGen, AnoGenConfig
from ops.methods.anogen import embedding as anogen_embedding
from ops.methods.anogen import sampling as anogen_sampling
from ops.methods.anogen.embedding import read_info
from ops.types import Sample, SynthesisJob

torch.set_num_threads(1)
SIZE = 64


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _support(defect_type: str) -> list[Sample]:
    """Three anomalies with different masks, all in the right half of the image (the left half is never masked)."""
    boxes = [_box(4, 20, 36, 60), _box(24, 44, 40, 52), _box(44, 60, 34, 62)]
    return [Sample(f"{defect_type}{i}", "brick", defect_type, _image(i), m) for i, m in enumerate(boxes)]


def _on_grid(mask: np.ndarray, size: int) -> torch.Tensor:
    """A latent cell is masked when any pixel of its block is (written out here, not the toolkit's pooling)."""
    f = SIZE // size
    return torch.from_numpy(mask.reshape(size, f, size, f).any(axis=(1, 3)))


def _cfg(**opts) -> AnoGenConfig:
    return AnoGenConfig.from_dict({"train_steps": 2, "lr": 5e-2, "steps": 3, **opts})


def _jobs(defect_type: str) -> list[SynthesisJob]:
    boxes = [_box(10, 30, 20, 44), _box(33, 60, 3, 21)]
    return [SynthesisJob(index=i, seed=100 + i, category="brick", defect_type=defect_type,
                         normal=Sample(f"n{i}", "brick", "good", _image(50 + i)), target_mask=b)
            for i, b in enumerate(boxes)]


def _file(adapter, defect_type: str):
    dt_dir = adapter.path / defect_type
    info = read_info(dt_dir)
    return dt_dir / info["file"], info


def _write_embedding(path, token: str, vec: torch.Tensor) -> None:
    write_bytes_atomic(path, save({token: vec.reshape(1, -1).float().contiguous()}, metadata={"format": "pt"}))


def _word_row(bb, word: str) -> torch.Tensor:
    (tid,) = bb.tokenizer(word, add_special_tokens=False).input_ids
    return bb.text_encoder.get_input_embeddings().weight[tid].detach().clone()


class _Steps:
    """Wraps the sampler AnoGen's generate calls and records every step, its callbacks (the blend) run first."""

    def __init__(self, monkeypatch):
        self.steps: list[dict] = []
        self.branches: list = []
        real = anogen_sampling.sample

        def spy(backbone, latents, branches, guidance=None, callbacks=(), **kw):
            self.branches.append(list(branches))
            return real(backbone, latents, branches, guidance, callbacks=[*callbacks, self._record], **kw)

        monkeypatch.setattr(anogen_sampling, "sample", spy)

    def _record(self, state) -> None:
        self.steps.append({"step": state.step, "t": state.t, "level_to": state.level_to,
                           "before": state.before["x"].clone(), "after": state.latents["x"].clone(),
                           "eps": state.eps["x"].clone()})


@pytest.fixture(scope="module")
def private():
    """A private tiny backbone: these tests add tokens to its tokenizer."""
    return load_backbone("tiny", device="cpu", dtype="float32", cache=False)


# ---------------------------------------------------------------------------------------------- L'_LDM's mask
def test_fit_hands_each_support_anomaly_its_own_mask_to_the_masked_loss(private, tmp_path, monkeypatch):
    calls = []
    real = anogen_embedding.denoising_loss

    def spy(unet, scheduler, latents, cond, rng, mask=None, **kw):
        calls.append((latents.detach().clone(), None if mask is None else mask.detach().clone()))
        return real(unet, scheduler, latents, cond, rng, mask=mask, **kw)

    monkeypatch.setattr(anogen_embedding, "denoising_loss", spy)
    support = _support("crack")
    AnoGen().fit(private, support, _cfg(train_steps=4, batch_size=2), tmp_path)
    latents = [encode(private, s.image).float()[0] for s in support]
    size = latents[0].shape[-1]
    assert len(calls) == 4
    seen = set()
    for batch_latents, batch_mask in calls:
        assert batch_mask is not None, "the fit called the denoising loss without the defect masks"
        for z, m in zip(batch_latents, batch_mask):
            k = [i for i, zi in enumerate(latents) if torch.equal(z, zi)]
            assert len(k) == 1
            assert torch.equal(m[0].bool(), _on_grid(support[k[0]].mask, size)), "not this anomaly's own mask"
            seen.add(k[0])
    assert seen == {0, 1, 2}


class _LeakyUNet(nn.Module):
    """The real UNet plus a large term that depends on the text states at latent cells outside EVERY mask (a fixed
    projection of the states: their plain mean is nearly constant after CLIP's final LayerNorm)."""

    def __init__(self, unet: nn.Module, outside: torch.Tensor, width: int):
        super().__init__()
        self.unet, self.outside = unet, outside
        self.w = torch.randn(width, generator=torch.Generator().manual_seed(0))

    def forward(self, x, t, encoder_hidden_states):
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
        leak = 100.0 * (encoder_hidden_states @ self.w).mean(1).view(-1, 1, 1, 1) * self.outside
        return type("Out", (), {"sample": out + leak})


def test_fitted_embedding_ignores_everything_the_unet_does_outside_the_masks(private, tmp_path):
    support = _support("hole")
    size = encode(private, support[0].image).shape[-1]
    outside = (~torch.stack([_on_grid(s.mask, size) for s in support]).any(0)).float()
    leaky = _LeakyUNet(private.unet, outside, private.text_encoder.config.hidden_size)

    def fitted(unet, masked: bool, name: str) -> torch.Tensor:
        adapter = AnoGen().fit(dataclasses.replace(private, unet=unet), support, _cfg(train_steps=3, masked=masked),
                               tmp_path / name)
        return ti.read_learned_embeds(_file(adapter, "hole")[0])[1]

    assert torch.equal(fitted(private.unet, True, "plain"), fitted(leaky, True, "leaky"))
    # the leak does move an embedding whose loss sees the whole image (the paper's "w/o mask" row)
    assert (fitted(private.unet, False, "plain-nomask") - fitted(leaky, False, "leaky-nomask")).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- init word
def test_the_embedding_starts_from_the_word_defect(private, tmp_path, monkeypatch):
    adapter = AnoGen().fit(private, _support("stain"), _cfg(train_steps=0), tmp_path / "zero")
    assert torch.equal(ti.read_learned_embeds(_file(adapter, "stain")[0])[1], _word_row(private, "defect"))

    conds = []
    real = anogen_embedding.denoising_loss

    def spy(unet, scheduler, latents, cond, rng, **kw):
        conds.append(cond.detach().clone())
        return real(unet, scheduler, latents, cond, rng, **kw)

    monkeypatch.setattr(anogen_embedding, "denoising_loss", spy)
    AnoGen().fit(private, _support("stain"), _cfg(train_steps=1), tmp_path / "one")
    with torch.no_grad():
        # the prompt is the token alone, so the first step's conditioning is the text "defect" itself
        assert torch.allclose(conds[0], private.encode_prompt(["defect"]), atol=1e-6, rtol=0)
        assert not torch.allclose(conds[0], private.encode_prompt(["scratch"]), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------- the adapter file
def test_synthesis_is_driven_by_the_saved_embedding_file(private, tmp_path, monkeypatch):
    adapter = AnoGen().fit(private, _support("crack"), _cfg(), tmp_path)
    path, info = _file(adapter, "crack")
    tid = private.tokenizer.convert_tokens_to_ids(info["token"])
    live = private.text_encoder.get_input_embeddings().weight[tid].detach().clone()
    assert torch.equal(live, _word_row(private, "defect"))  # the trap: after fit the live row is still the init
    learned = ti.read_learned_embeds(path)[1]
    other = 3.0 * _word_row(private, "scratch")

    ref = load_backbone("tiny", device="cpu", dtype="float32", cache=False)
    inv = ti.add_placeholder_tokens(ref.tokenizer, ref.text_encoder, [info["token"]], "defect")

    def expected(vec: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            inv.embeddings.copy_(vec[None])
            return ref.encode_prompt([info["prompt"]])

    conds = []
    real = anogen_sampling.generate

    def spy(backbone, cond, *a, **kw):
        conds.append(cond.clone())
        return real(backbone, cond, *a, **kw)

    monkeypatch.setattr(anogen_sampling, "generate", spy)
    jobs = _jobs("crack")[:1]
    images = []
    for vec in (learned, other):
        _write_embedding(path, info["token"], vec)
        images.append(next(iter(AnoGen().synthesize(private, adapter, jobs, _cfg()))).image)
    assert not torch.allclose(expected(learned), expected(live), atol=1e-4, rtol=0)  # training moved the row
    assert torch.allclose(conds[0], expected(learned), atol=1e-6, rtol=0)
    assert torch.allclose(conds[1], expected(other), atol=1e-6, rtol=0)
    box = jobs[0].target_mask
    assert (images[0][box] != images[1][box]).any()  # the file's vector changes the generated defect


# ---------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_classifier_free_guidance_uses_its_configured_scale(private, tmp_path, monkeypatch, scale):
    adapter = AnoGen().fit(private, _support("crack"), _cfg(train_steps=1), tmp_path)
    _, info = _file(adapter, "crack")
    rec = _Steps(monkeypatch)
    jobs = _jobs("crack")
    list(AnoGen().synthesize(private, adapter, jobs, _cfg(guidance=scale)))
    assert len(rec.steps) == 3
    with torch.no_grad():
        cond = private.encode_prompt([info["prompt"]])  # synthesis has loaded the file's row into the encoder
        uncond = private.encode_prompt([""])
        for s in rec.steps:
            x, n = s["before"], len(s["before"])
            eps_c = private.unet(x, s["t"], encoder_hidden_states=cond.expand(n, -1, -1)).sample
            eps_u = private.unet(x, s["t"], encoder_hidden_states=uncond.expand(n, -1, -1)).sample
            want = eps_u + scale * (eps_c - eps_u)
            assert torch.allclose(s["eps"], want, atol=1e-4, rtol=0), s["step"]
            if scale != 1.0:  # what scale 1 (or a dropped sign) would give is far from it
                assert (s["eps"] - eps_c).abs().max() > 100 * 1e-4
                assert (s["eps"] - (eps_c + scale * (eps_u - eps_c))).abs().max() > 100 * 1e-4


# ---------------------------------------------------------------------------------------------- background
def test_latents_outside_the_box_are_the_noised_normal_from_z_T_to_z_0(private, tmp_path, monkeypatch):
    adapter = AnoGen().fit(private, _support("crack"), _cfg(train_steps=1), tmp_path)
    rec = _Steps(monkeypatch)
    jobs = _jobs("crack")
    list(AnoGen().synthesize(private, adapter, jobs, _cfg(guidance=3.0)))
    z0n = encode(private, np.stack([j.normal.image for j in jobs])).float()
    shape = tuple(z0n.shape[1:])
    eps = []
    for j in jobs:  # the job seed's second draw is the background noise (its first starts the generated stream)
        g = torch.Generator("cpu").manual_seed(j.seed)
        torch.randn((1, *shape), generator=g)
        eps.append(torch.randn((1, *shape), generator=g))
    eps = torch.cat(eps)
    grid = ddim_grid(private.scheduler, 3)

    def normal(level: int) -> torch.Tensor:
        a = float(grid.alphas[level])
        return a ** 0.5 * z0n + (1 - a) ** 0.5 * eps if level else z0n

    outside = ~torch.stack([_on_grid(j.target_mask, shape[-1]) for j in jobs])[:, None].expand_as(z0n)
    assert [s["level_to"] for s in rec.steps] == [2, 1, 0]
    first = rec.steps[0]["before"]  # z_T, the latent the first UNet call sees
    assert torch.allclose(first[outside], normal(3)[outside], atol=1e-5, rtol=0), "z_T is not blended"
    for s in rec.steps:
        assert torch.allclose(s["after"][outside], normal(s["level_to"])[outside], atol=1e-5, rtol=0), s["step"]
        assert (s["after"][~outside] - normal(s["level_to"])[~outside]).abs().max() > 1e-2  # the box is generated
