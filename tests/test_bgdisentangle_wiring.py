"""bg-disentangle wiring through the real fit / synthesize path on ``tiny``: what reaches each equation.

Eq. 5's two terms and their m / (1 − m) weights (by their effect on the fitted UNet), masks staying with their
samples in a batch, the conditioning the UNet gets in eq. 8 and eq. 9, eq. 13's token columns and threshold rule,
and the background latents before the pixel paste. Each test was seen failing with its property broken on purpose.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ops.methods.bgdisentangle as pkg
from ops.diffusion.attention import AttentionController, Capture
from ops.diffusion.blend import latent_mask
from ops.diffusion.vae import encode
from ops.methods.base import check_results
from ops.methods.bgdisentangle import BgDisentangle
from ops.methods.bgdisentangle import fit as FIT
from ops.methods.bgdisentangle import loss as L
from ops.methods.bgdisentangle import sampling as S
from ops.methods.bgdisentangle.conditioning import build
from ops.types import SynthesisJob
from tests.test_bgdisentangle import SIZE, _box, _image, normal, support  # noqa: F401 (the same fixtures)

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
torch.set_num_threads(1)

STEPS = 3
TARGET = (16, 40, 12, 44)


@pytest.fixture(scope="module")
def bb():
    from ops.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu", cache=False)


@pytest.fixture(scope="module")
def fitted(bb, support, tmp_path_factory):
    method = BgDisentangle()
    adapter = method.fit(bb, support, method.config({"train_steps": 1}), tmp_path_factory.mktemp("bgdw"))
    info = FIT.read_info(adapter.path / "crack")
    return method, adapter, info


def _jobs(normal, seeds, target=TARGET):
    return [SynthesisJob(i, s, "brick", "crack", normal, _box(*target)) for i, s in enumerate(seeds)]


def _m(bb, target=TARGET) -> torch.Tensor:
    return S.target_latent_mask(_box(*target), (bb.latent_size, bb.latent_size))


# ---------------------------------------------------------------- eq. 5: both terms, each with its own weight

def _region_errors(bb, unet, cond, z0, m, eps, t) -> dict[str, float]:
    """Mean squared ε error per (branch, region): the terms of eq. 5 and their complements, weighted here."""
    with torch.no_grad():
        z_t, z_tm = L.masked_noising(bb.scheduler, z0, m, eps, t)
        e_def, e_bg = L.predictions(unet, z_t, z_tm, t, cond, m)
    inside = m.float().expand_as(eps)

    def err(w, e):
        return float(((w * (eps - e)) ** 2).sum() / w.sum())

    return {"match": err(inside, e_def), "def_outside": err(1 - inside, e_def),
            "reg": err(1 - inside, e_bg), "bg_inside": err(inside, e_bg)}


@pytest.fixture(scope="module")
def term_fits(bb, support, tmp_path_factory):
    """The fit's effect on each region's error: the full eq. 5, only the matching term, only the regulariser.

    Fixed evaluation draws (support latents, t, ε) apart from the fit's own. The attention-only LoRA of the
    default adapter adapts what each term trains far more than elsewhere (a wider LoRA learns mostly the
    region-independent part of ε-prediction, which would hide a misplaced weight)."""
    method = BgDisentangle()
    cfg = method.config({"train_steps": 6, "lr": 5e-2, "batch_size": 2})
    cond = build(bb, "sks crack defect", "an empty masked region", "a photo of a brick")
    lat, masks = FIT.support_tensors(bb, support)
    g = torch.Generator().manual_seed(123)
    idx = torch.arange(6) % len(support)
    t = torch.randint(50, 950, (6,), generator=g)
    eps = torch.randn(lat[idx].shape, generator=g)
    draws = (lat[idx], masks[idx], eps, t)
    before = _region_errors(bb, bb.unet, cond, draws[0], draws[1], eps, t)
    real = FIT.loss_batch
    deltas = {}
    for name, terms in (("full", None), ("match", ("match",)), ("reg", ("reg",))):
        if terms is not None:  # the ablations; the full fit is the production call as it stands
            FIT.loss_batch = functools.partial(real, terms=terms)
        try:
            out = tmp_path_factory.mktemp(f"terms-{name}")
            method.fit(bb, support, cfg, out)
        finally:
            FIT.loss_batch = real
        info = FIT.read_info(out / "crack")
        with FIT.adapted(bb, info, out / "crack") as tuned:
            after = _region_errors(bb, tuned.unet, cond, draws[0], draws[1], eps, t)
        deltas[name] = {k: after[k] - before[k] for k in after}
    return deltas


@pytest.mark.slow
def test_matching_term_lowers_the_defect_error_inside_m(term_fits):
    """The matching term trains ε_θ(z_t, C1) on m: alone it lowers that error, and more inside m than outside
    (a (1 − m) weight would train the outside); the full fit lowers it, and more than the fit without it."""
    full, match, reg = term_fits["full"], term_fits["match"], term_fits["reg"]
    assert match["match"] < -0.05
    assert match["match"] < match["def_outside"] - 0.05
    assert full["match"] < -0.03
    assert full["match"] < reg["match"] - 0.01


@pytest.mark.slow
def test_regulariser_lowers_the_background_error_outside_m(term_fits):
    """The regulariser trains ε_θ(z_t^m, C2) on 1 − m: alone it lowers that error, and more outside m than inside
    (an m weight would train the blank inside of z^m); the full fit lowers it, and more than the fit without it."""
    full, match, reg = term_fits["full"], term_fits["match"], term_fits["reg"]
    assert reg["reg"] < -0.01
    assert reg["reg"] < reg["bg_inside"] - 0.01
    assert full["reg"] < -0.01
    assert full["reg"] < match["reg"] - 0.02


# ---------------------------------------------------------------- masks stay with their samples in a batch

def test_fit_batches_keep_each_mask_with_its_sample(bb, support, tmp_path, monkeypatch):
    """Every training batch: the mask that noises, masks the attention and weights the loss of a sample is that
    sample's own (identified by its latent), and its defect tokens get no attention outside that mask."""
    lat = [encode(bb, s.image).float() for s in support]
    own = [latent_mask(s.mask, tuple(lat[0].shape[-2:]), rule="any")[0] for s in support]
    seen = {"noising": [], "loss": [], "attention": []}
    real_noising, real_pred, real_loss = L.masked_noising, L.predictions, L.disentangle_loss

    def which(z0):
        hits = [i for i, z in enumerate(lat) if torch.allclose(z0, z[0], atol=1e-5)]
        assert len(hits) == 1
        return hits[0]

    def noising(scheduler, z0, m, eps, t):
        ids = [which(z) for z in z0]
        seen["noising"].append(ids)
        for i, mi in zip(ids, m):
            assert torch.equal(mi, own[i])
        out = real_noising(scheduler, z0, m, eps, t)
        seen["ids"] = ids
        return out

    def predictions(unet, z_t, z_tm, t, cond, m, **kw):
        ctrls = []
        out = real_pred(unet, z_t, z_tm, t, cond, m, extra_rules=[Capture(kind="cross", name="spy")],
                        controllers=ctrls)
        ctrl, n = ctrls[0], cond.length
        for b, i in enumerate(seen["ids"]):
            assert torch.equal(z_tm[b][own[i].expand_as(z_tm[b])], torch.zeros(int(own[i].sum()) * z_tm.shape[1]))
            for layer, (h, w) in ctrl.layer_hw.items():
                if ctrl.infos[layer].kind != "cross":
                    continue
                p = ctrl.maps("cross", L.DEF, layers=[layer], name="spy")[b]  # (h, w, 2L)
                inside = latent_mask(own[i][None], (h, w), rule="majority")[0, 0]
                assert p[..., :n][~inside].abs().max() == 0 and p[..., n:][inside].abs().max() == 0
        seen["attention"].append(list(seen["ids"]))
        return out

    def loss(eps, e_def, e_bg, m, terms=L.TERMS):
        for i, mi in zip(seen["ids"], m):
            assert torch.equal(mi, own[i])
        seen["loss"].append(list(seen["ids"]))
        return real_loss(eps, e_def, e_bg, m, terms)

    monkeypatch.setattr(L, "masked_noising", noising)
    monkeypatch.setattr(L, "predictions", predictions)
    monkeypatch.setattr(L, "disentangle_loss", loss)
    method = BgDisentangle()
    method.fit(bb, support, method.config({"train_steps": 3, "batch_size": 3}), tmp_path)
    assert len(seen["noising"]) == len(seen["attention"]) == len(seen["loss"]) == 3
    # the check can fail: some batch holds samples with different masks in different slots
    assert any(len(set(ids)) > 1 for ids in seen["noising"])


# ---------------------------------------------------------------- eq. 8 under C2, eq. 9's defect branch under C1

def _unet_calls(unet):
    """(latent, t, conditioning) of every UNet call, recorded before the call."""
    calls = []

    def hook(_module, args, kwargs):
        calls.append((args[0].detach().float().clone(), torch.as_tensor(args[1]).clone(),
                      kwargs["encoder_hidden_states"].detach().float().clone()))

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("cache", [True, False])
def test_inversion_runs_under_c2_and_the_defect_branch_under_c1(bb, fitted, normal, monkeypatch, cache):
    """With m ≠ 0 every UNet row on the masked stream (exactly 0 inside m: eq. 8's z̃^m and eq. 9's z_t^m) gets
    C2 = [C_m, C_bg], every row on z_t* gets C1 = [C_def, C_bg]; the first STEPS calls are eq. 8 (ascending t)."""
    method, adapter, info = fitted
    cond = build(bb, info["def_prompt"], info["m_prompt"], info["bg_prompt"])
    c1, c2 = cond.c1[0].float(), cond.c2[0].float()
    assert not torch.equal(c1, c2)
    m = _m(bb)[0, 0]
    calls, handle = _unet_calls(bb.unet)
    try:
        list(check_results(_jobs(normal, [5]), method.synthesize(
            bb, adapter, _jobs(normal, [5]), method.config({"steps": STEPS, "cache_inversion": cache}))))
    finally:
        handle.remove()
    kinds = []
    for z, t, c in calls:
        for zb, cb in zip(z, c):
            masked = bool((zb[:, m] == 0).all())
            assert torch.equal(cb, c2 if masked else c1), f"masked={masked} got the wrong conditioning"
            kinds.append("C2" if masked else "C1")
    inversion = calls[:STEPS]
    assert all(torch.equal(c[0], c2) for _, _, c in inversion)
    ts = [int(t.flatten()[0]) for _, t, _ in inversion]
    assert ts == sorted(ts) and len(set(ts)) == STEPS
    assert kinds.count("C1") == STEPS and kinds.count("C2") == 2 * STEPS  # eq. 8 + eq. 9's background stream


# ---------------------------------------------------------------- eq. 13: the C_def word columns

def test_eq13_reads_the_defect_word_columns_of_c_def(bb, fitted, normal, monkeypatch):
    """The map eq. 13 thresholds is the mean over steps and layers of exactly the defect prompt's word-token
    columns (not BOS, EOS/padding, nor a C_bg column) of the defect branch's cross-attention."""
    method, adapter, info = fitted
    tok = bb.tokenizer
    ids = tok(info["def_prompt"], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    cols = [i for i, x in enumerate(ids) if x not in special]
    assert tok.decode([ids[i] for i in cols]).strip() == info["def_prompt"]
    ctrls, seen = [], []

    class Spy(AttentionController):
        def __init__(self, unet, rules=(), **kw):
            rules = list(rules)
            if any(isinstance(r, Capture) for r in rules):  # eq. 9's controller
                rules.append(Capture(kind="cross", branches=[S.DEF], name="spy"))
                ctrls.append(self)
            super().__init__(unet, rules, **kw)

    real_refine = S.refine
    monkeypatch.setattr(S, "AttentionController", Spy)
    monkeypatch.setattr(pkg, "refine", lambda a, *r: seen.append(a.clone()) or real_refine(a, *r))
    list(method.synthesize(bb, adapter, _jobs(normal, [3]), method.config({"steps": STEPS})))
    (ctrl,), (got,) = ctrls, seen
    lat = (bb.latent_size, bb.latent_size)

    def columns(cs):
        maps = []
        for r in sorted({hw[0] for hw in ctrl.layer_hw.values()}):
            try:
                a = ctrl.maps("cross", S.DEF, resolution=r, name="spy")[..., cs].sum(-1)
            except KeyError:
                continue
            maps.append(F.interpolate(a[:, None].float(), size=lat, mode="bilinear", align_corners=False)[:, 0])
        return torch.stack(maps).mean(0)[0]

    assert (got - columns(cols)).abs().max() <= 1e-6
    n = len(ids)
    # the untrained tiny spreads attention nearly evenly (a word column ~ 1/77), yet every other choice of
    # columns differs by far more than the match's tolerance
    for other in ([0], [c + 1 for c in cols], [c + n for c in cols]):  # BOS, shifted by one, C_bg's columns
        assert (got - columns(other)).abs().max() > 1e-4


# ---------------------------------------------------------------- eq. 13: threshold rule

def _ramp(bb) -> torch.Tensor:
    """A known (1, h, w) map on the latent grid: rising from 0.05 to 0.8 across the target, 0.95 elsewhere."""
    h = bb.latent_size
    return torch.where(_m(bb)[0, 0], torch.linspace(0.05, 0.8, h)[None, :].expand(h, h), torch.tensor(0.95))[None]


def _eq13(a: np.ndarray, target: np.ndarray, relative: bool) -> np.ndarray:
    m_low = F.interpolate(torch.from_numpy(target.astype(np.float32))[None, None], size=a.shape, mode="area")[0, 0]
    up = F.interpolate(torch.from_numpy(a)[None, None] * (m_low >= 0.5), size=target.shape, mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    if relative:
        up = up / up[target].max()
    return (up >= 0.5) & target


def test_eq13_threshold_is_absolute_by_default_and_half_the_peak_in_mask_on_request(bb, fitted, normal,
                                                                                      monkeypatch):
    from ops.masks.refine import attention_mask

    method, adapter, _ = fitted
    monkeypatch.setattr(S, "defect_attention", lambda ctrl, m, hw: _ramp(bb))  # one job per call
    target = _box(*TARGET)
    a = _ramp(bb)[0].numpy()
    absolute, relative = _eq13(a, target, False), _eq13(a, target, True)
    assert absolute.any() and relative.sum() > absolute.sum() + 50  # the two rules differ on this map
    rows = {}
    for rule in (None, "absolute", "peak_in_mask"):
        opts = {"steps": 2} if rule is None else {"steps": 2, "threshold_rule": rule}
        (r,) = check_results(_jobs(normal, [1]), method.synthesize(bb, adapter, _jobs(normal, [1]),
                                                                   method.config(opts)))
        rows[rule] = r
        assert r.params["mask"] == "eq13 refined"
        assert np.array_equal(attention_mask(r.extras["attention"], target), r.mask)  # the refine stage agrees
    assert np.array_equal(rows[None].mask, absolute) and rows[None].params["threshold_rule"] == "absolute"
    assert np.array_equal(rows["absolute"].mask, absolute)
    assert np.array_equal(rows["peak_in_mask"].mask, relative)
    assert rows["peak_in_mask"].params["threshold_rule"] == "peak_in_mask"


def test_threshold_rule_is_validated_and_not_part_of_the_training_digest(bb, support):
    method = BgDisentangle()
    with pytest.raises(ValueError, match="threshold_rule must be one of .*'absolute', 'peak_in_mask'.*'peak'"):
        method.config({"threshold_rule": "peak"})
    with pytest.raises(ValueError, match="threshold rule"):
        S.refine(torch.zeros(8, 8), _box(*TARGET), 0.5, "relative")
    digests = {FIT.config_hash(method.config({"threshold_rule": r}), bb, support) for r in S.THRESHOLD_RULES}
    assert digests == {"b5b1d964d769eef4"}  # the digest of this support before the option existed
    assert "threshold_rule" not in FIT.TRAIN_FIELDS


# ---------------------------------------------------------------- background latents before the paste

def test_background_latents_outside_m_are_the_background_stream_for_every_seed(bb, fitted, normal, monkeypatch):
    """Proposition 1 through synthesize: the latents handed to the decoder (before any pixel paste) equal the
    eq. 8/9 background stream outside m, for every seed and without the cache; inside m the seeds differ."""
    method, adapter, _ = fitted
    decoded, runs = [], []
    real_decode, real_run = pkg.decode, pkg.background_run
    monkeypatch.setattr(pkg, "decode", lambda b, z, **k: decoded.append(z.clone()) or real_decode(b, z, **k))
    monkeypatch.setattr(pkg, "background_run", lambda *a: runs.append(real_run(*a)) or runs[-1])
    jobs = _jobs(normal, [1, 2])
    list(method.synthesize(bb, adapter, jobs, method.config({"steps": STEPS})))
    list(method.synthesize(bb, adapter, jobs, method.config({"steps": STEPS, "cache_inversion": False})))
    (run,) = runs
    cached, plain = decoded
    out = ~_m(bb).expand_as(cached)
    stream = run.z0_m.expand_as(cached)
    assert torch.equal(cached[out], stream[out])
    assert torch.allclose(plain[out], stream[out], atol=1e-5)
    assert (cached[0] - cached[1])[~out[0]].abs().min() > 0
