"""Eq. 5-7 of bg-disentangle: the matching loss plus the background regulariser, with masked noising.

    z_t   = sqrt(ᾱ_t) z_0   + sqrt(1 − ᾱ_t) ε                        (eq. 6)
    z_t^m = sqrt(ᾱ_t) z_0^m + sqrt(1 − ᾱ_t) (1 − m) ⊙ ε,  z_0^m = (1 − m) ⊙ z_0   (eq. 7)
    L = ||m ⊙ (ε − ε_θ(z_t, t, C1))||² + ||(1 − m) ⊙ (ε − ε_θ(z_t^m, t, C2))||²    (eq. 5)

with the masked cross-attention of eq. 10-11 on both predictions (``Conditioning.regions``). z_t^m equals
(1 − m) ⊙ z_t exactly (it is computed as that product), so the background prediction cannot see the defect area
of z_0 or of ε (Lemma 1; tests/test_bgdisentangle.py perturbs both inside m).

Choices where the paper is vague:
- m on the latent grid: a latent cell is "defect" as soon as any of its pixels is (``blend.latent_mask`` rule
  "any", the rule of the toolkit's masked inversion), so no defect pixel leaks into the background stream.
- Normalisation: the squared error of both terms summed per element and averaged over all latent elements
  (C·h·w) and the batch - the combined form of eq. 5, ||ε − m⊙ε̂_1 − (1−m)⊙ε̂_2||², divided by its size.
- t ~ U{0..T−1} and ε ~ N(0, I), one draw per sample, shared by both terms (as eq. 5 states one ε and one t).
- Both predictions are one batched UNet call (the def branch then the bg branch), each branch's cross-attention
  masked by its own sample masks.
- Only ε-prediction schedulers are accepted (eq. 5 is written for ε).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ops.diffusion.attention import AttentionController
from ops.methods.bgdisentangle.conditioning import Conditioning

DEF, BG = "def", "bg"
TERMS = ("match", "reg")


def masked_noising(scheduler: Any, z0: torch.Tensor, m: torch.Tensor, eps: torch.Tensor,
                   t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, z_t^m) of eq. 6-7; ``m`` bool (B or 1, 1, h, w) on the latent grid."""
    a = scheduler.alphas_cumprod.to(z0.device)[t.long().to(z0.device)].float().view(-1, 1, 1, 1)
    keep = (~m).float()
    z_t = a.sqrt() * z0.float() + (1 - a).sqrt() * eps.float()
    z_tm = a.sqrt() * (keep * z0.float()) + (1 - a).sqrt() * (keep * eps.float())
    return z_t, z_tm


def predictions(unet: Any, z_t: torch.Tensor, z_tm: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                m: torch.Tensor, c_def: torch.Tensor | None = None, c_m: torch.Tensor | None = None,
                c_bg: torch.Tensor | None = None, extra_rules: Sequence[Any] = (),
                controllers: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ε_θ(z_t, t, C1) and ε_θ(z_t^m, t, C2) under eq. 10-11, as one batched UNet call.

    ``c_def``/``c_m``/``c_bg`` override the conditioning's tensors (tests pass leaf tensors to read gradients);
    ``extra_rules`` (e.g. a Capture) join the controller, which is appended to ``controllers`` when given."""
    c_def = cond.c_def if c_def is None else c_def
    c_m = cond.c_m if c_m is None else c_m
    c_bg = cond.c_bg if c_bg is None else c_bg
    b = z_t.shape[0]
    c1 = torch.cat([c_def, c_bg], dim=1).expand(b, -1, -1)
    c2 = torch.cat([c_m, c_bg], dim=1).expand(b, -1, -1)
    dtype = next(unet.parameters()).dtype
    ctrl = AttentionController(unet, [cond.regions(m, branches=[DEF, BG]), *extra_rules])
    if controllers is not None:
        controllers.append(ctrl)
    with ctrl:
        ctrl.begin_call([(DEF, b), (BG, b)], tuple(z_t.shape[-2:]))
        out = unet(torch.cat([z_t, z_tm]).to(dtype), torch.cat([t, t]).to(z_t.device),
                   encoder_hidden_states=torch.cat([c1, c2]).to(dtype)).sample
    eps_def, eps_bg = out.float().split(b)
    return eps_def, eps_bg


def disentangle_loss(eps: torch.Tensor, eps_def: torch.Tensor, eps_bg: torch.Tensor, m: torch.Tensor,
                     terms: Sequence[str] = TERMS) -> torch.Tensor:
    """Eq. 5 (mean over elements); ``terms`` selects the matching term and/or the regulariser."""
    bad = sorted(set(terms) - set(TERMS))
    if bad:
        raise ValueError(f"unknown loss terms {bad}; use {TERMS}")
    mf = m.float()
    total = torch.zeros((), device=eps.device)
    if "match" in terms:
        total = total + ((mf * (eps.float() - eps_def)) ** 2).mean()
    if "reg" in terms:
        total = total + (((1 - mf) * (eps.float() - eps_bg)) ** 2).mean()
    return total


def loss_batch(unet: Any, scheduler: Any, latents: torch.Tensor, masks: torch.Tensor, cond: Conditioning,
               rng: torch.Generator, batch_size: int, terms: Sequence[str] = TERMS) -> torch.Tensor:
    """One training step's loss: ``batch_size`` support latents drawn with replacement, t and ε from ``rng``.

    ``latents`` (N, C, h, w), ``masks`` bool (N, 1, h, w) on the latent grid."""
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"bg-disentangle's loss (eq. 5) is written for ε-prediction; the scheduler predicts "
                         f"{scheduler.config.prediction_type!r}")
    idx = torch.randint(0, latents.shape[0], (batch_size,), generator=rng, device=rng.device)
    z0, m = latents[idx.to(latents.device)], masks[idx.to(masks.device)]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=rng, device=rng.device)
    eps = torch.randn(z0.shape, generator=rng, device=rng.device, dtype=torch.float32).to(z0.device)
    z_t, z_tm = masked_noising(scheduler, z0, m, eps, t)
    eps_def, eps_bg = predictions(unet, z_t, z_tm, t.to(z0.device), cond, m)
    return disentangle_loss(eps, eps_def, eps_bg, m, terms)
