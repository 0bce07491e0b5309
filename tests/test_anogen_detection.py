"""AnoGen stage 3: the weak segmenter loss (τ = 1 is box supervision, per-row weak rule) and the detector variants
of a box-labelled partition (τ ablation row, Perlin + AnoGen mix)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ops.detection.segmenter import Segmenter, focal_loss_map, weak_supervision_keep
from ops.detection.stage import evaluate_detectors, train_detectors
from ops.storage import Storage


def _logits_and_box():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, generator=g) * 3
    logits[:, 0, :8] = 60.0  # saturated: float32 softmax gives p_normal == 1.0 exactly here
    logits[:, 1, :8] = -60.0
    box = torch.zeros(2, 16, 16)
    box[:, 4:12, 4:12] = 1
    return logits, box


def _segmenter(tau):
    return Segmenter(weak_tau=tau, pre_processor=False, post_processor=False, evaluator=False)


def test_tau_one_reduces_the_weak_loss_to_ordinary_box_supervision():
    logits, box = _logits_and_box()
    assert torch.softmax(logits, 1)[:, 0, :8].eq(1.0).all()
    plain = _segmenter(None).loss(logits, box)
    assert torch.equal(_segmenter(1.0).loss(logits, box), plain)
    assert torch.equal(weak_supervision_keep(logits, box, 1.0), torch.ones_like(box))
    weak = _segmenter(0.9).loss(logits, box)
    assert weak < plain  # τ = 0.9 drops the confident-normal pixels inside the box ...
    keep = weak_supervision_keep(logits, box, 0.9)
    assert keep[box == 0].eq(1).all() and keep[box == 1].eq(0).any()  # ... and only those
    assert torch.equal(weak, (focal_loss_map(logits, box) * keep).mean())


def test_weak_rule_applies_only_to_the_box_labelled_rows():
    logits, box = _logits_and_box()
    keep = weak_supervision_keep(logits, box, 0.9, rows=torch.tensor([True, False]))
    assert keep[1].eq(1).all() and keep[0].eq(0).any()
    assert torch.equal(keep[0], weak_supervision_keep(logits[:1], box[:1], 0.9)[0])


def test_box_method_partition_trains_tau_ablation_and_perlin_mix_rows(tmp_path, demo_split):
    from ops.generation import fit_adapter, synthesize_partition

    storage = Storage(tmp_path)
    # cutpaste anomalies on box targets stand in for AnoGen's output: the stage only sees a box-labelled manifest
    adapters = fit_adapter(storage, "brick", "cutpaste", demo_split, None, {}, progress=lambda *a: None)
    synthetic = synthesize_partition(storage, "brick", "cutpaste", demo_split, adapters, None, n=6, seed=0, cfg={},
                                     progress=lambda *a: None, target_mode="box")
    cfg = {"detectors": ["segmenter"], "image_size": 64, "val_every": 1, "batch_size": 4,
           "steps": {"segmenter": 2}, "options": {"segmenter": {"base_width": 4, "train_crop": None}}}
    det = train_detectors(storage, "brick", "anogen", demo_split, synthetic, None, cfg).set_index("detector")
    assert det.index.tolist() == ["segmenter", "segmenter-tau1", "segmenter-perlin"]
    assert det["weak_tau"].tolist() == [0.9, 1.0, 0.9]
    mix = json.loads(det.loc["segmenter-perlin", "config_json"])
    assert mix["detector"] == "segmenter" and mix["weak_rows"] == 6  # weak rule on the box rows only
    assert json.loads(det.loc["segmenter", "config_json"])["weak_rows"] is None
    n_anom = det["n_train_anomalous"] + det["n_val_anomalous"]
    assert n_anom["segmenter"] == 6 and n_anom["segmenter-perlin"] == 12
    samples = pd.read_parquet(storage.path(det.loc["segmenter-perlin", "samples_path"]))
    perlin = samples[samples["image_path"].str.contains("/mix-perlin/")]
    assert len(perlin) == 6 and perlin["mask_path"].str.contains("/mix-perlin/").all()
    ev = evaluate_detectors(storage, demo_split, det.reset_index(), cfg).set_index("detector")
    assert ev.loc["segmenter-perlin", "row_label"] == "synthetic: anogen + perlin"
    assert sorted(ev["weak_tau"]) == [0.9, 0.9, 1.0]


def test_training_step_applies_the_weak_rule_to_weak_paths_only():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = _segmenter(0.9)
    model.model.train()
    head = [m for m in model.model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        head.bias.copy_(torch.tensor([6.0, -6.0]))  # confident "normal" everywhere: the weak rule has work to do
    images = torch.rand(2, 3, 64, 64)
    box = torch.zeros(2, 64, 64)
    box[:, 16:48, 16:48] = 1
    batch = SimpleNamespace(image=images, gt_mask=box, image_path=["a.png", "b.png"])
    model.weak_paths = {"a.png"}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = model.training_step(batch)["loss"]
    model.load_state_dict(state)  # BatchNorm running stats moved; the same forward again
    logits = model.model(images)
    assert torch.allclose(got, model.loss(logits, box, torch.tensor([True, False])), atol=1e-6)
    model.load_state_dict(state)
    assert not torch.allclose(got, model.loss(model.model(images), box), atol=1e-6)
