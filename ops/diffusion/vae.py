"""VAE helpers: images <-> scaled latents, and a content-addressed latent cache.

Choices:
- ``encode`` takes uint8 images (HxWx3 or NxHxWx3, numpy or torch) or float tensors (NCHW in [-1, 1], the
  diffusers convention). Images are resized to ``backbone.resolution`` square (bilinear, antialiased) before
  encoding; non-square images are therefore stretched, and ``decode(size=...)`` stretches back.
- Latents are the posterior MEAN times ``vae.config.scaling_factor`` (deterministic: no sampling noise, so the
  same image always gives the same latent and caching is exact).
- ``decode`` clamps to [-1, 1] and rounds to uint8 (NxHxWx3 numpy).
- Encoding/decoding runs in chunks of ``batch_size`` under ``torch.no_grad`` in the backbone's dtype.
- ``LatentCache`` keys are sha256(image bytes + shape) + model id + resolution + dtype. Memory: an LRU of
  ``max_items`` CPU float32 latents. Disk (optional ``cache_dir``): ``<dir>/<sha256(model id)[:16]>/<res>-<dtype>/
  <image sha256>.pt`` written atomically; a corrupt or mismatching file is ignored and rewritten. A local model
  folder whose weights change in place keeps its id: delete the cache folder when swapping weights.
"""
from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ops.atomic import write_bytes_atomic


def to_model_input(images: Any) -> torch.Tensor:
    """uint8 HxWx3 / NxHxWx3 (numpy or torch) or float NCHW in [-1, 1] -> float32 NCHW in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor of images, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be HxWx3 or NxHxWx3 RGB, got shape {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be NCHW with 3 channels in [-1, 1], got shape {tuple(images.shape)}")
    return images.float()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NxHxWx3."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def encode(backbone: Any, images: Any, batch_size: int = 8) -> torch.Tensor:
    """Images -> scaled latents (N, C, res/f, res/f) on the backbone's device and dtype."""
    x = to_model_input(images)
    res = backbone.resolution
    out = []
    for i in range(0, x.shape[0], batch_size):
        chunk = _resize(x[i:i + batch_size], (res, res)).to(backbone.device, backbone.dtype)
        out.append(backbone.vae.encode(chunk).latent_dist.mean * backbone.latent_scale)
    return torch.cat(out)


@torch.no_grad()
def decode(backbone: Any, latents: torch.Tensor, size: tuple[int, int] | None = None,
           batch_size: int = 8) -> np.ndarray:
    """Scaled latents -> uint8 NxHxWx3 images (resized to ``size`` = (H, W) when given)."""
    out = []
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i:i + batch_size].to(backbone.device, backbone.dtype) / backbone.latent_scale
        x = backbone.vae.decode(z).sample.float()
        out.append(_resize(x, size) if size is not None else x)
    return to_uint8(torch.cat(out))


def image_key(image: np.ndarray) -> str:
    a = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


class LatentCache:
    """Latents of single uint8 HxWx3 images, keyed by content + model + resolution (memory LRU, optional disk)."""

    def __init__(self, cache_dir: str | Path | None = None, max_items: int = 256):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_items = max_items
        self._mem: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _key(self, backbone: Any, image: np.ndarray) -> tuple:
        return (backbone.model_id, backbone.resolution, str(backbone.dtype).removeprefix("torch."), image_key(image))

    def _file(self, key: tuple) -> Path | None:
        if self.cache_dir is None:
            return None
        model, res, dtype, digest = key
        model_dir = hashlib.sha256(str(model).encode()).hexdigest()[:16]
        return self.cache_dir / model_dir / f"{res}-{dtype}" / f"{digest}.pt"

    def _remember(self, key: tuple, z: torch.Tensor) -> None:
        self._mem[key] = z
        self._mem.move_to_end(key)
        while len(self._mem) > self.max_items:
            self._mem.popitem(last=False)

    def _load(self, path: Path, key: tuple) -> torch.Tensor | None:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception:  # a torn or foreign file is a miss; it is rewritten atomically below
            return None
        if not isinstance(blob, dict) or blob.get("key") != list(key) or not isinstance(blob.get("z"), torch.Tensor):
            return None
        return blob["z"]

    def encode(self, backbone: Any, image: np.ndarray) -> torch.Tensor:
        """Latent (1, C, h, w) of one uint8 HxWx3 image on the backbone's device and dtype."""
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3):
            raise ValueError("LatentCache.encode takes one uint8 HxWx3 numpy image")
        key = self._key(backbone, image)
        z = self._mem.get(key)
        path = self._file(key)
        if z is None and path is not None:
            z = self._load(path, key)
        if z is None:
            self.misses += 1
            z = encode(backbone, image).float().cpu()
            if path is not None:
                buf = io.BytesIO()
                torch.save({"key": list(key), "z": z}, buf)
                write_bytes_atomic(path, buf.getvalue())
        else:
            self.hits += 1
        self._remember(key, z)
        return z.to(backbone.device, backbone.dtype)
