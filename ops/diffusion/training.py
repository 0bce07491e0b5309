"""A small reusable training loop: seeded, checkpointed, resumable to bit-identical weights.

``train(params, loss_fn, steps, lr, ckpt_dir, ckpt_every, seed, progress)`` runs AdamW on ``params`` with
``loss = loss_fn(step, rng)``; the loss function owns the model calls and draws ALL its randomness (noise,
timesteps, batch picks) from ``rng`` (a seeded ``torch.Generator``) or torch's global RNG. Textual inversion,
LoRA and APO's CPO loss plug in as different loss functions.

Choices where the brief leaves room:
- Reproducibility: ``rng`` = ``torch.Generator(rng_device).manual_seed(seed)``; torch's global RNG (dropout)
  is seeded with ``seed + GLOBAL_SEED_OFFSET`` inside ``torch.random.fork_rng``, so the caller's global stream
  is untouched and dropout masks are not the same draws as the noise.
- A checkpoint (``checkpoint-<step>.pt``, written atomically with ``ops.atomic``) holds the trainable tensors,
  the optimizer (and fp16 grad-scaler) state, the generator, global CPU and CUDA RNG states, the step, the
  loss history and a fingerprint of the run (shapes, seed, lr, optimizer settings). Only the newest ``keep``
  files are kept. Resuming restores all of it, so on CPU an interrupted run ends in exactly the weights of an
  uninterrupted one. A checkpoint whose fingerprint differs is refused (delete the folder to restart). The
  final step is always checkpointed, so a rerun of a finished run only reloads the weights (idempotent).
- Learning rate: constant after an optional linear warm-up, computed from the step number (no scheduler
  state to save). AdamW betas (0.9, 0.999), eps 1e-8, weight decay 1e-2 by default, as diffusers' training
  scripts; gradient clipping to ``max_grad_norm`` (None = off).
- Precision: trainable tensors are kept in float32 (upcast in place if the model was loaded in half
  precision, as diffusers' ``cast_training_params`` does). On CUDA ``mixed_precision="auto"`` autocasts the
  loss function to bf16 where supported, else fp16 with a GradScaler; on CPU "auto" means no autocast and
  ``"bf16"`` autocasts to bfloat16 (fp32 master weights and optimizer state either way).
- ``denoising_loss``: the standard LDM objective (noise ~ N(0, I) and t ~ U{0..T-1} from ``rng``, target
  ε or v by the scheduler's ``prediction_type``). With a mask it is AnoGen's mask-guided loss
  ||(ε − ε̂) ⊙ M||²: the pixel mask is max-pooled to the latent grid (a latent cell counts as soon as it
  touches the defect, so thin scratches do not vanish at 1/8 resolution) and the squared error is averaged
  over the masked cells and channels, per sample, then over the batch - so a small defect weighs as much as
  a large one (the paper leaves the normalisation open). A sample with an empty mask contributes 0.
- Safety: every tensor in ``params`` must require grad, and with ``frozen_modules`` given, no other parameter
  of those modules may (so a base model cannot be trained by accident). A non-finite loss stops the run with
  the step number; the last checkpoint stays valid.
"""
from __future__ import annotations

import io
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ops.atomic import write_bytes_atomic
from ops.progress import progress_bar

GLOBAL_SEED_OFFSET = 1_000_003
LossFn = Callable[[int, torch.Generator], torch.Tensor]
Progress = Callable[[str, int, int], None]  # same shape as ops.methods.base.Progress


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None  # step of the checkpoint the run continued from
    seconds: float = 0.0  # wall time of this call only
    checkpoint: Path | None = None  # the final checkpoint (None without ckpt_dir)
    precision: str = "float32"


def check_trainable(params: Sequence[torch.Tensor], frozen_modules: Iterable[nn.Module] = ()) -> None:
    """Every param requires grad; nothing else in ``frozen_modules`` does."""
    if not params:
        raise ValueError("nothing to train: params is empty")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad; only pass trainable tensors")
    ours = {id(p) for p in params}
    for module in frozen_modules:
        stray = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in ours]
        if stray:
            raise ValueError(f"{type(module).__name__} has {len(stray)} trainable parameter(s) outside params, e.g. "
                             f"{stray[:3]}; freeze the base model (requires_grad_(False)) before training")


def _precision(mode: str, device: torch.device) -> torch.dtype | None:
    if mode not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {mode!r}")
    if device.type != "cuda":
        # bf16 autocast pays on CPUs with bf16 matrix units (1.4x on forge-base's UNet step, docs/forge_base.md);
        # "auto" stays float32 on CPU so existing adapters' training is unchanged
        if mode == "fp16":
            raise ValueError(f"mixed_precision='fp16' needs CUDA; the trainable tensors are on {device}")
        return torch.bfloat16 if mode == "bf16" else None
    if mode == "no":
        return None
    if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _fingerprint(params: Sequence[torch.Tensor], seed: int, lr: float, weight_decay: float,
                 max_grad_norm: float | None, warmup_steps: int, precision: str) -> dict[str, Any]:
    return dict(shapes=[list(p.shape) for p in params], seed=int(seed), lr=float(lr),
                weight_decay=float(weight_decay), max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
                warmup_steps=int(warmup_steps), precision=precision)


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("checkpoint-*.pt"))


def _save(ckpt_dir: Path, step: int, params, opt, scaler, rng, losses, fingerprint, keep: int) -> Path:
    state = dict(step=step, fingerprint=fingerprint, losses=list(losses),
                 params=[p.detach().to("cpu").clone() for p in params], optimizer=opt.state_dict(),
                 scaler=None if scaler is None else scaler.state_dict(), rng=rng.get_state(),
                 torch_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    buf = io.BytesIO()
    torch.save(state, buf)
    path = ckpt_dir / f"checkpoint-{step:08d}.pt"
    write_bytes_atomic(path, buf.getvalue())
    for old in _checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _load(path: Path, params, opt, scaler, rng, fingerprint, steps: int) -> tuple[int, list[float]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path}: unreadable training checkpoint ({e}); delete it to resume from an older one "
                           f"or delete the folder to restart") from e
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"{path}: checkpoint of a different run ({state['fingerprint']}) than this one "
                         f"({fingerprint}); delete {path.parent} to restart or use another checkpoint folder")
    if state["step"] > steps:
        raise ValueError(f"{path}: checkpoint is at step {state['step']} but only {steps} steps were asked for; "
                         f"ask for at least {state['step']} steps or delete {path.parent}")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rng.set_state(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def train(params: Sequence[torch.Tensor], loss_fn: LossFn, steps: int, lr: float, ckpt_dir: Any = None,
          ckpt_every: int = 0, seed: int = 0, progress: Progress | None = None, *,
          max_grad_norm: float | None = 1.0, weight_decay: float = 1e-2, warmup_steps: int = 0,
          mixed_precision: str = "auto", frozen_modules: Iterable[nn.Module] = (), rng_device: str = "cpu",
          keep: int = 1, desc: str = "train") -> TrainResult:
    """Optimise ``params`` for ``steps`` steps of ``loss_fn(step, rng)``; resume from ``ckpt_dir`` if it holds a
    checkpoint of the same run. ``ckpt_every=0`` saves only the final step."""
    params = list(params)
    check_trainable(params, frozen_modules)
    if steps < 0 or lr <= 0 or ckpt_every < 0 or keep < 1:
        raise ValueError(f"need steps >= 0, lr > 0, ckpt_every >= 0, keep >= 1; got {steps}, {lr}, {ckpt_every}, "
                         f"{keep}")
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    device = params[0].device
    amp_dtype = _precision(mixed_precision, device)
    precision = "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    fingerprint = _fingerprint(params, seed, lr, weight_decay, max_grad_norm, warmup_steps, precision)
    ckpt = None if ckpt_dir is None else Path(ckpt_dir)
    cuda_devices = [device] if device.type == "cuda" else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed + GLOBAL_SEED_OFFSET)
        rng = torch.Generator(rng_device).manual_seed(seed)
        start, losses, resumed = 0, [], None
        found = _checkpoints(ckpt) if ckpt is not None and ckpt.is_dir() else []
        if found:
            start, losses = _load(found[-1], params, opt, scaler, rng, fingerprint, steps)
            resumed = start
        last = found[-1] if found and start == steps else None
        autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
        with progress_bar(desc, total=steps) as bar:
            bar.update(start)
            for step in range(start, steps):
                for group in opt.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = loss_fn(step, rng)
                if loss.ndim != 0:
                    raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}; return a scalar")
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"{desc}: loss is {value} at step {step}; lower lr or check inputs "
                                             f"(last checkpoint in {ckpt} is intact)")
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}")
                if progress is not None:
                    progress(desc, step + 1, steps)
                done = step + 1
                if ckpt is not None and (done == steps or (ckpt_every and done % ckpt_every == 0)):
                    last = _save(ckpt, done, params, opt, scaler, rng, losses, fingerprint, keep)
        if ckpt is not None and last is None:  # steps == 0 or nothing left to run: still leave a final checkpoint
            last = _save(ckpt, steps, params, opt, scaler, rng, losses, fingerprint, keep)
    return TrainResult(steps=steps, losses=losses, resumed_from=resumed, seconds=time.perf_counter() - t0,
                       checkpoint=last, precision=precision)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] or [B, 1, H, W] pixel mask -> [B, 1, h, w] float {0, 1}: 1 where a latent cell touches the mask."""
    m = mask.float()
    if m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"mask must be [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
    return (torch.nn.functional.adaptive_max_pool2d(m, size) > 0).float()


def denoising_loss(unet: nn.Module, scheduler: Any, latents: torch.Tensor, cond: torch.Tensor,
                   rng: torch.Generator, mask: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """Diffusion training loss of ``unet`` on clean ``latents`` [B, C, h, w] with text states ``cond``."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=rng, device=rng.device, dtype=torch.float32)
    noise = noise.to(latents.device, latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=rng, device=rng.device)
    timesteps = timesteps.to(latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported; use epsilon or v_prediction")
    pred = unet(noisy, timesteps, encoder_hidden_states=cond).sample
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    w = latent_mask(mask.to(latents.device), tuple(latents.shape[-2:]))
    per_sample = (err * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)) * err.shape[1]).clamp_min(1.0)
    return per_sample.mean()
