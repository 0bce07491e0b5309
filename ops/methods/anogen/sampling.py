"""AnoGen stage 2: box-conditioned generation on a normal image (papers/anogen.md, section 4.2).

For a normal image I_n with latent z_0^n and a box M_box, at every DDIM step

    z_t = z_t^n ⊙ (1 − M_box) + z'_t ⊙ M_box,    z_t^n = sqrt(ᾱ_t) z_0^n + sqrt(1 − ᾱ_t) ε_n

where z'_t is the sampler's latent after the step, conditioned on the prompt with the learned token, and z_t^n is
the q-sample (forward noising) of the normal latent with ONE ε_n per job — not a DDIM inversion, as the paper
says. Built on the toolkit: ``blend.forward_noised`` + ``blend.LatentBlend`` (a ``torch.where``, so outside the
box the latent is bit-identical to z_t^n after every step and equal to z_0^n at the end) and ``ddim.sample``.

Choices where the paper is vague:
- Noise: the job seed drives one CPU ``torch.Generator``; its first draw is the generated stream's start z'_T,
  its second ε_n. The start is blended too (inside the box: z'_T, outside: z_T^n).
- Box on the latent grid: the toolkit's "any" rule (a cell touched by the box is generated), so no box pixel is
  frozen to the background; the image is stretched to the model's square resolution like every method here.
- Classifier-free guidance with the empty prompt as the unconditional branch, as LDM's text-to-image sampler
  that the authors' script runs (scale 10 there); ``guidance`` = 1 turns it off. Both branches are one
  batched UNet call.
- Output image: the decoded latent, resized to the normal image's size, pasted onto the ORIGINAL normal pixels
  inside the box only: outside the box the output is the normal image to the bit (the VAE's reconstruction
  error stays out of the background, and the box stays an honest weak label).
- Jobs of one defect type are sampled in batches (``batch`` latents per UNet call and branch); each job keeps its
  own seeded noise, so a job's result does not depend on the batch it ran in beyond float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ops.diffusion.blend import LatentBlend, Trajectory, forward_noised, latent_mask
from ops.diffusion.ddim import Callback, cfg_branches, ddim_grid, sample
from ops.diffusion.vae import decode, encode


@dataclass
class Generated:
    images: np.ndarray  # uint8 (B, H, W, 3): composited onto the normal images outside the boxes
    decoded: np.ndarray  # uint8 (B, H, W, 3): the whole decoded latents (for inspection)
    z0: torch.Tensor  # final latents (B, C, h, w)
    latent_box: torch.Tensor  # bool (B, 1, h, w)
    normal: Trajectory  # z_t^n per level, batched


def job_noise(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(z'_T, ε_n) of one job, float32 (1, C, h, w) on the CPU, from its seed (module doc)."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    start = torch.randn((1, *shape), generator=g)
    eps = torch.randn((1, *shape), generator=g)
    return start, eps


def generate(backbone: Any, cond: torch.Tensor, uncond: torch.Tensor | None, normals: Sequence[np.ndarray],
             boxes: Sequence[np.ndarray], seeds: Sequence[int], steps: int, guidance: float,
             callbacks: Sequence[Callback] = ()) -> Generated:
    """Box-blended sampling for a batch of jobs that share one conditioning (same defect type)."""
    if not (len(normals) == len(boxes) == len(seeds)) or not len(normals):
        raise ValueError(f"need one box and one seed per normal image, got {len(normals)}/{len(boxes)}/{len(seeds)}")
    for img, box in zip(normals, boxes):
        if box.shape != img.shape[:2] or box.dtype != bool or not box.any():
            raise ValueError(f"box mask {box.dtype} {box.shape} must be a non-empty bool mask of the normal image's "
                             f"size {img.shape[:2]}")
    same = len({img.shape for img in normals}) == 1  # one VAE call for the batch when the sizes agree
    z0n = (encode(backbone, np.stack(normals)) if same else torch.cat([encode(backbone, img) for img in normals]))
    z0n = z0n.float()
    noise = [job_noise(s, tuple(z0n.shape[1:])) for s in seeds]
    start = torch.cat([n[0] for n in noise]).to(z0n.device)
    eps = torch.cat([n[1] for n in noise]).to(z0n.device)
    grid = ddim_grid(backbone.scheduler, steps)
    traj = forward_noised(grid, z0n, eps)
    size = tuple(z0n.shape[-2:])
    box = torch.cat([latent_mask(b, size, "any") for b in boxes]).to(z0n.device)
    blend = LatentBlend(box, traj)
    branches, rule = cfg_branches(cond, uncond, guidance)
    out = sample(backbone, blend.start(start, grid), branches, rule, num_steps=steps,
                 callbacks=[blend, *callbacks], progress="anogen sampling")["x"]
    if same:
        decoded = list(decode(backbone, out, size=normals[0].shape[:2]))
    else:
        decoded = [decode(backbone, out[i:i + 1], size=img.shape[:2])[0] for i, img in enumerate(normals)]
    images = [np.where(b[..., None], d, img) for d, img, b in zip(decoded, normals, boxes)]
    return Generated(images=np.stack(images), decoded=np.stack(decoded), z0=out, latent_box=box, normal=traj)
