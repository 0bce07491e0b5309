"""Pipeline settings shared by every asset: where the datasets are, how many images, which protocol, which seed.

Choices:
- One resource instead of per-asset run config, so that the sensor, the schedule, the demo and a launch from the
  UI all materialize with the same settings (they can still be overridden per run in the launchpad).
- ``method_options`` maps a method name to its options dict (``MethodConfig.from_dict`` rejects unknown keys, so
  a typo fails the run instead of silently using a default); ``quality_options`` and ``detection_options`` are
  the same for the quality and detection stages.
- Defaults from the environment (``from_env``) so that ``dagster dev`` picks up a demo folder without editing
  code: ``ANOMALY_FORGE_HOME`` (default ``demo_out``, resolved against the working directory),
  ``ANOMALY_FORGE_DATASETS`` (``os.pathsep``-separated, URLs such as ``s3://bucket/data`` kept whole; default
  ``$ANOMALY_FORGE_HOME/data``),
  ``ANOMALY_FORGE_N`` (default 64), ``ANOMALY_FORGE_SEED`` (default 0) and ``ANOMALY_FORGE_METHODS``
  (comma-separated; default: every registered method).
- ``methods`` limits what the new-category sensor and the regeneration schedule materialize (the ``method``
  partitions stay every registered method, so a launch from the UI can still pick any of them); ``regen_seed``
  chooses what a regeneration round does (``pipelines.schedules``).
- Unknown names are errors at every layer, each listing the known ones: top-level fields (pydantic would drop
  them silently, so ``__init__`` checks), method names in ``method_options``, and (``check_options``, which
  imports the stage configs) every key inside the per-method, quality and detection option dicts.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import dagster as dg

SPLIT_PROTOCOLS = ("anomalydiffusion", "k_shot")
TARGET_MODES = ("affine", "box")
REGEN_SEEDS = ("fixed", "per_round")  # see pipelines/schedules.py


def forge_home() -> Path:
    return Path(os.environ.get("ANOMALY_FORGE_HOME", "demo_out")).expanduser().resolve()


def split_roots(text: str) -> list[str]:
    """``ANOMALY_FORGE_DATASETS`` split on ``os.pathsep`` (":"), keeping URLs whole (``s3:`` + ``//bucket/x``)."""
    out: list[str] = []
    for part in text.split(os.pathsep):
        if out and part.startswith("//") and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", out[-1]):
            out[-1] += ":" + part
        else:
            out.append(part)
    return [p for p in out if p]


def _int_env(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} must be an integer") from None


class ForgeSettings(dg.ConfigurableResource):
    """Counts, seeds, protocols and per-stage options of a pipeline deployment."""

    dataset_roots: list[str]
    n_per_partition: int = 64
    seed: int = 0
    split_protocol: str = "anomalydiffusion"
    k_shot: Optional[int] = None
    target_mode: str = "affine"
    max_reject_fraction: float = 0.1
    method_options: dict[str, Any] = {}
    quality_options: dict[str, Any] = {}
    detection_options: dict[str, Any] = {}
    methods: list[str] = []  # what the sensor and the schedule generate with; empty = every registered method
    regen_seed: str = "fixed"  # regeneration schedule: "fixed" (only stale partitions) or "per_round" (fresh seeds)

    def __init__(self, **values: Any):
        unknown = sorted(set(values) - set(type(self).model_fields))
        if unknown:
            raise ValueError(f"ForgeSettings: unknown setting(s) {unknown}; known settings: "
                             f"{sorted(type(self).model_fields)}")
        super().__init__(**values)

    @classmethod
    def from_env(cls, **overrides: Any) -> "ForgeSettings":
        roots = os.environ.get("ANOMALY_FORGE_DATASETS")
        values: dict[str, Any] = {
            "dataset_roots": split_roots(roots) if roots else [str(forge_home() / "data")],
            "n_per_partition": _int_env("ANOMALY_FORGE_N", 64),
            "seed": _int_env("ANOMALY_FORGE_SEED", 0),
            "methods": [m.strip() for m in os.environ.get("ANOMALY_FORGE_METHODS", "").split(",") if m.strip()],
        }
        values.update(overrides)
        return cls(**values)

    def check(self) -> "ForgeSettings":
        """Raise a ValueError naming the bad setting and the accepted values; returns self for chaining."""
        if not self.dataset_roots:
            raise ValueError("ForgeSettings.dataset_roots is empty: set ANOMALY_FORGE_DATASETS or pass the "
                             "dataset folders (MVTec AD / VisA / MVTec LOCO roots) in the settings resource")
        if self.split_protocol not in SPLIT_PROTOCOLS:
            raise ValueError(f"ForgeSettings.split_protocol={self.split_protocol!r}; use one of {SPLIT_PROTOCOLS}")
        if self.split_protocol == "k_shot" and (self.k_shot is None or self.k_shot < 1):
            raise ValueError("ForgeSettings.split_protocol='k_shot' needs k_shot >= 1")
        if self.target_mode not in TARGET_MODES:
            raise ValueError(f"ForgeSettings.target_mode={self.target_mode!r}; use one of {TARGET_MODES}")
        if self.n_per_partition < 1:
            raise ValueError(f"ForgeSettings.n_per_partition={self.n_per_partition}; it must be >= 1")
        if self.methods:
            from ops.methods.registry import available_methods

            unknown = sorted(set(self.methods) - set(available_methods()))
            if unknown:
                raise ValueError(f"ForgeSettings.methods has unknown methods {unknown}; use some of "
                                 f"{available_methods()} (anomaly-forge list-methods), or [] for all")
        if self.regen_seed not in REGEN_SEEDS:
            raise ValueError(f"ForgeSettings.regen_seed={self.regen_seed!r}; use one of {REGEN_SEEDS}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"ForgeSettings.max_reject_fraction={self.max_reject_fraction}; use a value in [0, 1]")
        from ops.methods.registry import available_methods

        unknown = sorted(set(self.method_options) - set(available_methods()))
        if unknown:
            raise ValueError(f"ForgeSettings.method_options: unknown method(s) {unknown}; known methods: "
                             f"{available_methods()}")
        return self

    def check_options(self) -> "ForgeSettings":
        """``check`` plus every option dict parsed by its stage config (unknown keys, bad values): the CLI calls
        this before any work. Imports the stage modules (torch), so resource setup does not."""
        from ops.detection.stage import DetectionConfig
        from ops.masks.refine import RefineConfig
        from ops.methods.registry import get_method
        from ops.metrics.quality import QualityConfig

        self.check()
        for method in self.method_options:
            get_method(method).config(self.method_config(method))
        quality = dict(self.quality_options or {})
        refine = quality.pop("refine", {}) or {}
        if not isinstance(refine, dict):
            raise ValueError(f"ForgeSettings.quality_options['refine'] must be a dict of RefineConfig options, got "
                             f"{refine!r}")
        RefineConfig.from_dict(refine)
        QualityConfig.from_dict(quality)
        DetectionConfig.from_dict({"seed": self.seed, **(self.detection_options or {})})
        return self

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.check()

    def active_methods(self) -> list[str]:
        """The methods the sensor and the schedule materialize: ``methods``, or every registered one."""
        from ops.methods.registry import available_methods

        return list(self.methods) if self.methods else list(available_methods())

    def method_config(self, method: str) -> dict[str, Any]:
        opts = self.method_options.get(method, {})
        if not isinstance(opts, dict):
            raise ValueError(f"ForgeSettings.method_options[{method!r}] must be a dict of options, got {opts!r}")
        return dict(opts)
