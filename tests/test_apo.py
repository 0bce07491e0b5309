"""APO: CPO loss, β_t from the log-SNR derivative, TACA-weighted localization, hierarchical sampling, the plugin."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ops.methods import apo_loss, apo_sampling

torch.set_num_threads(1)


# ---------------------------------------------------------------- pure parts (no backbone)

def test_cpo_loss_is_log2_when_policy_equals_reference():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 8, 8, generator=g)
    target = torch.randn(3, 4, 8, 8, generator=g)
    loss, delta = apo_loss.cpo_loss(pred.clone(), pred, target, torch.tensor([5.0, 50.0, 500.0]))
    assert torch.equal(delta, torch.zeros(3))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_cpo_loss_prefers_the_policy_closer_to_the_noise():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 4, 8, 8, generator=g)
    ref = target + 0.5 * torch.randn(2, 4, 8, 8, generator=g)
    better = target + 0.1 * (ref - target)
    worse = target + 2.0 * (ref - target)
    betas = torch.tensor([10.0, 10.0])
    loss_better, d_better = apo_loss.cpo_loss(better, ref, target, betas)
    loss_worse, d_worse = apo_loss.cpo_loss(worse, ref, target, betas)
    assert (d_better < 0).all() and (d_worse > 0).all()
    assert loss_better.item() < math.log(2) < loss_worse.item()
    expected = -torch.nn.functional.logsigmoid(-betas * d_better).mean()
    assert loss_better.item() == pytest.approx(expected.item(), rel=1e-6)


def test_beta_t_is_exact_for_a_schedule_linear_in_log_snr():
    # λ(s) = 6 − 12 s exactly: ᾱ = sigmoid(λ), betas from consecutive ratios
    T = 1000
    s = torch.arange(T, dtype=torch.float64) / T
    abar = torch.sigmoid(6.0 - 12.0 * s)
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    sched = DDIMScheduler(num_train_timesteps=T, trained_betas=betas.numpy())
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    bt = apo_loss.beta_t(sched, t, beta=3.0)
    # alphas_cumprod is float32 in diffusers, hence the tolerance
    assert torch.allclose(bt, torch.full((6,), -0.5 * 3.0 * -12.0), rtol=2e-3)


def test_beta_t_matches_the_analytic_log_snr_derivative_of_the_cosine_schedule():
    T = 1000
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    t = torch.arange(20, 900, 37)
    # diffusers: alphas_cumprod[i] = f((i+1)/T) / f(0), f(s) = cos²((s + 0.008)/1.008 · π/2)
    s = (t.double() + 1) / T
    a = (s + 0.008) / 1.008 * math.pi / 2
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    abar = torch.cos(a) ** 2 / f0
    dabar = -torch.sin(2 * a) * (math.pi / 2 / 1.008) / f0
    dlam = dabar / (abar * (1 - abar))
    bt = apo_loss.beta_t(sched, t, beta=2.0)
    assert (bt > 0).all()
    assert torch.allclose(bt.double(), -0.5 * 2.0 * dlam, rtol=5e-3)


def test_beta_t_follows_the_sd_schedule():
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([100, 500, 900])
    bt = apo_loss.beta_t(sched, t, beta=1.0)
    lam = apo_loss.log_snr(sched.alphas_cumprod)
    # a wider central stencil agrees with the central difference where the schedule is smooth
    wide = -(lam[t + 2] - lam[t - 2]) / 4 * 1000
    assert torch.allclose(bt.double(), 0.5 * wide, rtol=0.01)
    assert (apo_loss.beta_t(sched, torch.arange(1000), beta=1.0) > 0).all()


def test_beta_t_refuses_a_scheduler_without_alphas():
    class Flow:
        pass

    with pytest.raises(TypeError, match="alphas_cumprod"):
        apo_loss.log_snr_derivative(Flow())


def test_hierarchical_guidance_with_zero_align_is_plain_cfg_bitwise():
    g = torch.Generator().manual_seed(2)
    u, c, p = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    eps_hat, delta = apo_sampling.hierarchical_guidance(u, c, p, s_text=7.5, s_align=0.0)
    assert torch.equal(eps_hat, u + 7.5 * (c - u))
    assert torch.equal(delta, p - c)
    eps_hat2, _ = apo_sampling.hierarchical_guidance(u, c, p, s_text=7.5, s_align=2.0)
    assert torch.allclose(eps_hat2, u + 7.5 * (c - u) + 2.0 * (p - c))


def test_localization_of_zero_deviation_is_all_zeros():
    loc = apo_sampling.localization_map([torch.zeros(8, 8)] * 3, [1, 2, 3], (32, 48))
    assert loc.shape == (32, 48) and loc.dtype == np.float32
    assert not loc.any()
    assert not apo_sampling.threshold_map(loc, 0.5).any()


def test_localization_peaks_where_the_weighted_deviation_is_and_is_normalised():
    early = torch.zeros(8, 8)
    early[1, 1] = 1.0  # high-noise step, rank 0: must not count
    late = torch.zeros(8, 8)
    late[5:7, 5:7] = 1.0
    loc = apo_sampling.localization_map([early, late], [0, 4], (64, 64), sigma_frac=0.03)
    assert loc.max() == pytest.approx(1.0) and loc.min() >= 0
    peak = np.unravel_index(np.argmax(loc), loc.shape)
    assert 40 <= peak[0] < 56 and 40 <= peak[1] < 56
    assert loc[12, 12] < 1e-3
    mask = apo_sampling.threshold_map(loc, 0.5)
    assert mask[48, 48] and not mask[10, 10]


def test_refine_keeps_target_when_refinement_would_erase_it():
    target = np.zeros((16, 16), bool)
    target[4:12, 4:12] = True
    loc = np.zeros((16, 16), np.float32)
    loc[4:8, 4:12] = 1.0
    refined, used = apo_sampling.refine_target_mask(target, loc, 0.5, min_keep=0.25)
    assert used and refined.sum() == 32 and not (refined & ~target).any()
    refined, used = apo_sampling.refine_target_mask(target, loc, 0.5, min_keep=0.75)
    assert not used and np.array_equal(refined, target)
