import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ops.generation import (ADAPTER_SCHEMA, SYNTHETIC_SCHEMA, fit_adapter, job_seed, plan_jobs,
                            synthesize_partition)
from ops.manifest import to_table
from ops.samples import encode_png, read_mask, read_rgb
from ops.storage import Storage, sha256_file

S = 64
TYPES = {"scratch": 2, "stain": 2}  # support images per type; one more of each is held out


def _object(rng: np.random.Generator) -> np.ndarray:
    img = (20 + rng.integers(0, 8, (S, S, 3))).astype(np.uint8)
    yy, xx = np.ogrid[:S, :S]
    disk = (yy - 32) ** 2 + (xx - 32) ** 2 <= 25 ** 2
    img[disk] = (160 + rng.integers(0, 20, (int(disk.sum()), 3))).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def split_df(tmp_path_factory) -> pd.DataFrame:
    """A tiny MVTec-style category 'disc' written to disk, with rows in the SPLIT_SCHEMA columns."""
    root = tmp_path_factory.mktemp("dataset")
    rng = np.random.default_rng(0)
    rows = []

    def add(folder, dt, i, image, mask, role):
        rel = f"disc/{folder}/{dt}/{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode_png(image))
        mask_rel = None
        if mask is not None:
            mask_rel = f"disc/ground_truth/{dt}/{i:03d}_mask.png"
            (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
            (root / mask_rel).write_bytes(encode_png(mask))
        rows.append(dict(image_id=f"{folder}/{dt}/{i:03d}", category="disc", split=folder, defect_type=dt,
                         dataset_root=str(root), layout="mvtec", image_path=rel, mask_path=mask_rel, width=S,
                         height=S, sha256="", mask_area=float(mask.mean()) if mask is not None else 0.0,
                         mask_count=int(mask is not None), role=role, protocol="anomalydiffusion", split_seed=0))

    for i in range(5):
        add("train", "good", i, _object(rng), None, "train_good")
    add("test", "good", 0, _object(rng), None, "test_good")
    for dt, k in TYPES.items():
        for i in range(k + 1):
            img, mask = _object(rng), np.zeros((S, S), bool)
            y, x = 20 + 4 * i, 22 + 3 * i
            mask[y:y + 5, x:x + 14] = True
            img[mask] = (30, 30, 200) if dt == "stain" else (250, 250, 250)
            add("test", dt, i, img, mask, "support" if i < k else "holdout")
    return pd.DataFrame(rows)


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_plan_jobs_is_deterministic_round_robin_and_leak_free(split_df):
    a = plan_jobs(split_df, "disc", "cutpaste", 8, seed=3)
    b = plan_jobs(split_df, "disc", "cutpaste", 8, seed=3)
    c = plan_jobs(split_df, "disc", "cutpaste", 8, seed=4)
    assert [j.defect_type for j in a] == ["scratch", "stain"] * 4
    assert [j.seed for j in a] == [j.seed for j in b] == [job_seed(3, "disc", "cutpaste", i) for i in range(8)]
    assert len({j.seed for j in a}) == 8 and {j.seed for j in a}.isdisjoint(j.seed for j in c)
    assert all(np.array_equal(x.target_mask, y.target_mask) for x, y in zip(a, b))
    assert not all(np.array_equal(x.target_mask, y.target_mask) for x, y in zip(a, c))
    support = set(split_df.loc[split_df.role == "support", "image_id"])
    train = set(split_df.loc[split_df.role == "train_good", "image_id"])
    for j in a:
        assert j.reference.image_id in support and j.reference.defect_type == j.defect_type
        assert j.normal.image_id in train and j.target_mask.any()
        assert set(j.support_ids) == support
    # a job's plan does not depend on n
    assert [j.seed for j in plan_jobs(split_df, "disc", "cutpaste", 3, seed=3)] == [j.seed for j in a[:3]]
    free = plan_jobs(split_df, "disc", "perlin", 2, seed=3, needs_reference=False, target_mode="box")
    assert all(j.reference is None for j in free)


def test_fit_adapter_row(split_df, tmp_path):
    df = fit_adapter(Storage(tmp_path), "disc", "perlin", split_df, None, {}, progress=lambda *a: None)
    to_table(df, ADAPTER_SCHEMA, "anomaly_adapters")
    row = df.iloc[0]
    assert (row.category, row.method, row.n_support) == ("disc", "perlin", 4)
    assert row.adapter_path is None and json.loads(row.meta_json) == {"trained": False}
    assert sorted(row.support_ids) == sorted(split_df.loc[split_df.role == "support", "image_id"])
    assert json.loads(row.config_json)["threshold"] == 0.5


@pytest.mark.parametrize("method", ["cutpaste", "perlin"])
def test_synthesize_partition_layout_rerun_and_stale_files(split_df, tmp_path, method):
    storage = Storage(tmp_path)
    adapters = fit_adapter(storage, "disc", method, split_df, None, {}, progress=lambda *a: None)
    calls = []
    df = synthesize_partition(storage, "disc", method, split_df, adapters, None, n=6, seed=11, cfg={},
                              progress=lambda d, done, total: calls.append((done, total)), chunk_size=4)
    to_table(df, SYNTHETIC_SCHEMA, "synthetic_anomalies")
    assert calls[-1] == (6, 6)
    base = tmp_path / "images/synthetic_anomalies/disc" / method
    assert list(df["index"]) == list(range(6))
    for r in df.itertuples():
        stem = f"{r.index:05d}"
        assert r.image_path == f"images/synthetic_anomalies/disc/{method}/images/{r.defect_type}/{stem}.png"
        assert r.mask_path == f"images/synthetic_anomalies/disc/{method}/masks/{r.defect_type}/{stem}_mask.png"
        assert r.target_path == f"images/synthetic_anomalies/disc/{method}/targets/{r.defect_type}/{stem}_target.png"
        assert sha256_file(tmp_path / r.image_path) == r.sha256
        image, mask, target = (read_rgb(tmp_path / r.image_path), read_mask(tmp_path / r.mask_path),
                               read_mask(tmp_path / r.target_path))
        normal = read_rgb(Path(r.normal_dataset_root) / r.normal_path)
        assert image.shape == (r.height, r.width, 3) and mask.sum() == r.mask_area > 0
        assert not (mask & ~target).any()
        changed = (image != normal).any(axis=2)
        reach = target if method == "perlin" else np.ones_like(target)
        assert changed.any() and not (changed & ~reach).any()
        assert (r.reference_id is None) == (method == "perlin")
        assert json.loads(r.target_params_json)["mode"] == "affine" and json.loads(r.params_json)
        assert json.loads(r.config_json) == json.loads(df.config_json[0])
    first = files_under(base)

    # rerun: byte-identical files and an identical manifest (timings aside)
    again = synthesize_partition(storage, "disc", method, split_df, adapters, None, n=6, seed=11, cfg={},
                                 progress=lambda *a: None, chunk_size=5)
    pd.testing.assert_frame_equal(df.drop(columns="seconds"), again.drop(columns="seconds"))
    assert files_under(base) == first

    # a smaller n removes the files of jobs 4 and 5; a crashed run's temp file goes too
    (base / "images/stain/.00009.png.abc.tmp").write_bytes(b"partial")
    small = synthesize_partition(storage, "disc", method, split_df, adapters, None, n=4, seed=11, cfg={},
                                 progress=lambda *a: None)
    pd.testing.assert_frame_equal(df.head(4).drop(columns="seconds"), small.drop(columns="seconds"))
    left = files_under(base)
    assert set(left) == {k for k in first if not any(f"0000{i}" in k for i in (4, 5))}
    assert all(left[k] == first[k] for k in left)

    # another seed gives other images
    other = synthesize_partition(storage, "disc", method, split_df, adapters, None, n=4, seed=12, cfg={},
                                 progress=lambda *a: None)
    assert not set(other.sha256) & set(small.sha256)


def test_anomalib_folder_dataset_pairs_written_masks(split_df, tmp_path):
    from anomalib.data.datasets import FolderDataset

    storage = Storage(tmp_path)
    adapters = fit_adapter(storage, "disc", "cutpaste", split_df, None, {}, progress=lambda *a: None)
    df = synthesize_partition(storage, "disc", "cutpaste", split_df, adapters, None, n=5, seed=0, cfg={},
                              progress=lambda *a: None, target_mode="box")
    base = tmp_path / "images/synthetic_anomalies/disc/cutpaste"
    normal_dir = Path(split_df.dataset_root[0]) / "disc/train/good"
    ds = FolderDataset(name="disc", normal_dir=normal_dir, abnormal_dir=base / "images", mask_dir=base / "masks",
                       split="test")
    assert ds.samples.attrs["task"] == "segmentation"
    assert len(ds) == 5
    by_image = {Path(p).resolve(): Path(m).resolve() for p, m in zip(ds.samples.image_path, ds.samples.mask_path)}
    for r in df.itertuples():
        assert by_image[(tmp_path / r.image_path).resolve()] == (tmp_path / r.mask_path).resolve()
    item = ds[0]
    row = df[[Path(ds.samples.image_path[0]).resolve() == (tmp_path / p).resolve() for p in df.image_path]].iloc[0]
    assert np.array_equal(np.asarray(item.gt_mask).astype(bool), read_mask(tmp_path / row.mask_path))
    box = json.loads(row.target_params_json)
    assert box["mode"] == "box"


def test_errors_name_the_problem(split_df, tmp_path):
    storage = Storage(tmp_path)
    adapters = fit_adapter(storage, "disc", "cutpaste", split_df, None, {}, progress=lambda *a: None)
    with pytest.raises(ValueError, match="no role=='support' rows"):
        plan_jobs(split_df[split_df.role != "support"], "disc", "cutpaste", 2, seed=0)
    with pytest.raises(ValueError, match="train_good"):
        plan_jobs(split_df[split_df.role != "train_good"], "disc", "cutpaste", 2, seed=0)
    with pytest.raises(ValueError, match="lacks columns"):
        plan_jobs(split_df.drop(columns="role"), "disc", "cutpaste", 2, seed=0)
    fewer = split_df[split_df.image_id != "test/stain/000"]
    with pytest.raises(ValueError, match="re-materialize anomaly_adapters"):
        synthesize_partition(storage, "disc", "cutpaste", fewer, adapters, None, n=1, seed=0, cfg={},
                             progress=lambda *a: None)
    with pytest.raises(ValueError, match="expected 1"):
        synthesize_partition(storage, "disc", "perlin", split_df, adapters, None, n=1, seed=0, cfg={},
                             progress=lambda *a: None)
    with pytest.raises(ValueError, match="invalid category"):
        synthesize_partition(storage, "../x", "cutpaste", split_df, adapters, None, n=1, seed=0, cfg={})


def test_demo_dataset_through_ingest_split_and_both_baselines(demo_split, tmp_path):
    """The shared demo fixture (build_demo_dataset -> ingest_category -> make_split, category brick)."""
    split = demo_split
    storage = Storage(tmp_path)
    for method in ("cutpaste", "perlin"):
        adapters = fit_adapter(storage, "brick", method, split, None, {}, progress=lambda *a: None)
        df = synthesize_partition(storage, "brick", method, split, adapters, None, n=6, seed=0, cfg={},
                                  progress=lambda *a: None)
        assert sorted(set(df.defect_type)) == sorted(set(split.loc[split.role == "support", "defect_type"]))
        assert set(df.normal_id) <= set(split.loc[split.role == "train_good", "image_id"])
        assert not set(df.reference_id.dropna()) - set(split.loc[split.role == "support", "image_id"])
        # brick is a texture: the whole image is foreground
        assert all(json.loads(p)["foreground"] == "texture" for p in df.target_params_json)
