"""The GPU fast path (issue 15): opt-in speed/memory settings of a loaded backbone, and the precision policy.

``apply_fast_path(backbone, FastPath(...))`` changes the backbone's modules in place and records the settings
on ``backbone.fast``; the toolkit reads them there. Every switch is off by default, so CPU runs and unit tests
behave exactly as before; bench/bench_scale.py turns them on for a GPU run.

Precision policy (what stays float32 whatever the weights' dtype; weights are bf16 on CUDA when supported,
else fp16, float32 on CPU: ``backbone.resolve_dtype``):
- DDIM moves and inversion steps (ops/diffusion/ddim.py: latents are float32 between UNet calls);
- the attention controller's explicit softmax (scores, probabilities, re-weighting, captures);
- trainable tensors and optimiser state (ops/diffusion/training.py upcasts them; autocast runs the model);
- ``fp32_inversion=True``: DDIM inversion runs the UNet itself in float32 (:func:`fp32_unet`). Inversion
  integrates the ODE backwards and every half-precision ε error accumulates into z_T; the switch costs the UNet's
  float32 copy (3.4 GB for SD 1.5) while it runs. Off by default: its benefit on a trained SD is unmeasured here.

Switches:
- ``channels_last``: UNet and VAE weights in NHWC (cuDNN's fast convolution layout on tensor-core GPUs); the
  convolution outputs follow the weights' layout, so latents need no conversion.
- ``inference_mode``: DDIM sampling and inversion run under ``torch.inference_mode`` instead of ``no_grad``
  (no version counters or view tracking). Their outputs are then inference tensors: they cannot be updated in
  place or saved for backward outside inference mode, which is why this is opt-in.
- ``compile``: ``unet.compile()`` (torch.compile in place, so attention processors and LoRA layers still attach
  to the same module; changing them triggers a recompile). Off by default and UNMEASURED on a GPU in this
  repository so far (docs/scale.md): compile time is minutes, and the attention controller swaps processors
  per run, which recompiles.
- ``vae_slicing``: the VAE decodes one image at a time (diffusers ``enable_slicing``), for large batches;
  ``vae_tiling``: tiled encode/decode (``enable_tiling``) for images larger than the VAE's sample size (it
  changes pixels slightly at tile seams, so it is off unless asked for).
- SDPA: the default attention backend (``attention="sdpa"``) is torch's fused kernel; the attention controller
  keeps it on every layer and branch where no rule needs explicit probabilities (tests/test_fastpath.py checks
  that grafting and token regions run on SDPA and only re-weighting and capture take the explicit path).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class FastPath:
    channels_last: bool = False
    inference_mode: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    vae_slicing: bool = False
    vae_tiling: bool = False
    fp32_inversion: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fast(backbone: Any) -> FastPath:
    """The fast-path settings of ``backbone`` (all off if never applied)."""
    return getattr(backbone, "fast", None) or FastPath()


def apply_fast_path(backbone: Any, fp: FastPath) -> Any:
    """Apply ``fp`` to ``backbone`` in place (a cached backbone is shared: apply to a ``cache=False`` copy unless
    every user of the process wants it) and return it."""
    if fp.channels_last:
        backbone.unet.to(memory_format=torch.channels_last)
        backbone.vae.to(memory_format=torch.channels_last)
    if fp.vae_slicing:
        backbone.vae.enable_slicing()
    if fp.vae_tiling:
        backbone.vae.enable_tiling()
    if fp.compile:
        backbone.unet.compile(backend=fp.compile_backend, mode=fp.compile_mode)
    backbone.fast = fp
    return backbone


def grad_off(backbone: Any) -> contextlib.AbstractContextManager:
    """``torch.inference_mode()`` when the backbone's fast path asks for it, else ``torch.no_grad()``."""
    return torch.inference_mode() if fast(backbone).inference_mode else torch.no_grad()


@contextlib.contextmanager
def fp32_unet(backbone: Any) -> Iterator[None]:
    """Run the UNet in float32 inside the block when the fast path asks for fp32 inversion and the weights are
    half precision; exact round trip: every parameter/buffer gets its original tensor back afterwards (so
    float32 LoRA tensors beside half-precision base weights keep their values and dtypes)."""
    if not fast(backbone).fp32_inversion or backbone.dtype == torch.float32:
        yield
        return
    unet = backbone.unet
    saved = [(t, t.data) for t in [*unet.parameters(), *unet.buffers()] if t.is_floating_point()]
    dtype = backbone.dtype
    try:
        for t, data in saved:
            t.data = data.float()
        backbone.dtype = torch.float32  # the branch runner casts latents and conditioning to backbone.dtype
        yield
    finally:
        backbone.dtype = dtype
        for t, data in saved:
            t.data = data
