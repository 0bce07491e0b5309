"""AnoGen stage 3: the weak loss (τ = 1 is box supervision, per-row weak rule) in the segmenter and in DRAEM, and the
detector variants of a box-labelled partition (τ ablation row, Perlin + AnoGen mix), checked in the trained models'
losses and predictions."""
from __future__ import annotations

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


TAU = 0.9  # the detection config's weak_tau; its weak_ablation adds the τ = 1 row
SEGMENTER_CFG = {"detectors": ["segmenter"], "image_size": 64, "val_every": 6, "batch_size": 4,
                 "steps": {"segmenter": 6}, "options": {"segmenter": {"base_width": 4, "train_crop": None, "lr": 2e-2}}}


def _box_partition(storage: Storage, demo_split) -> pd.DataFrame:
    """Cutpaste anomalies on box targets stand in for AnoGen's output: the stage only sees a box-labelled manifest."""
    from ops.generation import fit_adapter, synthesize_partition

    adapters = fit_adapter(storage, "brick", "cutpaste", demo_split, None, {}, progress=lambda *a: None)
    return synthesize_partition(storage, "brick", "cutpaste", demo_split, adapters, None, n=6, seed=0, cfg={},
                                progress=lambda *a: None, target_mode="box")


def _confident_normal(model) -> None:
    """Start the discriminative head at p_normal > 0.99 everywhere, so that the weak rule has pixels to drop."""
    net = getattr(model.model, "discriminative_subnetwork", model.model)
    head = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        head.bias.copy_(torch.tensor([3.0, -3.0]))


def _dropped(logits: torch.Tensor, box: torch.Tensor, tau: float | None, rows: torch.Tensor) -> torch.Tensor:
    """AnoGen's rule written out: inside the box of a box-labelled row, p_normal >= τ (τ = 1, None: nothing)."""
    if tau is None or tau >= 1.0:
        return torch.zeros_like(box, dtype=torch.bool)
    return box.bool() & (torch.softmax(logits, 1)[:, 0] >= tau) & rows.view(-1, 1, 1)


def _box_anomaly(model, storage: Storage, synthetic: pd.DataFrame) -> float:
    """The trained model's mean anomaly probability inside the boxes of the box-labelled images (eval mode)."""
    from anomalib.data.utils import read_image, read_mask

    images = torch.stack([read_image(str(storage.path(p)), as_tensor=True) for p in synthetic["image_path"]])
    boxes = torch.stack([read_mask(str(storage.path(p)), as_tensor=True) for p in synthetic["mask_path"]]).bool()
    model.model.eval()
    with torch.no_grad():
        return float(model.model(images).anomaly_map[boxes].mean())


@pytest.fixture(scope="module")
def weak_segmenters(tmp_path_factory, demo_split):
    """The stage's segmenter rows of a box partition (τ, τ = 1, Perlin mix), every training loss recorded."""
    from ops.detection import anomalib_models as am

    storage = Storage(tmp_path_factory.mktemp("weak-segmenters"))
    synthetic = _box_partition(storage, demo_split)
    trained, calls = [], []
    real_build, real_loss, real_step = am.build_model, Segmenter.loss, Segmenter.training_step

    def build(name, *args, **kwargs):
        model = real_build(name, *args, **kwargs)
        _confident_normal(model)
        return model

    def training_step(self, batch, *args, **kwargs):
        if not any(self is m for m in trained):
            trained.append(self)
        self._spy_paths = list(batch.image_path)
        return real_step(self, batch, *args, **kwargs)

    def loss(self, logits, mask, rows=None):
        out = real_loss(self, logits, mask, rows)
        calls.append({"model": next(i for i, m in enumerate(trained) if m is self), "paths": self._spy_paths,
                      "logits": logits.detach().clone(), "box": mask.clone(), "loss": out.detach()})
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(am, "build_model", build)
        mp.setattr(Segmenter, "training_step", training_step)
        mp.setattr(Segmenter, "loss", loss)
        det = train_detectors(storage, "brick", "anogen", demo_split, synthetic, None, SEGMENTER_CFG)
    return {"storage": storage, "synthetic": synthetic, "det": det.set_index("detector"), "models": trained,
            "calls": calls}


def test_box_method_partition_trains_tau_ablation_and_perlin_mix_rows(weak_segmenters, demo_split):
    storage, det = weak_segmenters["storage"], weak_segmenters["det"]
    assert det.index.tolist() == ["segmenter", "segmenter-tau1", "segmenter-perlin"]
    n_anom = det["n_train_anomalous"] + det["n_val_anomalous"]
    assert n_anom["segmenter"] == 6 and n_anom["segmenter-perlin"] == 12
    samples = pd.read_parquet(storage.path(det.loc["segmenter-perlin", "samples_path"]))
    perlin = samples[samples["image_path"].str.contains("/mix-perlin/")]
    assert len(perlin) == 6 and perlin["mask_path"].str.contains("/mix-perlin/").all()
    ev = evaluate_detectors(storage, demo_split, det.reset_index(), SEGMENTER_CFG).set_index("detector")
    assert ev.loc["segmenter-perlin", "row_label"] == "synthetic: anogen + perlin"


def test_each_trained_segmenter_minimises_the_weak_loss_of_its_row(weak_segmenters):
    """Every training step's loss is the focal loss with exactly the rule's pixels dropped: τ on the anogen row,
    none on the τ = 1 row, and on the Perlin-mix row only inside the boxes of the method's rows."""
    taus = [TAU, 1.0, TAU]  # segmenter, segmenter-tau1, segmenter-perlin, in the stage's order
    assert len(weak_segmenters["models"]) == 3
    dropped, kept_confident = [0, 0, 0], [0, 0, 0]
    for call in weak_segmenters["calls"]:
        k, logits, box = call["model"], call["logits"], call["box"]
        rows = torch.tensor(["/mix-perlin/" not in p for p in call["paths"]])  # the method's box rows
        drop = _dropped(logits, box, taus[k], rows)
        assert torch.allclose(call["loss"], (focal_loss_map(logits, box) * (~drop)).mean(), atol=1e-7, rtol=1e-5)
        dropped[k] += int(drop.sum())
        # confident-normal mask pixels the rule at TAU on every row would drop, but this row trains on
        kept_confident[k] += int((_dropped(logits, box, TAU, torch.ones_like(rows)) & ~drop).sum())
    assert dropped[0] > 0 and dropped[2] > 0 and dropped[1] == 0
    assert kept_confident[1] > 0  # τ = 1 trains on confident box pixels ...
    assert kept_confident[2] > 0  # ... and the mix keeps the Perlin rows' exact masks whole
    assert kept_confident[0] == 0


def test_the_weak_segmenter_learns_less_anomaly_inside_the_boxes_than_box_supervision(weak_segmenters):
    """From a confident-normal start every box pixel is dropped at τ = 0.9, so that model is not pushed to call
    the box anomalous, while τ = 1 (plain box supervision) learns the boxes."""
    weak, plain, _ = weak_segmenters["models"]
    args = weak_segmenters["storage"], weak_segmenters["synthetic"]
    assert _box_anomaly(plain, *args) > _box_anomaly(weak, *args) + 0.2


DRAEM_CFG = {"detectors": ["draem"], "image_size": 64, "val_every": 6, "batch_size": 4, "steps": {"draem": 6},
             "options": {"draem": {"recon_width": 8, "disc_width": 8, "lr": 2e-2}}}


def test_draem_weak_loss_drops_confident_normal_box_pixels_of_the_box_rows_only(tmp_path, demo_split, monkeypatch):
    """DRAEM through the stage's training path with weak_tau: each step's loss is anomalib's DraemLoss on the whole
    box minus exactly the focal terms of the dropped pixels, only box-labelled rows lose pixels, and a DRAEM
    trained with τ on a confident-normal start is not pushed to call the boxes anomalous as the plain one is."""
    from anomalib.models.image.draem.loss import DraemLoss

    from ops.detection import anomalib_models as am
    from ops.detection.datamodule import build_samples
    from ops.detection.stage import DetectionConfig, _fit

    storage = Storage(tmp_path / "storage")
    synthetic = _box_partition(storage, demo_split)
    samples = build_samples(storage, demo_split, synthetic, mask_column="mask_path", seed=0)
    train_boxes = samples[(samples["label_index"] == 1) & (samples["split"] == "train")]["image_path"].tolist()
    assert len(train_boxes) >= 2
    weak = set(train_boxes[:-1])  # the last box row stands for an exact-mask (Perlin) row
    models, calls, pending = [], [], {}
    real_build, real_step, real_loss = am.build_model, am.SyntheticDraem.training_step, DraemLoss.forward

    def build(name, *args, **kwargs):
        model = real_build(name, *args, **kwargs)
        _confident_normal(model)
        models.append(model)
        return model

    def training_step(self, batch, *args, **kwargs):
        pending.update(paths=list(batch.image_path), box=batch.gt_mask.clone())
        return real_step(self, batch, *args, **kwargs)

    def loss(self, image, reconstruction, mask, prediction):
        out = real_loss(self, image, reconstruction, mask, prediction)
        with torch.no_grad():
            plain = real_loss(self, image, reconstruction, pending["box"].unsqueeze(1), prediction)
        calls[-1].append({**pending, "logits": prediction.detach().clone(), "loss": out.detach(),
                          "plain": plain.detach()})
        return out

    monkeypatch.setattr(am, "build_model", build)
    monkeypatch.setattr(am.SyntheticDraem, "training_step", training_step)
    monkeypatch.setattr(DraemLoss, "forward", loss)
    cfg = DetectionConfig.from_dict(DRAEM_CFG)
    runs = {"rows": (TAU, weak), "plain": (None, None), "all": (TAU, None)}
    trained = {}
    for name, (tau, paths) in runs.items():
        calls.append([])
        _fit("draem", "brick", samples, cfg, tau, None, tmp_path / name, name, lambda *a: None, weak_paths=paths)
        trained[name] = models[-2]  # the trained module; the last one built is the export copy

    def check(run_calls, tau, paths) -> tuple[int, int]:
        dropped = kept_confident = 0
        for c in run_calls:
            rows = torch.tensor([paths is None or p in paths for p in c["paths"]])
            drop = _dropped(c["logits"], c["box"], tau, rows)
            # kornia's 'mean' focal loss: the sum over the (B, 2, H, W) map; a box pixel's term has weight alpha = 1
            removed = focal_loss_map(c["logits"], c["box"])[drop].sum() / (2 * c["box"].numel())
            assert torch.allclose(c["loss"], c["plain"] - removed, atol=1e-6, rtol=1e-5)
            dropped += int(drop.sum())
            kept_confident += int((_dropped(c["logits"], c["box"], TAU, torch.ones_like(rows)) & ~drop).sum())
        return dropped, kept_confident

    dropped, kept = check(calls[0], TAU, weak)
    assert dropped > 0 and kept > 0  # the exact-mask row's confident box pixels stay in its loss
    dropped, kept = check(calls[1], None, None)
    assert dropped == 0 and kept > 0  # without τ DRAEM trains on every box pixel, confident or not
    assert check(calls[2], TAU, None)[0] > 0
    assert _box_anomaly(trained["plain"], storage, synthetic) > _box_anomaly(trained["all"], storage, synthetic) + 0.2


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
