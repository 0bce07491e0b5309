"""forge-base: AnomalyForge's own small latent diffusion model, the demo's default backbone.

What it is: a Stable-Diffusion-LAYOUT model (AutoencoderKL, UNet2DConditionModel with self- and cross-attention at
32/16/8, CLIPTextModel with CLIP's real tokenizer, SD's DDIM schedule) of about 14 M parameters, trained by
``anomaly-forge train-base`` (``ops.forge_base.train``) on this project's CPU from a few CC0 / public-domain
photographs bundled with scikit-image plus procedural textures and procedural surface marks
(``ops.forge_base.data``). What it is not: Stable Diffusion, or a model of any real product. It is good enough to
show what each generation method does (textures, marks where a method asks for one); its numbers are figures of
this small model, never of the methods at SD scale.

It ships as an ordinary diffusers folder (``model/`` beside this file, float16 safetensors, package data) and
``load_backbone("forge-base")`` loads that folder through the same local-folder path as a real SD checkpoint.
``model/forge_base.json`` records the training command, its arguments and every file's sha256.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

NAME = "forge-base"
META_FILE = "forge_base.json"


def model_dir() -> Path:
    """The shipped forge-base diffusers folder; a clear error if the package was installed without it."""
    path = Path(__file__).resolve().parent / "model"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"forge-base weights are missing: {path}/model_index.json does not exist. Reinstall the package "
            f"(the weights are package data), or rebuild them with `anomaly-forge train-base --out {path}`, "
            f"or choose another backbone (ANOMALY_FORGE_MODEL=tiny or a diffusers folder)")
    return path


def recorded() -> dict:
    """The training record (command, arguments, sha256 of every file) shipped with the weights."""
    return json.loads((model_dir() / META_FILE).read_text())


def verify(path: Path | None = None) -> list[str]:
    """Files whose sha256 differs from the record (empty list: the folder is exactly what was trained)."""
    path = model_dir() if path is None else Path(path)
    record = json.loads((path / META_FILE).read_text())["files"]
    bad = [rel for rel, digest in record.items()
           if not (path / rel).is_file() or hashlib.sha256((path / rel).read_bytes()).hexdigest() != digest]
    return sorted(bad)
