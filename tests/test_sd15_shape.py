"""The sd15-shape benchmark backbone: SD 1.5's shapes and parameter counts, selectable, marked as not for quality.

Built on the meta device (shapes without storage), so the 1.07 B parameters cost no memory or init time here.
"""
from __future__ import annotations

import logging

import pytest
import torch

from ops.diffusion.backbone import build_backbone
from ops.diffusion.sd15_shape import SD15_PARAMS, param_counts


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def built():
    """(backbone, warnings logged while building it): one meta build for the whole module."""
    log, rec = logging.getLogger("ops.diffusion.backbone"), _Records()
    log.addHandler(rec)
    try:
        return build_backbone("sd15-shape", device="meta"), rec.messages
    finally:
        log.removeHandler(rec)


@pytest.fixture(scope="module")
def meta_bb(built):
    return built[0]


def test_parameter_counts_match_sd15(meta_bb):
    parts = {"unet": meta_bb.unet, "vae": meta_bb.vae, "text_encoder": meta_bb.text_encoder}
    assert param_counts(parts) == SD15_PARAMS
    # the published figures, written out independently of the module's table
    assert SD15_PARAMS == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_configs_are_sd15s(meta_bb):
    u, v, t = meta_bb.unet.config, meta_bb.vae.config, meta_bb.text_encoder.config
    assert tuple(u.block_out_channels) == (320, 640, 1280, 1280)
    assert u.cross_attention_dim == 768 and u.attention_head_dim == 8 and u.layers_per_block == 2
    assert u.sample_size == 64
    assert tuple(v.block_out_channels) == (128, 256, 512, 512) and v.scaling_factor == 0.18215
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (768, 12, 12, 3072)
    assert (t.vocab_size, t.max_position_embeddings) == (49408, 77)
    # what the backbone derives from them: 512 px images, 64x64 latents, SD's latent scale
    assert (meta_bb.resolution, meta_bb.latent_size, meta_bb.vae_factor) == (512, 64, 8)
    assert meta_bb.latent_scale == 0.18215 and meta_bb.model_id == "sd15-shape"
    # attention at 64/32/16 (down, up) and 8 (mid): the layers the attention controller works on at scale
    n_self = sum(1 for name, m in meta_bb.unet.named_modules() if name.endswith("attn1"))
    assert n_self == 16
    assert meta_bb.tokenizer("a photo of a scratch")["input_ids"][0] == 49406  # real CLIP ids index the encoder


def test_loading_warns_it_is_not_for_quality(built):
    assert any("never for quality" in m for m in built[1])


def test_unet_forward_shapes_on_meta(meta_bb):
    # a meta forward runs every layer's shape logic (no arithmetic): the SD wiring holds at 32x32 latents
    z = torch.empty(2, 4, 32, 32, device="meta")
    c = torch.empty(2, 77, 768, device="meta")
    with torch.no_grad():
        out = meta_bb.unet(z, 500, encoder_hidden_states=c).sample
    assert out.shape == (2, 4, 32, 32)
