"""Loading the diffusion backbone (DESIGN §3): ``forge-base``, ``tiny``, ``sd15-shape``, a local diffusers folder,
or a hub id.

``sd15-shape`` (ops/diffusion/sd15_shape.py) is SD 1.5's architecture with seeded RANDOM weights, for speed and
memory benchmarks at true scale only: never use it for quality or detection figures (loading it logs a warning).

``load_backbone`` returns a :class:`Backbone` holding the Stable-Diffusion components. Choices:
- One backbone per process per (model, device, dtype, attention): a module-level cache, because methods, the
  Dagster resource and tests all ask for it and loading SD takes seconds to minutes. ``cache=False`` gives a
  private copy (training code that mutates the UNet, e.g. injecting LoRA layers, should take one).
- device "auto": cuda if available else cpu. dtype "auto": bfloat16 on cuda when supported, else float16;
  float32 on cpu (half precision on CPU is slow and loses accuracy).
- attention "sdpa" installs ``AttnProcessor2_0`` (torch's fused kernel), "eager" the explicit ``AttnProcessor``
  (softmax materialised; useful for debugging attention maps). Attention control (ops/diffusion/attention.py)
  installs its own processors temporarily on top of either.
- The scheduler is always a ``DDIMScheduler`` built from the checkpoint's scheduler config (SD 1.5 ships a
  PNDM config; DDIM accepts the same beta settings); the toolkit's samplers and inversion are DDIM (eta 0).
- A folder or hub id loads each component with ``from_pretrained(..., subfolder=...)``; with
  ``HF_HUB_OFFLINE=1`` hub ids resolve from the HF cache only (``local_files_only``). A missing model raises
  ``FileNotFoundError`` naming the folder/cache and how to fix it; nothing downloads unless the HF libraries are
  allowed to (online and not offline-forced).
- ``forge-base`` is the project's own trained small model (``ops.forge_base``): the name resolves to its shipped
  diffusers folder, which then loads exactly as a user's SD folder does; ``model_id`` stays "forge-base".
- ``resolution`` = unet sample_size x VAE downsampling factor (512 for SD 1.5, 128 for tiny).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TINY = "tiny"
FORGE_BASE = "forge-base"
_CACHE: dict[tuple[str, str, str, str], "Backbone"] = {}
_LOCK = threading.Lock()


@dataclass
class Backbone:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler: Any  # diffusers DDIMScheduler
    device: torch.device
    dtype: torch.dtype
    model_id: str
    resolution: int
    latent_scale: float
    attention: str = "sdpa"
    fast: Any = None  # ops.diffusion.fastpath.FastPath once apply_fast_path ran (None: every switch off)
    _null_embedding: torch.Tensor | None = field(default=None, repr=False)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_factor

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    def encode_prompt(self, prompts: list[str] | str) -> torch.Tensor:
        """Text-encoder last hidden states (B, 77, D) as SD uses them; differentiable (wrap in no_grad to save)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = self.text_encoder(self.tokenize(prompts))[0]
        return out.to(self.dtype)

    def null_embedding(self) -> torch.Tensor:
        """Embedding of the empty prompt (1, 77, D), cached: the unconditional branch of classifier-free guidance."""
        if self._null_embedding is None:
            with torch.no_grad():
                self._null_embedding = self.encode_prompt([""])
        return self._null_embedding

    def to_pipeline(self):
        """A StableDiffusionPipeline sharing these modules (LoRA/TI files are checked by loading them into it)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        self.to_pipeline().save_pretrained(str(path), safe_serialization=True)
        return path


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA device; use device='cpu' or 'auto'")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, float32, float16, bfloat16")
    return names[dtype]


def set_attention_backend(unet: Any, attention: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif attention == "eager":
        unet.set_attn_processor(AttnProcessor())
    else:
        raise ValueError(f"unknown attention backend {attention!r}; use 'sdpa' or 'eager'")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load_components(model: str) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(model).expanduser()
    is_dir = local.is_dir()
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1  # hub ids are "owner/name"
    if not is_dir and looks_like_path:
        raise FileNotFoundError(f"diffusion model folder {local} does not exist; pass an existing diffusers folder "
                                f"(with unet/, vae/, text_encoder/, tokenizer/, scheduler/), a hub id, or 'tiny'")
    src = str(local) if is_dir else model
    kw = dict(local_files_only=is_dir or _offline())
    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(src, subfolder="scheduler", **kw))
    except (OSError, ValueError) as e:
        if is_dir:
            where = f"the folder {local}"
            fix = ("it must be a diffusers StableDiffusion folder with unet/, vae/, text_encoder/, tokenizer/ and "
                   "scheduler/ subfolders (e.g. written by Backbone.save_pretrained or pipe.save_pretrained)")
        else:
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            where = f"hub model {model!r} (HF cache {cache}, offline={kw['local_files_only']})"
            fix = ("download it once on a machine with internet (`hf download " + model + "`) into that cache, or "
                   "pass a local diffusers folder, or use model='tiny'")
        raise FileNotFoundError(f"cannot load the diffusion backbone from {where}: {e}. Fix: {fix}") from e
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_backbone(model: str = TINY, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                   attention: str = "sdpa") -> Backbone:
    """A new (uncached) backbone."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model == TINY:
        from ops.diffusion.tiny import build_tiny_components

        parts = build_tiny_components()
    elif model == FORGE_BASE:
        from ops.forge_base import model_dir

        parts = _load_components(str(model_dir()))
    elif model == "sd15-shape":  # benchmarks only: random weights, see ops/diffusion/sd15_shape.py
        from ops.diffusion.sd15_shape import NOT_FOR_QUALITY, build_sd15_shape_components

        logging.getLogger(__name__).warning(NOT_FOR_QUALITY)
        parts = build_sd15_shape_components(dev)
    else:
        parts = _load_components(model)
    for name in ("unet", "vae", "text_encoder"):
        mod = parts[name]
        mod.requires_grad_(False)
        mod.to(device=dev)
        if mod.dtype != dt:  # skip the no-op cast: diffusers warns on every .to(dtype)
            mod.to(dtype=dt)
        mod.eval()
    set_attention_backend(parts["unet"], attention)
    vae = parts["vae"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return Backbone(**parts, device=dev, dtype=dt, model_id=model, attention=attention,
                    resolution=int(parts["unet"].config.sample_size) * factor,
                    latent_scale=float(vae.config.scaling_factor))


def load_backbone(model: str = TINY, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                  attention: str = "sdpa", cache: bool = True) -> Backbone:
    """The process-wide backbone for (model, device, dtype, attention); ``cache=False`` builds a private one."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not cache:
        return build_backbone(model, dev, dt, attention)
    key = (str(model), str(dev), str(dt), attention)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build_backbone(model, dev, dt, attention)
        return _CACHE[key]


def save_tiny(path: str | os.PathLike) -> Path:
    """Write the tiny backbone as a diffusers folder (float32), loadable with ``load_backbone(path)``."""
    return build_backbone(TINY, "cpu", torch.float32).save_pretrained(path)
