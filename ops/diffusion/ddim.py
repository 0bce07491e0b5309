"""Deterministic DDIM (eta = 0) sampling with multi-branch, multi-term guidance and step callbacks.

The DDIM grid for ``num_steps`` comes from the backbone's DDIMScheduler (``set_timesteps``; SD: 981, 961, ..., 1
for 50 steps). Levels are numbered from clean to noisy: level 0 is the clean latent with ᾱ =
``final_alpha_cumprod`` (= ᾱ[0] for SD's ``set_alpha_to_one=False``, so its UNet timestep is 0), level k >= 1
is the scheduler's k-th smallest timestep. Sampling step i (0-based) moves level N-i -> N-i-1.

One move between levels, both directions (eq. 3 and 4 of papers/bg_disentangle_ddim_inversion.md):

    z_to = sqrt(ᾱ_to) [ z_from / sqrt(ᾱ_from) + (sqrt(1/ᾱ_to - 1) - sqrt(1/ᾱ_from - 1)) · keep ⊙ ε ]

``keep`` (default 1) is the masked-noise factor of eq. 8; this equals the familiar x0-form of DDIM exactly in
real arithmetic. The math runs in float32 whatever the UNet dtype, so half-precision UNets do not accumulate
rounding in the latents. Sampling runs under ``torch.no_grad``, or ``torch.inference_mode`` when the backbone's
fast path asks for it (ops/diffusion/fastpath.py).

Guidance: each step computes every :class:`~ops.diffusion.branches.Branch`'s ε (one batched UNet call or
sequential calls, see branches.py), then a ``guidance`` function maps {branch: ε} to {latent stream: ε}.
:func:`cfg` and :func:`linear_guidance` build the usual ones (classifier-free guidance; APO's hierarchical
ε̂ = ε_u + s_text(ε_c − ε_u) + s_align(ε_θ − ε_c)). Callbacks run after every step with a :class:`StepState`
and may edit ``state.latents`` in place (latent blending, trajectory injection, capturing deviations).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ops.diffusion.branches import Branch, BranchRunner
from ops.diffusion.fastpath import grad_off
from ops.progress import progress_bar

Guidance = Callable[[Mapping[str, torch.Tensor], "StepState"], dict[str, torch.Tensor]]
Callback = Callable[["StepState"], None]


@dataclass(frozen=True)
class DDIMGrid:
    timesteps: tuple[int, ...]  # UNet timestep per level, level 0 = clean (0), ascending
    alphas: torch.Tensor  # ᾱ per level, float64 on CPU

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    def step_levels(self, i: int) -> tuple[int, int]:
        """Sampling step i goes from level ``a`` to level ``b`` = a - 1."""
        a = self.num_steps - i
        return a, a - 1


def ddim_grid(scheduler: Any, num_steps: int) -> DDIMGrid:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sched = copy.copy(scheduler)  # set_timesteps rebinds attributes: the shared backbone's scheduler stays as is
    sched.set_timesteps(num_steps)
    ts = sorted(int(t) for t in sched.timesteps)
    ac = sched.alphas_cumprod.double().cpu()
    alphas = torch.tensor([float(sched.final_alpha_cumprod)] + [float(ac[t]) for t in ts], dtype=torch.float64)
    # UNet timestep 0 for the clean level: its ᾱ is final_alpha_cumprod = ᾱ[0] under SD's set_alpha_to_one=False
    return DDIMGrid(timesteps=(0, *ts), alphas=alphas)


def ddim_move(z: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float,
              keep: torch.Tensor | None = None) -> torch.Tensor:
    """Move ``z`` from ᾱ = a_from to ᾱ = a_to along ε (float32 math; result in z's dtype)."""
    a_from, a_to = float(a_from), float(a_to)
    coef = (1.0 / a_to - 1.0) ** 0.5 - (1.0 / a_from - 1.0) ** 0.5
    e = eps.float() if keep is None else keep.float() * eps.float()
    out = a_to ** 0.5 * (z.float() / a_from ** 0.5 + coef * e)
    return out.to(z.dtype)


@dataclass
class StepState:
    step: int  # 0-based sampling step index
    t: int  # UNet timestep evaluated at this step
    level_from: int
    level_to: int
    grid: DDIMGrid
    latents: dict[str, torch.Tensor]  # after the step (callbacks may replace entries)
    eps_branches: dict[str, torch.Tensor] = field(default_factory=dict)
    eps: dict[str, torch.Tensor] = field(default_factory=dict)  # guided ε per latent stream
    before: dict[str, torch.Tensor] = field(default_factory=dict)  # latents before the step


def single(branch: str = "x", stream: str = "x") -> Guidance:
    """No guidance: the stream's ε is one branch's ε."""
    return lambda eps, state: {stream: eps[branch]}


def cfg(scale: float, uncond: str = "uncond", cond: str = "text", stream: str = "x") -> Guidance:
    """Classifier-free guidance ε_u + s (ε_c − ε_u), in the order diffusers computes it."""

    def g(eps: Mapping[str, torch.Tensor], state: StepState) -> dict[str, torch.Tensor]:
        return {stream: eps[uncond] + scale * (eps[cond] - eps[uncond])}

    return g


def linear_guidance(base: str, terms: Sequence[tuple[float | Callable[[int], float], str, str]],
                    stream: str = "x") -> Guidance:
    """ε = ε_base + Σ s_k (ε_plus_k − ε_minus_k); a scale may be a function of the step index."""

    def g(eps: Mapping[str, torch.Tensor], state: StepState) -> dict[str, torch.Tensor]:
        out = eps[base]
        for scale, plus, minus in terms:
            s = scale(state.step) if callable(scale) else scale
            out = out + s * (eps[plus] - eps[minus])
        return {stream: out}

    return g


def cfg_branches(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float, stream: str = "x",
                 prefix: str = "") -> tuple[list[Branch], Guidance]:
    """Branches + guidance for plain conditioning (scale 1 or no uncond: one branch) or classifier-free guidance."""
    if uncond is None or scale == 1.0:
        return [Branch(prefix + "text", cond, stream)], single(prefix + "text", stream)
    return ([Branch(prefix + "uncond", uncond, stream), Branch(prefix + "text", cond, stream)],
            cfg(scale, prefix + "uncond", prefix + "text", stream))


@torch.no_grad()
def sample(backbone: Any, latents: torch.Tensor | Mapping[str, torch.Tensor], branches: Sequence[Branch],
           guidance: Guidance | None = None, num_steps: int = 50, start_step: int = 0,
           runner: BranchRunner | None = None, callbacks: Sequence[Callback] = (),
           progress: str | None = None) -> dict[str, torch.Tensor]:
    """Denoise the latent streams from level N - start_step to level 0; returns {stream: z_0}.

    ``latents``: one tensor (stream "x") or {stream: tensor}. Streams the guidance gives no ε for stay as they are
    (a callback moves them, e.g. along a stored inversion trajectory).
    ``start_step`` > 0 starts from an intermediate level (the given latents must be at that noise level).
    """
    z = {"x": latents} if isinstance(latents, torch.Tensor) else dict(latents)
    z = {k: v.float() for k, v in z.items()}
    grid = ddim_grid(backbone.scheduler, num_steps)
    runner = runner or BranchRunner(backbone)
    guidance = guidance or single(branches[0].name, branches[0].latent)
    controller = runner.controller
    steps = range(start_step, grid.num_steps)
    with grad_off(backbone), progress_bar(progress or "DDIM sampling", total=len(steps)) as bar:
        for i in steps:
            a, b = grid.step_levels(i)
            t = grid.timesteps[a]
            if controller is not None:
                controller.set_step(i, t)
            state = StepState(step=i, t=t, level_from=a, level_to=b, grid=grid, latents=z, before=dict(z))
            state.eps_branches = runner(z, t, branches)
            state.eps = guidance(state.eps_branches, state)
            extra = sorted(set(state.eps) - set(z))
            if extra:
                raise KeyError(f"guidance returned ε for unknown latent streams {extra} (have {sorted(z)})")
            state.latents = z = {k: ddim_move(v, state.eps[k], grid.alphas[a], grid.alphas[b]) if k in state.eps
                                 else v for k, v in z.items()}
            for cb in callbacks:
                cb(state)
            z = state.latents
            bar.update(1)
    return z
