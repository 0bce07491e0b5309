import hashlib

import numpy as np
import pytest
from PIL import Image

from ops.demo_data import CATEGORIES, DEFECT_KINDS, build_demo_dataset, draw_defect
from ops.ingest import discover_categories, ingest_category


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical_and_rebuild_is_idempotent(tmp_path):
    a = build_demo_dataset(tmp_path / "a", categories=["grass"], seed=3, size=48)
    b = build_demo_dataset(tmp_path / "b", categories=["grass"], seed=3, size=48)
    first = _hashes(a)
    assert first == _hashes(b)
    assert len(first) == 1 + 24 + 8 + 2 * (8 + 7)  # README + good + test good + (image + mask) per defect
    build_demo_dataset(a, categories=["grass"], seed=3, size=48)
    assert _hashes(a) == first
    assert not [p for p in a.rglob("*.tmp")]
    other = _hashes(build_demo_dataset(tmp_path / "c", categories=["grass"], seed=4, size=48))
    assert other.keys() == first.keys()
    assert sum(other[k] != first[k] for k in first if k.endswith(".png")) == len(first) - 1


def test_a_category_does_not_depend_on_the_others_built(tmp_path, demo_root, demo_size):
    alone = build_demo_dataset(tmp_path, categories=["gravel"], size=demo_size)
    full = {k: h for k, h in _hashes(demo_root).items() if k.startswith("gravel/")}
    assert {k: h for k, h in _hashes(alone).items() if k.startswith("gravel/")} == full


def test_demo_is_a_valid_mvtec_tree(demo_root, demo_raw, demo_size):
    assert discover_categories(demo_root) == [(c, "mvtec") for c in sorted(CATEGORIES)]
    for category, rows in demo_raw.items():
        assert ingest_category(demo_root, category).rejects.empty
        counts = rows.groupby(["split", "defect_type"]).size().to_dict()
        assert counts.pop(("train", "good")) == 24 and counts.pop(("test", "good")) == 8
        assert len(counts) >= 2 and all(s == "test" and 6 <= n <= 9 for (s, _), n in counts.items())
        assert set(counts) == {("test", t) for t, _ in CATEGORIES[category].defects}
        assert (rows["width"] == demo_size).all() and (rows["height"] == demo_size).all()
        defects = rows[rows["defect_type"] != "good"]
        assert defects["mask_area"].between(0.002, 0.25).all()
        assert (defects["mask_count"] == 1).all()
        assert rows["sha256"].is_unique


def test_demo_images_are_rgb_and_masks_binary(demo_root, demo_size):
    img = np.asarray(Image.open(demo_root / "brick" / "train" / "good" / "000.png"))
    assert img.shape == (demo_size, demo_size, 3)
    assert np.abs(img[..., 0].astype(int) - img[..., 2]).mean() > 5  # tinted, not three equal channels
    mask = np.asarray(Image.open(demo_root / "brick" / "ground_truth" / "hole" / "000_mask.png"))
    assert mask.ndim == 2 and set(np.unique(mask)) == {0, 255}


def test_readme_names_sources_and_licence(demo_root):
    text = (demo_root / "README.txt").read_text()
    assert "CC0" in text
    for c in CATEGORIES:
        assert f"skimage.data.{CATEGORIES[c].photo}()" in text


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_mask_is_exact(kind):
    rng = np.random.default_rng(7)
    base = np.full((96, 96, 3), (140, 120, 100), dtype=np.uint8)
    base += rng.integers(0, 20, base.shape, dtype=np.uint8)
    for trial in range(5):
        out, mask = draw_defect(base, kind, rng)
        assert mask.dtype == bool and mask.shape == base.shape[:2]
        assert 0.002 <= mask.mean() <= 0.25
        assert np.array_equal(out[~mask], base[~mask])
        changed = np.abs(out.astype(int) - base).max(axis=-1)[mask]
        assert (changed >= 4).mean() > 0.95, f"{kind} #{trial}: mask pixels must visibly change"


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown demo categories.*brick"):
        build_demo_dataset(tmp_path, categories=["carpet"])
    with pytest.raises(ValueError, match=">= 32"):
        build_demo_dataset(tmp_path, size=16)
    with pytest.raises(ValueError, match="unknown defect kind"):
        draw_defect(np.zeros((64, 64, 3), np.uint8), "dent", np.random.default_rng(0))


def test_a_second_build_keeps_the_first_categorys_attribution(tmp_path):
    build_demo_dataset(tmp_path, ["grass"], size=32)
    build_demo_dataset(tmp_path, ["brick"], size=32)
    text = (tmp_path / "README.txt").read_text()
    for c in ("grass", "brick"):
        assert f"skimage.data.{CATEGORIES[c].photo}() - {CATEGORIES[c].source}" in text
    assert "gravel" not in text.split("last build")[1].split("\n", 1)[1]
