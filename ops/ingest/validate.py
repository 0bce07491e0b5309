"""Per-file checks of images and masks; every failure is a :class:`Problem` with a reason and a fix.

Reasons start with one of the codes below (``"<code>: <detail>"``) so that callers and tests can group
rejects without parsing prose.

Choices:
- Images are decoded completely (``Image.load()``) with PIL's ``LOAD_TRUNCATED_IMAGES`` forced off for the
  call: a library elsewhere in the process may have switched it on, and then PIL pads truncated files with
  grey instead of failing.
- Any exception while decoding counts as unreadable (PIL raises OSError, SyntaxError, ValueError,
  DecompressionBombError, ... depending on the codec); ingest reads untrusted files, one bad file must not
  stop a category.
- Image modes other than 8-bit colour / grey / palette (e.g. 16-bit "I;16") are rejected: converting them
  to RGB clips silently.
- Binary masks ("binary" rule: MVTec AD, MVTec LOCO, plain folders) must hold exactly the values {0, v}
  for one v > 0 (MVTec AD uses 255, MVTec LOCO one value per defect class); anything else (JPEG-compressed
  or anti-aliased masks) is rejected rather than thresholded at a guessed level. VisA masks are label maps
  (0 = background, 1, 2, ... = defect classes, as its release documents and anomalib binarises), so the
  "labels" rule takes any non-zero value as defect.
- A mask with no defect pixel on a defect image is rejected: it carries no location to learn from.
- Colour masks are accepted only when the three channels are equal; an alpha channel is ignored.
- Decompression bombs: an image over PIL's ``MAX_IMAGE_PIXELS`` is rejected before it is decoded (PIL only warns
  between 1x and 2x the limit; here the warning is an error too), so one hostile file cannot exhaust memory.
- A file that cannot be read at all (permission denied, I/O error) is a reject naming the file, not a crash.
- Images that need normalising are kept with a note (``notes`` in :class:`ImageInfo`, the ``raw_defect_notes``
  manifest): an alpha channel is dropped (training and generation use RGB) and grayscale/palette/CMYK images are
  converted to RGB when they are loaded.
"""
from __future__ import annotations

import hashlib
import io
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})

UNREADABLE = "unreadable image"
NO_ACCESS = "cannot read file"
BOMB = "decompression bomb"
SIZE_OUTLIER = "size outlier"
UNREADABLE_MASK = "unreadable mask"
BAD_MODE = "unsupported image mode"
SIZE_MISMATCH = "mask size mismatch"
NON_BINARY = "non-binary mask"
EMPTY_MASK = "empty mask"
MISSING_MASK = "missing mask"
MISSING_FILE = "missing file"
EMPTY_FOLDER = "empty folder"
UNSUPPORTED = "unsupported file"
UNEXPECTED_FOLDER = "unexpected folder"
BAD_NAME = "invalid defect type name"
DUPLICATE_ID = "duplicate image id"
ORPHAN_MASK = "mask without image"
OUTSIDE_ROOT = "path outside dataset root"
BAD_CSV_ROW = "bad csv row"

MaskRule = Literal["binary", "labels", "none"]  # none: image-level labels, no masks
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class Problem(Exception):
    """A per-file problem: becomes one reject row (reason, fix) instead of stopping the ingest."""

    def __init__(self, code: str, detail: str, fix: str):
        super().__init__(f"{code}: {detail}")
        self.reason = f"{code}: {detail}"
        self.fix = fix
        self.path: Path | None = None


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    sha256: str
    notes: tuple[str, ...] = ()  # normalisations applied when the image is loaded (module doc)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def is_hidden(path: Path) -> bool:
    # Finder / Explorer droppings (.DS_Store, ._000.png, Thumbs.db) are not data.
    return path.name.startswith(".") or path.name.lower() == "thumbs.db"


@contextmanager
def _strict_decoding() -> Iterator[None]:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise Problem(NO_ACCESS, f"{type(e).__name__}: {e.strerror}",
                      f"make {path.name} readable by this user (e.g. chmod a+r) or delete it") from None


def _decode(data: bytes, path: Path, code: str) -> Image.Image:
    try:
        with _strict_decoding(), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
        return im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Problem(BOMB, _BUFFER_REPR.sub(path.name, str(e).split(" could be")[0]),
                      f"{path.name} is larger than PIL's limit Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}: "
                      f"downscale it, or raise the limit if you trust the file") from None
    except Exception as e:  # noqa: BLE001 - see module docstring
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x7f...>"): name the file instead, so the
        # reason is readable and identical on every run
        detail = _BUFFER_REPR.sub(path.name, str(e))
        raise Problem(code, f"{type(e).__name__}: {detail}",
                      f"re-export or re-download {path.name} (it is truncated or not an image), or delete it")


def read_image(path: Path) -> ImageInfo:
    """Decode an image completely; returns its size and the sha256 of the file bytes."""
    data = _read(path)
    im = _decode(data, path, UNREADABLE)
    if im.mode not in IMAGE_MODES:
        raise Problem(BAD_MODE, f"mode {im.mode!r}", "save it as 8-bit RGB or grayscale PNG/JPEG")
    return ImageInfo(width=im.width, height=im.height, sha256=hashlib.sha256(data).hexdigest(), notes=_notes(im))


def _notes(im: Image.Image) -> tuple[str, ...]:
    notes = []
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        seen = float((alpha < 255).mean())
        notes.append(f"alpha channel dropped ({seen:.0%} of pixels not opaque): RGB values used as stored")
    if im.mode not in ("RGB", "RGBA"):
        notes.append(f"mode {im.mode} converted to RGB when loaded")
    return tuple(notes)


def read_mask(path: Path, size: tuple[int, int], rule: MaskRule = "binary") -> np.ndarray:
    """Decode a mask, check it against the image ``size`` (width, height) and return it as bool HxW."""
    im = _decode(_read(path), path, UNREADABLE_MASK)
    if im.size != tuple(size):
        raise Problem(SIZE_MISMATCH, f"mask is {im.width}x{im.height}, image is {size[0]}x{size[1]}",
                      "the mask must have the image's exact size; regenerate it at full resolution")
    if im.mode in ("P", "PA"):
        im = im.convert("L")
    arr = np.asarray(im)
    if arr.ndim == 3:
        colour = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]
        if not (colour == colour[..., :1]).all():
            raise Problem(NON_BINARY, "colour mask (channels differ)",
                          "save the mask as a single-channel PNG with 0 = good and 255 = defect")
        arr = colour[..., 0]
    values = np.unique(arr)
    if rule == "binary" and (len(values) > 2 or (len(values) == 2 and values[0] != 0)):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise Problem(NON_BINARY, f"{len(values)} distinct values ({shown}), expected 0 and one defect value",
                      "save masks losslessly (PNG, not JPEG) with only 0 = good and 255 = defect")
    mask = arr > 0
    if not mask.any():
        raise Problem(EMPTY_MASK, "no defect pixel", "draw the defect region in the mask or move the image to good/")
    return mask
