"""forge-base component configs: Stable Diffusion's layout at 128 px, sized for a CPU.

- VAE: AutoencoderKL, 3 blocks (32, 64, 128) = x4 downsampling, 4 latent channels: 128 px images <-> 32x32x4
  latents (SD: x8, 512 px <-> 64x64x4). x4 rather than SD's x8 because at 128 px an x8 latent (16x16) leaves
  too few cells for a thin scratch and too little room for three attention resolutions.
- UNet: UNet2DConditionModel with cross-attention down/up blocks at every level, block_out_channels
  (32, 64, 128): self- and cross-attention at 32x32, 16x16 and 8x8 plus the mid block at 8x8 (SD 1.5: 64/32/16
  with plain blocks at 8). ``attention_head_dim`` is the number of heads per level (a diffusers naming quirk,
  SD 1.5 uses 8 everywhere): (1, 2, 4), i.e. 32 channels per head. Measured on this 2-core CPU (training step,
  batch 8): 8 heads of 8 channels at 32x32 cost 1.6x the time of 1 head of 64 (the softmax over 1024 tokens is
  per head), so fewer, wider heads buy more training steps in the same hour.
- Text encoder: CLIPTextModel with CLIP's real vocabulary (49408 ids, from the tiny backbone's offline tokenizer),
  hidden 96, 4 layers, 4 heads; trained jointly with the UNet on the data recipe's captions, so prompts,
  textual inversion and embedding optimisation move the output.
- Scheduler: SD v1.x's DDIM schedule (the tiny backbone's SD_SCHEDULER_CONFIG).
"""
from __future__ import annotations

from ops.diffusion.tiny import CLIP_VOCAB_SIZE, MAX_TOKENS, SD_SCHEDULER_CONFIG

RESOLUTION = 128
TEXT_WIDTH = 96


def vae_config(scaling_factor: float = 1.0) -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 128),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                layers_per_block=1, norm_num_groups=32, sample_size=RESOLUTION, scaling_factor=scaling_factor)


def unet_config() -> dict:
    return dict(sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64, 128),
                down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=TEXT_WIDTH, attention_head_dim=(1, 2, 4), norm_num_groups=32)


def text_config() -> dict:
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=TEXT_WIDTH)


def scheduler_config() -> dict:
    return dict(SD_SCHEDULER_CONFIG)


def build_components(seed: int, scaling_factor: float = 1.0) -> dict:
    """Freshly initialised (untrained) components on CPU in float32, seeded."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ops.diffusion.tiny import tiny_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config(scaling_factor))
        unet = UNet2DConditionModel(**unet_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config()))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
                scheduler=DDIMScheduler(**scheduler_config()))
