"""The custom anomalib datamodule feeds synthetic anomalies (with their masks) into TRAINING, 50/50, and keeps
every test image out of train and val."""
import numpy as np
import pandas as pd
import pytest
import torch

from ops.detection.datamodule import SyntheticAnomalyDataModule, build_samples, check_no_test_leakage
from ops.generation import fit_adapter, synthesize_partition
from ops.samples import encode_png, read_mask
from ops.storage import Storage

torch.set_num_threads(1)
N = 8


@pytest.fixture(scope="module")
def cutpaste(tmp_path_factory, demo_split):
    storage = Storage(tmp_path_factory.mktemp("det_dm"))
    adapters = fit_adapter(storage, "brick", "cutpaste", demo_split, None, {}, progress=lambda *a: None)
    synthetic = synthesize_partition(storage, "brick", "cutpaste", demo_split, adapters, None, n=N, seed=3, cfg={},
                                     progress=lambda *a: None)
    return storage, demo_split.copy(), synthetic


def test_synthetic_anomalies_reach_the_train_loader_with_their_masks(cutpaste):
    storage, split, synthetic = cutpaste
    samples = build_samples(storage, split, synthetic, val_fraction=0.25, seed=0)
    syn = samples[samples["role"] == "synthetic"]
    assert len(syn) == N and (syn["label_index"] == 1).all()
    per_type = syn[syn["split"] == "val"].groupby("defect_type").size()
    assert set(per_type.index) == set(synthetic["defect_type"]) and (per_type == 1).all()  # 2-3 images per type
    dm = SyntheticAnomalyDataModule(samples, category="brick", train_batch_size=4)
    dm.setup()
    expected = {str(storage.path(i)): str(storage.path(m)) for i, m in zip(synthetic["image_path"], synthetic["mask_path"])}
    seen = 0
    for batch in dm.train_dataloader():
        for path, label, mask in zip(batch.image_path, batch.gt_label, batch.gt_mask):
            if path in expected:
                assert bool(label)
                assert torch.equal(mask.bool(), torch.from_numpy(read_mask(expected[path])))
                assert mask.any()
                seen += 1
            else:
                assert not bool(label) and not mask.any()
    assert seen > 0


def test_train_loader_draws_anomalies_half_the_time_whatever_the_counts(cutpaste):
    storage, split, synthetic = cutpaste
    samples = build_samples(storage, split, synthetic.iloc[:3], seed=0)  # 3 anomalies vs ~19 normals
    dm = SyntheticAnomalyDataModule(samples, category="brick", anomaly_ratio=0.5, seed=1)
    dm.setup()
    labels = dm.train_data.samples["label_index"].to_numpy()
    assert labels.mean() < 0.2
    draws = torch.multinomial(dm.sampling_weights(), 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs(labels[draws.numpy()].mean() - 0.5) < 0.03
    loader = dm.train_dataloader()
    assert len(loader.sampler) == len(dm.train_data)


def test_val_and_test_splits_and_no_test_image_in_train_or_val(cutpaste):
    storage, split, synthetic = cutpaste
    samples = build_samples(storage, split, synthetic, seed=0)
    test = samples[samples["split"] == "test"]
    fit = samples[samples["split"] != "test"]
    held = split[split["role"].isin(["holdout", "test_good"])]
    assert sorted(test["sample_id"]) == sorted(held["image_id"])
    assert set(test["role"]) == {"holdout", "test_good"}
    assert (test["label_index"] == (test["role"] == "holdout")).all()
    assert not set(fit["sample_id"]) & set(held["image_id"]) and not set(fit["sha256"]) & set(held["sha256"])
    val = samples[samples["split"] == "val"]
    assert set(val["role"]) == {"normal", "synthetic"} and check_no_test_leakage(samples, synthetic) == []
    support = build_samples(storage, split, synthetic, val_source="support", seed=0)
    sval = support[support["split"] == "val"]
    assert sorted(sval.loc[sval["label_index"] == 1, "sample_id"]) == sorted(split.loc[split["role"] == "support", "image_id"])
    assert (support.loc[support["role"] == "synthetic", "split"] == "train").all()


def test_leaks_are_refused_with_the_offending_file(cutpaste):
    storage, split, synthetic = cutpaste
    test_good = split[split["role"] == "test_good"].iloc[0]
    on_test = synthetic.copy()
    on_test.loc[0, "normal_id"] = test_good["image_id"]
    with pytest.raises(ValueError, match="drawn on test image"):
        build_samples(storage, split, on_test)
    copied = pd.concat([split, split[split["image_id"] == test_good["image_id"]].assign(role="train_good",
                                                                                         image_id="train/good/copy")])
    with pytest.raises(ValueError, match=r"same content \(sha256\) as a test image"):
        build_samples(storage, copied, synthetic)


def test_refined_masks_replace_the_method_masks_when_asked(cutpaste, tmp_path):
    storage, split, synthetic = cutpaste
    from ops.detection.stage import _with_mask_column

    rels = []
    for i, (idx, rel) in enumerate(zip(synthetic["index"], synthetic["mask_path"])):
        mask = np.zeros_like(read_mask(storage.path(rel)))
        mask[2 + i:10 + i, 5:9] = True
        rels.append(storage.write_bytes(f"refined/{idx}.png", encode_png(mask)))
    refined = pd.DataFrame({"index": synthetic["index"], "final_path": rels})
    samples = build_samples(storage, split, _with_mask_column(synthetic, refined, "final_path"), mask_column="final_path")
    syn = samples[samples["role"] == "synthetic"]
    assert sorted(syn["mask_path"]) == sorted(str(storage.path(r)) for r in rels)
    with pytest.raises(ValueError, match="rematerialize refined_masks"):
        _with_mask_column(synthetic, refined.iloc[1:], "final_path")
