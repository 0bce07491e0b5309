"""Materialization and check metadata a person reads without clicking.

Choices:
- Numbers are numbers: ``number`` rounds floats to 4 significant digits and turns numpy scalars into ``int`` /
  ``float`` / ``bool``, so the Dagster UI shows them inline (a Markdown value hides behind a dialog button).
- Tables go out as ``TableMetadataValue`` (typed columns, one record per row, floats rounded the same way),
  which the UI renders as a table in place; rows past ``TABLE_ROWS`` are left out (the asset's ``rows`` count and
  the manifest ``path`` the IO manager records tell how many and where). A blank cell is ``None``, never NaN.
- Every asset check reports the same keys (``check_result``): ``passed`` (bool), ``problem_count`` (int) and
  ``problems`` (the first problems as text, or "none"), plus its own numbers.
- Images are written to the storage root and shown inline as Markdown (``image_metadata``).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import dagster as dg
import numpy as np
import pandas as pd

TABLE_ROWS = 50
SHOWN_PROBLEMS = 10


def number(value: Any, digits: int = 4) -> int | float | bool | None:
    """A plain Python number for metadata: floats rounded to ``digits`` significant digits, NaN -> None."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _column_type(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_numeric_dtype(series):
        return "float"
    return "string"


def _cell(value: Any, kind: str) -> Any:
    if kind == "string":
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    if kind == "float":
        return number(value)
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value) if kind == "bool" else int(value)


def table_metadata(df: pd.DataFrame, max_rows: int = TABLE_ROWS) -> dg.TableMetadataValue:
    """``df`` as a typed Dagster table of its first ``max_rows`` rows (the manifest's ``path`` has them all)."""
    kinds = {c: _column_type(df[c]) for c in df.columns}
    records = [dg.TableRecord({str(c): _cell(v, kinds[c]) for c, v in zip(df.columns, row)})
               for row in df.head(max_rows).itertuples(index=False)]
    return dg.MetadataValue.table(records, dg.TableSchema(columns=[dg.TableColumn(str(c), kinds[c]) for c in df.columns]))


def check_result(problems: Iterable[str], **numbers: Any) -> dg.AssetCheckResult:
    """An asset check result with the keys every check reports: ``passed`` (bool), ``problem_count`` (int),
    ``problems`` (plain text, "none" when there are none), then the check's own numbers, as numbers."""
    problems = list(problems)
    shown = "\n".join(problems[:SHOWN_PROBLEMS])
    if len(problems) > SHOWN_PROBLEMS:
        shown += f"\n... and {len(problems) - SHOWN_PROBLEMS} more"
    return dg.AssetCheckResult(passed=not problems, metadata={
        "passed": not problems, "problem_count": len(problems), "problems": dg.MetadataValue.text(shown or "none"),
        **{k: v if isinstance(v, (dg.MetadataValue, str)) else number(v) for k, v in numbers.items()}})


def image_metadata(store: Any, rel: str, png: bytes, title: str) -> dg.MetadataValue:
    """Write ``png`` to ``<storage root>/<rel>`` and return Markdown that shows it inline plus its path."""
    from ops.viz import png_markdown

    store.write_bytes(rel, png)
    return dg.MetadataValue.md(f"{png_markdown(png, title)}\n\n`{store.path(rel)}`")
