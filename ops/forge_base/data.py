"""forge-base's training data: permissively licensed photographs, procedural textures and generic surface marks.

Everything is made offline and seeded; ``make_pool(n, size, seed)`` returns uint8 images with captions.

Two recipes (``make_pool(..., recipe=)``): ``v1``, the one the shipped weights were trained on, and ``v2``, weighted
toward the surfaces the methods encode. Where they differ, v1 is said in brackets.

Recipe (the choices where nothing fixes them):
- Weighted toward the surfaces the methods will encode. Each sample is, with these probabilities:
  ``P_DEMO`` a demo-matched surface: brick, grass or gravel tinted as the demo tints it and cut with the demo's
  own crop function (``ops.demo_data.crop``: 30-55 % of the photograph, Lanczos) from the train columns only;
  ``P_TEXTURE`` a procedural texture; ``P_WIDE`` one of the three surface photographs at a wider range of scales
  (12-60 % of the short side) with a random tint; the rest one of the other photographs. v1 drew half its
  samples from all fifteen photographs alike (cats, rockets) and its surface crops were smoother and smaller
  than the demo's: its VAE reached 19 dB on the demo's held-out images where a VAE trained on demo-matched crops
  reached 27-32 dB in the same budget. [v1: ``P_PHOTO_V1`` of the samples from all fifteen photographs alike, the
  rest procedural textures.]
- Photographs (``PHOTOS``): every image bundled in the scikit-image wheel whose loader's docstring states CC0 or
  public domain (``skimage/data/_fetchers.py``); images with no licence statement (moon, page) or only "no known
  copyright restrictions" (coins, immunohistochemistry) are left out. A photograph sample is a random square crop
  (12-60 % of the shorter side), optionally mirrored, resized to ``size``, colour-jittered (gain, offset, gamma,
  per-channel tint; grayscale photographs get a random tint so they become coloured surfaces).
- The demo's three texture photographs (brick, grass, gravel) are cropped ONLY from the columns the demo never
  uses for its ``test/`` images (``ops.demo_data.column_range(width, heldout=False)``): no pixel of a held-out
  demo image is in the training data.
- Procedural textures (``TEXTURES``): fractal value noise, stripes, a weave, wood rings, brushed metal, cells
  (Voronoi-like stones), each with random colours and scales.
- Marks (``MARKS``, drawn with probability ``P_MARK`` and the weights ``MARK_WEIGHTS``), drawn by THIS module
  (not the demo's defect drawer, ``ops.demo_data.draw_defect``): a scratch (a thin smooth curve, 1-2.5 px,
  brighter or darker), a crack (a dark jagged line following a noise ridge, 1-3 px, with up to two thinner
  branches), a hole (a dark pit with a soft shaded rim), a dent (a smooth shaded depression), a stain (a colour
  blob from thresholded smooth noise), a discolouration (a large faint tint patch). Thin marks weigh most
  because they are what a VAE loses first. [v1: marks on ``P_MARK_V1`` of the samples, all six alike, cracks
  1-2.5 px without branches.] Each item keeps its mark's alpha (``Item.alpha``), which the VAE's
  loss up-weights and the UNet's crops are centred on.
- Captions: "a photo of a {surface}" for clean samples and "a photo of a {surface} with a {mark} defect" for
  marked ones (the wording of the methods' default prompts), plus an empty caption for 10 % of samples so that
  classifier-free guidance has an unconditional branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

# name -> (skimage.data loader, caption word, licence as its docstring states it)
PHOTOS: dict[str, tuple[str, str, str]] = {
    "astronaut": ("astronaut", "astronaut", "public domain (NASA)"),
    "brick": ("brick", "brick", "CC0"),
    "camera": ("camera", "camera man", "CC0"),
    "cell": ("cell", "cell", "CC0 / public domain"),
    "chelsea": ("chelsea", "cat", "CC0"),
    "clock": ("clock", "clock", "public domain"),
    "coffee": ("coffee", "coffee cup", "CC0"),
    "grass": ("grass", "grass", "CC0"),
    "gravel": ("gravel", "gravel", "CC0"),
    "horse": ("horse", "horse", "CC0"),
    "hubble_deep_field": ("hubble_deep_field", "galaxy", "public domain (NASA)"),
    "microaneurysms": ("microaneurysms", "retina", "CC0"),
    "retina": ("retina", "retina", "CC0"),
    "rocket": ("rocket", "rocket", "public domain"),
    "text": ("text", "text", "public domain"),
}
DEMO_PHOTOS = ("brick", "grass", "gravel")
TEXTURES = ("noise", "stripes", "weave", "wood", "metal", "stone")
MARKS = ("scratch", "crack", "hole", "dent", "stain", "discoloration")
MARK_WEIGHTS = (0.24, 0.24, 0.18, 0.08, 0.18, 0.08)
P_MARK, P_EMPTY_CAPTION = 0.6, 0.1
P_DEMO, P_TEXTURE, P_WIDE = 0.5, 0.25, 0.12  # the rest (0.13): the other photographs
P_MARK_V1, P_PHOTO_V1 = 0.5, 0.5
RECIPES = ("v1", "v2")


@dataclass
class Item:
    image: np.ndarray  # uint8 HxWx3
    caption: str
    mark: str | None
    alpha: np.ndarray | None = None  # uint8 HxW: the mark's opacity x 255 (None: no mark)


def _load_photo(name: str) -> np.ndarray:
    import skimage.data

    from ops.demo_data import column_range

    img = getattr(skimage.data, PHOTOS[name][0])()
    img = img.astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    if name in DEMO_PHOTOS:
        c0, c1 = column_range(img.shape[1], heldout=False)
        img = img[:, c0:c1]
    return np.ascontiguousarray(img)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c])).resize((size, size),
                                                                                 Image.Resampling.BILINEAR))
             for c in range(3)]
    return np.stack(chans, axis=-1)


def _jitter(img: np.ndarray, rng: np.random.Generator, grayscale: bool) -> np.ndarray:
    tint = rng.uniform(0.6, 1.15, size=3) if grayscale else rng.uniform(0.9, 1.1, size=3)
    img = np.clip(img * rng.uniform(0.8, 1.2) + rng.uniform(-0.08, 0.08), 0, 1) ** rng.uniform(0.8, 1.25)
    return np.clip(img * tint, 0, 1)


def photo_crop(photo: np.ndarray, size: int, rng: np.random.Generator, grayscale: bool) -> np.ndarray:
    h, w = photo.shape[:2]
    side = int(rng.integers(max(8, int(0.12 * min(h, w))), int(0.60 * min(h, w)) + 1))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    win = photo[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        win = win[:, ::-1]
    return _jitter(_resize(win, size), rng, grayscale)


# ---------------------------------------------------------------- procedural textures (float HxWx3 in [0, 1])
def smooth_noise(size: int, rng: np.random.Generator, scale: float, octaves: int = 4) -> np.ndarray:
    """Fractal value noise in [0, 1]: bicubic-upsampled random grids, halving amplitude per octave."""
    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    cells = max(2, int(size / scale))
    for _ in range(octaves):
        grid = rng.random((cells + 3, cells + 3)).astype(np.float32)
        up = ndimage.zoom(grid, (size + 3 * size / cells) / grid.shape[0], order=3)[:size, :size]
        out += amp * up
        total += amp
        amp *= 0.5
        cells *= 2
    out /= total
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.uniform(0.05, 0.95, size=3).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.25, size=3), 0, 1).astype(np.float32)
    return a, b


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    a, b = _palette(rng)
    yy, xx = _grid(size)
    n = smooth_noise(size, rng, scale=rng.uniform(4, 32))
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    if kind == "noise":
        t = n
    elif kind == "stripes":
        period = rng.uniform(4, 24)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + 3 * n)
    elif kind == "weave":
        p = rng.uniform(4, 12)
        s1, s2 = np.sin(2 * np.pi * u / p), np.sin(2 * np.pi * v / p)
        over = (np.floor(u / p) + np.floor(v / p)) % 2
        t = np.where(over > 0, 0.5 + 0.5 * s1, 0.5 + 0.5 * s2) * (0.8 + 0.2 * n)
    elif kind == "wood":
        cx, cy = rng.uniform(-size, 2 * size, size=2)
        r = np.hypot((xx - cx) * rng.uniform(0.2, 1.0), yy - cy)
        t = (0.5 + 0.5 * np.sin(2 * np.pi * r / rng.uniform(3, 10) + 6 * n)) ** 2
    elif kind == "metal":
        streak = ndimage.uniform_filter1d(rng.random((size, size)).astype(np.float32), size=int(rng.integers(8, 40)),
                                          axis=1, mode="wrap")
        streak = ndimage.rotate(streak, np.degrees(theta), reshape=False, mode="reflect")
        t = 0.6 * (streak - streak.min()) / max(float(np.ptp(streak)), 1e-6) + 0.4 * n
    elif kind == "stone":
        k = int(rng.integers(8, 40))
        pts = rng.uniform(0, size, size=(k, 2)).astype(np.float32)
        d = np.sqrt((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2)
        d.sort(axis=-1)
        edge = np.clip((d[..., 1] - d[..., 0]) / 3.0, 0, 1)
        shade = rng.random(k).astype(np.float32)[np.argmin(np.sqrt((yy[..., None] - pts[:, 0]) ** 2 +
                                                                   (xx[..., None] - pts[:, 1]) ** 2), axis=-1)]
        t = edge * (0.5 + 0.5 * shade) * (0.8 + 0.2 * n)
    else:
        raise ValueError(f"unknown texture {kind!r}; choose from {TEXTURES}")
    t = t.astype(np.float32)[..., None]
    return np.clip(a * (1 - t) + b * t, 0, 1)


# ---------------------------------------------------------------- marks: (alpha HxW, colour HxWx3) on a base
def _curve(size: int, rng: np.random.Generator, n: int, wiggle: float, length: float) -> np.ndarray:
    start = rng.uniform(0.2 * size, 0.8 * size, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    step = length / n
    pts = [start]
    for _ in range(n):
        theta += rng.normal(0, wiggle)
        pts.append(pts[-1] + step * np.array([np.cos(theta), np.sin(theta)]))
    return np.array(pts, np.float32)


def _rasterise(size: int, pts: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased polyline of ``width`` px: distance to densely resampled points via a distance transform."""
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    t = np.concatenate([[0], np.cumsum(seg)])
    dense = np.stack([np.interp(np.arange(0, t[-1], 0.5), t, pts[:, i]) for i in range(2)], axis=1)
    hit = np.ones((size, size), bool)
    ij = np.round(dense).astype(int)
    ok = (ij >= 0).all(1) & (ij < size).all(1)
    hit[ij[ok, 1], ij[ok, 0]] = False
    dist = ndimage.distance_transform_edt(hit).astype(np.float32)
    return np.clip(width / 2 + 0.5 - dist, 0, 1)


def _blob(size: int, rng: np.random.Generator, radius: float) -> np.ndarray:
    yy, xx = _grid(size)
    cx, cy = rng.uniform(radius, size - radius, size=2)
    r = np.hypot(xx - cx, yy - cy) / radius
    n = smooth_noise(size, rng, scale=radius / 1.5, octaves=2)
    return np.clip((1.0 - r + 0.5 * (n - 0.5)) * radius / 3.0, 0, 1)


def mark(kind: str, base: np.ndarray, rng: np.random.Generator, branches: bool = True
         ) -> tuple[np.ndarray, np.ndarray]:
    size = base.shape[0]
    s = size / 128.0
    luma = base.mean(-1, keepdims=True)
    if kind == "scratch":
        alpha = _rasterise(size, _curve(size, rng, 8, 0.12, rng.uniform(30, 100) * s), rng.uniform(1, 2.5) * s)
        colour = np.clip(base + 0.45, 0, 1) if rng.random() < 0.5 else base * 0.3
    elif kind == "crack" and not branches:
        alpha = _rasterise(size, _curve(size, rng, 24, 0.6, rng.uniform(30, 80) * s), rng.uniform(1, 2.5) * s)
        colour = base * rng.uniform(0.05, 0.25)
    elif kind == "crack":
        trunk = _curve(size, rng, 24, 0.6, rng.uniform(30, 80) * s)
        width = rng.uniform(1, 3) * s
        alpha = _rasterise(size, trunk, width)
        for _ in range(int(rng.integers(0, 3))):
            fork = trunk[int(rng.integers(len(trunk)))]
            branch = _curve(size, rng, 10, 0.7, rng.uniform(10, 30) * s)
            branch = branch - branch[0] + fork
            alpha = np.maximum(alpha, _rasterise(size, branch, max(1.0, 0.6 * width)))
        colour = base * rng.uniform(0.05, 0.25)
    elif kind in ("hole", "dent"):
        radius = rng.uniform(5, 16) * s
        alpha = _blob(size, rng, radius)
        yy, xx = _grid(size)
        shade = ndimage.gaussian_filter(alpha, radius / 3)
        gy, gx = np.gradient(shade)
        light = rng.uniform(0, 2 * np.pi)
        relief = (gx * np.cos(light) + gy * np.sin(light)) * radius
        if kind == "hole":
            colour = np.clip(0.08 + 0.3 * (1 - alpha[..., None]) + 0.3 * relief[..., None], 0, 1) * (luma + 0.2)
        else:
            colour = np.clip(base * (0.75 + 1.5 * relief[..., None]), 0, 1)
            alpha = alpha * 0.9
    elif kind == "stain":
        alpha = _blob(size, rng, rng.uniform(8, 22) * s) * rng.uniform(0.5, 0.85)
        colour = rng.uniform(0.05, 0.8, size=3).astype(np.float32) * (0.6 + 0.4 * luma)
    elif kind == "discoloration":
        alpha = ndimage.gaussian_filter(_blob(size, rng, rng.uniform(18, 40) * s), 3 * s) * rng.uniform(0.3, 0.5)
        colour = np.clip(base * rng.uniform(0.5, 1.5, size=3), 0, 1)
    else:
        raise ValueError(f"unknown mark {kind!r}; choose from {MARKS}")
    return alpha.astype(np.float32), np.broadcast_to(colour, base.shape).astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


class Sampler:
    """Seeded generator of captioned training images; ``item(i)`` depends only on (seed, i)."""

    def __init__(self, size: int = 128, seed: int = 0, recipe: str = "v2"):
        from ops.demo_data import tinted_photo

        if recipe not in RECIPES:
            raise ValueError(f"unknown forge-base data recipe {recipe!r}; choose from {RECIPES}")
        self.size, self.seed, self.recipe = size, seed, recipe
        self.photos = {name: _load_photo(name) for name in PHOTOS}
        self.demo = {name: tinted_photo(name) for name in DEMO_PHOTOS}
        self._gray = {name: bool(np.allclose(p[..., 0], p[..., 1]) and np.allclose(p[..., 1], p[..., 2]))
                      for name, p in self.photos.items()}
        self._others = sorted(set(PHOTOS) - set(DEMO_PHOTOS))

    def _base(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        from ops.demo_data import crop

        u = rng.random()
        if u < P_DEMO:
            name = DEMO_PHOTOS[int(rng.integers(len(DEMO_PHOTOS)))]
            return crop(self.demo[name], self.size, rng, heldout=False).astype(np.float32) / 255.0, name
        if u < P_DEMO + P_TEXTURE:
            kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
            return texture(kind, self.size, rng), kind
        pool = DEMO_PHOTOS if u < P_DEMO + P_TEXTURE + P_WIDE else self._others
        name = pool[int(rng.integers(len(pool)))]
        return photo_crop(self.photos[name], self.size, rng, self._gray[name]), PHOTOS[name][1]

    def _base_v1(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        if rng.random() < P_PHOTO_V1:
            name = sorted(PHOTOS)[int(rng.integers(len(PHOTOS)))]
            return photo_crop(self.photos[name], self.size, rng, self._gray[name]), PHOTOS[name][1]
        kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
        return texture(kind, self.size, rng), kind

    def item(self, index: int) -> Item:
        rng = np.random.default_rng([self.seed, index])
        v1 = self.recipe == "v1"
        base, surface = self._base_v1(rng) if v1 else self._base(rng)
        if v1:
            kind = MARKS[int(rng.integers(len(MARKS)))] if rng.random() < P_MARK_V1 else None
        else:
            kind = str(rng.choice(MARKS, p=MARK_WEIGHTS)) if rng.random() < P_MARK else None
        alpha = None
        if kind is not None:
            a, colour = mark(kind, base, rng, branches=not v1)
            base = base * (1 - a[..., None]) + colour * a[..., None]
            alpha = _to_uint8(a)
        caption = f"a photo of a {surface}" + (f" with a {kind} defect" if kind else "")
        if rng.random() < P_EMPTY_CAPTION:
            caption = ""
        return Item(_to_uint8(base), caption, kind, alpha)


def make_pool(n: int, size: int = 128, seed: int = 0,
              progress: Callable[[int], None] | None = None, recipe: str = "v2") -> list[Item]:
    sampler = Sampler(size, seed, recipe)
    out = []
    for i in range(n):
        out.append(sampler.item(i))
        if progress is not None:
            progress(i + 1)
    return out
