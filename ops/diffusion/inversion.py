"""DDIM inversion z0 -> zT (eta 0), masked inversion (bg_disentangle eq. 8), and reconstruction.

Inversion walks the grid of ops/diffusion/ddim.py upwards, level k-1 -> k (eq. 4 of
papers/bg_disentangle_ddim_inversion.md), and with a mask m (1 = defect area) it inverts
z̃_0^m = (1 − m) ⊙ z_0 with the noise update masked (eq. 8):

    z̃_k^m = sqrt(ᾱ_k) [ z̃_{k-1}^m / sqrt(ᾱ_{k-1}) + (1 − m) ⊙ (sqrt(1/ᾱ_k − 1) − sqrt(1/ᾱ_{k-1} − 1)) ε ]

so the masked area stays exactly 0 at every level. ε is ε_θ(z̃_{k-1}, τ, C) with classifier-free guidance
when ``guidance_scale`` != 1 and an ``uncond`` embedding is given.

Choices:
- ``eps_timestep="current"`` (default) evaluates the UNet at the level the latent is at, τ_{k-1}, exactly as
  eq. 4/8 are printed (the first move evaluates the clean latent at timestep 0). ``"next"`` feeds τ_k instead,
  the convention of diffusers' DDIMInverseScheduler and null-text inversion; both are the same first-order
  approximation of the ODE and both are kept so the choice can be recorded per run.
- ``mask`` is a bool latent-grid tensor (B or 1, 1, h, w) or a pixel mask (converted with
  ``blend.latent_mask(..., rule="any")``).
- Masked cross-attention during inversion (eq. 11) comes from an attention controller on the ``runner``.
- Precision: latents are float32 between steps; with the fast path's ``fp32_inversion`` a half-precision UNet
  runs in float32 for the inversion (ops/diffusion/fastpath.py), and ``inference_mode`` replaces no_grad.
- Measured reconstruction tolerance, max |reconstruct(invert(z0)) − z0| / max |z0|, float32, no CFG, 50 steps:
  with an exact denoiser (Gaussian data, tests/test_ddim_inversion.py) 0.052 for "current" and 0.025 for "next",
  halving each time the steps double (a first-order method); reversing the timestep order breaks it (> 0.3).
  The untrained tiny UNet is no denoiser, so its ODE does not invert: 2.9-3.0 on a VAE-encoded 128 px image
  (mechanics only, as DESIGN §9 says). Real SD 1.5 checkpoints sit between the two; CFG > 1 during inversion
  makes it worse (null-text inversion exists for that reason).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ops.diffusion.blend import Trajectory, latent_mask
from ops.diffusion.branches import BranchRunner
from ops.diffusion.ddim import Callback, DDIMGrid, cfg_branches, ddim_grid, ddim_move, sample
from ops.diffusion.fastpath import fp32_unet, grad_off
from ops.progress import progress_bar

EPS_TIMESTEPS = ("current", "next")


@dataclass
class Inversion:
    grid: DDIMGrid
    z0: torch.Tensor  # the latent that was inverted ((1 − m) ⊙ z0 for masked inversion)
    zT: torch.Tensor
    trajectory: Trajectory | None
    mask: torch.Tensor | None  # bool latent-grid mask (1 = masked-out defect area) or None
    eps_timestep: str = "current"


def as_latent_mask(mask: Any, z: torch.Tensor) -> torch.Tensor:
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape[-2:]) == tuple(z.shape[-2:]):
        m = mask if mask.ndim == 4 else mask.reshape(-1, 1, *mask.shape[-2:])
    else:
        m = latent_mask(mask, tuple(z.shape[-2:]), rule="any")
    if m.shape[0] not in (1, z.shape[0]):
        raise ValueError(f"mask batch {m.shape[0]} does not match latent batch {z.shape[0]}")
    return m.to(z.device)


@torch.no_grad()
def invert(backbone: Any, z0: torch.Tensor, cond: torch.Tensor, num_steps: int = 50,
           uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, mask: Any = None,
           runner: BranchRunner | None = None, keep_trajectory: bool = False, eps_timestep: str = "current",
           trajectory_device: str | torch.device | None = None, progress: str | None = None) -> Inversion:
    """DDIM-invert ``z0`` (B, C, h, w) to level N; with ``mask``, the masked inversion of eq. 8."""
    if eps_timestep not in EPS_TIMESTEPS:
        raise ValueError(f"eps_timestep must be one of {EPS_TIMESTEPS}, got {eps_timestep!r}")
    grid = ddim_grid(backbone.scheduler, num_steps)
    runner = runner or BranchRunner(backbone)
    branches, guidance = cfg_branches(cond, uncond, guidance_scale)
    z = z0.float()
    m = keep = None
    if mask is not None:
        m = as_latent_mask(mask, z)
        keep = (~m).float()
        z = torch.where(m, torch.zeros_like(z), z)  # (1 − m) ⊙ z0, exactly 0 inside
    start = z
    levels = [z.to(trajectory_device or z.device)] if keep_trajectory else None
    bar_ctx = progress_bar(progress or "DDIM inversion", total=grid.num_steps)
    with grad_off(backbone), fp32_unet(backbone), bar_ctx as bar:
        for k in range(1, grid.num_steps + 1):
            t = grid.timesteps[k - 1] if eps_timestep == "current" else grid.timesteps[k]
            if runner.controller is not None:
                runner.controller.set_step(k - 1, t)
            eps = guidance(runner({"x": z}, t, branches), None)["x"]
            z = ddim_move(z, eps, grid.alphas[k - 1], grid.alphas[k], keep=keep)
            if levels is not None:
                levels.append(z.to(trajectory_device or z.device))
            bar.update(1)
    traj = Trajectory(grid, levels) if levels is not None else None
    return Inversion(grid=grid, z0=start, zT=z, trajectory=traj, mask=m, eps_timestep=eps_timestep)


def reconstruct(backbone: Any, inv: Inversion, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                guidance_scale: float = 1.0, runner: BranchRunner | None = None,
                callbacks: Sequence[Callback] = ()) -> torch.Tensor:
    """Sample from ``inv.zT`` along the same grid and conditioning; ≈ inv.z0 (see the module's tolerance)."""
    branches, guidance = cfg_branches(cond, uncond, guidance_scale)
    return sample(backbone, inv.zT, branches, guidance, num_steps=inv.grid.num_steps, runner=runner,
                  callbacks=callbacks, progress="DDIM reconstruction")["x"]
