"""Background preservation: how much a synthetic image changed its source normal image OUTSIDE the defect.

The background region is the complement of (target mask | final mask) dilated by ``margin`` pixels: methods may
blend a few pixels past the mask edge (cutpaste feathering, latent-space blending at 1/8 resolution), and that
seam belongs to the defect, not to the background. Choices where no spec exists:
- PSNR over background pixels only (MSE on 0..255 RGB); identical backgrounds would be +inf, reported as
  ``psnr_cap`` (100 dB) so that means stay finite.
- SSIM (scikit-image defaults: uniform 7x7 windows, ``data_range=255``, per channel) of the composite
  ``where(background, synthetic, normal)`` against the normal image, averaged over background pixels: the defect
  region is made identical, so windows straddling the border only see background changes.
- Perceptual distance (LPIPS or the EfficientNet-Lite0 fallback) of that same composite against the normal image.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def background_region(target: np.ndarray, final: np.ndarray | None, margin: int) -> np.ndarray:
    defect = target.astype(bool) | (final.astype(bool) if final is not None else False)
    if margin > 0:
        defect = ndimage.binary_dilation(defect, structure=np.ones((3, 3), bool), iterations=margin)
    return ~defect


def composite(synthetic: np.ndarray, normal: np.ndarray, background: np.ndarray) -> np.ndarray:
    return np.where(background[..., None], synthetic, normal).astype(np.uint8)


def psnr_ssim(synthetic: np.ndarray, normal: np.ndarray, background: np.ndarray,
              psnr_cap: float = 100.0) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    if synthetic.shape != normal.shape:
        raise ValueError(f"synthetic image {synthetic.shape} and its normal image {normal.shape} differ in size")
    if not background.any():
        return float("nan"), float("nan")
    diff = synthetic.astype(np.float64)[background] - normal.astype(np.float64)[background]
    mse = float(np.mean(diff ** 2))
    psnr = psnr_cap if mse == 0 else min(psnr_cap, 10.0 * np.log10(255.0 ** 2 / mse))
    comp = composite(synthetic, normal, background)
    _, smap = structural_similarity(comp, normal, data_range=255, channel_axis=2, full=True)
    return float(psnr), float(smap.mean(axis=2)[background].mean())
