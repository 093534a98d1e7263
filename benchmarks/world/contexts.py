"""Backgrounds: one painter per context, each recognisable at 64 px from its colours and a simple structure.

A painter maps pixel-centre coordinates (u, v), in image widths from the top-left corner, to RGB floats.
Textures are painted once per (context, canvas size) a little larger than the image and cached; a scene
shows a shifted crop of it, so backgrounds vary while costing one slice per image.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image

from benchmarks.world.vocabulary import CONTEXTS, require_entries

Painter = Callable[[np.ndarray, np.ndarray], np.ndarray]  # u, v: (H, W) -> (H, W, 3) float RGB in 0..255


def _noise(i: np.ndarray, j: np.ndarray, salt: float = 0.0) -> np.ndarray:
    """A fixed pseudo-random value in [0, 1) per integer cell (i, j): the classic sine hash."""
    return np.modf(np.abs(np.sin(i * 12.9898 + j * 78.233 + salt) * 43758.5453))[0]


def _fill(shape: tuple[int, int], rgb) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.float32), (*shape, 3)).copy()


def _put(img: np.ndarray, mask: np.ndarray, rgb) -> None:
    img[mask] = np.asarray(rgb, dtype=np.float32) if np.ndim(rgb) == 1 else rgb[mask]


def brick_wall(u, v):
    bh, bw = 0.085, 0.2  # brick height and width
    row = np.floor(v / bh)
    x = u / bw + 0.5 * (row % 2)
    col = np.floor(x)
    shade = 0.8 + 0.35 * _noise(row, col)[..., None]
    img = np.asarray((170, 68, 45), np.float32) * shade
    _put(img, (v / bh - row < 0.22) | (x - col < 0.07), (205, 198, 186))  # mortar
    _put(img, v > 0.9, (150, 146, 140))  # pavement
    return img


def cabinets(u, v):
    img = _fill(u.shape, (238, 234, 224))
    _put(img, (v > 0.36) & (v < 0.43), (200, 205, 210))  # splashback
    _put(img, (v > 0.43) & (v < 0.48), (78, 74, 72))  # countertop
    door = (u % 0.22 < 0.014) & ((v < 0.36) | ((v > 0.48) & (v < 0.92)))
    _put(img, door, (160, 158, 152))  # door seams
    knob = ((u % 0.22 - 0.035) ** 2 + (v - 0.54) ** 2 < 0.012**2) | (
        (u % 0.22 - 0.035) ** 2 + (v - 0.3) ** 2 < 0.012**2
    )
    _put(img, knob, (60, 60, 60))
    _put(img, v > 0.92, (176, 150, 118))  # floor
    return img


def railing(u, v):
    img = _fill(u.shape, (176, 206, 236))  # sky
    building = (v > 0.1) & (v < 0.62)
    _put(img, building, (204, 182, 146))
    window = building & (u % 0.16 > 0.06) & ((v - 0.1) % 0.14 > 0.05)
    _put(img, window, (66, 82, 104))
    _put(img, v >= 0.62, (150, 150, 150))  # concrete
    rails = ((v > 0.5) & (v < 0.535)) | ((v > 0.78) & (v < 0.8))
    balusters = (v > 0.5) & (v < 0.8) & (u % 0.075 < 0.018)
    _put(img, rails | balusters, (42, 42, 48))
    return img


def trees(u, v):
    img = _fill(u.shape, (172, 212, 240))  # sky
    crown = v < 0.5 + 0.06 * np.sin(u * 23) * np.sin(u * 7 + 1) + 0.03 * np.sin(u * 57)
    leaf = 0.5 + 0.25 * (np.sin(u * 37 + 3 * np.sin(v * 11)) + np.sin(v * 43 + 3 * np.sin(u * 17)))
    _put(img, crown, np.stack([28 + 50 * leaf, 84 + 66 * leaf, 32 + 30 * leaf], -1))
    trunk = ~crown & (u % 0.3 > 0.12) & (u % 0.3 < 0.17) & (v < 0.84)
    _put(img, trunk, (96, 64, 40))
    _put(img, ~crown & ~trunk & (v > 0.5) & (v < 0.84), (96, 150, 70))  # undergrowth
    _put(img, v >= 0.84, (168, 150, 118))  # path
    return img


def beach(u, v):
    img = _fill(u.shape, (140, 200, 246))  # sky
    sea = (v > 0.33) & (v < 0.5)
    _put(img, sea, (24, 104, 170))
    _put(img, sea & (np.sin(u * 70 + v * 40) * np.sin(v * 120) > 0.75), (190, 226, 244))  # waves
    _put(img, (v >= 0.47) & (v < 0.5), (242, 246, 248))  # foam
    sand = v >= 0.5
    grain = 0.93 + 0.1 * _noise(np.floor(u * 90), np.floor(v * 90))[..., None]
    img[sand] = (np.asarray((234, 208, 156), np.float32) * grain)[sand]
    return img


def couch(u, v):
    img = _fill(u.shape, (214, 198, 172))  # wall
    back = (v > 0.34) & (v < 0.64)
    _put(img, back, (64, 108, 118))
    _put(img, back & (u % 0.3 < 0.015), (40, 72, 80))  # cushion seams
    _put(img, (v >= 0.62) & (v < 0.8), (78, 126, 136))  # seat
    _put(img, (v > 0.62) & (v < 0.635), (44, 78, 86))  # seat edge
    _put(img, v >= 0.8, (150, 112, 84))  # rug
    _put(img, (v >= 0.8) & (u % 0.1 < 0.02), (128, 92, 66))
    return img


def marble_floor(u, v):
    img = _fill(u.shape, (206, 206, 214))  # wall
    _put(img, (v > 0.42) & (v < 0.46), (92, 90, 96))  # skirting board
    floor = v >= 0.46
    _put(img, floor, (34, 34, 42))
    vein = np.abs(np.sin(9 * u + 5 * v + 1.6 * np.sin(13 * v + 4 * u))) < 0.09
    _put(img, floor & vein, (196, 196, 204))
    seam = (u % 0.33 < 0.008) | ((v - 0.46) % 0.22 < 0.008)
    _put(img, floor & seam, (90, 90, 100))
    return img


def shelves(u, v):
    img = _fill(u.shape, (112, 78, 50))  # back of the shelves
    rv = v % 0.24  # height within one shelf
    cell, row = np.floor(u / 0.07), np.floor(v / 0.24)
    height = 0.08 + 0.08 * _noise(cell, row, 1.0)
    item = (rv > 0.2 - height) & (rv < 0.2) & (u % 0.07 < 0.058)
    palette = np.asarray(
        [(220, 60, 50), (240, 190, 50), (60, 140, 210), (240, 240, 230), (80, 170, 90), (230, 120, 40)], np.float32
    )
    colours = palette[(np.floor(_noise(cell, row, 2.0) * len(palette))).astype(int)]
    img[item] = colours[item]
    _put(img, rv >= 0.2, (182, 136, 84))  # boards
    return img


def water(u, v):
    img = _fill(u.shape, (186, 216, 240))  # sky
    _put(img, (v > 0.1) & (v < 0.15), (50, 82, 56))  # far shore
    lake = v >= 0.15
    depth = (0.85 + 0.3 * v)[..., None]
    img[lake] = (np.asarray((34, 112, 150), np.float32) * depth)[lake]
    ripple = np.sin(u * 45 + 5 * np.sin(v * 21)) * np.sin(v * 75) > 0.55
    _put(img, lake & ripple, (128, 190, 216))
    return img


def grass(u, v):
    img = _fill(u.shape, (150, 200, 245))  # sky
    _put(img, (v > 0.2 + 0.025 * np.sin(u * 31)) & (v < 0.3), (44, 86, 46))  # distant trees
    lawn = v >= 0.3
    _put(img, lawn, (104, 178, 58))
    blade = np.modf(u * 48 + 0.35 * np.sin(v * 33))[0] < 0.3
    _put(img, lawn & blade, (74, 142, 40))
    return img


def curtains(u, v):
    fold = (0.5 + 0.5 * np.abs(np.sin(np.pi * u / 0.09)))[..., None]
    img = np.asarray((126, 26, 48), np.float32) * fold
    _put(img, v < 0.03, (60, 46, 40))  # rod
    _put(img, v > 0.9, (108, 80, 60))  # floor
    return img


def shop_window(u, v):
    img = _fill(u.shape, (176, 204, 214))  # glass
    _put(img, np.modf((u + v) * 3.5)[0] < 0.1, (226, 240, 246))  # reflections
    frame = (u % 0.4 < 0.03) | ((v > 0.07) & (v < 0.1)) | ((v > 0.7) & (v < 0.73))
    _put(img, frame, (58, 58, 64))
    _put(img, (v >= 0.73) & (v < 0.86), (92, 92, 98))  # base panel
    _put(img, v >= 0.86, (196, 190, 180))  # floor
    return img


def street(u, v):
    img = _fill(u.shape, (160, 196, 232))  # sky
    col = np.floor(u / 0.12)
    roof = 0.16 + 0.16 * _noise(col, col, 3.0)
    shade = (0.8 + 0.3 * _noise(col, col, 4.0))[..., None]
    building = (v > roof) & (v < 0.5)
    img[building] = (np.asarray((112, 112, 124), np.float32) * shade)[building]
    _put(img, building & (u % 0.04 < 0.016) & (v % 0.06 < 0.025), (216, 210, 160))  # lit windows
    _put(img, (v >= 0.5) & (v < 0.6), (176, 172, 166))  # pavement
    _put(img, (v >= 0.6) & (v < 0.62), (214, 214, 208))  # kerb
    _put(img, v >= 0.62, (70, 70, 74))  # road
    _put(img, (v > 0.78) & (v < 0.8) & (u % 0.2 < 0.11), (236, 236, 226))  # dashed line
    return img


def tiled_wall(u, v):
    i, j = np.floor(u / 0.075), np.floor(v / 0.075)
    n = _noise(i, j, 5.0)[..., None]
    img = (1 - n) * np.asarray((40, 120, 160), np.float32) + n * np.asarray((120, 200, 210), np.float32)
    _put(img, (u % 0.075 < 0.012) | (v % 0.075 < 0.012), (236, 236, 230))  # grout
    _put(img, v > 0.9, (120, 120, 126))  # floor
    return img


PAINTERS: dict[str, Painter] = {
    "brick wall": brick_wall,
    "cabinets": cabinets,
    "railing": railing,
    "trees": trees,
    "beach": beach,
    "couch": couch,
    "marble floor": marble_floor,
    "shelves": shelves,
    "water": water,
    "grass": grass,
    "curtains": curtains,
    "shop window": shop_window,
    "street": street,
    "tiled wall": tiled_wall,
}
require_entries(PAINTERS, CONTEXTS, "contexts.PAINTERS")


@lru_cache(maxsize=256)
def context_texture(context: str, size: int, extent: float = 1.3) -> np.ndarray:
    """The context painted over `extent` image widths at `size` px per width: (ceil(extent*size),)*2 + (3,) uint8."""
    n = int(np.ceil(extent * size))
    v, u = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / size
    img = np.clip(PAINTERS[context](u, v), 0, 255).astype(np.uint8)
    img.setflags(write=False)
    return img


def context_background(context: str, size: int, shift: tuple[float, float], brightness: float) -> Image.Image:
    """A size x size RGB crop of the context's texture at offset `shift` (fractions of size), brightness-scaled."""
    tex = context_texture(context, size)
    dx = min(int(shift[0] * size), tex.shape[1] - size)
    dy = min(int(shift[1] * size), tex.shape[0] - size)
    crop = tex[dy : dy + size, dx : dx + size]
    if brightness != 1.0:
        crop = np.clip(crop * np.float32(brightness), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(crop), "RGB")
