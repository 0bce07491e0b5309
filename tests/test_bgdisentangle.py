"""bg-disentangle: eq. 5-7 (Lemma 1, gradient paths), eq. 10-11 masking, eq. 8/9 generation and its cache, eq. 13
masks, resumable training, the plugin through the stage and an MVTec LOCO tree. All on the untrained tiny backbone:
mechanics, not quality."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ops.diffusion.attention import AttentionController, Capture
from ops.diffusion.blend import latent_mask
from ops.diffusion.branches import BranchRunner
from ops.diffusion.inversion import invert, reconstruct
from ops.diffusion.vae import encode
from ops.masks.refine import attention_mask
from ops.methods.base import check_results
from ops.methods.bgdisentangle import BgDisentangle
from ops.methods.bgdisentangle import loss as L
from ops.methods.bgdisentangle import sampling as S
from ops.methods.bgdisentangle.conditioning import build
from ops.types import Sample, SynthesisJob

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
torch.set_num_threads(1)

SIZE = 64
STEPS = 4  # DDIM steps in the sampling tests


@pytest.fixture(scope="module")
def bb():
    from ops.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu", cache=False)  # private: fit adds and removes LoRA layers


@pytest.fixture(scope="module")
def cond(bb):
    return build(bb, "sks crack defect", "an empty masked region", "a photo of a brick")


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    base = rng.integers(60, 180, size=(1, 1, 3)) + 30 * np.sin(xx / rng.uniform(3, 9))[..., None]
    return np.clip(base + rng.normal(0, 10, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture(scope="module")
def support():
    out = []
    for i, box in enumerate([(20, 40, 10, 40), (8, 30, 30, 56), (36, 60, 6, 30)]):
        img, m = _image(i), _box(*box)
        img[m] = (img[m] * 0.4).astype(np.uint8)
        out.append(Sample(f"crack_{i:03d}", "brick", "crack", img, m, source=f"crack/{i:03d}.png"))
    return out


@pytest.fixture(scope="module")
def normal():
    return Sample("good-0", "brick", "good", _image(7), None, source="good-0.png")


@pytest.fixture(scope="module")
def fitted(bb, support, tmp_path_factory):
    method = BgDisentangle()
    cfg = method.config({"train_steps": 3, "steps": STEPS, "ckpt_every": 2})
    adapter = method.fit(bb, support, cfg, tmp_path_factory.mktemp("bgd"))
    return method, cfg, adapter


def _latent_mask(mask: np.ndarray, bb) -> torch.Tensor:
    return S.target_latent_mask(mask, (bb.latent_size, bb.latent_size))


def _z0(bb, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, bb.latent_size, bb.latent_size, generator=torch.Generator().manual_seed(seed))


def _eq5_error(bb, unet, support) -> float:
    """Eq. 5 on fixed draws of the support (its two terms weighted here, not by the code under test)."""
    from ops.methods.bgdisentangle.fit import support_tensors

    lat, masks = support_tensors(bb, support)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(50, 950, (lat.shape[0],), generator=g)
    eps = torch.randn(lat.shape, generator=g)
    cond = build(bb, "sks crack defect", "an empty masked region", "a photo of a brick")
    with torch.no_grad():
        z_t, z_tm = L.masked_noising(bb.scheduler, lat, masks, eps, t)
        e_def, e_bg = L.predictions(unet, z_t, z_tm, t, cond, masks)
    m = masks.float()
    return float((m * (eps - e_def) ** 2 + (1 - m) * (eps - e_bg) ** 2).mean())


# ---------------------------------------------------------------- training: eq. 5-7 and eq. 10-11

def test_background_prediction_is_independent_of_the_defect_area(bb, cond):
    """Lemma 1: perturbing z_0 (and ε) inside m leaves ε_θ(z_t^m, t, C2) bit-identical; the defect branch moves."""
    m = _latent_mask(_box(16, 40, 12, 44), bb).expand(2, -1, -1, -1)
    z0, eps = _z0(bb), _z0(bb, seed=1)
    t = torch.tensor([500, 900])
    bump = 3.0 * m.float() * _z0(bb, seed=2)
    with torch.no_grad():
        d1, b1 = L.predictions(bb.unet, *L.masked_noising(bb.scheduler, z0, m, eps, t), t, cond, m)
        d2, b2 = L.predictions(bb.unet, *L.masked_noising(bb.scheduler, z0 + bump, m, eps + bump, t), t, cond, m)
    assert torch.equal(b1, b2)
    assert (d1 - d2).abs().max() > 1e-3
    z_t, z_tm = L.masked_noising(bb.scheduler, z0, m, eps, t)
    assert torch.equal(z_tm, torch.where(m, torch.zeros(()), z_tm)) and torch.allclose(z_tm, (~m) * z_t, atol=1e-6)


def test_without_the_matching_term_no_gradient_reaches_c_def(bb, cond):
    m = _latent_mask(_box(16, 40, 12, 44), bb).expand(2, -1, -1, -1)
    t = torch.tensor([300, 700])
    z_t, z_tm = L.masked_noising(bb.scheduler, _z0(bb), m, _z0(bb, seed=1), t)
    eps = _z0(bb, seed=1)

    def grads(terms):
        leaves = [c.detach().clone().requires_grad_(True) for c in (cond.c_def, cond.c_m, cond.c_bg)]
        e_def, e_bg = L.predictions(bb.unet, z_t, z_tm, t, cond, m, *leaves)
        L.disentangle_loss(eps, e_def, e_bg, m, terms).backward()
        return [None if x.grad is None else x.grad.abs().sum().item() for x in leaves]

    g_def, g_m, g_bg = grads(("reg",))
    assert not g_def and g_m > 0 and g_bg > 0
    g_def, g_m, g_bg = grads(("match",))
    assert g_def > 0 and not g_m and g_bg > 0
    assert all(g > 0 for g in grads(("match", "reg")))
    bb.unet.zero_grad(set_to_none=True)  # the shared UNet's own grads are not this test's subject


def test_masked_cross_attention_gives_defect_tokens_nothing_outside_the_mask(bb, cond):
    target = _box(16, 40, 12, 44)
    m = _latent_mask(target, bb).expand(2, -1, -1, -1)
    t = torch.tensor([400, 400])
    z_t, z_tm = L.masked_noising(bb.scheduler, _z0(bb), m, _z0(bb, seed=1), t)
    ctrls: list = []
    with torch.no_grad():
        L.predictions(bb.unet, z_t, z_tm, t, cond, m, extra_rules=[Capture(kind="cross")], controllers=ctrls)
    ctrl = ctrls[0]
    n = cond.length
    checked = 0
    for branch in (L.DEF, L.BG):
        for layer, (h, w) in ctrl.layer_hw.items():
            if ctrl.infos[layer].kind != "cross":
                continue
            p = ctrl.maps("cross", branch, layers=[layer])  # (2, h, w, 2L)
            inside = latent_mask(m, (h, w), rule="majority")[:, 0]
            region, bg = p[..., :n], p[..., n:]
            assert inside.any() and (~inside).any()
            assert region[~inside].abs().max() == 0  # C_def / C_m never outside m'
            assert bg[inside].abs().max() == 0  # C_bg never inside m'
            assert torch.allclose(region.sum(-1)[inside], torch.ones(()), atol=1e-5)  # softmax over its own group
            assert torch.allclose(bg.sum(-1)[~inside], torch.ones(()), atol=1e-5)
            checked += 1
    assert checked >= 4


# ---------------------------------------------------------------- generation: eq. 8, eq. 9 and the cache

def test_eq9_with_an_empty_mask_is_plain_ddim_reconstruction_of_the_inverted_normal(bb, cond, normal):
    z0 = encode(bb, normal.image)
    m = _latent_mask(np.zeros((SIZE, SIZE), bool), bb)
    # with m = 0 every query attends to C_bg alone: the toolkit's inversion + reconstruction under C_bg
    inv = invert(bb, z0, cond.c_bg, STEPS)
    plain = reconstruct(bb, inv, cond.c_bg)
    run = S.background_run(bb, z0, m, cond, STEPS)
    assert torch.allclose(run.zT_m, inv.zT, atol=1e-4, rtol=1e-4)
    cached = S.denoise(bb, cond, m, S.start_latents(run.zT_m, m, [1, 2]), STEPS, background=run).z0
    live = S.denoise(bb, cond, m, S.start_latents(run.zT_m, m, [3]), STEPS).z0
    scale = plain.abs().max()
    for z in (cached[0:1], cached[1:2], live):
        assert (z - plain).abs().max() <= 1e-4 * scale


def test_background_is_shared_by_every_seed_and_the_defect_is_not(bb, cond, normal):
    """Proposition 1: outside m, z*_0 is the background stream for every ε; inside m the seeds differ."""
    z0 = encode(bb, normal.image)
    m = _latent_mask(_box(16, 40, 12, 44), bb)
    run = S.background_run(bb, z0, m, cond, STEPS)
    assert torch.equal(run.zT_m[m.expand_as(run.zT_m)], torch.zeros(int(m.sum()) * 4))  # eq. 8 keeps 0 inside
    gen = S.denoise(bb, cond, m, S.start_latents(run.zT_m, m, [1, 2]), STEPS, background=run)
    out = ~m.expand_as(gen.z0)
    assert torch.equal(gen.z0[0][out[0]], gen.z0[1][out[1]])
    assert torch.equal(gen.z0[0][out[0]], run.z0_m[0][out[0]])
    assert (gen.z0[0] - gen.z0[1])[~out[0]].abs().min() > 0
    live = S.denoise(bb, cond, m, S.start_latents(run.zT_m, m, [1]), STEPS)
    assert torch.allclose(live.z0, gen.z0[:1], atol=1e-5)


def test_cached_and_uncached_synthesis_agree_and_share_one_inversion(bb, fitted, normal, monkeypatch):
    method, cfg, adapter = fitted
    targets = [_box(16, 40, 12, 44)] * 3 + [_box(30, 60, 30, 60)]
    jobs = [SynthesisJob(i, 100 + i, "brick", "crack", normal, t) for i, t in enumerate(targets)]
    calls = []
    real = S.invert_masked
    monkeypatch.setattr(S, "invert_masked", lambda *a, **k: calls.append(1) or real(*a, **k))
    import ops.methods.bgdisentangle as pkg

    monkeypatch.setattr(pkg, "invert_masked", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = list(check_results(jobs, method.synthesize(bb, adapter, jobs, method.config(
        {"steps": STEPS, "target_batch": 1}))))
    assert len(calls) == 2  # one inversion per (normal, latent mask): the three shared targets reuse theirs
    plain = list(check_results(jobs, method.synthesize(bb, adapter, jobs, method.config(
        {"steps": STEPS, "cache_inversion": False}))))
    assert len(calls) == 2 + len(jobs)  # uncached: every target inverts again
    for a, b in zip(cached, plain):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
        assert np.array_equal(a.mask, b.mask)
    assert not np.array_equal(cached[0].image, cached[1].image)  # different seeds, different defects


# ---------------------------------------------------------------- eq. 13

def test_refined_mask_never_leaves_the_target_mask():
    target = np.zeros((SIZE, SIZE), bool)
    target[10:37, 9:30] = True  # edges off the 8-px cells of a 8x8 map: bilinear spill crosses them
    target[37:50, 20:23] = True
    attention = torch.ones(8, 8)
    spill = attention_mask(attention.numpy(), target)
    assert (spill & ~target).any()  # eq. 13 alone would leave the target here
    refined, extra = S.refine(attention, target)
    assert refined.any() and not (refined & ~target).any()
    assert np.array_equal(attention_mask(extra, target), refined)  # the refine stage reproduces the method's mask


def test_synthesize_contract_determinism_and_own_masks(bb, fitted, normal):
    method, cfg, adapter = fitted
    targets = [_box(16, 40, 12, 44), _box(30, 60, 30, 60)]
    jobs = [SynthesisJob(i, 7 + i, "brick", "crack", normal, t) for i, t in enumerate(targets)]
    res = list(check_results(jobs, method.synthesize(bb, adapter, jobs, cfg)))
    again = list(method.synthesize(bb, adapter, jobs[:1], cfg))
    assert np.array_equal(res[0].image, again[0].image) and np.array_equal(res[0].mask, again[0].mask)
    for r in res:
        assert not (r.mask & ~r.job.target_mask).any()
        assert r.params["mask"] in ("eq13 refined", "target (refinement empty)")
        att = r.extras["attention"]
        assert att.shape == r.job.target_mask.shape and att.dtype == np.float32 and 0 <= att.min() <= att.max() <= 1
        if r.params["mask"] == "eq13 refined":
            assert np.array_equal(attention_mask(att, r.job.target_mask), r.mask)
        # demo preset: outside the generated latent cells the normal image is kept to the bit
        from ops.methods.o2mag.triag import generated_region

        region = generated_region(r.job.target_mask, (bb.latent_size, bb.latent_size))
        assert np.array_equal(r.image[~region], normal.image[~region])
    assert not getattr(bb.unet, "peft_config", None)  # the LoRA left the shared UNet


# ---------------------------------------------------------------- training files, resume, full UNet

def test_fit_writes_diffusers_lora_and_reruns_idempotently(bb, support, fitted):
    method, cfg, adapter = fitted
    dt_dir = adapter.path / "crack"
    info = json.loads((dt_dir / "adapter.json").read_text())
    assert info["adapter"] == "lora" and len(info["losses"]) == 3 and info["def_prompt"] == "sks crack defect"
    pipe = bb.to_pipeline()
    pipe.load_lora_weights(str(dt_dir), weight_name=info["weights"], adapter_name="check")
    try:
        assert "check" in bb.unet.peft_config
    finally:
        pipe.delete_adapters("check")
    again = method.fit(bb, support, cfg, adapter.path)
    assert again.meta["defect_types"]["crack"]["skipped"]


def test_interrupted_fit_resumes_to_the_same_weights(bb, support, tmp_path):
    from safetensors.torch import load_file

    method = BgDisentangle()
    cfg = method.config({"train_steps": 4, "ckpt_every": 2, "lr": 5e-2})

    def crash_at_step_3(desc, done, _total):
        if desc.endswith("/crack") and done == 3:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        method.fit(bb, support[:2], cfg, tmp_path / "a", progress=crash_at_step_3)
    assert not (tmp_path / "a" / "crack" / "adapter.json").exists()
    assert not getattr(bb.unet, "peft_config", None)
    method.fit(bb, support[:2], cfg, tmp_path / "a")
    method.fit(bb, support[:2], cfg, tmp_path / "b")
    info = json.loads((tmp_path / "a" / "crack" / "adapter.json").read_text())
    assert info["resumed_from"] == 2 and len(info["losses"]) == 4
    wa = load_file(tmp_path / "a" / "crack" / "pytorch_lora_weights.safetensors")
    wb = load_file(tmp_path / "b" / "crack" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    from ops.methods.bgdisentangle.fit import adapted, read_info

    with adapted(bb, read_info(tmp_path / "a" / "crack"), tmp_path / "a" / "crack") as tuned:
        after = _eq5_error(bb, tuned.unet, support[:2])
    assert after < _eq5_error(bb, bb.unet, support[:2]) - 0.005  # the resumed weights are a trained adapter


def test_full_unet_adapter_trains_a_copy_and_synthesizes(bb, support, normal, tmp_path):
    method = BgDisentangle()
    cfg = method.config({"adapter": "full", "train_steps": 2, "lr": 1e-3, "steps": 2})
    before = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    adapter = method.fit(bb, support[:1], cfg, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in bb.unet.state_dict().items())  # shared UNet untouched
    from diffusers import UNet2DConditionModel

    tuned = UNet2DConditionModel.from_pretrained(str(tmp_path / "crack" / "unet"))
    assert _eq5_error(bb, tuned, support[:1]) < _eq5_error(bb, bb.unet, support[:1]) - 0.1  # the saved copy trained
    jobs = [SynthesisJob(0, 1, "brick", "crack", normal, _box(16, 40, 12, 44))]
    (r,) = check_results(jobs, method.synthesize(bb, adapter, jobs, cfg))
    assert r.params["adapter"] == "full"


def test_config_presets_and_validation():
    method = BgDisentangle()
    demo = method.config({})
    assert (demo.adapter, demo.steps, demo.background) == ("lora", 10, "normal")
    paper = method.config({"preset": "paper"})
    assert (paper.adapter, paper.train_steps, paper.steps, paper.background) == ("full", 500, 50, "generated")
    for bad, match in (({"adapter": "dora"}, "adapter"), ({"threshold": 1.5}, "threshold"),
                       ({"def_prompt": "{oops}"}, "def_prompt"), ({"preset": "fast"}, "preset"),
                       ({"stepz": 3}, "unknown option")):
        with pytest.raises(ValueError, match=match):
            method.config(bad)


# ---------------------------------------------------------------- through the stage, MVTec LOCO

def test_loco_tree_ingests_and_runs_through_bgdisentangle(bb, tmp_path):
    from ops.generation import fit_adapter, synthesize_partition
    from ops.ingest import discover_categories, ingest_category
    from ops.splits import make_split
    from ops.storage import Storage
    from tests.fixtures import build_loco

    root = build_loco(tmp_path / "data", n_train=2, defects={"logical_anomalies": [2, 1, 1],
                                                            "structural_anomalies": [1, 1, 1]})
    assert discover_categories(root) == [("juice", "loco")]
    raw = ingest_category(root, "juice", cache_dir=tmp_path / "cache").rows
    split = make_split(raw)
    storage = Storage(tmp_path / "store")
    cfg = {"train_steps": 1, "steps": 2}
    adapters = fit_adapter(storage, "juice", "bgdisentangle", split, bb, cfg, progress=lambda *a: None)
    meta = json.loads(adapters.iloc[0]["meta_json"])
    assert set(meta["defect_types"]) == {"logical_anomalies", "structural_anomalies"}
    assert (tmp_path / "store/adapters/juice/bgdisentangle/logical_anomalies/adapter.json").is_file()
    assert (tmp_path / "store/adapters/juice/bgdisentangle/structural_anomalies/adapter.json").is_file()
    df = synthesize_partition(storage, "juice", "bgdisentangle", split, adapters, bb, n=2, seed=0, cfg=cfg)
    assert len(df) == 2 and set(df.defect_type) == {"logical_anomalies", "structural_anomalies"}
    assert all((tmp_path / "store" / p).is_file() for p in df.image_path)
