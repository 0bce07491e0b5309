"""The embedded demo dataset: product crops of scikit-image's bundled CC0 photographs with drawn defects.

``build_demo_dataset`` writes an MVTec AD tree (``<root>/<category>/train/good``, ``test/good``,
``test/<type>``, ``ground_truth/<type>/<stem>_mask.png``) so that the ordinary ingest reads it. Nothing is
downloaded: ``skimage.data.brick()``, ``grass()`` and ``gravel()`` ship inside the scikit-image wheel (the
pooch-fetched images are avoided on purpose).

Choices made where the spec leaves room:

- Categories are textures (brick, grass, gravel): the whole image is product, so every defect position is
  valid. Each photograph is tinted once per category (brick reddish, grass greenish, gravel neutral) so that
  the grayscale photos become plausible RGB products and colour defects (stains) differ from the product.
- Crops: a random square window of 30-55 % of the 512 px photograph (at most the width of its half),
  optionally mirrored left-right (no rotation: brick courses stay horizontal, as a product would on a line),
  resized with Lanczos to ``size``. ``train/`` crops come from the left half of the photograph and every
  ``test/`` crop (good or defective) from the right half (``HELDOUT_COLUMNS``), so a model trained on the left
  halves (forge-base, ``ops/forge_base``) never sees a pixel of the held-out evaluation images.
  Jitter: gain 0.92-1.08, offset +-0.03, gamma 0.9-1.1, channel gains 0.97-1.03.
- Every image has its own generator seeded from ``(seed, crc32("<category>/<folder>/<type>/<index>"))``, so
  a category's images do not depend on which other categories are built.
- Defects are alpha-blended onto the crop: ``out = crop * (1 - a) + colour * a``. The mask is exactly
  ``a > 0`` and alpha below 0.1 is cut to 0, so every pixel outside the mask is bit-identical to the crop and
  every mask pixel is visibly changed. Sizes scale with ``size`` (given here for 128 px):
  scratch = quadratic Bezier 40-90 px long, 1-2 px wide, brighter or darker than the surface;
  hole = rotated ellipse, 6-15 px semi-axes, dark and shaded (lighter towards one rim);
  stain = colour blob (rust, oil, ink or paint) with a wavy outline, 10-23 px radius, 45-75 % opacity
  keeping the texture underneath; crack = dark random-walk polyline with 1-3 thinner branches.
  A drawing whose mask covers less than 0.2 % or more than 25 % of the image is redrawn (same generator).
- Counts: 24 train/good, 8 test/good, 7-9 images per defect type (floor(n/3) = 2-3 support images).
- PNGs are encoded by ``ops.samples.encode_png`` (no timestamps), so the same arguments give the same bytes
  on the same machine; the files are rewritten atomically on every build.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ops.atomic import write_bytes_atomic
from ops.progress import progress_bar
from ops.samples import encode_png

N_TRAIN = 24
N_TEST_GOOD = 8
MIN_AREA, MAX_AREA = 0.002, 0.25
HELDOUT_COLUMNS = (0.5, 1.0)  # fraction of the photograph's width that test/ images are cut from
ALPHA_CUT = 0.1

# What `anomaly-forge demo` runs without options: every method on one category at 8 images per partition, which
# keeps the demo within 10 minutes on a 2-core CPU with the forge-base backbone (each partition also trains and
# evaluates detectors and measures quality); `--categories brick,grass,gravel --n 16` is the full demo.
DEMO_CATEGORIES = ("brick",)
DEMO_N = 8

@dataclass(frozen=True)
class DemoCategory:
    photo: str  # name of the skimage.data function
    tint: tuple[float, float, float]
    defects: tuple[tuple[str, int], ...]  # (defect type, number of images)
    source: str  # where scikit-image took the photograph from


CATEGORIES: dict[str, DemoCategory] = {
    "brick": DemoCategory("brick", (1.08, 0.94, 0.86), (("crack", 9), ("hole", 7), ("stain", 8)),
                          "CC0Textures 'Bricks25' (https://cc0textures.com/view.php?tex=Bricks25)"),
    "grass": DemoCategory("grass", (0.90, 1.06, 0.84), (("scratch", 8), ("stain", 7)),
                          "DeviantArt 'Grass 01' by linolafett "
                          "(https://www.deviantart.com/linolafett/art/Grass-01-434853879)"),
    "gravel": DemoCategory("gravel", (1.00, 0.98, 0.95), (("crack", 7), ("hole", 8), ("scratch", 9)),
                           "CC0Textures 'Gravel04' (https://cc0textures.com/view.php?tex=Gravel04)"),
}

_STAIN_COLOURS = np.array([[0.55, 0.27, 0.07],   # rust
                           [0.16, 0.13, 0.06],   # oil
                           [0.12, 0.20, 0.62],   # ink
                           [0.70, 0.62, 0.15]],  # paint
                          dtype=np.float32)


def build_demo_dataset(out_dir: str | Path, categories: Sequence[str] | None = None, seed: int = 0,
                       size: int = 128) -> Path:
    """Write the demo dataset (MVTec AD layout) under ``out_dir`` and return its absolute path."""
    names = list(CATEGORIES) if categories is None else list(categories)
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown or not names:
        raise ValueError(f"unknown demo categories {unknown or names}; choose from {sorted(CATEGORIES)}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"demo image size must be an integer >= 32 (defects are a few pixels wide), got {size!r}")
    root = Path(out_dir).expanduser().resolve()
    plan = [(c, folder, kind, i) for c in names for folder, kind, n in _folders(CATEGORIES[c]) for i in range(n)]
    photos = {c: _photo(CATEGORIES[c]) for c in names}
    with progress_bar("demo dataset", total=len(plan), unit="img") as bar:
        for category, folder, kind, index in plan:
            rng = np.random.default_rng([seed, zlib.crc32(f"{category}/{folder}/{kind}/{index}".encode())])
            image = _crop(photos[category], size, rng, heldout=folder == "test")
            stem = f"{index:03d}"
            if kind != "good":
                image, mask = draw_defect(image, kind, rng)
                write_bytes_atomic(root / category / "ground_truth" / kind / f"{stem}_mask.png", encode_png(mask))
            write_bytes_atomic(root / category / folder / kind / f"{stem}.png", encode_png(image))
            bar.update(1)
    # the README covers every demo category in the folder, also those of earlier builds: building a second
    # category into an existing data folder must not drop the first one's licence attribution
    present = [c for c in CATEGORIES if c in names or (root / c / "train" / "good").is_dir()]
    write_bytes_atomic(root / "README.txt", _readme(present, seed, size, built=names).encode())
    return root


def _folders(cat: DemoCategory) -> list[tuple[str, str, int]]:
    return [("train", "good", N_TRAIN), ("test", "good", N_TEST_GOOD)] + [("test", k, n) for k, n in cat.defects]


def _photo(cat: DemoCategory) -> np.ndarray:
    import skimage.data

    gray = getattr(skimage.data, cat.photo)()
    return np.clip(gray.astype(np.float32)[..., None] / 255.0 * np.asarray(cat.tint, np.float32), 0.0, 1.0)


def column_range(width: int, heldout: bool) -> tuple[int, int]:
    """Columns [start, stop) of a photograph ``width`` px wide that test (``heldout``) or train crops come from."""
    cut = int(round(HELDOUT_COLUMNS[0] * width))
    return (cut, int(round(HELDOUT_COLUMNS[1] * width))) if heldout else (0, cut)


def tinted_photo(category: str) -> np.ndarray:
    """The category's photograph as the demo tints it (float HxWx3 in [0, 1])."""
    return _photo(CATEGORIES[category])


def crop(photo: np.ndarray, size: int, rng: np.random.Generator, heldout: bool) -> np.ndarray:
    """A uint8 ``size`` px crop as the demo cuts it; ``heldout=False`` keeps to the train columns."""
    return _crop(photo, size, rng, heldout)


def _crop(photo: np.ndarray, size: int, rng: np.random.Generator, heldout: bool) -> np.ndarray:
    h, w = photo.shape[:2]
    c0, c1 = column_range(w, heldout)
    side_max = min(int(0.55 * min(h, w)), c1 - c0, h)
    side = int(rng.integers(min(int(0.30 * min(h, w)), side_max), side_max + 1))
    y0, x0 = int(rng.integers(0, h - side + 1)), c0 + int(rng.integers(0, c1 - c0 - side + 1))
    window = photo[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        window = window[:, ::-1]
    # PIL resizes float images one channel at a time ("F" mode) with the same Lanczos filter as uint8.
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(window[..., c])).resize((size, size), Image.Resampling.LANCZOS))
             for c in range(3)]
    img = np.clip(np.stack(chans, axis=-1), 0.0, 1.0)
    gain, offset, gamma = rng.uniform(0.92, 1.08), rng.uniform(-0.03, 0.03), rng.uniform(0.9, 1.1)
    img = np.clip(img * gain + offset, 0.0, 1.0) ** gamma * rng.uniform(0.97, 1.03, size=3)
    return _to_uint8(img)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``kind`` onto a uint8 HxWx3 image; returns (new image, exact bool mask).

    Pixels outside the mask are returned unchanged.
    """
    try:
        painter = _PAINTERS[kind]
    except KeyError:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {sorted(_PAINTERS)}") from None
    base = image.astype(np.float32) / 255.0
    for _ in range(50):
        alpha, colour = painter(base, rng)
        alpha = np.where(alpha >= ALPHA_CUT, alpha, 0.0).astype(np.float32)
        mask = alpha > 0
        if MIN_AREA <= mask.mean() <= MAX_AREA:
            break
    else:  # pragma: no cover - the parameter ranges make this practically unreachable
        raise RuntimeError(f"could not draw a {kind} of sane size on a {image.shape[1]}x{image.shape[0]} image")
    out = image.copy()
    a = alpha[mask][:, None]
    out[mask] = _to_uint8(base[mask] * (1.0 - a) + colour[mask] * a)
    return out, mask


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    return yy.astype(np.float32), xx.astype(np.float32)


def _polyline_distance(h: int, w: int, pts: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel centre to a polyline given as (N, 2) (x, y) points."""
    yy, xx = _grid(h, w)
    best = np.full((h, w), np.inf, dtype=np.float32)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        np.minimum(best, np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy)), out=best)
    return best


def _stroke(dist: np.ndarray, width: float) -> np.ndarray:
    # One pixel of linear falloff gives an anti-aliased edge without widening the line.
    return np.clip(width / 2.0 + 0.5 - dist, 0.0, 1.0)


def _scratch(base: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = base.shape[:2]
    s = min(h, w) / 128.0
    length = rng.uniform(40, 90) * s
    theta = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
    d = np.array([np.cos(theta), np.sin(theta)]) * length / 2
    normal = np.array([-d[1], d[0]]) * rng.uniform(-0.6, 0.6)
    p0, p2 = np.array([cx, cy]) - d, np.array([cx, cy]) + d
    p1 = np.array([cx, cy]) + normal
    t = np.linspace(0, 1, 24)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    alpha = _stroke(_polyline_distance(h, w, pts), max(1.0, rng.uniform(1.0, 2.0) * s)) * rng.uniform(0.8, 1.0)
    colour = (np.clip(base + rng.uniform(0.35, 0.5), 0, 1) if rng.random() < 0.5
              else base * rng.uniform(0.25, 0.45))
    return alpha, colour


def _hole(base: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = base.shape[:2]
    s = min(h, w) / 128.0
    a = rng.uniform(6, 15) * s
    b = a * rng.uniform(0.6, 1.0)
    cx, cy = rng.uniform(a + 2, w - a - 2), rng.uniform(a + 2, h - a - 2)
    phi = rng.uniform(0, np.pi)
    yy, xx = _grid(h, w)
    u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
    v = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    alpha = np.clip((1.0 - r) * b + 0.5, 0.0, 1.0)
    # A pit: darkest at the centre, its far wall catching the light (lighter on one side of the rim).
    light = rng.uniform(0, 2 * np.pi)
    side = np.clip((u * np.cos(light) + v * np.sin(light)) / a, -1, 1)
    value = rng.uniform(0.03, 0.10) + 0.22 * r ** 2 + 0.12 * np.clip(side, 0, 1) * r
    tone = base.reshape(-1, 3).mean(axis=0)
    colour = value[..., None] * (tone / max(float(tone.mean()), 1e-3))
    return alpha, np.clip(colour, 0, 1).astype(np.float32)


def _stain(base: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = base.shape[:2]
    s = min(h, w) / 128.0
    radius = rng.uniform(10, 23) * s
    cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
    yy, xx = _grid(h, w)
    ang = np.arctan2(yy - cy, xx - cx)
    wobble = 1.0 + sum(rng.uniform(0.0, 0.12) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    r = np.hypot(xx - cx, yy - cy) / (radius * wobble)
    edge = np.clip((1.0 - r) * radius / 3.0, 0.0, 1.0)  # ~3 px soft rim
    # Dried stains are darker at their rim (the coffee-ring effect).
    alpha = edge * rng.uniform(0.45, 0.75) * (0.8 + 0.2 * np.clip(r, 0, 1))
    luma = base.mean(axis=-1, keepdims=True)
    colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))] * (0.6 + 0.4 * luma)
    return alpha.astype(np.float32), colour.astype(np.float32)


def _walk(start: np.ndarray, theta: float, steps: int, step: float, rng: np.random.Generator) -> np.ndarray:
    pts = [start]
    for _ in range(steps):
        theta += rng.normal(0.0, 0.35)
        pts.append(pts[-1] + step * rng.uniform(0.7, 1.3) * np.array([np.cos(theta), np.sin(theta)]))
    return np.array(pts)


def _crack(base: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = base.shape[:2]
    s = min(h, w) / 128.0
    theta = rng.uniform(0, 2 * np.pi)
    main = _walk(np.array([rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)]), theta,
                 int(rng.integers(8, 14)), rng.uniform(4, 7) * s, rng)
    width = max(1.0, rng.uniform(1.2, 2.2) * s)
    alpha = _stroke(_polyline_distance(h, w, main), width)
    for _ in range(int(rng.integers(1, 4))):
        fork = main[int(rng.integers(1, len(main) - 1))]
        branch = _walk(fork, theta + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), int(rng.integers(3, 7)),
                       rng.uniform(3, 5) * s, rng)
        np.maximum(alpha, _stroke(_polyline_distance(h, w, branch), max(0.8, 0.6 * width)), out=alpha)
    return alpha, base * rng.uniform(0.15, 0.35)


_PAINTERS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch, "hole": _hole, "stain": _stain, "crack": _crack}
DEFECT_KINDS = tuple(_PAINTERS)


def _readme(names: list[str], seed: int, size: int, built: list[str] | None = None) -> str:
    lines = ["AnomalyForge demo dataset (MVTec AD folder layout), built offline by ops/demo_data.py",
             f"last build: categories={built if built is not None else names} seed={seed} size={size}", "",
             "Source photographs: the grayscale images bundled with scikit-image (skimage.data), all released",
             "under the Creative Commons CC0 1.0 licence (public domain dedication):"]
    lines += [f"  {c}: skimage.data.{CATEGORIES[c].photo}() - {CATEGORIES[c].source}" for c in names]
    lines += ["", "The crops are tinted, jittered and resized; the defects (" + ", ".join(DEFECT_KINDS) + ") are drawn",
              "procedurally and their masks (ground_truth/<type>/<stem>_mask.png, 0/255) are exact: every pixel",
              "outside a mask equals the defect-free crop. CC0 puts no conditions on these derived images.", ""]
    return "\n".join(lines)
