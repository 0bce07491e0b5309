"""Feeding synthetic anomalies with their masks into anomalib TRAINING (DESIGN §6).

anomalib's ``Folder`` puts every abnormal image in the test split, so it cannot train on generated anomalies.
Here one sample table (anomalib's ``samples`` format plus lineage columns) is built from the few-shot split and
the synthetic manifest, and a small :class:`AnomalibDataModule` serves it:

- ``train``: the split's ``train_good`` normals + the synthetic anomalies (label 1, their masks);
- ``val`` (checkpoint selection): a seeded slice of the ``train_good`` normals + either a seeded slice of the
  synthetic anomalies (``val_source="synthetic"``, default) or the real support anomalies
  (``val_source="support"``). Never a test image;
- ``test``: the held-out real defects + ``test_good``. Used only by ``evaluate_detectors``.

Choices recorded here because the papers leave them open:

- 50/50 sampling (DRAEM, AnomalyDiffusion): the train loader draws with replacement so that each item is an
  anomaly with probability ``anomaly_ratio`` (0.5) whatever the class counts are; an epoch has as many draws as
  the train table has rows.
- Draw order is seeded per epoch (:class:`EpochSeededSampler`), so training resumed at an epoch boundary
  continues exactly as an uninterrupted run (``ops.detection.anomalib_models.fit``).
- The validation slice is stratified by defect type, ``val_fraction`` (0.2) of each, at least one item per type
  when the type has two or more; normals likewise (at least one).
- ``recon_path`` is the image an ideal reconstruction would give (a synthetic image's source normal, a normal
  image itself): DRAEM's reconstructive sub-network needs it once generated anomalies replace its Perlin source.
- Leakage is checked by path, by content hash and by lineage (a synthetic image drawn on a test normal leaks
  that test image's background): :func:`check_no_test_leakage` lists every violation and training refuses to run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from torch.utils.data import DataLoader, WeightedRandomSampler

from ops.cache import is_remote, join, local_file

SAMPLE_COLUMNS = ["image_path", "mask_path", "label_index", "split", "role", "sample_id", "defect_type", "sha256",
                  "recon_path"]
TEST_ROLES = ("holdout", "test_good")


def _abs(root: Any, rel: Any) -> str:
    if not isinstance(rel, str) or not rel:
        return ""
    return rel if rel.startswith("/") else join(root, rel)


def localized(samples: pd.DataFrame) -> pd.DataFrame:
    """The same rows with every remote (s3://...) file replaced by its copy in the machine's content-hash cache
    (``ops.cache``): anomalib and PIL open local files. Samples keep their URLs everywhere else (manifests,
    leakage checks), so a cache path never reaches a manifest."""
    out = samples.copy()
    for column in [c for c in out.columns if c.endswith("_path")]:
        out[column] = [str(local_file(p)) if isinstance(p, str) and is_remote(p) else p for p in out[column]]
    return out


def _need(df: pd.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; pass the manifest written by that stage (see docs/architecture.md)")


def _val_pick(keys: Any, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask choosing ``fraction`` of each group of ``keys`` (seeded), at least one of a group of >= 2."""
    keys = np.asarray(keys, dtype=str)
    pick = np.zeros(len(keys), dtype=bool)
    for key in sorted(set(keys)):
        idx = np.flatnonzero(keys == key)
        if len(idx) >= 2:
            n = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
            pick[rng.choice(idx, size=n, replace=False)] = True
    return pick


def build_samples(storage: Any, split_df: pd.DataFrame, synthetic_df: pd.DataFrame, *,
                  mask_column: str = "mask_path", val_source: str = "synthetic", val_fraction: float = 0.2,
                  seed: int = 0, use_synthetic: bool = True) -> pd.DataFrame:
    """One table of train / val / test rows in anomalib's samples format (absolute paths).

    ``mask_column`` names the synthetic manifest column with the training mask (``mask_path``: the method's
    mask; a refined-mask column when training on refined masks). ``use_synthetic=False`` gives the one-class
    table (normals only in train and val) for the "no synthetic data" reference detector.
    """
    _need(split_df, ["image_id", "role", "dataset_root", "image_path", "mask_path", "defect_type", "sha256"],
          "few_shot_splits manifest")
    if val_source not in ("synthetic", "support"):
        raise ValueError(f"val_source must be 'synthetic' or 'support', got {val_source!r}")
    rng = np.random.default_rng(seed)
    rows: list[pd.DataFrame] = []

    def frame(df: pd.DataFrame, image: Any, mask: Any, label: Any, split: Any, role: Any, ids: pd.Series,
              recon: Any) -> pd.DataFrame:
        return pd.DataFrame({"image_path": np.asarray(image, dtype=object), "mask_path": np.asarray(mask, dtype=object),
                             "label_index": label, "split": split, "role": role,
                             "sample_id": ids.astype(str).to_numpy(),
                             "defect_type": df["defect_type"].astype(str).to_numpy(),
                             "sha256": df["sha256"].astype(str).to_numpy(), "recon_path": recon})

    real_image = [_abs(r, p) for r, p in zip(split_df["dataset_root"], split_df["image_path"])]
    real_mask = [_abs(r, p) for r, p in zip(split_df["dataset_root"], split_df["mask_path"])]
    real = split_df.assign(_image=real_image, _mask=real_mask).reset_index(drop=True)

    normals = real[real["role"] == "train_good"].reset_index(drop=True)
    if normals.empty:
        raise ValueError("few_shot_splits has no train_good rows: detectors need normal training images; check the "
                         "category's train/good folder")
    val_normal = _val_pick(["good"] * len(normals), val_fraction, rng)
    rows.append(frame(normals, normals["_image"], [""] * len(normals), 0, np.where(val_normal, "val", "train"),
                      "normal", normals["image_id"], normals["_image"].to_numpy()))

    if use_synthetic:
        _need(synthetic_df, ["index", "image_path", mask_column, "defect_type", "sha256", "normal_path",
                             "normal_dataset_root"], "synthetic_anomalies manifest")
        syn = synthetic_df.reset_index(drop=True)
        if syn.empty:
            raise ValueError("synthetic_anomalies manifest is empty: materialize the synthetic_anomalies partition "
                             "first, or train only the one-class reference (detectors=['patchcore'])")
        image = [str(storage.path(p)) for p in syn["image_path"]]
        mask = [str(storage.path(p)) for p in syn[mask_column]]
        recon = [_abs(r, p) for r, p in zip(syn["normal_dataset_root"], syn["normal_path"])]
        ids = "syn-" + syn["index"].astype(str)
        val_syn = (_val_pick(syn["defect_type"], val_fraction, rng) if val_source == "synthetic"
                   else np.zeros(len(syn), dtype=bool))
        rows.append(frame(syn, image, mask, 1, np.where(val_syn, "val", "train"), "synthetic", ids, recon))
        if val_source == "support":
            sup = real[real["role"] == "support"].reset_index(drop=True)
            if sup.empty:
                raise ValueError("val_source='support' but the split has no support rows; use val_source='synthetic'")
            rows.append(frame(sup, sup["_image"], sup["_mask"], 1, "val", "support", sup["image_id"], ""))

    test = real[real["role"].isin(TEST_ROLES)].reset_index(drop=True)
    defective = (test["role"] == "holdout").to_numpy()
    rows.append(frame(test, test["_image"], np.where(defective, test["_mask"], ""), defective.astype(np.int64),
                      "test", test["role"].to_numpy(), test["image_id"], ""))
    out = pd.concat(rows, ignore_index=True)
    out["label_index"] = out["label_index"].astype("int64")
    problems = check_no_test_leakage(out, synthetic_df if use_synthetic else None)
    if problems:
        raise ValueError("test images would reach detector training or checkpoint selection:\n  " + "\n  ".join(problems[:20])
                         + "\nfix the few_shot_splits / synthetic_anomalies manifests (regenerate them from this split)")
    return out[SAMPLE_COLUMNS]


def check_no_test_leakage(samples: pd.DataFrame, synthetic_df: pd.DataFrame | None = None) -> list[str]:
    """Every way a test image could reach train or val: same file, same bytes, or a synthetic image drawn on it."""
    test = samples[samples["split"] == "test"]
    fit = samples[samples["split"] != "test"]
    problems = [f"{r.split} row {r.image_path} is also a test image" for r in fit.itertuples()
                if r.image_path in set(test["image_path"])]
    problems += [f"{r.split} row {r.image_path} has the same content (sha256) as a test image" for r in fit.itertuples()
                 if r.sha256 in set(test["sha256"]) and r.sha256]
    if synthetic_df is not None and "normal_id" in synthetic_df.columns:
        test_ids = set(test["sample_id"])
        problems += [f"synthetic image {p} was drawn on test image {n}"
                     for p, n in zip(synthetic_df["image_path"], synthetic_df["normal_id"].astype(str)) if n in test_ids]
    return problems


class FrameDataset(AnomalibDataset):
    """An anomalib dataset over rows of :func:`build_samples` (segmentation task: normals get all-zero masks)."""

    def __init__(self, samples: pd.DataFrame, name: str = "synthetic", augmentations: Any = None) -> None:
        super().__init__(augmentations=augmentations)
        self._name = name
        missing = [p for p in samples["image_path"] if not Path(p).is_file()]
        missing += [p for p in samples["mask_path"] if p and not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image/mask file(s) listed in the manifests do not exist, e.g. "
                                    f"{missing[0]}; rematerialize the upstream asset that wrote them")
        samples = samples.reset_index(drop=True).copy()
        samples.attrs["task"] = "segmentation"
        self.samples = samples

    @property
    def samples(self) -> pd.DataFrame:
        return AnomalibDataset.samples.fget(self)

    @samples.setter
    def samples(self, samples: pd.DataFrame) -> None:
        # anomalib's setter sorts by absolute image_path: where the storage and dataset roots live would then decide
        # the row order, so the training batches (a storage root at /x/clean vs /x/killed sorts synthetic rows
        # before or after the real ones). build_samples' order depends only on the manifests: keep it.
        AnomalibDataset.samples.fset(self, samples)
        self._samples = samples.reset_index(drop=True)

    @property
    def name(self) -> str:
        return self._name


class SyntheticAnomalyDataModule(AnomalibDataModule):
    """Serves :func:`build_samples` rows; the train loader samples anomalies with probability ``anomaly_ratio``."""

    def __init__(self, samples: pd.DataFrame, category: str = "", train_batch_size: int = 8,
                 eval_batch_size: int = 16, num_workers: int = 0, anomaly_ratio: float = 0.5, seed: int = 0,
                 train_augmentations: Any = None) -> None:
        super().__init__(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         train_augmentations=train_augmentations, seed=seed)
        if not 0.0 <= anomaly_ratio <= 1.0:
            raise ValueError(f"anomaly_ratio must lie in [0, 1], got {anomaly_ratio}")
        self.samples = samples
        self.category = category
        self.anomaly_ratio = anomaly_ratio
        self.epoch = 0  # the training epoch about to draw (EpochSeededSampler)

    def _setup(self, _stage: str | None = None) -> None:
        by_split = {s: self.samples[self.samples["split"] == s] for s in ("train", "val", "test")}
        self.train_data = FrameDataset(by_split["train"], name=f"{self.category}-train")
        if len(by_split["val"]):
            self.val_data = FrameDataset(by_split["val"], name=f"{self.category}-val")
        if len(by_split["test"]):
            self.test_data = FrameDataset(by_split["test"], name=f"{self.category}-test")

    # The base class would move normal test images around and carve val from test; the splits are fixed upstream.
    def _create_test_split(self) -> None:
        return None

    def _create_val_split(self) -> None:
        return None

    def sampling_weights(self) -> torch.Tensor:
        labels = torch.tensor(self.train_data.samples["label_index"].to_numpy(dtype=np.int64))
        n_anomalous = int(labels.sum())
        n_normal = len(labels) - n_anomalous
        if n_anomalous == 0 or n_normal == 0:
            return torch.ones(len(labels), dtype=torch.double)
        return torch.where(labels == 1, self.anomaly_ratio / n_anomalous, (1 - self.anomaly_ratio) / n_normal).double()

    def train_dataloader(self) -> DataLoader:
        labels = self.train_data.samples["label_index"]
        if labels.nunique() < 2:  # one-class training (PatchCore reference): every normal once, no duplicates
            generator = torch.Generator().manual_seed(int(self.seed or 0))
            return DataLoader(self.train_data, batch_size=self.train_batch_size, shuffle=True, generator=generator,
                              num_workers=self.num_workers, collate_fn=self.train_data.collate_fn)
        sampler = EpochSeededSampler(self.sampling_weights(), len(self.train_data), int(self.seed or 0),
                                     lambda: self.epoch)
        return DataLoader(self.train_data, batch_size=self.train_batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=self.train_data.collate_fn)


class EpochSeededSampler(WeightedRandomSampler):
    """Weighted draws with replacement whose order depends only on (seed, epoch), the epoch read from
    ``epoch_of()`` when the epoch's first batch is drawn (the datamodule's ``epoch``, set by the training's
    ``EpochSeeds`` callback at each epoch start and from a resumed checkpoint; ``num_workers`` stays 0, so no
    worker asks for indices earlier), so a training resumed at an epoch start draws
    exactly the batches an uninterrupted one would (a generator carried across epochs would restart at epoch
    0's order, and Lightning's own ``set_epoch`` counter restarts on resume)."""

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int, epoch_of: Any) -> None:
        super().__init__(weights, num_samples=num_samples, replacement=True, generator=torch.Generator())
        self.seed, self.epoch_of = seed, epoch_of

    def __iter__(self):
        self.generator.manual_seed(self.seed * 1_000_003 + int(self.epoch_of()))
        return super().__iter__()
