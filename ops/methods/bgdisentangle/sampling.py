"""bg-disentangle generation: masked DDIM inversion (eq. 8), z_T* = z̃_T^m + m ⊙ ε, eq. 9, eq. 13 refinement.

For one normal latent z_0 and target mask m (latent grid):

1. eq. 8: z̃^m_T = masked DDIM inversion of (1 − m) ⊙ z_0 with ε_θ(·, C2) under eq. 11's masked cross-attention
   (the toolkit's ``inversion.invert(mask=...)``).
2. z_T* = z̃_T^m + m ⊙ ε, ε ~ N(0, I) from the job's seed (one per target).
3. eq. 9: z*_{t-1} = DDIM move of z*_t along (1 − m) ⊙ ε_θ(z_t^m, t, C2) + m ⊙ ε_θ(z_t*, t, C1), with
   z_t^m := (1 − m) ⊙ z_t* (the masked latent, as in training where z_t^m = (1 − m) ⊙ z_t).

Because z_t^m is the masked latent, the background stream (1 − m) ⊙ z_t* evolves on its own: it starts at z̃_T^m,
moves along (1 − m) ⊙ ε_θ(z_t^m, C2) only, and is therefore the same for every ε and every defect (Proposition 1).
:class:`BackgroundRun` computes it ONCE per (adapter, normal image, latent mask): z̃_T^m plus ε_θ(z_t^m, C2) at
every sampling step. Every target of that pair (different seeds) then needs only the defect branch
ε_θ(z_t*, C1) - one UNet call per step instead of three (inversion + two branches). :class:`InversionCache`
keeps these runs; without it each target inverts and runs both branches itself (same images up to batch-size
rounding, tests/test_bgdisentangle.py). The VAE latent of a normal image is cached separately, so targets with
different masks on the same normal image still share the encode.

Why the cache key holds the mask: eq. 8 inverts (1 − m) ⊙ z_0 with the masked noise update, so the inverted
trajectory depends on m; it is reused exactly across targets that share the normal image AND its latent-grid
mask (the paper's protocol of many defects per target mask, Figure 3), never approximated across masks. The
pipeline's affine target sampler draws a new mask per job, so there most groups hold one job and only the VAE
encode of the normal image is shared; the full saving (bench/bench_bgdisentangle.py) needs repeated masks.

Eq. 13: the defect branch's cross-attention probabilities of the defect word tokens (summed; each query's softmax
is over the C_def group, eq. 10) are captured at every sampling step and every cross-attention layer, each layer's
map bilinearly resized to the latent grid and averaged: A. ``Resize(m' ⊙ A)`` is A times m' (the target at the
map's grid by area >= ½) resized bilinearly to the image. ``threshold_rule="absolute"`` (default, the paper's):
refined = Resize(m' ⊙ A) >= threshold, A as probabilities. ``"peak_in_mask"``: Resize(m' ⊙ A) is first divided by
its maximum inside the target (``ops.diffusion.attn_mask.peak_normalise``, the rule CADiff's own mask uses too), so
½ reads "at least half the peak": a word token's probability is often far below ½ in absolute terms, so the
absolute rule may leave nothing (the target mask is then used). Either way the result is ANDed with the target,
so the refined mask never leaves it (bilinear spill at m''s border is cut). The ``attention`` extra is the map
that was thresholded, so ``ops.masks.refine.attention_mask`` on the extra gives the same mask at threshold ½.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ops.diffusion.attention import AttentionController, Capture
from ops.diffusion.attn_mask import peak_normalise
from ops.diffusion.blend import latent_mask
from ops.diffusion.branches import AdapterState, Branch, BranchRunner
from ops.diffusion.ddim import sample
from ops.diffusion.inversion import invert
from ops.methods.bgdisentangle.conditioning import Conditioning

DEF, BG = "def", "bg"
THRESHOLD_RULES = ("absolute", "peak_in_mask")


def target_latent_mask(mask: np.ndarray, latent_hw: tuple[int, int]) -> torch.Tensor:
    """bool (1, 1, h, w): a latent cell belongs to m as soon as any of its pixels does (as in training)."""
    return latent_mask(mask, latent_hw, rule="any")


def _runner(backbone: Any, ctrl: AttentionController) -> BranchRunner:
    """Each branch its own UNet call (the bg branch is a distinct no-op adapter state), so cached and uncached
    runs compute the background with the same batch composition."""
    return BranchRunner(backbone, "batched", controller=ctrl, adapters={BG: AdapterState()})


@dataclass
class BackgroundRun:
    """The target-independent half of eq. 9 for one (normal latent, mask): z̃_T^m and ε_θ(z_t^m, C2) per step."""

    zT_m: torch.Tensor  # (1, C, h, w), exactly 0 inside m
    m: torch.Tensor  # bool (1, 1, h, w)
    eps_bg: list[torch.Tensor] = field(default_factory=list)  # per sampling step i, (1, C, h, w)
    z0_m: torch.Tensor | None = None  # the background stream at level 0

    @property
    def nbytes(self) -> int:
        ts = [self.zT_m, *self.eps_bg] + ([self.z0_m] if self.z0_m is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def invert_masked(backbone: Any, z0: torch.Tensor, m: torch.Tensor, cond: Conditioning, steps: int) -> torch.Tensor:
    """Eq. 8 with eq. 11's masked cross-attention: z̃_T^m of (1 − m) ⊙ z0 under C2."""
    ctrl = AttentionController(backbone.unet, [cond.regions(m)])
    with ctrl:
        inv = invert(backbone, z0, cond.c2, steps, mask=m, runner=BranchRunner(backbone, controller=ctrl),
                     progress="bgdisentangle masked inversion")
    return inv.zT


def background_run(backbone: Any, z0: torch.Tensor, m: torch.Tensor, cond: Conditioning, steps: int) -> BackgroundRun:
    """Invert, then denoise the background stream alone, keeping its ε at every step."""
    run = BackgroundRun(zT_m=invert_masked(backbone, z0, m, cond, steps), m=m)
    ctrl = AttentionController(backbone.unet, [cond.regions(m, branches=[BG])])
    keep = ~m

    def guidance(eps, _state):
        run.eps_bg.append(eps[BG])
        return {BG: torch.where(keep, eps[BG].float(), torch.zeros((), device=m.device))}

    with ctrl:
        out = sample(backbone, {BG: run.zT_m}, [Branch(BG, cond.c2, BG, adapter=BG)], guidance, steps,
                     runner=_runner(backbone, ctrl), progress="bgdisentangle background stream")
    run.z0_m = out[BG]
    return run


def start_latents(zT_m: torch.Tensor, m: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """z_T* = z̃_T^m + m ⊙ ε, one ε per seed (drawn on the CPU, so every device gives the same start)."""
    noise = torch.stack([torch.randn(zT_m.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(zT_m.device)
    return zT_m.float() + m.float() * noise


@dataclass
class Generated:
    z0: torch.Tensor  # (n, C, h, w)
    attention: torch.Tensor  # (n, h, w) float32 on the latent grid: probabilities, not rescaled


def denoise(backbone: Any, cond: Conditioning, m: torch.Tensor, z_start: torch.Tensor, steps: int,
            background: BackgroundRun | None = None) -> Generated:
    """Eq. 9 from z_T* (n, C, h, w). With ``background`` its stored ε_θ(z_t^m, C2) is replayed; without it the
    background branch runs live on z_t^m = (1 − m) ⊙ z_t* (first target of the batch: all share it)."""
    rules: list[Any] = [cond.regions(m, branches=[DEF, BG]),
                        Capture(kind="cross", branches=[DEF], tokens=cond.def_tokens)]
    ctrl = AttentionController(backbone.unet, rules)
    branches = [Branch(DEF, cond.c1, DEF)]
    if background is None:
        branches.insert(0, Branch(BG, cond.c2, BG, adapter=BG))
    zeros = torch.zeros((), device=m.device)

    class Eq9:
        """Guidance of eq. 9; without a cached run it also feeds the live background stream."""

        def __call__(self, eps, state):
            if background is not None:
                e_bg = background.eps_bg[state.step].to(m.device)
            else:
                e_bg = eps[BG]
            e = torch.where(m, eps[DEF].float(), e_bg.float())  # (1 − m) ⊙ ε_bg + m ⊙ ε_def, exact for binary m
            out = {DEF: e}
            if background is None:
                out[BG] = torch.where(m, zeros, e_bg.float())
            return out

    latents = {DEF: z_start.float()}
    if background is None:
        latents[BG] = torch.where(m, zeros, z_start[:1].float())  # z_T^m = (1 − m) ⊙ z_T*
    with ctrl:
        out = sample(backbone, latents, branches, Eq9(), steps, runner=_runner(backbone, ctrl),
                     progress="bgdisentangle eq. 9")
    return Generated(out[DEF], defect_attention(ctrl, m, tuple(z_start.shape[-2:])))


def defect_attention(ctrl: AttentionController, m: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Mean over steps and layers of the summed defect-token probabilities, on the latent grid (n, h, w)."""
    resolutions = sorted({hw[0] for hw in ctrl.layer_hw.values()})
    maps = []
    for r in resolutions:
        try:
            a = ctrl.maps("cross", DEF, resolution=r).sum(-1).float()  # (n, r, r')
        except KeyError:
            continue
        maps.append(F.interpolate(a[:, None], size=latent_hw, mode="bilinear", align_corners=False)[:, 0])
    return torch.stack(maps).mean(0).cpu()


def refine(attention: torch.Tensor, target: np.ndarray, threshold: float = 0.5,
           rule: str = "absolute") -> tuple[np.ndarray, np.ndarray]:
    """Eq. 13 within the target: (refined mask, the thresholded map Resize(m' ⊙ A) at the target's size)."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"eq. 13 threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    a = attention.numpy().astype(np.float32)
    h, w = target.shape
    m_low = F.interpolate(torch.from_numpy(target.astype(np.float32))[None, None], size=a.shape,
                          mode="area")[0, 0].numpy() >= 0.5
    up = F.interpolate(torch.from_numpy(a * m_low)[None, None], size=(h, w), mode="bilinear",
                       align_corners=False)[0, 0].numpy().astype(np.float32)
    up = peak_normalise(up, target) if rule == "peak_in_mask" else np.clip(up, 0.0, 1.0)
    return (up >= threshold) & target, up


class InversionCache:
    """Background runs keyed by (adapter, normal image, latent mask) plus normal latents keyed by image, LRU.
    ``runs`` / ``encodes`` count the computed ones (tests and bench)."""

    def __init__(self, max_runs: int = 8, max_latents: int = 64):
        self.max_runs, self.max_latents = max_runs, max_latents
        self._runs: OrderedDict[tuple, BackgroundRun] = OrderedDict()
        self._latents: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.runs = 0
        self.encodes = 0

    @staticmethod
    def _get(store: OrderedDict, key: tuple, make, limit: int) -> Any:
        if key in store:
            store.move_to_end(key)
            return store[key], False
        value = store[key] = make()
        while len(store) > limit:
            store.popitem(last=False)
        return value, True

    def latent(self, key: tuple, make) -> torch.Tensor:
        z, made = self._get(self._latents, key, make, self.max_latents)
        self.encodes += made
        return z

    def background(self, key: tuple, make) -> BackgroundRun:
        run, made = self._get(self._runs, key, make, self.max_runs)
        self.runs += made
        return run
