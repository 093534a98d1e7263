"""Write one file of every bad or odd kind a user's gallery may hold, with what `load_image` must make of it.

    expected = write_bad_files(tmp_path)   # {"truncated.jpg": "bad", "cmyk.jpg": "ok", ...}

A helper module for tests (not a test file). Every file has an image extension, so a scan of the folder
lists exactly these files. What each holds (sizes are (width, height) as `load_image` returns them):

  good_rgb.jpg              40 x 30 RGB gradient
  good.png                  36 x 28 RGB, all (10, 200, 30)
  empty.jpg                 0 bytes                                   -> "empty file"
  text.png                  plain text                                -> "not an image"
  random.jpg                4 KiB of seeded random bytes, first byte 0x00 (so no format's magic)
                                                                      -> "not an image"
  truncated.jpg             a 64 x 64 noise JPEG cut to its first half -> "truncated or corrupt"
  truncated.png             a 64 x 64 noise PNG cut to its first half  -> "truncated or corrupt"
  huge.png                  a crafted 60-byte PNG whose header claims 100000 x 100000 RGB (1e10 pixels, over
                            any sane max_pixels and over Pillow's own limit, so no test writes a giant file;
                            its pixel data is a single empty IDAT)    -> "too many pixels"
  cmyk.jpg                  24 x 16 CMYK (0, 255, 255, 0): red
  gray16.png / gray16.tif   30 x 10 16-bit grey ("I;16"), three 10-px columns 0 | 32768 | 65535
                            -> greys 0 | 128 | 255
  palette_transparent.png   20 x 10 palette: left half index 0 (black, marked transparent) | right half red
                            -> white | red
  rgba.png                  20 x 10 RGBA: left half (0, 0, 0, 0) | right half opaque green -> white | green
  exif_rotated.jpg          stored 48 x 32, blue with a red 16 x 16 block at the stored top-left, EXIF
                            orientation 6 (display rotated 90 degrees clockwise) -> upright 32 x 48, red
                            block at the top-right corner
  gray.jpg                  20 x 20 grey ("L"), all 100
  bitonal.png               16 x 8 1-bit: left half black | right half white
  animated.gif              12 x 10, 2 frames: red, then blue         -> the red first frame
  animated.webp             14 x 10 lossless, 2 frames: green, then blue -> the green first frame
  image.bmp                 18 x 12 RGB, all (0, 0, 255)
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# ok file -> (width, height) of the upright RGB image load_image returns
OK_SIZES: dict[str, tuple[int, int]] = {
    "good_rgb.jpg": (40, 30),
    "good.png": (36, 28),
    "cmyk.jpg": (24, 16),
    "gray16.png": (30, 10),
    "gray16.tif": (30, 10),
    "palette_transparent.png": (20, 10),
    "rgba.png": (20, 10),
    "exif_rotated.jpg": (32, 48),
    "gray.jpg": (20, 20),
    "bitonal.png": (16, 8),
    "animated.gif": (12, 10),
    "animated.webp": (14, 10),
    "image.bmp": (18, 12),
}

# bad file -> the category its BadImage.reason starts with (at any max_pixels below 1e10)
BAD_REASONS: dict[str, str] = {
    "empty.jpg": "empty file",
    "text.png": "not an image",
    "random.jpg": "not an image",
    "truncated.jpg": "truncated or corrupt",
    "truncated.png": "truncated or corrupt",
    "huge.png": "too many pixels",
}

EXIF_ORIENTATION = 0x0112  # EXIF tag number of Orientation


def write_bad_files(folder: Path) -> dict[str, str]:
    """Write one file of each kind (see the module docstring) into FOLDER; returns {relative path: "ok" | "bad"}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def noise(size: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))  # (H, W, 3)

    def halves(mode: str, size: tuple[int, int], left, right) -> Image.Image:
        im = Image.new(mode, size, right)
        im.paste(left, (0, 0, size[0] // 2, size[1]))
        return im

    # good
    ramp = np.linspace(0, 255, 40, dtype=np.uint8)  # (40,)
    gradient = np.stack([np.tile(ramp, (30, 1)), np.full((30, 40), 128, np.uint8), np.tile(ramp[::-1], (30, 1))], -1)
    Image.fromarray(gradient).save(folder / "good_rgb.jpg", quality=95)  # (30, 40, 3)
    Image.new("RGB", (36, 28), (10, 200, 30)).save(folder / "good.png")

    # not images
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is a text file with an image extension\n" * 20)
    junk = bytearray(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    junk[0] = 0  # no accepted format starts with a zero byte
    (folder / "random.jpg").write_bytes(bytes(junk))

    # damaged images: real files cut in half (inside the pixel data: the header still opens)
    for name, fmt in (("truncated.jpg", "JPEG"), ("truncated.png", "PNG")):
        path = folder / name
        noise(64).save(path, fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    (folder / "huge.png").write_bytes(png_header_only(100_000, 100_000))

    # odd but convertible
    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    bands = np.repeat(np.array([0, 32768, 65535], dtype=np.uint16), 10)  # (30,)
    grey16 = Image.fromarray(np.tile(bands, (10, 1)))  # (10, 30) uint16 -> mode "I;16"
    grey16.save(folder / "gray16.png")
    grey16.save(folder / "gray16.tif")
    palette = halves("P", (20, 10), 0, 1)
    palette.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black, index 1 red
    palette.save(folder / "palette_transparent.png", transparency=0)
    halves("RGBA", (20, 10), (0, 0, 0, 0), (0, 255, 0, 255)).save(folder / "rgba.png")
    stored = Image.new("RGB", (48, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # red block at the stored top-left, on JPEG's 8x8 grid
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(folder / "exif_rotated.jpg", quality=95, exif=exif)
    Image.new("L", (20, 20), 100).save(folder / "gray.jpg", quality=95)
    halves("1", (16, 8), 0, 1).save(folder / "bitonal.png")
    gif = [Image.new("RGB", (12, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif[0].save(folder / "animated.gif", save_all=True, append_images=gif[1:], duration=100, loop=0)
    webp = [Image.new("RGB", (14, 10), c) for c in ((0, 255, 0), (0, 0, 255))]
    webp[0].save(folder / "animated.webp", save_all=True, append_images=webp[1:], duration=100, lossless=True)
    Image.new("RGB", (18, 12), (0, 0, 255)).save(folder / "image.bmp")

    expected = {name: "ok" for name in OK_SIZES} | {name: "bad" for name in BAD_REASONS}
    written = {p.name for p in folder.iterdir()}
    assert set(expected) <= written, f"not written: {sorted(set(expected) - written)}"
    return dict(sorted(expected.items()))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (8-bit RGB) claiming WIDTH x HEIGHT, then an empty IDAT and IEND.

    Pillow opens it (the header is well formed) and reports its size; decoding would fail, so it is only
    good for testing that the size is refused before any pixel is decoded.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
