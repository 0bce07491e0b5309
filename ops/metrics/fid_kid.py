"""FID (exact, through the smaller set), KID and IS (torchmetrics) on precomputed features.

Features are extracted once per image set by the backbone (:mod:`ops.metrics.inception` or the EfficientNet-Lite0
of :mod:`ops.metrics.features`) and handed to torchmetrics through an identity feature module (torchmetrics
accepts any ``nn.Module`` as ``feature``), so FID, KID and IS share one forward pass per image and torchmetrics
never builds (or downloads) a network of its own.

Small sets (the demo has a handful of real defect images per type):
- FID is computed whenever both sets have >= 2 images, in the backbone's full feature dimension; it is very noisy
  and biased upwards for small n, so ``n_real``/``n_fake`` are recorded beside it.
- KID ``subset_size`` = min(configured size, n_real, n_fake) (torchmetrics requires <= both sets); the size used
  is recorded. KID needs >= 2 per subset.
- IS ``splits`` = min(configured splits, n_fake // 2) (at least 1); recorded. With one split its std is NaN.
torchmetrics draws KID subsets and the IS permutation from torch's global RNG; both run under
``torch.random.fork_rng`` with a fixed seed so results are reproducible and the caller's RNG is untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class _Precomputed(torch.nn.Module):
    """Identity 'feature extractor': the metric's update() receives features instead of images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class SetMetrics:
    fid: float
    kid_mean: float
    kid_std: float
    kid_subset_size: int
    kid_subsets: int
    is_mean: float
    is_std: float
    is_splits: int
    n_real: int
    n_fake: int
    notes: str = ""


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of the two feature sets' Gaussians (unbiased covariances), exactly as torchmetrics'
    FrechetInceptionDistance computes it, in float64.

    tr sqrt(Σ_r Σ_f) is taken through the smaller set: with X the centred features of the set with fewer samples
    (scaled by 1/sqrt(n-1)), the non-zero eigenvalues of Σ_r Σ_f are those of the symmetric n x n matrix
    X Σ_other X^T (eig(AB) = eig(BA)). torchmetrics takes the general eigenvalues of the d x d product instead,
    which costs about a second per call at d = 2048 and dominated the quality stage on small sets; the result is
    the same (tests/test_metrics_offline.py compares them).
    """
    real, fake = real.double(), fake.double()
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs >= 2 images per set, got {real.shape[0]} real and {fake.shape[0]} generated")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    xr = (real - mu_r) / math.sqrt(real.shape[0] - 1)
    xf = (fake - mu_f) / math.sqrt(fake.shape[0] - 1)
    small, other = (xr, xf) if xr.shape[0] <= xf.shape[0] else (xf, xr)
    inner = small @ other.T  # (n_small, n_other): X_s Σ_o X_s^T = (X_s X_o^T)(X_s X_o^T)^T
    eig = torch.linalg.eigvalsh(inner @ inner.T).clamp_min(0)
    trace_sqrt = eig.sqrt().sum()
    return float((mu_r - mu_f).square().sum() + xr.square().sum() + xf.square().sum() - 2 * trace_sqrt)


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int, seed: int) -> tuple[float, float]:
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features in buffer": intended, sets are small
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets,
                                         subset_size=subset_size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int, seed: int) -> tuple[float, float]:
    import warnings

    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # one split has no spread: torch's std warns "degrees of freedom <= 0" and returns NaN; report the
        # spread as undefined (NaN, with a note from set_metrics) instead of logging a warning per partition
        if splits < 2:
            warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std) if splits >= 2 else math.nan


def set_metrics(real_feats: torch.Tensor, fake_feats: torch.Tensor, fake_logits: torch.Tensor, *,
                kid_subset_size: int = 1000, kid_subsets: int = 100, is_splits: int = 10,
                seed: int = 0) -> SetMetrics:
    n_real, n_fake = int(real_feats.shape[0]), int(fake_feats.shape[0])
    nan = math.nan
    notes = []
    f = kid_m = kid_s = nan
    subset = min(kid_subset_size, n_real, n_fake)
    if n_real >= 2 and n_fake >= 2:
        f = fid(real_feats, fake_feats)
        kid_m, kid_s = kid(real_feats, fake_feats, subset, kid_subsets, seed)
    else:
        notes.append(f"FID/KID need >= 2 real and >= 2 generated images (have {n_real} real, {n_fake} generated)")
        subset = 0
    splits = max(1, min(is_splits, n_fake // 2))
    is_m = is_s = nan
    if n_fake >= 1:
        is_m, is_s = inception_score(fake_logits, splits, seed)
        if splits < 2:
            notes.append(f"IS spread (is_std) undefined: {n_fake} generated images make one split; >= 4 give two")
    else:
        splits = 0
    return SetMetrics(fid=f, kid_mean=kid_m, kid_std=kid_s, kid_subset_size=subset, kid_subsets=kid_subsets,
                      is_mean=is_m, is_std=is_s, is_splits=splits, n_real=n_real, n_fake=n_fake,
                      notes="; ".join(notes))
