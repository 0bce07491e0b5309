"""DDIM sampling, inversion (eq. 4), masked inversion (eq. 8) and latent blending on the tiny backbone."""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch

from ops.diffusion import inversion as invm
from ops.diffusion.blend import LatentBlend, forward_noised, latent_mask
from ops.diffusion.branches import Branch
from ops.diffusion.ddim import DDIMGrid, cfg, cfg_branches, ddim_grid, linear_guidance, sample

torch.set_num_threads(1)

# Reconstruction tolerance (max |reconstruct(invert(z0)) − z0| / max |z0|) with an exact denoiser, 50 steps.
# Measured 0.052 ("current", eq. 4 as printed) and 0.025 ("next"); first order: halves when steps double.
RECON_TOL = {"current": 0.06, "next": 0.03}


class GaussianDenoiser(torch.nn.Module):
    """Exact ε for data ~ N(mu, I): a UNet stand-in whose DDIM ODE is a true probability-flow ODE, so inversion
    accuracy is limited only by discretisation (the untrained tiny UNet is no denoiser: its ODE does not invert)."""

    def __init__(self, alphas_cumprod: torch.Tensor, mu: torch.Tensor):
        super().__init__()
        self.ac = alphas_cumprod.double()
        self.mu = mu.double()

    def forward(self, sample, timestep, encoder_hidden_states=None, **kw):
        a = float(self.ac[int(timestep)])
        eps = (1 - a) ** 0.5 * (sample.double() - a ** 0.5 * self.mu)
        return types.SimpleNamespace(sample=eps.to(sample.dtype))


@pytest.fixture(scope="module")
def cond(bb):
    with torch.no_grad():
        return bb.encode_prompt(["a photo of a scratch"]), bb.null_embedding()


def _z(seed, shape=(1, 4, 32, 32)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mask():
    m = np.zeros((128, 128), bool)
    m[40:90, 30:70] = True
    return m


@pytest.fixture(scope="module")
def gauss(bb):
    mu = 0.5 * _z(7)
    return dataclasses.replace(bb, unet=GaussianDenoiser(bb.scheduler.alphas_cumprod, mu)), mu


def _rel_err(fake, z0, c, steps, mode):
    inv = invm.invert(fake, z0, c, num_steps=steps, eps_timestep=mode)
    return float((invm.reconstruct(fake, inv, c) - z0).abs().max() / z0.abs().max())


@pytest.mark.parametrize("mode", ["current", "next"])
def test_inversion_then_sampling_reconstructs(gauss, cond, mode):
    fake, mu = gauss
    z0 = mu + _z(8)
    err50 = _rel_err(fake, z0, cond[0], 50, mode)
    assert err50 < RECON_TOL[mode]
    assert _rel_err(fake, z0, cond[0], 100, mode) < 0.7 * err50 < 0.7 * _rel_err(fake, z0, cond[0], 25, mode)


def test_broken_timestep_order_fails_reconstruction(gauss, cond, monkeypatch):
    fake, mu = gauss
    z0 = mu + _z(8)

    def reversed_grid(scheduler, n):
        g = ddim_grid(scheduler, n)
        return DDIMGrid(timesteps=tuple(reversed(g.timesteps)), alphas=g.alphas)

    monkeypatch.setattr(invm, "ddim_grid", reversed_grid)
    assert _rel_err(fake, z0, cond[0], 50, "current") > 5 * RECON_TOL["current"]


def _x0_form_move(z, eps, a_from, a_to):
    x0 = (z - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
    return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps


def test_inversion_follows_eq4_on_the_tiny_unet(bb, cond):
    z0 = _z(1)
    before = bb.scheduler.timesteps.clone()
    inv = invm.invert(bb, z0, cond[0], num_steps=8, keep_trajectory=True)
    assert torch.equal(bb.scheduler.timesteps, before)  # the shared scheduler is not re-stepped by the toolkit
    g = inv.grid
    assert g.timesteps == (0, 1, 126, 251, 376, 501, 626, 751, 876)  # SD's "leading" spacing + steps_offset 1
    assert float(g.alphas[0]) == float(bb.scheduler.alphas_cumprod[0])  # set_alpha_to_one=False
    assert len(inv.trajectory) == 9 and torch.equal(inv.trajectory[0], z0) and torch.equal(inv.trajectory[8], inv.zT)
    for k in range(1, 9):
        with torch.no_grad():
            eps = bb.unet(inv.trajectory[k - 1], g.timesteps[k - 1], encoder_hidden_states=cond[0]).sample
        expected = _x0_form_move(inv.trajectory[k - 1], eps, float(g.alphas[k - 1]), float(g.alphas[k]))
        torch.testing.assert_close(inv.trajectory[k], expected, atol=2e-5, rtol=1e-5)


def test_masked_inversion_follows_eq8(bb, cond):
    z0 = _z(2)
    c2 = cond[0]
    inv = invm.invert(bb, z0, c2, num_steps=6, mask=_mask(), keep_trajectory=True)
    m = latent_mask(_mask(), (32, 32))
    assert inv.mask.shape == (1, 1, 32, 32) and torch.equal(inv.mask, m)
    g, z = inv.grid, torch.where(m, 0.0, z0)  # z̃_0^m = (1 − m) ⊙ z0
    assert torch.equal(inv.trajectory[0], z)
    for k in range(1, 7):
        a_t, a_p = float(g.alphas[k]), float(g.alphas[k - 1])
        with torch.no_grad():
            eps = bb.unet(z, g.timesteps[k - 1], encoder_hidden_states=c2).sample  # ε_θ(z̃_{t−1}^m, t−1, C_2)
        z = a_t ** 0.5 * (a_p ** -0.5 * z + (1 - m.float()) * ((1 / a_t - 1) ** 0.5 - (1 / a_p - 1) ** 0.5) * eps)
        torch.testing.assert_close(inv.trajectory[k], z, atol=2e-5, rtol=1e-5)
        assert inv.trajectory[k][m.expand_as(z)].abs().max() == 0  # the defect area stays exactly empty
    plain = invm.invert(bb, torch.where(m, 0.0, z0), c2, num_steps=6)
    assert (plain.zT - inv.zT).abs().max() > 1e-2  # unmasked noise updates would fill the defect area


def test_latent_blend_keeps_the_normal_trajectory_bit_identical(bb, cond):
    normal = invm.invert(bb, _z(3), cond[0], num_steps=6, keep_trajectory=True)
    m = latent_mask(_mask(), (32, 32))
    blend = LatentBlend(m, normal.trajectory)
    outside = ~m.expand(1, 4, 32, 32)
    seen = []

    def check(state):
        z = state.latents["x"]
        assert torch.equal(z[outside], normal.trajectory[state.level_to][outside])
        seen.append(float((z[~outside] - normal.trajectory[state.level_to][~outside]).abs().max()))

    z_T = blend.start(_z(4), normal.grid)
    assert torch.equal(z_T[outside], normal.zT[outside])
    branches, guidance = cfg_branches(cond[0], cond[1], 3.0)
    out = sample(bb, z_T, branches, guidance, num_steps=6, callbacks=[blend, check])["x"]
    assert len(seen) == 6 and min(seen) > 1e-3  # inside the mask the sample is its own
    assert torch.equal(out[outside], normal.trajectory[0][outside])


def test_forward_noised_trajectory(bb):
    g = ddim_grid(bb.scheduler, 5)
    z0, noise = _z(5), _z(6)
    tr = forward_noised(g, z0, noise)
    assert torch.equal(tr[0], z0) and len(tr) == 6
    torch.testing.assert_close(tr[5], float(g.alphas[5]) ** 0.5 * z0 + float(1 - g.alphas[5]) ** 0.5 * noise)


def test_latent_mask_rules():
    m = np.zeros((128, 128), bool)
    m[0:4, 0:4] = True  # one full 4x4 latent cell
    m[8:9, 8:10] = True  # 2 pixels of cell (2, 2)
    anyc = latent_mask(m, (32, 32), "any")[0, 0]
    major = latent_mask(m, (32, 32), "majority")[0, 0]
    assert anyc.sum() == 2 and bool(anyc[2, 2]) and major.sum() == 1 and bool(major[0, 0])
    tiny = np.zeros((128, 128), bool)
    tiny[50, 50] = True  # below half a cell everywhere: "majority" falls back to "any"
    assert latent_mask(tiny, (16, 16), "majority").sum() == 1


def test_guidance_and_sampling(bb, cond):
    c, u = cond
    zT = _z(9)
    plain = sample(bb, zT, [Branch("text", c)], num_steps=4)["x"]
    b2, g1 = cfg_branches(c, u, 1.0)
    assert len(b2) == 1 and torch.equal(sample(bb, zT, b2, g1, num_steps=4)["x"], plain)
    two = [Branch("uncond", u), Branch("text", c)]
    at1 = sample(bb, zT, two, cfg(1.0), num_steps=4)["x"]
    torch.testing.assert_close(at1, plain, atol=1e-5, rtol=1e-5)
    at5 = sample(bb, zT, two, cfg(5.0), num_steps=4)["x"]
    assert (at5 - plain).abs().max() > 1e-2
    lin = linear_guidance("uncond", [(5.0, "text", "uncond"), (lambda step: 0.0, "text", "uncond")])
    torch.testing.assert_close(sample(bb, zT, two, lin, num_steps=4)["x"], at5, atol=1e-5, rtol=1e-5)
    steps = []
    sample(bb, zT, [Branch("text", c)], num_steps=4, start_step=2, callbacks=[lambda s: steps.append(s.step)])
    assert steps == [2, 3]
