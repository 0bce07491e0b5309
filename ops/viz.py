"""Preview grids of synthetic defects and Markdown tables for asset metadata and reports.

Choices: each image is fitted into a ``cell`` x ``cell`` square keeping its aspect ratio (bilinear, centred
on black); its mask is resized with nearest neighbour and its outline (mask pixels with a non-mask
4-neighbour, thickened by one pixel outwards) is drawn in magenta, a colour rare in industrial images. The
grid is min(n, ncols) cells wide and ceil(n / ncols) high with no gaps, so its size is predictable.
``pair_grid`` shows each defect as two cells side by side, the untouched image and the same image dimmed to
``DIM`` outside the mask with a 1-pixel outline, so a thin scratch is never hidden under its own outline; pairs
are separated by a ``PAIR_GAP``-pixel grey gutter.
``markdown_table`` is hand-written (``DataFrame.to_markdown`` needs ``tabulate``, which the project does
not pin): floats with 4 significant digits, numbers right-aligned, ``|`` escaped, newlines flattened.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

OUTLINE = (255, 0, 255)
DIM = 0.3
PAIR_GAP = 4
GUTTER = 64


def preview_grid(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None, ncols: int = 8,
                 cell: int = 128) -> bytes:
    """PNG bytes of a grid of ``images`` (uint8 HxWx3 or HxW) with the outlines of ``masks`` (bool HxW or None)."""
    if len(images) == 0:
        raise ValueError("preview_grid needs at least one image")
    if masks is not None and len(masks) != len(images):
        raise ValueError(f"preview_grid got {len(images)} images but {len(masks)} masks")
    if ncols < 1 or cell < 4:
        raise ValueError(f"ncols must be >= 1 and cell >= 4, got {ncols}, {cell}")
    cols = min(ncols, len(images))
    rows = math.ceil(len(images) / ncols)
    canvas = np.zeros((rows * cell, cols * cell, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        tile = _tile(image, None if masks is None else masks[i], cell)
        r, c = divmod(i, ncols)
        canvas[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = tile
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def pair_grid(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], ncols: int = 4, cell: int = 96) -> bytes:
    """PNG bytes: ``ncols`` pairs per row, each the untouched image beside its mask highlight (see module doc)."""
    if len(images) == 0:
        raise ValueError("pair_grid needs at least one image")
    if len(masks) != len(images):
        raise ValueError(f"pair_grid got {len(images)} images but {len(masks)} masks")
    if ncols < 1 or cell < 4:
        raise ValueError(f"ncols must be >= 1 and cell >= 4, got {ncols}, {cell}")
    cols, rows = min(ncols, len(images)), math.ceil(len(images) / ncols)
    pair_w = 2 * cell + PAIR_GAP
    canvas = np.full((rows * (cell + PAIR_GAP) - PAIR_GAP, cols * pair_w - PAIR_GAP, 3), GUTTER, dtype=np.uint8)
    for i, (image, mask) in enumerate(zip(images, masks)):
        r, c = divmod(i, ncols)
        y, x = r * (cell + PAIR_GAP), c * pair_w
        canvas[y:y + cell, x:x + cell] = _tile(image, None, cell)
        canvas[y:y + cell, x + cell:x + 2 * cell] = _tile(image, mask, cell, highlight=True)
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def _tile(image: np.ndarray, mask: np.ndarray | None, cell: int, highlight: bool = False) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preview_grid expects uint8 HxWx3 or HxW images, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    s = cell / max(h, w)
    th, tw = max(1, round(h * s)), max(1, round(w * s))
    y0, x0 = (cell - th) // 2, (cell - tw) // 2
    tile = np.zeros((cell, cell, 3), dtype=np.uint8)
    tile[y0:y0 + th, x0:x0 + tw] = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.BILINEAR))
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (h, w):
            raise ValueError(f"mask {mask.shape} does not match its image {(h, w)}")
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((tw, th), Image.Resampling.NEAREST)) > 0
        full = np.zeros((cell, cell), dtype=bool)
        full[y0:y0 + th, x0:x0 + tw] = small
        if highlight:  # dim the surroundings, keep the defect at full brightness, a 1-pixel outer outline
            tile = np.where(full[..., None], tile, (tile * DIM).astype(np.uint8))
            tile[outline(full) & ~full] = OUTLINE
        else:
            tile[outline(full)] = OUTLINE
    return tile


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of ``mask`` plus their outer 4-neighbours (a 2-pixel line)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~inner
    grown = np.pad(edge, 1)
    near = grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
    return edge | (near & ~mask)


def markdown_table(df: pd.DataFrame, max_rows: int = 30) -> str:
    """GitHub-flavoured Markdown table of the first ``max_rows`` rows, with a note of how many were left out."""
    shown = df.head(max_rows)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    lines = ["| " + " | ".join(_cell(c) for c in df.columns) + " |",
             "| " + " | ".join("---:" if num else "---" for num in numeric) + " |"]
    for row in shown.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    if len(df) > max_rows:
        lines.append(f"\n_{len(df) - max_rows} more rows not shown._")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        text = "" if np.isnan(value) else f"{value:.4g}"
    elif value is None or value is pd.NA:
        text = ""
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def figure_png(fig, dpi: int = 90) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """Inline image for Markdown (Dagster metadata, reports): a base64 data URI, so no file server is needed."""
    import base64

    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
