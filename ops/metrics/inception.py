"""The literature InceptionV3 (torch-fidelity's port of the TF FID network), loaded only from a local file.

torchmetrics' ``FrechetInceptionDistance``/``KernelInceptionDistance``/``InceptionScore`` build this network
from torch-fidelity and, given no weights path, download it (``InceptionScore`` and ``KernelInceptionDistance``
do not even forward a weights path). So the network is built here, with the file located by
:mod:`ops.metrics.weights` passed explicitly, and handed to torchmetrics as a feature module; when torch-fidelity
or the file is missing the caller gets the reason instead of a network, and nothing is downloaded.
One forward pass yields both the 2048-d pool features (FID/KID) and the 1008 "unbiased" logits (IS), so each
image goes through the network once. Input: uint8 images of any size, resized to 299 inside the network exactly as
torchmetrics' default ``FrechetInceptionDistance(feature=2048)`` does (antialiased bilinear).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ops.metrics.features import resolve_device
from ops.metrics.weights import Missing, find_weight_file, inception_file


def load_inception(weights_dir=None, device: str = "cpu") -> "InceptionFeatures | str":
    """The verified network, or a message saying why it cannot be used."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return (f"InceptionV3: the torch-fidelity package is not installed (pip install torch-fidelity==0.4.0; it "
                f"holds the network definition) and its weight file {inception_file()!r} must be in "
                f"$TORCH_HOME/hub/checkpoints/ or the weights folder")
    found = find_weight_file(inception_file(), "InceptionV3 (torch-fidelity FID network)", weights_dir)
    if isinstance(found, Missing):
        return str(found)
    return InceptionFeatures(path=str(found), device=device)


@dataclass
class InceptionFeatures:
    path: str
    device: str = "cpu"
    batch_size: int = 16
    model: torch.nn.Module = field(init=False, repr=False)
    name: str = field(init=False, default="")

    def __post_init__(self) -> None:
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                        feature_extractor_weights_path=self.path)
        raw = torch.load(self.path, map_location="cpu", weights_only=False)
        state = self.model.state_dict()
        bad = [k for k, v in raw.items() if k not in state or not torch.equal(state[k].cpu(), v)]
        if bad:
            raise RuntimeError(f"{self.path}: {len(bad)} tensors differ after loading the InceptionV3 ({bad[0]})")
        self.model.to(resolve_device(self.device))
        self.name = f"inception-v3-compat (torch-fidelity, file {self.path})"

    def _both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # NoTrainInceptionV3.forward returns only the first requested feature; its torch-fidelity forward returns
        # all of them from one pass (same preprocessing as torchmetrics' default FID: antialiased resize to 299)
        f, lg = self.model._torch_fidelity_forward(x)
        return f.reshape(x.shape[0], -1), lg.reshape(x.shape[0], -1)

    @torch.no_grad()
    def pooled_and_logits(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(self.model.parameters()).device
        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            if len({im.shape for im in chunk}) > 1:  # the network resizes any size, but a batch must stack
                parts = [self._both(torch.from_numpy(im).permute(2, 0, 1)[None].to(dev)) for im in chunk]
                f, lg = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            else:
                f, lg = self._both(torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2).contiguous().to(dev))
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        return torch.cat(feats), torch.cat(logits)
