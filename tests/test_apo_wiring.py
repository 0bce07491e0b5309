"""APO wiring through the plugin's real fit / synthesize path on tiny: what reaches each term of the equations.

Every expectation is rebuilt here from the paper's formulas (three UNet calls per step, the L2 channel norm, k(t)
weights, a Gaussian blur from scipy, normalisation by the peak) rather than from the module's own helpers, so a
one-line slip in the plugin's hand-offs (scales, prompts, ranks, σ, threshold, β, t_small) fails a test.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ops.methods.apo import loss as apo_loss
from ops.methods.apo import sampling as apo_sampling

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
torch.set_num_threads(1)

CATEGORY, DEFECT = "brick", "crack"
PROMPT = "a photo of a brick with a crack defect"
SIZE = 72


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        base = (rng.random(3) * 200)[None, None] + 30 * np.sin(xx / rng.uniform(3, 9) + yy / 11)[..., None]
        out.append(np.clip(base + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def bb():
    from ops.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu", cache=False)  # private: the plugin adds and removes its LoRA


@pytest.fixture(scope="module")
def support():
    from ops.types import Sample

    mask = np.zeros((SIZE, SIZE), bool)
    mask[20:50, 10:60] = True
    return [Sample(f"crack_{i}", CATEGORY, DEFECT, img, mask) for i, img in enumerate(_images(2, SIZE, seed=0))]


def _adapter(bb, support, out, **opts):
    """A fitted adapter whose LoRA B matrices are made non-zero: a fresh LoRA equals the reference, and the
    branches must differ for a swapped slot or scale to show."""
    from safetensors.torch import load_file, save_file

    from ops.methods.apo import APO

    method = APO()
    adapter = method.fit(bb, support, method.config({"train_steps": 0, **opts}), out)
    path = out / DEFECT / "pytorch_lora_weights.safetensors"
    g = torch.Generator().manual_seed(5)
    weights = {k: (0.05 * torch.randn(v.shape, generator=g) if ".lora.up." in k else v)
               for k, v in sorted(load_file(str(path)).items())}
    save_file(weights, str(path))
    return adapter


@pytest.fixture(scope="module")
def adapters(bb, support, tmp_path_factory):
    return {True: _adapter(bb, support, tmp_path_factory.mktemp("apo_taca")),
            False: _adapter(bb, support, tmp_path_factory.mktemp("apo_full"), taca=False)}


def _k(t: int, k_min: int, k_max: int, T: int = 1000) -> int:
    """TACA's active rank, the paper's formula."""
    return int(math.floor(k_min + (k_max - k_min) * (T - t) / T))


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """The documented smoothing: Gaussian of σ, truncated at ceil(3σ), mirrored at the borders."""
    from scipy.ndimage import gaussian_filter

    radius = int(math.ceil(3 * sigma))
    return gaussian_filter(x.astype(np.float64), sigma, mode="mirror", truncate=radius / sigma)


def _expected_map(devs: list[torch.Tensor], ks: list[int], size: tuple[int, int], sigma: float) -> np.ndarray:
    w = np.asarray(ks, np.float64) / sum(ks)
    agg = sum(wi * d.double() for wi, d in zip(w, devs))
    up = F.interpolate(agg[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    smooth = np.clip(_blur(up, sigma * min(size)), 0, None)
    return smooth / smooth.max()


# (mode, branch_mode, taca): both samplers, both placements, an adapter trained with and one without TACA
CASES = [("placed", "batched", True), ("placed", "sequential", True), ("free", "batched", False)]


@pytest.mark.parametrize("mode,branch_mode,taca", CASES)
def test_synthesize_hands_each_scale_prompt_rank_sigma_and_threshold_to_its_own_term(bb, adapters, monkeypatch,
                                                                                   mode, branch_mode, taca):
    """Through APO.synthesize: at every step ref_u = ε_ref(z_t, ∅), ref_c = ε_ref(z_t, c), theta_c = ε_θ(z_t, c) at
    TACA's k(t) of the schedule the adapter was trained with, ε̂ = ε_u + s_text Δ_text + s_align Δ_align with the
    config's two scales; the localization extra is the k(t)-weighted channel-L2 ||Δ_align|| map, smoothed with
    the config's σ and divided by its peak; the mask uses the config's threshold and min_keep."""
    from ops.diffusion.lora import lora_disabled
    from ops.diffusion.taca import taca_context
    from ops.methods.apo import APO
    from ops.types import Sample, SynthesisJob

    method = APO()
    s_text, s_align, sigma, threshold, min_keep, steps = 3.0, 2.0, 0.05, 0.6, 0.2, 3
    cfg = method.config({"mode": mode, "branch_mode": branch_mode, "steps": steps, "s_text": s_text,
                         "s_align": s_align, "smooth_sigma": sigma, "threshold": threshold, "min_keep": min_keep})
    k_min, k_max = (1, 4) if taca else (4, 4)
    unet = bb.unet
    with torch.no_grad():
        cond, uncond = bb.encode_prompt([PROMPT]), bb.null_embedding()
    seen: dict[str, list] = {"deltas": [], "ks": [], "start": [], "layouts": []}
    gaps = []

    def check(state):
        z, t = state.before["x"], state.t
        if state.step == 0:
            seen["start"].append(z.clone())
        with torch.no_grad():
            with lora_disabled(unet):
                e_u = unet(z, t, encoder_hidden_states=uncond).sample
                e_c = unet(z, t, encoder_hidden_states=cond).sample
            with taca_context(unet, [t], k_min, k_max, 1000):
                e_th = unet(z, t, encoder_hidden_states=cond).sample
        for name, want in (("ref_u", e_u), ("ref_c", e_c), ("theta_c", e_th)):
            torch.testing.assert_close(state.eps_branches[name], want, atol=1e-5, rtol=1e-4, msg=f"{name} t={t}")
        want = e_u + s_text * (e_c - e_u) + s_align * (e_th - e_c)
        torch.testing.assert_close(state.eps["x"], want, atol=1e-5, rtol=1e-4, msg=f"guidance t={t}")
        for other in (e_u + s_align * (e_c - e_u) + s_text * (e_th - e_c),  # scales swapped
                      e_u + s_text * (e_c - e_u) + s_text * (e_th - e_c),  # one scale for both terms
                      e_u + s_align * (e_c - e_u) + s_align * (e_th - e_c)):
            gaps.append(float((other - want).abs().max()))
        seen["deltas"].append((e_th - e_c).double()[0])  # (C, h, w)
        seen["ks"].append(_k(t, k_min, k_max))

    real_sample, real_begin = apo_sampling.sample, apo_sampling.LoRAGate.begin_call

    def sample(*a, callbacks=(), **kw):
        return real_sample(*a, callbacks=[*callbacks, check], **kw)

    def begin_call(self, layout, shape):
        seen["layouts"].append([name for name, _ in layout])
        return real_begin(self, layout, shape)

    monkeypatch.setattr(apo_sampling, "sample", sample)
    monkeypatch.setattr(apo_sampling.LoRAGate, "begin_call", begin_call)
    normal = Sample("good_0", CATEGORY, "good", _images(1, SIZE, seed=9)[0])
    target = np.zeros((SIZE, SIZE), bool)
    target[12:44, 18:58] = True
    job = SynthesisJob(0, 123, CATEGORY, DEFECT, normal, target)
    r = next(iter(method.synthesize(bb, adapters[taca], [job], cfg)))

    assert len(seen["deltas"]) == steps and min(gaps) > 1e-2  # every step checked; a swapped scale would show
    assert len(set(seen["ks"])) == (3 if taca else 1)
    per_call = [["ref_u", "ref_c", "theta_c"]] if branch_mode == "batched" else [["ref_u"], ["ref_c"], ["theta_c"]]
    assert seen["layouts"] == per_call * steps
    if mode == "free":  # the job's seed is the start noise
        from ops.methods.apo.sampling import initial_noise

        assert torch.equal(seen["start"][0], initial_noise(bb, 123))

    loc = r.extras["localization"]
    l2 = [d.pow(2).sum(0).sqrt() for d in seen["deltas"]]  # ||Δ_align|| over latent channels per latent pixel
    want = _expected_map(l2, seen["ks"], (SIZE, SIZE), sigma)
    np.testing.assert_allclose(loc, want, atol=1e-4)
    assert float(loc.max()) == pytest.approx(1.0)
    # the check tells the documented map from its near misses
    near = {"L1": _expected_map([d.abs().sum(0) for d in seen["deltas"]], seen["ks"], (SIZE, SIZE), sigma),
            "squared": _expected_map([d.pow(2).sum(0) for d in seen["deltas"]], seen["ks"], (SIZE, SIZE), sigma),
            "sigma 0.02": _expected_map(l2, seen["ks"], (SIZE, SIZE), 0.02)}
    if taca:
        near["plain mean"] = _expected_map(l2, [1] * steps, (SIZE, SIZE), sigma)
    for name, other in near.items():
        assert np.abs(other - want).max() > 1e-3, name

    if mode == "free":
        assert np.array_equal(r.mask, loc > threshold)
        assert not np.array_equal(r.mask, loc > 0.5)
    else:
        inside = loc[target].max()
        refined = target & (loc / inside > threshold)
        assert refined.sum() >= min_keep * target.sum()
        assert np.array_equal(r.mask, refined)
        assert not np.array_equal(refined, target & (loc / inside > min_keep))  # threshold/min_keep swapped


def _beta_t(scheduler, t: torch.Tensor, beta: float, small_t: str, t_small: int) -> torch.Tensor:
    """β_t = −½ β dλ/ds, s = t / T, λ = log SNR by central differences; "clip" caps it at its max over [t_small, T)."""
    a = scheduler.alphas_cumprod.double().numpy()
    lam = np.log(a) - np.log1p(-a)
    raw = -0.5 * beta * np.gradient(lam) * len(a)
    if small_t == "clip":
        raw = np.minimum(raw, raw[t_small:].max())
    return torch.as_tensor(raw[t.cpu().numpy()])


FIT_CASES = {
    "skip": dict(beta=700.0, k_min=1, k_max=3, batch_size=3, small_t="skip", t_small=300),
    "clip": dict(beta=700.0, k_min=2, k_max=3, batch_size=6, small_t="clip", t_small=600, seed=0),
    "no-taca": dict(k_min=1, k_max=3, taca=False),
    "no-cpo": dict(k_min=1, k_max=3, cpo=False),
}


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_hands_prompt_support_beta_ranks_batch_and_small_t_to_the_loss(bb, support, tmp_path, monkeypatch,
                                                                         case):
    """Through APO.fit: every training step's batch is drawn from the support latents under the rendered prompt,
    TACA gates it with the configured (k_min, k_max) (full rank without TACA), the CPO term gets β_t of the
    configured β and small-t treatment at each sample's own t (no CPO term at all for ``cpo=False``)."""
    from ops.diffusion.vae import encode
    from ops.methods.apo import APO

    opts = FIT_CASES[case]
    cfg = APO().config({"train_steps": 2, **opts})
    steps, gates, losses = [], [], []
    real_step, real_gate, real_loss = apo_loss.cpo_step, apo_loss.taca_context, apo_loss.cpo_loss

    def cpo_step(unet, scheduler, z0, noise, t, cond, *a, **k):
        steps.append((z0.detach().clone(), t.clone(), cond.detach().clone()))
        return real_step(unet, scheduler, z0, noise, t, cond, *a, **k)

    def taca_context(unet, t, k_min, k_max, T):
        gates.append((torch.as_tensor(t).clone(), k_min, k_max, T))
        return real_gate(unet, t, k_min, k_max, T)

    def cpo_loss(policy, ref, target, betas):
        losses.append((policy.shape[0], betas.detach().clone()))
        return real_loss(policy, ref, target, betas)

    monkeypatch.setattr(apo_loss, "cpo_step", cpo_step)
    monkeypatch.setattr(apo_loss, "taca_context", taca_context)
    monkeypatch.setattr(apo_loss, "cpo_loss", cpo_loss)
    APO().fit(bb, support, cfg, tmp_path)

    latents = torch.cat([encode(bb, s.image) for s in support])
    with torch.no_grad():
        cond = bb.encode_prompt([PROMPT])
    assert len(steps) == len(gates) == 2 and len(losses) == (2 if cfg.cpo else 0)
    ranks = (cfg.k_min, cfg.k_max) if cfg.taca else (cfg.rank, cfg.rank)
    for (z0, t, c), (gate_t, k_min, k_max, T) in zip(steps, gates):
        assert z0.shape[0] == cfg.batch_size and torch.equal(c, cond)
        assert all(any(torch.equal(z, s) for s in latents) for z in z0)  # every sample is a support latent
        assert torch.equal(gate_t.flatten(), t) and (k_min, k_max, T) == (*ranks, 1000)
        if cfg.small_t == "skip":
            assert int(t.min()) >= cfg.t_small
    drawn = torch.cat([t for _, t, _ in steps])
    for (n, betas), (_, t, _) in zip(losses, steps):
        assert n == cfg.batch_size
        torch.testing.assert_close(betas.double(), _beta_t(bb.scheduler, t, cfg.beta, cfg.small_t, cfg.t_small),
                                   rtol=1e-5, atol=0)
    if case == "clip":  # the cap is under test only where it binds (t <= 111 on SD's schedule)
        raw = _beta_t(bb.scheduler, drawn, cfg.beta, "none", cfg.t_small)
        assert (raw > _beta_t(bb.scheduler, drawn, cfg.beta, "clip", cfg.t_small)).any()


def test_training_digest_covers_every_training_option_and_no_sampling_option(bb, support):
    """A finished adapter is reused when its digest matches: every option that changes the trained LoRA must
    change it, options read only at sampling must not (or a sampling tweak would retrain). A new APOConfig field
    fails here until it is classified."""
    from dataclasses import fields, replace

    from ops.methods.apo import TRAIN_FIELDS, APOConfig, config_hash

    changed = dict(prompt="a {defect_type} on a {category}", rank=8, lora_layers="attention+conv+ff", k_min=2,
                   k_max=3, beta=10.0, small_t="skip", t_small=60, cpo=False, taca=False, train_steps=31, lr=2e-3,
                   batch_size=3, seed=1)
    sampling = dict(preset="paper", ckpt_every=7, mode="free", steps=5, s_text=4.0, s_align=1.0, threshold=0.4,
                    min_keep=0.5, smooth_sigma=0.03, branch_mode="sequential")
    assert {f.name for f in fields(APOConfig)} == set(changed) | set(sampling)
    assert set(TRAIN_FIELDS) == set(changed)
    base = APOConfig()
    digest = config_hash(base, bb, support)
    for name, value in changed.items():
        assert config_hash(replace(base, **{name: value}), bb, support) != digest, name
    for name, value in sampling.items():
        assert config_hash(replace(base, **{name: value}), bb, support) == digest, name
    pixels = [replace(support[0], image=255 - support[0].image), support[1]]
    assert config_hash(base, bb, pixels) != digest
