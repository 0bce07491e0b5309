"""The embedded ``tiny`` backbone: Stable-Diffusion-shaped components from small configs, built offline.

``tiny`` exists so every diffusion code path runs anywhere in seconds. It is untrained (seeded random weights);
its samples are noise-like and prove mechanics, not quality (DESIGN §3).

Choices where the brief left room:
- VAE: 3 encoder blocks (32, 64, 64) = x4 downsampling, so the 128 px demo images map to a 32x32 latent
  (``TINY_RESOLUTION`` = 128). ``scaling_factor`` plays SD's role (SD's 0.18215 = 1 / std of its latents, so
  that scaled latents have unit variance and the noise schedule's signal-to-noise ratios mean what they mean
  for SD): measured here, the seeded VAE's posterior means have std 0.237 on 128 px crops of scikit-image's
  photographs and on uniform-noise images alike, so ``TINY_LATENT_SCALE`` = 4.2.
- UNet: block_out_channels (32, 64, 64) with ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D") /
  ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D") plus the cross-attention mid block. Attention
  therefore runs at TWO resolutions, 16x16 (down_blocks.1, up_blocks.1: 3 transformer blocks) and 8x8
  (down_blocks.2, mid, up_blocks.0: 4 blocks), so the multi-resolution paths of attention control (masks on
  several grids, captures and refinement at 16 and at 8) run in the unit tests. Measured (one CPU thread, batch 3,
  SDPA, median of 5): 0.145 s per forward for this layout, 0.147 s for the former two-block UNet with attention at
  16 only, 0.75 s for attention at 32 and 16 (1024-token self-attention): the third block at 8x8 is nearly free,
  a 32x32 attention is 5x the cost. attention_head_dim 8 -> 4 heads at 32 channels, 8 heads at 64; 1.66 M
  parameters.
- Text encoder: CLIPTextModel with hidden 32, 2 layers, 4 heads and the REAL CLIP vocabulary size (49408), so
  token ids from the real tokenizer index it and textual-inversion code sees the SD token layout.
- Weights: ``torch.manual_seed(TINY_SEED)`` inside ``torch.random.fork_rng`` before constructing the three
  models in a fixed order (unet, vae, text encoder), on CPU in float32. Same torch version -> same weights in
  every process; the caller's global RNG state is left untouched.
- Scheduler: SD v1.x DDIM settings (scaled_linear 0.00085-0.012, 1000 steps, clip_sample False,
  set_alpha_to_one False, steps_offset 1).
- Tokenizer: CLIP's vocabulary reproduced from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` exactly as
  CLIP's ``SimpleTokenizer`` builds it (256 byte symbols, the same with ``</w>``, merge lines 1..48894, then
  ``<|startoftext|>`` and ``<|endoftext|>``: 49408 entries). It is written once as vocab.json + merges.txt
  (HF layout, ``#version: 0.2`` header) under ``$ANOMALY_FORGE_CACHE`` (default ``~/.cache/anomaly_forge``)
  ``/tiny/tokenizer`` with atomic writes; concurrent builders write identical bytes, so a race is harmless.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

from ops.atomic import write_bytes_atomic

TINY_SEED = 0
TINY_RESOLUTION = 128
TINY_LATENT_SCALE = 4.2
TINY_UNET_CHANNELS = (32, 64, 64)
TINY_ATTENTION_RESOLUTIONS = (16, 8)  # query grids of the UNet's attention layers at the 32x32 latent
CLIP_VOCAB_SIZE = 49408
MAX_TOKENS = 77
_N_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer keeps merge lines 1..48894 of the BPE file

SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                           steps_offset=1, prediction_type="epsilon")


def cache_root() -> Path:
    return Path(os.environ.get("ANOMALY_FORGE_CACHE", Path.home() / ".cache" / "anomaly_forge")).expanduser()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (256 entries, fixed order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_file() -> Path:
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - pinned dependency
        raise ImportError("the tiny backbone's tokenizer is built from open_clip's bundled BPE file; "
                          "install the pinned open-clip-torch (pyproject.toml)") from e
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall open-clip-torch (it ships CLIP's BPE vocabulary)")
    return path


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id table and its merge rules, as CLIP's SimpleTokenizer builds them."""
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1:_N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab_list) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{_bpe_file()}: built {len(vocab_list)} tokens, expected {CLIP_VOCAB_SIZE}; "
                           f"the file is not CLIP's bpe_simple_vocab_16e6")
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def tokenizer_dir() -> Path:
    """Folder with vocab.json + merges.txt of the CLIP tokenizer, built on first use."""
    out = cache_root() / "tiny" / "tokenizer"
    if not ((out / "vocab.json").is_file() and (out / "merges.txt").is_file()):
        vocab, merges = clip_vocab_and_merges()
        write_bytes_atomic(out / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
        # vocab.json last: its presence marks a complete folder for the check above
        write_bytes_atomic(out / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return out


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir()), model_max_length=MAX_TOKENS)


def unet_config() -> dict:
    return dict(sample_size=TINY_RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=TINY_UNET_CHANNELS,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=32)


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                layers_per_block=1, norm_num_groups=32, sample_size=TINY_RESOLUTION, scaling_factor=TINY_LATENT_SCALE)


def text_config() -> dict:
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407, projection_dim=32)


def build_tiny_components() -> dict:
    """Fresh tiny components on CPU in float32 (identical weights on every call and in every process)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(**unet_config())
        vae = AutoencoderKL(**vae_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config()))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tiny_tokenizer(),
                scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG))

