"""The one attention-map normalisation rule (``ops.diffusion.attn_mask``) and the two own-mask paths that use it:
CADiff's IAR mask and bg-disentangle's eq. 13 with ``threshold_rule="peak_in_mask"``. The edge case: the map's
peak lies outside the mask, which divided by the global maximum emptied the mask."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ops.diffusion import attn_mask
from ops.diffusion.attn_mask import peak_normalise
from ops.masks.refine import attention_mask
from tests.test_bgdisentangle import _box, _image

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
torch.set_num_threads(1)

PROMPT = "a photo of a brick with a crack"


@pytest.fixture(scope="module")
def bb():
    from ops.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu", cache=False)


def test_peak_outside_the_mask_does_not_empty_it():
    mask = _box(16, 40, 12, 44)
    a = np.where(mask, np.linspace(0.01, 0.04, 64)[None, :], 0.0).astype(np.float32)
    a[2, 60] = 0.9  # a hot spot far outside the mask
    assert not attention_mask(a / a.max(), mask).any()  # the global-maximum rule empties the mask here
    n = peak_normalise(a, mask)
    assert n[mask].max() == 1.0 and 0 <= n.min() and n.max() <= 1.0
    refined = attention_mask(n, mask)
    assert refined.any() and not (refined & ~mask).any()
    assert np.array_equal(refined, mask & (a >= 0.5 * a[mask].max()))  # half the peak inside the mask


def test_without_a_peak_inside_the_map_is_left_unscaled():
    mask = _box(16, 40, 12, 44)
    a = np.where(mask, 0.0, 0.3).astype(np.float32)
    assert np.array_equal(peak_normalise(a, mask), a)
    assert np.array_equal(peak_normalise(a, np.zeros_like(mask)), a)
    with pytest.raises(ValueError, match="one grid"):
        peak_normalise(a, mask[:32])


def test_cadiff_own_mask_survives_an_attention_peak_outside_the_mask(bb, monkeypatch):
    """Through CADiff's generation: the anomaly token's map gets a hot spot outside the mask; the own mask is
    still the target refined at half the peak inside it, computed by the shared rule."""
    from ops.methods.cadiff import iar

    mask = _box(16, 40, 20, 48)
    reads, calls = [], []

    class HotSpot(iar.AttentionController):
        def maps(self, kind="cross", branch="x", resolution=None, steps=None, layers=None, name=""):
            out = super().maps(kind, branch, resolution, steps, layers, name)
            if steps is None and kind == "cross" and branch == iar.TEXT:  # the own-mask read, after sampling
                out = out.clone()
                out[:, 0, -1] = 50 * out.max()  # top-right cell: outside the mask
                reads.append(out[0, ..., 0].clone())
            return out

    real = attn_mask.peak_normalise
    monkeypatch.setattr(iar, "AttentionController", HotSpot)
    monkeypatch.setattr(iar, "peak_normalise", lambda a, m: calls.append(m) or real(a, m))
    with torch.no_grad():
        cond = bb.encode_prompt([PROMPT])
    ids = bb.tokenizer(PROMPT).input_ids
    token = ids.index(bb.tokenizer.convert_tokens_to_ids("crack</w>"))
    r = iar.generate(bb, cond, bb.null_embedding(), token, _image(4), mask, seed=11, s=iar.IARSettings(steps=2))
    (a,) = reads
    up = torch.nn.functional.interpolate(a[None, None].float(), size=mask.shape, mode="bilinear",
                                         align_corners=False)[0, 0].numpy()
    assert not attention_mask(up / up.max(), mask).any()  # the hot spot would have emptied the mask
    assert r.params["mask"] == "target refined by attention"
    assert r.mask.any() and not (r.mask & ~mask).any()
    assert np.array_equal(r.mask, mask & (up >= 0.5 * up[mask].max()))
    assert np.isclose(r.attention[mask].max(), 1.0)
    (m,) = calls
    assert np.array_equal(m, mask)


def test_bgdisentangle_peak_rule_uses_the_shared_normalisation(monkeypatch):
    from ops.methods.bgdisentangle import sampling as S

    assert S.peak_normalise is attn_mask.peak_normalise
    target = _box(16, 40, 12, 44)
    calls = []
    real = attn_mask.peak_normalise
    monkeypatch.setattr(S, "peak_normalise", lambda a, m: calls.append((a.copy(), m)) or real(a, m))
    a = torch.from_numpy(np.where(_box(16, 40, 12, 44)[::2, ::2], np.linspace(0.01, 0.04, 32)[None, :], 0.7)
                         .astype(np.float32))
    refined, extra = S.refine(a, target, 0.5, "peak_in_mask")
    ((up, m),) = calls
    assert np.array_equal(m, target) and np.array_equal(extra, real(up, target))
    assert refined.any() and np.array_equal(refined, (extra >= 0.5) & target)
    S.refine(a, target, 0.5, "absolute")
    assert len(calls) == 1  # the paper's absolute threshold does not rescale
