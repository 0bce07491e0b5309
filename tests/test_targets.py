import json

import numpy as np
import pytest

from ops.masks.targets import analyze_foreground, foreground_mask, sample_target_mask

H, W = 96, 112


def object_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A light ellipse (the product) on a dark, slightly noisy background, and the ellipse's true mask."""
    rng = np.random.default_rng(seed)
    img = (30 + rng.integers(0, 12, (H, W, 3))).astype(np.uint8)
    yy, xx = np.ogrid[:H, :W]
    truth = ((yy - 50) / 34.0) ** 2 + ((xx - 60) / 40.0) ** 2 <= 1
    img[truth] = (190, 170, 140)
    return img, truth


def defect_mask() -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[30:40, 45:75] = True  # an elongated scratch-like blob, asymmetric under rotation
    m[40:48, 45:52] = True
    return m


def test_foreground_of_object_matches_the_object():
    img, truth = object_image()
    fg = foreground_mask(img)
    iou = (fg & truth).sum() / (fg | truth).sum()
    assert iou > 0.97
    assert analyze_foreground(img).kind == "object"


@pytest.mark.parametrize("shape", ["bar", "touching", "red_on_white"])
@pytest.mark.parametrize("size", [64, 256])
def test_foreground_of_harder_objects(shape, size):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size] - size / 2
    ellipse = (yy / (0.35 * size)) ** 2 + (xx / (0.4 * size)) ** 2 <= 1
    u, v = xx * np.cos(0.6) + yy * np.sin(0.6), -xx * np.sin(0.6) + yy * np.cos(0.6)
    truth = {"bar": (np.abs(u) < 0.3 * size) & (np.abs(v) < 0.03 * size + 1),  # a thin rotated part (screw)
             "touching": ellipse | ((np.abs(xx) < 0.03 * size + 1) & (yy > 0)),  # a lead reaching the border
             "red_on_white": ellipse}[shape]
    bg, fg_colour = ((200, 200, 200), (200, 60, 60)) if shape == "red_on_white" else ((30, 30, 30), (170, 160, 150))
    img = np.empty((size, size, 3))
    img[:] = bg
    img[truth] = fg_colour
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    info = analyze_foreground(img)
    assert info.kind == "object"
    assert (info.mask & truth).sum() / (info.mask | truth).sum() > 0.9


def test_demo_textures_are_whole_image(demo_raw):
    from ops.samples import load_sample

    for rows in demo_raw.values():
        for row in rows[rows.defect_type == "good"].to_dict("records"):
            assert analyze_foreground(load_sample(row).image).kind == "texture", row["image_path"]


def test_affine_targets_inside_foreground_nonempty_and_transformed():
    img, _ = object_image()
    fg = foreground_mask(img)
    src = defect_mask()
    shapes = set()
    for seed in range(25):
        t = sample_target_mask(src, img, np.random.default_rng(seed), "affine")
        assert t.mask.dtype == bool and t.mask.shape == (H, W)
        assert t.mask.any()
        assert not (t.mask & ~fg).any()
        json.dumps(t.params)  # recorded in the manifest
        assert t.params["mode"] == "affine" and t.params["foreground"] == "object"
        shapes.add(t.mask.tobytes())
        # area follows the sampled scale (isotropic similarity), up to clipping and rasterisation
        if t.params["accepted"]:
            assert t.mask.sum() == pytest.approx(src.sum() * t.params["scale"] ** 2, rel=0.3)
    assert len(shapes) == 25


def test_affine_matrix_reproduces_the_target():
    import cv2

    img, _ = object_image()
    src = defect_mask()
    t = sample_target_mask(src, img, np.random.default_rng(3), "affine", min_inside=0.5)
    m = np.array(t.params["matrix"])
    warped = cv2.warpAffine(src.astype(np.uint8) * 255, m, (W, H), flags=cv2.INTER_LINEAR) > 127
    assert (warped & foreground_mask(img) == t.mask).mean() > 0.995


def test_targets_are_deterministic_per_seed():
    img, _ = object_image()
    src = defect_mask()
    for mode in ("affine", "box"):
        a = sample_target_mask(src, img, np.random.default_rng(7), mode)
        b = sample_target_mask(src, img, np.random.default_rng(7), mode)
        c = sample_target_mask(src, img, np.random.default_rng(8), mode)
        assert np.array_equal(a.mask, b.mask) and a.params == b.params
        assert not np.array_equal(a.mask, c.mask)


def test_box_mode_gives_boxes_mostly_inside_foreground():
    img, _ = object_image()
    fg = foreground_mask(img)
    for seed in range(20):
        t = sample_target_mask(None, img, np.random.default_rng(seed), "box", box_size=(0.1, 0.3))
        ys, xs = np.nonzero(t.mask)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        assert t.mask[y0:y1 + 1, x0:x1 + 1].all() and t.mask.sum() == (y1 - y0 + 1) * (x1 - x0 + 1)
        assert t.params["box"] == [y0, x0, y1 - y0 + 1, x1 - x0 + 1]
        assert (t.mask & fg).sum() / t.mask.sum() >= 0.9


def test_oversized_support_mask_falls_back_but_stays_inside_and_nonempty():
    img, _ = object_image()
    fg = foreground_mask(img)
    huge = np.zeros((H, W), dtype=bool)
    huge[2:-2, 2:-2] = True  # larger than the product: no placement reaches min_inside
    t = sample_target_mask(huge, img, np.random.default_rng(0), "affine", max_tries=5, scale=(1.0, 1.0))
    assert not t.params["accepted"] and t.params["tries"] == 5
    assert t.mask.any() and not (t.mask & ~fg).any()
    big_box = sample_target_mask(None, img, np.random.default_rng(0), "box", box_size=(1.0, 1.0), max_tries=3)
    assert big_box.params["fallback"] == "shrunk"
    assert (big_box.mask & fg).sum() / big_box.mask.sum() >= 0.9


def test_support_mask_of_another_size_is_rescaled():
    img, _ = object_image()
    src = np.zeros((2 * H, 2 * W), dtype=bool)
    src[60:80, 90:150] = True
    t = sample_target_mask(src, img, np.random.default_rng(1), "affine", scale=(1.0, 1.0), rotation=(0.0, 0.0))
    assert t.params["source_resized"]
    assert t.mask.sum() == pytest.approx(src.sum() / 4, rel=0.15)


def test_texture_flag_uses_whole_image_and_bad_input_is_explained():
    img, _ = object_image()
    edge = np.zeros((H, W), dtype=bool)
    edge[:6, :6] = True  # background corner of the object image
    t = sample_target_mask(edge, img, np.random.default_rng(0), "affine", texture=True, max_shift=0.0,
                           rotation=(0.0, 0.0), scale=(1.0, 1.0), flip=False)
    assert t.params["foreground"] == "texture" and t.mask.sum() >= edge.sum() * 0.8
    with pytest.raises(ValueError, match="support mask is empty"):
        sample_target_mask(np.zeros((H, W), bool), img, np.random.default_rng(0), "affine")
    with pytest.raises(ValueError, match="unknown target mask mode"):
        sample_target_mask(edge, img, np.random.default_rng(0), "circle")
