"""The ``sd15-shape`` backbone: Stable Diffusion 1.5's published component shapes with seeded random weights.

FOR SPEED AND MEMORY BENCHMARKS ONLY, NEVER FOR QUALITY FIGURES. The weights are random (never trained): images
are noise and every quality or detection number computed from them is meaningless. What does not depend on the
weights is measured truthfully at SD scale: time per UNet/VAE/text-encoder call, peak memory, cache sizes,
throughput. Nothing is downloaded (issue 15).

Shapes, copied from the component configs SD 1.5 publishes (``unet/config.json``, ``vae/config.json``,
``text_encoder/config.json`` of the v1-5 checkpoint) and checked by tests/test_sd15_shape.py against SD 1.5's
parameter counts (UNet 859,520,964; VAE 83,653,863; text encoder 123,060,480):
- UNet2DConditionModel: block_out_channels (320, 640, 1280, 1280), three CrossAttnDownBlock2D + DownBlock2D,
  UpBlock2D + three CrossAttnUpBlock2D, layers_per_block 2, attention_head_dim 8, cross_attention_dim 768,
  sample_size 64 (64x64 latents = 512 px), GroupNorm 32 groups, eps 1e-5.
- AutoencoderKL: block_out_channels (128, 256, 512, 512), layers_per_block 2, 4 latent channels (x8
  downsampling), scaling_factor 0.18215.
- CLIP ViT-L/14 text encoder (CLIPTextModel): hidden 768, 12 layers, 12 heads, intermediate 3072, quick_gelu,
  vocabulary 49408, 77 positions.

Choices:
- Token ids: the tokenizer is the tiny backbone's offline CLIP tokenizer (``ops.diffusion.tiny.tiny_tokenizer``,
  the real CLIP vocabulary), so the text config uses its special ids (bos 49406, eos 49407, pad 49407) instead
  of the legacy 0/2/1 in SD 1.5's file; shapes and parameter counts are the same.
- Weights: each module's own default initialisation under ``torch.manual_seed(SD15_SHAPE_SEED)`` inside
  ``torch.random.fork_rng`` (the caller's RNG is untouched), modules built in a fixed order (unet, vae, text
  encoder) in float32 on ``device`` (building 1.07 B parameters on a GPU takes a fraction of the time it takes on
  one CPU core). Same torch version and device -> same weights; CPU- and CUDA-built weights differ, which does
  not matter for what this backbone is for.
- ``device="meta"`` builds the modules without allocating storage: parameter counts and config checks without
  the 4.3 GB of float32 weights (the fast test uses it).
- Scheduler: SD's DDIM settings, the same as the tiny backbone (``SD_SCHEDULER_CONFIG``).
"""
from __future__ import annotations

import torch

from ops.diffusion.tiny import CLIP_VOCAB_SIZE, MAX_TOKENS, SD_SCHEDULER_CONFIG, tiny_tokenizer

SD15_SHAPE = "sd15-shape"
SD15_SHAPE_SEED = 0
SD15_RESOLUTION = 512
SD15_LATENT_SCALE = 0.18215
NOT_FOR_QUALITY = ("the sd15-shape backbone has random (untrained) weights: use it for speed and memory "
                   "benchmarks only, never for quality or detection figures")

# SD 1.5's published parameter counts (sum of numel over parameters), for the tests and the bench report.
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def unet_config() -> dict:
    return dict(sample_size=SD15_RESOLUTION // 8, in_channels=4, out_channels=4, center_input_sample=False,
                flip_sin_to_cos=True, freq_shift=0,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
                mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                cross_attention_dim=768, attention_head_dim=8)


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=SD15_RESOLUTION,
                scaling_factor=SD15_LATENT_SCALE)


def text_config() -> dict:
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, projection_dim=768, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)


def build_sd15_shape_components(device: str | torch.device = "cpu") -> dict:
    """Fresh sd15-shape components in float32 on ``device`` ("meta": shapes only, no storage)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"), device:
        torch.manual_seed(SD15_SHAPE_SEED)
        unet = UNet2DConditionModel(**unet_config())
        vae = AutoencoderKL(**vae_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config()))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tiny_tokenizer(),
                scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG))


def param_counts(parts: dict) -> dict[str, int]:
    return {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "vae", "text_encoder")}
