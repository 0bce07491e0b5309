"""What runs on a category whose defects carry image-level labels only (layout ``mvtec-image-level``: no masks).

Decided once here, read by the split, the generation and detection stages, the assets and the CLI:

- Split: every defect image is held out (role ``holdout``): nothing downstream can learn from a defect whose
  region is unknown, so the whole set scores the detectors.
- Methods: those that declare ``needs_masks = False`` run (built in: ``perlin``, whose anomaly is procedural and
  whose target region is a random box on the product's foreground instead of a transformed support mask); the
  others (support masks for targets, references or masked losses) are skipped, each with its reason. Mask-free
  synthetic images get the defect type ``anomaly``: they do not imitate one of the category's types.
- Detectors: all of them train (the synthetic masks are the method's own); the one-class PatchCore reference
  never needed masks.
- Metrics: image-level detector metrics only (pixel AUROC/AP/F1 and AUPRO need real masks: NaN, with a note on
  each row); generation quality without the support-based ones (IC-LPIPS centres, nearest-support distance).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd

from ops.ingest.image_level import NAME as LAYOUT

MASK_FREE_TYPE = "anomaly"
PIXEL_NOTE = ("image-level labels only: pixel_auroc, pixel_ap, pixel_f1max and aupro not computed (the held-out "
              "defects have no masks)")
SKIPPED_METRICS = {
    "pixel metrics (pixel_auroc, pixel_ap, pixel_f1max, aupro)": "the held-out defects have no masks",
    "IC-LPIPS / IC distance, nearest-support distance": "no support set: every defect image is held out",
}


def is_image_level(df: pd.DataFrame, category: str | None = None) -> bool:
    """True when the raw or split rows of ``category`` (or of the only category in ``df``) come from the
    image-level layout."""
    rows = df if category is None or "category" not in df.columns else df[df["category"] == category]
    return bool(len(rows)) and "layout" in rows.columns and bool((rows["layout"] == LAYOUT).all())


def skip_reason(method: str) -> str | None:
    """Why ``method`` cannot run without masks, or None when it can."""
    from ops.methods.registry import get_method

    if not get_method(method).needs_masks:
        return None
    return f"{method} needs real defect masks (support masks for its targets, references or losses)"


def plan(methods: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """(the methods that run, method -> why it is skipped) on an image-level category."""
    run, skipped = [], {}
    for m in methods:
        reason = skip_reason(m)
        if reason is None:
            run.append(m)
        else:
            skipped[m] = reason
    return run, skipped


def summary_line(category: str, defect_types: Sequence[str], methods: Iterable[str]) -> str:
    """The one line an operator reads: what runs on this category without masks and what is skipped."""
    run, skipped = plan(methods)
    types = ",".join(sorted(defect_types))
    ran = ", ".join(run) if run else "no generation method (none of those asked for is mask-free)"
    line = (f"{category}: image-level labels only (test/{{{types}}}/ without ground_truth/): runs {ran}, the "
            f"no-synthetic-data reference detector and image-level metrics")
    if skipped:
        line += f"; skips {', '.join(skipped)} (need defect masks)"
    return line + " and pixel metrics (no real masks)"


def skipped_table(methods: Iterable[str]) -> pd.DataFrame:
    """One row per skipped method or metric group with its reason (asset metadata, CLI report)."""
    _, skipped = plan(methods)
    rows = [{"skipped": f"method {m}", "reason": r} for m, r in skipped.items()]
    rows += [{"skipped": what, "reason": r} for what, r in SKIPPED_METRICS.items()]
    return pd.DataFrame(rows, columns=["skipped", "reason"])
