"""CADiff's CTP regularisers (the CADiff paper, eq. 5-7): the balanced localisation loss and NT-Xent.

L = L_CALDM + γ·L_loc + β·L_contrastive (eq. 8). L_CALDM is the plain denoising loss (``trainer``); the two
regularisers live here as pure functions of tensors so they can be tested without a model.

Choices where the paper is vague:
- L_loc (eq. 5): for every cross-attention layer l and every learnable token i of a sample, the token's map
  A^{i,l} (time-averaged, see ``trainer``) is compared with its binary mask M^{i,l} (the anomaly mask for the
  anomaly token, the inverse of the union of the sample's anomaly masks for the context token, both downsampled
  to the layer's grid). "Balanced" = the squared error is averaged separately inside and outside the mask and
  the two means are averaged (½·mean_in + ½·mean_out), so a defect covering 2 % of the grid weighs as much as its
  background; a side that is empty on the grid contributes alone. Eq. 5 as printed puts the sum over tokens
  INSIDE the norm (‖(1/n)Σ_i (A^i − M^i)‖²), which lets one token's excess cancel another's deficit (the loss
  could be 0 with both maps wrong); we take the norm per token and then the mean over tokens (1/n Σ_i ‖·‖²),
  the mean over samples, and the sum over layers as eq. 5 does.
- NT-Xent (eq. 6-7): data points are (view, token) pairs with a concept label; positives share the label and
  come from different views, every other data point (other concepts of the same view included, as the paper's
  "other different concepts in the same mini-batch") is in the denominator; only the anchor itself is left out.
  Eq. 7's Σ_j runs over j ≠ i (l_{i,i} would compare a point with itself) and keeps its 1/(C·B) normaliser:
  the sum of l over positive pairs divided by the number of anchors (C·B when every view holds every concept).
  Anchors without a positive in the batch contribute nothing and are not counted.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def balanced_l2(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., h, w) maps vs binary masks of the same shape -> (...) balanced squared error per map."""
    err = (attn.float() - mask.float()) ** 2
    m = mask.bool()
    inside = m.flatten(-2)
    e = err.flatten(-2)
    n_in = inside.sum(-1)
    n_out = (~inside).sum(-1)
    mean_in = (e * inside).sum(-1) / n_in.clamp_min(1)
    mean_out = (e * ~inside).sum(-1) / n_out.clamp_min(1)
    both = (n_in > 0) & (n_out > 0)
    return torch.where(both, 0.5 * (mean_in + mean_out), torch.where(n_in > 0, mean_in, mean_out))


def loc_loss(maps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 5 (see the module doc): ``maps[l]`` and ``masks[l]`` are (B, h_l, w_l, n) per layer l."""
    if len(maps) != len(masks) or not maps:
        raise ValueError(f"need one mask tensor per attention layer, got {len(maps)} maps and {len(masks)} masks")
    total = maps[0].new_zeros((), dtype=torch.float32)
    for a, m in zip(maps, masks):
        if a.shape != m.shape:
            raise ValueError(f"attention maps {tuple(a.shape)} and masks {tuple(m.shape)} differ in shape")
        per = balanced_l2(a.movedim(-1, 1), m.movedim(-1, 1))  # (B, n)
        total = total + per.mean()
    return total


def nt_xent(v: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 6-7 over data points ``v`` (N, D) with concept ``labels`` (N,); see the module doc."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if v.ndim != 2 or labels.shape != (v.shape[0],):
        raise ValueError(f"need v (N, D) and labels (N,), got {tuple(v.shape)} and {tuple(labels.shape)}")
    z = F.normalize(v.float(), dim=-1)
    sim = z @ z.T / temperature
    n = v.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=v.device)
    log_den = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    anchors = positive.any(1)
    if not anchors.any():
        return sim.new_zeros(())
    loss = -(sim - log_den)[positive].sum()
    return loss / anchors.sum()
