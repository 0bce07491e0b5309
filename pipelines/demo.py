"""``anomaly-forge demo``: the whole lineage on the embedded demo data, recorded in a real Dagster instance.

Layout of the output folder ``DIR``: ``data/`` (demo dataset, MVTec AD layout), ``storage/`` (manifests, images,
adapters, detectors), ``dagster_home/`` (the instance: runs, event log, partitions), ``report.md``. With
``ANOMALY_FORGE_STORAGE`` set, that root is the storage; a remote one (s3://...) also receives the dataset under
``<root>/demo_data`` and ``DIR`` holds only the instance and the report.

Choices:
- Runs go through the same stage jobs the sensor and the schedule launch (``pipelines.jobs``), executed
  in-process one partition at a time against the persistent instance in ``DIR/dagster_home``, so
  ``DAGSTER_HOME=DIR/dagster_home ANOMALY_FORGE_HOME=DIR dagster dev -w workspace.yaml`` shows every run,
  materialization and check afterwards, and can re-run any of them with the same storage.
- Every stage of the definitions is run, whatever assets exist: later issues extend the lineage, not this file.
- A category x method step that cannot apply to its data (a method that needs masks on a category with image-level
  labels only, ``ops.image_level``) is recorded as ``n/a`` with the reason, after one line saying what runs there;
  it is not a failure.
- A failed step does not stop the demo: the partitions downstream of it are skipped (they could only fail on a
  missing input), the rest runs, and the exit status is non-zero.
- Dagster's console log is set to INFO: the engine's DEBUG events are hidden, the stages' progress lines show.
- ``DAGSTER_HOME`` is set for the duration of the demo only (``DagsterInstance.get()`` reads it) and restored.
"""
from __future__ import annotations

import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import dagster as dg
import pandas as pd

from ops.demo_data import DEMO_N
from pipelines.jobs import lineage_stages

DEMO_DATA = "demo_data"  # the demo dataset's folder under a remote storage root
NOT_APPLICABLE = "n/a"
BASELINE_NOTE = "Baselines (cutpaste, perlin) do not use the backbone."


def disclaimer(model: str) -> str:
    """What the diffusion numbers of a run on ``model`` can and cannot say (printed and in report.md)."""
    if model == "forge-base":
        return ("Diffusion numbers come from `forge-base`: AnomalyForge's own small latent diffusion model (about "
                "12 M parameters, Stable Diffusion's layout at 128 px) trained on a 2-core CPU from a few CC0 "
                "photographs and procedural textures and marks. It is NOT Stable Diffusion: the numbers show what "
                "each method does on a small model, not how the methods perform at SD scale. " + BASELINE_NOTE +
                " Use a real checkpoint (ANOMALY_FORGE_MODEL) for production figures.")
    if model == "tiny":
        return ("These numbers come from the `tiny` backbone: Stable-Diffusion-shaped components built offline "
                "with a fixed seed and never trained. They prove that every stage runs end to end; they say nothing "
                "about the quality of the diffusion methods (their output inside the mask is noise-like). "
                + BASELINE_NOTE)
    return f"Diffusion numbers come from the backbone `{model}`. " + BASELINE_NOTE


QUALITY_KEYS = ("fid", "fid_effl0", "kid_mean", "kid_effl0_mean", "ic_lpips_ad", "ic_effl0_ad", "bg_ssim",
                "mask_iou_mean")
DETECTION_KEYS = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class StepResult:
    job: str
    partition: str | None
    status: str  # ok | failed | skipped (upstream failed) | n/a (cannot run on this data: error says why)
    seconds: float = 0.0
    run_id: str = ""
    error: str = ""
    failed_checks: list[str] = field(default_factory=list)


@contextmanager
def dagster_home(path: Path) -> Iterator[Path]:
    """Point ``DAGSTER_HOME`` at ``path`` (created, with a dagster.yaml) while the block runs."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "dagster.yaml").exists():
        from pipelines.instance_config import instance_yaml

        (path / "dagster.yaml").write_text(instance_yaml())  # run queue and gpu pool sized for this machine
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old


def _first_error(result: Any) -> str:
    """The root cause of the first failed step (Dagster wraps user errors in its own)."""
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE" and event.event_specific_data.error is not None:
            error = event.event_specific_data.error
            while error.cause is not None:
                error = error.cause
            return f"{event.step_key}: {error.message.strip()}"
    return "run failed"


def _failed_checks(result: Any) -> list[str]:
    out = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION" and not event.event_specific_data.passed:
            data = event.event_specific_data
            out.append(f"{data.asset_key.to_user_string()}:{data.check_name}")
    return out


def run_lineage(defs: dg.Definitions, instance: dg.DagsterInstance, categories: Sequence[str],
                methods: Sequence[str], echo: Callable[[str], None] = print, tags: dict[str, str] | None = None,
                log_level: str = "INFO", start: float | None = None) -> list[StepResult]:
    """Run every stage job of ``defs`` for ``categories`` x ``methods``, one partition per run, in lineage order.

    ``start``: ``time.monotonic()`` value the printed elapsed times count from (default: now)."""
    stages = lineage_stages(list(defs.assets or []))
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    failed: set[str] = set()  # categories and "category|method" keys whose downstream must be skipped
    results: list[StepResult] = []
    start = time.monotonic() if start is None else start
    cannot: dict[str, dict[str, str]] = {}  # category -> method -> why it cannot run there (image-level labels)
    for stage in stages:
        job = defs.resolve_job_def(stage.job_name)
        for key in stage.partition_keys(categories, methods):
            blocked = key is not None and (key in failed or key.split("|")[0] in failed)
            category, _, method = (key or "").partition("|")
            if method and category not in cannot:
                cannot[category] = _mask_free_plan(defs, category, methods, echo)
            if not blocked and method in cannot.get(category, {}):
                step = StepResult(stage.job_name, key, NOT_APPLICABLE, error=cannot[category][method])
            elif blocked:
                step = StepResult(stage.job_name, key, "skipped", error="an upstream step failed")
            else:
                t0 = time.monotonic()
                try:
                    res = job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False,
                                                 run_config=run_config, tags=tags)
                    step = StepResult(stage.job_name, key, "ok" if res.success else "failed",
                                      time.monotonic() - t0, res.run_id, "" if res.success else _first_error(res),
                                      _failed_checks(res))
                except Exception:  # a run that cannot even start (bad config, bad key) is one failed step too
                    step = StepResult(stage.job_name, key, "failed", time.monotonic() - t0,
                                      error=traceback.format_exc().strip().splitlines()[-1])
            if step.status in ("failed", "skipped") and key is not None:
                failed.add(key)
            results.append(step)
            note = f"  {step.error}" if step.error else ""
            if step.failed_checks:
                note += f"  failed checks: {', '.join(step.failed_checks)}"
            echo(f"[{time.monotonic() - start:7.1f}s] {stage.job_name:<15} {key or '(all partitions)':<28} "
                 f"{step.status:<7} {step.seconds:6.1f}s{note}")
    return results


def _mask_free_plan(defs: dg.Definitions, category: str, methods: Sequence[str],
                    echo: Callable[[str], None]) -> dict[str, str]:
    """method -> why it cannot run on ``category`` (its split has image-level labels only), after one line
    saying what runs; {} for an ordinary category or one whose split is not there (its steps then fail)."""
    from ops.image_level import is_image_level, plan, summary_line

    split = _manifest(defs.resources["storage"].get(), "few_shot_splits", category)
    if split is None or not is_image_level(split):
        return {}
    echo(summary_line(category, sorted(set(split["defect_type"]) - {"good"}), methods))
    return plan(methods)[1]


def failures(steps: Sequence[StepResult]) -> list[StepResult]:
    """Steps that failed or could not run because of a failure (not those that cannot apply to the data)."""
    return [s for s in steps if s.status not in ("ok", NOT_APPLICABLE)]


def _manifest(storage: Any, asset: str, key: str | None) -> pd.DataFrame | None:
    from ops.manifest import read_manifest

    path = storage.manifest_path(asset, key)
    return read_manifest(path) if path.exists() else None


def summary_table(storage: Any, categories: Sequence[str], methods: Sequence[str]) -> pd.DataFrame:
    """category x method: synthetic image count, key quality metrics and, from the ``detector_summary`` asset, the
    detector scores where they exist."""
    detectors = _manifest(storage, "detector_summary", None)
    rows = []
    for c in categories:
        for m in methods:
            key = f"{c}|{m}"
            row: dict[str, Any] = {"category": c, "method": m}
            synth = _manifest(storage, "synthetic_anomalies", key)
            row["synthetic"] = len(synth) if synth is not None else None
            quality = _manifest(storage, "quality_metrics", key)
            if quality is not None and "defect_type" in quality:
                pooled = quality[quality["defect_type"] == "__all__"]
                for col in QUALITY_KEYS:
                    if col in pooled and len(pooled):
                        row[col] = pooled[col].iloc[0]
            if detectors is not None:
                # this method's detectors and the category's no-synthetic-data reference, as before
                mine = detectors[(detectors["category"] == c) & detectors["method"].isin([m, "none"])]
                for r in mine.itertuples(index=False):
                    for col in DETECTION_KEYS:
                        row[f"{r.detector} {col}"] = getattr(r, col)
            rows.append(row)
    df = pd.DataFrame(rows)
    return df.dropna(axis=1, how="all")


def detector_ranking(storage: Any) -> tuple[pd.DataFrame | None, str | None]:
    """The ranked per-method rows of the ``detector_summary`` asset and the report it wrote (None: not there)."""
    summary = _manifest(storage, "detector_summary", None)
    if summary is None:
        return None, None
    from ops.detection.report import REPORT_MD
    from ops.detection.summary import ranking

    report = storage.path(REPORT_MD)
    return ranking(summary), str(report) if report.exists() else None


def report_markdown(out: Path, steps: Sequence[StepResult], summary: pd.DataFrame, settings: dict[str, Any],
                    detection_report: str | None, ranking: pd.DataFrame | None = None) -> str:
    from ops.viz import markdown_table

    step_df = pd.DataFrame([{"job": s.job, "partition": s.partition or "(all)", "status": s.status,
                             "seconds": round(s.seconds, 1), "note": s.error or ", ".join(s.failed_checks)}
                            for s in steps])
    failed = len(failures(steps))
    na = sum(s.status == NOT_APPLICABLE for s in steps)
    lines = [
        "# AnomalyForge demo report", "",
        f"**{len(steps) - failed - na} of {len(steps)} steps succeeded"
        + (f", {na} not applicable to their data (see Steps)" if na else "") + ".** Settings: "
        + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
        f"> {disclaimer(str(settings.get('backbone', '')))}", "",
        "## Summary (category x method)", "", markdown_table(summary, max_rows=500), "",
    ]
    if ranking is not None:
        lines += ["## Detectors ranked by mean image AUROC over categories (asset detector_summary)", "",
                  markdown_table(ranking, max_rows=500), ""]
    lines += ["## Steps", "", markdown_table(step_df, max_rows=1000), ""]
    if detection_report:
        lines += [f"Detector report: `{detection_report}`", ""]
    lines += ["## Look at it in the Dagster UI", "", "```bash",
              f"DAGSTER_HOME={out / 'dagster_home'} ANOMALY_FORGE_HOME={out} dagster dev -w workspace.yaml  "
              "# from the repository root",
              "```", ""]
    return "\n".join(lines)


def _remote_demo_data(storage_root: str, categories: Sequence[str] | None, seed: int, size: int) -> str:
    """The demo dataset under ``<storage root>/demo_data`` on a remote root, so that a step on any machine reads
    it from there (built in a temp folder, uploaded file by file, the temp folder removed)."""
    import shutil
    import tempfile

    from ops.demo_data import build_demo_dataset
    from ops.storage import Storage

    storage = Storage(storage_root)
    tmp = Path(tempfile.mkdtemp(prefix="demo-data-"))
    try:
        built = build_demo_dataset(tmp / "data", categories=categories, seed=seed, size=size)
        for f in sorted(p for p in built.rglob("*") if p.is_file()):
            storage.write_bytes(f"{DEMO_DATA}/{f.relative_to(built).as_posix()}", f.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(storage.path(DEMO_DATA))


def run_demo(out: str | Path = "demo_out", methods: Sequence[str] | None = None,
             categories: Sequence[str] | None = None, n: int = DEMO_N, size: int = 128, seed: int = 0,
             settings: dict[str, Any] | None = None, echo: Callable[[str], None] = print) -> int:
    """Build the demo data, materialize every stage for every category x method, write ``report.md``.

    ``settings``: further ``ForgeSettings`` fields (e.g. ``detection_options``); the data root, ``n`` and
    ``seed`` arguments take precedence. Returns the process exit status: 0 when every step succeeded."""
    from ops.atomic import write_bytes_atomic
    from ops.cache import is_remote
    from ops.demo_data import DEMO_CATEGORIES, build_demo_dataset
    from ops.methods.registry import available_methods
    from ops.storage import Storage
    from ops.viz import markdown_table
    from pipelines.definitions import build_definitions

    methods = list(methods or available_methods())
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {available_methods()} (anomaly-forge list-methods)")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    out = Path(out).expanduser().resolve()
    t0 = time.monotonic()
    categories = list(categories or DEMO_CATEGORIES)
    storage_root = os.environ.get("ANOMALY_FORGE_STORAGE") or str(out / "storage")
    if is_remote(storage_root):
        data = _remote_demo_data(storage_root, categories, seed, size)
    else:
        data = build_demo_dataset(out / "data", categories=categories, seed=seed, size=size)
    echo(f"[{time.monotonic() - t0:7.1f}s] demo dataset       {data} ({', '.join(categories)})")
    user = dict(settings or {})
    # IC-LPIPS compares the demo's images at their own size: resizing 128 px images to the 256 px default costs
    # four times the feature work and adds no detail (a user's quality_options still win)
    quality = {"ic_size": size, **(user.get("quality_options") or {})}
    overrides = {**user, "quality_options": quality, "dataset_roots": [str(data)], "n_per_partition": n,
                 "seed": seed}
    defs = build_definitions(storage_root=str(storage_root), **overrides)
    with dagster_home(out / "dagster_home"), dg.DagsterInstance.get() as instance:
        new = [c for c in categories if not instance.has_dynamic_partition("category", c)]
        if new:
            instance.add_dynamic_partitions("category", new)
        steps = run_lineage(defs, instance, categories, methods, echo, tags={"anomaly_forge/trigger": "demo"},
                            start=t0)
    storage = Storage(storage_root)
    summary = summary_table(storage, categories, methods)
    ranking, detection_report = detector_ranking(storage)
    shown = {"categories": ",".join(categories), "methods": ",".join(methods), "n": n, "size": size,
             "seed": seed, "backbone": defs.resources["backbone"].model, **(settings or {})}
    write_bytes_atomic(out / "report.md", report_markdown(out, steps, summary, shown, detection_report,
                                                            ranking).encode())
    failed = failures(steps)
    echo("")
    echo(markdown_table(summary, max_rows=500))
    echo("")
    na = sum(s.status == NOT_APPLICABLE for s in steps)
    echo(f"{len(steps) - len(failed) - na}/{len(steps)} steps ok{f', {na} n/a' if na else ''} in {time.monotonic() - t0:.1f}s; "
         f"report: {out / 'report.md'}")
    echo(f"Note: {disclaimer(shown['backbone'])}")
    remote = f"ANOMALY_FORGE_STORAGE={storage_root} " if is_remote(storage_root) else ""
    echo(f"UI: DAGSTER_HOME={out / 'dagster_home'} ANOMALY_FORGE_HOME={out} {remote}dagster dev -w workspace.yaml")
    return 1 if failed else 0
