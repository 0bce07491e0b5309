"""APO inference: hierarchical guidance and deviation-guided localization (papers/apo.md, "Key Designs" 3).

    ε̂ = ε_ref(z_t) + s_text (ε_ref(z_t, c) − ε_ref(z_t)) + s_align (ε_θ(z_t, c) − ε_ref(z_t, c))

Built on the toolkit: DDIM sampling with ``ddim.linear_guidance`` over three branches (``ref_u``, ``ref_c``,
``theta_c``), DDIM inversion and ``blend.LatentBlend`` for placed generation. The localization map is the
alignment deviation itself: ||Δ_align|| per step, aggregated over steps with the TACA weights k(t), upsampled
bilinearly, Gaussian-smoothed, normalised. Choices where the paper is vague:

- One UNet serves ε_ref and ε_θ: :class:`LoRAGate` sets per-sample LoRA gates (``lora.lora_gates``) for every UNet
  call from the batch layout the branch runner announces: scale 0 for the reference branches, scale 1 and TACA's
  rank k(t) for ``theta_c``. So the three predictions are ONE batched call (``branch_mode="batched"``) or three
  calls (``"sequential"``) with the same numbers; the adapter is sampled with the TACA gate it was trained with.
- ||Δ_align|| is the L2 norm over latent channels at each latent pixel (a spatial map per step).
- Step weights are w_t = k(t) / Σ_s k(s) over the sampled steps: steps where the adapter has more capacity (low
  noise) count more. If every k(t) is 0 the plain mean is used.
- Normalisation divides by the map's maximum (not min-max): no deviation stays exactly 0, so an adapter that
  changes nothing yields an all-zero map and an empty mask instead of amplified float noise.
- Smoothing σ is a fraction of the image's shorter side (default 0.02, ~2.5 px at 128 px, ~10 px at 512 px), with
  reflect padding; the free-mode mask is ``map > threshold`` (default 0.5 of the peak).
- Placed mode: the normal image is inverted with the reference model (LoRA off) and the null prompt, at the same
  DDIM grid as sampling; the latent mask is the target mask by the toolkit's "any" rule (a cell touched by the
  defect is generated). The decoded image is pasted onto the original normal pixels only on those latent cells
  (upsampled, plus the target itself), so everything else is the normal image to the bit.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ops.diffusion.blend import LatentBlend, latent_mask
from ops.diffusion.branches import AdapterState, Branch, BranchRunner
from ops.diffusion.ddim import Callback, StepState, ddim_grid, linear_guidance, sample
from ops.diffusion.inversion import invert
from ops.diffusion.lora import lora_disabled, lora_gates, lora_ranks
from ops.diffusion.taca import active_rank, check_schedule
from ops.diffusion.vae import decode, encode

GATED = "apo_gated"  # adapter-state key shared by the three branches, so batched mode makes one UNet call
BRANCH_SCALES = {"ref_u": 0.0, "ref_c": 0.0, "theta_c": 1.0}


class LoRAGate:
    """Per-sample LoRA gates for APO's branches. Acts as the runner's controller (it learns the timestep from
    ``set_step`` and the batch layout from ``begin_call``) and provides the adapter state the branches share."""

    def __init__(self, unet: Any, k_min: int, k_max: int, T: int, scales: dict[str, float] | None = None):
        check_schedule(k_min, k_max, T, rank=min(lora_ranks(unet)))
        self.unet, self.k_min, self.k_max, self.T = unet, k_min, k_max, T
        self.scales = dict(BRANCH_SCALES if scales is None else scales)
        self.t: int | None = None
        self.layout: list[tuple[str, int]] = []

    # the controller protocol of ops.diffusion.branches.BranchRunner
    def source_branches(self) -> tuple[str, ...]:
        return ()

    def set_step(self, _step: int, t: int) -> None:
        self.t = int(t)

    def begin_call(self, layout: list[tuple[str, int]], _shape: tuple[int, int]) -> None:
        self.layout = list(layout)

    def rank(self, t: int) -> int:
        return int(active_rank(t, self.k_min, self.k_max, self.T))

    @contextmanager
    def context(self, unet: Any) -> Iterator[None]:
        if self.t is None or not self.layout:
            raise RuntimeError("LoRAGate used outside a runner step (no timestep / batch layout announced)")
        scale = [self.scales[name] for name, n in self.layout for _ in range(n)]
        with lora_gates(unet, scale=scale, rank_k=[self.rank(self.t)] * len(scale)):
            yield

    def runner(self, backbone: Any, mode: str) -> BranchRunner:
        return BranchRunner(backbone, mode=mode, controller=self, adapters={GATED: AdapterState(context=self.context)})


def apo_branches(cond: torch.Tensor, uncond: torch.Tensor) -> list[Branch]:
    return [Branch("ref_u", uncond, adapter=GATED), Branch("ref_c", cond, adapter=GATED),
            Branch("theta_c", cond, adapter=GATED)]


def apo_guidance(s_text: float, s_align: float):
    """ε̂ = ε_u + s_text (ε_c − ε_u) + s_align (ε_θ − ε_c); with s_align = 0 this adds an exact 0, so the result is
    bit-identical to ``ddim.cfg(s_text)`` (same operation order)."""
    return linear_guidance("ref_u", [(s_text, "ref_c", "ref_u"), (s_align, "theta_c", "ref_c")])


def deviation_norm(delta_align: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w) channel L2 norm, float32."""
    return delta_align.float().pow(2).sum(dim=1).sqrt()


@dataclass
class DeviationCapture:
    """Step callback recording ||ε_θ − ε_ref_c|| and k(t) of every step."""

    gate: LoRAGate
    maps: list[torch.Tensor] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    def __call__(self, state: StepState) -> None:
        eps = state.eps_branches
        self.maps.append(deviation_norm(eps["theta_c"] - eps["ref_c"])[0].cpu())
        self.ranks.append(self.gate.rank(state.t))


def step_weights(ranks: Sequence[int]) -> np.ndarray:
    k = np.asarray(ranks, dtype=np.float64)
    if k.size == 0:
        raise ValueError("no sampling steps to aggregate")
    total = k.sum()
    return k / total if total > 0 else np.full(k.size, 1.0 / k.size)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (N, 1, H, W) tensor with reflect padding (identity for sigma <= 0)."""
    if sigma <= 0:
        return x
    radius = min(max(1, int(math.ceil(3 * sigma))), x.shape[-1] - 1, x.shape[-2] - 1)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def localization_map(deviations: Sequence[torch.Tensor], ranks: Sequence[int], size: tuple[int, int],
                     sigma_frac: float = 0.02) -> np.ndarray:
    """Aggregate per-step (h, w) deviation maps into a float32 (H, W) map in [0, 1]."""
    if len(deviations) != len(ranks):
        raise ValueError(f"{len(deviations)} deviation maps but {len(ranks)} step ranks")
    w = torch.as_tensor(step_weights(ranks), dtype=torch.float32)
    stacked = torch.stack([d.detach().float().cpu() for d in deviations])  # (S, h, w)
    agg = (w.view(-1, 1, 1) * stacked).sum(dim=0)[None, None]
    up = F.interpolate(agg, size=tuple(size), mode="bilinear", align_corners=False)
    smooth = gaussian_blur(up, sigma_frac * min(size))[0, 0].clamp_min(0)
    peak = float(smooth.max())
    if not math.isfinite(peak):
        raise FloatingPointError("non-finite alignment deviation; the adapter or the latents diverged")
    if peak <= 0:
        return np.zeros(tuple(size), dtype=np.float32)
    return (smooth / peak).numpy().astype(np.float32)


def threshold_map(loc: np.ndarray, threshold: float) -> np.ndarray:
    return np.asarray(loc > threshold, dtype=bool)


def refine_target_mask(target: np.ndarray, loc: np.ndarray, threshold: float,
                       min_keep: float) -> tuple[np.ndarray, bool]:
    """Placed mode's final mask: the target mask where the localization map exceeds ``threshold``.

    The map is renormalised inside the target (the defect was painted only there). If fewer than ``min_keep`` of
    the target pixels survive (e.g. an untrained adapter that deviates everywhere alike) the target mask is kept
    unchanged; the second return value says which happened and is recorded in the row's params.
    """
    target = np.asarray(target, dtype=bool)
    inside = loc[target]
    if inside.size == 0 or float(inside.max()) <= 0:
        return target.copy(), False
    refined = target & (loc / float(inside.max()) > threshold)
    if refined.sum() < min_keep * target.sum():
        return target.copy(), False
    return refined, True


@dataclass
class Generation:
    image: np.ndarray  # uint8 HxWx3 at the requested size
    localization: np.ndarray  # float32 HxW in [0, 1]
    latent: torch.Tensor  # final z_0 (1, C, h, w)
    region: np.ndarray | None = None  # bool HxW: pixels taken from the generated image (placed mode)


def initial_noise(backbone: Any, seed: int) -> torch.Tensor:
    """The job's z_T: drawn on the CPU from ``seed`` so every device gives the same start."""
    h = backbone.latent_size
    channels = backbone.unet.config.in_channels
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, channels, h, h), generator=g).to(backbone.device)


def generate(backbone: Any, gate: LoRAGate, cond: torch.Tensor, uncond: torch.Tensor, seed: int, size: tuple[int, int],
             steps: int, s_text: float, s_align: float, smooth_sigma: float = 0.02, branch_mode: str = "batched",
             normal: np.ndarray | None = None, target_mask: np.ndarray | None = None,
             callbacks: Sequence[Callback] = (), on_inversion: Callable[[Any], None] | None = None) -> Generation:
    """Free generation (``normal is None``) or placed generation on ``normal`` at ``target_mask`` (bool HxW).

    ``callbacks`` run after APO's own (latent blending first), so they observe the blended latents;
    ``on_inversion`` receives the normal image's :class:`~ops.diffusion.inversion.Inversion` (tests, debugging).
    """
    runner = gate.runner(backbone, branch_mode)
    capture = DeviationCapture(gate)
    z = initial_noise(backbone, seed)
    own: list[Callback] = []
    region = None
    if normal is not None:
        if target_mask is None or target_mask.shape != normal.shape[:2]:
            raise ValueError("placed generation needs a bool target mask of the normal image's size")
        z0 = encode(backbone, normal)
        with lora_disabled(backbone.unet):
            inv = invert(backbone, z0, uncond, num_steps=steps, keep_trajectory=True, progress="APO inversion")
        if on_inversion is not None:
            on_inversion(inv)
        m = latent_mask(target_mask, tuple(z0.shape[-2:]), rule="any").to(z.device)
        blend = LatentBlend(m, inv.trajectory)
        z = blend.start(z, ddim_grid(backbone.scheduler, steps))
        own.append(blend)
        up = F.interpolate(m.float(), size=tuple(size), mode="nearest")[0, 0].cpu().numpy() > 0
        region = up | target_mask
    own.append(capture)
    out = sample(backbone, z, apo_branches(cond, uncond), apo_guidance(s_text, s_align), num_steps=steps,
                 runner=runner, callbacks=[*own, *callbacks], progress="APO sampling")["x"]
    image = decode(backbone, out, size=tuple(size))[0]
    if normal is not None:
        image = np.where(region[..., None], image, normal)
    loc = localization_map(capture.maps, capture.ranks, size, smooth_sigma)
    return Generation(image=image, localization=loc, latent=out, region=region)
