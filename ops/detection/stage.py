"""Stage functions: ``train_detectors`` (asset ``anomaly_detectors``) and ``evaluate_detectors``
(asset ``detector_evaluation``), with their manifest schemas.

Per category x method partition, each configured detector is trained on the split's normal images + that
partition's synthetic anomalies, chosen on the validation split, saved in anomalib's formats and scored on
the held-out real defects + ``test/good``. The one-class PatchCore reference never sees synthetic data: it is
stored once per category under method ``none`` (``detectors/<category>/none/patchcore``) and reused by every
method partition (same inputs give the same fingerprint), which gives the "no synthetic data" rows.

Per detector folder (``detectors/<category>/<method>/<detector>/``): ``checkpoints/best.ckpt`` (Lightning /
anomalib checkpoint), ``weights/torch/model.pt`` (anomalib's torch export), ``samples.parquet`` (every train /
val / test row with its role, for lineage and the leakage check) and ``config.json`` (the training config, data
counts, backbone source, selection result). ``config.json`` is written last and carries a fingerprint of the
config and the input files' hashes: a rerun with the same fingerprint reuses the detector instead of
retraining (idempotent reruns), any change retrains. An unfinished training (kill -9 included) leaves
``resume/<fingerprint>/last.ckpt`` (epoch end); a rerun with that fingerprint continues from it and ends with
the files of an uninterrupted run; the folder is removed when the detector is complete.

Image-level-only categories (``ops.image_level``): the held-out defects have no masks, so evaluation reports the
image metrics only; the pixel columns are NaN and ``metric_note`` says why.

Box-labelled methods (``weak_methods``, default AnoGen) train the segmenter and DRAEM (``WEAK_DETECTORS``: of
the detectors AnoGen's paper trains with its weak loss, the two anomalib 2.7 has; DeSTSeg is absent) with the
weak loss at ``weak_tau`` and, as extra rows (``ops.detection.mix``), at each τ of ``weak_ablation``
(``segmenter-tau1``: plain box supervision) and on the method's + Perlin anomalies (``segmenter-perlin``, ``mix_perlin``).

Demo defaults keep a partition to seconds on 2 CPU cores: 128 px, the segmenter (``base_width`` 8, 64 px
training crops, 60 steps at lr 2e-3) and the PatchCore reference. Paper settings (DRAEM / AnomalyDiffusion protocol):
``image_size=256``, ``options={"segmenter": {"base_width": 64, "lr": 1e-4, "train_crop": None,
"bn_momentum": 0.1}}``, ``steps={"segmenter": 20000, "draem": 20000, "supersimplenet": 10000}`` (DRAEM's
700 epochs of ~250 images at batch 8 are ~22k steps), ``val_every=500``,
``detectors=["segmenter", "draem", "supersimplenet", "patchcore"]``.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import torch

from ops.atomic import table_to_parquet_bytes
from ops.detection import anomalib_models as am
from ops.detection.backbones import OfflineBackbone, resolve_backbone
from ops.detection.datamodule import SyntheticAnomalyDataModule, build_samples, check_no_test_leakage, localized
from ops.detection.evaluate import IMAGE_METRICS, METRIC_COLUMNS, PIXEL_METRICS, compute_metrics, predict_rows
from ops.detection.mix import MIX_SOURCE, MIX_SUFFIX, base_detector, mixed_synthetic, tau_variant
from ops.image_level import PIXEL_NOTE, is_image_level
from ops.locks import exclusive, storage_lock
from ops.manifest import dumps, empty_frame, to_table
from ops.methods.base import MethodConfig, Progress, no_progress
from ops.methods.registry import BASELINES
from ops.cache import cache_dir
from ops.storage import Storage, check_name, sha256_bytes, sha256_file

REFERENCE_METHOD = "none"
WEAK_DETECTORS = ("segmenter", "draem")  # the detectors that take a box-labelled method's weak loss
RESUME_DIR = "resume"  # <detector dir>/resume/<fingerprint>/last.ckpt while a training is unfinished

DETECTOR_SCHEMA = pa.schema([
    ("category", pa.string()), ("method", pa.string()), ("partition_method", pa.string()),
    ("detector", pa.string()), ("trained_on", pa.string()), ("weak_tau", pa.float64()),
    ("mask_column", pa.string()), ("val_source", pa.string()), ("select_metric", pa.string()),
    ("val_score", pa.float64()), ("selected_epoch", pa.int64()), ("selected_step", pa.int64()),
    ("steps", pa.int64()),
    ("image_size", pa.int64()), ("backbone", pa.string()), ("backbone_source", pa.string()),
    ("n_train_normal", pa.int64()), ("n_train_anomalous", pa.int64()), ("n_val_normal", pa.int64()),
    ("n_val_anomalous", pa.int64()), ("checkpoint_path", pa.string()), ("export_path", pa.string()),
    ("samples_path", pa.string()), ("config_path", pa.string()), ("config_json", pa.string()),
    ("fingerprint", pa.string()), ("seed", pa.int64()), ("seconds", pa.float64()), ("reused", pa.bool_()),
])

EVALUATION_SCHEMA = pa.schema([
    ("category", pa.string()), ("method", pa.string()), ("detector", pa.string()), ("row_label", pa.string()),
    ("is_baseline", pa.bool_()), ("trained_on", pa.string()), ("weak_tau", pa.float64()),
    ("n_test_good", pa.int64()), ("n_test_defective", pa.int64()),
    *[(m, pa.float64()) for m in METRIC_COLUMNS],
    ("aupro_fpr_limit", pa.float64()), ("metric_resolution", pa.string()), ("backbone_source", pa.string()),
    ("val_score", pa.float64()), ("train_seconds", pa.float64()), ("eval_seconds", pa.float64()),
    ("checkpoint_path", pa.string()),
    ("metric_note", pa.string()),  # why metrics the test set would define are missing ("" when none is)
])

_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "segmenter": {"base_width": 8, "lr": 2e-3, "train_crop": 64, "bn_momentum": 0.5},
    "supersimplenet": {},
    "draem": {},
    "patchcore": {"coreset_sampling_ratio": 0.1, "num_neighbors": 9},
}
_DEFAULT_STEPS = {"segmenter": 60, "supersimplenet": 40, "draem": 40, "patchcore": 0}  # patchcore: one pass


@dataclass
class DetectionConfig(MethodConfig):
    """Options of both stages (``ForgeSettings.detection_options``); unknown keys are errors (``from_dict``)."""

    detectors: list[str] = field(default_factory=lambda: ["segmenter", "patchcore"])
    image_size: int = 128
    steps: dict[str, int] = field(default_factory=dict)  # optimizer steps per detector, over _DEFAULT_STEPS
    val_every: int = 20  # validate (checkpoint selection) every this many steps
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per detector constructor options
    batch_size: int = 8
    eval_batch_size: int = 16
    anomaly_ratio: float = 0.5
    val_source: str = "synthetic"
    val_fraction: float = 0.2
    # training mask: "auto" = the refined final mask (refined_masks ``final_path``) when that manifest is given,
    # else the method's own mask (``mask_path``); or any column of either manifest
    mask_column: str = "auto"
    weak_tau: float = 0.9
    weak_methods: list[str] = field(default_factory=lambda: ["anogen"])  # box-mask methods: AnoGen weak variant
    # for weak methods, extra segmenters (ops.detection.mix): one per τ here (1.0 = plain box supervision, the
    # paper's ablation) and, with mix_perlin, one on the method's + as many Perlin anomalies (the paper's best)
    weak_ablation: list[float] = field(default_factory=lambda: [1.0])
    mix_perlin: bool = True
    backbone: str = "efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])
    aupro_fpr_limit: float = 0.3
    seed: int = 0
    accelerator: str = "auto"
    enable_progress_bar: bool = False
    # formats of the deployed best detector (ops.detection.deploy); one whose package is missing is skipped, with
    # the reason in the deployed_detector manifest
    deploy_formats: list[str] = field(default_factory=lambda: ["torch", "onnx", "openvino"])

    def __post_init__(self) -> None:
        bad = [d for d in self.detectors if d not in am.DETECTORS]
        if bad or not self.detectors:
            raise ValueError(f"detection options: detectors {bad or '[]'} not available; choose from {list(am.DETECTORS)}")
        for name in ("steps", "options"):
            unknown = sorted(set(getattr(self, name)) - set(am.DETECTORS))
            if unknown:
                raise ValueError(f"detection options: {name} names unknown detector(s) {unknown}; known detectors: "
                                 f"{list(am.DETECTORS)}")

    def steps_for(self, detector: str) -> int:
        return int({**_DEFAULT_STEPS, **self.steps}[detector])

    def options_for(self, detector: str) -> dict[str, Any]:
        opts = {**_DEFAULT_OPTIONS[detector], **self.options.get(detector, {})}
        if detector in ("supersimplenet", "patchcore"):
            opts.setdefault("layers", list(self.layers))
        return opts


def _as_config(cfg: Any) -> DetectionConfig:
    return cfg if isinstance(cfg, DetectionConfig) else DetectionConfig.from_dict(cfg)


@contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's banner lines, CPU dataloader hints and timm's "unexpected keys" note for ``features_only``
    backbones (the dropped classifier head) are noise in Dagster's compute logs; errors still show."""
    levels = {"lightning": logging.WARNING, "lightning.pytorch": logging.WARNING, "lightning.fabric": logging.WARNING,
              "lightning_fabric": logging.WARNING, "timm": logging.ERROR, "anomalib": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    with warnings.catch_warnings():
        for message in ("does not have many workers", "Trying to infer the `batch_size`", "have no logger configured",
                        "LeafSpec", "number of training batches", "module(s) in eval mode",
                        "fit will run with no optimizer"):
            warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")
        try:
            yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)


def load_weights(module: torch.nn.Module, checkpoint: Any) -> torch.nn.Module:
    """Load a Lightning checkpoint's state dict strictly, first giving empty buffers (PatchCore's memory bank)
    the stored shape."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    for name, buf in list(module.named_buffers()):
        if name in state and state[name].shape != buf.shape:
            owner, _, leaf = name.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target.register_buffer(leaf, torch.empty_like(state[name]))
    module.load_state_dict(state, strict=True)
    return module


def _fingerprint(detector: str, cfg: DetectionConfig, weak_tau: float | None, backbone: str,
                 samples: pd.DataFrame) -> str:
    import anomalib

    inputs = samples[["sample_id", "sha256", "split", "label_index", "role"]].sort_values(["split", "sample_id"])
    mask_hashes = [sha256_file(p) if p else "" for p in samples.sort_values(["split", "sample_id"])["mask_path"]]
    return sha256_bytes(dumps({
        "detector": detector, "options": cfg.options_for(detector), "steps": cfg.steps_for(detector),
        "val_every": cfg.val_every,
        "image_size": cfg.image_size, "batch_size": cfg.batch_size, "anomaly_ratio": cfg.anomaly_ratio,
        "weak_tau": weak_tau, "backbone": backbone, "seed": cfg.seed, "anomalib": anomalib.__version__,
        "inputs": inputs.to_dict("list"), "masks": mask_hashes,
    }).encode())[:32]


def _backbone_cache(storage: Storage) -> Path:
    """timm needs a local folder: the storage root's cache when local, else the machine's temp folder."""
    return Path(storage.path("cache/backbones")) if storage.is_local else cache_dir() / "backbones"


def _counts(samples: pd.DataFrame) -> dict[str, int]:
    def n(split: str, label: int) -> int:
        return int(((samples["split"] == split) & (samples["label_index"] == label)).sum())

    return {"n_train_normal": n("train", 0), "n_train_anomalous": n("train", 1), "n_val_normal": n("val", 0),
            "n_val_anomalous": n("val", 1)}


def _read_json(storage: Storage, rel: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(rel))
    except (FileNotFoundError, OSError, ValueError):
        return None


@contextmanager
def _workspace(storage: Storage, rel: str) -> Iterator[Path]:
    """Where the Engine writes: on local storage the detector folder itself, locked so that two partitions
    training the shared one-class reference at once take turns (the second then reuses the first's result);
    on remote storage a private temp folder whose final files are uploaded."""
    if not storage.is_local:
        with storage_lock(storage, rel):  # machine-local; one writer per detector across machines (ops.locks)
            tmp = Path(tempfile.mkdtemp(prefix="detector-"))
            try:
                yield tmp
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return
    with exclusive(Path(storage.path(rel))) as workdir:
        yield workdir


def _storage_relative(storage: Storage, samples: pd.DataFrame) -> pd.DataFrame:
    """Paths under the storage root relative to it, as in every manifest (reruns into another root give equal
    bytes); dataset paths stay absolute (the raw manifest records their root the same way)."""
    root = f"{Path(str(storage.root))}/" if storage.is_local else f"{str(storage.root).rstrip('/')}/"
    out = samples.copy()
    for column in [c for c in out.columns if c.endswith("_path")]:
        out[column] = [p[len(root):] if isinstance(p, str) and p.startswith(root) else p for p in out[column]]
    return out


def read_samples(storage: Storage, rel: str) -> pd.DataFrame:
    """A detector's ``samples.parquet`` with its storage-relative paths made absolute again (loadable as is)."""
    samples = pd.read_parquet(storage.local_file(rel))
    for column in [c for c in samples.columns if c.endswith("_path")]:
        samples[column] = [str(storage.path(p)) if isinstance(p, str) and p and not p.startswith("/")
                           and "://" not in p else p for p in samples[column]]
    return samples


def _fit(detector: str, category: str, samples: pd.DataFrame, cfg: DetectionConfig, weak_tau: float | None,
         backbone: OfflineBackbone | None, workdir: Path, desc: str, progress: Progress,
         weak_paths: set[str] | None = None, resume_dir: Path | None = None) -> tuple[am.FitResult, Path]:
    """Build, train and select one detector in ``workdir``; returns the fit result and the torch export."""
    from lightning.pytorch import seed_everything

    shutil.rmtree(workdir / "engine", ignore_errors=True)  # no pile-up of versioned Engine folders on reruns
    samples = localized(samples)  # anomalib reads local files: cached copies of a remote root's objects
    if weak_paths is not None:
        weak_paths = set(localized(pd.DataFrame({"image_path": sorted(weak_paths)}))["image_path"])
    dm = SyntheticAnomalyDataModule(samples, category=category, train_batch_size=cfg.batch_size,
                                    eval_batch_size=cfg.eval_batch_size, anomaly_ratio=cfg.anomaly_ratio, seed=cfg.seed)
    with _quiet(), tempfile.TemporaryDirectory(prefix="dtd-empty-") as dtd_dir:
        seed_everything(cfg.seed, workers=True, verbose=False)
        model = am.build_model(detector, cfg.options_for(detector), cfg.image_size, backbone=backbone,
                               dtd_dir=dtd_dir, weak_tau=weak_tau)
        if isinstance(model, am.SyntheticDraem):
            train = samples[samples["split"] == "train"]
            model.recon_paths = dict(zip(train["image_path"], train["recon_path"]))
        if weak_paths is not None:
            model.weak_paths = weak_paths
        result = am.fit(model, dm, workdir, cfg.steps_for(detector), val_every=cfg.val_every,
                        select=detector not in am.ONE_CLASS, progress=progress, desc=desc,
                        enable_progress_bar=cfg.enable_progress_bar, accelerator=cfg.accelerator, seed=cfg.seed,
                        resume_dir=resume_dir)
        # exported from a fresh module: one restored by a resumed training pickles differently (its transforms
        # rebuilt from the checkpoint), and the export must not depend on whether training was interrupted
        seed_everything(cfg.seed, workers=True, verbose=False)
        export = am.build_model(detector, cfg.options_for(detector), cfg.image_size, backbone=backbone,
                                dtd_dir=dtd_dir, weak_tau=weak_tau)
        if weak_paths is not None:
            export.weak_paths = weak_paths
        load_weights(export, result.checkpoint)
        return result, export.cpu().to_torch(export_root=workdir)


def _train_one(storage: Storage, category: str, method: str, detector: str, samples: pd.DataFrame,
               cfg: DetectionConfig, weak_tau: float | None, backbone: OfflineBackbone | None,
               partition_method: str, progress: Progress, weak_paths: set[str] | None = None) -> dict[str, Any]:
    rel = f"detectors/{category}/{method}/{detector}"
    detector, variant = base_detector(detector), detector  # a variant (ops.detection.mix) trains its base model
    backbone = backbone if detector in am.NEEDS_BACKBONE else None
    source = backbone.source if backbone is not None else ""
    fingerprint = _fingerprint(detector, cfg, weak_tau, source, samples)
    select = detector not in am.ONE_CLASS
    with _workspace(storage, rel) as workdir:
        done = _read_json(storage, f"{rel}/config.json")
        if done and done.get("fingerprint") == fingerprint and storage.path(done["checkpoint_path"]).exists():
            return {**done["row"], "seconds": 0.0, "partition_method": partition_method, "reused": True}
        resume_root = workdir / RESUME_DIR
        for other in (p for p in resume_root.glob("*") if p.name != fingerprint):
            shutil.rmtree(other, ignore_errors=True)  # an interrupted training of other inputs: never resumed
        result, export = _fit(detector, category, samples, cfg, weak_tau, backbone, workdir,
                              f"{category}/{method}/{variant}", progress, weak_paths, resume_root / fingerprint)
        paths = {"checkpoint_path": f"{rel}/checkpoints/best.ckpt", "export_path": f"{rel}/weights/torch/model.pt",
                 "samples_path": f"{rel}/samples.parquet", "config_path": f"{rel}/config.json"}
        if not storage.is_local:
            storage.write_bytes(paths["checkpoint_path"], result.checkpoint.read_bytes())
            storage.write_bytes(paths["export_path"], Path(export).read_bytes())
        storage.write_bytes(paths["samples_path"], table_to_parquet_bytes(pa.Table.from_pandas(
            _storage_relative(storage, samples), preserve_index=False)))
        config = {"detector": detector, "variant": variant,
                  "weak_rows": None if weak_paths is None else len(weak_paths), "options": cfg.options_for(detector),
                  "steps": cfg.steps_for(detector),
                  "val_every": cfg.val_every, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
                  "anomaly_ratio": cfg.anomaly_ratio, "weak_tau": weak_tau, "val_source": cfg.val_source,
                  "val_fraction": cfg.val_fraction, "mask_column": cfg.mask_column,
                  "backbone": cfg.backbone if source else "", "layers": cfg.layers if source else [],
                  "seed": cfg.seed, "select_metric": am.SELECT_METRIC if select else ""}
        row = {"category": category, "method": method, "detector": variant,
               "trained_on": "synthetic" if select else "normal_only", "weak_tau": weak_tau,
               "mask_column": cfg.mask_column if select else "", "val_source": cfg.val_source if select else "",
               "select_metric": config["select_metric"], "val_score": result.val_score,
               "selected_epoch": result.epoch, "selected_step": result.steps, "steps": config["steps"],
               "image_size": cfg.image_size, "backbone": config["backbone"], "backbone_source": source,
               **_counts(samples), **paths, "config_json": dumps(config), "fingerprint": fingerprint,
               "seed": cfg.seed}
        # written last: its fingerprint marks the folder complete for the reuse test above; no timing in it
        # (reruns must give identical bytes: seconds live in the manifest's timing column only)
        storage.write_bytes(paths["config_path"], json.dumps({"fingerprint": fingerprint, "checkpoint_path":
                                                             paths["checkpoint_path"], "config": config, "row": row},
                                                            indent=2, sort_keys=True, default=str).encode())
        shutil.rmtree(resume_root, ignore_errors=True)  # complete: the folder equals an uninterrupted run's
    return {**row, "seconds": result.seconds, "partition_method": partition_method, "reused": False}


def train_detectors(storage: Storage, category: str, method: str, split_df: pd.DataFrame,
                    synthetic_df: pd.DataFrame, refined_df: pd.DataFrame | None = None, cfg: Any = None,
                    progress: Progress = no_progress) -> pd.DataFrame:
    """Train every configured detector of one category x method partition; one DETECTOR_SCHEMA row each.

    Training masks: ``cfg.mask_column`` ("auto": refined ``final_path`` when ``refined_df`` has rows, else the
    method's ``mask_path``); a refined column is joined on the synthetic ``index``.
    """
    cfg = _as_config(cfg)
    if cfg.mask_column == "auto":
        use_refined = refined_df is not None and len(refined_df) and "final_path" in refined_df.columns
        cfg = replace(cfg, mask_column="final_path" if use_refined else "mask_path")
    check_name(category, "category")
    check_name(method, "method")
    split_df = split_df[split_df["category"] == category] if "category" in split_df.columns else split_df
    synthetic_df = _with_mask_column(synthetic_df, refined_df, cfg.mask_column)
    backbone = None
    if any(d in am.NEEDS_BACKBONE for d in cfg.detectors):
        backbone = resolve_backbone(cfg.backbone, _backbone_cache(storage))
    rows = []
    for i, detector in enumerate(cfg.detectors):
        progress(f"{category}/{method} detectors", i, len(cfg.detectors))
        one_class = detector in am.ONE_CLASS
        samples = build_samples(storage, split_df, synthetic_df, mask_column=cfg.mask_column,
                                val_source=cfg.val_source, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                use_synthetic=not one_class)
        weak = cfg.weak_tau if (detector in WEAK_DETECTORS and method in cfg.weak_methods) else None
        rows.append(_train_one(storage, category, REFERENCE_METHOD if one_class else method, detector, samples,
                               cfg, weak, backbone, method, progress))
    if method in cfg.weak_methods and "segmenter" in cfg.detectors:
        rows += _weak_variants(storage, category, method, split_df, synthetic_df, cfg, progress)
    progress(f"{category}/{method} detectors", len(cfg.detectors), len(cfg.detectors))
    df = pd.DataFrame(rows)
    to_table(df, DETECTOR_SCHEMA, "anomaly_detectors")  # fail here, not in the IO manager, on a schema slip
    return df[DETECTOR_SCHEMA.names]


def _weak_variants(storage: Storage, category: str, method: str, split_df: pd.DataFrame, synthetic_df: pd.DataFrame,
                   cfg: DetectionConfig, progress: Progress) -> list[dict[str, Any]]:
    """AnoGen's ablation rows: the segmenter at each τ of ``weak_ablation``, and on a Perlin + method mix."""
    rows = []
    samples = build_samples(storage, split_df, synthetic_df, mask_column=cfg.mask_column, val_source=cfg.val_source,
                            val_fraction=cfg.val_fraction, seed=cfg.seed)
    for tau in cfg.weak_ablation:
        rows.append(_train_one(storage, category, method, tau_variant("segmenter", tau), samples, cfg, float(tau),
                               None, method, progress))
    if cfg.mix_perlin and method != MIX_SOURCE:
        mixed = mixed_synthetic(storage, category, method, split_df, synthetic_df, cfg.mask_column, cfg.seed)
        samples = build_samples(storage, split_df, mixed, mask_column=cfg.mask_column, val_source=cfg.val_source,
                                val_fraction=cfg.val_fraction, seed=cfg.seed)
        boxes = {str(storage.path(p)) for p in synthetic_df["image_path"]}  # the weak rule: the method's rows only
        rows.append(_train_one(storage, category, method, "segmenter" + MIX_SUFFIX, samples, cfg, cfg.weak_tau, None,
                               method, progress, weak_paths=boxes))
    return rows


def _with_mask_column(synthetic_df: pd.DataFrame, refined_df: pd.DataFrame | None, column: str) -> pd.DataFrame:
    if column in synthetic_df.columns:
        return synthetic_df
    if refined_df is None or column not in refined_df.columns or "index" not in refined_df.columns:
        raise ValueError(f"mask column {column!r} is in neither the synthetic_anomalies nor the refined_masks manifest; "
                         f"set detection option mask_column to 'auto', 'mask_path' or a refined_masks column")
    merged = synthetic_df.merge(refined_df[["index", column]], on="index", how="left", validate="one_to_one")
    missing = merged[column].isna() | (merged[column].astype(str) == "")
    if missing.any():
        raise ValueError(f"refined_masks has no {column!r} for synthetic rows {merged.loc[missing, 'index'].tolist()[:10]}; "
                         f"rematerialize refined_masks for this partition")
    return merged


def row_label(method: str, detector: str = "") -> str:
    if method == REFERENCE_METHOD:
        return "no synthetic data"
    mix = f" + {MIX_SOURCE}" if detector.endswith(MIX_SUFFIX) else ""
    return f"baseline: {method}" if method in BASELINES else f"synthetic: {method}{mix}"


def held_out_rows(split_df: pd.DataFrame) -> pd.DataFrame:
    """The held-out real defects + test/good of the split, in the samples format (never used for training)."""
    samples = build_samples(None, split_df, pd.DataFrame(), use_synthetic=False)
    return samples[samples["split"] == "test"].reset_index(drop=True)


@contextmanager
def loaded_detector(storage: Storage, det: Any) -> Iterator[Any]:
    """The anomalib module of an ``anomaly_detectors`` row (a namedtuple or Series), its checkpoint loaded strictly."""
    config = json.loads(det.config_json)
    backbone = resolve_backbone(config["backbone"], _backbone_cache(storage)) if config["backbone"] else None
    with _quiet(), tempfile.TemporaryDirectory(prefix="dtd-empty-") as dtd_dir:
        model = am.build_model(base_detector(det.detector), config["options"], int(config["image_size"]),
                               backbone=backbone, dtd_dir=dtd_dir, weak_tau=config["weak_tau"])
        load_weights(model, storage.local_file(det.checkpoint_path))
        yield model


def evaluate_detectors(storage: Storage, split_df: pd.DataFrame, detector_df: pd.DataFrame, cfg: Any = None,
                       progress: Progress = no_progress) -> pd.DataFrame:
    """Score each detector of ``detector_df`` on the split's held-out defects; one EVALUATION_SCHEMA row each."""
    import time

    cfg = _as_config(cfg)
    rows = []
    for i, det in enumerate(detector_df.itertuples(index=False)):
        progress("evaluate detectors", i, len(detector_df))
        split = split_df[split_df["category"] == det.category] if "category" in split_df.columns else split_df
        test = held_out_rows(split)
        fitted = read_samples(storage, det.samples_path)
        problems = check_no_test_leakage(pd.concat([fitted[fitted["split"] != "test"], test], ignore_index=True))
        if problems:
            raise ValueError(f"{det.samples_path}: detector {det.detector} was trained or selected on test images "
                             f"({problems[0]}); retrain it on this split (delete {det.config_path})")
        start = time.perf_counter()
        with loaded_detector(storage, det) as model:
            preds = predict_rows(model, localized(test), batch_size=cfg.eval_batch_size)
        metrics = compute_metrics(preds.scores, preds.labels, preds.maps, preds.masks, fpr_limit=cfg.aupro_fpr_limit)
        image_level = is_image_level(split[split["role"] == "holdout"])
        if image_level:  # all-zero stand-in masks of defective images must never become pixel scores
            metrics.update(dict.fromkeys(PIXEL_METRICS, float("nan")))
        rows.append({"category": det.category, "method": det.method, "detector": det.detector,
                     "row_label": row_label(det.method, det.detector), "is_baseline": det.method in BASELINES,
                     "trained_on": det.trained_on, "weak_tau": det.weak_tau,
                     "n_test_good": int((preds.labels == 0).sum()), "n_test_defective": int((preds.labels == 1).sum()),
                     **metrics, "aupro_fpr_limit": cfg.aupro_fpr_limit,
                     "metric_resolution": "x".join(map(str, preds.maps.shape[1:])),
                     "backbone_source": det.backbone_source, "val_score": det.val_score,
                     "train_seconds": det.seconds, "eval_seconds": time.perf_counter() - start,
                     "checkpoint_path": det.checkpoint_path, "metric_note": PIXEL_NOTE if image_level else ""})
    progress("evaluate detectors", len(detector_df), len(detector_df))
    if not rows:
        return empty_frame(EVALUATION_SCHEMA)
    df = pd.DataFrame(rows)
    to_table(df, EVALUATION_SCHEMA, "detector_evaluation")
    return df[EVALUATION_SCHEMA.names]



def check_detectors(storage: Storage, detector_df: pd.DataFrame, split_df: pd.DataFrame) -> list[str]:
    """Asset check: artifacts present, synthetic detectors saw anomalies, no test image in train / val."""
    problems = []
    for det in detector_df.itertuples(index=False):
        name = f"{det.category}/{det.method}/{det.detector}"
        missing = [c for c in ("checkpoint_path", "export_path", "samples_path", "config_path")
                   if not storage.path(getattr(det, c)).exists()]
        if missing:
            problems.append(f"{name}: missing {', '.join(missing)}")
            continue
        if det.trained_on == "synthetic" and det.n_train_anomalous < 1:
            problems.append(f"{name}: trained on synthetic data but saw no anomalous image")
        split = split_df[split_df["category"] == det.category] if "category" in split_df.columns else split_df
        fitted = read_samples(storage, det.samples_path)
        leaks = check_no_test_leakage(pd.concat([fitted[fitted["split"] != "test"], held_out_rows(split)], ignore_index=True))
        problems += [f"{name}: {p}" for p in leaks[:5]]
    return problems


def check_evaluation(evaluation_df: pd.DataFrame) -> list[str]:
    """Asset check: metrics the test set defines are finite and in [0, 1]."""
    problems = []
    for row in evaluation_df.itertuples(index=False):
        name = f"{row.category}/{row.method}/{row.detector}"
        needed = list(IMAGE_METRICS if row.metric_note == PIXEL_NOTE else METRIC_COLUMNS) \
            if row.n_test_defective and row.n_test_good else []
        for m in needed:
            value = getattr(row, m)
            if not (value == value and 0.0 <= value <= 1.0):
                problems.append(f"{name}: {m} = {value}")
    return problems
