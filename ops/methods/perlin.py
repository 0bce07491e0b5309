"""Perlin baseline: DRAEM's anomaly simulation (Zavrtanik et al., ICCV 2021) restricted to the target mask.

    I_a = (1 - M) ⊙ I + (1 - β) (M ⊙ A) + β (M ⊙ I)

Choices where the paper, its code and the brief differ or are silent:

- Noise: our own 2-D gradient Perlin noise (random unit gradients on a lattice, quintic fade), scaled by
  sqrt(2) as in DRAEM's code. The lattice has 2^ex x 2^ey cells across the whole image with ex, ey drawn
  independently from [min_scale_exp, max_scale_exp) = [0, 6) as in DRAEM's code (``randint(0, 6)``): DRAEM
  works on 256 px images, so cells span the same fraction of the image at any resolution. The noise is
  rotated by U(-90, 90) degrees (DRAEM's ``iaa.Affine(rotate=(-90, 90))``) and thresholded at 0.5.
- Where: the target mask decides where, the thresholded Perlin pattern decides the shape inside it:
  M = (noise > threshold) ∩ target. If M covers less than ``min_cover`` (5 %) of the target, the threshold is
  lowered to the noise quantile that covers ``fallback_cover`` (50 %) of the target; a single-pixel target
  becomes M itself. So M is never empty and always inside the target. M is the output mask. (DRAEM's fixed
  0.5 threshold marks about 5 % of an image, so small targets often take the quantile rule.)
- β ~ U(0.1, 0.8): the paper states [0.1, 1.0], its code uses U(0, 0.8); β near 1 leaves the image
  unchanged under a mask labelled defect, so the code's upper bound is kept with the paper's lower bound.
- Anomaly source A (no DTD download): ``texture_source="skimage"`` (default) takes one of scikit-image's
  bundled photographs (``TEXTURES``), a random crop of 50-100 % of its side resized to the image; ``"self"``
  shuffles a k x k grid (k in {2, 4, 8}) of the normal image's own tiles. Then ``n_augment`` (3, DRAEM's
  ``SomeOf(3)``) distinct augmentations from DRAEM's list, applied in random order: gamma contrast, brightness
  multiply/add, sharpness, hue/saturation shift, solarize, posterize, invert, autocontrast, equalize, rotate.
- Image-level-only categories (no real masks, ``ops.image_level``): the target is a random box on the
  product's foreground (``ops.masks.targets`` mode "box") and the shape inside it the thresholded noise, as ever.
- Randomness comes only from the job's seed, so results are deterministic per job.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ops.methods.base import Method, MethodConfig, Progress, no_progress, synthesize_each
from ops.types import Adapter, Synthetic, SynthesisJob

TEXTURES = ("brick", "grass", "gravel", "moon", "immunohistochemistry", "hubble_deep_field", "coffee", "chelsea",
            "rocket", "astronaut", "retina", "camera")


@dataclass
class PerlinConfig(MethodConfig):
    min_scale_exp: int = 0
    max_scale_exp: int = 6  # exclusive, as DRAEM's randint
    threshold: float = 0.5
    rotation: float = 90.0  # noise rotated by U(-rotation, rotation) degrees
    beta_low: float = 0.1
    beta_high: float = 0.8
    texture_source: str = "skimage"  # "skimage" | "self"
    n_augment: int = 3
    min_cover: float = 0.05
    fallback_cover: float = 0.5


class Perlin(Method):
    """DRAEM-style anomaly: thresholded Perlin noise inside the target mask, filled with an offline texture (beta-blended)."""

    name = "perlin"
    config_cls = PerlinConfig
    needs_backbone = False
    needs_reference = False
    needs_masks = False  # the anomaly is procedural: only the target region came from a support mask

    def synthesize(self, backbone, adapter: Adapter, jobs: Sequence[SynthesisJob], cfg: PerlinConfig,
                   progress: Progress = no_progress) -> Iterator[Synthetic]:
        _check(cfg)
        return synthesize_each(self.name, jobs, lambda job: draem_anomaly(job, cfg), progress)


def _check(cfg: PerlinConfig) -> None:
    problems = []
    if not 0 <= cfg.min_scale_exp < cfg.max_scale_exp:
        problems.append("0 <= min_scale_exp < max_scale_exp")
    if not 0.0 <= cfg.beta_low <= cfg.beta_high < 1.0:
        problems.append("0 <= beta_low <= beta_high < 1")
    if cfg.texture_source not in ("skimage", "self"):
        problems.append("texture_source in {'skimage', 'self'}")
    if not 0 <= cfg.n_augment <= len(AUGMENTATIONS):
        problems.append(f"0 <= n_augment <= {len(AUGMENTATIONS)}")
    if not 0.0 <= cfg.min_cover <= 1.0 or not 0.0 < cfg.fallback_cover <= 1.0:
        problems.append("min_cover in [0, 1] and fallback_cover in (0, 1]")
    if problems:
        raise ValueError(f"perlin config {cfg}: need " + "; ".join(problems))


def draem_anomaly(job: SynthesisJob, cfg: PerlinConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    normal, target = job.normal.image, job.target_mask
    if not target.any():
        raise ValueError(f"perlin job {job.index}: the target mask is empty")
    h, w = target.shape
    rng = np.random.default_rng(job.seed)
    ey, ex = (int(v) for v in rng.integers(cfg.min_scale_exp, cfg.max_scale_exp, size=2))
    noise = perlin_noise((h, w), (2 ** ey, 2 ** ex), rng)
    angle = float(rng.uniform(-cfg.rotation, cfg.rotation))
    rot = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    noise = cv2.warpAffine(noise.astype(np.float32), rot, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    threshold = cfg.threshold
    mask = (noise > threshold) & target
    if mask.sum() < cfg.min_cover * target.sum() or not mask.any():
        threshold = float(np.quantile(noise[target], 1.0 - cfg.fallback_cover))
        mask = (noise >= threshold) & target
    source, source_params = anomaly_source(normal, cfg, rng)
    beta = float(rng.uniform(cfg.beta_low, cfg.beta_high))
    out = normal.copy()
    blended = (1.0 - beta) * source[mask].astype(np.float64) + beta * normal[mask].astype(np.float64)
    out[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    params = dict(source_params, scale=[2 ** ey, 2 ** ex], noise_angle=round(angle, 4),
                  threshold=round(threshold, 6), beta=round(beta, 6),
                  cover=round(float(mask.sum() / target.sum()), 6))
    return out, mask, params


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient noise, ``res`` lattice cells along (y, x) spanning the whole ``shape``; roughly in [-1, 1]."""
    h, w = shape
    ry, rx = res
    theta = rng.uniform(0.0, 2 * np.pi, size=(ry + 1, rx + 1))
    gy, gx = np.sin(theta), np.cos(theta)
    y = np.arange(h) * (ry / h)
    x = np.arange(w) * (rx / w)
    iy, ix = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        cy, cx = (iy + dy)[:, None], (ix + dx)[None, :]
        return gy[cy, cx] * (fy - dy) + gx[cy, cx] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return np.sqrt(2.0) * (top * (1 - uy) + bottom * uy)


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def anomaly_source(normal: np.ndarray, cfg: PerlinConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    h, w = normal.shape[:2]
    if cfg.texture_source == "skimage":
        name = TEXTURES[int(rng.integers(len(TEXTURES)))]
        tex = _bundled_texture(name)
        th, tw = tex.shape[:2]
        side = rng.uniform(0.5, 1.0)
        ch, cw = max(1, int(th * side)), max(1, int(tw * side))
        y0, x0 = int(rng.integers(th - ch + 1)), int(rng.integers(tw - cw + 1))
        source = cv2.resize(tex[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
        params = {"texture": name, "texture_crop": [y0, x0, ch, cw]}
    else:
        k = int(rng.choice([2, 4, 8]))
        source = _shuffle_tiles(normal, k, rng)
        params = {"texture": "self", "tiles": k}
    chosen = rng.choice(len(AUGMENTATIONS), size=cfg.n_augment, replace=False)
    pil = Image.fromarray(source)
    for i in chosen:
        pil = AUGMENTATIONS[int(i)][1](pil, rng)
    params["augment"] = [AUGMENTATIONS[int(i)][0] for i in chosen]
    return np.asarray(pil.convert("RGB"), dtype=np.uint8), params


@lru_cache(maxsize=len(TEXTURES))
def _bundled_texture(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    img.setflags(write=False)
    return img


def _shuffle_tiles(image: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    ys, xs = np.linspace(0, h, k + 1).astype(int), np.linspace(0, w, k + 1).astype(int)
    tiles = [image[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] for i in range(k) for j in range(k)]
    order = rng.permutation(len(tiles))
    out = np.empty_like(image)
    for slot, src in enumerate(order):
        i, j = divmod(slot, k)
        th, tw = ys[i + 1] - ys[i], xs[j + 1] - xs[j]
        out[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = cv2.resize(tiles[src], (tw, th), interpolation=cv2.INTER_LINEAR)
    return out


def _lut(pil: Image.Image, fn) -> Image.Image:
    table = np.clip(np.rint([fn(v) for v in range(256)]), 0, 255).astype(np.uint8).tolist()
    return pil.point(table * 3)


def _gamma(pil, rng):
    g = rng.uniform(0.5, 2.0)
    return _lut(pil, lambda v: 255.0 * (v / 255.0) ** g)


def _brightness(pil, rng):
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30, 30)
    return _lut(pil, lambda v: v * mul + add)


def _hue_saturation(pil, rng):
    hsv = cv2.cvtColor(np.asarray(pil), cv2.COLOR_RGB2HSV_FULL).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    return Image.fromarray(cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL))


def _rotate(pil, rng):
    arr = np.asarray(pil)
    h, w = arr.shape[:2]
    rot = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), float(rng.uniform(-45, 45)), 1.0)
    return Image.fromarray(cv2.warpAffine(arr, rot, (w, h), borderMode=cv2.BORDER_REFLECT_101))


AUGMENTATIONS = (
    ("gamma", _gamma),
    ("brightness", _brightness),
    ("sharpness", lambda pil, rng: ImageEnhance.Sharpness(pil).enhance(float(rng.uniform(0.0, 2.0)))),
    ("hue_saturation", _hue_saturation),
    ("solarize", lambda pil, rng: ImageOps.solarize(pil, int(rng.integers(32, 129)))),
    ("posterize", lambda pil, rng: ImageOps.posterize(pil, int(rng.integers(1, 9)))),
    ("invert", lambda pil, rng: ImageOps.invert(pil)),
    ("autocontrast", lambda pil, rng: ImageOps.autocontrast(pil)),
    ("equalize", lambda pil, rng: ImageOps.equalize(pil)),
    ("rotate", _rotate),
)
