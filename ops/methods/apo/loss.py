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
- β_t at small t (configurable, ``small_t`` / ``t_small``): on SD's scaled-linear schedule λ'_t at t = 0 is ~100x
  its mid-schedule value (β = 1000: β_0 ≈ 348 000, β_10 ≈ 47 000, β_50 ≈ 11 400, β_500 ≈ 3 340, β_999 ≈ 6 070),
  so the ~5 % of draws with t < 50 dominate the clipped gradient and Adam's second moments (E[β_t²]/E[β_t]² = 7.8
  over U{0..999}). Treatments: ``"clip"`` (default) caps β_t at max_{s >= t_small} β_s, i.e. at β_50 ≈ 3.4x the
  mid value for t_small = 50 (E[β²]/E[β]² = 1.18), keeping every t in training (TACA's high rank dimensions are
  only trained near t = 0); ``"skip"`` draws t from [t_small, T) instead; ``"none"`` is the raw ELBO weight.
  Their effect on the loss/gradient variance and on the adapter is measured by bench/bench_apo.py
  (``--small-t``).
- ᾱ is clamped to [1e-12, 1 − 1e-12] before the log so zero-terminal-SNR schedules give a finite (huge) weight
  instead of inf; such a t is practically never drawn twice in a row, and the sigmoid bounds the loss anyway.
- ||·||² is the MEAN over latent elements per sample (as Diffusion-DPO's reference implementation does), so β is
  independent of the latent resolution. The loss is averaged over the batch.
- Target: ε for ``prediction_type="epsilon"``; the velocity for ``"v_prediction"`` (the same derivation holds in
  v-space up to a per-t factor that β_t absorbs). Other prediction types are refused.
- With the LoRA's B matrices at zero (peft's init) ε_θ ≡ ε_ref, Δ = 0 and the loss is exactly log 2.
- ``cpo_batch`` = ``cpo_draw`` (support latents, noise, t from the seeded generator) + ``cpo_step``: ε_ref is the
  same UNet under ``lora_disabled`` (no graph), ε_θ runs under ``taca_context`` with each sample's own t, so only
  the LoRA's first k(t) rank dimensions receive gradient from that sample, and each sample's margin is weighted
  by β_t of its own t.
- Precision: Δ is a small difference of two nearly equal errors. Under fp16/bf16 autocast the UNet's predictions
  come out in half precision; both errors, Δ, β_t Δ and the log-sigmoid are computed in float32 with autocast
  switched off for the loss (the predictions are upcast before any subtraction).
- ``objective="mse"`` is the "w/o CPO" ablation: the plain denoising loss mean||ε_θ − ε||² of the LoRA policy
  (still under the TACA gate), no reference pass; its per-sample errors are returned in Δ's place.
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


SMALL_T = ("clip", "skip", "none")


def check_small_t(small_t: str, t_small: int, T: int | None = None) -> None:
    if small_t not in SMALL_T:
        raise ValueError(f"APO: small_t must be one of {SMALL_T}, got {small_t!r}")
    if t_small < 0 or (T is not None and t_small >= T):
        raise ValueError(f"APO: t_small must lie in [0, T), got {t_small}")


def beta_t(scheduler, timesteps: torch.Tensor, beta: float, small_t: str = "none", t_small: int = 0) -> torch.Tensor:
    """β_t = −½ β λ'_t for integer training timesteps (float32, on the timesteps' device); with
    ``small_t="clip"`` capped at max_{s >= t_small} β_s (module docstring)."""
    check_small_t(small_t, t_small)
    w = -0.5 * beta * log_snr_derivative(scheduler)
    if small_t == "clip" and t_small > 0:
        w = w.clamp_max(float(w[t_small:].max()))
    idx = torch.as_tensor(timesteps).long().cpu()
    return w[idx].float().to(torch.as_tensor(timesteps).device)


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type={kind!r} is not supported by APO; use 'epsilon' or 'v_prediction'")


def _errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error in float32 (upcast before subtracting)."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, target.ndim)))


def cpo_delta(pred_policy: torch.Tensor, pred_ref: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample Δ = mean||ε_θ − ε||² − mean||ε_ref − ε||² (float32)."""
    return _errors(pred_policy, target) - _errors(pred_ref, target)


def cpo_loss(pred_policy: torch.Tensor, pred_ref: torch.Tensor, target: torch.Tensor,
             betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_APO averaged over the batch, and the per-sample Δ (detached) for logging; float32 even under autocast."""
    with torch.autocast(pred_policy.device.type, enabled=False):
        delta = cpo_delta(pred_policy, pred_ref.detach(), target)
        loss = -F.logsigmoid(-betas.float().to(delta.device) * delta).mean()
    return loss, delta.detach()


def cpo_draw(latents: torch.Tensor, rng: torch.Generator, batch_size: int, T: int,
             t_low: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z0, ε, t) for one mini-batch: support latents with replacement, noise, t ~ U{t_low..T−1}, from ``rng``."""
    idx = torch.randint(0, latents.shape[0], (batch_size,), generator=rng, device=rng.device)
    z0 = latents[idx.to(latents.device)]
    noise = torch.randn(z0.shape, generator=rng, device=rng.device).to(z0)
    t = torch.randint(t_low, T, (batch_size,), generator=rng, device=rng.device)
    return z0, noise, t


def cpo_step(unet: Any, scheduler: Any, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             cond: torch.Tensor, beta: float, k_min: int, k_max: int, small_t: str = "none", t_small: int = 0,
             objective: str = "cpo") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-sample Δ) of one mini-batch; each sample is gated by TACA's k(t) and weighted by β_t of its t."""
    if objective not in ("cpo", "mse"):
        raise ValueError(f"APO objective must be 'cpo' or 'mse', got {objective!r}")
    T = scheduler.config.num_train_timesteps
    t = timesteps.to(z0.device).long()
    zt = scheduler.add_noise(z0, noise, t)
    target = prediction_target(scheduler, z0, noise, t)
    c = cond.expand(z0.shape[0], -1, -1)
    with taca_context(unet, t, k_min, k_max, T):
        policy = unet(zt, t, encoder_hidden_states=c).sample
    if objective == "mse":
        with torch.autocast(policy.device.type, enabled=False):
            err = _errors(policy, target)
        return err.mean(), err.detach()
    with torch.no_grad(), lora_disabled(unet):
        ref = unet(zt, t, encoder_hidden_states=c).sample
    return cpo_loss(policy, ref, target, beta_t(scheduler, t, beta, small_t, t_small))


def cpo_batch(unet: Any, scheduler: Any, latents: torch.Tensor, cond: torch.Tensor, rng: torch.Generator,
              beta: float, k_min: int, k_max: int, batch_size: int, timesteps: torch.Tensor | None = None,
              small_t: str = "none", t_small: int = 0, objective: str = "cpo") -> tuple[torch.Tensor, torch.Tensor]:
    """One CPO mini-batch: (loss, per-sample Δ). Randomness comes from ``rng`` only."""
    T = scheduler.config.num_train_timesteps
    check_small_t(small_t, t_small, T)
    z0, noise, t = cpo_draw(latents, rng, batch_size, T, t_small if small_t == "skip" else 0)
    if timesteps is not None:
        t = timesteps
    return cpo_step(unet, scheduler, z0, noise, t, cond, beta, k_min, k_max, small_t, t_small, objective)


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
