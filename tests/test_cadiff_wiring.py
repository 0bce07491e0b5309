"""CADiff wiring through the real fit / synthesize path on ``tiny``: what reaches each equation.

Spies (monkeypatch) observe the tensors the method hands to its equations: the re-weighted attention columns
(IAR), the DFS focus degree, the ControlNet's conditioning input, the augmented views, the NT-Xent labels, the
coefficients the backward pass applies to L_loc and NT-Xent. Training terms are checked by their effect: a fit
with the term lowers that term on the support more than the same fit without it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ops.types import Sample, SynthesisJob

torch.set_num_threads(1)
SIZE = 64
BOXES = [(14, 30, 14, 38), (30, 48, 22, 46), (14, 28, 34, 50), (34, 50, 14, 30)]  # off-centre, off the border
TYPES = ["crack", "hole", "crack", "hole"]


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _image(seed: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Dark texture; a bright defect exactly on ``box`` (so an image's bright pixels locate its mask)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(30, 90, (SIZE, SIZE, 3))
    if box is not None:
        y0, y1, x0, x1 = box
        x[y0:y1, x0:x1] = rng.integers(200, 250, (y1 - y0, x1 - x0, 3))
    return x.astype(np.uint8)


@pytest.fixture(scope="module")
def pbb():
    from ops.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu", cache=False)  # fit adds tokens: keep the shared tokenizer clean


@pytest.fixture(scope="module")
def support():
    return [Sample(f"s{i}", "brick", t, _image(i, b), _box(*b), source=f"s{i}.png")
            for i, (t, b) in enumerate(zip(TYPES, BOXES))]


def _fit(bb, support, out, **opts):
    from ops.methods.cadiff import CADiff

    method = CADiff()
    return method, method.fit(bb, support, method.config(opts), out)


# ---------------------------------------------------------------- training: effects and what reaches the loss

def _term_probe(monkeypatch):
    """Wraps the toolkit's train loop as fit_category calls it: L_loc and NT-Xent of the stage's own loss on
    fixed support draws, just before and just after the stage trains."""
    from ops.diffusion import training

    real, probes = training.train, {}

    def measure(loss_fn):
        loc = con = 0.0
        with torch.no_grad():
            for s in range(2):
                loss_fn(0, torch.Generator().manual_seed(1000 + s))
                loc, con = loc + loss_fn.parts["loc"], con + loss_fn.parts["con"]
        return {"loc": loc / 2, "con": con / 2}

    def spy(params, loss_fn, steps, lr, **kw):
        if steps == 0:
            return real(params, loss_fn, steps, lr, **kw)
        before = measure(loss_fn)
        result = real(params, loss_fn, steps, lr, **kw)
        probes[kw["desc"].rsplit(" ", 1)[-1]] = {"before": before, "after": measure(loss_fn)}
        return result

    monkeypatch.setattr(training, "train", spy)
    return probes


def _term_effects(monkeypatch, bb, support, tmp_path, stage, **opts):
    """{'none' | 'loc' | 'con': probe of ``stage``} for fits without both terms, with only γ·L_loc, with only
    β·NT-Xent (coefficients far above the paper's so a few steps show the effect)."""
    probes = _term_probe(monkeypatch)
    runs = {"none": dict(gamma=0.0, beta=0.0), "loc": dict(gamma=10.0, beta=0.0), "con": dict(gamma=0.0, beta=10.0)}
    out = {}
    for name, coef in runs.items():
        probes.clear()
        _fit(bb, support, tmp_path / name, **opts, **coef)
        out[name] = probes[stage]
    return out


def _assert_term_lowered(effects, term):
    # the three fits draw the same batches and the probes the same seeded views: only the term's gradient differs
    # (on tiny the term's run ends 1.6e-3 to 1e-2 below the run without it)
    with_, without = effects[term], effects["none"]
    assert with_["after"][term] < with_["before"][term] - 1e-4, (term, with_)
    assert with_["after"][term] < without["after"][term] - 1e-4, (term, with_, without)


def test_loc_and_contrastive_terms_train_the_tokens_towards_lower_terms(monkeypatch, pbb, support, tmp_path):
    effects = _term_effects(monkeypatch, pbb, support, tmp_path, "CTP", train_steps=4, lr=0.3, controlnet=False)
    _assert_term_lowered(effects, "loc")
    _assert_term_lowered(effects, "con")


def test_loc_and_contrastive_terms_train_the_ssc_towards_lower_terms(monkeypatch, pbb, support, tmp_path):
    effects = _term_effects(monkeypatch, pbb, support, tmp_path, "SSC", train_steps=0, control_steps=3,
                            control_lr=3e-3)
    _assert_term_lowered(effects, "loc")
    _assert_term_lowered(effects, "con")


def test_backward_applies_the_papers_gamma_and_beta_in_both_stages(monkeypatch, pbb, support, tmp_path):
    """dL/dL_loc and dL/dL_contrastive seen in the real backward pass of every training step of fit_category,
    with the method's default coefficients (γ = 0.001, β = 0.0005 of the paper)."""
    from ops.methods.cadiff import trainer

    grads: dict[str, list[float]] = {"loc": [], "con": []}

    def watch(fn, name):
        def spy(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out.requires_grad:
                out.register_hook(lambda g: grads[name].append(float(g)))
            return out
        return spy

    monkeypatch.setattr(trainer, "loc_loss", watch(trainer.loc_loss, "loc"))
    monkeypatch.setattr(trainer, "nt_xent", watch(trainer.nt_xent, "con"))
    _fit(pbb, support, tmp_path, train_steps=2, control_steps=1)
    assert len(grads["loc"]) == len(grads["con"]) == 3  # every step of both stages
    assert grads["loc"] == pytest.approx([0.001] * 3, rel=1e-6)
    assert grads["con"] == pytest.approx([0.0005] * 3, rel=1e-6)


def test_each_defect_type_is_its_own_contrastive_concept(monkeypatch, pbb, support, tmp_path):
    from ops.methods.cadiff import trainer

    seen: list[tuple[list[str], list[int]]] = []
    draw, nt_xent = trainer.CTPLoss.draw, trainer.nt_xent
    types: list[list[str]] = []

    def spy_draw(self, rng):
        batch = draw(self, rng)
        types.append(batch.types)
        return batch

    def spy_nt_xent(v, labels, temperature):
        seen.append((types[-1], labels.tolist()))
        return nt_xent(v, labels, temperature)

    monkeypatch.setattr(trainer.CTPLoss, "draw", spy_draw)
    monkeypatch.setattr(trainer, "nt_xent", spy_nt_xent)
    _fit(pbb, support, tmp_path, train_steps=3, batch_size=3, controlnet=False)
    label_of: dict[str, set[int]] = {}
    for batch_types, labels in seen:
        assert len(labels) == 2 * len(batch_types)
        for i, d in enumerate(batch_types):  # per view: [context, anomaly]
            assert labels[2 * i] == 0, "the context token is one concept"
            label_of.setdefault(d, set()).add(labels[2 * i + 1])
    assert any(len(set(t)) > 1 for t, _ in seen), "no batch held two defect types: the check saw nothing"
    assert all(len(v) == 1 for v in label_of.values()), label_of  # one label per type, across views and steps
    crack, hole = label_of["crack"].pop(), label_of["hole"].pop()
    assert crack != hole and 0 not in (crack, hole)


def test_augmented_views_move_the_mask_with_the_image(monkeypatch, pbb, support, tmp_path):
    from ops.methods.cadiff import trainer

    batches = []
    draw = trainer.CTPLoss.draw

    def spy(self, rng):
        batch = draw(self, rng)
        batches.append((batch, self.masks))
        return batch

    monkeypatch.setattr(trainer.CTPLoss, "draw", spy)
    _fit(pbb, support, tmp_path, train_steps=3, batch_size=2, controlnet=False)
    moved = 0
    for batch, originals in batches:
        bright = batch.images.mean(1) > 0.3  # the defect's pixels, wherever the view put them
        mask = batch.masks[:, 0] > 0.5
        for b, m in zip(bright, mask):
            iou = float((b & m).sum()) / float((b | m).sum())
            assert iou > 0.85, f"view's defect and mask disagree (IoU {iou:.2f})"
            moved += int(not any(torch.equal(m, o[0] > 0.5) for o in originals))
    assert moved >= len(batches), "the views were hardly transformed: the check saw nothing"


def test_fit_refuses_a_scheduler_that_does_not_predict_epsilon(pbb, support, tmp_path):
    from diffusers import DDIMScheduler

    vpred = dataclasses.replace(pbb, scheduler=DDIMScheduler.from_config(pbb.scheduler.config,
                                                                         prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="v_prediction.*epsilon|epsilon.*v_prediction"):
        _fit(vpred, support, tmp_path, train_steps=1, controlnet=False)
    assert not (tmp_path / "cadiff.json").exists()
    assert not pbb.text_encoder.get_input_embeddings()._forward_hooks  # the token rows were detached


# ---------------------------------------------------------------- synthesis: IAR, DFS, SSC conditioning, background

@pytest.fixture(scope="module")
def adapter(pbb, support, tmp_path_factory):
    return _fit(pbb, support, tmp_path_factory.mktemp("cadiff-wiring"), train_steps=4, control_steps=2)


def _synth(bb, adapter, masks, **opts):
    method, ad = adapter
    normal = Sample("g0", "brick", "good", _image(99))
    jobs = [SynthesisJob(i, 200 + i, "brick", "hole", normal, m) for i, m in enumerate(masks)]
    return list(method.synthesize(bb, ad, jobs, method.config({"steps": 4, **opts})))


def _reweight_spy(monkeypatch):
    from ops.diffusion.attention import ControlledProcessor

    calls = []
    real = ControlledProcessor._reweight

    def spy(self, r, info, probs, n, dev, q_rows=slice(None)):
        out = real(self, r, info, probs, n, dev, q_rows)
        calls.append({"step": self.c.step, "before": probs.detach().clone(), "after": out.detach().clone()})
        return out

    monkeypatch.setattr(ControlledProcessor, "_reweight", spy)
    return calls


def test_iar_scales_the_anomaly_tokens_column_not_the_context_tokens(monkeypatch, pbb, adapter):
    calls = _reweight_spy(monkeypatch)
    [r] = _synth(pbb, adapter, [_box(16, 40, 20, 48)], w_min=2.0, w_max=2.0, alpha_thr=-1.0)
    tokens = adapter[1].meta["tokens"]
    ids = pbb.tokenizer(tokens["prompts"]["hole"]).input_ids
    ctx = ids.index(pbb.tokenizer.convert_tokens_to_ids(tokens["context"]))
    ano = ids.index(pbb.tokenizer.convert_tokens_to_ids(tokens["anomaly"]["hole"]))
    assert calls and r.params["w"] == 2.0
    for c in calls:
        before, after = c["before"], c["after"]
        changed = (after != before).flatten(0, -2).any(0).nonzero().flatten().tolist()
        assert changed == [ano], f"re-weighted columns {changed}, anomaly token at {ano}, context at {ctx}"
        assert torch.equal(after[..., ctx], before[..., ctx])
        scaled = after[..., ano] != before[..., ano]
        assert torch.allclose(after[..., ano][scaled], 2.0 * before[..., ano][scaled])


def _focus_spy(monkeypatch):
    from ops.methods.cadiff import iar

    focuses = []
    real = iar.iar_rules

    def spy(mask, token, s):
        focus, rule = real(mask, token, s)
        focuses.append(focus)
        return focus, rule

    monkeypatch.setattr(iar, "iar_rules", spy)
    return focuses


def _alpha(focus, mask, step):
    """α_t = n_t / n_start written out: cells of the mask (16×16, majority) where the token's map exceeds the
    map's mean, over the mask's cells."""
    a = focus._controller.maps("cross", "text", 16, steps=[step], name=focus.capture_name)[0, ..., 0]
    m = torch.nn.functional.avg_pool2d(torch.from_numpy(mask).float()[None, None], SIZE // 16)[0, 0] >= 0.5
    return float(((a > a.mean()) & m).sum() / m.sum())


def test_dfs_switches_reweighting_on_when_alpha_passes_a_threshold_between_observed_alphas(monkeypatch, pbb,
                                                                                          adapter):
    steps = 6
    mask = _box(12, 44, 16, 48)
    focuses = _focus_spy(monkeypatch)
    [free] = _synth(pbb, adapter, [mask], steps=steps, alpha_thr=2.0)  # never on: the plain run's α_t
    plain = focuses[-1]
    alphas = [_alpha(plain, mask, s) for s in range(steps - 1)]  # the decisions read steps 0 .. steps-2
    assert free.params["dfs_on_step"] is None
    # the first step whose α beats every earlier one (after step 0, so the switch is visibly delayed)
    j = next((j for j in range(1, len(alphas)) if alphas[j] > max(alphas[:j])), None)
    if j is None:  # α never rises: switch on at step 1, between α_0 and the next lower value
        below = [a for a in alphas if a < alphas[0]]
        assert below, f"every α_t is equal ({alphas}); no threshold lies between two of them"
        thr, j = (alphas[0] + max(below)) / 2, 0
    else:
        thr = (max(alphas[:j]) + alphas[j]) / 2
    calls = _reweight_spy(monkeypatch)
    [r] = _synth(pbb, adapter, [mask], steps=steps, alpha_thr=thr)
    assert r.params["dfs_on_step"] == j + 1, (alphas, thr, r.params["alpha"])
    assert min(c["step"] for c in calls) == j + 1  # the re-weighting itself starts there, and not before
    assert {c["step"] for c in calls} == set(range(j + 1, steps))
    assert plain.history == pytest.approx(alphas, abs=1e-6)  # every α_t of the plain run is n_t / n_start


def test_controlnet_is_conditioned_on_the_target_mask(monkeypatch, pbb, adapter):
    from ops.methods.cadiff.ssc import SSC

    conds = []
    load = SSC.load.__func__

    def spy_load(cls, out_dir, device="cpu"):
        ssc = load(cls, out_dir, device)
        ssc.controlnet.register_forward_pre_hook(
            lambda _m, args, kwargs: conds.append(kwargs["controlnet_cond"].detach().clone()), with_kwargs=True)
        return ssc

    monkeypatch.setattr(SSC, "load", classmethod(spy_load))
    masks = [_box(16, 40, 20, 48), _box(4, 20, 30, 62)]
    out = _synth(pbb, adapter, masks, steps=2)
    assert all(r.params["controlnet"] for r in out)
    per_job = len(conds) // 2
    assert per_job >= 2 and len(conds) == 2 * per_job  # every UNet call of both jobs went through the ControlNet
    for i, m in enumerate(masks):
        want = torch.from_numpy(m).float()[None, None]
        want = torch.nn.functional.interpolate(want, size=(pbb.resolution,) * 2, mode="nearest")
        for c in conds[i * per_job:(i + 1) * per_job]:
            assert torch.equal(c[:1].float(), want) and torch.equal(c[-1:].float(), want), f"job {i}"
    assert not torch.equal(conds[0], conds[per_job])


def test_background_latent_is_the_normal_latent_before_the_paste(monkeypatch, pbb, adapter):
    from ops.diffusion.blend import latent_mask
    from ops.diffusion.vae import encode
    from ops.methods.cadiff import iar

    results = []
    real = iar.generate

    def spy(*args, **kwargs):
        r = real(*args, **kwargs)
        results.append(r)
        return r

    monkeypatch.setattr(iar, "generate", spy)
    mask = _box(16, 40, 20, 48)
    for background in ("normal", "generated"):
        [out] = _synth(pbb, adapter, [mask], background=background)
        z = results[-1].latent
        with torch.no_grad():
            z0 = encode(pbb, out.job.normal.image).float()
        inside = latent_mask(mask, tuple(z.shape[-2:]), rule="any")[0, 0]
        assert torch.equal(z[..., ~inside], z0[..., ~inside]), background  # the sampler's own latent, not pixels
        assert (z[..., inside] - z0[..., inside]).abs().max() > 1e-3  # the defect region was generated
