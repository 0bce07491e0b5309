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
    """The defaults are recipe v1, the one the shipped weights were trained with; ``for_recipe("v2")`` gives v2's."""
    recipe: str = "v1"
    pool_size: int = 3000
    vae_steps: int = 600
    vae_batch: int = 8
    vae_crop: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    vae_mark_weight: float = 0.0
    vae_edge_weight: float = 0.0
    unet_crop_steps: int = 0
    unet_crop: int = 16
    unet_crop_batch: int = 16
    unet_steps: int = 2200
    unet_batch: int = 8
    unet_lr: float = 5e-4
    warmup: int = 100
    ckpt_every: int = 100
    seed: int = 0
    precision: str = "float32"
    dtype: str = "float16"

    @classmethod
    def for_recipe(cls, recipe: str, **overrides: Any) -> "BaseTrainConfig":
        return cls(**{**RECIPE_DEFAULTS.get(recipe, {}), "recipe": recipe, **overrides})

    def check(self) -> None:
        for name in ("pool_size", "vae_steps", "vae_batch", "vae_crop", "unet_steps", "unet_batch",
                     "unet_crop_batch", "unet_crop"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train-base: {name} must be >= 1, got {getattr(self, name)}")
        if self.ckpt_every < 0 or self.warmup < 0 or self.unet_crop_steps < 0:
            raise ValueError("train-base: ckpt_every, warmup and unet_crop_steps must be >= 0")
        if self.vae_crop > 128 or self.vae_crop % 4:
            raise ValueError(f"train-base: vae_crop must be a multiple of 4 and <= 128, got {self.vae_crop}")
        if self.unet_crop > 32 or self.unet_crop % 8:
            raise ValueError(f"train-base: unet_crop (latent cells) must be 8, 16, 24 or 32, got {self.unet_crop}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"train-base: dtype must be float16 or float32, got {self.dtype!r}")
        if self.precision not in ("bf16", "float32"):
            raise ValueError(f"train-base: precision must be bf16 or float32, got {self.precision!r}")
        if self.vae_mark_weight < 0 or self.vae_edge_weight < 0:
            raise ValueError("train-base: vae_mark_weight and vae_edge_weight must be >= 0")

        if self.recipe not in RECIPE_DEFAULTS:
            raise ValueError(f"train-base: recipe must be one of {sorted(RECIPE_DEFAULTS)}, got {self.recipe!r}")

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.precision == "bf16" else "no"


# v2: surface-weighted data (ops.forge_base.data), a VAE loss that weighs thin marks and edges, and a UNet that
# spends most of its steps on 16-cell latent windows (a quarter of the whole latent's cost) before whole latents.
# Precision stays float32: on a CPU without bf16 matrix instructions (AVX-512 BF16 / AMX) autocast to bfloat16
# made a VAE step 18x slower (docs/forge_base.md).
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "v1": {},
    "v2": dict(pool_size=6000, vae_steps=1500, vae_mark_weight=4.0, vae_edge_weight=1.0, unet_crop_steps=3000,
               unet_crop=16, unet_crop_batch=16, unet_steps=1000),
}


def _log(msg: str) -> None:
    print(f"[train-base] {msg}", file=sys.stderr, flush=True)


def _pool(state: Path, cfg: BaseTrainConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N,128,128,3], mark alphas uint8 [N,128,128] (0 where unmarked), captions), cached."""
    from ops.forge_base.data import make_pool
    from ops.progress import progress_bar

    tag = "" if cfg.recipe == "v1" else f"{cfg.recipe}-"
    path = state / f"pool-{tag}{cfg.pool_size}-{cfg.seed}.npz"
    if path.is_file():
        with np.load(path) as z:
            images = z["images"]
            alphas = z["alphas"] if "alphas" in z.files else np.zeros(images.shape[:3], np.uint8)
            return images, alphas, [str(c) for c in z["captions"]]
    with progress_bar("forge-base data", total=cfg.pool_size, unit="img") as bar:
        items = make_pool(cfg.pool_size, 128, cfg.seed, progress=lambda _i: bar.update(1), recipe=cfg.recipe)
    images = np.stack([it.image for it in items])
    alphas = np.stack([it.alpha if it.alpha is not None else np.zeros(it.image.shape[:2], np.uint8)
                       for it in items])
    captions = [it.caption for it in items]
    buf = io.BytesIO()
    np.savez(buf, images=images, alphas=alphas, captions=np.array(captions))
    write_bytes_atomic(path, buf.getvalue())
    return images, alphas, captions


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def vae_loss(rec: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, mark_weight: float,
             edge_weight: float) -> torch.Tensor:
    """Reconstruction loss: (L1 + L2) weighted by 1 + ``mark_weight`` x mark opacity, plus ``edge_weight`` x the L1
    of the image gradients' difference. Thin dark lines are a few pixels of a 64 px crop: unweighted they cost a
    VAE almost nothing to blur away, and the gradient term is where a 1-px line is large."""
    rec, x = rec.float(), x.float()
    if not mark_weight and not edge_weight:  # recipe v1's expression, kept as it was for its weights' sake
        return (rec - x).abs().mean() + ((rec - x) ** 2).mean()
    w = 1.0 + mark_weight * alpha
    err = (rec - x).abs() + (rec - x) ** 2
    loss = (err * w).mean() / w.mean()
    if edge_weight:
        (ry, rx), (xy, xx) = _edges(rec), _edges(x)
        loss = loss + edge_weight * ((ry - xy).abs().mean() + (rx - xx).abs().mean())
    return loss


def train_vae(vae: Any, images: np.ndarray, alphas: np.ndarray, cfg: BaseTrainConfig, ckpt: Path) -> list[float]:
    from ops.diffusion.training import train

    data = _to_float(images)
    marks = torch.from_numpy(alphas).float()[:, None] / 255.0
    n, crop = len(data), cfg.vae_crop

    def loss_fn(_step: int, rng: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=rng)
        off = torch.randint(0, 128 - crop + 1, (cfg.vae_batch, 2), generator=rng)
        flip = torch.rand(cfg.vae_batch, generator=rng) < 0.5
        win = [(i, y, xo) for i, (y, xo) in zip(idx.tolist(), off.tolist())]
        x = torch.stack([data[i, :, y:y + crop, xo:xo + crop] for i, y, xo in win])
        a = torch.stack([marks[i, :, y:y + crop, xo:xo + crop] for i, y, xo in win])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        a = torch.where(flip[:, None, None, None], a.flip(-1), a)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=rng)
        rec = vae.decode(z).sample
        kl = post.kl().float().mean() / z[0].numel()
        return vae_loss(rec, x, a, cfg.vae_mark_weight, cfg.vae_edge_weight) + cfg.kl_weight * kl

    vae.train().requires_grad_(True)
    res = train(list(vae.parameters()), loss_fn, cfg.vae_steps, cfg.vae_lr, ckpt_dir=ckpt,
                ckpt_every=cfg.ckpt_every, seed=cfg.seed, weight_decay=0.0, warmup_steps=cfg.warmup,
                mixed_precision=cfg.mixed_precision, desc="forge-base vae")
    vae.eval().requires_grad_(False)
    return res.losses


@torch.no_grad()
def latent_means(vae: Any, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    out = [vae.encode(_to_float(images[i:i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(out)


def mark_centres(alphas: np.ndarray) -> torch.Tensor:
    """[N, 2] (row, col) latent-grid centre of each item's mark (-1 where it has none), for mark-aware crops."""
    out = torch.full((len(alphas), 2), -1, dtype=torch.long)
    for i, a in enumerate(alphas):
        ys, xs = np.nonzero(a > 25)
        if len(ys):
            out[i] = torch.tensor([int(ys.mean()) // 4, int(xs.mean()) // 4])
    return out


def _crop_latents(latents: torch.Tensor, centres: torch.Tensor, size: int, rng: torch.Generator) -> torch.Tensor:
    """A ``size``-cell window of each latent, placed at random but over the mark where there is one (a caption
    that names a defect must see it)."""
    full = latents.shape[-1]
    if size >= full:
        return latents
    free = torch.randint(0, full - size + 1, (len(latents), 2), generator=rng)
    jitter = torch.randint(-(size // 4), size // 4 + 1, (len(latents), 2), generator=rng)
    over = (centres - size // 2 + jitter).clamp(0, full - size)
    start = torch.where(centres >= 0, over, free)
    return torch.stack([z[:, y:y + size, x:x + size] for z, (y, x) in zip(latents, start.tolist())])


def train_denoiser(parts: dict, latents: torch.Tensor, centres: torch.Tensor, captions: list[str],
                   cfg: BaseTrainConfig, ckpt: Path) -> list[float]:
    """UNet + text encoder, progressive: ``unet_crop_steps`` on ``unet_crop``-cell latent windows (the UNet is
    convolutional; a 16-cell window costs a quarter of the full 32-cell latent), then ``unet_steps`` on whole
    latents. Each phase is its own resumable run (``ckpt/crop``, ``ckpt/full``); without a crop phase the one
    run lives in ``ckpt`` itself (recipe v1's layout)."""
    from ops.diffusion.training import denoising_loss, train

    unet, text_encoder, tokenizer, scheduler = parts["unet"], parts["text_encoder"], parts["tokenizer"], \
        parts["scheduler"]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    n = len(latents)

    def loss_for(batch: int, crop: int):
        def loss_fn(_step: int, rng: torch.Generator) -> torch.Tensor:
            idx = torch.randint(0, n, (batch,), generator=rng)
            cond = text_encoder(ids[idx])[0]
            z = _crop_latents(latents[idx], centres[idx], crop, rng)
            return denoising_loss(unet, scheduler, z, cond, rng)
        return loss_fn

    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    losses: list[float] = []
    full = latents.shape[-1]
    if cfg.unet_crop_steps:
        phases = [(ckpt / "crop", cfg.unet_crop_steps, cfg.unet_crop_batch, cfg.unet_crop, cfg.seed + 1, "crop"),
                  (ckpt / "full", cfg.unet_steps, cfg.unet_batch, full, cfg.seed + 2, "full")]
    else:  # one phase, as recipe v1 ran it
        phases = [(ckpt, cfg.unet_steps, cfg.unet_batch, full, cfg.seed + 1, "full")]
    for folder, steps, batch, crop, seed, name in phases:
        res = train(params, loss_for(batch, crop), steps, cfg.unet_lr, ckpt_dir=folder,
                    ckpt_every=cfg.ckpt_every, seed=seed, warmup_steps=cfg.warmup,
                    mixed_precision=cfg.mixed_precision, desc=f"forge-base unet+text ({name})")
        losses += res.losses
    for m in (unet, text_encoder):
        m.eval().requires_grad_(False)
    return losses


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
    images, alphas, captions = _pool(state, cfg)
    parts = build_components(cfg.seed)
    _log(f"pool: {len(images)} images; vae {sum(p.numel() for p in parts['vae'].parameters()) / 1e6:.2f} M, "
         f"unet {sum(p.numel() for p in parts['unet'].parameters()) / 1e6:.2f} M, text encoder "
         f"{sum(p.numel() for p in parts['text_encoder'].parameters()) / 1e6:.2f} M parameters")
    vae_losses = train_vae(parts["vae"], images, alphas, cfg, state / "vae")
    means = latent_means(parts["vae"], images)
    scale = float(1.0 / means.std())
    parts["vae"].register_to_config(scaling_factor=scale)
    _log(f"latent std {means.std():.4f} -> scaling_factor {scale:.4f}")
    unet_losses = train_denoiser(parts, means * scale, mark_centres(alphas), captions, cfg, state / "unet")
    export(parts, out, cfg.dtype)
    meta = {"name": "forge-base", "config": asdict(cfg), "command": command, "scaling_factor": scale,
            "torch": torch.__version__, "vae_loss": _summary(vae_losses), "unet_loss": _summary(unet_losses),
            "files": sha256_files(out)}
    write_bytes_atomic(out / META_FILE, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    size_mb = sum((out / f).stat().st_size for f in meta["files"]) / 1e6
    _log(f"{time.perf_counter() - t0:.0f} s; wrote {out} ({size_mb:.1f} MB)")
    return out
