"""anomalib detectors built offline and trained through anomalib's Engine.

- ``segmenter``: the papers' focal-loss segmentation U-Net (:mod:`ops.detection.segmenter`).
- ``supersimplenet``: ``Supersimplenet(supervised=True)``, the one anomalib model whose training step uses
  anomalous images and masks; it gets the synthetic anomalies through the custom datamodule.
- ``draem``: DRAEM with the synthetic anomalies replacing its Perlin source (:class:`SyntheticDraem`); with
  ``weak_tau`` its focal term gets AnoGen's weak rule (the paper trains DRAEM that way too).
- ``patchcore``: one-class PatchCore on normal images only: the "no synthetic data" reference row.

Choices recorded here:

- Pretrained backbones come from :mod:`ops.detection.backbones` (never downloaded); DRAEM gets an existing
  empty ``dtd_dir`` so that its constructor does not fetch DTD, and its Perlin generator is removed.
- Checkpoints are chosen on the validation split (synthetic slice or support set, never test) by
  ``val_pixel_AUPR`` (pixel AP, the papers' headline segmentation metric), ties to the earlier step; PatchCore
  has nothing to choose (one pass) and keeps its only checkpoint.
- DRAEM's reconstruction target for a synthetic anomaly is the normal image it was drawn on (``recon_path``);
  for a normal image it is the image itself, exactly as in DRAEM where the clean image is the target.
- Crash safety: trained (not one-class) detectors keep an epoch-start resume checkpoint (:class:`ResumePoint`)
  and seed each epoch from (seed, epoch); a rerun after kill -9 continues from it and ends with the same files.
- The Engine's results folder is ``<detector dir>/engine`` (cleared before each training so that reruns do not
  pile up versions); the chosen checkpoint is written to ``<detector dir>/checkpoints/best.ckpt``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from anomalib.callbacks import ModelCheckpoint
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from anomalib.metrics import AUPR, AUROC, Evaluator
from anomalib.models import AnomalibModule, Draem, Patchcore, Supersimplenet
from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork, ReconstructiveSubNetwork
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Callback
from torchvision.transforms.v2 import Compose, Normalize, Resize
from torchvision.transforms.v2 import functional as TF

from ops.detection.backbones import OfflineBackbone, verify_backbone
from ops.detection.segmenter import Segmenter, weak_rows, weak_supervision_keep
from ops.methods.base import Progress, no_progress

DETECTORS = ("segmenter", "supersimplenet", "draem", "patchcore")
ONE_CLASS = ("patchcore",)  # trained without synthetic data
NEEDS_BACKBONE = ("supersimplenet", "patchcore")
SELECT_METRIC = "val_pixel_AUPR"


def make_evaluator(select: bool) -> Evaluator:
    """Validation metrics only: they drive checkpoint selection; test metrics are computed by ``evaluate``."""
    if not select:
        return Evaluator(val_metrics=[], test_metrics=[])
    return Evaluator(val_metrics=[AUPR(fields=["anomaly_map", "gt_mask"], prefix="val_pixel_", strict=False),
                                  AUROC(fields=["pred_score", "gt_label"], prefix="val_image_", strict=False)],
                     test_metrics=[])


def _pre(size: int, backbone: OfflineBackbone | None = None) -> PreProcessor:
    steps: list[Any] = [Resize((size, size), antialias=True)]
    if backbone is not None:
        steps.append(Normalize(mean=list(backbone.mean), std=list(backbone.std)))
    return PreProcessor(transform=Compose(steps))


class SyntheticDraem(Draem):
    """DRAEM trained on the datamodule's normal + synthetic pairs instead of Perlin-noise anomalies."""

    def __init__(self, dtd_dir: str, recon_width: int = 128, disc_width: int = 64, lr: float = 1e-4,
                 weak_tau: float | None = None, pre_processor: Any = True, evaluator: Any = True) -> None:
        super().__init__(dtd_dir=dtd_dir, pre_processor=pre_processor, evaluator=evaluator, visualizer=False)
        if weak_tau is not None and not 0.0 < weak_tau <= 1.0:
            raise ValueError(f"weak_tau must lie in (0, 1], got {weak_tau}")
        del self.augmenter  # the Perlin source is replaced, never sampled
        if recon_width != 128:
            self.model.reconstructive_subnetwork = ReconstructiveSubNetwork(base_width=recon_width)
        if disc_width != 64:
            self.model.discriminative_subnetwork = DiscriminativeSubNetwork(in_channels=6, out_channels=2,
                                                                            base_width=disc_width)
        self.lr, self.weak_tau = lr, weak_tau
        self.weak_paths: set[str] | None = None  # image paths whose masks are boxes (None: all); set before training
        self.recon_paths: dict[str, str] = {}  # synthetic image path -> its source normal (set before training)
        self._recon_cache: dict[str, torch.Tensor] = {}

    def reconstruction_targets(self, batch: Any) -> torch.Tensor:
        target = batch.image.clone()
        for i, (path, label) in enumerate(zip(batch.image_path, batch.gt_label)):
            if not bool(label):
                continue
            src = self.recon_paths.get(path)
            if not src:
                raise KeyError(f"{path}: no source normal image for DRAEM's reconstruction target; the synthetic "
                               f"manifest row needs normal_path/normal_dataset_root")
            if src not in self._recon_cache:
                self._recon_cache[src] = read_image(src, as_tensor=True)
            target[i] = TF.resize(self._recon_cache[src], list(batch.image.shape[-2:]), antialias=True).to(target)
        return target

    def training_step(self, batch: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        del args, kwargs
        reconstruction, prediction = self.model(batch.image)
        mask = batch.gt_mask
        if self.weak_tau is not None:
            # anomalib's DraemLoss takes no weights: dropped pixels get kornia's ignore label, which zeroes their
            # focal term and keeps them in the mean, the segmenter's "loss set to 0"
            keep = weak_supervision_keep(prediction, mask, self.weak_tau, weak_rows(self.weak_paths, batch.image_path))
            mask = mask.long().masked_fill(keep == 0, self.loss.focal_loss.ignore_index)
        loss = self.loss(self.reconstruction_targets(batch), reconstruction, mask.unsqueeze(1), prediction)
        self.log("train_loss", loss.item(), on_epoch=True, prog_bar=False, logger=False)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(params=self.model.parameters(), lr=self.lr)


def build_model(name: str, opts: dict[str, Any], image_size: int, backbone: OfflineBackbone | None = None,
                dtd_dir: str | None = None, weak_tau: float | None = None) -> AnomalibModule:
    """One detector, offline; ``opts`` are that detector's constructor options from the detection config."""
    if name in NEEDS_BACKBONE and backbone is None:
        raise ValueError(f"detector {name!r} needs a pretrained backbone (ops.detection.backbones.resolve_backbone)")
    if name == "segmenter":
        return Segmenter(**opts, weak_tau=weak_tau, image_size=image_size, evaluator=make_evaluator(True))
    if name == "supersimplenet":
        model = Supersimplenet(backbone=backbone.timm_name, supervised=True, pre_processor=_pre(image_size, backbone),
                               evaluator=make_evaluator(True), visualizer=False, **opts)
        side = image_size * 2 // model.model.feature_extractor.feature_extractor.reductions[0]
        if side < 32:  # its feature-space Perlin generator draws scales up to 32 cells
            raise ValueError(f"supersimplenet needs a feature map of at least 32 px; image_size {image_size} gives "
                             f"{side} with layers {opts.get('layers')}: use image_size >= {image_size * 32 // side}")
    elif name == "patchcore":
        model = Patchcore(backbone=backbone.timm_name, pre_trained=True, pre_processor=_pre(image_size, backbone),
                          evaluator=make_evaluator(False), visualizer=False, **opts)
    elif name == "draem":
        if not dtd_dir or not Path(dtd_dir).is_dir():
            raise ValueError(f"DRAEM needs an existing dtd_dir (may be empty) so that it does not download DTD; got {dtd_dir!r}")
        return SyntheticDraem(dtd_dir=dtd_dir, weak_tau=weak_tau, pre_processor=_pre(image_size),
                              evaluator=make_evaluator(True), **opts)
    else:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(DETECTORS)}")
    verify_backbone(model, backbone)
    return model


class _ProgressCallback(Callback):
    def __init__(self, desc: str, total: int, progress: Progress) -> None:
        self.desc, self.total, self.progress = desc, total, progress

    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self.progress(self.desc, min(trainer.global_step, self.total), self.total)


@dataclass
class FitResult:
    checkpoint: Path
    val_score: float | None  # SELECT_METRIC of the chosen checkpoint (None: nothing to choose)
    epoch: int
    steps: int  # optimizer steps at the chosen checkpoint
    seconds: float


def _portable_checkpoint(path: Path, workdir: Path) -> dict[str, Any]:
    """Rewrite a Lightning checkpoint with the absolute paths in its callbacks' state (ModelCheckpoint's
    dirpath, best_model_path, best_k_models keys) made relative to the detector folder: the same training in
    two storage roots then gives the same bytes, and a moved storage root holds no stale absolute path. Its
    ``loops`` entry is dropped (see below)."""
    import io

    from ops.atomic import write_bytes_atomic

    prefix = str(Path(workdir).resolve())

    def relative(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(prefix):
            return Path(value).relative_to(prefix).as_posix()
        if isinstance(value, dict):
            return {relative(k): relative(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(relative(v) for v in value)
        return value

    state = torch.load(path, map_location="cpu", weights_only=False)
    state["callbacks"] = relative(state.get("callbacks", {}))
    # Loop counters record how the process got here (a resumed run restarts some of them), not the model: the
    # shipped checkpoint holds weights, optimizer, epoch/step and callbacks, so a resumed training gives its bytes
    state.pop("loops", None)
    state = _interned(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())
    return state


class EpochSeeds(Callback):
    """Reseed torch / numpy / random from (seed, epoch) at each training epoch's first batch: the random crops and
    dropout of epoch k are then the same whether the run started at epoch 0 or resumed at epoch k."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # the datamodule's sampler draws this epoch's order from it when the epoch's first batch is fetched (after
        # this hook); Lightning's own set_epoch counter restarts on resume
        if hasattr(trainer.datamodule, "epoch"):
            trainer.datamodule.epoch = trainer.current_epoch

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # a resumed run makes its first iterator before the epoch-start hook: the epoch is right already then
        if hasattr(trainer.datamodule, "epoch"):
            trainer.datamodule.epoch = int(checkpoint.get("epoch", 0))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        from lightning.pytorch import seed_everything

        # Seeded at the first batch, not at the epoch's start: making a DataLoader iterator draws its base seed
        # from the global generator, and Lightning makes the first epoch's iterator before the epoch-start hook
        # (a resumed run's first epoch) but later ones after it, so the generator would be one draw apart.
        if batch_idx == 0:
            seed_everything(self.seed * 1_000_003 + trainer.current_epoch, workers=True, verbose=False)


class ResumePoint(Callback):
    """A full training checkpoint at the start of each epoch after the first, before its first batch, written
    atomically (temp file + rename): a kill -9 leaves the previous one intact, never a torn file. Why the start
    and not the end of the previous epoch: Lightning restarts an epoch-end checkpoint as an unfinished epoch
    (one extra batch from a fresh loader); from an epoch-start one it replays the epoch from its first batch,
    hooks included, which is exactly what an uninterrupted run does."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        import os

        if trainer.current_epoch == 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp)
        state = torch.load(tmp, map_location="cpu", weights_only=False)
        # At this hook the batch counters still describe the finished epoch (the epoch loop resets them right
        # after); restored as they are, Lightning would take the new epoch for an almost finished one.
        progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        progress["current"] = dict.fromkeys(progress["current"], 0)
        progress["is_last_batch"] = False
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def _interned(value: Any) -> Any:
    """The structure with every string interned: pickle shares equal strings only when they are one object, and
    which ones are depends on the process's history (a resumed run's come from a loaded file)."""
    import sys

    if type(value) is str:  # str subclasses (Lightning's str enums such as PrecisionType) cannot be interned
        return sys.intern(value)
    if isinstance(value, dict):
        items = [(_interned(k), _interned(v)) for k, v in value.items()]
        try:
            return type(value)(items)
        except TypeError:
            return dict(items)
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_interned(v) for v in value)
    return value


def fit(model: AnomalibModule, datamodule: Any, workdir: Path, steps: int, *, val_every: int = 10,
        select: bool = True, progress: Progress = no_progress, desc: str = "train",
        enable_progress_bar: bool = False, accelerator: str = "auto", seed: int = 0,
        resume_dir: Path | None = None) -> FitResult:
    """Train for ``steps`` optimizer steps (one pass for one-class models) with anomalib's Engine, validating
    every ``val_every`` steps; keep the checkpoint best on validation.

    ``resume_dir`` (trained models only; the caller keys it by everything the training depends on): an epoch-start
    checkpoint kept there is resumed from, optimizer, loop counters and best-so-far included, and epochs are
    seeded by (``seed``, epoch) (:class:`EpochSeeds`, the datamodule's sampler), so an interrupted training ends
    with the same files as an uninterrupted one. The caller deletes the folder once the result is saved."""
    workdir = Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    last = Path(resume_dir) / "last.ckpt" if (resume_dir is not None and select) else None
    resuming = last is not None and last.is_file()
    if not resuming:  # the best-so-far checkpoint belongs to the interrupted run's state: keep it when resuming
        for stale in ckpt_dir.glob("*.ckpt"):
            stale.unlink()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=SELECT_METRIC if select else None,
                                 mode="max", save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    # One-class models make one pass over the normals (anomalib forces max_epochs=1 for PatchCore).
    budget = {"max_steps": steps, "check_val_every_n_epoch": None, "val_check_interval": min(val_every, steps)} \
        if select else {"max_epochs": 1}
    total = steps if select else -(-int((datamodule.samples["split"] == "train").sum()) // datamodule.train_batch_size)
    callbacks = [checkpoint, _ProgressCallback(desc, total, progress)]
    if last is not None:
        callbacks += [EpochSeeds(seed), ResumePoint(last)]
    engine = Engine(default_root_dir=workdir / "engine", callbacks=callbacks,
                    accelerator=accelerator, devices=1, logger=False, enable_progress_bar=enable_progress_bar,
                    enable_model_summary=False, **budget)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule, ckpt_path=str(last) if resuming else None)
    seconds = time.perf_counter() - start
    best = Path(checkpoint.best_model_path or checkpoint.last_model_path or "")
    if not best.is_file():
        raise RuntimeError(f"{type(model).__name__}: training wrote no checkpoint under {ckpt_dir}")
    state = _portable_checkpoint(best, workdir)
    score = checkpoint.best_model_score
    return FitResult(checkpoint=best, val_score=float(score) if (select and score is not None) else None,
                     epoch=int(state.get("epoch", 0)), steps=int(state.get("global_step", 0)), seconds=seconds)
