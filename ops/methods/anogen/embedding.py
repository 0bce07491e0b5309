"""AnoGen stage 1: one learned token embedding per defect type, fitted with the mask-guided denoising loss.

    v* = argmin_v  E_{z0, ε, t} || (ε − ε_θ(z_t, t, c(v))) ⊙ M ||²        (papers/anogen.md, L'_LDM)

z0 = VAE latent of a support anomaly, M = its ground-truth mask at latent resolution, c(v) = the text encoder's
output for the prompt with the placeholder token whose input embedding is v. Base model (UNet, VAE, text encoder,
every other embedding row) frozen: the trainable tensor is ONE row, held by ``ops.diffusion.textual_inversion``
(a forward hook substitutes it at the placeholder position, so the embedding matrix itself never changes).

Choices where the paper is vague:
- Mask to latent resolution: each latent cell gets the fraction of its pixels inside M (area), and the cell counts
  when that fraction is > 0 (max-pooling, ``ops.diffusion.training.latent_mask``): a thin scratch never vanishes
  at 1/8 resolution. The squared error is averaged over the masked cells and channels per sample, then over the
  batch (``training.denoising_loss``), so with M ≡ 1 the loss is plain textual inversion's mean squared error and
  a small defect weighs as much as a large one. Support images are stretched to the model's square resolution
  like their masks (the same adaptive pooling handles any size).
- Each step draws ``batch_size`` support anomalies of the type with replacement, t ~ U{0..T−1}, ε ~ N(0, I), all
  from the training loop's seeded generator (resumable to bit-identical embeddings on CPU). No augmentation.
- Init: the placeholder's row starts as the embedding of ``init_word`` ("defect", one CLIP token). The prompt
  template (``{token}`` = the placeholder) defaults to the token alone (the authors' code trains and samples
  with the prompt "*"), so at step 0 it reads "defect"; training and sampling use the same prompt, which is
  saved next to the token.
- AdamW (weight decay 1e-2, diffusers' textual-inversion default), constant lr, no gradient clipping (as the
  LDM / diffusers textual-inversion scripts).
- Files per defect type under ``<adapter>/<defect_type>/``: ``learned_embeds-0.safetensors`` (diffusers'
  textual-inversion layout ``{token: float32 [1, D]}``, ``pipe.load_textual_inversion(file)`` reads it),
  ``token.json`` (token, prompt, init word, settings hash, loss history; written LAST, so it marks a finished
  fit), ``run.json`` (hash of the run the checkpoints belong to) and ``checkpoints/`` (resume state).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ops.atomic import write_bytes_atomic
from ops.diffusion import textual_inversion as ti
from ops.diffusion.training import denoising_loss, latent_mask, train
from ops.diffusion.vae import encode
from ops.methods.base import backbone_identity, read_adapter_record, training_digest
from ops.storage import check_name
from ops.types import Sample

FORMAT_VERSION = 1
INFO_FILE = "token.json"
EMBEDS_FILE = "learned_embeds-0.safetensors"  # what TextualInversion.save writes for one placeholder


@dataclass(frozen=True)
class FitSettings:
    prompt: str = "{token}"
    init_word: str = "defect"
    steps: int = 6000
    lr: float = 5e-3
    batch_size: int = 1
    seed: int = 0
    ckpt_every: int = 500


def placeholder(category: str, defect_type: str) -> str:
    """The new token of one defect type; a name no CLIP vocabulary word can collide with."""
    return f"<anogen-{category}-{defect_type}>"


def render(template: str, category: str, defect_type: str, token: str) -> str:
    return template.format(category=category, defect_type=defect_type.replace("_", " "), token=token)


def support_tensors(backbone: Any, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w) float32, masks (N, 1, h, w) float {0, 1} on the latent grid) of the support set."""
    latents = torch.cat([encode(backbone, s.image) for s in samples]).float()
    size = tuple(latents.shape[-2:])
    masks = []
    for s in samples:
        if s.mask is None or not s.mask.any():
            raise ValueError(f"{s.source or s.image_id}: AnoGen's loss needs the support anomaly's mask and it is "
                             f"missing or empty; fix the ground-truth mask file")
        masks.append(latent_mask(torch.from_numpy(s.mask)[None], size))
    return latents, torch.cat(masks).to(latents.device)


def masked_loss(backbone: Any, latents: torch.Tensor, masks: torch.Tensor | None, prompt: str, batch_size: int,
                rng: torch.Generator) -> torch.Tensor:
    """One draw of L'_LDM: ``batch_size`` support latents (with replacement) under the prompt; ``masks=None`` is
    plain textual inversion (the unmasked loss)."""
    idx = torch.randint(len(latents), (batch_size,), generator=rng, device=rng.device).to(latents.device)
    cond = backbone.encode_prompt([prompt] * batch_size)
    return denoising_loss(backbone.unet, backbone.scheduler, latents[idx], cond, rng,
                          mask=None if masks is None else masks[idx])


def settings_hash(settings: FitSettings, backbone: Any, samples: Sequence[Sample], prompt: str) -> str:
    """What makes two fits the same: settings, prompt, backbone, and the exact support pixels and masks."""
    return training_digest([{**asdict(settings), "prompt": prompt, **backbone_identity(backbone, FORMAT_VERSION)}],
                           samples, masks=True)


def read_info(dt_dir: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    return read_adapter_record(Path(dt_dir) / INFO_FILE, "anogen", missing_ok)


@dataclass
class FitResult:
    info: dict[str, Any]
    skipped: bool
    cond: torch.Tensor | None = None  # text-encoder output of the prompt with the trained row (None when skipped)


def fit_token(backbone: Any, category: str, defect_type: str, samples: Sequence[Sample], settings: FitSettings,
              dt_dir: Path, progress: Any = None, masked: bool = True) -> FitResult:
    """Fit (or resume, or reuse) the embedding of one defect type; ``masked=False`` is the paper's ablation."""
    dt_dir = Path(dt_dir)
    token = placeholder(check_name(category, "category"), check_name(defect_type, "defect type"))
    prompt = render(settings.prompt, category, defect_type, token)
    digest = settings_hash(settings, backbone, samples, prompt) + ("" if masked else "-unmasked")
    done = read_info(dt_dir, missing_ok=True)
    if done is not None and done.get("settings_hash") == digest and (dt_dir / done["file"]).is_file():
        return FitResult(done, skipped=True)
    run_file = dt_dir / "run.json"
    if run_file.is_file() and json.loads(run_file.read_text()).get("settings_hash") != digest:
        shutil.rmtree(dt_dir / "checkpoints", ignore_errors=True)  # another run's state must not be resumed
    (dt_dir / INFO_FILE).unlink(missing_ok=True)
    write_bytes_atomic(run_file, json.dumps({"settings_hash": digest}).encode())

    latents, masks = support_tensors(backbone, samples)
    inv = ti.add_placeholder_tokens(backbone.tokenizer, backbone.text_encoder, [token], settings.init_word)
    init = inv.embeddings.detach().clone()
    try:
        def loss_fn(_step: int, rng: torch.Generator) -> torch.Tensor:
            return masked_loss(backbone, latents, masks if masked else None, prompt, settings.batch_size, rng)

        result = train(inv.params, loss_fn, settings.steps, settings.lr, ckpt_dir=dt_dir / "checkpoints",
                       ckpt_every=settings.ckpt_every, seed=settings.seed, progress=progress, max_grad_norm=None,
                       frozen_modules=[backbone.unet, backbone.text_encoder, backbone.vae],
                       desc=f"anogen {category}/{defect_type}")
        with torch.no_grad():
            cond = backbone.encode_prompt([prompt])  # through the hook: exactly what training saw
        paths = inv.save(dt_dir)
    finally:
        inv.detach()
    info = {"format": FORMAT_VERSION, "settings_hash": digest, "token": token, "prompt": prompt,
            "init_word": settings.init_word, "masked": masked, "category": category, "defect_type": defect_type,
            "file": paths[0].name, "model_id": backbone.model_id, "resolution": backbone.resolution,
            "T": int(backbone.scheduler.config.num_train_timesteps), "dim": int(init.shape[-1]),
            **{k: v for k, v in asdict(settings).items() if k != "prompt"},
            "support_ids": sorted(s.image_id for s in samples), "losses": result.losses,
            "resumed_from": result.resumed_from, "seconds": result.seconds,
            "moved": float((inv.embeddings.detach() - init).norm())}
    write_bytes_atomic(dt_dir / INFO_FILE, json.dumps(info, indent=1).encode())
    return FitResult(info, skipped=False, cond=cond)


def load_token(backbone: Any, dt_dir: Path, info: dict[str, Any]) -> int:
    """Put the saved row into the backbone's tokenizer + text encoder (idempotent); returns the token id."""
    path = Path(dt_dir) / info["file"]
    token, _ = ti.read_learned_embeds(path)
    if token != info["token"]:
        raise ValueError(f"{path}: holds token {token!r} but {Path(dt_dir) / INFO_FILE} names {info['token']!r}; "
                         f"rerun anomaly_adapters for method 'anogen'")
    return ti.load_learned_tokens(backbone.tokenizer, backbone.text_encoder, [path])[0]
