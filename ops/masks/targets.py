"""Target masks: where a synthetic defect is placed on a normal image (DESIGN §4).

Two samplers, both seeded by a ``numpy.random.Generator`` and both returning a :class:`TargetMask`
(the bool mask plus the JSON-serialisable parameters that produced it, for the manifest):

``mode="affine"``
    A support mask under a random similarity transform plus optional mirror: rotation about its centroid,
    isotropic scale, horizontal flip (a vertical flip is a horizontal flip plus 180°, so one flip suffices),
    and a shift that moves the centroid onto a randomly drawn *foreground* pixel at most ``max_shift`` x the
    image side away from where it was. Candidates are redrawn until at least ``min_inside`` of the warped
    mask lies on the foreground; after ``max_tries`` the best candidate (largest inside fraction, then
    largest inside area) is used. Either way the result is clipped to the foreground, so affine targets lie
    strictly inside it. Should clipping leave nothing, a disk of the scaled support area around a
    foreground pixel is used instead, so the target is never empty.
    A support mask whose size differs from the normal image (VisA images vary in size) is first resized to
    the normal image with nearest-neighbour interpolation: defects keep their size *relative* to the image.

``mode="box"`` (AnoGen)
    One axis-aligned box whose height and width are independent fractions of the image side drawn from
    ``box_size``, centred on a random foreground pixel and shifted to lie inside the image. A box stays a
    box (AnoGen uses it as a weak label), so it is not clipped to the foreground; instead, when no draw
    reaches ``min_inside`` the best one is shrunk around its foreground anchor pixel until it does (a 1x1
    box on the anchor always does).

Foreground rule (:func:`foreground_mask`): the paper protocols say "inside the product" without defining
it. Two cues are Otsu-thresholded, grey level and HSV saturation; for each, the class that dominates the
border band (2 % of the shorter side) is background and the other class, cleaned by an opening then a
closing (disk of 1 % of the shorter side), hole filling and dropping components smaller than 20 % of the
largest (several similar parts, as in VisA's macaroni, survive), is the object. A cue is trusted only if
  - border purity >= 0.9 (the border is nearly all background),
  - the largest 4-connected background component holds >= 90 % of the border's background pixels (a
    uniform backdrop surrounds the product; the bricks of a brick wall, split by mortar, do not),
  - the cleaning keeps >= 50 % of the object class (not speckle or thin lines of a texture),
  - the object covers 1-95 % of the image.
The trusted cue with the highest purity wins; with none, the image is a texture (or an object filling the
frame) and the whole image is foreground. Measured on the demo textures (brick, grass, gravel at 64-256 px)
every image is classified texture; a dark backdrop with an ellipse, a thin rotated "screw" or an object
touching the border is classified object with IoU > 0.97 against the drawn shape (tests/test_targets.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

MIN_PURITY = 0.9
MIN_CONNECTED = 0.9
MIN_RETAINED = 0.5
MAX_FRACTION = 0.95
MIN_FRACTION = 0.01
KEEP_COMPONENT = 0.2

@dataclass(frozen=True)
class TargetMask:
    mask: np.ndarray  # bool HxW, never empty
    params: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable, recorded per synthetic row


@dataclass(frozen=True)
class Foreground:
    mask: np.ndarray  # bool HxW
    kind: str  # "object" or "texture"
    cue: str  # "gray", "saturation" or "" (texture)
    purity: float  # border purity of the winning cue (0.0 for textures)


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Product foreground of a normal RGB image (bool HxW); textures give the whole image (module doc)."""
    return analyze_foreground(image).mask


def analyze_foreground(image: np.ndarray) -> Foreground:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"foreground_mask expects a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    whole = Foreground(np.ones((h, w), dtype=bool), "texture", "", 0.0)  # no trusted cue
    band = max(1, round(0.02 * min(h, w)))
    border = np.zeros((h, w), dtype=bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    radius = max(1, round(0.01 * min(h, w)))
    best: Foreground | None = None
    for cue_name, cue in (("gray", cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)),
                          ("saturation", cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1])):
        if cue.min() == cue.max():
            continue
        high = cue > threshold_otsu(cue)
        share = float(high[border].mean())
        purity = max(share, 1.0 - share)
        background = high if share >= 0.5 else ~high
        if purity < MIN_PURITY or (best is not None and purity <= best.purity):
            continue
        labels, _ = ndimage.label(background)
        on_border = np.bincount(labels[border & background])
        on_border[0] = 0
        raw = ~background
        fg = _clean(raw, radius)
        if (on_border.max() >= MIN_CONNECTED * (border & background).sum()
                and (fg & raw).sum() >= MIN_RETAINED * raw.sum()
                and MIN_FRACTION <= fg.mean() <= MAX_FRACTION):
            best = Foreground(fg, "object", cue_name, purity)
    return best if best is not None else whole


def _clean(fg: np.ndarray, radius: int) -> np.ndarray:
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    u8 = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, disk)
    u8 = cv2.morphologyEx(u8, cv2.MORPH_CLOSE, disk)
    filled = ndimage.binary_fill_holes(u8 > 0)
    labels, n = ndimage.label(filled)
    if n <= 1:
        return filled
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= KEEP_COMPONENT * sizes.max()) + 1
    return np.isin(labels, keep)


def sample_target_mask(source_mask: np.ndarray | None, normal_image: np.ndarray, rng: np.random.Generator,
                       mode: str = "affine", *, texture: bool | None = None, foreground: np.ndarray | None = None,
                       min_inside: float = 0.9, max_tries: int = 50, rotation: tuple[float, float] = (-180.0, 180.0),
                       scale: tuple[float, float] = (0.75, 1.25), flip: bool = True, max_shift: float = 0.5,
                       box_size: tuple[float, float] = (0.1, 0.3)) -> TargetMask:
    """Sample one target mask for ``normal_image`` (module doc). ``texture=True`` forces the whole image as
    foreground; ``foreground`` passes a precomputed foreground mask (callers cache it per normal image)."""
    h, w = normal_image.shape[:2]
    if foreground is not None:
        fg = foreground.astype(bool)
        if fg.shape != (h, w):
            raise ValueError(f"foreground mask {fg.shape} does not match the normal image {(h, w)}")
        kind = "texture" if fg.all() else "object"
    elif texture:
        fg, kind = np.ones((h, w), dtype=bool), "texture"
    else:
        info = analyze_foreground(normal_image)
        fg, kind = info.mask, info.kind
    if not fg.any():
        raise ValueError("the foreground mask is empty: pass texture=True or a non-empty foreground")
    if not 0.0 < min_inside <= 1.0 or max_tries < 1:
        raise ValueError(f"min_inside must be in (0, 1] and max_tries >= 1, got {min_inside}, {max_tries}")
    fg_points = np.argwhere(fg)  # (y, x) rows
    if mode == "affine":
        target = _affine(source_mask, fg, fg_points, rng, min_inside, max_tries, rotation, scale, flip, max_shift)
    elif mode == "box":
        target = _box(fg, fg_points, rng, min_inside, max_tries, box_size)
    else:
        raise ValueError(f"unknown target mask mode {mode!r}; use 'affine' or 'box'")
    target.params.update(foreground=kind, foreground_fraction=round(float(fg.mean()), 6))
    return target


def _affine(source_mask, fg, fg_points, rng, min_inside, max_tries, rotation, scale, flip, max_shift) -> TargetMask:
    h, w = fg.shape
    if source_mask is None:
        raise ValueError("mode='affine' needs a support mask; use mode='box' for mask-free placement")
    src = np.asarray(source_mask).astype(np.uint8)
    resized = src.shape != (h, w)
    if resized:
        src = cv2.resize(src, (w, h), interpolation=cv2.INTER_NEAREST)
    if not src.any():
        raise ValueError("the support mask is empty, so there is no defect shape to transform; fix the mask file "
                         "or sample targets with mode='box'")
    ys, xs = np.nonzero(src)
    centroid = np.array([xs.mean(), ys.mean()])
    window = max_shift * max(h, w)
    near = fg_points[np.max(np.abs(fg_points[:, ::-1] - centroid), axis=1) <= window]
    anchors = near if len(near) else fg_points
    best: tuple[tuple[float, int], np.ndarray, dict] | None = None
    tries = 0
    for tries in range(1, max_tries + 1):
        angle = float(rng.uniform(*rotation))
        s = float(rng.uniform(*scale))
        mirror = bool(flip and rng.random() < 0.5)
        cy, cx = anchors[rng.integers(len(anchors))]
        matrix = similarity_matrix(centroid, np.array([cx, cy], dtype=float), angle, s, mirror)
        warped = cv2.warpAffine(src * 255, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0) > 127
        area = int(warped.sum())
        inside_area = int((warped & fg).sum())
        inside = inside_area / area if area else 0.0
        params = {"angle": round(angle, 4), "scale": round(s, 4), "flip": mirror, "center": [int(cy), int(cx)],
                  "shift": [round(float(cy - centroid[1]), 2), round(float(cx - centroid[0]), 2)],
                  "matrix": np.round(matrix, 6).tolist(), "inside_fraction": round(inside, 6)}
        if best is None or (inside, inside_area) > best[0]:
            best = ((inside, inside_area), warped, params)
        if area and inside >= min_inside:
            break
    (inside, _), warped, params = best
    mask = warped & fg
    params.update(mode="affine", tries=tries, accepted=inside >= min_inside, fallback=None, source_resized=resized)
    if not mask.any():
        cy, cx = fg_points[rng.integers(len(fg_points))]
        radius = max(1.0, float(np.sqrt(len(ys) * params["scale"] ** 2 / np.pi)))
        yy, xx = np.ogrid[:h, :w]
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & fg
        params.update(fallback="disk", center=[int(cy), int(cx)], radius=round(radius, 3))
    return TargetMask(mask, params)


def similarity_matrix(src_center: np.ndarray, dst_center: np.ndarray, angle: float, scale: float,
                      mirror: bool) -> np.ndarray:
    """2x3 matrix (x, y) -> (x', y'): mirror about the vertical axis through ``src_center``, rotate by ``angle``
    degrees (counter-clockwise as displayed), scale, then move ``src_center`` onto ``dst_center``."""
    t = np.deg2rad(angle)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])  # y axis points down in images
    lin = scale * rot @ np.diag([-1.0 if mirror else 1.0, 1.0])
    return np.hstack([lin, (dst_center - lin @ src_center)[:, None]])


def _box(fg, fg_points, rng, min_inside, max_tries, box_size) -> TargetMask:
    h, w = fg.shape
    lo, hi = box_size
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"box_size must be fractions 0 < lo <= hi <= 1 of the image side, got {box_size}")
    best = None
    tries = 0
    for tries in range(1, max_tries + 1):
        bh = max(1, round(rng.uniform(lo, hi) * h))
        bw = max(1, round(rng.uniform(lo, hi) * w))
        ay, ax = (int(v) for v in fg_points[rng.integers(len(fg_points))])
        y0 = min(max(ay - bh // 2, 0), h - bh)
        x0 = min(max(ax - bw // 2, 0), w - bw)
        inside = float(fg[y0:y0 + bh, x0:x0 + bw].mean())
        if best is None or inside > best[0]:
            best = (inside, (y0, x0, bh, bw), (ay, ax))
        if inside >= min_inside:
            break
    inside, (y0, x0, bh, bw), (ay, ax) = best
    accepted = inside >= min_inside
    while inside < min_inside:  # shrink around the anchor, which lies on the foreground
        bh, bw = max(1, bh // 2), max(1, bw // 2)
        y0 = min(max(ay - bh // 2, 0), h - bh)
        x0 = min(max(ax - bw // 2, 0), w - bw)
        inside = float(fg[y0:y0 + bh, x0:x0 + bw].mean())
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y0 + bh, x0:x0 + bw] = True
    return TargetMask(mask, {"mode": "box", "box": [int(y0), int(x0), int(bh), int(bw)], "anchor": [ay, ax],
                             "inside_fraction": round(inside, 6), "tries": tries, "accepted": accepted,
                             "fallback": None if accepted else "shrunk"})
