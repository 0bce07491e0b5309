"""O2MAG: AGO optimises only the embedding and lowers the loss, its cache is reused; TriAG/DAE mechanics."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ops.diffusion.backbone import load_backbone
from ops.diffusion.training import denoising_loss
from ops.diffusion.vae import encode
from ops.methods.base import render_prompt
from ops.methods.o2mag import O2MAG, O2MAGConfig
from ops.methods.o2mag.ago import AGOSettings, load_embedding, optimize_embedding
from ops.types import Sample, SynthesisJob

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
torch.set_num_threads(1)

SIZE = 64


@pytest.fixture(scope="module")
def bb():
    return load_backbone("tiny", device="cpu", dtype="float32")


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, size=(1, 1, 3))
    noise = rng.integers(-30, 30, size=(SIZE, SIZE, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture(scope="module")
def reference():
    img = _image(1)
    mask = _box(20, 36, 24, 44)
    img[mask] = (img[mask] * 0.3).astype(np.uint8)  # a dark "hole"
    return Sample("ref-0", "brick", "hole", img, mask, source="ref-0.png")


@pytest.fixture(scope="module")
def normal():
    return Sample("good-0", "brick", "good", _image(2), None, source="good-0.png")


def _params(bb):
    return {k: v.detach().clone() for m in (bb.unet, bb.text_encoder, bb.vae) for k, v in m.state_dict().items()}


def test_ago_lowers_the_loss_and_changes_only_the_embedding(bb, reference):
    prompt = render_prompt(O2MAGConfig(), "brick", "hole")
    before = _params(bb)
    e0 = bb.encode_prompt([prompt]).detach()
    e, result = optimize_embedding(bb, reference.image, prompt, AGOSettings(steps=40, lr=3e-2, seed=0))
    after = _params(bb)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert e.shape == e0.shape and (e - e0).abs().max() > 1e-2
    assert len(result.losses) == 40
    # a fixed evaluation objective (8 timesteps, one noise draw): the optimised embedding must fit it better
    z = encode(bb, reference.image).float().expand(8, -1, -1, -1)
    t = torch.linspace(50, 950, 8).long()

    def loss(emb):
        with torch.no_grad():
            return denoising_loss(bb.unet, bb.scheduler, z, emb.expand(8, -1, -1), torch.Generator().manual_seed(1),
                                  timesteps=t).item()

    assert loss(e) < loss(e0) - 1e-4


def test_fit_caches_per_reference_and_a_rerun_skips(bb, reference, tmp_path):
    other = Sample("ref-1", "brick", "crack", _image(3), _box(5, 9, 5, 30), source="ref-1.png")
    cfg = O2MAGConfig.from_dict({"ago_steps": 3})
    method = O2MAG()
    a1 = method.fit(bb, [reference, other], cfg, tmp_path)
    refs = a1.meta["references"]
    assert set(refs) == {"ref-0", "ref-1"} and not any(r["skipped"] for r in refs.values())
    files = sorted((tmp_path / "ago").glob("*.safetensors"))
    assert len(files) == 2 and not (tmp_path / "ago" / "checkpoints").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    a2 = method.fit(bb, [reference, other], cfg, tmp_path)
    assert all(r["skipped"] for r in a2.meta["references"].values())
    assert {p.name: p.stat().st_mtime_ns for p in files} == stamps
    # the key follows the pixels: a changed reference is optimised again, its stale file removed
    changed = Sample("ref-1", "brick", "crack", _image(4), other.mask, source="ref-1.png")
    a3 = method.fit(bb, [reference, changed], cfg, tmp_path)
    assert a3.meta["references"]["ref-0"]["skipped"] and not a3.meta["references"]["ref-1"]["skipped"]
    assert len(list((tmp_path / "ago").glob("*.safetensors"))) == 2
    e = method.embedding(bb, a3, changed, cfg)
    assert torch.equal(e, load_embedding(tmp_path / "ago" / a3.meta["references"]["ref-1"]["file"], bb))
    with pytest.raises(ValueError, match="re-materialize anomaly_adapters"):
        method.embedding(bb, a3, other, cfg)  # pixels differ from what AGO saw


# ---------------------------------------------------------------------------------------------------- TriAG / DAE
STEPS = 6
LEAK_TOL = 0.15  # documented: mean |Δz| outside M_T <= 15 % of mean |z| of the normal reconstruction (tiny: 3.6-10 %)


def _targets() -> np.ndarray:
    return np.stack([_box(4, 20, 4, 26), _box(30, 52, 30, 62), _box(40, 62, 2, 20)])


@pytest.fixture(scope="module")
def pair(bb, reference, normal):
    from ops.diffusion.inversion import invert, reconstruct

    cond = bb.encode_prompt([render_prompt(O2MAGConfig(), "brick", "hole")]).detach()
    z_ref, z_normal = encode(bb, reference.image), encode(bb, normal.image)
    rec = reconstruct(bb, invert(bb, z_normal, cond, STEPS), cond)
    return dict(cond=cond, ref=(reference.image, reference.mask, z_ref), normal=(normal.image, z_normal), rec=rec)


def _settings(bb, **kw):
    from dataclasses import replace

    from ops.methods.o2mag import triag_settings

    return replace(triag_settings(O2MAGConfig(ago_steps=0, steps=STEPS), bb, "brick", "hole"), **kw)


def _run(bb, pair, masks, **kw):
    from ops.methods.o2mag.triag import BranchCache, run_targets

    return run_targets(bb, pair["cond"], pair["ref"], pair["normal"], masks, _settings(bb, **kw), BranchCache())


def test_anomaly_tokens_are_the_defect_words(bb):
    s = _settings(bb)
    ids = bb.tokenize([render_prompt(O2MAGConfig(), "brick", "hole")])[0].tolist()
    assert bb.tokenizer.decode([ids[i] for i in s.tokens]).strip() == "hole defect"
    assert s.graft_steps == tuple(range(STEPS)) and s.dae_steps == (2, 3) and s.dae_factor == 1.5


def test_all_zero_target_mask_reproduces_the_normal_reconstruction(bb, pair):
    empty = _run(bb, pair, np.zeros((2, SIZE, SIZE), dtype=bool))
    scale = pair["rec"].abs().max()
    assert (empty.z0 - pair["rec"]).abs().max() <= 1e-5 * scale  # explicit fp32 softmax vs SDPA: last bits only
    placed = _run(bb, pair, _targets()[:1])
    assert (placed.z0 - pair["rec"]).abs().max() > 0.05 * scale  # the same run with a mask does change the target


def test_no_grafting_and_dae_factor_one_is_plain_ddim_reconstruction(bb, pair):
    out = _run(bb, pair, _targets(), graft_layers=(), dae_factor=1.0)
    assert (out.z0 - pair["rec"]).abs().max() <= 1e-5 * pair["rec"].abs().max()
    dae_only = _run(bb, pair, _targets()[:1], graft_layers=(), dae_factor=3.0)
    assert (dae_only.z0 - pair["rec"]).abs().max() > 1e-3  # DAE alone changes the target (cross-attention)


def test_outside_the_target_mask_stays_close_to_the_normal_image(bb, pair):
    from ops.diffusion.blend import latent_mask

    masks = _targets()
    out = _run(bb, pair, masks)
    cells = latent_mask(masks, tuple(out.z0.shape[-2:]), rule="any")[:, 0]
    diff = (out.z0 - pair["rec"]).abs().mean(1)  # (n, h, w)
    level = pair["rec"].abs().mean()
    for i in range(len(masks)):
        inside, outside = diff[i][cells[i]].mean(), diff[i][~cells[i]].mean()
        assert outside <= LEAK_TOL * level
        assert inside > 2.5 * outside  # the defect is where the mask is (measured 3.0-4.0x at 6 steps, triag.py)


def test_cached_and_uncached_generation_give_the_same_images(bb, pair):
    from ops.methods.o2mag.triag import BranchCache, run_targets

    masks = _targets()
    cache = BranchCache()
    cached = run_targets(bb, pair["cond"], pair["ref"], pair["normal"], masks, _settings(bb, target_batch=2), cache)
    plain = run_targets(bb, pair["cond"], pair["ref"], pair["normal"], masks,
                        _settings(bb, target_batch=2, cache=False))
    assert cache.runs == 2 and cache.peak_bytes > 0  # each source inverted and sampled once for two target batches
    assert torch.equal(cached.z0, plain.z0) and torch.equal(cached.attention, plain.attention)
    assert torch.equal(cached.normal_z0, plain.normal_z0)


def test_stage_fit_and_synthesize_group_jobs_and_share_the_reference_branch(bb, demo_split, tmp_path, monkeypatch):
    from ops.generation import _adapter, fit_adapter, plan_jobs, synthesize_partition
    from ops.methods.o2mag import triag as o2mag_triag
    from ops.methods.base import check_results
    from ops.storage import Storage

    cfg = {"ago_steps": 2, "steps": 3, "refine_mask": True}
    storage = Storage(tmp_path)
    adapters = fit_adapter(storage, "brick", "o2mag", demo_split, bb, cfg, progress=lambda *a: None)
    support = adapters.iloc[0]["support_ids"]
    assert len(list((tmp_path / "adapters/brick/o2mag/ago").glob("*.safetensors"))) == len(support)

    runs = []
    real = o2mag_triag.run_source
    monkeypatch.setattr(o2mag_triag, "run_source", lambda *a, **k: runs.append(a[1]) or real(*a, **k))
    jobs = plan_jobs(demo_split, "brick", "o2mag", 4, seed=3)
    method = O2MAG()
    config = method.config(cfg)
    adapter = _adapter(storage, adapters, "brick", "o2mag", sorted(support))
    results = list(check_results(jobs, method.synthesize(bb, adapter, jobs, config)))
    refs = {j.reference.image_id for j in jobs}
    pairs = {(j.reference.image_id, j.normal.image_id) for j in jobs}
    assert runs.count("ref") == len(refs) and runs.count("normal") == len(pairs)  # each source once
    for r in results:
        att = r.extras["attention"]
        assert att.shape == r.job.target_mask.shape and att.dtype == np.float32 and 0 <= att.min() and att.max() <= 1
        assert r.mask.any() and not (r.mask & ~r.job.target_mask).any()  # refined inside M_T
        assert r.params["mask"] in ("refined", "target (refinement empty)") and r.params["steps"] == 3

    df = synthesize_partition(storage, "brick", "o2mag", demo_split, adapters, bb, n=2, seed=3, cfg=cfg)
    assert len(df) == 2 and all((tmp_path / p).is_file() for p in df.image_path)
    again = synthesize_partition(storage, "brick", "o2mag", demo_split, adapters, bb, n=2, seed=3, cfg=cfg)
    assert again.sha256.tolist() == df.sha256.tolist()  # deterministic rerun


def test_background_normal_keeps_the_original_pixels(bb, reference, normal, tmp_path):
    from ops.methods.o2mag.triag import generated_region

    cfg = O2MAGConfig.from_dict({"ago_steps": 0, "steps": 2, "background": "normal"})
    jobs = [SynthesisJob(i, i, "brick", "hole", normal, m, reference) for i, m in enumerate(_targets()[:2])]
    adapter = O2MAG().fit(bb, [reference], cfg, tmp_path)
    for r in O2MAG().synthesize(bb, adapter, jobs, cfg):
        keep = ~generated_region(r.job.target_mask, (bb.latent_size, bb.latent_size))
        assert keep.any() and np.array_equal(r.image[keep], normal.image[keep])
        assert not np.array_equal(r.image[r.job.target_mask], normal.image[r.job.target_mask])
        assert np.array_equal(r.mask, r.job.target_mask) and r.params["mask"] == "target"


def test_config_presets_and_validation(bb):
    paper = O2MAGConfig.from_dict({"preset": "paper"})
    assert (paper.ago_steps, paper.ago_lr, paper.steps) == (500, 3e-3, 50)
    assert O2MAGConfig.from_dict({"preset": "paper", "steps": 20}).steps == 20
    for bad in ({"preset": "x"}, {"graft_layers": ["decoder"]}, {"dae_start": 0.8, "dae_end": 0.2},
                {"background": "blend"}, {"prompt": "{nope}"}, {"ago_lr": 0}, {"colour": 1}):
        with pytest.raises(ValueError):
            O2MAGConfig.from_dict(bad)
    from ops.methods.o2mag import triag_settings

    with pytest.raises(ValueError, match="not attention processors"):
        triag_settings(O2MAGConfig(graft_layers=("up_blocks.9.attn1.processor",)), bb, "brick", "hole")


# ---------------------------------------------------------------------------------------------------- wiring
# One instrumented run per setting: every attention probability the target branch used, per (step, layer), read
# back to check which rule acted where (DAE window and mask, graft layers and M_R, the self-attention DAE).

def _instrumented(bb, pair, masks, monkeypatch, cache, **kw):
    from ops.diffusion.attention import Capture
    from ops.methods.o2mag import triag

    made, real_rules, real_ctrl = [], triag._target_rules, triag.SourceKV

    def rules(*a):
        return real_rules(*a) + [Capture("cross", branches=[triag.TARGET], name="all"),
                                 Capture("self", branches=[triag.TARGET], name="all")]

    def ctrl(*a, **k):
        made.append(real_ctrl(*a, **k))
        return made[-1]

    monkeypatch.setattr(triag, "_target_rules", rules)
    monkeypatch.setattr(triag, "SourceKV", ctrl)
    s = _settings(bb, **kw)
    out = triag.run_targets(bb, pair["cond"], pair["ref"], pair["normal"], masks, s, cache)
    monkeypatch.setattr(triag, "_target_rules", real_rules)
    monkeypatch.setattr(triag, "SourceKV", real_ctrl)
    c = made[-1]  # the target run's controller (source runs made theirs first)
    maps = {(kind, step, layer): v for (kind, b, step, layer, nm), v in c.captured.items() if nm == "all"}
    return out, s, maps, c


def _on_grid(mask, hw):
    from ops.diffusion.blend import latent_mask

    return latent_mask(mask, hw, rule="majority")[0, 0].flatten()


@pytest.fixture(scope="module")
def wiring_cache():
    from ops.methods.o2mag.triag import BranchCache

    return BranchCache()


def test_dae_cross_acts_only_inside_the_target_mask_and_only_in_its_step_window(bb, pair, monkeypatch, wiring_cache):
    masks = _targets()[1:2]
    _, s, maps, c = _instrumented(bb, pair, masks, monkeypatch, wiring_cache)
    assert s.dae_steps == (2, 3) and s.dae_factor == 1.5
    seen = set()
    for (kind, step, layer), p in maps.items():
        if kind != "cross":
            continue
        h, w = c.layer_hw[layer]
        inside = _on_grid(masks[0], (h, w))
        sums = p[0].reshape(h * w, -1).sum(-1)  # unscaled rows sum to 1; DAE rows to 1 + 0.5 * (token mass)
        assert torch.allclose(sums[~inside], torch.ones(int((~inside).sum())), atol=1e-5), (step, layer)
        if step in s.dae_steps:
            assert (sums[inside] > 1 + 1e-4).all(), (step, layer)
        else:
            assert torch.allclose(sums[inside], torch.ones(int(inside.sum())), atol=1e-5), (step, layer)
        seen.add((step, h))
    assert {h for _, h in seen} == {16, 8} and {st for st, _ in seen} == set(range(STEPS))


def test_grafting_reads_only_reference_keys_in_m_r_and_only_on_the_configured_layers(bb, pair, reference, monkeypatch,
                                                                                    wiring_cache):
    masks = _targets()[1:2]
    _, s, maps, c = _instrumented(bb, pair, masks, monkeypatch, wiring_cache, graft_layers=("up",))
    grafted_layers, other_layers = set(), set()
    for (kind, step, layer), p in maps.items():
        if kind != "self":
            continue
        h, w = c.layer_hw[layer]
        rows, keys_out = _on_grid(masks[0], (h, w)), ~_on_grid(reference.mask, (h, w))
        leak = p[0][rows][:, keys_out].sum(-1)  # mass of each M_T row on keys outside M_R
        if layer.startswith("up"):
            assert float(leak.max()) == 0.0, (step, layer)
            grafted_layers.add(layer)
        else:
            assert (leak > 1e-3).all(), (step, layer)  # the target's own keys: softmax is never exactly 0
            other_layers.add(layer)
    assert grafted_layers and other_layers
    assert {c.layer_hw[k][0] for k in grafted_layers} == {16, 8}  # both resolutions are grafted
    # only the decoder's first block (8x8) configured: the 16x16 decoder layers keep the target's own keys
    first = tuple(k for k in bb.unet.attn_processors if k.startswith("up_blocks.0") and "attn1" in k)
    _, _, maps1, c1 = _instrumented(bb, pair, masks, monkeypatch, wiring_cache, graft_layers=first)
    for (kind, step, layer), p in maps1.items():
        if kind == "self" and layer.startswith("up"):
            h, w = c1.layer_hw[layer]
            rows, keys_out = _on_grid(masks[0], (h, w)), ~_on_grid(reference.mask, (h, w))
            leak = p[0][rows][:, keys_out].sum(-1)
            assert (float(leak.max()) == 0.0) == (layer in first), (step, layer)


def test_self_attention_dae_reweights_toward_the_region_and_is_not_a_gain(bb, pair, monkeypatch, wiring_cache):
    masks = _targets()[1:2]
    _, s, on, c = _instrumented(bb, pair, masks, monkeypatch, wiring_cache)
    _, _, off, _ = _instrumented(bb, pair, masks, monkeypatch, wiring_cache, dae_factor=1.0)
    step = s.dae_steps[0]  # everything before this step is identical in both runs
    first = next(k for k in bb.unet.attn_processors if "attn1" in k)  # the UNet's first attention layer
    assert first.startswith("down")  # not grafted: DAE re-weights the target's own keys there
    h, w = c.layer_hw[first]
    region = _on_grid(masks[0], (h, w))
    p_on, p_off = on[("self", step, first)][0], off[("self", step, first)][0]  # (Nq, Nk), mean over heads
    f = s.dae_factor
    # per head: p' = f p / Z on keys in M_T, p / Z outside, Z = 1 + (f − 1) m ∈ (1, f); the head mean keeps the signs
    torch.testing.assert_close(p_on[~region], p_off[~region], atol=1e-6, rtol=1e-5)  # rows outside M_T untouched
    torch.testing.assert_close(p_on.sum(-1), torch.ones(h * w), atol=1e-5, rtol=0)  # rows stay distributions
    rows_on, rows_off = p_on[region], p_off[region]
    assert (rows_on[:, region] > rows_off[:, region]).all()  # every key of the region gains ...
    assert (rows_on[:, ~region] < rows_off[:, ~region]).all()  # ... every background key loses
    assert (rows_on[:, region] < f * rows_off[:, region]).all()  # by less than f: renormalised
    mass_on, mass_off = rows_on[:, region].sum(-1), rows_off[:, region].sum(-1)
    assert (mass_on > mass_off + 1e-4).all()  # attention moved toward the region
    assert not torch.allclose(rows_on, f * rows_off, atol=1e-3)  # not a row gain
    for st in range(step):
        assert torch.equal(on[("self", st, first)], off[("self", st, first)])


def test_without_triag_masks_the_target_reads_the_whole_reference(bb, pair, reference, monkeypatch, wiring_cache):
    masks = _targets()[1:2]
    _, _, maps, c = _instrumented(bb, pair, masks, monkeypatch, wiring_cache, triag_masks=False)
    for (kind, step, layer), p in maps.items():
        if kind == "self" and layer.startswith("up"):
            keys_out = ~_on_grid(reference.mask, c.layer_hw[layer])
            assert (p[0][:, keys_out].sum(-1) > 1e-3).all(), (step, layer)  # every row reads keys outside M_R too


def test_ablation_switches_map_onto_the_settings(bb, reference, tmp_path):
    from ops.methods.o2mag import triag_settings

    base = triag_settings(O2MAGConfig(steps=STEPS), bb, "brick", "hole")
    assert base.dae_factor == 1.5 and base.triag_masks
    assert triag_settings(O2MAGConfig(steps=STEPS, dae=False), bb, "brick", "hole").dae_factor == 1.0
    assert not triag_settings(O2MAGConfig(steps=STEPS, triag_masks=False), bb, "brick", "hole").triag_masks
    cfg = O2MAGConfig(ago=False, ago_steps=30)
    adapter = O2MAG().fit(bb, [reference], cfg, tmp_path)
    assert adapter.path is None and not (tmp_path / "ago").exists()
    e = O2MAG().embedding(bb, adapter, reference, cfg)
    assert torch.equal(e, bb.encode_prompt([render_prompt(cfg, "brick", "hole")]))
