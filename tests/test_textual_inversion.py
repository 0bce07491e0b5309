"""Textual inversion: only the new rows train, the loss drops, files load with diffusers; AnoGen's masked loss."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from ops.diffusion import textual_inversion as ti
from ops.diffusion import training
from ops.diffusion.backbone import load_backbone

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
torch.set_num_threads(1)

TOKENS = ["<defect-0>", "<defect-1>"]
PROMPTS = ["a photo of <defect-0>", "a photo of <defect-1>"]


def _fresh():
    return load_backbone("tiny", device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="module")
def trained():
    """Two placeholders fitted with the mask-weighted loss on fixed noise / timesteps (a deterministic objective)."""
    bb = _fresh()
    before = bb.text_encoder.get_input_embeddings().weight.detach().clone()
    inv = ti.add_placeholder_tokens(bb.tokenizer, bb.text_encoder, TOKENS, ["defect", "anomaly"])
    init = inv.embeddings.detach().clone()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 16, 16, generator=g)
    mask = torch.zeros(4, 64, 64, dtype=torch.bool)
    mask[:, 8:40, 16:48] = True
    t = torch.tensor([50, 300, 600, 900])

    def objective(_step=0, _rng=None):
        cond = bb.encode_prompt(PROMPTS * 2)
        return training.denoising_loss(bb.unet, bb.scheduler, latents, cond, torch.Generator().manual_seed(7),
                                       mask=mask, timesteps=t)

    with torch.no_grad():
        loss_before = objective().item()
    result = training.train(inv.params, objective, 15, lr=1e-1, seed=0, frozen_modules=[bb.unet, bb.text_encoder])
    with torch.no_grad():
        loss_after = objective().item()
    return dict(bb=bb, inv=inv, before=before, init=init, loss_before=loss_before, loss_after=loss_after,
                result=result)


def test_only_the_new_rows_change_and_the_loss_drops(trained):
    bb, inv, before = trained["bb"], trained["inv"], trained["before"]
    weight = bb.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == before.shape[0] + 2 and not weight.requires_grad
    assert torch.equal(weight[: before.shape[0]], before)  # every existing row bit-identical
    assert inv.token_ids == [before.shape[0], before.shape[0] + 1]
    assert (inv.embeddings.detach() - trained["init"]).abs().max() > 1e-2  # the new rows did train
    assert trained["loss_after"] < trained["loss_before"] - 1e-3
    ids = bb.tokenizer("a photo of <defect-1>", add_special_tokens=False).input_ids
    assert ids[-1] == inv.token_ids[1]  # the placeholder is one token


def test_init_words_give_the_initial_rows():
    bb = _fresh()
    emb = bb.text_encoder.get_input_embeddings().weight
    word_ids = [bb.tokenizer(w, add_special_tokens=False).input_ids for w in ("defect", "anomaly")]
    inv = ti.add_placeholder_tokens(bb.tokenizer, bb.text_encoder, TOKENS, ["defect", "anomaly"])
    for j, ids in enumerate(word_ids):
        assert torch.equal(inv.embeddings[j].detach(), emb[ids].mean(0))
        assert torch.equal(emb[inv.token_ids[j]], emb[ids].mean(0))
    with pytest.raises(ValueError, match="base vocabulary"):
        ti.add_placeholder_tokens(bb.tokenizer, bb.text_encoder, ["defect"], "anomaly")
    again = ti.add_placeholder_tokens(bb.tokenizer, bb.text_encoder, TOKENS[:1], "scratch")  # a refit reuses the id
    assert again.token_ids == inv.token_ids[:1] and len(bb.tokenizer) == emb.shape[0]


def test_saved_embeddings_load_with_diffusers_load_textual_inversion(trained, tmp_path):
    bb, inv = trained["bb"], trained["inv"]
    files = inv.save(tmp_path)
    assert [f.name for f in files] == ["learned_embeds-0.safetensors", "learned_embeds-1.safetensors"]
    with torch.no_grad():
        expected = bb.encode_prompt(PROMPTS)

    fresh = _fresh()
    pipe = fresh.to_pipeline()
    pipe.load_textual_inversion([str(f) for f in files])
    ids = fresh.tokenizer.convert_tokens_to_ids(TOKENS)
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[ids], inv.embeddings.detach())
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_prompt(PROMPTS), expected, rtol=0, atol=1e-6)

    other = _fresh()  # explicit token names, as a method passes them
    other.to_pipeline().load_textual_inversion(str(files[1]), token="<scratch>")
    row = other.text_encoder.get_input_embeddings().weight[other.tokenizer.convert_tokens_to_ids("<scratch>")]
    assert torch.equal(row, inv.embeddings[1].detach())

    bare = _fresh()  # no pipeline: the loader the methods use
    assert ti.load_learned_tokens(bare.tokenizer, bare.text_encoder, files) == ids
    with torch.no_grad():
        torch.testing.assert_close(bare.encode_prompt(PROMPTS), expected, rtol=0, atol=1e-6)


def test_bake_writes_the_rows_and_drops_the_hook(trained):
    bb, inv = trained["bb"], trained["inv"]
    with torch.no_grad():
        hooked = bb.encode_prompt(PROMPTS)
        inv.bake()
        baked = bb.encode_prompt(PROMPTS)
        inv.attach()
    assert torch.equal(hooked, baked)


def test_bad_files_are_named(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "two.safetensors"
    save_file({"<a>": torch.zeros(1, 32), "<b>": torch.zeros(1, 32)}, str(bad))
    with pytest.raises(ValueError, match="two.safetensors"):
        ti.read_learned_embeds(bad)
    wide = tmp_path / "wide.safetensors"
    save_file({"<a>": torch.zeros(1, 768)}, str(wide))
    bb = _fresh()
    with pytest.raises(ValueError, match="wide.safetensors.*768 dims"):
        ti.load_learned_tokens(bb.tokenizer, bb.text_encoder, [wide])


class _ZeroUNet(nn.Module):
    """Predicts ε̂ = 0, so the loss is the (masked) mean of ε² and can be recomputed by hand."""

    def forward(self, x, t, encoder_hidden_states):
        return type("Out", (), {"sample": torch.zeros_like(x)})


def test_mask_weighted_loss_averages_over_latent_cells_touching_the_mask():
    bb_sched = load_backbone("tiny", device="cpu", dtype="float32").scheduler
    latents = torch.zeros(2, 4, 8, 8)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, 3, 9:20] = True  # a 1-pixel scratch: latent row 0, columns 1-2
    mask[1, :32, :] = True  # top half
    w = training.latent_mask(mask, (8, 8))
    assert w[0, 0].nonzero().tolist() == [[0, 1], [0, 2]] and w[1].sum() == 32

    loss = training.denoising_loss(_ZeroUNet(), bb_sched, latents, None, torch.Generator().manual_seed(1),
                                   mask=mask, timesteps=torch.tensor([10, 10]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    expected = ((noise[0, :, 0, 1:3] ** 2).mean() + (noise[1, :, :4] ** 2).mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    plain = training.denoising_loss(_ZeroUNet(), bb_sched, latents, None, torch.Generator().manual_seed(1),
                                    timesteps=torch.tensor([10, 10]))
    assert plain.item() == pytest.approx((noise ** 2).mean().item(), rel=1e-6)
