"""LoRA on the UNet's attention projections (peft), saved in the format ``pipe.load_lora_weights`` reads,
with switches a method needs to get the reference and the adapted prediction from ONE UNet.

Choices where the brief or the libraries leave room:
- Injection goes through diffusers' ``unet.add_adapter(peft.LoraConfig)`` (what diffusers' own
  ``train_text_to_image_lora.py`` does) on ``to_q``, ``to_k``, ``to_v``, ``to_out.0``. ``init="gaussian"``
  (A ~ N(0, 1/r), B = 0, diffusers' scripts) is the default; peft's ``True`` (Kaiming-uniform A) is allowed.
  Either way B = 0, so a fresh adapter leaves the UNet's output bit-identical. ``alpha`` defaults to ``rank``
  (scale 1). A is drawn under ``seed`` inside ``torch.random.fork_rng``: the same seed gives the same
  adapter, and the caller's global RNG stream is not advanced (resumable training depends on that).
- ``add_lora`` freezes every base UNet parameter (``requires_grad_(False)``) before injecting: the only
  trainable tensors afterwards are the LoRA matrices it returns.
- Saving: ``StableDiffusionPipeline.save_lora_weights`` with ``convert_state_dict_to_diffusers(
  get_peft_model_state_dict(unet))`` and the adapter's ``LoraConfig`` as ``unet_lora_adapter_metadata`` (so a
  rank != alpha survives the round trip). diffusers writes non-atomically, so it writes into a temporary folder
  beside the target and the finished bytes are then moved into place with ``ops.atomic``.
- ``lora_disabled`` uses peft's per-layer ``enable_adapters(False)`` (the base layer alone runs, so the output
  is bit-identical to the UNet without LoRA). peft flips ``requires_grad`` of the LoRA weights when toggling;
  the context restores every flag it found, so a training loop's trainable set is unchanged afterwards.
- Per-sample gates (``lora_gates``): a forward hook on every ``lora_A`` module multiplies the LoRA hidden
  activation ``A·x`` (last dim = rank for Linear layers, dim 1 for Conv layers) by a per-sample factor
  ``scale[b] * [rank index < rank_k[b]]`` before ``B``. This gives one batched UNet call with mixed branches
  (scale 0 = reference, 1 = adapted) and TACA's rank gate (``ops.diffusion.taca``) with the same code. The
  batch dimension of every LoRA input is the UNet's batch (diffusers' attention processors keep batch first),
  which the hook checks. The gates apply to every adapter of the UNet. With gradient checkpointing the
  backward pass re-runs the forward, so call ``backward()`` inside the context.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ops.atomic import canonical_safetensors, write_bytes_atomic

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Named target sets a method's ``lora_layers`` option picks from. "attention" is SD LoRA practice (and what the
# papers train); "attention+conv+ff" adds the transformer blocks' projections and feed-forward layers and the
# ResNet blocks' convolutions: on a small, weakly trained base the attention projections alone rarely move the
# sample towards the support defect, while the wider set can (issue 10's measurement; the demo's forge-base
# presets use it).
LORA_LAYER_SETS: dict[str, tuple[str, ...]] = {
    "attention": LORA_TARGETS,
    "attention+conv+ff": LORA_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"),
}


def lora_targets(layers: str) -> tuple[str, ...]:
    """The module-name suffixes of a named LoRA layer set (``LORA_LAYER_SETS``)."""
    if layers not in LORA_LAYER_SETS:
        raise ValueError(f"unknown LoRA layer set {layers!r}; use one of {sorted(LORA_LAYER_SETS)}")
    return LORA_LAYER_SETS[layers]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name for load_lora_weights


def _lora_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


def _require_lora(unet: nn.Module) -> list[nn.Module]:
    layers = _lora_layers(unet)
    if not layers:
        raise ValueError("the UNet has no LoRA layers: call ops.diffusion.lora.add_lora(unet, ...) or load_lora(...) "
                         "first")
    return layers


def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None, target_modules: Sequence[str] = LORA_TARGETS,
             init: str | bool = "gaussian", seed: int = 0, adapter_name: str = "default") -> list[nn.Parameter]:
    """Freeze the UNet, inject a LoRA adapter (B = 0) and return its trainable parameters (stable order)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if adapter_name in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet already has a LoRA adapter named {adapter_name!r}; use a fresh UNet, another "
                         f"adapter_name, or remove_lora(unet, {adapter_name!r}) first")
    config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), init_lora_weights=init,
                        target_modules=list(target_modules))
    unet.requires_grad_(False)
    device = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n and "lora_" in n]
    if not params:
        raise ValueError(f"no module of the UNet matched target_modules={list(target_modules)}")
    for p in params:
        p.requires_grad_(True)
    return params


def remove_lora(unet: nn.Module, adapter_name: str = "default") -> None:
    """Delete an adapter, restoring the plain UNet (e.g. before fitting the next category on a shared backbone).

    Once no adapter is left, peft's wrappers go too: they keep the base weights under ``<layer>.base_layer.*``, so
    a UNet that had a LoRA once would otherwise no longer have SD's state-dict keys, and copying its blocks (e.g.
    ``ControlNetModel.from_unet`` in CADiff after another method's LoRA on the shared backbone) fails."""
    unet.delete_adapters(adapter_name)
    if not getattr(unet, "peft_config", None):
        from diffusers.utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(unet)
        unet._hf_peft_config_loaded = False
        if hasattr(unet, "peft_config"):
            del unet.peft_config


def lora_ranks(unet: nn.Module) -> list[int]:
    """The rank of every LoRA projection (one entry per adapter per layer)."""
    return [int(a.weight.shape[0]) for m in _require_lora(unet) for a in m.lora_A.values()]


def save_lora(unet: nn.Module, out_dir: Any, adapter_name: str = "default",
              weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write the adapter as ``out_dir/weight_name`` in diffusers' LoRA format; returns the file path."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}")
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    if set(unet.peft_config[adapter_name].target_modules) <= set(LORA_TARGETS):
        state = convert_state_dict_to_diffusers(state)
    # else: diffusers' conversion renames only the attention projections' keys, and a file with both naming
    # schemes loads wrongly; peft's own key names (lora_A / lora_B) are a format load_lora_weights reads too
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=out))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=state, weight_name=weight_name, safe_serialization=True,
            unet_lora_adapter_metadata=unet.peft_config[adapter_name].to_dict())
        write_bytes_atomic(out / weight_name, canonical_safetensors((tmp / weight_name).read_bytes(),
                                                                    _sorted_adapter_metadata))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / weight_name


def _sorted_adapter_metadata(meta: dict[str, str]) -> dict[str, str]:
    """peft keeps ``target_modules`` as a set, which diffusers writes as a JSON list in the per-process string
    hash order: sort it so that equal adapters give equal files."""
    import json

    if "lora_adapter_metadata" not in meta:
        return meta
    config = json.loads(meta["lora_adapter_metadata"])
    for key, value in config.items():
        if key.endswith("target_modules") and isinstance(value, list):
            config[key] = sorted(value)
    return {**meta, "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}


def load_lora(unet: nn.Module, path: Any, adapter_name: str = "default") -> None:
    """Load a file written by :func:`save_lora` (or any diffusers SD LoRA file) into a UNet without a pipeline."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA file there; it is written by ops.diffusion.lora.save_lora "
                                f"(default name {LORA_WEIGHT_NAME})")
    unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name=adapter_name)
    if not _lora_layers(unet):
        raise ValueError(f"{path}: holds no 'unet.' LoRA weights; was it saved for another model?")


@contextmanager
def lora_disabled(unet: nn.Module) -> Iterator[nn.Module]:
    """Run the UNet without its LoRA adapters (exactly the base output); restores state and grad flags after."""
    layers = _require_lora(unet)
    was_disabled = [bool(m.disable_adapters) for m in layers]
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield unet
    finally:
        for m, off in zip(layers, was_disabled):
            m.enable_adapters(not off)
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class _Gates:
    scale: torch.Tensor | None = None  # [B] float
    rank_k: torch.Tensor | None = None  # [B] int: active rank dimensions per sample
    handles: list = field(default_factory=list)
    depth: int = 0


_STATE_ATTR = "_anomaly_forge_lora_gates"


def _gate_hook(state: _Gates):
    def hook(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if state.scale is None and state.rank_k is None:
            return None
        rank_dim = 1 if isinstance(module, nn.Conv2d) else out.ndim - 1
        r, b = out.shape[rank_dim], out.shape[0]
        for given in (state.scale, state.rank_k):
            if given is not None and len(given) != b:
                raise ValueError(f"LoRA gates were set for a batch of {len(given)} samples but the UNet ran on {b}; "
                                 f"pass one scale / timestep per sample of the UNet call (e.g. both halves of a "
                                 f"CFG batch)")
        gate = torch.ones(b, r, device=out.device, dtype=out.dtype)
        if state.rank_k is not None:
            idx = torch.arange(r, device=out.device)
            gate = gate * (idx[None, :] < state.rank_k.to(out.device)[:, None]).to(out.dtype)
        if state.scale is not None:
            gate = gate * state.scale.to(out.device, out.dtype)[:, None]
        shape = [b] + [1] * (out.ndim - 1)
        shape[rank_dim] = r
        return out * gate.view(shape)

    return hook


@contextmanager
def lora_gates(unet: nn.Module, scale: torch.Tensor | Sequence[float] | None = None,
               rank_k: torch.Tensor | Sequence[int] | None = None) -> Iterator[nn.Module]:
    """Per-sample LoRA gates for the UNet calls inside the block.

    ``scale[b]`` multiplies sample b's LoRA delta (0 = base model, 1 = adapter); ``rank_k[b]`` keeps only the
    first ``rank_k[b]`` rank dimensions of sample b (TACA). Nested blocks override the field they set.
    """
    layers = _require_lora(unet)
    scale_t = None if scale is None else torch.as_tensor(scale, dtype=torch.float32).flatten()
    rank_t = None if rank_k is None else torch.as_tensor(rank_k).flatten().long()
    if scale_t is not None and rank_t is not None and len(scale_t) != len(rank_t):
        raise ValueError(f"scale has {len(scale_t)} entries but rank_k has {len(rank_t)}; give one per sample")
    state: _Gates | None = getattr(unet, _STATE_ATTR, None)
    if state is None:
        state = _Gates()
        setattr(unet, _STATE_ATTR, state)
    if state.depth == 0:
        hook = _gate_hook(state)
        state.handles = [a.register_forward_hook(hook) for m in layers for a in m.lora_A.values()]
    previous = (state.scale, state.rank_k)
    if scale_t is not None:
        state.scale = scale_t
    if rank_t is not None:
        state.rank_k = rank_t
    state.depth += 1
    try:
        yield unet
    finally:
        state.scale, state.rank_k = previous
        state.depth -= 1
        if state.depth == 0:
            for h in state.handles:
                h.remove()
            delattr(unet, _STATE_ATTR)
