"""Deployable detectors: the best detector of a category x method partition exported the way anomalib users deploy
(``Engine.export`` to TORCH and ONNX, OpenVINO where the package is installed), and scoring new images with it.

``export_best(storage, category, method, detector_df, evaluation_df, formats) -> DataFrame[DEPLOY_SCHEMA]`` writes
``detectors/<category>/<method>/deploy/`` (``weights/torch/model.pt``, ``weights/onnx/model.onnx``,
``weights/openvino/model.xml``, and ``deploy.json``, the manifest a deployment reads) and returns its one row;
``predict(deploy_path, images, format) -> DataFrame`` scores image files with an exported model.

Choices:
- "Best" is chosen on the VALIDATION split, never on the test set (DESIGN §4): the highest ``val_score``
  (validation pixel AP, the selection metric of training) among the partition's detectors trained on synthetic
  data; when none has a finite one (e.g. only the one-class reference is configured), the first detector row.
  The test metrics of the chosen detector are copied into the row for reading, not for choosing.
- The exported graph is anomalib's whole module: its pre-processor (resize to ``input_size`` and, for detectors on
  a pretrained backbone, the backbone's normalisation), the network and the post-processor (scores normalised
  with the thresholds learnt on validation). Input: RGB float32 in [0, 1], NCHW, ``input_size`` (ONNX and
  OpenVINO are exported with that static size); ``predict`` resizes every image to it (bilinear, antialiased)
  before any format sees it, so all formats get the same tensor.
- A format whose package is missing is not silently dropped: its reason is in ``skipped_json`` and deploy.json.
- The export is written to a temporary folder and moved into place, deploy.json last.
"""
from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from ops.manifest import dumps, to_table

FORMATS = ("torch", "onnx", "openvino")
FILES = {"torch": "weights/torch/model.pt", "onnx": "weights/onnx/model.onnx", "openvino": "weights/openvino/model.xml"}
PACKAGES = {"torch": ("torch",), "onnx": ("onnx", "onnxscript"), "openvino": ("openvino",)}
INPUT = "RGB float32 in [0, 1], NCHW"
DEPLOY_JSON = "deploy.json"
DEPLOY_SCHEMA = pa.schema([
    ("category", pa.string()), ("method", pa.string()), ("detector", pa.string()), ("row_label", pa.string()),
    ("trained_on", pa.string()), ("selected_by", pa.string()), ("val_score", pa.float64()),
    ("image_auroc", pa.float64()), ("pixel_ap", pa.float64()), ("checkpoint_path", pa.string()),
    ("torch_path", pa.string()), ("onnx_path", pa.string()), ("openvino_path", pa.string()),
    ("input_height", pa.int64()), ("input_width", pa.int64()), ("input_format", pa.string()),
    ("normalization_json", pa.string()), ("skipped_json", pa.string()), ("deploy_path", pa.string()),
    ("backbone_source", pa.string()),
])


def choose_best(detector_df: pd.DataFrame) -> tuple[pd.Series, str]:
    """(the detector row to deploy, how it was chosen) -- on validation only, see the module docstring."""
    if detector_df.empty:
        raise ValueError("no detectors to deploy: materialize anomaly_detectors for this partition first")
    synthetic = detector_df[(detector_df["trained_on"] != "normal_only")
                            & detector_df["val_score"].map(lambda v: v is not None and math.isfinite(v))]
    if len(synthetic):
        return synthetic.sort_values("val_score", ascending=False, kind="stable").iloc[0], "highest val_score"
    return detector_df.iloc[0], "only detector without a validation score (first row)"


def preprocessing(module: Any) -> tuple[tuple[int, int], dict[str, list[float]]]:
    """(input size (H, W), normalisation {"mean", "std"} or {}) of an anomalib module's pre-processor."""
    from torchvision.transforms.v2 import Normalize, Resize

    transform = module.pre_processor.transform if module.pre_processor is not None else None
    steps = list(getattr(transform, "transforms", [transform])) if transform is not None else []
    size = next((tuple(int(v) for v in t.size) for t in steps if isinstance(t, Resize)), None)
    if size is None or len(size) != 2:
        raise ValueError(f"{type(module).__name__}: its pre-processor has no (H, W) Resize; cannot record an input size")
    norm = next(({"mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std]}
                 for t in steps if isinstance(t, Normalize)), {})
    return size, norm


def missing_package(fmt: str) -> str:
    """'' when the packages of an export format import here, else the reason it is skipped."""
    missing = [p for p in PACKAGES[fmt] if importlib.util.find_spec(p) is None]
    return f"not exported: package(s) {', '.join(missing)} not installed" if missing else ""


def export_best(storage: Any, category: str, method: str, detector_df: pd.DataFrame,
                evaluation_df: pd.DataFrame | None = None, formats: Sequence[str] = FORMATS) -> pd.DataFrame:
    """Export the partition's best detector; one DEPLOY_SCHEMA row (see the module docstring)."""
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    from ops.detection.stage import _quiet, loaded_detector, row_label

    bad = [f for f in formats if f not in FORMATS]
    if bad or "torch" not in formats:
        raise ValueError(f"deploy formats {list(formats)}: choose from {FORMATS}, always including 'torch'")
    det, selected_by = choose_best(detector_df)
    rel = f"detectors/{category}/{method}/deploy"
    skipped = {f: missing_package(f) for f in formats if missing_package(f)}
    with loaded_detector(storage, det) as module, tempfile.TemporaryDirectory(prefix="deploy-") as tmp:
        module = module.cpu().eval()
        size, norm = preprocessing(module)
        with _quiet():
            engine = Engine(default_root_dir=Path(tmp) / "engine", logger=False, accelerator="cpu", devices=1)
            written = {}
            for fmt in formats:
                if fmt in skipped:
                    continue
                engine.export(module, ExportType(fmt), export_root=tmp, model_file_name="model",
                              input_size=None if fmt == "torch" else size)
                written[fmt] = f"{rel}/{FILES[fmt]}"
        # every file of each format folder: ONNX keeps large weights in model.onnx.data, OpenVINO in model.bin
        for fmt in written:
            folder = Path(tmp) / Path(FILES[fmt]).parent
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                storage.write_bytes(f"{rel}/{f.relative_to(tmp).as_posix()}", f.read_bytes())
    metrics = {"image_auroc": math.nan, "pixel_ap": math.nan}
    if evaluation_df is not None and len(evaluation_df):
        same = evaluation_df[(evaluation_df["detector"] == det["detector"])
                             & (evaluation_df["checkpoint_path"] == det["checkpoint_path"])]
        if len(same):
            metrics = {k: float(same.iloc[0][k]) for k in metrics}
    row = {"category": category, "method": method, "detector": det["detector"], "row_label": row_label(det["method"]),
           "trained_on": det["trained_on"], "selected_by": selected_by, "val_score": det["val_score"], **metrics,
           "checkpoint_path": det["checkpoint_path"], "torch_path": written.get("torch", ""),
           "onnx_path": written.get("onnx", ""), "openvino_path": written.get("openvino", ""),
           "input_height": size[0], "input_width": size[1], "input_format": INPUT,
           "normalization_json": dumps(norm), "skipped_json": dumps(skipped), "deploy_path": f"{rel}/{DEPLOY_JSON}",
           "backbone_source": det["backbone_source"]}
    deploy = {"detector": det["detector"], "category": category, "method": method, "row_label": row["row_label"],
              "checkpoint": det["checkpoint_path"], "selected_by": selected_by, "val_score": det["val_score"],
              "test_metrics": metrics, "input": {"size": list(size), "format": INPUT,
                                                 "normalization": norm or "none",
                                                 "note": "resize and normalisation run inside the exported model"},
              "outputs": "pred_score (normalised, 0.5 = threshold), pred_label, anomaly_map, pred_mask",
              "files": {k: v.removeprefix(f"{rel}/") for k, v in written.items()}, "skipped": skipped,
              "backbone_source": det["backbone_source"]}
    storage.write_bytes(row["deploy_path"], json.dumps(deploy, indent=2, sort_keys=True, default=str).encode())
    df = pd.DataFrame([row])
    to_table(df, DEPLOY_SCHEMA, "deployed_detector")
    return df[DEPLOY_SCHEMA.names]


def _deploy_dir(path: Any) -> tuple[Path, dict[str, Any]]:
    path = Path(path).expanduser()
    if path.is_file() and path.name != DEPLOY_JSON:
        for parent in path.parents:
            if (parent / DEPLOY_JSON).is_file():
                path = parent
                break
    folder = path.parent if path.is_file() else path
    meta_file = folder / DEPLOY_JSON
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} does not exist: pass a detector deploy folder "
                                f"(<storage root>/detectors/<category>/<method>/deploy) or its deploy.json")
    return folder, json.loads(meta_file.read_text())


def load_images(paths: Sequence[Any], size: Sequence[int]) -> torch.Tensor:
    """Image files as one (N, 3, H, W) float32 batch in [0, 1] at ``size`` (bilinear, antialiased)."""
    import torch.nn.functional as F
    from anomalib.data.utils import read_image

    if not paths:
        raise ValueError("no images to score")
    out = []
    for p in paths:
        try:
            image = read_image(str(p), as_tensor=True)
        except Exception as e:  # noqa: BLE001 - PIL / cv2 raise many types for unreadable files
            raise ValueError(f"{p}: not a readable image ({e}); pass PNG/JPEG/BMP files") from None
        out.append(F.interpolate(image[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(out).float()


def predict(deploy_path: Any, images: Sequence[Any], fmt: str = "torch") -> pd.DataFrame:
    """Score image files with an exported detector: path, pred_score, pred_label, anomaly_map_max per image."""
    folder, meta = _deploy_dir(deploy_path)
    if fmt not in meta["files"]:
        raise ValueError(f"{folder}: no {fmt!r} export (exported: {sorted(meta['files'])}; skipped: {meta['skipped']})")
    batch = load_images(images, meta["input"]["size"])
    model_file = folder / meta["files"][fmt]
    if fmt == "torch":
        module = torch.load(model_file, map_location="cpu", weights_only=False)["model"].eval()
        with torch.no_grad():
            out = module(batch)
        score, label, amap = (out.pred_score, out.pred_label, out.anomaly_map)
        score, amap = score.float().numpy().reshape(-1), amap.float().numpy().reshape(len(images), -1)
        label = label.numpy().reshape(-1) if label is not None else score >= 0.5
    elif fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {session.get_inputs()[0].name: batch.numpy()})))
        score = np.asarray(outputs["pred_score"], dtype=np.float32).reshape(-1)
        amap = np.asarray(outputs["anomaly_map"], dtype=np.float32).reshape(len(images), -1)
        label = np.asarray(outputs["pred_label"]).reshape(-1) if "pred_label" in outputs else score >= 0.5
    else:
        raise ValueError(f"predict supports the torch and onnx exports; load {model_file} with OpenVINO's runtime "
                         f"(anomalib.deploy.OpenVINOInferencer)")
    return pd.DataFrame({"path": [str(p) for p in images], "pred_score": score, "pred_label": label.astype(bool),
                         "anomaly_map_max": amap.max(axis=1), "format": fmt, "detector": meta["detector"]})
