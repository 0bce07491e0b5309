"""Locating user-supplied metric weight files, never downloading them (DESIGN §5).

Metric backbones whose weights are not on PyPI (InceptionV3 of torch-fidelity, the torchvision AlexNet / VGG16
trunks of LPIPS) are used only when their file is already on disk. Where a file is looked for, in this order:

1. the configured weights folder (``weights_dir`` argument, else ``$ANOMALY_FORGE_WEIGHTS``), directly or under
   ``hub/checkpoints/`` inside it, so a copy of a whole ``$TORCH_HOME`` works as a weights folder too;
2. ``torch.hub.get_dir()/checkpoints`` — i.e. ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch``),
   which is where torchvision and torch-fidelity would have cached the file after an online run.

File names are the upstream ones (taken from torchvision's weight enums and torch-fidelity's URL, not typed by
hand where a library states them), so a file cached by an online run is found as is. A missing file yields a
:class:`Missing` with a message naming the file, the places searched and how to provide it; callers record that
message as the reason a metric was skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "ANOMALY_FORGE_WEIGHTS"


def _basename(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def inception_file() -> str:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:  # the name is still useful in the message that says torch-fidelity is missing
        return "weights-inception-2015-12-05-6726825d.pth"
    return _basename(URL_INCEPTION_V3)


def alexnet_file() -> str:
    from torchvision.models import AlexNet_Weights

    return _basename(AlexNet_Weights.IMAGENET1K_V1.url)


def vgg16_file() -> str:
    from torchvision.models import VGG16_Weights

    return _basename(VGG16_Weights.IMAGENET1K_V1.url)


@dataclass(frozen=True)
class Missing:
    """Why a weight file could not be used; ``str()`` is the message recorded in the manifest."""

    what: str
    filename: str
    searched: tuple[str, ...]

    def __str__(self) -> str:
        return (f"{self.what}: weight file {self.filename!r} not found (searched: {', '.join(self.searched)}); "
                f"nothing is downloaded at run time — copy the file into $TORCH_HOME/hub/checkpoints/ or into the "
                f"weights folder (settings weights_dir or ${ENV_VAR})")


def search_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    import torch

    dirs: list[Path] = []
    configured = weights_dir if weights_dir not in (None, "") else os.environ.get(ENV_VAR, "")
    if configured:
        base = Path(configured).expanduser()
        dirs += [base, base / "hub" / "checkpoints"]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def find_weight_file(filename: str, what: str,
                     weights_dir: str | os.PathLike | None = None) -> Path | Missing:
    dirs = search_dirs(weights_dir)
    for d in dirs:
        p = d / filename
        if p.is_file() and p.stat().st_size > 0:
            return p
    return Missing(what=what, filename=filename, searched=tuple(str(d) for d in dirs))
