"""APO inference: hierarchical guidance and deviation-guided localization (papers/apo.md, "Key Designs" 3).

    ε̂ = ε_ref(z_t) + s_text (ε_ref(z_t, c) − ε_ref(z_t)) + s_align (ε_θ(z_t, c) − ε_ref(z_t, c))

The localization map is the alignment deviation itself: ||Δ_align|| per step, aggregated over steps with the TACA
weights k(t), upsampled bilinearly, Gaussian-smoothed, normalised. Choices where the paper is vague:

- ||Δ_align|| is the L2 norm over latent channels at each latent pixel (a spatial map per step).
- Step weights are w_t = k(t) / Σ_s k(s) over the sampled steps, k(t) the TACA rank of that step: steps where
  the adapter has more capacity (low noise) count more. If every k(t) is 0 the plain mean is used.
- Normalisation divides by the map's maximum (not min-max): no deviation stays exactly 0, so an adapter that
  changes nothing yields an all-zero map and an empty mask instead of amplified float noise.
- Smoothing σ is a fraction of the image's shorter side (default 0.02, ~2.5 px at 128 px, ~10 px at 512 px), with
  reflect padding; the mask is ``map > threshold`` (default 0.5 of the peak).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def hierarchical_guidance(eps_uncond: torch.Tensor, eps_text: torch.Tensor, eps_policy: torch.Tensor,
                          s_text: float, s_align: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ε̂ and Δ_align. With s_align = 0 the sum is bit-identical to classifier-free guidance at scale s_text
    (diffusers computes ``uncond + scale * (text - uncond)`` in the same order)."""
    delta_align = eps_policy - eps_text
    eps_hat = eps_uncond + s_text * (eps_text - eps_uncond)
    if s_align != 0:
        eps_hat = eps_hat + s_align * delta_align
    return eps_hat, delta_align


def deviation_norm(delta_align: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w) channel L2 norm, float32."""
    return delta_align.float().pow(2).sum(dim=1).sqrt()


def step_weights(ranks: Sequence[int]) -> np.ndarray:
    k = np.asarray(ranks, dtype=np.float64)
    if k.size == 0:
        raise ValueError("no sampling steps to aggregate")
    total = k.sum()
    return k / total if total > 0 else np.full(k.size, 1.0 / k.size)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (N, 1, H, W) tensor with reflect padding (identity for sigma <= 0)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def localization_map(deviations: Sequence[torch.Tensor], ranks: Sequence[int], size: tuple[int, int],
                     sigma_frac: float = 0.02) -> np.ndarray:
    """Aggregate per-step (h, w) deviation maps into a float32 (H, W) map in [0, 1]."""
    if len(deviations) != len(ranks):
        raise ValueError(f"{len(deviations)} deviation maps but {len(ranks)} step ranks")
    w = torch.as_tensor(step_weights(ranks), dtype=torch.float32)
    stacked = torch.stack([d.detach().float().cpu() for d in deviations])  # (S, h, w)
    agg = (w.view(-1, 1, 1) * stacked).sum(dim=0)[None, None]
    up = F.interpolate(agg, size=tuple(size), mode="bilinear", align_corners=False)
    smooth = gaussian_blur(up, sigma_frac * min(size))[0, 0].clamp_min(0)
    peak = float(smooth.max())
    if not math.isfinite(peak):
        raise FloatingPointError("non-finite alignment deviation; the adapter or the latents diverged")
    if peak <= 0:
        return np.zeros(tuple(size), dtype=np.float32)
    return (smooth / peak).numpy().astype(np.float32)


def threshold_map(loc: np.ndarray, threshold: float) -> np.ndarray:
    return np.asarray(loc > threshold, dtype=bool)


def refine_target_mask(target: np.ndarray, loc: np.ndarray, threshold: float,
                       min_keep: float) -> tuple[np.ndarray, bool]:
    """Placed mode's final mask: the target mask where the localization map exceeds ``threshold``.

    The map is renormalised inside the target (the defect was painted only there). If fewer than ``min_keep`` of
    the target pixels survive (e.g. an untrained adapter that deviates everywhere alike) the target mask is kept
    unchanged; the second return value says which happened and is recorded in the row's params.
    """
    target = np.asarray(target, dtype=bool)
    inside = loc[target]
    if inside.size == 0 or float(inside.max()) <= 0:
        return target.copy(), False
    refined = target & (loc / float(inside.max()) > threshold)
    if refined.sum() < min_keep * target.sum():
        return target.copy(), False
    return refined, True
