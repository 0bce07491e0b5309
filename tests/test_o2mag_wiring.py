"""O2MAG wiring through the plugin's real fit / synthesize path on tiny: which keys/values, tokens, factors,
embeddings and cache entries reach TriAG, DAE and AGO.

The attention checks recompute each layer's output from the Q/K/V the UNet's projections produced (forward hooks)
with the paper's rule written out here, so a graft that reads the wrong branch, a DAE on the wrong tokens or a
stale cache entry fails even where its images would look plausible.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from ops.diffusion.blend import latent_mask
from ops.diffusion.vae import encode
from ops.methods.o2mag import O2MAG, O2MAGConfig
from ops.methods.o2mag import ago as o2mag_ago
from ops.methods.o2mag import triag
from ops.types import Sample, SynthesisJob
from tests.test_o2mag import SIZE, _box, _image, bb  # noqa: F401 (the same helpers and fixture)

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
torch.set_num_threads(1)


def _reference(image_id: str, category: str, defect: str, seed: int) -> Sample:
    img, mask = _image(seed), _box(20, 36, 24, 44)
    img[mask] = (img[mask] * 0.3).astype(np.uint8)
    return Sample(image_id, category, defect, img, mask, source=f"{image_id}.png")


@pytest.fixture(scope="module")
def normal():
    return Sample("good-0", "brick", "good", _image(2), None, source="good-0.png")


TARGETS = np.stack([_box(30, 52, 30, 62), _box(4, 24, 4, 30)])


def _jobs(reference: Sample, normal: Sample, masks=TARGETS) -> list[SynthesisJob]:
    return [SynthesisJob(i, i, reference.category, reference.defect_type, normal, m, reference)
            for i, m in enumerate(masks)]


def _synthesize(bb, reference, normal, cfg, tmp_path, masks=TARGETS):
    method = O2MAG()
    adapter = method.fit(bb, [reference], cfg, tmp_path)
    return list(method.synthesize(bb, adapter, _jobs(reference, normal, masks), cfg))


class Probe:
    """Records every controller TriAG makes and, while one is installed, the Q/K/V projections and the attention
    output (the input of to_out) of the chosen attention modules, per (branch, step, layer)."""

    def __init__(self, bb, monkeypatch, kinds=("attn1",), capture=False):
        from ops.diffusion.attention import Capture

        self.made, self.rec, self.handles = [], {}, []
        real_ctrl, real_rules = triag.SourceKV, triag._target_rules

        def ctrl(*a, **k):
            self.made.append(real_ctrl(*a, **k))
            return self.made[-1]

        monkeypatch.setattr(triag, "SourceKV", ctrl)
        if capture:
            monkeypatch.setattr(triag, "_target_rules", lambda *a: real_rules(*a) + [
                Capture("cross", branches=[triag.TARGET], name="all"),
                Capture("self", branches=[triag.TARGET], name="all")])
        self.modules = {}
        for name, mod in bb.unet.named_modules():
            if name.split(".")[-1] in kinds:
                self.modules[name + ".processor"] = mod
                for part, proj in (("q", mod.to_q), ("k", mod.to_k), ("v", mod.to_v)):
                    self.handles.append(proj.register_forward_hook(self._hook(name + ".processor", part)))
                self.handles.append(mod.to_out[0].register_forward_pre_hook(self._pre(name + ".processor")))

    def _key(self, layer, part):
        if not self.made or self.made[-1]._originals is None:
            return None  # an inversion: no controller installed
        c = self.made[-1]
        assert len(c.layout) == 1, c.layout  # every branch is its own UNet call
        return (c.layout[0][0], c.step, layer, part)

    def _hook(self, layer, part):
        def f(_mod, _inp, out):
            key = self._key(layer, part)
            if key is not None:
                self.rec[key] = out.detach().clone()
        return f

    def _pre(self, layer):
        def f(_mod, inp):
            key = self._key(layer, "out")
            if key is not None:
                self.rec[key] = inp[0].detach().clone()
        return f

    def close(self):
        for h in self.handles:
            h.remove()

    def get(self, branch, step, layer, part):
        return self.rec[(branch, step, layer, part)]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, m, c = x.shape
    return x.double().view(n, m, heads, c // heads).transpose(1, 2)


def _attend(attn, q, k, v, key_mask=None, reweight=None):
    """softmax(QKᵀ·scale) V per head in float64; ``reweight`` = (rows, keys, f): probabilities on (rows, keys)
    times f, each row renormalised (DAE's self re-weighting). Returns (output (n, Nq, C), head-mean probs)."""
    h = attn.heads
    qh, kh, vh = _heads(q, h), _heads(k, h).expand(q.shape[0], -1, -1, -1), _heads(v, h).expand(q.shape[0], -1, -1, -1)
    s = qh @ kh.transpose(-1, -2) * attn.scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask[None, None, None, :], float("-inf"))
    p = s.softmax(-1)
    if reweight is not None:
        rows, keys, f = reweight
        sel = rows[:, None, :, None] & keys[:, None, None, :]
        p = torch.where(sel, p * f, p)
        p = p / p.sum(-1, keepdim=True)
    out = (p @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
    return out, p.mean(1)


def _grid(masks, hw) -> torch.Tensor:
    """bool (n, h*w): the toolkit's resize rule for masks on a layer grid."""
    return latent_mask(np.asarray(masks), hw, rule="majority").flatten(1)


def _hw(n_queries: int, bb) -> tuple[int, int]:
    side = bb.latent_size
    while side * side != n_queries:
        side //= 2
    return side, side


# --------------------------------------------------------------------------------- TriAG: the sources of K/V

@pytest.mark.parametrize("cache,window", [(True, (0.0, 1.0)), (False, (0.25, 0.75))])
def test_grafted_layers_read_reference_kv_inside_m_t_and_normal_kv_outside(bb, normal, monkeypatch, tmp_path,
                                                                        cache, window):
    """Through O2MAG.synthesize, at every decoder self-attention layer: at the graft steps a target query inside
    M_T reads the reference branch's K/V restricted to M_R, a query outside M_T reads the NORMAL branch's K/V
    (not the target's own, not the reference's); outside the graft window the target reads its own K/V.
    run_targets receives the reference/normal latents of the job's own images and the masks in job order."""
    reference = _reference("ref-0", "brick", "hole", 1)
    cfg = O2MAGConfig.from_dict({"ago_steps": 0, "steps": 4, "cache_branches": cache, "graft_start": window[0],
                                 "graft_end": window[1]})
    graft_steps = triag.step_window(*window, 4)
    calls = []
    real_run = triag.run_targets
    monkeypatch.setattr(triag, "run_targets", lambda *a: calls.append(a) or real_run(*a))
    probe = Probe(bb, monkeypatch)
    try:
        _synthesize(bb, reference, normal, cfg, tmp_path)
    finally:
        probe.close()

    (_, cond, ref, nrm, masks, s, _), = calls
    assert torch.equal(ref[2], encode(bb, reference.image)) and np.array_equal(ref[1], reference.mask)
    assert torch.equal(nrm[1], encode(bb, normal.image)) and np.array_equal(masks, TARGETS)
    assert s.graft_steps == graft_steps
    layers = [k for k in probe.modules if k.startswith("up")]
    own_gap, checked = 0.0, set()
    for step in range(4):
        for layer in layers:
            attn = probe.modules[layer]
            q, out = probe.get("target", step, layer, "q"), probe.get("target", step, layer, "out")
            tol = 1e-5 * float(out.abs().max())
            own, _ = _attend(attn, q, probe.get("target", step, layer, "k"), probe.get("target", step, layer, "v"))
            if step not in graft_steps:
                torch.testing.assert_close(out.double(), own, atol=tol, rtol=0, msg=f"own {step} {layer}")
                continue
            hw = _hw(q.shape[1], bb)
            rows, keys = _grid(masks, hw), _grid(reference.mask, hw)[0]
            fg, _ = _attend(attn, q, probe.get("ref", step, layer, "k"), probe.get("ref", step, layer, "v"), keys)
            bg, _ = _attend(attn, q, probe.get("normal", step, layer, "k"), probe.get("normal", step, layer, "v"))
            torch.testing.assert_close(out.double()[rows], fg[rows], atol=tol, rtol=0, msg=f"fg {step} {layer}")
            torch.testing.assert_close(out.double()[~rows], bg[~rows], atol=tol, rtol=0, msg=f"bg {step} {layer}")
            own_gap = max(own_gap, float((own - bg)[~rows].abs().max()) / tol)
            checked.add((step, hw[0]))
    assert {h for _, h in checked} == {8, 16} and {st for st, _ in checked} == set(graft_steps)
    assert own_gap > 100  # the target's own K/V would read measurably differently outside M_T


# --------------------------------------------------------------------------------- DAE: tokens, factor, switches

def _anomaly_columns(bb, prompt: str, words: str) -> list[int]:
    """Columns of ``words`` at the end of ``prompt`` (column 0 is BOS)."""
    full = bb.tokenizer(prompt, add_special_tokens=False).input_ids
    tail = bb.tokenizer(words, add_special_tokens=False).input_ids
    assert full[-len(tail):] == tail
    return list(range(1 + len(full) - len(tail), 1 + len(full)))


@pytest.mark.parametrize("dae_self,dae_cross", [(False, True), (True, False)])
def test_dae_scales_exactly_the_anomaly_tokens_and_the_region_by_the_configured_factor(bb, normal, monkeypatch,
                                                                                      tmp_path, dae_self, dae_cross):
    """Through O2MAG.synthesize with a two-word defect type: inside M_T at the DAE steps the cross-attention
    probabilities of exactly the rendered defect words' tokens are multiplied by ``dae_factor`` (un-scaling those
    columns restores a distribution; no other column is touched); the self-attention re-weighting acts on the
    non-grafted layers only when ``dae_self``, with that factor. The attention extra is the per-target
    peak-normalised anomaly-token attention at 16x16, and the refined mask uses ``attention_threshold``."""
    from ops.masks.refine import attention_mask
    from ops.methods.base import render_prompt

    f = 2.0
    reference = _reference("ref-c", "cable", "bent_wire", 3)
    cfg = O2MAGConfig.from_dict({"ago_steps": 0, "steps": 6, "dae_factor": f, "dae_self": dae_self,
                                 "dae_cross": dae_cross, "refine_mask": True, "attention_threshold": 0.9})
    prompt = render_prompt(cfg, "cable", "bent_wire")
    assert prompt == "a photo of a cable with a bent wire defect"
    tokens = _anomaly_columns(bb, prompt, "bent wire defect")
    dae_steps = triag.step_window(cfg.dae_start, cfg.dae_end, cfg.steps)
    assert dae_steps == (2, 3)
    probe = Probe(bb, monkeypatch, capture=True)
    try:
        results = _synthesize(bb, reference, normal, cfg, tmp_path)
    finally:
        probe.close()
    c = probe.made[-1]
    maps = {(kind, step, layer): v for (kind, b, step, layer, nm), v in c.captured.items() if nm == "all"}
    other = [j for j in range(77) if j not in tokens]

    cross_seen = 0
    for (kind, step, layer), p in maps.items():
        if kind != "cross":
            continue
        h, w = c.layer_hw[layer]
        p = p.reshape(len(TARGETS), h * w, 77).double()
        rows = _grid(TARGETS, (h, w))
        unscaled = p[..., other].sum(-1) + p[..., tokens].sum(-1) / f
        ones = torch.ones_like(unscaled)
        torch.testing.assert_close(p.sum(-1)[~rows], ones[~rows], atol=1e-5, rtol=0)  # rows outside M_T untouched
        if dae_cross and step in dae_steps:
            torch.testing.assert_close(unscaled[rows], ones[rows], atol=1e-5, rtol=0, msg=f"{step} {layer}")
            assert float((p.sum(-1) / f - 1)[rows].abs().min()) > 1e-3  # not every token scaled
            assert float(p[..., tokens].sum(-1)[rows].min()) > 1e-2  # the token mass is there to be scaled
            cross_seen += 1
        else:
            torch.testing.assert_close(p.sum(-1)[rows], ones[rows], atol=1e-5, rtol=0, msg=f"{step} {layer}")
    assert cross_seen == (len(dae_steps) * 7 if dae_cross else 0)  # every cross-attention layer of the UNet

    gap = 0.0
    for layer, attn in probe.modules.items():
        if layer.startswith("up"):
            continue  # grafted at every step (DAE's self re-weighting would be the identity there)
        for step in dae_steps:
            q, k = probe.get("target", step, layer, "q"), probe.get("target", step, layer, "k")
            hw = _hw(q.shape[1], bb)
            region = _grid(TARGETS, hw)
            got = maps[("self", step, layer)].double()
            _, plain = _attend(attn, q, k, k)
            _, weighted = _attend(attn, q, k, k, reweight=(region, region, f))
            want = weighted if dae_self else plain
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"self {step} {layer}")
            gap = max(gap, float((weighted - plain).abs().max()))
    assert gap > 1e-3

    # the attention extra and the refined mask
    at16 = [p[..., tokens].sum(-1).double() for (kind, _, layer), p in maps.items()
            if kind == "cross" and c.layer_hw[layer][0] == 16]
    raw = torch.stack(at16).mean(0)  # (n, 16, 16)
    peaks = raw.flatten(1).amax(1)
    assert abs(float(peaks[0] / peaks[1]) - 1) > 1e-2  # one shared peak would show
    refined_any = False
    for i, r in enumerate(results):
        want = triag.resize_map((raw[i] / peaks[i]).float(), (SIZE, SIZE))
        np.testing.assert_allclose(r.extras["attention"], want, atol=1e-5)
        mask = attention_mask(want, r.job.target_mask, 0.9)
        if mask.any():
            assert np.array_equal(r.mask, mask) and r.params["mask"] == "refined"
            refined_any |= not np.array_equal(mask, attention_mask(want, r.job.target_mask, 0.5))
    assert refined_any  # the threshold changes a mask here, so the check can tell 0.9 from the default


# --------------------------------------------------------------------------------- the source-branch cache

def test_normal_branch_cache_misses_when_the_reference_embedding_changes(bb, normal, monkeypatch, tmp_path):
    """Two references of the same defect type share one normal image: their AGO embeddings differ under the same
    prompt, so the normal branch (reconstructed under e*) must be computed for each; cached and uncached
    synthesis give the same images."""
    refs = [_reference("ref-a", "brick", "hole", 1), _reference("ref-b", "brick", "hole", 5)]
    cfg = O2MAGConfig.from_dict({"ago_steps": 2, "ago_lr": 3e-2, "steps": 3})
    method = O2MAG()
    adapter = method.fit(bb, refs, cfg, tmp_path)
    e = [method.embedding(bb, adapter, r, cfg) for r in refs]
    assert float((e[0] - e[1]).abs().max()) > 1e-3
    jobs = [SynthesisJob(i, i, "brick", "hole", normal, TARGETS[0], r) for i, r in enumerate(refs)]
    runs = []
    real = triag.run_source
    monkeypatch.setattr(triag, "run_source", lambda *a, **k: runs.append(a[1]) or real(*a, **k))
    cached = list(method.synthesize(bb, adapter, jobs, cfg))
    assert runs.count("ref") == 2 and runs.count("normal") == 2
    plain = list(method.synthesize(bb, adapter, jobs, replace(cfg, cache_branches=False)))
    for a, b in zip(cached, plain):
        assert a.job.reference.image_id == b.job.reference.image_id
        assert np.array_equal(a.image, b.image)


def test_a_shared_branch_cache_misses_on_settings_that_change_the_source_runs(bb, normal):
    """run_targets accepts a caller's BranchCache: a cached source run is reused only for the settings it was
    recorded with (DDIM steps, graft layers/steps, whether the normal branch is grafted from)."""
    from ops.methods.o2mag import triag_settings
    from ops.methods.o2mag.triag import BranchCache, run_targets

    reference = _reference("ref-0", "brick", "hole", 1)
    cond = bb.encode_prompt(["a photo of a brick with a hole defect"]).detach()
    ref = (reference.image, reference.mask, encode(bb, reference.image))
    nrm = (normal.image, encode(bb, normal.image))
    base = triag_settings(O2MAGConfig(ago_steps=0, steps=3), bb, "brick", "hole")
    first = tuple(k for k in bb.unet.attn_processors if k.startswith("up_blocks.0") and "attn1" in k)
    # each change leaves the other keyed settings as they were
    later = {"steps": dict(steps=2, dae_steps=(1,)), "graft layers": dict(graft_layers=("up",)),
             "graft steps": dict(graft_steps=(0, 1, 2))}
    for name, kw in later.items():
        cache = BranchCache()
        start = replace(base, graft_steps=(0, 1)) if name == "steps" else replace(base, graft_layers=first,
                                                                                   graft_steps=(1,))
        run_targets(bb, cond, ref, nrm, TARGETS[:1], start, cache)
        s = replace(start, **kw)
        got = run_targets(bb, cond, ref, nrm, TARGETS[:1], s, cache)
        want = run_targets(bb, cond, ref, nrm, TARGETS[:1], s, BranchCache())
        assert torch.equal(got.z0, want.z0), name
    cache = BranchCache()
    run_targets(bb, cond, ref, nrm, TARGETS[:1], replace(base, triag_masks=False), cache)
    got = run_targets(bb, cond, ref, nrm, TARGETS[:1], base, cache)
    assert torch.equal(got.z0, run_targets(bb, cond, ref, nrm, TARGETS[:1], base, BranchCache()).z0)


# --------------------------------------------------------------------------------- AGO: start, settings, key

@pytest.mark.parametrize("template", [None, "{defect_type} on the {category}"])
def test_ago_starts_from_the_rendered_prompt_embedding_with_the_configured_settings(bb, monkeypatch, tmp_path,
                                                                                   template):
    """Through O2MAG.fit: AGO's e starts as the text encoder's output for the reference's rendered prompt (the
    module docstring's init; the default template is the documented one), is optimised with the configured
    steps / lr / seed on the reference's own latent in batches of ``ago_batch_size``; with a vanishing lr the
    fitted embedding the plugin hands to synthesis is that init."""
    from ops.methods.base import render_prompt

    reference = _reference("ref-c", "cable", "bent_wire", 3)
    opts = {"ago_steps": 2, "ago_lr": 1e-9, "seed": 7, "ago_batch_size": 2}
    if template:
        opts["prompt"] = template
    cfg = O2MAGConfig.from_dict(opts)
    prompt = render_prompt(cfg, "cable", "bent_wire")
    assert prompt == ("a photo of a cable with a bent wire defect" if template is None else "bent wire on the cable")
    seen, batches = {}, []
    real_train, real_loss = o2mag_ago.train, o2mag_ago.denoising_loss

    def train(params, loss_fn, steps, lr, **kw):
        seen.update(init=params[0].detach().clone(), steps=steps, lr=lr, seed=kw.get("seed"))
        return real_train(params, loss_fn, steps, lr, **kw)

    def denoising_loss(unet, scheduler, latent, c, rng, *a, **k):
        batches.append((latent.detach().clone(), c.shape[0]))
        return real_loss(unet, scheduler, latent, c, rng, *a, **k)

    monkeypatch.setattr(o2mag_ago, "train", train)
    monkeypatch.setattr(o2mag_ago, "denoising_loss", denoising_loss)
    method = O2MAG()
    adapter = method.fit(bb, [reference], cfg, tmp_path)
    with torch.no_grad():
        e0 = bb.encode_prompt([prompt]).float()
        assert float((e0 - bb.null_embedding().float()).abs().max()) > 1e-2  # the init is distinguishable
    assert torch.equal(seen["init"], e0)
    assert (seen["steps"], seen["lr"], seen["seed"]) == (2, 1e-9, 7)
    z = encode(bb, reference.image)
    assert len(batches) == 2 and all(n == 2 and all(torch.equal(x[None], z) for x in lat) for lat, n in batches)
    e = method.embedding(bb, adapter, reference, cfg)
    assert float((e.float() - e0).abs().max()) < 1e-6


def test_ago_cache_key_covers_every_input_of_the_optimisation(bb):
    from dataclasses import asdict

    from ops.methods.o2mag.ago import AGOSettings, ago_key

    img, prompt, s = _image(1), "a photo of a brick with a hole defect", AGOSettings()
    key = ago_key(bb, img, prompt, s)
    assert set(asdict(s)) == {"steps", "lr", "seed", "batch_size", "ckpt_every"}  # a new setting is classified
    for name, value in dict(steps=31, lr=1e-2, seed=1, batch_size=2).items():
        assert ago_key(bb, img, prompt, replace(s, **{name: value})) != key, name
    assert ago_key(bb, img, prompt, replace(s, ckpt_every=5)) == key  # resumability only
    assert ago_key(bb, img, prompt + "!", s) != key
    assert ago_key(bb, _image(2), prompt, s) != key

    class Other:
        model_id, resolution, dtype = bb.model_id, bb.resolution, bb.dtype

    for name, value in dict(model_id="other", resolution=64, dtype=torch.float16).items():
        other = Other()
        setattr(other, name, value)
        assert ago_key(other, img, prompt, s) != key, name
