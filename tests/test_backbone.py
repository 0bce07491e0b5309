"""The tiny backbone: real CLIP tokenizer ids, reproducible weights, save/load round trip, clear errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ops.diffusion.backbone import build_backbone, load_backbone
from ops.diffusion.tiny import bytes_to_unicode, clip_vocab_and_merges

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bb():
    return load_backbone("tiny", device="cpu")


def _eps(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, bb.latent_size, bb.latent_size, generator=g)
    with torch.no_grad():
        emb = bb.encode_prompt(["a photo of a scratch"])
        return bb.unet(z, 500, encoder_hidden_states=emb).sample


def test_tokenizer_gives_real_clip_ids(bb):
    ids = bb.tokenizer("a photo of a scratch")["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407
    assert ids[1:4] == [320, 1125, 539] and ids[4] == 320  # "a", "photo", "of", "a" in CLIP's vocabulary
    assert bb.tokenizer.convert_ids_to_tokens(ids[5]) == "scratch</w>"
    assert len(bb.tokenizer) == 49408
    padded = bb.tokenize(["a photo of a scratch"])
    assert padded.shape == (1, 77) and padded[0, 7:].eq(49407).all()


def test_tokenizer_matches_open_clip_reference(bb):
    from open_clip.tokenizer import SimpleTokenizer  # CLIP's own BPE implementation, independent of ours

    text = "a photo of a scratch, with dents & rust! 3mm crack on the Bottle-cap"
    assert bb.tokenizer(text)["input_ids"][1:-1] == SimpleTokenizer().encode(text)


def test_vocab_construction_follows_clip():
    vocab, merges = clip_vocab_and_merges()
    byte_syms = list(bytes_to_unicode().values())
    assert vocab[byte_syms[0]] == 0 and vocab[byte_syms[0] + "</w>"] == 256
    assert vocab["".join(merges[0].split())] == 512  # first merge follows the 512 byte symbols
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_backbone_shapes_and_cache(bb):
    assert bb.resolution == 128 and bb.latent_size == 32 and bb.latent_scale == pytest.approx(0.18215)
    assert bb.dtype == torch.float32 and bb.device.type == "cpu"
    assert load_backbone("tiny", device="cpu") is bb
    assert type(next(iter(bb.unet.attn_processors.values()))).__name__ == "AttnProcessor2_0"
    s = bb.scheduler.config
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.clip_sample, s.set_alpha_to_one, s.steps_offset) == \
        ("scaled_linear", 0.00085, 0.012, False, False, 1)
    emb = bb.encode_prompt(["a", "b c"])
    assert emb.shape == (2, 77, 32)


def test_tiny_reproducible_across_processes(bb):
    code = ("import torch; from ops.diffusion.backbone import build_backbone;"
            "b = build_backbone('tiny', 'cpu'); print(repr(float(sum(p.double().sum() for p in b.unet.parameters()))),"
            " repr(float(b.text_encoder.get_input_embeddings().weight[320].double().sum())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) == float(sum(p.double().sum() for p in bb.unet.parameters()))
    assert float(out[1]) == float(bb.text_encoder.get_input_embeddings().weight[320].double().sum())


def test_save_pretrained_round_trip(bb, tmp_path):
    bb.save_pretrained(tmp_path / "tiny_sd")
    loaded = build_backbone(str(tmp_path / "tiny_sd"), device="cpu")
    assert loaded.resolution == bb.resolution and loaded.latent_scale == bb.latent_scale
    assert loaded.tokenizer("a photo of a scratch")["input_ids"] == bb.tokenizer("a photo of a scratch")["input_ids"]
    assert torch.equal(_eps(loaded), _eps(bb))
    assert not torch.equal(_eps(bb, seed=1), _eps(bb, seed=0))
    pipe = loaded.to_pipeline()
    assert pipe.unet is loaded.unet and pipe.safety_checker is None
    assert loaded.scheduler.config.steps_offset == 1


def test_missing_model_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="diffusers StableDiffusion folder"):
        build_backbone(str(tmp_path), device="cpu")
    with pytest.raises(FileNotFoundError, match="hf download"):
        build_backbone("nobody-here/no-such-model", device="cpu")
