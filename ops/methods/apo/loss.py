"""APO's constrained policy optimisation (CPO) loss: pair-free Diffusion-DPO (papers/apo.md, "Key Designs" 1).

For a real support anomaly z_0, noise ε and a timestep t, both the frozen reference ε_ref and the LoRA policy
ε_θ predict on the SAME z_t; the implicit preference is

    Δ = ||ε_θ − ε||² − ||ε_ref − ε||²,    L_APO = −log σ(−β_t Δ),    β_t = −½ β λ'_t

with λ_t = log SNR(t) = log(ᾱ_t / (1 − ᾱ_t)). Choices where the paper is vague (recorded here on purpose):

- Time unit of λ'_t: the derivative is taken with respect to NORMALISED time s = t / T ∈ [0, 1] (the continuous
  time of VDM / Diffusion-DPO's derivation), so β does not change meaning when T changes. It is computed from the
  scheduler's own ``alphas_cumprod`` by central differences (one-sided at the two ends), so it follows whatever
  schedule the backbone uses (scaled-linear for SD 1.x, cosine, trained betas). λ'_t < 0 because SNR falls with t,
  hence β_t > 0.
- β_t is NOT clipped: on SD's scaled-linear schedule λ'_t at t = 0 is ~100x its mid-schedule value (β_0 ≈ 350 β
  vs ≈ 3.5 β at t = 500), the ELBO weighting the derivation implies. The sigmoid bounds each sample's loss
  gradient by β_t, and the training loop's gradient clipping and AdamW keep steps bounded; per-batch losses are
  spiky when a batch draws t near 0 (expected, not divergence).
- ᾱ is clamped to [1e-12, 1 − 1e-12] before the log so zero-terminal-SNR schedules give a finite (huge) weight
  instead of inf; such a t is practically never drawn twice in a row, and the sigmoid bounds the loss anyway.
- ||·||² is the MEAN over latent elements per sample (as Diffusion-DPO's reference implementation does), so β is
  independent of the latent resolution. The loss is averaged over the batch.
- Target: ε for ``prediction_type="epsilon"``; the velocity for ``"v_prediction"`` (the same derivation holds in
  v-space up to a per-t factor that β_t absorbs). Other prediction types are refused.
- With the LoRA's B matrices at zero (peft's init) ε_θ ≡ ε_ref, Δ = 0 and the loss is exactly log 2.
- ``cpo_batch``: ε_ref is the same UNet under ``lora_disabled`` (no graph), ε_θ runs under ``taca_context`` with
  each sample's own t, so only the LoRA's first k(t) rank dimensions receive gradient from that sample.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ops.diffusion.lora import lora_disabled
from ops.diffusion.taca import taca_context

_EPS = 1e-12


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.double().clamp(_EPS, 1 - _EPS)
    return torch.log(a) - torch.log1p(-a)


def log_snr_derivative(scheduler) -> torch.Tensor:
    """dλ/ds at every training timestep (float64, length T), s = t / T."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod; APO needs a discrete DDPM-family "
                        f"scheduler (DDIMScheduler, DDPMScheduler, ...) to derive β_t from its log-SNR")
    lam = log_snr(torch.as_tensor(ac))
    T = lam.numel()
    if T < 2:
        raise ValueError("scheduler has fewer than 2 training timesteps; cannot differentiate its log-SNR")
    d = torch.empty_like(lam)
    d[1:-1] = (lam[2:] - lam[:-2]) / 2
    d[0] = lam[1] - lam[0]
    d[-1] = lam[-1] - lam[-2]
    return d * T


def beta_t(scheduler, timesteps: torch.Tensor, beta: float) -> torch.Tensor:
    """β_t = −½ β λ'_t for integer training timesteps (float32, on the timesteps' device)."""
    d = log_snr_derivative(scheduler)
    idx = torch.as_tensor(timesteps).long().cpu()
    return (-0.5 * beta * d[idx]).float().to(torch.as_tensor(timesteps).device)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type={kind!r} is not supported by APO; use 'epsilon' or 'v_prediction'")


def cpo_delta(pred_policy: torch.Tensor, pred_ref: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample Δ = mean||ε_θ − ε||² − mean||ε_ref − ε||² (float32)."""
    dims = tuple(range(1, target.ndim))
    err_policy = (pred_policy.float() - target.float()).pow(2).mean(dim=dims)
    err_ref = (pred_ref.float() - target.float()).pow(2).mean(dim=dims)
    return err_policy - err_ref


def cpo_loss(pred_policy: torch.Tensor, pred_ref: torch.Tensor, target: torch.Tensor,
             betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_APO averaged over the batch, and the per-sample Δ (detached) for logging."""
    delta = cpo_delta(pred_policy, pred_ref.detach(), target)
    loss = -F.logsigmoid(-betas.to(delta) * delta).mean()
    return loss, delta.detach()


def cpo_batch(unet: Any, scheduler: Any, latents: torch.Tensor, cond: torch.Tensor, rng: torch.Generator,
              beta: float, k_min: int, k_max: int, batch_size: int,
              timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One CPO mini-batch: (loss, per-sample Δ). Randomness comes from ``rng`` only."""
    T = scheduler.config.num_train_timesteps
    idx = torch.randint(0, latents.shape[0], (batch_size,), generator=rng, device=rng.device)
    z0 = latents[idx.to(latents.device)]
    noise = torch.randn(z0.shape, generator=rng, device=rng.device).to(z0)
    if timesteps is None:
        timesteps = torch.randint(0, T, (batch_size,), generator=rng, device=rng.device)
    t = timesteps.to(z0.device).long()
    zt = scheduler.add_noise(z0, noise, t)
    target = prediction_target(scheduler, z0, noise, t)
    c = cond.expand(batch_size, -1, -1)
    with torch.no_grad(), lora_disabled(unet):
        ref = unet(zt, t, encoder_hidden_states=c).sample
    with taca_context(unet, t, k_min, k_max, T):
        policy = unet(zt, t, encoder_hidden_states=c).sample
    return cpo_loss(policy, ref, target, beta_t(scheduler, t, beta))


@torch.no_grad()
def support_loss(unet: Any, scheduler: Any, latents: torch.Tensor, cond: torch.Tensor, beta: float, k_min: int,
                 k_max: int, n: int = 8, seed: int = 12345) -> float:
    """Mean CPO loss over a fixed probe: every support latent at the midpoints of ``n`` equal bins of [0, T) with
    seeded noise (a stratified estimate of E_t[L], low-variance, to compare an adapter before and after training).
    Midpoints keep t = 0 out, where SD's β_t is ~100x the mid-schedule value and one sample would dominate."""
    T = scheduler.config.num_train_timesteps
    rng = torch.Generator("cpu").manual_seed(seed)
    t = ((torch.arange(n) + 0.5) * T / n).long()
    total = 0.0
    for i in range(latents.shape[0]):
        total += float(cpo_batch(unet, scheduler, latents[i:i + 1], cond, rng, beta, k_min, k_max, n, timesteps=t)[0])
    return total / latents.shape[0]
