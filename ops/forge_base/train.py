"""Training forge-base: ``train_base(out, ...)`` (the ``anomaly-forge train-base`` command).

Stages, each resumable (``ops.diffusion.training.train``: seeded, checkpointed, bit-identical on resume), with
their state under ``OUT/.train/``:
1. pool: ``pool_size`` captioned 128 px images from ``ops.forge_base.data`` (cached as ``pool.npz``).
2. VAE: AutoencoderKL trained on random ``vae_crop`` px crops of the pool (random flips) with
   L1 + L2 reconstruction + ``kl_weight`` x KL, the latent sampled with the run's generator. Crops, not whole
   images: the VAE is convolutional and 64 px crops cost a quarter of a 128 px image per step.
3. latent scale: posterior means of every pool image; ``scaling_factor`` = 1 / their std (SD's 0.18215 is the
   same rule), so scaled latents have unit variance and SD's noise schedule means what it means for SD.
4. UNet + text encoder, trained jointly from scratch with the standard epsilon objective
   (``ops.diffusion.training.denoising_loss``) on the scaled latents and the captions (CLIP tokenizer).
5. export: the five components as a diffusers folder (``model_index.json`` + subfolders) in float16 safetensors
   (``dtype``), loadable by ``StableDiffusionPipeline.from_pretrained(OUT)`` and ``load_backbone(OUT)``, plus
   ``forge_base.json``: the arguments, the loss curves' summaries, every file's sha256.
AdamW with a linear warm-up, gradient clipping at 1; no EMA (it would double the checkpoint for little at this
step count).
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ops.atomic import write_bytes_atomic

META_FILE = "forge_base.json"
STATE_DIR = ".train"


@dataclass(frozen=True)
class BaseTrainConfig:
    pool_size: int = 3000
    vae_steps: int = 600
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 2200
    unet_batch: int = 8
    unet_lr: float = 5e-4
    warmup: int = 100
    ckpt_every: int = 100
    seed: int = 0
    dtype: str = "float16"

    def check(self) -> None:
        for name in ("pool_size", "vae_steps", "vae_batch", "vae_crop", "unet_steps", "unet_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train-base: {name} must be >= 1, got {getattr(self, name)}")
        if self.ckpt_every < 0 or self.warmup < 0:
            raise ValueError("train-base: ckpt_every and warmup must be >= 0")
        if self.vae_crop > 128 or self.vae_crop % 4:
            raise ValueError(f"train-base: vae_crop must be a multiple of 4 and <= 128, got {self.vae_crop}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"train-base: dtype must be float16 or float32, got {self.dtype!r}")


def _log(msg: str) -> None:
    print(f"[train-base] {msg}", file=sys.stderr, flush=True)


def _pool(state: Path, cfg: BaseTrainConfig) -> tuple[np.ndarray, list[str]]:
    from ops.forge_base.data import make_pool
    from ops.progress import progress_bar

    path = state / f"pool-{cfg.pool_size}-{cfg.seed}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["images"], [str(c) for c in z["captions"]]
    with progress_bar("forge-base data", total=cfg.pool_size, unit="img") as bar:
        items = make_pool(cfg.pool_size, 128, cfg.seed, progress=lambda _i: bar.update(1))
    images = np.stack([it.image for it in items])
    captions = [it.caption for it in items]
    buf = io.BytesIO()
    np.savez(buf, images=images, captions=np.array(captions))
    write_bytes_atomic(path, buf.getvalue())
    return images, captions


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae: Any, images: np.ndarray, cfg: BaseTrainConfig, ckpt: Path) -> list[float]:
    from ops.diffusion.training import train

    data = _to_float(images)
    n, crop = len(data), cfg.vae_crop

    def loss_fn(_step: int, rng: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=rng)
        off = torch.randint(0, 128 - crop + 1, (cfg.vae_batch, 2), generator=rng)
        flip = torch.rand(cfg.vae_batch, generator=rng) < 0.5
        x = torch.stack([data[i, :, y:y + crop, xo:xo + crop] for i, (y, xo) in zip(idx.tolist(), off.tolist())])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=rng)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        return (rec - x).abs().mean() + ((rec - x) ** 2).mean() + cfg.kl_weight * kl

    vae.train().requires_grad_(True)
    res = train(list(vae.parameters()), loss_fn, cfg.vae_steps, cfg.vae_lr, ckpt_dir=ckpt,
                ckpt_every=cfg.ckpt_every, seed=cfg.seed, weight_decay=0.0, warmup_steps=cfg.warmup,
                desc="forge-base vae")
    vae.eval().requires_grad_(False)
    return res.losses


@torch.no_grad()
def latent_means(vae: Any, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    out = [vae.encode(_to_float(images[i:i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(out)


def train_denoiser(parts: dict, latents: torch.Tensor, captions: list[str], cfg: BaseTrainConfig,
                   ckpt: Path) -> list[float]:
    from ops.diffusion.training import denoising_loss, train

    unet, text_encoder, tokenizer, scheduler = parts["unet"], parts["text_encoder"], parts["tokenizer"], \
        parts["scheduler"]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    n = len(latents)

    def loss_fn(_step: int, rng: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=rng)
        cond = text_encoder(ids[idx])[0]
        return denoising_loss(unet, scheduler, latents[idx], cond, rng)

    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    res = train(params, loss_fn, cfg.unet_steps, cfg.unet_lr, ckpt_dir=ckpt, ckpt_every=cfg.ckpt_every,
                seed=cfg.seed + 1, warmup_steps=cfg.warmup, desc="forge-base unet+text")
    for m in (unet, text_encoder):
        m.eval().requires_grad_(False)
    return res.losses


def sha256_files(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith(STATE_DIR) and rel != META_FILE:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _summary(losses: list[float]) -> dict[str, float]:
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {"first_10pct_mean": float(np.mean(losses[:k])), "last_10pct_mean": float(np.mean(losses[-k:])),
            "steps": len(losses)}


def export(parts: dict, out: Path, dtype: str) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                   tokenizer=parts["tokenizer"], unet=parts["unet"], scheduler=parts["scheduler"],
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if dtype == "float16":
        pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    pipe.to(torch.float32)


def train_base(out: str | Path, cfg: BaseTrainConfig = BaseTrainConfig(), command: str = "") -> Path:
    """Train forge-base into the diffusers folder ``out`` (resuming from ``out/.train`` if present)."""
    from ops.forge_base.config import build_components

    cfg.check()
    out = Path(out).expanduser().resolve()
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    images, captions = _pool(state, cfg)
    parts = build_components(cfg.seed)
    _log(f"pool: {len(images)} images; vae {sum(p.numel() for p in parts['vae'].parameters()) / 1e6:.2f} M, "
         f"unet {sum(p.numel() for p in parts['unet'].parameters()) / 1e6:.2f} M, text encoder "
         f"{sum(p.numel() for p in parts['text_encoder'].parameters()) / 1e6:.2f} M parameters")
    vae_losses = train_vae(parts["vae"], images, cfg, state / "vae")
    means = latent_means(parts["vae"], images)
    scale = float(1.0 / means.std())
    parts["vae"].register_to_config(scaling_factor=scale)
    _log(f"latent std {means.std():.4f} -> scaling_factor {scale:.4f}")
    unet_losses = train_denoiser(parts, means * scale, captions, cfg, state / "unet")
    export(parts, out, cfg.dtype)
    meta = {"name": "forge-base", "config": asdict(cfg), "command": command, "scaling_factor": scale,
            "torch": torch.__version__, "vae_loss": _summary(vae_losses), "unet_loss": _summary(unet_losses),
            "files": sha256_files(out)}
    write_bytes_atomic(out / META_FILE, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    size_mb = sum((out / f).stat().st_size for f in meta["files"]) / 1e6
    _log(f"{time.perf_counter() - t0:.0f} s; wrote {out} ({size_mb:.1f} MB)")
    return out
