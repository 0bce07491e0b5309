"""Latent blending: keep a normal image's trajectory outside a mask at every step.

After every sampling step (and at the start) ``z_t ← m ⊙ z_t + (1 − m) ⊙ z_t^normal``, with z_t^normal the
normal image's latent at the same DDIM level: its stored inversion trajectory (O2MAG, bg-disentangle) or its
forward-noised latent sqrt(ᾱ) z_0 + sqrt(1 − ᾱ) ε with one fixed ε (AnoGen's inpainting).

Choices:
- Mask downsampling to the latent grid (:func:`latent_mask`): each latent cell gets the fraction of its pixels
  inside the mask (adaptive average pooling, so any image size works); rule "any" (default for blending) marks a
  cell generated when ANY of its pixels is inside, so a defect pixel is never frozen to the normal background
  (the dilation is < 1 latent cell = ``vae_factor`` pixels). "majority" (>= 0.5) is the rule used for attention
  masks. A mask that is non-empty in pixels never becomes empty on the grid: "majority" falls back to "any".
- The blend is ``torch.where(m, z, z_normal)``, not the arithmetic form: outside the mask the result is then
  bit-identical to the normal trajectory (0·z + 1·z_n can differ in the last bit, and NaN·0 is NaN).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ops.diffusion.ddim import DDIMGrid, StepState

RULES = ("any", "majority")


def latent_mask(mask: Any, size: tuple[int, int], rule: str = "any") -> torch.Tensor:
    """bool HxW (or NxHxW / Nx1xHxW) pixel mask -> bool (N, 1, h, w) mask on the latent/attention grid."""
    if rule not in RULES:
        raise ValueError(f"unknown mask rule {rule!r}; use one of {RULES}")
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"mask must be HxW, NxHxW or Nx1xHxW, got shape {tuple(m.shape)}")
    cover = F.adaptive_avg_pool2d(m.float(), tuple(size))
    anywhere = cover > 0
    if rule == "any":
        return anywhere
    major = cover >= 0.5
    empty = ~major.flatten(1).any(dim=1)
    if empty.any():
        major[empty] = anywhere[empty]
    return major


class Trajectory:
    """Latents per DDIM level (level 0 = clean). ``levels[k]`` is (B, C, h, w)."""

    def __init__(self, grid: DDIMGrid, levels: list[torch.Tensor]):
        if len(levels) != grid.num_steps + 1:
            raise ValueError(f"trajectory has {len(levels)} levels, the grid needs {grid.num_steps + 1}")
        self.grid = grid
        self.levels = levels

    def __getitem__(self, level: int) -> torch.Tensor:
        return self.levels[level]

    def __len__(self) -> int:
        return len(self.levels)


def forward_noised(grid: DDIMGrid, z0: torch.Tensor, noise: torch.Tensor) -> Trajectory:
    """sqrt(ᾱ_k) z0 + sqrt(1 − ᾱ_k) ε at every level with ONE ε (level 0 keeps z0 itself, exactly)."""
    levels = [z0.float()]
    for k in range(1, grid.num_steps + 1):
        a = float(grid.alphas[k])
        levels.append(a ** 0.5 * z0.float() + (1 - a) ** 0.5 * noise.float())
    return Trajectory(grid, levels)


class LatentBlend:
    """Step callback keeping ``stream`` equal to the normal trajectory outside ``mask`` (bool, latent grid)."""

    def __init__(self, mask: torch.Tensor, normal: Trajectory | Callable[[int], torch.Tensor], stream: str = "x",
                 until_step: int | None = None):
        if mask.dtype != torch.bool:
            raise TypeError("LatentBlend needs a bool latent-grid mask (use latent_mask(...))")
        self.mask = mask
        self.normal = normal
        self.stream = stream
        self.until_step = until_step  # blend steps < until_step only (None: every step)

    def _normal(self, level: int) -> torch.Tensor:
        return self.normal[level] if isinstance(self.normal, Trajectory) else self.normal(level)

    def blend(self, z: torch.Tensor, level: int) -> torch.Tensor:
        zn = self._normal(level).to(z.device, z.dtype)
        return torch.where(self.mask.to(z.device), z, zn)

    def start(self, z_T: torch.Tensor, grid: DDIMGrid, start_step: int = 0) -> torch.Tensor:
        """The blended starting latent at the level sampling starts from."""
        return self.blend(z_T, grid.num_steps - start_step)

    def __call__(self, state: StepState) -> None:
        if self.until_step is not None and state.step >= self.until_step:
            return
        state.latents[self.stream] = self.blend(state.latents[self.stream], state.level_to)
