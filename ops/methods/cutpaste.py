"""CutPaste baseline: paste a real support defect onto a normal image at the target mask.

Choices where the brief and the CutPaste paper (Li et al., CVPR 2021, which pastes random rectangles of the
same image) leave room:

- Source of the paste: the job's reference support anomaly (``needs_reference``). The job does not carry the
  affine that produced its target mask, so it is re-fitted: the reference is resized to the normal image's
  size (as ``ops.masks.targets`` does for the support mask), the centroid of the reference mask is mapped onto
  the target's centroid with isotropic scale sqrt(target area / reference area), and the rotation (a grid of
  ``angle_step`` degrees) and mirror are the ones whose warped reference mask overlaps the target best (IoU).
  For affine targets this recovers the sampler's transform up to the grid step; box targets get the defect
  scaled to the box area.
- Pasted region = the target mask; it is also the output mask. Target pixels the warped reference mask does
  not cover show the reference's own surroundings, which is still foreign content, as in CutPaste.
- Colour jitter of the pasted patch (the paper's ColorJitter): brightness, contrast and saturation factors
  drawn from U(1 - jitter, 1 + jitter) with the job's seed; the only randomness of the method.
- Blending, ``blend="poisson"`` (default): seamless cloning (Pérez et al. 2003) solved on Ω = target mask
  dilated by ``margin`` pixels (Euclidean disk): the guidance field is the pasted patch's gradient everywhere
  in Ω, the normal image is the Dirichlet boundary on ∂Ω, pixels outside Ω are copied unchanged. The ring of
  ``margin`` pixels thus carries the reference's own surroundings, offset to meet the normal image, and the
  defect keeps its contrast against them. (Taking the normal image's gradient in the ring instead would
  erase a defect that fills its target: a uniform patch has no interior gradient. ``cv2.seamlessClone`` was
  not used: on OpenCV 5.0 it shifted small masks by a pixel and erased their content.) ``blend="feather"``: alpha 1 on the
  target, falling linearly to 0 at ``margin`` pixels outside it. Either way the image changes only inside
  the target mask dilated by ``margin``. When Ω has no boundary (the target covers the whole image) the
  patch is copied as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import cv2
import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu

from ops.masks.targets import similarity_matrix
from ops.methods.base import Method, MethodConfig, Progress, no_progress, synthesize_each
from ops.types import Adapter, Synthetic, SynthesisJob


@dataclass
class CutPasteConfig(MethodConfig):
    blend: str = "poisson"  # "poisson" | "feather"
    margin: int = 3  # pixels outside the target mask the blend may touch
    jitter: float = 0.1  # colour jitter amplitude (brightness, contrast, saturation)
    angle_step: float = 10.0  # rotation grid of the reference-to-target fit, degrees


class CutPaste(Method):
    """Real defect region of a support image, re-fitted onto the target mask and Poisson-blended into a normal image."""

    name = "cutpaste"
    config_cls = CutPasteConfig
    needs_backbone = False
    needs_reference = True

    def synthesize(self, backbone, adapter: Adapter, jobs: Sequence[SynthesisJob], cfg: CutPasteConfig,
                   progress: Progress = no_progress) -> Iterator[Synthetic]:
        if cfg.blend not in ("poisson", "feather") or cfg.margin < 0 or not 0 <= cfg.jitter < 1 or cfg.angle_step <= 0:
            raise ValueError(f"cutpaste config: blend must be 'poisson' or 'feather', margin >= 0, 0 <= jitter < 1 and "
                             f"angle_step > 0; got {cfg}")
        def make(job: SynthesisJob) -> tuple[np.ndarray, np.ndarray, dict]:
            image, params = cut_paste(job, cfg)
            return image, job.target_mask.copy(), params

        return synthesize_each(self.name, jobs, make, progress)


def cut_paste(job: SynthesisJob, cfg: CutPasteConfig) -> tuple[np.ndarray, dict]:
    if job.reference is None or job.reference.mask is None or not job.reference.mask.any():
        raise ValueError(f"cutpaste job {job.index}: needs a reference support anomaly with a non-empty mask "
                         f"(reference: {job.reference.source if job.reference else None})")
    normal, target = job.normal.image, job.target_mask
    if not target.any():
        raise ValueError(f"cutpaste job {job.index}: the target mask is empty")
    h, w = target.shape
    ref_img, ref_mask = job.reference.image, job.reference.mask
    if ref_mask.shape != (h, w):
        ref_img = cv2.resize(ref_img, (w, h), interpolation=cv2.INTER_LINEAR)
        ref_mask = cv2.resize(ref_mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    matrix, fit = fit_reference(ref_mask, target, cfg.angle_step)
    patch = cv2.warpAffine(ref_img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    rng = np.random.default_rng(job.seed)
    factors = rng.uniform(1 - cfg.jitter, 1 + cfg.jitter, size=3)
    patch = color_jitter(patch, *factors)
    region = dilate(target, cfg.margin)
    if cfg.blend == "poisson" and not region.all():
        out = poisson_blend(normal, patch, region)
    else:
        out = feather_blend(normal, patch, target, cfg.margin)
    params = dict(fit, brightness=round(float(factors[0]), 6), contrast=round(float(factors[1]), 6),
                  saturation=round(float(factors[2]), 6), blend=cfg.blend, margin=cfg.margin,
                  reference_resized=ref_mask.shape != job.reference.mask.shape)
    return out, params


def fit_reference(ref_mask: np.ndarray, target: np.ndarray, angle_step: float) -> tuple[np.ndarray, dict]:
    """Similarity + mirror taking the reference mask onto the target mask (module doc), with its IoU."""
    h, w = target.shape
    ry, rx = np.nonzero(ref_mask)
    ty, tx = np.nonzero(target)
    src_c, dst_c = np.array([rx.mean(), ry.mean()]), np.array([tx.mean(), ty.mean()])
    scale = float(np.sqrt(len(ty) / len(ry)))
    ref_u8 = ref_mask.astype(np.uint8) * 255
    best = None
    for mirror in (False, True):
        for angle in np.arange(0.0, 360.0, angle_step):
            m = similarity_matrix(src_c, dst_c, float(angle), scale, mirror)
            warped = cv2.warpAffine(ref_u8, m, (w, h), flags=cv2.INTER_LINEAR) > 127
            union = int((warped | target).sum())
            iou = (warped & target).sum() / union
            if best is None or iou > best[0]:
                best = (float(iou), m, float(angle), mirror)
    iou, m, angle, mirror = best
    return m, {"fit_angle": angle, "fit_flip": mirror, "fit_scale": round(scale, 6), "fit_iou": round(iou, 6)}


def color_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    x = image.astype(np.float32) * brightness
    x = (x - x.mean()) * contrast + x.mean()
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - gray[..., None]) * saturation + gray[..., None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def dilate(mask: np.ndarray, margin: int) -> np.ndarray:
    """Pixels within Euclidean distance ``margin`` of the mask (the blend's reach)."""
    if margin <= 0:
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= margin


def feather_blend(normal: np.ndarray, patch: np.ndarray, target: np.ndarray, margin: int) -> np.ndarray:
    dist = ndimage.distance_transform_edt(~target)
    alpha = np.where(dist <= margin, 1.0 - dist / (margin + 1), 0.0)[..., None]
    out = normal.astype(np.float64) * (1 - alpha) + patch.astype(np.float64) * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def poisson_blend(normal: np.ndarray, patch: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Solve the discrete Poisson equation on ``region`` (module doc); pixels outside it are the normal's."""
    h, w = region.shape
    idx = -np.ones((h, w), dtype=np.int64)
    ys, xs = np.nonzero(region)
    idx[ys, xs] = np.arange(len(ys))
    n = len(ys)
    f_star = normal.astype(np.float64)
    g = patch.astype(np.float64)
    diag = np.zeros(n)
    rhs = np.zeros((n, 3))
    rows, cols = [], []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        qy, qx = ys + dy, xs + dx
        ok = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        p, qy, qx = np.flatnonzero(ok), qy[ok], qx[ok]
        py, px = ys[p], xs[p]
        diag[p] += 1
        rhs[p] += g[py, px] - g[qy, qx]
        q_idx = idx[qy, qx]
        inner = q_idx >= 0
        rows.append(p[inner])
        cols.append(q_idx[inner])
        np.add.at(rhs, p[~inner], f_star[qy[~inner], qx[~inner]])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    a = sparse.csc_matrix((np.concatenate([diag, -np.ones(len(rows))]),
                           (np.concatenate([np.arange(n), rows]), np.concatenate([np.arange(n), cols]))), shape=(n, n))
    solution = splu(a).solve(rhs)
    out = normal.copy()
    out[ys, xs] = np.clip(np.rint(solution), 0, 255).astype(np.uint8)
    return out
