"""O2MAG's Anomaly-Guided Optimization (AGO): one optimised text embedding e* per reference anomaly image.

e* = argmin_e E_{t, ε} ||ε − ε_θ(z_t, t, e)||² on the reference image's latent with the diffusion model frozen
(papers/o2mag.md, "Key Designs" 2). Choices where the paper is vague:

- e is the text encoder's OUTPUT for the prompt (the (77, D) encoder hidden states the UNet cross-attends to), as
  in Imagic / null-text inversion, not a token-embedding row as in textual inversion: the paper optimises "the
  text embedding e", and the output is what the denoising loss sees directly. It starts from the prompt's
  embedding, "a photo of a {category} with a {defect_type} defect" by default. A pipeline takes it as
  ``prompt_embeds``.
- Loss: the toolkit's ``training.denoising_loss`` on the whole reference image (no mask; the paper optimises the
  reconstruction of the reference). t ~ U{0..T−1} and ε ~ N(0, I) per step from the loop's seeded generator,
  ``batch_size`` draws per step (1 by default; the paper does not say).
- Optimiser: "Adam, lr 3e-3" = the toolkit loop's AdamW with weight decay 0 (identical to Adam) and no gradient
  clipping. The UNet and text encoder are passed as frozen modules, so the loop refuses to run if any of their
  weights could train.
- Cache key: sha256 of the reference pixels (dtype, shape, bytes) + model id + resolution + prompt + every
  optimisation setting. The file is ``<dir>/<key>.safetensors`` = {"embedding": float32 (77, D)} with the
  settings, model id and losses in its metadata, written atomically. Its presence marks a finished run: a rerun,
  or any number of targets using that reference, load it instead of optimising again. Checkpoints for resuming
  an interrupted run live in ``<dir>/checkpoints/<key>/`` and are deleted once the embedding file exists.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ops.atomic import canonical_safetensors, write_bytes_atomic
from ops.diffusion.training import TrainResult, denoising_loss, train
from ops.diffusion.vae import encode, image_key
from ops.methods.base import Progress, loss_summary

FORMAT_VERSION = 1
TENSOR_NAME = "embedding"


@dataclass(frozen=True)
class AGOSettings:
    steps: int = 30
    lr: float = 3e-3
    seed: int = 0
    batch_size: int = 1
    ckpt_every: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1 or self.ckpt_every < 0:
            raise ValueError(f"AGO settings need steps >= 0, lr > 0, batch_size >= 1, ckpt_every >= 0; got {self}")


def ago_key(backbone: Any, image: np.ndarray, prompt: str, settings: AGOSettings) -> str:
    """What makes two optimisations the same (ckpt_every only affects resumability, not the result)."""
    h = hashlib.sha256()
    fields = {k: v for k, v in asdict(settings).items() if k != "ckpt_every"}
    h.update(json.dumps({"format": FORMAT_VERSION, "model": backbone.model_id, "resolution": backbone.resolution,
                         "dtype": str(backbone.dtype), "prompt": prompt, **fields}, sort_keys=True).encode())
    h.update(image_key(image).encode())
    return h.hexdigest()[:24]


def optimize_embedding(backbone: Any, image: np.ndarray, prompt: str, settings: AGOSettings,
                       ckpt_dir: Any = None, progress: Progress | None = None,
                       desc: str = "o2mag AGO") -> tuple[torch.Tensor, TrainResult]:
    """e* (1, 77, D) float32 on the backbone's device for one uint8 HxWx3 reference image."""
    latent = encode(backbone, image).float()
    if settings.batch_size > 1:
        latent = latent.expand(settings.batch_size, *latent.shape[1:])
    with torch.no_grad():
        e0 = backbone.encode_prompt([prompt]).float()
    e = torch.nn.Parameter(e0.clone())
    unet, scheduler, dtype = backbone.unet, backbone.scheduler, backbone.dtype

    def loss_fn(_step: int, rng: torch.Generator) -> torch.Tensor:
        cond = e.to(dtype).expand(latent.shape[0], *e.shape[1:])
        return denoising_loss(unet, scheduler, latent.to(dtype), cond, rng)

    result = train([e], loss_fn, settings.steps, settings.lr, ckpt_dir=ckpt_dir, ckpt_every=settings.ckpt_every,
                   seed=settings.seed, progress=progress, max_grad_norm=None, weight_decay=0.0,
                   frozen_modules=[unet, backbone.text_encoder], desc=desc)
    return e.detach(), result


def save_embedding(path: Path, embedding: torch.Tensor, meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    tensor = embedding.detach().to("cpu", torch.float32).reshape(embedding.shape[-2:]).contiguous()
    data = save({TENSOR_NAME: tensor}, metadata={"o2mag": json.dumps(meta, sort_keys=True)})
    write_bytes_atomic(path, canonical_safetensors(data))


def read_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("o2mag", "{}"))


def load_embedding(path: Path, backbone: Any) -> torch.Tensor:
    """(1, 77, D) on the backbone's device and dtype; refuses an embedding of another model."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no O2MAG AGO embedding there; materialize anomaly_adapters for method "
                                f"'o2mag' (it optimises one embedding per support image)")
    try:
        state, meta = load_file(str(path)), read_meta(path)
    except Exception as e:  # a torn or foreign file
        raise ValueError(f"{path}: unreadable AGO embedding ({e}); delete it and rerun anomaly_adapters") from e
    if meta.get("model_id") != backbone.model_id:
        raise ValueError(f"{path}: embedding was optimised for model {meta.get('model_id')!r}, the backbone is "
                         f"{backbone.model_id!r}; rerun anomaly_adapters for method 'o2mag' with this backbone")
    emb = state.get(TENSOR_NAME)
    dim = backbone.text_encoder.config.hidden_size
    if emb is None or emb.ndim != 2 or emb.shape[1] != dim:
        raise ValueError(f"{path}: expected {{'{TENSOR_NAME}': [L, {dim}]}}, found "
                         f"{ {k: tuple(v.shape) for k, v in state.items()} }; rerun anomaly_adapters")
    return emb[None].to(backbone.device, backbone.dtype)


def fit_reference(backbone: Any, image: np.ndarray, image_id: str, prompt: str, settings: AGOSettings,
                  out_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Optimise (or find cached) e* for one reference; returns its summary (file name relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    key = ago_key(backbone, image, prompt, settings)
    path = out_dir / f"{key}.safetensors"
    summary = {"file": path.name, "key": key, "image_sha256": image_key(image), "prompt": prompt}
    if path.is_file():
        meta = read_meta(path)
        if meta.get("key") == key:
            return {**summary, "loss_first": meta.get("loss_first"), "loss_last5": meta.get("loss_last5"),
                    "skipped": True}
    ckpt_dir = out_dir / "checkpoints" / key
    emb, result = optimize_embedding(backbone, image, prompt, settings, ckpt_dir=ckpt_dir, progress=progress,
                                     desc=f"o2mag AGO {image_id}")
    losses = result.losses
    meta = {"format": FORMAT_VERSION, "key": key, "image_id": image_id, "image_sha256": summary["image_sha256"],
            "prompt": prompt, "model_id": backbone.model_id, "resolution": backbone.resolution,
            **asdict(settings), "losses": losses, **loss_summary(losses)}  # no timing: reruns give equal bytes
    save_embedding(path, emb, meta)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if ckpt_dir.parent.is_dir() and not any(ckpt_dir.parent.iterdir()):
        ckpt_dir.parent.rmdir()
    return {**summary, "loss_first": meta["loss_first"], "loss_last5": meta["loss_last5"], "skipped": False}

