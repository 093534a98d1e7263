"""Decode any image file a user may have into an upright 8-bit RGB PIL image, or say why it cannot be used.

    im = load_image("holiday/IMG_0001.JPG")          # PIL.Image.Image, mode "RGB"
    except BadImage as e: e.reason                   # "truncated or corrupt (image file is truncated)"

Steps of `load_image`, each visible below:
 1. the file: missing, unreadable or empty files are refused before Pillow sees them;
 2. the header: `Image.open` reads only the header, restricted to the formats of IMAGE_EXTENSIONS (so a
    renamed EPS never reaches Ghostscript); the pixel count is checked against `max_pixels` here, before
    any pixel is decoded;
 3. the pixels: `load()` decodes them all; a truncated file raises (ImageFile.LOAD_TRUNCATED_IMAGES is
    never set here, and is refused if someone else set it), so no half-grey image is ever returned;
 4. EXIF orientation is applied (the camera's "rotate 90" flag), on the file's own image so that TIFF
    orientation tags are seen too;
 5. colour: 16-bit and float greys are scaled to 8 bits, transparency is composited on white, every
    other mode (CMYK, palette, 1-bit, grey, YCbCr, ...) is converted to RGB.
Animated GIF/WebP and multi-page TIFF give their first frame (what `Image.open` selects).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Pillow formats that files with those extensions hold ("JPEG" also opens the MPO JPEGs of cameras that append
# a second picture). Everything else Pillow could open (EPS runs Ghostscript, exotic plugins) is refused as
# "not an image".
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# Pillow's own decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3,
# a 256 MiB RGB24 image). Pillow warns above it and refuses above twice it; that check is a process global
# this module never changes, so it also caps a larger `max_pixels`: such images are reported as
# "too many pixels (Pillow: ...)", never loaded.
DEFAULT_MAX_PIXELS: int = 89_478_485

# Magic numbers of the accepted formats: a file that starts like one of them but that Pillow cannot open
# is a damaged image ("truncated or corrupt"), not some other kind of file ("not an image").
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)

_GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned 16-bit grey: 16-bit PNG and TIFF


class BadImage(Exception):
    """An image file that cannot be used; `reason` says why, as "category" or "category (detail)".

    Categories (the start of `reason`):
      "empty file"                      zero bytes
      "unreadable file (...)"           missing, a directory, no permission (the OS error)
      "not an image (...)"              no header of a supported format (text, random bytes, HEIC, EPS...)
      "truncated or corrupt (...)"      the header is there but the header or pixels cannot be decoded
      "too many pixels (W x H > max)"   over `max_pixels` (or "too many pixels (Pillow: ...)" over Pillow's own limit)
      "out of memory (...)"             the decoded pixels do not fit in memory
      "unsupported pixels (...)"        decoded, but the values have no sure 8-bit meaning (e.g. float outside 0..1)
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_image(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None
) -> Image.Image:
    """Open, fully decode and convert PATH to an upright 8-bit RGB image (see the module docstring)."""
    return load_image_and_size(path, max_pixels, min_size)[0]


def load_image_and_size(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Open, fully decode and convert PATH to an upright 8-bit RGB image (see the module docstring).

    Returns (image, (width, height)): the size is the file's full upright size. With `min_size`, a JPEG is
    decoded at a reduced DCT scale (1/2, 1/4 or 1/8, Pillow's draft mode) that keeps both sides >= min_size:
    a 12-megapixel photo meant for a 224-px encoder then decodes several times faster.

    Raises BadImage(reason) for any file that cannot be used, never another exception for a bad file
    (RuntimeError only if PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set, ValueError for max_pixels < 1).
    The DecompressionBombWarning filter it sets is process-wide while it runs (warnings.catch_warnings):
    decode in processes (DataLoader workers), not in threads, when other code relies on warning filters.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): truncated files would load "
            "half grey instead of being refused; set it back to False before loading images"
        )

    # 1. the file
    try:
        n_bytes = os.stat(path).st_size
    except OSError as e:
        raise BadImage(f"unreadable file ({type(e).__name__}: {e.strerror})") from e
    if n_bytes == 0:
        raise BadImage("empty file")

    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: make the warning refuse too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # 2. the header
            with Image.open(path, formats=PIL_FORMATS) as im:
                width, height = im.size
                if width == 0 or height == 0:
                    raise BadImage(f"truncated or corrupt (header gives a {width} x {height} image)")
                if width * height > max_pixels:
                    raise BadImage(f"too many pixels ({width} x {height} > {max_pixels})")
                # 3. the pixels (at a reduced scale when a smaller image is all the caller needs)
                if min_size and im.format == "JPEG":
                    im.draft(im.mode, (min_size, min_size))
                try:
                    im.load()
                except MemoryError as e:
                    raise BadImage(f"out of memory (decoding {width} x {height} {im.mode})") from e
                # 4. orientation; the result is a new image, independent of the file closed below
                upright = ImageOps.exif_transpose(im)
                full_size = (height, width) if upright.size != im.size else (width, height)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too many pixels (Pillow: {e})") from e
    except UnidentifiedImageError as e:
        raise _unidentified(path) from e
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise BadImage(f"unreadable file ({type(e).__name__}: {e.strerror})") from e
    except MemoryError as e:
        raise BadImage("out of memory (reading the header)") from e
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise BadImage(f"truncated or corrupt ({type(e).__name__}: {e})") from e

    # 5. colour
    try:
        return to_rgb(upright), full_size
    except MemoryError as e:
        raise BadImage(f"out of memory (converting {upright.width} x {upright.height} {upright.mode} to RGB)") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded image -> a new 8-bit RGB image: high-depth greys scaled, transparency composited on white.

    Raises BadImage("unsupported pixels (...)") for values without a sure 8-bit meaning.
    """
    if im.mode in _GREY_16 or im.mode in ("I", "F"):
        im = _grey_to_8bit(im)  # "L", or "LA" when the file marks one grey value transparent
    if im.has_transparency_data:  # alpha channel, palette alpha, or a transparent colour (info["transparency"])
        rgba = im.convert("RGBA")  # applies info["transparency"] and palette alpha
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert (none of the accepted formats decode to one)
        raise BadImage(f"unsupported pixels (mode {im.mode}: {e})") from e


def _grey_to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image -> "L" (or "LA"), by the range its mode implies.

    Pillow's own convert("L") clips these modes at 255, which turns a 16-bit photo all white.
    """
    a = np.asarray(im)  # (H, W): uint16 (either byte order), int32 or float32
    if im.mode in _GREY_16:
        grey = a.astype(np.float32) / 257.0  # 0..65535 -> 0..255 exactly (65535 / 255 = 257)
    elif im.mode == "I":
        # 32-bit container; the formats accepted here put 16-bit data in it (e.g. signed or 16-bit TIFF).
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise BadImage(f"unsupported pixels (32-bit integer grey with values {lo}..{hi}, expected 0..65535)")
        grey = a.astype(np.float32) / 257.0
    else:  # "F": float TIFF; the usual convention is 0..1
        if not np.isfinite(a).all():
            raise BadImage("unsupported pixels (float grey with NaN or infinite values)")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise BadImage(f"unsupported pixels (float grey with values {lo:g}..{hi:g}, expected 0..1)")
        grey = a * 255.0
    out = Image.fromarray(np.round(grey).astype(np.uint8))  # (H, W) uint8 -> "L"
    transparent = im.info.get("transparency")
    if isinstance(transparent, int):  # tRNS of a 16-bit grey PNG: that one value is fully transparent
        alpha = Image.fromarray(np.where(a == transparent, 0, 255).astype(np.uint8))
        out = Image.merge("LA", (out, alpha))
    return out


def _unidentified(path: str | os.PathLike) -> BadImage:
    """Why Pillow could not identify PATH: a damaged header of a known format, or not an image at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return BadImage(f"unreadable file ({type(e).__name__}: {e.strerror})")
    fmt = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if fmt is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        fmt = "WEBP"
    if fmt is not None:
        return BadImage(f"truncated or corrupt ({fmt} header cannot be read)")
    return BadImage(f"not an image (no {'/'.join(PIL_FORMATS)} header)")


# ----- folders of images (a concept's photos, negatives)
@dataclass
class ImageSet:
    images: list[Image.Image]  # RGB
    paths: list[Path]  # one per image
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason) of unusable files


def read_image_folder(folder: str | Path, min_images: int, what: str = "concept images") -> ImageSet:
    """Every image file directly in FOLDER (sorted by name), decoded to RGB. Unreadable files are skipped with a
    warning while at least MIN_IMAGES remain; otherwise the error says how many are needed."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{what}: no folder {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what}: {folder} is a file; give the folder that holds the images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    images, paths, skipped = [], [], []
    for p in files:
        try:
            images.append(load_image(p))
            paths.append(p)
        except BadImage as e:
            skipped.append((p, e.reason))
    if len(images) < min_images:
        found = f"{len(images)} usable image{'s' * (len(images) != 1)}"
        why = (
            f" ({len(skipped)} unreadable: " + "; ".join(f"{p.name}: {r}" for p, r in skipped[:5]) + ")"
            if skipped
            else ""
        )
        raise ValueError(
            f"{what}: {folder} has {found}{why}; at least {min_images} are needed "
            f"(files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}): add images"
        )
    if skipped:
        warnings.warn(
            f"{what}: skipped {len(skipped)} unreadable file(s) in {folder}: "
            + "; ".join(f"{p.name} ({r})" for p, r in skipped)
        )
    return ImageSet(images, paths, skipped)


def image_grid(images: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """Images of one size pasted side by side, COLUMNS per row, on white (a contact sheet)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet
