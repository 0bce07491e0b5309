"""Detector metrics agree with sklearn and with an independent AUPRO; the report shows each row once."""
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ops.detection.evaluate import METRIC_COLUMNS, compute_metrics
from ops.detection.report import REPORT_PNG, summary_table, write_report
from ops.detection.stage import EVALUATION_SCHEMA, check_evaluation
from ops.storage import Storage


def f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    return float(np.max(2 * p * r / (p + r + 1e-10)))


def aupro_reference(maps, masks, fpr_limit):
    """Per-region overlap vs global FPR over every threshold, linear cut at fpr_limit, area / fpr_limit."""
    regions = []
    for m, g in zip(maps, masks):
        for y0, x0, y1, x1 in boxes_of(g):
            regions.append(m[y0:y1, x0:x1].ravel())
    background = np.concatenate([m[~g] for m, g in zip(maps, masks)])
    fpr, pro = [0.0], [0.0]
    for t in np.unique(np.concatenate([background, *regions]))[::-1]:
        fpr.append(float((background >= t).mean()))
        pro.append(float(np.mean([(r >= t).mean() for r in regions])))
    fpr, pro = np.array(fpr), np.array(pro)
    i = np.searchsorted(fpr, fpr_limit, side="right") - 1
    cut_f = np.r_[fpr[:i + 1], fpr_limit]
    cut_p = np.r_[pro[:i + 1], pro[i] + (pro[i + 1] - pro[i]) * (fpr_limit - fpr[i]) / (fpr[i + 1] - fpr[i])]
    return float(np.trapezoid(cut_p, cut_f) / fpr_limit)


def boxes_of(mask):
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    return [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(labels)]


@pytest.fixture(scope="module")
def fixed():
    rng = np.random.default_rng(7)
    n = 24
    labels = np.r_[np.zeros(12), np.ones(12)].astype(int)
    # PatchCore-like raw distances far outside [0, 1]: a sigmoid would saturate them into ties
    scores = 40.0 + 15.0 * rng.normal(size=n) + 12.0 * labels
    masks = np.zeros((n, 32, 32), dtype=bool)
    for i in range(12, n):
        masks[i, 3 + i % 5:10 + i % 5, 4:12] = True
        if i % 3 == 0:
            masks[i, 20:26, 18 + i % 4:27 + i % 4] = True  # a second region in some images
    maps = 30.0 * rng.random((n, 32, 32)) + 12.0 * masks * rng.random((n, 32, 32))
    return scores, labels, maps, masks


def test_image_and_pixel_metrics_match_sklearn(fixed):
    scores, labels, maps, masks = fixed
    got = compute_metrics(scores, labels, maps, masks)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-5)
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-5)
    assert got["image_f1max"] == pytest.approx(f1_max(labels, scores), abs=1e-5)
    flat_m, flat_g = maps.ravel(), masks.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(flat_g, flat_m), abs=1e-5)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(flat_g, flat_m), abs=1e-5)
    assert got["pixel_f1max"] == pytest.approx(f1_max(flat_g, flat_m), abs=1e-5)
    assert 0.55 < got["image_auroc"] < 0.95  # a non-trivial case: not all ties, not separable


def test_aupro_matches_an_independent_implementation(fixed):
    _, _, maps, masks = fixed
    scores, labels = np.zeros(len(maps)), (masks.reshape(len(masks), -1).any(1)).astype(int)
    for limit in (0.3, 0.05):
        got = compute_metrics(scores, labels, maps, masks, fpr_limit=limit)["aupro"]
        assert got == pytest.approx(aupro_reference(maps, masks, limit), abs=2e-4)


def test_metrics_are_nan_when_the_test_set_cannot_define_them(fixed):
    scores, _, maps, _ = fixed
    got = compute_metrics(scores, np.zeros(len(scores), int), maps, np.zeros(maps.shape, bool))
    assert all(math.isnan(got[k]) for k in METRIC_COLUMNS)
    with pytest.raises(ValueError, match="must be"):
        compute_metrics(scores[:-1], np.zeros(len(scores), int), maps, np.zeros(maps.shape, bool))


def _row(category, method, detector, label, baseline, ckpt, auroc):
    return {"category": category, "method": method, "detector": detector, "row_label": label,
            "is_baseline": baseline, "trained_on": "synthetic", "weak_tau": None, "n_test_good": 8,
            "n_test_defective": 5, **{m: auroc for m in METRIC_COLUMNS}, "aupro_fpr_limit": 0.3,
            "metric_resolution": "64x64", "metric_note": "", "backbone_source": "", "val_score": 0.5, "train_seconds": 1.0,
            "eval_seconds": 0.1, "checkpoint_path": ckpt}


def test_report_shows_the_reference_once_and_first(tmp_path):
    ref = "detectors/brick/none/patchcore/checkpoints/best.ckpt"
    df = pd.DataFrame([
        _row("brick", "perlin", "segmenter", "baseline: perlin", True, "a", 0.8),
        _row("brick", "none", "patchcore", "no synthetic data", False, ref, 0.9),
        _row("brick", "apo", "segmenter", "synthetic: apo", False, "b", 0.7),
        _row("brick", "none", "patchcore", "no synthetic data", False, ref, 0.9),  # from the other partition
    ])
    table = summary_table(df)
    assert table["row_label"].tolist() == ["no synthetic data", "baseline: perlin", "synthetic: apo"]
    storage = Storage(tmp_path)
    path = write_report(storage, df)
    text = path.read_text()
    assert text.count("| no synthetic data |") == 1 and "| synthetic: apo |" in text
    assert storage.path(REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = pd.read_parquet(storage.path("reports/detectors.parquet"))
    assert list(back.columns) == EVALUATION_SCHEMA.names and len(back) == 4


def test_evaluation_check_flags_out_of_range_values():
    good = pd.DataFrame([_row("brick", "perlin", "segmenter", "baseline: perlin", True, "a", 0.8)])
    assert check_evaluation(good) == []
    bad = good.assign(aupro=float("nan"))
    assert check_evaluation(bad) == ["brick/perlin/segmenter: aupro = nan"]


def test_detection_options_are_checked():
    from ops.detection.stage import DetectionConfig

    cfg = DetectionConfig.from_dict({"steps": {"segmenter": 7}, "options": {"segmenter": {"base_width": 4}}})
    assert cfg.steps_for("segmenter") == 7 and cfg.steps_for("draem") == 40
    assert cfg.options_for("segmenter")["base_width"] == 4 and cfg.options_for("segmenter")["train_crop"] == 64
    assert cfg.options_for("patchcore")["layers"] == ["blocks.2", "blocks.4"]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['stepz'\]"):
        DetectionConfig.from_dict({"stepz": 1})
    with pytest.raises(ValueError, match="not available"):
        DetectionConfig.from_dict({"detectors": ["padim"]})
