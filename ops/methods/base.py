"""The generation-method interface (DESIGN §2).

A method is one module in ``ops/methods`` with a class implementing :class:`Method` plus one line in
``ops.methods.registry``. Nothing else in the code base changes when a method is added.

- ``fit`` trains whatever the method learns from the support set of ONE category (all its defect types)
  and writes it under ``out_dir``; it must be idempotent and resume an interrupted run from its checkpoints.
  Training-free methods return an :class:`Adapter` with ``path=None`` (or cache what they precompute).
- ``synthesize`` turns jobs (normal image + target mask + optional reference anomaly, seeded) into
  :class:`Synthetic` results, in any order it likes (methods may batch jobs that share a reference), but
  exactly one result per job and deterministically for each job's seed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

from ops.manifest import dumps
from ops.types import Adapter, Sample, Synthetic, SynthesisJob

Progress = Callable[[str, int, int], None]  # (stage description, done, total)


def no_progress(_desc: str, _done: int, _total: int) -> None:
    return None


@dataclass
class MethodConfig:
    """Base class of per-method configs; subclasses add fields with paper-like defaults.

    A config with a ``preset`` field names its option sets in ``presets`` (name -> options); explicit options
    override the preset's. Without an explicit ``preset`` the backbone's own tuning is used when the method has one
    (a preset named like the backbone, e.g. ``forge-base``), else ``demo``: a preset sized for one model would be
    wrong on another, so the choice follows the model actually loaded and is recorded in the adapter's metadata.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, backbone: str | None = None) -> "MethodConfig":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known options: {sorted(known)}")
        if "preset" in known:
            preset = values.get("preset") or (backbone if backbone in cls.presets else "demo")
            if preset not in cls.presets:
                raise ValueError(f"{cls.__name__}: unknown preset {preset!r}; use one of {sorted(cls.presets)}")
            values = {**cls.presets[preset], **values, "preset": preset}
        return cls(**values)


def render_prompt(cfg: Any, category: str, defect_type: str) -> str:
    """The method's prompt template (its ``prompt`` option) for one category and defect type."""
    return cfg.prompt.format(category=category, defect_type=defect_type.replace("_", " "))


def backbone_identity(backbone: Any, format_version: int) -> dict[str, Any]:
    """The backbone facts a trained adapter depends on (with the adapter's file format version)."""
    return {"model": backbone.model_id, "resolution": backbone.resolution, "format": format_version,
            "T": int(backbone.scheduler.config.num_train_timesteps)}


def training_digest(headers: Sequence[dict[str, Any]], samples: Sequence[Sample], *, masks: bool,
                    key: Callable[[Sample], str] = lambda s: s.image_id) -> str:
    """What makes two trainings the same, as 16 hex digits: each header (options, ``backbone_identity``) as stable
    JSON, then every support sample in image-id order: its ``key``, its exact pixels and, with ``masks``, its mask.
    A method's finished adapter is reused only when its recorded digest equals this one."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for header in headers:
        h.update(dumps(header).encode())
    for sample in sorted(samples, key=lambda s: s.image_id):
        h.update(key(sample).encode())
        h.update(np.ascontiguousarray(sample.image).tobytes())
        if masks:
            h.update(np.packbits(np.asarray(sample.mask, dtype=bool)).tobytes())
    return h.hexdigest()[:16]


def read_adapter_record(path: Path, method: str, missing_ok: bool = False) -> dict[str, Any] | None:
    """The JSON record a method writes last into a finished adapter (its presence marks the adapter finished):
    ``None`` when it is missing and ``missing_ok``, else an error naming the file and the step to rerun."""
    import json

    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path}: no finished {method} adapter here; materialize anomaly_adapters for this "
                                f"category with method {method!r} first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it and rerun anomaly_adapters for method "
                         f"{method!r}") from e


def fit_each_type(label: str, by_type: dict[str, list[Sample]], out_dir: Path, progress: Progress,
                  fit_one: Callable[[str, list[Sample], Path], Any]) -> dict[str, Any]:
    """defect type -> ``fit_one(type, its samples, out_dir/<type>)``, in sorted type order, reporting progress as
    ``label`` (types done / all); the type names a folder, so it must be a safe name."""
    from ops.storage import check_name

    types = {}
    for i, (dt, samples) in enumerate(sorted(by_type.items())):
        progress(label, i, len(by_type))
        types[dt] = fit_one(dt, samples, Path(out_dir) / check_name(dt, "defect type"))
    progress(label, len(by_type), len(by_type))
    return types


def loss_summary(losses: Sequence[float]) -> dict[str, float | None]:
    """The first loss and the mean of the last five, as adapter records show them (None without training)."""
    import numpy as np

    return {"loss_first": losses[0] if len(losses) else None,
            "loss_last5": float(np.mean(losses[-5:])) if len(losses) else None}


def support_by_type(owner: str, support: Sequence[Sample], need_mask: bool = False
                    ) -> tuple[str, dict[str, list[Sample]]]:
    """(category, defect type -> its support samples) for a method that trains per defect type; a normal image (or,
    with ``need_mask``, one without a mask) in the support is an error naming the file."""
    if not support:
        raise ValueError(f"{owner}.fit: empty support set; the split has no support anomalies for this category")
    by_type: dict[str, list[Sample]] = {}
    for s in support:
        if s.defect_type == "good" or (need_mask and s.mask is None):
            what = "a normal image (or one without a mask)" if need_mask else "a normal ('good') image"
            fix = "defect images with masks" if need_mask else "defect images only (check the split)"
            raise ValueError(f"{s.source or s.image_id}: {what} reached {owner}'s support set; the support must "
                             f"hold {fix}")
        by_type.setdefault(s.defect_type, []).append(s)
    return support[0].category, by_type


class Method:
    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    needs_backbone: ClassVar[bool] = False  # True: the stage passes the DiffusionBackbone's loaded models
    needs_reference: ClassVar[bool] = True  # True: each job carries a support anomaly of its defect type
    # False: runs on image-level-only categories (no real masks: box targets on the foreground, no support set;
    # ops.image_level); True, the safe default for third-party methods, skips them there with a reason
    needs_masks: ClassVar[bool] = True
    target_mode: ClassVar[str | None] = None  # "affine" | "box": the method's own target sampler (None: the pipeline's)

    def target_options(self, cfg: MethodConfig, category: str) -> dict[str, Any]:
        """Options for ``ops.masks.targets.sample_target_mask`` this method needs (e.g. AnoGen's box sizes)."""
        return {}

    def config(self, values: dict[str, Any] | None = None, backbone: str | None = None) -> MethodConfig:
        """The method's config from ``values``; ``backbone`` (the loaded model's id) picks its default preset."""
        return self.config_cls.from_dict(values, backbone)

    def fit(self, backbone: Any, support: Sequence[Sample], cfg: MethodConfig, out_dir: Path,
            progress: Progress = no_progress) -> Adapter:
        return Adapter(method=self.name, category=support[0].category if support else "", path=None,
                       meta={"trained": False})

    def synthesize(self, backbone: Any, adapter: Adapter, jobs: Sequence[SynthesisJob], cfg: MethodConfig,
                   progress: Progress = no_progress) -> Iterator[Synthetic]:
        raise NotImplementedError


def synthesize_each(name: str, jobs: Sequence[SynthesisJob],
                    make: Callable[[SynthesisJob], tuple[Any, Any, dict[str, Any]]],
                    progress: Progress = no_progress) -> Iterator[Synthetic]:
    """One job at a time for methods without batching: ``make(job) -> (image, mask, params)``, timed per job."""
    import time

    for done, job in enumerate(jobs, 1):
        start = time.perf_counter()
        image, mask, params = make(job)
        yield Synthetic(job=job, image=image, mask=mask, params=params, seconds=time.perf_counter() - start)
        progress(name, done, len(jobs))


def check_results(jobs: Sequence[SynthesisJob], results: Iterable[Synthetic]) -> Iterator[Synthetic]:
    """Pass results through, checking the contract (one per job, right shapes) as they stream."""
    expected = {j.index for j in jobs}
    seen: set[int] = set()
    for r in results:
        idx = r.job.index
        if idx not in expected or idx in seen:
            raise RuntimeError(f"method returned an unexpected or duplicate result for job {idx}")
        shape = r.job.normal.image.shape
        if r.image.shape != shape or r.image.dtype.name != "uint8":
            raise RuntimeError(f"job {idx}: image {r.image.dtype} {r.image.shape}, expected uint8 {shape}")
        if r.mask.shape != shape[:2] or r.mask.dtype != bool:
            raise RuntimeError(f"job {idx}: mask {r.mask.dtype} {r.mask.shape}, expected bool {shape[:2]}")
        seen.add(idx)
        yield r
    if seen != expected:
        raise RuntimeError(f"method returned no result for jobs {sorted(expected - seen)[:10]}")
