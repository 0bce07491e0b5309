"""Deployable detectors: the partition's best detector (chosen on validation) exported with anomalib's Engine.export,
its input size and normalisation recorded, and the exported model scoring images exactly as the in-process one."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ops.detection.deploy import choose_best, export_best, load_images, predict
from ops.detection.stage import loaded_detector, train_detectors
from ops.generation import fit_adapter, synthesize_partition
from ops.storage import Storage
from pipelines import cli

CFG = {"detectors": ["segmenter", "patchcore"], "image_size": 64, "steps": {"segmenter": 4}, "val_every": 2,
       "batch_size": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_split, demo_root):
    storage = Storage(tmp_path_factory.mktemp("deploy"))
    adapters = fit_adapter(storage, "brick", "cutpaste", demo_split, None, {}, progress=lambda *a: None)
    synthetic = synthesize_partition(storage, "brick", "cutpaste", demo_split, adapters, None, n=6, seed=0, cfg={})
    det = train_detectors(storage, "brick", "cutpaste", demo_split, synthetic, None, CFG)
    # evaluation rows only as far as deployment reads them (the real evaluation is tested in test_detection_train)
    ev = det[["detector", "checkpoint_path"]].assign(image_auroc=[0.75, 0.5][:len(det)], pixel_ap=0.25)
    images = [str(demo_root / "brick" / p) for p in ("test/crack/000.png", "test/good/000.png", "test/hole/001.png",
                                                     "test/stain/002.png")]
    return storage, det, ev, images


def test_the_best_is_chosen_on_validation_only():
    rows = pd.DataFrame({"detector": ["segmenter", "draem", "patchcore"], "trained_on": ["synthetic"] * 2 + ["normal_only"],
                         "val_score": [0.2, 0.7, math.nan]})
    assert choose_best(rows)[0]["detector"] == "draem"
    assert choose_best(rows.iloc[2:])[0]["detector"] == "patchcore"  # nothing validated: the reference
    with pytest.raises(ValueError, match="materialize anomaly_detectors"):
        choose_best(rows.iloc[:0])


@pytest.mark.parametrize("which", ["segmenter", "patchcore"])
def test_exported_torch_scores_equal_in_process(trained, which):
    storage, det, ev, images = trained
    picked = det if which == "segmenter" else det[det["detector"] == "patchcore"]
    row = export_best(storage, "brick", "cutpaste", picked, ev, formats=["torch", "openvino"]).iloc[0]
    assert row["detector"] == which and (row["input_height"], row["input_width"]) == (64, 64)
    meta = json.loads(storage.path(row["deploy_path"]).read_text())
    assert meta["input"]["size"] == [64, 64] and meta["files"]["torch"] == "weights/torch/model.pt"
    norm = json.loads(row["normalization_json"])
    if which == "patchcore":  # the pretrained backbone's normalisation is part of the export and recorded
        assert len(norm["mean"]) == 3 and len(norm["std"]) == 3 and meta["input"]["normalization"] == norm
    else:
        assert norm == {} and meta["input"]["normalization"] == "none"
    try:
        import openvino  # noqa: F401
    except ImportError:
        assert "openvino" in json.loads(row["skipped_json"]) and row["openvino_path"] == ""
    assert row["image_auroc"] == {"segmenter": 0.75, "patchcore": 0.5}[which] and row["pixel_ap"] == 0.25
    got = predict(storage.path(row["deploy_path"]).parent, images, "torch")
    det_row = picked[picked["detector"] == which].iloc[0]
    with loaded_detector(storage, det_row) as module, torch.no_grad():
        reference = module.eval()(load_images(images, (64, 64)))
    assert np.allclose(got["pred_score"], reference.pred_score.numpy().reshape(-1), atol=1e-6)
    assert np.allclose(got["anomaly_map_max"], reference.anomaly_map.numpy().reshape(len(images), -1).max(1),
                       atol=1e-6)
    assert got["pred_score"].nunique() > 1  # real scores, not a constant


def test_predict_cli_prints_and_writes_scores(trained, tmp_path, capsys):
    storage, det, ev, images = trained
    row = export_best(storage, "brick", "cutpaste", det, ev, formats=["torch"]).iloc[0]
    out = tmp_path / "scores.csv"
    assert cli.main(["predict", "--detector", str(storage.path(row["deploy_path"])), "--out", str(out), *images]) == 0
    assert "pred_score" in capsys.readouterr().out
    assert len(pd.read_csv(out)) == len(images)
    with pytest.raises(SystemExit, match="deploy.json"):
        cli.main(["predict", "--detector", str(tmp_path), images[0]])
    with pytest.raises(SystemExit, match="not a readable image"):
        cli.main(["predict", "--detector", str(storage.path(row["deploy_path"])), str(out)])
    with pytest.raises(SystemExit, match="no 'onnx' export"):
        cli.main(["predict", "--detector", str(storage.path(row["deploy_path"])), "--format", "onnx", images[0]])


@pytest.mark.slow
def test_exported_onnx_scores_equal_torch(trained):
    """Only where onnx, onnxscript and onnxruntime are installed (not pinned: the dynamo export takes minutes on
    a small CPU); the torch export is always tested above."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    storage, det, ev, images = trained
    row = export_best(storage, "brick", "cutpaste", det, ev, formats=["torch", "onnx"]).iloc[0]
    folder = storage.path(row["deploy_path"]).parent
    a, b = predict(folder, images, "torch"), predict(folder, images, "onnx")
    assert np.allclose(a["pred_score"], b["pred_score"], atol=1e-4)
    assert (a["pred_label"] == b["pred_label"]).all()
