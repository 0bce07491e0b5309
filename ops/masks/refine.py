"""Refined masks for synthetic images: where did the method actually change the image?

Three refinements per synthetic row, all kept (PNG + area + IoU against the target mask), one chosen as final:

``diff``  difference to the source normal image: per-pixel max over RGB of |synthetic - normal| / 255, Gaussian
          blurred (``diff_sigma``), thresholded, cleaned by morphology and kept inside the target mask dilated by
          ``keep_margin`` px (a method may only have changed the image there; changes elsewhere are noise or
          blending seams). Threshold: ``diff_threshold`` when set, else Otsu's threshold of the blurred
          difference inside that dilated target, never below ``diff_floor`` (so an unchanged image gives an
          empty mask instead of thresholding noise). Morphology: opening (3x3) against speckle, closing (5x5)
          against pinholes, hole filling, and removal of components smaller than ``min_component`` px.
``attention``  eq. 13 of the background-disentanglement paper, when the row has an ``attention`` extra (the
          defect token's cross-attention map, any resolution): m' = the target mask resized to the map's
          resolution (area average >= 1/2), ``Resize(m' * A)`` bilinearly to the image size, mask = value >= 1/2.
``localization``  APO's deviation map, when the row has a ``localization`` extra: bilinearly resized to the image,
          renormalised by its maximum inside the dilated target (as APO's placed mode does), thresholded at
          ``localization_threshold``, kept inside the dilated target.

Final mask: ``final[method]`` (defaults: apo -> localization, bgdisentangle -> attention, anogen -> target (its
box), the classical baselines, o2mag and cadiff -> method, every other method -> ``final_default`` = diff).
``method`` is the method's own mask (``mask_path``), ``target`` the target mask. When the chosen mask is missing or
empty the method's own mask is used and the reason is written to ``final_note``, so no row silently changes kind.
Extras are read from ``extras_json`` ({name: path relative to the storage root} or {name: {"path": ...}}); .npy,
.npz (first array) and PNG maps (8/16 bit, scaled to [0, 1]) are accepted.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image
from scipy import ndimage

from ops.manifest import dumps, empty_frame, to_table
from ops.methods.base import MethodConfig, Progress, no_progress
from ops.progress import progress_bar
from ops.cache import join
from ops.samples import dataset_file, encode_png, read_mask, read_rgb
from ops.storage import Storage, sha256_bytes

KINDS = ("diff", "attention", "localization")
FINAL_CHOICES = KINDS + ("method", "target")
REFINED_ASSET = "refined_masks"
# o2mag decodes the whole image (its background drifts slightly), so a difference mask would spread over it; its own
# mask is M_T, already narrowed by the captured cross-attention when its refine_mask option is on.
# anogen: its box is the weak label the paper trains with (the weak segmenter loss handles its normal pixels).
# cadiff's own mask is already the target refined by its anomaly token's attention (eq. 13, with a fallback).
DEFAULT_FINAL = {"apo": "localization", "bgdisentangle": "attention", "cutpaste": "method", "perlin": "method",
                 "o2mag": "method", "anogen": "target", "cadiff": "method"}

REFINED_SCHEMA = pa.schema([
    ("category", pa.string()), ("method", pa.string()), ("defect_type", pa.string()), ("index", pa.int64()),
    ("image_path", pa.string()), ("target_path", pa.string()), ("method_mask_path", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()), ("target_area", pa.int64()),
    ("diff_path", pa.string()), ("diff_area", pa.float64()), ("diff_iou", pa.float64()),
    ("diff_threshold", pa.float64()),
    ("attention_path", pa.string()), ("attention_area", pa.float64()), ("attention_iou", pa.float64()),
    ("localization_path", pa.string()), ("localization_area", pa.float64()), ("localization_iou", pa.float64()),
    ("method_iou", pa.float64()),
    ("final_kind", pa.string()), ("final_path", pa.string()), ("final_area", pa.int64()),
    ("final_iou", pa.float64()), ("final_sha256", pa.string()), ("final_note", pa.string()),
    ("params_json", pa.string()),
])


@dataclass
class RefineConfig(MethodConfig):
    diff_sigma: float = 1.0
    diff_threshold: float | None = None  # None: Otsu inside the dilated target
    diff_floor: float = 0.04
    keep_margin: int = 4
    min_component: int = 8
    attention_threshold: float = 0.5  # eq. 13
    localization_threshold: float = 0.5
    final: dict[str, str] = field(default_factory=dict)  # per-method overrides of DEFAULT_FINAL
    final_default: str = "diff"
    max_area_fraction: float = 0.9  # asset check: a final mask larger than this share of the image is suspicious

    def __post_init__(self) -> None:
        bad = {m: k for m, k in {**self.final, "(default)": self.final_default}.items() if k not in FINAL_CHOICES}
        if bad:
            raise ValueError(f"refine config: final mask kinds {bad} unknown; use one of {FINAL_CHOICES}")

    def final_kind(self, method: str) -> str:
        return {**DEFAULT_FINAL, **self.final}.get(method, self.final_default)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=px)


def _resize(a: np.ndarray, hw: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if a.shape == tuple(hw):
        return a.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(t, size=tuple(hw), mode=mode, **kw)[0, 0].numpy()


def diff_mask(synthetic: np.ndarray, normal: np.ndarray, target: np.ndarray,
              cfg: RefineConfig) -> tuple[np.ndarray, float]:
    from skimage.filters import threshold_otsu

    if synthetic.shape != normal.shape:
        raise ValueError(f"synthetic image {synthetic.shape} and source normal image {normal.shape} differ in size")
    d = np.abs(synthetic.astype(np.float32) - normal.astype(np.float32)).max(axis=2) / 255.0
    if cfg.diff_sigma > 0:
        d = ndimage.gaussian_filter(d, cfg.diff_sigma)
    region = dilate(target, cfg.keep_margin)
    if cfg.diff_threshold is not None:
        t = float(cfg.diff_threshold)
    else:
        vals = d[region]
        t = float(threshold_otsu(vals)) if vals.size and vals.max() > vals.min() else cfg.diff_floor
        t = max(t, cfg.diff_floor)
    m = (d > t) & region
    m = ndimage.binary_opening(m, structure=np.ones((3, 3), bool))
    m = ndimage.binary_closing(m, structure=np.ones((5, 5), bool), border_value=0)
    m = ndimage.binary_fill_holes(m) & region
    if cfg.min_component > 0 and m.any():
        lab, n = ndimage.label(m)
        sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
        m = np.isin(lab, 1 + np.flatnonzero(sizes >= cfg.min_component))
    return m, t


def attention_mask(attention: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Eq. 13: Resize(m' * A) >= 1/2 with m' the target mask at the attention map's resolution."""
    a = np.asarray(attention, dtype=np.float32)
    m_low = _resize(target.astype(np.float32), a.shape, "area") >= 0.5
    return _resize(a * m_low, target.shape) >= threshold


def localization_mask(loc: np.ndarray, target: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    up = _resize(np.asarray(loc, dtype=np.float32), target.shape)
    region = dilate(target, cfg.keep_margin)
    peak = float(up[region].max()) if region.any() else 0.0
    if peak <= 0:
        return np.zeros_like(target)
    return (up / peak > cfg.localization_threshold) & region


def load_map(path: Any) -> np.ndarray:
    p = Path(str(path))
    if p.suffix == ".npy":
        a = np.load(p, allow_pickle=False)
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            a = z[z.files[0]]
    else:
        with Image.open(p) as im:
            # decide the scale by the PNG's bit depth, not by its values: a faint 16-bit map may stay below 256
            scale = 65535.0 if im.mode.startswith("I") else 255.0
            a = np.asarray(im.convert("L") if im.mode not in ("L", "F") and not im.mode.startswith("I") else im)
            a = a.astype(np.float32) / scale
    a = np.squeeze(np.asarray(a, dtype=np.float32))
    if a.ndim != 2 or not np.isfinite(a).all():
        raise ValueError(f"{p}: an extra map must be a finite 2-D array, got shape {a.shape}")
    return a


def _extras(row: pd.Series) -> dict[str, str]:
    raw = row.get("extras_json")
    if not isinstance(raw, str) or not raw.strip():
        return {}
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"synthetic row {row.get('image_path')}: extras_json is not JSON ({e})") from None
    return {k: (v["path"] if isinstance(v, dict) else v) for k, v in obj.items() if v}


def _rel(category: str, method: str, kind: str, defect_type: str, index: int) -> str:
    return f"images/{REFINED_ASSET}/{category}/{method}/{kind}/{defect_type}/{int(index):05d}_mask.png"


def refine_row(storage: Storage, row: pd.Series, cfg: RefineConfig) -> dict[str, Any]:
    image = read_rgb(storage.local_file(row["image_path"]))
    target = read_mask(storage.local_file(row["target_path"]))
    own = read_mask(storage.local_file(row["mask_path"]))
    try:
        normal_file = dataset_file(row["normal_dataset_root"], str(row["normal_path"]))
    except FileNotFoundError:
        normal_file = None
    if normal_file is None or not normal_file.is_file():
        where = join(str(row["normal_dataset_root"]), str(row["normal_path"]))
        raise FileNotFoundError(f"{where}: source normal image of {row['image_path']} is missing; restore the "
                                f"dataset at normal_dataset_root or re-run synthetic_anomalies")
    normal = read_rgb(normal_file)
    if target.shape != image.shape[:2] or own.shape != image.shape[:2]:
        raise ValueError(f"{row['image_path']}: masks {target.shape}/{own.shape} do not match image {image.shape}")
    cat, meth, dt, idx = str(row["category"]), str(row["method"]), str(row["defect_type"]), int(row["index"])
    masks: dict[str, np.ndarray] = {}
    masks["diff"], threshold = diff_mask(image, normal, target, cfg)
    extras = _extras(row)
    if "attention" in extras:
        masks["attention"] = attention_mask(load_map(storage.local_file(extras["attention"])), target,
                                            cfg.attention_threshold)
    if "localization" in extras:
        masks["localization"] = localization_mask(load_map(storage.local_file(extras["localization"])), target, cfg)
    out: dict[str, Any] = {
        "category": cat, "method": meth, "defect_type": dt, "index": idx, "image_path": row["image_path"],
        "target_path": row["target_path"], "method_mask_path": row["mask_path"], "width": image.shape[1],
        "height": image.shape[0], "target_area": int(target.sum()), "diff_threshold": threshold,
        "method_iou": iou(own, target),
    }
    for kind in KINDS:
        m = masks.get(kind)
        out[f"{kind}_path"] = storage.write_bytes(_rel(cat, meth, kind, dt, idx), encode_png(m)) if m is not None \
            else None
        out[f"{kind}_area"] = float(m.sum()) if m is not None else math.nan
        out[f"{kind}_iou"] = iou(m, target) if m is not None else math.nan
    kind, note = cfg.final_kind(meth), ""
    chosen = {"method": own, "target": target, **masks}.get(kind)
    if chosen is None or not chosen.any():
        note = f"{kind} mask {'missing' if chosen is None else 'empty'}; used the method's own mask"
        kind, chosen = "method", own
    png = encode_png(chosen)
    out.update(final_kind=kind, final_path=storage.write_bytes(_rel(cat, meth, "final", dt, idx), png),
               final_area=int(chosen.sum()), final_iou=iou(chosen, target), final_sha256=sha256_bytes(png),
               final_note=note)
    return out


def refine_partition(storage: Storage, synthetic_df: pd.DataFrame, cfg: RefineConfig | dict | None = None,
                     progress: Progress = no_progress) -> pd.DataFrame:
    """One REFINED_SCHEMA row per synthetic row; masks under images/refined_masks/<cat>/<method>/<kind>/..."""
    if not isinstance(cfg, RefineConfig):
        cfg = RefineConfig.from_dict(cfg)
    need = {"category", "method", "defect_type", "index", "image_path", "mask_path", "target_path", "extras_json",
            "normal_path", "normal_dataset_root"}
    missing = sorted(need - set(synthetic_df.columns))
    if missing:
        raise ValueError(f"synthetic manifest lacks columns {missing}; re-materialize synthetic_anomalies")
    if synthetic_df.empty:
        return empty_frame(REFINED_SCHEMA)
    params = dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    rows = []
    with progress_bar("refined masks", total=len(synthetic_df), unit="img") as bar:
        for i, (_, row) in enumerate(synthetic_df.iterrows()):
            rows.append({**refine_row(storage, row, cfg), "params_json": params})
            bar.update(1)
            progress("refined masks", i + 1, len(synthetic_df))
    df = pd.DataFrame(rows)
    to_table(df, REFINED_SCHEMA, REFINED_ASSET)  # fail here, with the schema's message, not in the IO manager
    return df[REFINED_SCHEMA.names]


def check_refined(storage: Storage, refined_df: pd.DataFrame, max_area_fraction: float = 0.9) -> list[str]:
    """Problems for the asset check: empty final masks, masks not matching their image, implausible areas."""
    problems = []
    empty = refined_df[refined_df["final_area"] <= 0]
    if len(empty):
        problems.append(f"{len(empty)} empty final masks (first: {empty['final_path'].iloc[0]})")
    frac = refined_df["final_area"] / (refined_df["width"] * refined_df["height"])
    big = refined_df[frac > max_area_fraction]
    if len(big):
        problems.append(f"{len(big)} final masks cover more than {max_area_fraction:.0%} of their image "
                        f"(first: {big['final_path'].iloc[0]})")
    for _, r in refined_df.iterrows():
        with Image.open(io.BytesIO(storage.read_bytes(r["final_path"]))) as im:
            if im.size != (r["width"], r["height"]):
                problems.append(f"{r['final_path']}: {im.size} does not match its image {r['width']}x{r['height']}")
    return problems
