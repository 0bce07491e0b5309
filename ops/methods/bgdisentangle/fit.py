"""Training one bg-disentangle adapter (one category x defect type) with eq. 5-7, resumable.

Files under ``dt_dir``: the adapter - ``pytorch_lora_weights.safetensors`` (``adapter="lora"``, diffusers' LoRA
format, ``pipe.load_lora_weights`` reads it) or ``unet/`` (``adapter="full"``, a diffusers
``UNet2DConditionModel`` folder, ``UNet2DConditionModel.from_pretrained`` reads it) - then ``adapter.json``
(prompts, training options, config hash, losses; written last, its presence marks a finished adapter),
``run.json`` (the hash the checkpoints belong to) and ``checkpoints/`` (``ops.diffusion.training`` resume state).

Choices:
- Latents: VAE posterior means at ``backbone.resolution``; masks: each support mask on the latent grid by the
  "any" rule. The whole support of the defect type is the training set; each step draws ``batch_size`` of them.
- ``adapter="lora"`` (default): rank-r LoRA on the attention projections of the shared UNet, removed again
  after training (also on a crash). ``adapter="full"``: the paper's DreamBooth-style fine-tuning of every UNet
  weight, on a private deep copy (the shared backbone is never changed); checkpoints then hold the whole UNet.
- The config hash covers the training options, the prompts, the backbone and the exact support pixels AND masks:
  a changed mask retrains; checkpoints of another hash are deleted rather than resumed.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ops.atomic import write_bytes_atomic
from ops.diffusion import lora
from ops.diffusion.blend import latent_mask
from ops.diffusion.training import train
from ops.diffusion.vae import encode
from ops.methods.base import Progress, backbone_identity, read_adapter_record, training_digest
from ops.methods.bgdisentangle.conditioning import build, render
from ops.methods.bgdisentangle.loss import loss_batch
from ops.types import Sample

ADAPTER_NAME = "bgdisentangle"
FORMAT_VERSION = 1
INFO_FILE = "adapter.json"
UNET_DIR = "unet"
TRAIN_FIELDS = ("def_prompt", "m_prompt", "bg_prompt", "adapter", "rank", "lora_layers", "train_steps", "lr",
                "batch_size", "seed")


def config_hash(cfg: Any, backbone: Any, samples: Sequence[Sample]) -> str:
    """What makes two trainings the same: training options, the backbone, the exact support pixels and masks."""
    return training_digest([{f: getattr(cfg, f) for f in TRAIN_FIELDS}, backbone_identity(backbone, FORMAT_VERSION)],
                           samples, masks=True)


def read_info(dt_dir: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    return read_adapter_record(Path(dt_dir) / INFO_FILE, "bgdisentangle", missing_ok)


def check_plain_unet(unet: Any) -> None:
    names = sorted(getattr(unet, "peft_config", {}) or {})
    if names:
        raise RuntimeError(f"the backbone's UNet already carries LoRA adapter(s) {names}; bgdisentangle trains and "
                           f"samples its own adapter on the plain model. Remove them first "
                           f"(ops.diffusion.lora.remove_lora) or use a private backbone "
                           f"(load_backbone(..., cache=False))")


def support_tensors(backbone: Any, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    latents = torch.cat([encode(backbone, s.image) for s in samples]).float()
    hw = tuple(latents.shape[-2:])
    masks = torch.cat([latent_mask(s.mask, hw, rule="any") for s in samples]).to(latents.device)
    empty = [s.source or s.image_id for s, m in zip(samples, masks) if not m.any()]
    if empty:
        raise ValueError(f"{empty[0]}: empty defect mask; bgdisentangle's matching loss needs the defect area "
                         f"(check the ground-truth mask file)")
    return latents, masks


def fit_one(backbone: Any, category: str, dt: str, samples: list[Sample], cfg: Any, dt_dir: Path,
            progress: Progress) -> dict[str, Any]:
    digest = config_hash(cfg, backbone, samples)
    done = read_info(dt_dir, missing_ok=True)
    if done is not None and done.get("config_hash") == digest and (dt_dir / done.get("weights", "")).exists():
        return {**done, "skipped": True}
    run_file = dt_dir / "run.json"
    if run_file.is_file() and json.loads(run_file.read_text()).get("config_hash") != digest:
        shutil.rmtree(dt_dir / "checkpoints", ignore_errors=True)  # never resume another run's state
    (dt_dir / INFO_FILE).unlink(missing_ok=True)
    write_bytes_atomic(run_file, json.dumps({"config_hash": digest}).encode())

    prompts = {k: render(getattr(cfg, k), category, dt) for k in ("def_prompt", "m_prompt", "bg_prompt")}
    cond = build(backbone, prompts["def_prompt"], prompts["m_prompt"], prompts["bg_prompt"])
    latents, masks = support_tensors(backbone, samples)
    scheduler = backbone.scheduler
    desc = f"bgdisentangle {category}/{dt}"
    with _trainable_unet(backbone, cfg) as (unet, params):
        def loss_fn(_step: int, rng: torch.Generator) -> torch.Tensor:
            return loss_batch(unet, scheduler, latents, masks, cond, rng, cfg.batch_size)

        result = train(params, loss_fn, cfg.train_steps, cfg.lr, ckpt_dir=dt_dir / "checkpoints",
                       ckpt_every=cfg.ckpt_every, seed=cfg.seed, progress=progress, frozen_modules=[unet], desc=desc)
        weights = _save(unet, cfg.adapter, dt_dir)
    info = {"format": FORMAT_VERSION, "config_hash": digest, **prompts, "def_tokens": list(cond.def_tokens),
            "category": category, "defect_type": dt, "adapter": cfg.adapter, "rank": cfg.rank,
            "train_steps": cfg.train_steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "T": int(scheduler.config.num_train_timesteps), "model_id": backbone.model_id,
            "resolution": backbone.resolution, "support_ids": sorted(s.image_id for s in samples),
            "losses": result.losses, "resumed_from": result.resumed_from, "seconds": result.seconds,
            "weights": weights}
    write_bytes_atomic(dt_dir / INFO_FILE, json.dumps(info, indent=1).encode())
    return {**info, "skipped": False}


@contextmanager
def _trainable_unet(backbone: Any, cfg: Any) -> Iterator[tuple[Any, list[torch.nn.Parameter]]]:
    if cfg.adapter == "full":
        check_plain_unet(backbone.unet)
        unet = copy.deepcopy(backbone.unet)
        # a LoRA deleted from the shared UNet leaves empty peft wrappers (``base_layer``); the copy must save plain
        # diffusers keys, so the wrappers go
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(unet)
        unet.requires_grad_(True)
        yield unet, list(unet.parameters())
        return
    check_plain_unet(backbone.unet)
    params = lora.add_lora(backbone.unet, rank=cfg.rank, target_modules=lora.lora_targets(cfg.lora_layers),
                           seed=cfg.seed, adapter_name=ADAPTER_NAME)
    try:
        yield backbone.unet, params
    finally:
        lora.remove_lora(backbone.unet, ADAPTER_NAME)


def _save(unet: Any, kind: str, dt_dir: Path) -> str:
    if kind == "lora":
        return lora.save_lora(unet, dt_dir, adapter_name=ADAPTER_NAME).name
    dt_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unet-", dir=dt_dir))
    try:
        unet.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(dt_dir / UNET_DIR, ignore_errors=True)
        tmp.rename(dt_dir / UNET_DIR)  # a finished folder appears at once; adapter.json is written after it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return UNET_DIR


@contextmanager
def adapted(backbone: Any, info: dict[str, Any], dt_dir: Path) -> Iterator[Any]:
    """The backbone with this adapter: the LoRA loaded into the shared UNet (removed after), or a backbone copy
    holding the fine-tuned UNet."""
    if info["adapter"] == "full":
        from diffusers import UNet2DConditionModel

        from ops.diffusion.backbone import set_attention_backend

        unet = UNet2DConditionModel.from_pretrained(str(dt_dir / UNET_DIR), torch_dtype=backbone.dtype)
        unet = unet.to(backbone.device)
        unet.requires_grad_(False).eval()
        set_attention_backend(unet, backbone.attention)
        yield replace(backbone, unet=unet)
        return
    check_plain_unet(backbone.unet)
    lora.load_lora(backbone.unet, dt_dir / info["weights"], adapter_name=ADAPTER_NAME)
    try:
        yield backbone
    finally:
        lora.remove_lora(backbone.unet, ADAPTER_NAME)
