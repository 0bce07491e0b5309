"""The papers' downstream detector: a discriminative segmentation U-Net trained on normal + synthetic pairs.

AnomalyDiffusion and AnoGen evaluate generated anomalies by training a segmentation network on normal images
plus generated image/mask pairs (50/50 sampling, focal loss) and scoring it on held-out real defects. The
network here is anomalib's DRAEM discriminative sub-network (``DiscriminativeSubNetwork``) fed with the image
alone (no reconstruction branch), wrapped as an :class:`AnomalibModule` so that it trains, checkpoints and
exports through anomalib's Engine like every other detector.

AnoGen's weakly-supervised variant (``weak_tau``): generated anomalies come with box masks that also cover
normal pixels, so inside the box the per-pixel loss is set to 0 where the network is already confident the
pixel is normal, ``p_normal >= tau`` (AnoGen eq. for L'_seg; the paper's best tau is 0.9). Outside the box the
loss is unchanged; tau = 1 is plain box supervision. In a mixed training set (Perlin + AnoGen) only the rows in
``weak_paths`` (the box-labelled ones) get the weak rule.

Choices made where the papers are vague:

- Focal loss as in DRAEM (gamma 2, alpha 1) on the 2-class softmax, averaged over all pixels, ignored pixels
  counting as 0 (AnoGen: "loss set to 0").
- The confidence test of the weak variant uses the detached prediction of the same forward pass.
- Image score: maximum of the anomaly map after a ``score_kernel`` x ``score_kernel`` mean filter (DRAEM uses
  21 px at 256 px input; 11 px is the same fraction of the 128 px demo images).
- Inputs are resized only (no ImageNet normalisation), as in anomalib's DRAEM.
- ``train_crop``: training sees random ``train_crop`` px windows (a window of an anomalous image always holds
  one of its mask pixels, placed in the window's central half); inference runs on the whole image (the U-Net
  is fully convolutional). Four times cheaper per step at 64 of 128 px, same pixel scale as at test time.
- ``bn_momentum`` 0.5 instead of PyTorch's 0.1: with only tens of CPU steps the running BatchNorm statistics
  otherwise lag the weights and the eval-mode network is near chance for the first ~40 steps (measured on the
  demo data: validation pixel AP 0.02 vs 0.1 after 24 steps).
- Paper settings: ``base_width=64``, 256 px, no crop, ``bn_momentum=0.1``, batch 8, Adam lr 1e-4, ~700
  epochs (DRAEM) / the AnomalyDiffusion protocol. Demo defaults live in ``stage.DetectionConfig``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from anomalib import LearningType
from anomalib.data import InferenceBatch
from anomalib.models import AnomalibModule
from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork
from anomalib.pre_processing import PreProcessor
from torch import nn
from torchvision.transforms.v2 import Compose, Resize


def focal_loss_map(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 1.0) -> torch.Tensor:
    """Per-pixel focal loss ``-alpha (1 - p_t)^gamma log p_t`` of (B, 2, H, W) logits against a (B, H, W) 0/1 mask."""
    log_p = F.log_softmax(logits, dim=1)
    log_pt = log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return -alpha * (1.0 - log_pt.exp()).pow(gamma) * log_pt


def random_crops(images: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``size`` x ``size`` window per item; an anomalous item's window holds one of its mask pixels."""
    _, _, h, w = images.shape
    if size >= min(h, w):
        return images, masks
    out_x, out_m = [], []
    for img, mask in zip(images, masks):
        hits = torch.nonzero(mask, as_tuple=False)
        if len(hits):
            cy, cx = hits[int(torch.randint(len(hits), (1,)))].tolist()
            oy, ox = (torch.randint(size // 4, 3 * size // 4 + 1, (2,))).tolist()
            y0, x0 = min(max(cy - oy, 0), h - size), min(max(cx - ox, 0), w - size)
        else:
            y0, x0 = int(torch.randint(h - size + 1, (1,))), int(torch.randint(w - size + 1, (1,)))
        out_x.append(img[:, y0:y0 + size, x0:x0 + size])
        out_m.append(mask[y0:y0 + size, x0:x0 + size])
    return torch.stack(out_x), torch.stack(out_m)


def weak_supervision_keep(logits: torch.Tensor, box_mask: torch.Tensor, tau: float,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
    """AnoGen: 0 inside the box where ``p_normal >= tau`` (loss ignored), 1 everywhere else.

    ``tau >= 1`` keeps every pixel: in real arithmetic p_normal < 1, so τ = 1 IS ordinary box supervision (the
    paper's ablation row); float32 softmax saturates to exactly 1.0 for confident pixels, which ``>=`` would
    otherwise drop. ``rows`` (bool (B,)): the samples whose masks are boxes (a Perlin + AnoGen mix keeps exact
    supervision on the Perlin rows); None = every sample."""
    if tau >= 1.0:
        return torch.ones_like(box_mask, dtype=logits.dtype)
    p_normal = torch.softmax(logits.detach(), dim=1)[:, 0]
    ignore = box_mask.bool() & (p_normal >= tau)
    if rows is not None:
        ignore = ignore & rows.to(ignore.device).bool().view(-1, *([1] * (ignore.ndim - 1)))
    return (~ignore).to(logits.dtype)


def weak_rows(weak_paths: set[str] | None, image_paths: Any) -> torch.Tensor | None:
    """The ``rows`` of :func:`weak_supervision_keep` for a batch: its images listed in ``weak_paths``."""
    return None if weak_paths is None else torch.tensor([p in weak_paths for p in image_paths])


class SegmenterNet(nn.Module):
    """DRAEM's discriminative U-Net on the image; eval mode returns anomalib's InferenceBatch."""

    def __init__(self, base_width: int = 16, score_kernel: int = 11, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.net = DiscriminativeSubNetwork(in_channels=3, out_channels=2, base_width=base_width)
        for module in self.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum
        self.score_kernel = score_kernel

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        logits = self.net(images)
        if self.training:
            return logits
        anomaly_map = torch.softmax(logits, dim=1)[:, 1]
        k = self.score_kernel
        pooled = F.avg_pool2d(anomaly_map.unsqueeze(1), k, stride=1, padding=k // 2, count_include_pad=False) if k > 1 \
            else anomaly_map.unsqueeze(1)
        return InferenceBatch(pred_score=pooled.amax(dim=(-3, -2, -1)), anomaly_map=anomaly_map)


class Segmenter(AnomalibModule):
    """Focal-loss segmentation detector trained on synthetic anomalies (optionally AnoGen weak supervision)."""

    def __init__(self, base_width: int = 16, lr: float = 1e-3, gamma: float = 2.0, alpha: float = 1.0,
                 weak_tau: float | None = None, score_kernel: int = 11, image_size: int = 128,
                 train_crop: int | None = None, bn_momentum: float = 0.1, pre_processor: nn.Module | bool = True, post_processor: nn.Module | bool = True,
                 evaluator: Any = True, visualizer: Any = False) -> None:
        self._image_size = image_size
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        if weak_tau is not None and not 0.0 < weak_tau <= 1.0:
            raise ValueError(f"weak_tau must lie in (0, 1], got {weak_tau}")
        for name, size in (("image_size", image_size), ("train_crop", train_crop)):
            if size is not None and size % 32:
                raise ValueError(f"segmenter {name} must be a multiple of 32 (five 2x poolings), got {size}")
        self.model = SegmenterNet(base_width=base_width, score_kernel=score_kernel, bn_momentum=bn_momentum)
        self.lr, self.gamma, self.alpha, self.weak_tau, self.train_crop = lr, gamma, alpha, weak_tau, train_crop
        self.weak_paths: set[str] | None = None  # image paths whose masks are boxes (None: all); set before training

    def configure_pre_processor(self, image_size: tuple[int, int] | None = None) -> PreProcessor:
        size = image_size or (self._image_size, self._image_size)
        return PreProcessor(transform=Compose([Resize(size, antialias=True)]))

    def loss(self, logits: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        per_pixel = focal_loss_map(logits, mask, self.gamma, self.alpha)
        if self.weak_tau is not None:
            per_pixel = per_pixel * weak_supervision_keep(logits, mask, self.weak_tau, rows)
        return per_pixel.mean()

    def training_step(self, batch: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        del args, kwargs
        images, masks = batch.image, batch.gt_mask
        if self.train_crop:
            images, masks = random_crops(images, masks, self.train_crop)
        loss = self.loss(self.model(images), masks, weak_rows(self.weak_paths, batch.image_path))
        self.log("train_loss", loss.item(), on_epoch=True, prog_bar=False, logger=False)
        return {"loss": loss}

    def validation_step(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        # anomalib knows no "supervised" type; like DRAEM this model is scored as one-class (own synthetic anomalies)
        return LearningType.ONE_CLASS
