"""CADiff: CTP losses, SSC (ControlNet + SAIM) wiring and files, IAR re-weighting rules, resumable fit, the plugin."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ops.methods.cadiff.losses import balanced_l2, loc_loss, nt_xent
from ops.types import Sample, SynthesisJob

torch.set_num_threads(1)
SIZE = 64


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(60, 200, (1, 1, 3)) + rng.integers(-30, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------- CTP losses (no model)

def test_loc_loss_is_zero_when_maps_equal_masks_and_grows_with_the_difference():
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(2, s, s, 2, generator=g) > 0.7).float() for s in (16, 8)]
    assert float(loc_loss([m.clone() for m in masks], masks)) == 0.0
    losses = []
    for eps in (0.1, 0.3, 0.6):
        noisy = [(m + eps * torch.rand(m.shape, generator=g)).clamp(0, 1) * (1 - eps) for m in masks]
        losses.append(float(loc_loss(noisy, masks)))
    assert 0 < losses[0] < losses[1] < losses[2]
    # one token's excess does not cancel the other's deficit (eq. 5's printed form would give 0 here)
    a = [masks[0] + torch.tensor([0.3, -0.3]), masks[1]]
    assert float(loc_loss(a, masks)) > 0.01


def test_loc_loss_is_balanced_between_a_small_mask_and_its_background():
    mask = torch.zeros(1, 16, 16)
    mask[0, 5:7, 5:7] = 1  # 4 of 256 cells
    miss_defect = mask * 0  # the map misses the defect entirely
    miss_background = 1 - mask + mask  # the map lights up everywhere
    # inside error 1 on 4 cells vs outside error 1 on 252 cells: balanced -> both 0.5
    assert float(balanced_l2(miss_defect, mask)) == pytest.approx(0.5)
    assert float(balanced_l2(miss_background, mask)) == pytest.approx(0.5)


def test_nt_xent_matches_eq_6_7_written_out():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 1, 0, 1, 0, 2])  # concept 2 has no positive: it is no anchor
    tau = 0.7
    z = v / v.norm(dim=1, keepdim=True)
    total, anchors = 0.0, 0
    for i in range(6):
        pos = [j for j in range(6) if j != i and labels[j] == labels[i]]
        if not pos:
            continue
        anchors += 1
        den = sum(torch.exp(z[i] @ z[k] / tau) for k in range(6) if k != i)
        total += sum(-torch.log(torch.exp(z[i] @ z[j] / tau) / den) for j in pos)
    assert float(nt_xent(v, labels, tau)) == pytest.approx(float(total / anchors), rel=1e-5)


def test_contrastive_term_separates_two_tokens_on_a_toy_problem():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, generator=g)
    tokens = torch.nn.Parameter(torch.stack([base, base + 0.05 * torch.randn(8, generator=g)]))  # nearly equal
    view_noise = 0.1 * torch.randn(4, 2, 8, generator=g)  # 4 augmented views of the two concepts
    labels = torch.tensor([0, 1]).repeat(4)
    cos0 = float(torch.cosine_similarity(tokens[0], tokens[1], dim=0).detach())
    opt = torch.optim.Adam([tokens], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        loss = nt_xent((tokens[None] + view_noise).reshape(8, 8), labels, temperature=0.5)
        loss.backward()
        opt.step()
    cos1 = float(torch.cosine_similarity(tokens[0], tokens[1], dim=0).detach())
    assert cos0 > 0.95 and cos1 < 0.0


def test_token_targets_pair_the_context_with_the_inverse_mask_and_the_anomaly_with_the_mask():
    from ops.methods.cadiff.trainer import token_targets

    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 8:24, 8:24] = 1
    masks[1, 0, 40:64, 0:32] = 1
    t = token_targets(masks, (16, 16))
    assert t.shape == (2, 16, 16, 2)
    low = torch.nn.functional.avg_pool2d(masks, 4)[:, 0] >= 0.5
    assert torch.equal(t[..., 1].bool(), low) and torch.equal(t[..., 0].bool(), ~low)


# ---------------------------------------------------------------- SSC: ControlNet + SAIM

@pytest.fixture(scope="module")
def ssc(bb):
    from ops.methods.cadiff.ssc import SSC

    return SSC.from_unet(bb.unet, bb.vae_factor, seed=0)


def _unet_inputs(bb):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 4, bb.latent_size, bb.latent_size, generator=g)
    with torch.no_grad():
        c = bb.encode_prompt(["a photo of a brick with a crack", "a photo"])
    m = torch.zeros(2, 1, bb.resolution, bb.resolution)
    m[:, :, 30:70, 40:90] = 1
    return z, c, m


def _perturbed(ssc, seed: int = 1):
    """A copy whose zero-initialised layers are non-zero (as after training)."""
    import copy

    out = copy.deepcopy(ssc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [*out.controlnet.controlnet_down_blocks, out.controlnet.controlnet_mid_block,
                      *[s.mlp[-1] for s in out.saims]]:
            layer.weight.copy_(0.05 * torch.randn(layer.weight.shape, generator=g))
        for layer in out.controlnet.controlnet_cond_embedding.conv_out, :
            layer.weight.copy_(0.05 * torch.randn(layer.weight.shape, generator=g))
    return out


def test_zero_initialised_controlnet_and_saim_leave_the_unet_output_unchanged(bb, ssc):
    z, c, m = _unet_inputs(bb)
    with torch.no_grad():
        plain = bb.unet(z, 400, encoder_hidden_states=c).sample
        down, mid = ssc.residuals(z, 400, c, m)
        controlled = ssc.unet_forward(bb.unet, z, 400, c, m).sample
    assert all(float(r.abs().max()) == 0 for r in down) and float(mid.abs().max()) == 0  # diffusers' zero convs
    assert torch.equal(controlled, plain)
    assert not any(h for h in (bb.unet.mid_block._forward_hooks, *[b._forward_pre_hooks for b in bb.unet.up_blocks]))


def test_every_saim_block_is_wired_into_the_unet(bb, ssc):
    z, c, m = _unet_inputs(bb)
    trained = _perturbed(ssc)
    with torch.no_grad():
        plain = bb.unet(z, 400, encoder_hidden_states=c).sample
        assert (trained.unet_forward(bb.unet, z, 400, c, m).sample - plain).abs().max() > 1e-4
        for i in range(len(trained.saims)):  # each block alone (others back at zero) changes the output
            only = _perturbed(ssc)
            for j, s in enumerate(only.saims):
                if j != i:
                    torch.nn.init.zeros_(s.mlp[-1].weight)
                    torch.nn.init.zeros_(s.mlp[-1].bias)
            out = only.unet_forward(bb.unet, z, 400, c, m).sample
            assert (out - plain).abs().max() > 1e-6, f"SAIM block {i} has no effect on the UNet output"


def test_saim_block_is_eq_9_10(bb):
    from ops.methods.cadiff.ssc import SAIM

    g = torch.Generator().manual_seed(2)
    block = SAIM(64, heads=2)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    y, yc = torch.randn(1, 64, 4, 5, generator=g), torch.randn(1, 64, 4, 5, generator=g)
    t, tc = y.flatten(2).transpose(1, 2), yc.flatten(2).transpose(1, 2)

    def rms(x, norm):
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    q = block.to_q(rms(t, block.norm_y)).view(1, 20, 2, 32).transpose(1, 2)
    k = block.to_k(rms(tc, block.norm_c)).view(1, 20, 2, 32).transpose(1, 2)
    v = block.to_v(rms(tc, block.norm_c)).view(1, 20, 2, 32).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, -1) @ v
    y_a = block.to_out(attn.transpose(1, 2).reshape(1, 20, 64))
    expected = (t + block.mlp(y_a)).transpose(1, 2).reshape(1, 64, 4, 5)
    with torch.no_grad():
        assert torch.allclose(block(y, yc), expected, atol=1e-5)


def test_saved_controlnet_loads_with_from_pretrained_and_gives_the_same_residuals(bb, ssc, tmp_path):
    from diffusers import ControlNetModel

    from ops.methods.cadiff.ssc import SSC

    trained = _perturbed(ssc)
    trained.save(tmp_path)
    z, c, m = _unet_inputs(bb)
    loaded = ControlNetModel.from_pretrained(str(tmp_path / "controlnet"))
    with torch.no_grad():
        down, mid = trained.residuals(z, 300, c, m)
        down2, mid2 = loaded(z, 300, encoder_hidden_states=c, controlnet_cond=m, return_dict=False)
        assert all(torch.equal(a, b) for a, b in zip(down, down2)) and torch.equal(mid, mid2)
        again = SSC.load(tmp_path)
        assert torch.equal(again.unet_forward(bb.unet, z, 300, c, m).sample,
                           trained.unet_forward(bb.unet, z, 300, c, m).sample)


# ---------------------------------------------------------------- IAR

PROMPT = "a photo of a brick with a crack"


def _iar_inputs(bb):
    with torch.no_grad():
        cond = bb.encode_prompt([PROMPT])
    ids = bb.tokenizer(PROMPT).input_ids
    token = ids.index(bb.tokenizer.convert_tokens_to_ids("crack</w>"))
    return cond, bb.null_embedding(), token, _image(4), _box(16, 40, 20, 48)


def _gen(bb, **kw):
    from ops.methods.cadiff.iar import IARSettings, generate

    cond, uncond, token, normal, mask = _iar_inputs(bb)
    return generate(bb, cond, uncond, token, normal, mask, seed=11, s=IARSettings(steps=3, **kw))


def test_w_one_changes_nothing(bb):
    off = _gen(bb, w=1.0, alpha_thr=2.0)  # α never exceeds 2: no re-weighting at all
    on = _gen(bb, w=1.0, alpha_thr=-1.0)  # re-weighting from step 1 on, with w = 1
    assert on.params["dfs_on_step"] == 1 and off.params["dfs_on_step"] is None
    # re-weighting runs attention on the explicit-score path, the plain run on SDPA: equal up to float rounding,
    # which the sampler's steps amplify a little; w = 1.5 on the same schedule moves the latent far more
    strong = _gen(bb, w=1.5, alpha_thr=-1.0)
    drift, effect = (on.latent - off.latent).abs().max(), (strong.latent - off.latent).abs().max()
    assert effect > 1e-4 and drift < 0.02 * effect, (float(drift), float(effect))


def test_no_reweighting_before_alpha_exceeds_the_threshold(bb):
    never = _gen(bb, w=1.5, alpha_thr=2.0)
    plain = _gen(bb, w=1.0, alpha_thr=2.0)
    assert never.params["dfs_on_step"] is None and len(never.params["alpha"]) == 2
    assert torch.equal(never.latent, plain.latent)
    # without DFS the same w acts from step 0
    assert (_gen(bb, w=1.5, alpha_thr=2.0, dfs=False).latent - plain.latent).abs().max() > 1e-4


def _one_step_maps(bb, w: float, step: int):
    """Cross-attention maps of every layer at ``step`` under the IAR rules (α_thr = -1: on from step 1)."""
    from ops.diffusion.attention import AttentionController, Capture
    from ops.methods.cadiff.iar import IARSettings, iar_rules

    cond, _, token, _, mask = _iar_inputs(bb)
    z = torch.randn(1, 4, bb.latent_size, bb.latent_size, generator=torch.Generator().manual_seed(0))
    c = AttentionController(bb.unet)
    focus, rule = iar_rules(mask, token, IARSettings(w=w, alpha_thr=-1.0))
    c.add(focus)
    c.add(rule)
    c.add(Capture(kind="cross", branches=["text"], name="all"))
    with c, torch.no_grad():
        for s in range(step + 1):
            c.set_step(s, 500)
            c.begin_call([("text", 1)], tuple(z.shape[-2:]))
            bb.unet(z, 500, encoder_hidden_states=cond)
    maps = {layer: v for (kind, b, s, layer, name), v in c.captured.items() if name == "all" and s == step}
    return maps, token, mask


def test_reweighting_never_changes_attention_outside_the_mask(bb):
    from ops.diffusion.blend import latent_mask

    base, token, mask = _one_step_maps(bb, 1.0, step=1)
    weighted, _, _ = _one_step_maps(bb, 2.0, step=1)
    before, _, _ = _one_step_maps(bb, 2.0, step=0)
    first = min(base, key=lambda n: (not n.startswith("down"), n))  # the first cross-attention layer run
    a, b = base[first][0], weighted[first][0]  # (h, w, 77)
    inside = latent_mask(mask, tuple(a.shape[:2]), rule="majority")[0, 0]
    assert torch.equal(a[~inside], b[~inside])  # rows outside the mask: untouched
    others = [k for k in range(a.shape[-1]) if k != token]
    assert torch.equal(a[inside][:, others], b[inside][:, others])  # other tokens: untouched
    assert torch.allclose(b[inside][:, token], 2.0 * a[inside][:, token], rtol=1e-6)  # the token: x w
    assert all(torch.equal(before[k], base0) for k, base0 in _one_step_maps(bb, 1.0, step=0)[0].items())


# ---------------------------------------------------------------- the plugin: fit, resume, synthesize

@pytest.fixture(scope="module")
def private_bb():
    from ops.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu", cache=False)  # fit adds tokens: keep the shared tokenizer clean


@pytest.fixture(scope="module")
def support():
    return [Sample(f"s{i}", "brick", d, _image(i), _box(8 + 4 * i, 30 + 4 * i, 16, 40), source=f"s{i}.png")
            for i, d in enumerate(["crack", "hole", "crack"])]


FIT = {"train_steps": 3, "control_steps": 2, "ckpt_every": 1, "steps": 3}


@pytest.fixture(scope="module")
def fitted(private_bb, support, tmp_path_factory):
    from ops.methods.cadiff import CADiff

    method = CADiff()
    out = tmp_path_factory.mktemp("cadiff") / "a"
    cfg = method.config(FIT)

    def crash_in_ssc(desc, done, _total):
        if desc.endswith("SSC") and done == 2:  # after the step-1 checkpoint
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        method.fit(private_bb, support, cfg, out, progress=crash_in_ssc)
    assert not (out / "cadiff.json").exists()
    assert not private_bb.unet.mid_block._forward_hooks  # the crash left no SAIM hook behind
    return method, method.fit(private_bb, support, cfg, out), out


def test_interrupted_fit_resumes_to_the_same_weights(private_bb, support, fitted, tmp_path):
    from safetensors.torch import load_file

    method, adapter, out = fitted
    info = json.loads((out / "cadiff.json").read_text())
    assert info["resumed_from"] == {"ctp": 3, "ssc": 1} and len(info["losses"]["ssc"]) == 2
    fresh = method.fit(private_bb, support, method.config(FIT), tmp_path / "b")
    for rel in ["tokens/learned_embeds-0.safetensors", "tokens/learned_embeds-2.safetensors",
                "ssc/saim.safetensors", "ssc/controlnet/diffusion_pytorch_model.safetensors"]:
        a, b = load_file(out / rel), load_file(tmp_path / "b" / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert fresh.meta["config_hash"] == adapter.meta["config_hash"]
    again = method.fit(private_bb, support, method.config(FIT), out)  # finished: skipped, nothing retrained
    assert again.meta["skipped"]


def test_fit_trains_one_context_token_and_one_token_per_defect_type(private_bb, fitted):
    from ops.diffusion.textual_inversion import read_learned_embeds

    _, adapter, out = fitted
    tokens = adapter.meta["tokens"]
    assert tokens["context"] == "<cadiff-brick>" and sorted(tokens["anomaly"]) == ["crack", "hole"]
    names = [read_learned_embeds(out / "tokens" / f)[0] for f in tokens["files"]]
    assert names == ["<cadiff-brick>", "<cadiff-brick-crack>", "<cadiff-brick-hole>"]
    # what training does to the tokens is checked by its effect on L_loc / NT-Xent (test_cadiff_wiring)
    cols = tokens["columns"]
    ids = private_bb.tokenizer(tokens["prompts"]["hole"]).input_ids
    assert private_bb.tokenizer.convert_ids_to_tokens([ids[cols[0]], ids[cols[1]]]) == \
        ["<cadiff-brick>", "<cadiff-brick-hole>"]


def test_synthesize_records_w_and_keeps_the_background_latent(private_bb, fitted, monkeypatch):
    from ops.diffusion.blend import latent_mask
    from ops.diffusion.vae import encode
    from ops.methods.cadiff import iar

    method, adapter, _ = fitted
    latents = []
    generate = iar.generate
    monkeypatch.setattr(iar, "generate", lambda *a, **k: latents.append(generate(*a, **k)) or latents[-1])
    normal = Sample("g0", "brick", "good", _image(9))
    jobs = [SynthesisJob(i, 100 + i, "brick", d, normal, _box(20, 40, 18, 44))
            for i, d in enumerate(["crack", "hole"])]
    out = list(method.synthesize(private_bb, adapter, jobs, method.config(FIT)))
    with torch.no_grad():
        z0 = encode(private_bb, normal.image).float()
    assert [r.job.index for r in out] == [0, 1]
    ws = [r.params["w"] for r in out]
    assert all(0.5 <= w <= 1.5 for w in ws) and ws[0] != ws[1] and out[0].params["controlnet"]
    for r, g in zip(out, latents):
        assert r.image.shape == normal.image.shape and r.mask.dtype == bool and r.mask.any()
        assert not (r.mask & ~r.job.target_mask).any()  # own mask = target refined
        # the sampled latent before decoding and the pixel paste: the normal latent outside the mask's cells
        outside = ~latent_mask(r.job.target_mask, tuple(z0.shape[-2:]), rule="any")[0, 0]
        assert torch.equal(g.latent[..., outside], z0[..., outside])
        assert r.extras["attention"].shape == (SIZE, SIZE)
    bad = [SynthesisJob(0, 1, "brick", "scratch", normal, _box(20, 40, 18, 44))]
    with pytest.raises(ValueError, match="scratch"):
        list(method.synthesize(private_bb, adapter, bad, method.config(FIT)))


def test_ctp_loss_reads_the_attention_of_its_own_two_tokens(bb, support):
    from ops.diffusion.attention import AttentionController, Capture
    from ops.methods.cadiff.trainer import CTPLoss, token_columns

    # plain words stand in for the placeholders: the loss only needs their columns
    prompts = {"crack": "a photo of brick with crack", "hole": "a photo of brick with hole"}
    ids = [bb.tokenizer.convert_tokens_to_ids(w) for w in ("brick</w>", "crack</w>")]
    cols = tuple(token_columns(bb.tokenizer, prompts["crack"], ids))
    assert cols == (4, 6)
    loss = CTPLoss(bb, support, prompts, cols, {"crack": 1, "hole": 2}, batch_size=1, views=2, loc_timesteps=2,
                   gamma=1e-3, beta=5e-4, temperature=0.5)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, bb.latent_size, bb.latent_size, generator=g)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        cond = bb.encode_prompt([prompts["hole"], prompts["crack"]])
        pred, maps = loss.forward(z, t, cond, torch.zeros(2, 1, 8, 8))
        ref = AttentionController(bb.unet, [Capture(kind="cross", name="all")])
        ref.begin_call([("x", 2)], tuple(z.shape[-2:]))
        with ref:
            plain = bb.unet(z, t, encoder_hidden_states=cond).sample
    assert torch.allclose(pred, plain, atol=1e-5)
    assert set(maps) == set(loss.cross) and len(maps) >= 3  # every cross-attention layer of the UNet
    for layer, a in maps.items():
        full = ref.captured[("cross", "x", 0, layer, "all")]
        assert torch.allclose(a, full[..., list(cols)], atol=1e-6), layer
        assert loss.hidden[layer].shape[:2] == (2, a.shape[1] * a.shape[2])
    with torch.no_grad():
        value = loss(0, torch.Generator().manual_seed(1))
    parts = loss.parts
    assert parts["loc"] > 0 and parts["con"] > 0 and np.isfinite(parts["caldm"])
    assert float(value) == pytest.approx(parts["caldm"] + 1e-3 * parts["loc"] + 5e-4 * parts["con"], rel=1e-5)


def test_stage_functions_fit_and_synthesize_reproducibly(private_bb, demo_split, tmp_path):
    from ops.generation import fit_adapter, synthesize_partition
    from ops.storage import Storage

    cfg = {"train_steps": 2, "control_steps": 1, "steps": 2}
    storage = Storage(tmp_path)
    adapters = fit_adapter(storage, "brick", "cadiff", demo_split, private_bb, cfg, progress=lambda *a: None)
    meta = json.loads(adapters.iloc[0]["meta_json"])
    assert sorted(meta["tokens"]["anomaly"]) == sorted(set(demo_split[demo_split.role == "support"].defect_type))
    df = synthesize_partition(storage, "brick", "cadiff", demo_split, adapters, private_bb, n=2, seed=3, cfg=cfg)
    assert len(df) == 2 and all((tmp_path / p).is_file() for p in df.image_path)
    params = [json.loads(p) for p in df.params_json]
    assert all(0.5 <= p["w"] <= 1.5 and p["controlnet"] for p in params)
    again = synthesize_partition(storage, "brick", "cadiff", demo_split, adapters, private_bb, n=2, seed=3, cfg=cfg)
    assert again.sha256.tolist() == df.sha256.tolist()  # deterministic rerun
