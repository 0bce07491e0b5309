import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ops.viz import OUTLINE, markdown_table, outline, preview_grid


def decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_preview_grid_size_and_outlines():
    images = [np.full((40, 60, 3), 90, np.uint8) for _ in range(5)]
    masks = [None] * 5
    m = np.zeros((40, 60), bool)
    m[10:30, 20:40] = True
    masks[1] = m
    grid = decode(preview_grid(images, masks, ncols=3, cell=64))
    assert grid.shape == (2 * 64, 3 * 64, 3)
    is_outline = (grid == OUTLINE).all(axis=2)
    assert not is_outline[:, :64].any()  # cell 0 has no mask
    cell1 = is_outline[:64, 64:128]
    assert cell1.any()
    # the outline surrounds the defect: its box matches the mask scaled by 64/60, centred vertically
    ys, xs = np.nonzero(cell1)
    scale, y_off = 64 / 60, (64 - round(40 * 64 / 60)) // 2
    assert abs(xs.min() - 20 * scale) <= 2 and abs(xs.max() - 40 * scale) <= 2
    assert abs(ys.min() - (10 * scale + y_off)) <= 2 and abs(ys.max() - (30 * scale + y_off)) <= 2
    # inside the outline the image is untouched
    assert (grid[64 // 2, 64 + 32] == 90).all()
    # the empty sixth cell stays black
    assert (grid[64:, 128:] == 0).all()


def test_preview_grid_single_row_and_gray_images():
    grid = decode(preview_grid([np.zeros((16, 16), np.uint8)] * 2, ncols=8, cell=32))
    assert grid.shape == (32, 64, 3)


def test_preview_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        preview_grid([])
    with pytest.raises(ValueError, match="masks"):
        preview_grid([np.zeros((8, 8, 3), np.uint8)], [None, None])
    with pytest.raises(ValueError, match="does not match"):
        preview_grid([np.zeros((8, 8, 3), np.uint8)], [np.zeros((4, 4), bool)], cell=16)


def test_outline_is_the_border_ring():
    m = np.zeros((9, 9), bool)
    m[2:7, 2:7] = True
    ring = outline(m)
    assert not ring[4, 4] and ring[2, 4] and ring[1, 4] and not ring[0, 4]


def test_markdown_table():
    df = pd.DataFrame({"method": ["cutpaste", "a|b"], "fid": [12.345678, float("nan")], "n": [3, 40]})
    text = markdown_table(df)
    lines = text.splitlines()
    assert lines[0] == "| method | fid | n |"
    assert lines[1] == "| --- | ---: | ---: |"
    assert lines[2] == "| cutpaste | 12.35 | 3 |"
    assert lines[3] == "| a\\|b |  | 40 |"
    long = markdown_table(pd.DataFrame({"x": range(50)}), max_rows=10)
    assert long.count("\n| ") == 11 and "40 more rows" in long


def test_pair_grid_keeps_the_defect_untouched_beside_its_highlight():
    from ops.viz import DIM, PAIR_GAP, pair_grid

    image = np.full((32, 32, 3), 200, np.uint8)
    image[16, 4:28] = (10, 10, 10)  # a 1-pixel dark scratch
    mask = np.zeros((32, 32), bool)
    mask[16, 4:28] = True
    grid = decode(pair_grid([image] * 3, [mask] * 3, ncols=2, cell=32))
    assert grid.shape == (2 * 32 + PAIR_GAP, 2 * (2 * 32 + PAIR_GAP) - PAIR_GAP, 3)
    left, right = grid[:32, :32], grid[:32, 32:64]
    assert (left == image).all()  # the untouched image: no outline over the scratch
    assert (right[16, 4:28] == (10, 10, 10)).all()  # the defect itself at full brightness
    assert (right[2, 2] == int(200 * DIM)).all()  # the surroundings dimmed
    assert (right[15, 10] == OUTLINE).all() and (right[17, 10] == OUTLINE).all()  # outline just outside
    assert (grid[32:32 + PAIR_GAP] == 64).all()  # gutter between rows
