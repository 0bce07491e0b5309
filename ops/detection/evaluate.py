"""Scoring detectors on held-out REAL defects with anomalib's metrics (DESIGN §4).

Image AUROC / AP / F1-max, pixel AUROC / AP / F1-max and AUPRO up to FPR 0.3, all from ``anomalib.metrics``
(``AUROC``, ``AUPR``, ``F1Max``, ``AUPRO``), on the split's held-out defects + ``test/good`` images.

Choices recorded here because the protocol leaves them open:

- Metrics use the detectors' RAW outputs, not anomalib's post-processed ones: the PostProcessor clamps
  normalised scores to [0, 1], which turns the tails into ties and changes ranking metrics.
- Before the metric call, scores (and maps) are min-max scaled over the whole test set. The scaling is one
  increasing affine map, so every ranking metric is unchanged; without it torchmetrics applies a sigmoid to
  inputs outside [0, 1], which saturates large PatchCore distances in float32 into ties.
- Pixel metrics are computed at the resolution of the ground-truth masks (the first test mask's size;
  MVTec-style categories have one size): anomaly maps are resized bilinearly, masks with nearest neighbour, so
  detectors trained at different input sizes are scored on the same pixels.
- A metric that is undefined on the test set (no defective or no good image) is NaN, never a made-up number.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anomalib.data.utils import read_image, read_mask
from anomalib.metrics import AUPR, AUPRO, AUROC, F1Max

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
METRIC_COLUMNS = IMAGE_METRICS + PIXEL_METRICS


@dataclass
class Predictions:
    scores: np.ndarray  # (N,) image scores, higher = more anomalous
    labels: np.ndarray  # (N,) 0 good, 1 defective
    maps: np.ndarray  # (N, H, W) float32 anomaly maps at mask resolution
    masks: np.ndarray  # (N, H, W) bool ground truth


def _unit(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def _metric(metric: Any, **fields: torch.Tensor) -> float:
    metric.update(SimpleNamespace(**fields))
    return float(metric.compute())


def compute_metrics(scores: Any, labels: Any, maps: Any, masks: Any, fpr_limit: float = 0.3) -> dict[str, float]:
    """The seven protocol metrics from anomalib's metric classes; NaN where the test set cannot define one."""
    s = _unit(torch.tensor(np.array(scores, dtype=np.float64)).float())
    y = torch.tensor(np.array(labels, dtype=np.int64))
    m = _unit(torch.tensor(np.array(maps, dtype=np.float32)))
    g = torch.tensor(np.array(masks, dtype=bool)).long()
    if s.ndim != 1 or y.shape != s.shape or m.ndim != 3 or g.shape != m.shape or m.shape[0] != s.shape[0]:
        raise ValueError(f"compute_metrics: scores {tuple(s.shape)}, labels {tuple(y.shape)}, maps {tuple(m.shape)} "
                         f"and masks {tuple(g.shape)} must be (N,), (N,), (N,H,W), (N,H,W)")
    out = dict.fromkeys(METRIC_COLUMNS, float("nan"))
    if 0 < int(y.sum()) < len(y):
        out["image_auroc"] = _metric(AUROC(fields=["pred_score", "gt_label"]), pred_score=s, gt_label=y)
        out["image_ap"] = _metric(AUPR(fields=["pred_score", "gt_label"]), pred_score=s, gt_label=y)
        out["image_f1max"] = _metric(F1Max(fields=["pred_score", "gt_label"]), pred_score=s, gt_label=y)
    if 0 < int(g.sum()) < g.numel():
        out["pixel_auroc"] = _metric(AUROC(fields=["anomaly_map", "gt_mask"]), anomaly_map=m, gt_mask=g)
        out["pixel_ap"] = _metric(AUPR(fields=["anomaly_map", "gt_mask"]), anomaly_map=m, gt_mask=g)
        out["pixel_f1max"] = _metric(F1Max(fields=["anomaly_map", "gt_mask"]), anomaly_map=m, gt_mask=g)
        out["aupro"] = _metric(AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=fpr_limit), anomaly_map=m, gt_mask=g)
    return out


@torch.no_grad()
def predict_rows(module: Any, rows: pd.DataFrame, batch_size: int = 16) -> Predictions:
    """Raw predictions of an anomalib module for sample rows (``image_path``, ``mask_path``, ``label_index``)."""
    if rows.empty:
        raise ValueError("no test rows to score: the split has no held-out defects and no test/good images")
    transform = module.pre_processor.transform if module.pre_processor is not None else None
    net = module.model.eval()
    device = next(module.parameters()).device
    first_mask = next((p for p in rows["mask_path"] if p), None)
    size = tuple(read_mask(first_mask, as_tensor=True).shape[-2:]) if first_mask else \
        tuple(read_image(rows["image_path"].iloc[0], as_tensor=True).shape[-2:])
    scores, maps, masks = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start:start + batch_size]
        images = torch.stack([F.interpolate(read_image(p, as_tensor=True)[None], size=size, mode="bilinear",
                                            antialias=True, align_corners=False)[0] for p in chunk["image_path"]])
        x = transform(images) if transform is not None else images
        out = net(x.to(device))
        amap = out.anomaly_map.float().cpu()
        amap = amap if amap.ndim == 4 else amap.unsqueeze(1)
        maps.append(F.interpolate(amap, size=size, mode="bilinear", align_corners=False)[:, 0])
        scores.append(out.pred_score.float().cpu().reshape(-1))
        for p in chunk["mask_path"]:
            gt = read_mask(p, as_tensor=True)[None, None].float() if p else torch.zeros(1, 1, *size)
            masks.append(F.interpolate(gt, size=size, mode="nearest")[0, 0] > 0.5)
    return Predictions(scores=torch.cat(scores).numpy(), labels=rows["label_index"].to_numpy(dtype=np.int64),
                       maps=torch.cat(maps).numpy(), masks=torch.stack(masks).numpy())
