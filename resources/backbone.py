"""The diffusion backbone as a Dagster resource (DESIGN §3).

Choices:
- Loading is lazy (``get()``), not in ``setup_for_execution``: every generation asset takes this resource, but
  the training-free baselines (cutpaste, perlin) never call ``get()``, so their runs neither import torch nor
  build a UNet. ``ops.diffusion.backbone.load_backbone`` keeps one backbone per process per
  (model, device, dtype, attention), so repeated ``get()`` calls and several assets in one run share it.
- ``model`` defaults to ``$ANOMALY_FORGE_MODEL`` or ``forge-base`` (the project's own small trained model, shipped
  with the package; ``tiny`` is the untrained test backbone).
  ``sd15-shape`` (SD 1.5's architecture, random weights) is for speed/memory benchmarks only, never for quality
  or detection figures.
"""
from __future__ import annotations

import os
from typing import Any

import dagster as dg

class DiffusionBackbone(dg.ConfigurableResource):
    """``model``: "forge-base", "tiny", a local diffusers folder, or a hub id (from the HF cache when offline);
    "sd15-shape" benchmarks speed/memory only (random weights: never for quality figures)."""

    model: str = "forge-base"
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "sdpa"

    @classmethod
    def from_env(cls, **overrides: Any) -> "DiffusionBackbone":
        values: dict[str, Any] = {"model": os.environ.get("ANOMALY_FORGE_MODEL", "forge-base"),
                                  "device": os.environ.get("ANOMALY_FORGE_DEVICE", "auto")}
        values.update(overrides)
        return cls(**values)

    def get(self) -> Any:
        """The loaded ``ops.diffusion.backbone.Backbone`` (first call loads it; later calls return the same one)."""
        from ops.diffusion.backbone import load_backbone

        return load_backbone(self.model, device=self.device, dtype=self.dtype, attention=self.attention)
