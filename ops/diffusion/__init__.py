"""Diffusion toolkit (issue 3): backbone loading, VAE helpers, DDIM sampling/inversion, blending, attention control.

Modules: backbone (load_backbone, Backbone, save_tiny), tiny (the embedded seeded SD-shaped model and its offline
CLIP tokenizer), vae (encode/decode, LatentCache), ddim (grid, sample, guidance), inversion (invert, reconstruct),
blend (latent_mask, LatentBlend, forward_noised), attention (AttentionController and its rules), branches
(Branch, BranchRunner, adapter states). Names are resolved lazily so importing the package loads no torch model.
"""
from __future__ import annotations

from typing import Any

_LAZY = {"load_backbone": "ops.diffusion.backbone", "Backbone": "ops.diffusion.backbone",
         "save_tiny": "ops.diffusion.backbone"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ops.diffusion' has no attribute {name!r}")
