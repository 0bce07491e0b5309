"""Data types shared by every stage and every generation method.

Images are ``uint8`` arrays of shape (H, W, 3) in RGB; masks are ``bool`` arrays of shape (H, W).
Methods never see file paths of the storage root: the generation stage loads samples, hands them over,
and writes what comes back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One real image (normal or defective) with its mask (``None`` for normal images)."""

    image_id: str
    category: str
    defect_type: str  # "good" for normal images
    image: np.ndarray
    mask: np.ndarray | None = None
    source: str = ""  # path as recorded in the raw manifest, for error messages and lineage

    def __post_init__(self) -> None:
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"{self.source or self.image_id}: image must be uint8 HxWx3, got "
                             f"{self.image.dtype} {self.image.shape}")
        if self.mask is not None and (self.mask.dtype != bool or self.mask.shape != self.image.shape[:2]):
            raise ValueError(f"{self.source or self.image_id}: mask must be bool HxW matching the image, got "
                             f"{self.mask.dtype} {self.mask.shape} for image {self.image.shape}")


@dataclass(frozen=True)
class SynthesisJob:
    """Everything needed to reproduce one synthetic image; one manifest row per job."""

    index: int
    seed: int
    category: str
    defect_type: str
    normal: Sample
    target_mask: np.ndarray  # bool HxW, same size as ``normal.image``
    reference: Sample | None = None  # a support anomaly of ``defect_type`` (None for reference-free methods)
    support_ids: tuple[str, ...] = ()  # every support image the adapter was fitted on


@dataclass
class Synthetic:
    """What a method returns for one job."""

    job: SynthesisJob
    image: np.ndarray  # uint8 HxWx3, same size as the normal image
    mask: np.ndarray  # bool HxW: the method's own final mask (usually the target mask, possibly refined)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # float32 HxW maps in [0, 1]: "attention", "localization", ...
    params: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable method parameters for this row
    seconds: float = 0.0


@dataclass
class Adapter:
    """A fitted per-category adapter. ``path`` is a directory the method wrote (None when nothing is stored)."""

    method: str
    category: str
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable: what was trained, steps, losses, files
