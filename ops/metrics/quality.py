"""Generation-quality metrics of one category x method partition, and the cross-method summary.

One row per defect type plus one pooled row (``defect_type == ALL``) per partition. Columns, by backbone:

- Literature-comparable (NaN when the backbone's weights are not on disk; the reason is in ``sources_json``):
  ``fid``, ``kid_mean/std``, ``is_mean/std`` (torch-fidelity InceptionV3), ``ic_lpips_ad`` and ``ic_lpips_a``
  (VGG-LPIPS), ``ic_lpips_dfm`` / ``ic_lpips_dfm_rz`` and ``bg_lpips`` (Alex-LPIPS).
- Always computed offline, named apart: ``fid_effl0``, ``kid_effl0_*``, ``is_effl0_*`` (EfficientNet-Lite0
  features / ImageNet logits), ``ic_effl0_ad|dfm|dfm_rz|a`` and ``bg_effl0`` (the EfficientNet-Lite0 LPIPS-baseline
  distance, see :mod:`ops.metrics.features`), so runs on machines with and without user weights share columns.
- ``bg_psnr``, ``bg_ssim`` (background preservation, :mod:`ops.metrics.background`), ``mask_iou_*`` (IoU of the
  target mask vs the final refined mask), counts.
- Memorisation (EfficientNet-Lite0 pooled features, cosine distance): ``nn_support_effl0`` = mean over generated
  images of the distance to the closest SUPPORT image of their defect type (``nn_support_effl0_min`` the
  smallest), ``nn_holdout_effl0`` = the same for the held-out REAL defects of that type, and
  ``nn_support_ratio`` = their ratio. Real defects of a type are as far from its support images as
  independent samples are; a ratio well below 1 means the method copies its support images.

Choices where the issue or papers leave room:
- FID/KID reference = the real defect images of the same type; ``real_reference`` = ``all`` (support + held-out,
  default: the most images for a very noisy estimate), ``support`` or ``holdout``.
- IC-LPIPS cluster centres = the support images of the defect type (DESIGN §4); IC-LPIPS(a) uses the
  AnomalyDiffusion variant on mask-multiplied images (generated x final refined mask, support x its real mask).
- The pooled row computes FID/KID/IS on the pooled sets; IC values are the mean over defect types (clusters are
  per type); background and mask-fidelity values are means over all images.
- Streaming: generated images are read from disk when a metric needs them (``StoredImages``), background
  values a chunk of ``STREAM_CHUNK`` at a time; what is kept per image is its numbers and pooled features
  (about 18 KB), so memory no longer grows with the images' pixels (bench/bench_memory.py).
- ``sources_json`` maps every metric column to the backbone that produced it or to ``"skipped: <reason>"``.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from ops.manifest import dumps, to_table
from ops.methods.base import MethodConfig, Progress, no_progress
from ops.metrics.background import background_region, composite, psnr_ssim
from ops.metrics.features import Lite0Features, PerceptualDistance, load_lpips, lite0_distance, lpips_distance
from ops.metrics.fid_kid import SetMetrics, set_metrics
from ops.metrics.ic_lpips import assign_clusters, ic_ad, ic_dfm
from ops.metrics.inception import InceptionFeatures, load_inception
from ops.metrics.weights import Missing
from ops.progress import progress_bar
from ops.samples import dataset_file, load_sample, read_mask, read_rgb
from ops.storage import Storage
from ops.viz import figure_png

QUALITY_ASSET = "quality_metrics"
ALL = "__all__"
_F = pa.float64()


def effl0_col(col: str) -> str:
    """Column of the EfficientNet-Lite0 twin of an Inception metric: fid -> fid_effl0, kid_mean -> kid_effl0_mean."""
    head, sep, tail = col.partition("_")
    return f"{head}_effl0{sep}{tail}"


SET_COLS = ["fid", "kid_mean", "kid_std", "is_mean", "is_std"]
IC_COLS = ["ic_lpips_ad", "ic_lpips_dfm", "ic_lpips_dfm_rz", "ic_lpips_a",
           "ic_effl0_ad", "ic_effl0_dfm", "ic_effl0_dfm_rz", "ic_effl0_a"]
BG_COLS = ["bg_psnr", "bg_ssim", "bg_lpips", "bg_effl0"]
NN_COLS = ["nn_support_effl0", "nn_support_effl0_min", "nn_holdout_effl0", "nn_support_ratio"]
QUALITY_SCHEMA = pa.schema(
    [("category", pa.string()), ("method", pa.string()), ("defect_type", pa.string()),
     ("n_generated", pa.int64()), ("n_real", pa.int64()), ("n_support", pa.int64())]
    + [(c, _F) for c in SET_COLS] + [(effl0_col(c), _F) for c in SET_COLS]
    + [("kid_subset_size", pa.int64()), ("kid_subsets", pa.int64()), ("is_splits", pa.int64())]
    + [(c, _F) for c in IC_COLS + BG_COLS]
    + [("mask_iou_mean", _F), ("mask_iou_min", _F), ("final_area_mean", _F)]
    + [(c, _F) for c in NN_COLS]
    + [
       ("sources_json", pa.string()), ("clusters_json", pa.string()), ("notes", pa.string()),
       ("params_json", pa.string()), ("seconds", _F)])
SUMMARY_COLS = ["category", "method", "n_generated", "n_real", "fid", "fid_effl0", "kid_mean", "kid_effl0_mean",
                "is_mean", "is_effl0_mean", "ic_lpips_ad", "ic_lpips_dfm", "ic_effl0_ad", "ic_effl0_dfm",
                "ic_lpips_a", "ic_effl0_a", "bg_psnr", "bg_ssim", "bg_lpips", "bg_effl0", "mask_iou_mean",
                "nn_support_ratio"]


@dataclass
class QualityConfig(MethodConfig):
    weights_dir: str = ""  # extra folder searched for user-supplied weight files (see ops.metrics.weights)
    device: str = "cpu"
    real_reference: str = "all"  # all | support | holdout
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    is_splits: int = 10
    ic_size: int = 256
    ic_ad_members: int = 50
    ic_dfm_cap: int = 200
    ic_feature_mb: int = 512  # perceptual features held at once by IC metrics (blocks: ops.metrics.ic_lpips)
    bg_margin: int = 3
    psnr_cap: float = 100.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ic_feature_mb <= 0:
            raise ValueError(f"quality config: ic_feature_mb={self.ic_feature_mb}; give a positive number of MB")
        if self.real_reference not in ("all", "support", "holdout"):
            raise ValueError(f"quality config: real_reference={self.real_reference!r}; use all, support or holdout")


class MetricBackbones:
    """The metric networks of one run: loaded once, shared by all partitions; missing ones carry their reason."""

    def __init__(self, weights_dir: str | None = None, device: str = "cpu", ic_size: int = 256):
        self.lite0 = Lite0Features(device=device)
        self.lite0_distance = lite0_distance(self.lite0, ic_size)
        self.inception: InceptionFeatures | str = load_inception(weights_dir, device)
        self.lpips: dict[str, PerceptualDistance | str] = {}
        for net in ("vgg", "alex"):
            model = load_lpips(net, weights_dir, device)
            self.lpips[net] = str(model) if isinstance(model, Missing) else lpips_distance(model, net, ic_size)

    def describe(self) -> dict[str, str]:
        return {"efficientnet-lite0": self.lite0.name, "inception": _src(self.inception),
                **{f"lpips-{k}": _src(v) for k, v in self.lpips.items()}}


@functools.lru_cache(maxsize=2)
def cached_backbones(weights_dir: str = "", device: str = "cpu", ic_size: int = 256) -> MetricBackbones:
    """One set of metric networks per process and settings (Dagster runs several partitions in one process)."""
    return MetricBackbones(weights_dir or None, device, ic_size)


def load_backbones(weights: Any, cfg: QualityConfig) -> MetricBackbones:
    if isinstance(weights, MetricBackbones):
        return weights
    return MetricBackbones(str(weights) if weights else cfg.weights_dir or None, cfg.device, cfg.ic_size)


def _src(x: Any) -> str:
    return f"skipped: {x}" if isinstance(x, str) else x.name


class StoredImages(Sequence):
    """Images read from disk on access (an index or a slice), never all held: the metrics stream them, so memory
    does not grow with the partition's size (only per-image numbers and pooled features are kept)."""

    def __init__(self, items: Sequence[dict[str, Any]], load: Callable[[dict[str, Any]], np.ndarray]):
        self._items, self._load = list(items), load

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._load(it) for it in self._items[i]]
        return self._load(self._items[i])


def _image(it: dict[str, Any]) -> np.ndarray:
    return read_rgb(it["image_path"])


def _masked_image(it: dict[str, Any]) -> np.ndarray:
    return _masked(read_rgb(it["image_path"]), read_mask(it["final_path"]))


def _synthetic_images(storage: Storage, syn: pd.DataFrame, ref: pd.DataFrame) -> dict[int, dict[str, Any]]:
    """Per generated image: where its files are and its refined-mask numbers (the pixels stay on disk)."""
    ref_by_index = ref.set_index("index")
    out = {}
    for _, r in syn.iterrows():
        idx = int(r["index"])
        if idx not in ref_by_index.index:
            raise ValueError(f"refined_masks has no row for synthetic index {idx} ({r['image_path']}); "
                             f"re-materialize refined_masks for this partition")
        rr = ref_by_index.loc[idx]
        # paths only (images are read when needed); local_file / dataset_file: the files themselves, or cached
        # copies of a remote root's objects
        out[idx] = {"image_path": storage.local_file(r["image_path"]), "defect_type": str(r["defect_type"]),
                    "target_path": storage.local_file(r["target_path"]),
                    "final_path": storage.local_file(rr["final_path"]),
                    "final_iou": float(rr["final_iou"]), "final_area": float(rr["final_area"]),
                    "normal_path": dataset_file(r["normal_dataset_root"], str(r["normal_path"]))}
    return out


def _real_rows(split_df: pd.DataFrame, category: str) -> pd.DataFrame:
    rows = split_df[(split_df["category"] == category) & (split_df["defect_type"] != "good")
                    & split_df["role"].isin(["support", "holdout"])]
    return rows.sort_values("image_id")


def _features(fe: Any, images: list[np.ndarray]) -> tuple[Any, Any] | None:
    """(pooled features, logits) of every image, extracted once per partition and sliced per group."""
    if isinstance(fe, str):
        return None
    import torch

    if not images:
        return torch.zeros((0, 1)), torch.zeros((0, 1))
    return fe.pooled_and_logits(images)


def _set_block(real: tuple[Any, Any] | None, fake: tuple[Any, Any] | None, real_idx: list[int],
               fake_idx: list[int], cfg: QualityConfig) -> SetMetrics | None:
    if real is None or fake is None:
        return None
    rf = real[0][real_idx] if real_idx else real[0][:0].new_zeros((0, fake[0].shape[1]))
    return set_metrics(rf, fake[0][fake_idx], fake[1][fake_idx], kid_subset_size=cfg.kid_subset_size,
                       kid_subsets=cfg.kid_subsets, is_splits=cfg.is_splits, seed=cfg.seed)


def _ic_block(dist: PerceptualDistance | str, gen: list[np.ndarray], centers: list[np.ndarray],
              gen_masked: list[np.ndarray], centers_masked: list[np.ndarray], cfg: QualityConfig,
              variants: tuple[str, ...]) -> tuple[dict[str, float], dict[str, Any]]:
    nan = math.nan
    vals = {"ad": nan, "dfm": nan, "dfm_rz": nan, "a": nan}
    info: dict[str, Any] = {}
    if isinstance(dist, str) or not centers or not gen:
        return vals, info
    budget = cfg.ic_feature_mb * 2 ** 20
    labels = assign_clusters(gen, centers, dist, budget_bytes=budget)
    if "ad" in variants:
        r = ic_ad(gen, centers, dist, cfg.ic_ad_members, cfg.seed, assignment=labels, budget_bytes=budget)
        vals["ad"], info["ad"] = r.value, list(r.sizes)
    if "dfm" in variants:
        r = ic_dfm(gen, centers, dist, cfg.ic_dfm_cap, assignment=labels, budget_bytes=budget)
        vals["dfm"], vals["dfm_rz"], info["dfm"] = r.value, r.value_rz, list(r.sizes)
    if "a" in variants:
        r = ic_ad(gen_masked, centers_masked, dist, cfg.ic_ad_members, cfg.seed, budget_bytes=budget)
        vals["a"], info["a"] = r.value, list(r.sizes)
    return vals, info


STREAM_CHUNK = 32  # images in memory at a time; a multiple of the networks' batch sizes (8, 16): same batches


def _background(items: dict[int, dict[str, Any]], nets: MetricBackbones, cfg: QualityConfig) -> None:
    """Per-image bg_* values, stored in the item dicts (computed once, aggregated per group), a chunk at a time."""
    todo = list(items.values())
    for start in range(0, len(todo), STREAM_CHUNK):
        comps, normals = [], []
        chunk = todo[start:start + STREAM_CHUNK]
        for it in chunk:
            image, normal = read_rgb(it["image_path"]), read_rgb(it["normal_path"])
            bg = background_region(read_mask(it["target_path"]), read_mask(it["final_path"]), cfg.bg_margin)
            it["bg_psnr"], it["bg_ssim"] = psnr_ssim(image, normal, bg, cfg.psnr_cap)
            comps.append(composite(image, normal, bg))
            normals.append(normal)
        for col, dist in (("bg_lpips", nets.lpips["alex"]), ("bg_effl0", nets.lite0_distance)):
            vals = [math.nan] * len(comps) if isinstance(dist, str) else list(dist.paired(dist.embed(comps),
                                                                                          dist.embed(normals)))
            for it, v in zip(chunk, vals):
                it[col] = v


def _masked(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return image * (mask[..., None] if mask is not None else 0).astype(np.uint8)


def quality_partition(storage: Storage, split_df: pd.DataFrame, synthetic_df: pd.DataFrame,
                      refined_df: pd.DataFrame, weights: Any = None, cfg: QualityConfig | dict | None = None,
                      progress: Progress = no_progress) -> pd.DataFrame:
    """QUALITY_SCHEMA rows (one per defect type + the pooled row) for one category x method partition."""
    t0 = time.perf_counter()
    cfg = cfg if isinstance(cfg, QualityConfig) else QualityConfig.from_dict(cfg)
    if synthetic_df.empty:
        raise ValueError("synthetic_anomalies is empty for this partition; nothing to measure")
    pairs = synthetic_df[["category", "method"]].drop_duplicates()
    if len(pairs) != 1:
        raise ValueError(f"quality_partition measures one category x method, got {pairs.values.tolist()}")
    category, method = pairs.iloc[0]
    nets = load_backbones(weights, cfg)
    items = _synthetic_images(storage, synthetic_df, refined_df)
    _background(items, nets, cfg)
    real = [(load_sample(r), r["role"], r["defect_type"]) for _, r in _real_rows(split_df, category).iterrows()]
    order = list(items)
    feats = {name: (_features(fe, [s.image for s, _, _ in real]),
                    _features(fe, StoredImages([items[i] for i in order], _image)))
             for name, fe in (("", nets.inception), ("_effl0", nets.lite0))}
    holdout_nn = _nearest_support(items, order, real, feats["_effl0"])
    sources = _sources(nets)
    params = dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    types = sorted({it["defect_type"] for it in items.values()})
    rows, ic_by_type = [], []
    with progress_bar(f"quality {category}/{method}", total=len(types) + 1, unit="set") as bar:
        for n_done, dt in enumerate(types + [ALL]):
            fake_idx = [k for k, i in enumerate(order) if dt == ALL or items[i]["defect_type"] == dt]
            real_idx = [k for k, (s, role, t) in enumerate(real) if (dt == ALL or t == dt)
                        and (cfg.real_reference == "all" or role == cfg.real_reference)]
            support = [s for s, role, t in real if t == dt and role == "support"]
            row = _group_row([items[order[k]] for k in fake_idx], real_idx, fake_idx, support, feats, nets, cfg,
                             with_ic=dt != ALL)
            row.update(_nn_cols([items[order[k]] for k in fake_idx],
                                [d for t, d in holdout_nn if dt == ALL or t == dt]))
            if dt == ALL:  # clusters are per type: the pooled IC value is the mean over types
                for c in IC_COLS:
                    vals = [r[c] for r in ic_by_type if not math.isnan(r[c])]
                    row[c] = float(np.mean(vals)) if vals else math.nan
                row["n_support"] = sum(r["n_support"] for r in ic_by_type)
            else:
                ic_by_type.append(row)
            rows.append({"category": category, "method": method, "defect_type": dt, **row,
                         "sources_json": dumps(sources), "params_json": params})
            bar.update(1)
            progress(f"quality {category}/{method}", n_done + 1, len(types) + 1)
    seconds = time.perf_counter() - t0
    df = pd.DataFrame([{**r, "seconds": seconds} for r in rows])
    to_table(df, QUALITY_SCHEMA, QUALITY_ASSET)
    return df[QUALITY_SCHEMA.names]


def _group_row(sel: list[dict], real_idx: list[int], fake_idx: list[int], support: list, feats: dict,
               nets: MetricBackbones, cfg: QualityConfig, with_ic: bool) -> dict[str, Any]:
    fake = StoredImages(sel, _image)
    row: dict[str, Any] = {"n_generated": len(sel), "n_real": len(real_idx), "n_support": len(support)}
    notes = []
    for suffix in ("", "_effl0"):
        m = _set_block(*feats[suffix], real_idx, fake_idx, cfg)
        for c in SET_COLS:
            col = effl0_col(c) if suffix else c
            row[col] = getattr(m, c) if m is not None else math.nan
        if m is not None:
            row.update(kid_subset_size=m.kid_subset_size, kid_subsets=m.kid_subsets, is_splits=m.is_splits)
            if m.notes:
                notes.append(m.notes)
    centers = [s.image for s in support]
    centers_m = [_masked(s.image, s.mask) for s in support]
    gen_m = StoredImages(sel, _masked_image)
    clusters = {}
    for prefix, dist, variants in () if not with_ic else (("ic_lpips", nets.lpips["vgg"], ("ad", "a")),
                                   ("ic_lpips", nets.lpips["alex"], ("dfm",)),
                                   ("ic_effl0", nets.lite0_distance, ("ad", "dfm", "a"))):
        vals, info = _ic_block(dist, fake, centers, gen_m, centers_m, cfg, variants)
        for v in variants:
            row[f"{prefix}_{v}"] = vals[v]
            if v == "dfm":
                row[f"{prefix}_dfm_rz"] = vals["dfm_rz"]
        clusters.update({f"{prefix}_{k}": s for k, s in info.items()})
    if with_ic and not centers:
        notes.append("no support images of this type: IC metrics need cluster centres")
    for c in BG_COLS:
        vals = [it[c] for it in sel if not math.isnan(it[c])]
        row[c] = float(np.mean(vals)) if vals else math.nan
    ious = [it["final_iou"] for it in sel]
    row.update(mask_iou_mean=float(np.mean(ious)), mask_iou_min=float(np.min(ious)),
               final_area_mean=float(np.mean([it["final_area"] for it in sel])),
               clusters_json=dumps(clusters), notes="; ".join(notes))
    row.setdefault("kid_subset_size", 0)
    row.setdefault("kid_subsets", cfg.kid_subsets)
    row.setdefault("is_splits", 0)
    return row


def _cosine_distance(a: Any, b: Any) -> Any:
    import torch

    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return 1.0 - a @ b.T


def _nearest_support(items: dict[int, dict[str, Any]], order: list[int], real: list, feats: tuple
                     ) -> list[tuple[str, float]]:
    """Store each generated image's distance to its type's closest support image (``nn_support``) in its item;
    return (defect type, distance) of every held-out real defect to the same support set."""
    real_pair, fake_pair = feats
    if real_pair is None or fake_pair is None:
        return []
    real_f, fake_f = real_pair[0], fake_pair[0]
    support = {t: [k for k, (_, role, tt) in enumerate(real) if role == "support" and tt == t]
               for t in {t for _, _, t in real}}
    for k, i in enumerate(order):
        sup = support.get(items[i]["defect_type"], [])
        items[i]["nn_support"] = float(_cosine_distance(fake_f[k:k + 1], real_f[sup]).min()) if sup else math.nan
    out = []
    for k, (_, role, t) in enumerate(real):
        if role == "holdout" and support.get(t):
            out.append((t, float(_cosine_distance(real_f[k:k + 1], real_f[support[t]]).min())))
    return out


def _nn_cols(sel: list[dict], holdout: list[float]) -> dict[str, float]:
    gen = [it.get("nn_support", math.nan) for it in sel]
    gen = [g for g in gen if not math.isnan(g)]
    g = float(np.mean(gen)) if gen else math.nan
    h = float(np.mean(holdout)) if holdout else math.nan
    return {"nn_support_effl0": g, "nn_support_effl0_min": float(np.min(gen)) if gen else math.nan,
            "nn_holdout_effl0": h, "nn_support_ratio": g / h if gen and holdout and h > 0 else math.nan}


def _sources(nets: MetricBackbones) -> dict[str, str]:
    inc, lite = _src(nets.inception), nets.lite0.name
    vgg, alex, l0d = _src(nets.lpips["vgg"]), _src(nets.lpips["alex"]), nets.lite0_distance.name
    out = {c: inc for c in SET_COLS}
    out.update({effl0_col(c): lite for c in SET_COLS})
    out.update(ic_lpips_ad=vgg, ic_lpips_a=vgg, ic_lpips_dfm=alex, ic_lpips_dfm_rz=alex, bg_lpips=alex,
               ic_effl0_ad=l0d, ic_effl0_dfm=l0d, ic_effl0_dfm_rz=l0d, ic_effl0_a=l0d, bg_effl0=l0d,
               bg_psnr="pixels (no network)", bg_ssim="scikit-image SSIM (no network)",
               mask_iou_mean="refined_masks final mask vs target mask",
               **{c: lite for c in NN_COLS})
    return out


def check_quality(df: pd.DataFrame) -> list[str]:
    """Problems for the asset check: missing pooled row, non-finite offline metrics, metrics without a source."""
    problems = []
    if not (df["defect_type"] == ALL).any():
        problems.append("no pooled (__all__) row")
    for _, r in df.iterrows():
        where = f"{r['category']}/{r['method']}/{r['defect_type']}"
        need = ["is_effl0_mean", "bg_ssim", "bg_psnr", "mask_iou_mean"]
        if r["n_real"] >= 2 and r["n_generated"] >= 2:
            need += ["fid_effl0", "kid_effl0_mean"]
        bad = [c for c in need if not np.isfinite(r[c])]
        if bad:
            problems.append(f"{where}: non-finite {bad}")
        sources = json.loads(r["sources_json"])
        unnamed = [c for c in [*SET_COLS, *map(effl0_col, SET_COLS), *IC_COLS, *BG_COLS] if not sources.get(c)]
        if unnamed:
            problems.append(f"{where}: no recorded source for {unnamed}")
        for c, src in sources.items():
            if c in r and src.startswith("skipped") and np.isfinite(r[c]):
                problems.append(f"{where}: {c} has a value although its backbone was skipped")
    return problems


def not_computed(sources_json: str, columns: Iterable[str] = SUMMARY_COLS) -> str:
    """A short visible reason for every metric of ``columns`` that was skipped, grouped by reason
    (e.g. "fid, kid_mean, is_mean: no weights-inception-2015-12-05-6726825d.pth"); '' when none was."""
    import re

    by_reason: dict[str, list[str]] = {}
    for col, src in json.loads(sources_json).items():
        if col in columns and src.startswith("skipped"):
            found = re.search(r"weight file '([^']+)' not found", src)
            reason = f"no {found.group(1)}" if found else src.removeprefix("skipped: ").split(";")[0][:60]
            by_reason.setdefault(reason, []).append(col)
    return "; ".join(f"{', '.join(cols)}: {reason}" for reason, cols in sorted(by_reason.items()))


def summarize(quality_dfs: pd.DataFrame | Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Cross-method comparison: the pooled row of every category x method, plus each method's mean over categories;
    ``not_computed`` names the metrics that are blank and why."""
    df = quality_dfs if isinstance(quality_dfs, pd.DataFrame) else pd.concat(list(quality_dfs), ignore_index=True)
    pooled = df[df["defect_type"] == ALL].sort_values(["category", "method"], ignore_index=True)
    if pooled.empty:
        raise ValueError("no pooled quality rows to summarize: materialize quality_metrics for some partitions")
    pooled = pooled.assign(not_computed=[not_computed(s) for s in pooled["sources_json"]])[SUMMARY_COLS + ["not_computed"]]
    means = pooled.drop(columns="category").groupby("method", sort=True).mean(numeric_only=True).reset_index()
    means.insert(0, "category", "__mean__")
    means["not_computed"] = [" | ".join(sorted(set(pooled.loc[pooled["method"] == m, "not_computed"]) - {""}))
                             for m in means["method"]]
    return pd.concat([pooled, means[SUMMARY_COLS + ["not_computed"]]], ignore_index=True)


def quality_plot(df: pd.DataFrame, title: str = "") -> bytes:
    """PNG: per-defect-type bars of the main metrics (whichever backbone produced them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = [c for c in ("fid", "fid_effl0", "ic_lpips_ad", "ic_effl0_ad", "bg_ssim", "mask_iou_mean")
            if c in df and df[c].notna().any()]
    fig, axes = plt.subplots(1, len(show), figsize=(2.6 * len(show), 2.8), squeeze=False)
    labels = [str(x) for x in (df["defect_type"] if "defect_type" in df and df["defect_type"].nunique() > 1
                               else df["category"] + "/" + df["method"])]
    for ax, c in zip(axes[0], show):
        ax.bar(range(len(df)), df[c].to_numpy(dtype=float), color="#4477aa")
        ax.set_title(c, fontsize=9)
        ax.set_xticks(range(len(df)), labels, rotation=45, ha="right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)
