"""Refined masks: difference-based, attention (eq. 13) and localization refinement, final choice, files, checks."""
import json

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from ops.masks.refine import (REFINED_SCHEMA, RefineConfig, attention_mask, check_refined, diff_mask, iou,
                              localization_mask, refine_partition)
from ops.samples import encode_png, read_mask
from ops.storage import Storage

SIZE = 96


def _normal():
    photo = skimage.data.grass()
    photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo
    return np.ascontiguousarray(photo[100:100 + SIZE, 200:200 + SIZE]).astype(np.uint8)


def _ellipse(cy, cx, ry, rx):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _pasted(normal, region, seed=0):
    """Paste a foreign, textured dark patch (a 'defect') into ``region`` with hard edges."""
    rng = np.random.default_rng(seed)
    patch = np.clip(np.array([220, 40, 200]) + rng.normal(0, 12, normal.shape), 0, 255).astype(np.uint8)
    return np.where(region[..., None], patch, normal)


def test_diff_refinement_recovers_a_known_pasted_region():
    normal = _normal()
    region = _ellipse(45, 50, 14, 20)
    target = _ellipse(45, 50, 24, 30)  # the method was allowed a larger area than it painted
    mask, threshold = diff_mask(_pasted(normal, region), normal, target, RefineConfig())
    assert iou(mask, region) >= 0.9
    assert iou(target, region) < 0.6  # the refinement is what makes the mask right
    assert 0.04 <= threshold < 1


def test_diff_refinement_ignores_changes_outside_the_dilated_target_and_unchanged_images():
    normal = _normal()
    region = _ellipse(30, 30, 10, 10)
    far = _ellipse(75, 75, 10, 10)
    image = _pasted(_pasted(normal, region), far, seed=1)
    mask, _ = diff_mask(image, normal, region, RefineConfig())
    assert not (mask & far).any() and iou(mask, region) >= 0.9
    empty, _ = diff_mask(normal, normal, region, RefineConfig())
    assert not empty.any()


def _upsample_1d(v, scale):
    """Bilinear upsampling with half-pixel centres (align_corners=False), written out by hand."""
    src = np.clip((np.arange(len(v) * scale) + 0.5) / scale - 0.5, 0, len(v) - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, len(v) - 1)
    return v[lo] * (1 - (src - lo)) + v[hi] * (src - lo)


def test_attention_refinement_is_eq13():
    target = np.zeros((64, 64), bool)
    target[:, :32] = True  # left half
    att = np.zeros((8, 8), np.float32)
    att[2:6, 2:6] = 1.0
    # m' = left half at 8x8, so m' * A keeps cells rows 2..5 x cols 2..3; Resize = separable bilinear x8
    rows, cols = np.zeros(8), np.zeros(8)
    rows[2:6], cols[2:4] = 1, 1
    expected = np.outer(_upsample_1d(rows, 8), _upsample_1d(cols, 8)) >= 0.5
    got = attention_mask(att, target)
    np.testing.assert_array_equal(got, expected)
    assert got[16:48, 16:32].mean() > 0.9 and not got[:, 32:].any() and not got[:16].any()
    full = np.full((64, 64), 0.49, np.float32)
    full[10:20, 10:40] = 0.5
    np.testing.assert_array_equal(attention_mask(full, target), (full >= 0.5) & target)  # threshold 1/2 inclusive


def test_localization_refinement_thresholds_inside_the_dilated_target():
    target = np.zeros((32, 32), bool)
    target[8:24, 8:24] = True
    loc = np.zeros((32, 32), np.float32)
    loc[10:20, 10:20] = 0.4  # peak inside the target -> renormalised to 1
    loc[0:4, 0:4] = 0.9  # outside the dilated target: ignored (also for the peak)
    loc[20:22, 20:22] = 0.1
    cfg = RefineConfig(keep_margin=2)
    got = localization_mask(loc, target, cfg)
    expected = np.zeros_like(target)
    expected[10:20, 10:20] = True
    np.testing.assert_array_equal(got, expected)


CORES = [(40, 40, 8, 10), (60, 50, 6, 6)]


def _write_partition(tmp_path, method="bgdisentangle", with_attention=True):
    storage = Storage(tmp_path / "store")
    data = tmp_path / "data"
    (data / "good").mkdir(parents=True)
    normal = _normal()
    Image.fromarray(normal).save(data / "good" / "000.png")
    rows = []
    for idx, (region, target) in enumerate([(_ellipse(40, 40, 12, 16), _ellipse(40, 40, 20, 24)),
                                            (_ellipse(60, 50, 10, 10), _ellipse(60, 50, 16, 16))]):
        base = f"images/synthetic_anomalies/cat/{method}"
        extras = {}
        if with_attention:
            # 0.4 on the painted region, 0.8 on its core: only the core passes eq. 13's 1/2 on the true scale
            core = region & _ellipse(*CORES[idx])
            att = ((0.4 * region + 0.4 * core) * 65535).astype(np.uint16)
            extras["attention"] = storage.write_bytes(f"{base}/extras/attention/scratch/{idx:05d}.png",
                                                      encode_png(att))
        rows.append(dict(
            category="cat", method=method, defect_type="scratch", index=idx,
            image_path=storage.write_bytes(f"{base}/images/scratch/{idx:05d}.png",
                                           encode_png(_pasted(normal, region, seed=idx))),
            mask_path=storage.write_bytes(f"{base}/masks/scratch/{idx:05d}_mask.png", encode_png(target)),
            target_path=storage.write_bytes(f"{base}/targets/scratch/{idx:05d}_target.png", encode_png(target)),
            extras_json=json.dumps(extras), normal_path="good/000.png", normal_dataset_root=str(data)))
    return storage, pd.DataFrame(rows)


def test_refine_partition_writes_every_kind_and_picks_the_configured_final(tmp_path):
    storage, syn = _write_partition(tmp_path)
    df = refine_partition(storage, syn, {})
    assert list(df.columns) == REFINED_SCHEMA.names and len(df) == 2
    row = df.iloc[0]
    assert row["final_kind"] == "attention" and row["final_note"] == ""
    assert row["attention_path"] == "images/refined_masks/cat/bgdisentangle/attention/scratch/00000_mask.png"
    assert row["final_path"] == "images/refined_masks/cat/bgdisentangle/final/scratch/00000_mask.png"
    assert pd.isna(row["localization_path"]) and np.isnan(row["localization_area"])
    final = read_mask(storage.path(row["final_path"]))
    assert iou(final, _ellipse(*CORES[0])) >= 0.9  # the 16-bit attention map was read on its real scale
    assert row["final_area"] == final.sum() and row["final_iou"] == pytest.approx(iou(final, read_mask(
        storage.path(row["target_path"]))))
    assert (df["diff_iou"] < 1).all() and (df["method_iou"] == 1).all()
    again = refine_partition(storage, syn, {})  # idempotent rerun: same rows, same bytes
    pd.testing.assert_frame_equal(df, again)


def test_missing_refinement_falls_back_visibly(tmp_path):
    storage, syn = _write_partition(tmp_path, with_attention=False)
    df = refine_partition(storage, syn, RefineConfig())
    assert (df["final_kind"] == "method").all()
    assert df["final_note"].str.contains("attention mask missing").all()
    df2 = refine_partition(storage, syn, {"final": {"bgdisentangle": "diff"}})
    assert (df2["final_kind"] == "diff").all() and (df2["final_iou"] < 1).all()


def test_bad_config_and_missing_columns_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        RefineConfig.from_dict({"treshold": 0.5})
    with pytest.raises(ValueError, match="final mask kinds"):
        RefineConfig(final={"apo": "magic"})
    storage, syn = _write_partition(tmp_path)
    with pytest.raises(ValueError, match="normal_path"):
        refine_partition(storage, syn.drop(columns="normal_path"), {})


def test_check_refined_flags_empty_and_mismatched_masks(tmp_path):
    storage, syn = _write_partition(tmp_path)
    df = refine_partition(storage, syn, {})
    assert check_refined(storage, df) == []
    bad = df.copy()
    bad.loc[0, "final_area"] = 0
    bad.loc[1, "width"] = 50
    problems = check_refined(storage, bad)
    assert any("empty final" in p for p in problems) and any("does not match" in p for p in problems)
