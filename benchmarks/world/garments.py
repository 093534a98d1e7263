"""Garments: the silhouette of each category (as data) and the unnamed details a specific garment carries.

Lengths are fractions of the figure's height h, measured from the top of its head; x offsets are from the
figure's centre line, in the same unit (see `benchmarks.world.render.BODY` for the body they dress).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.world.config import RGB, WorldConfig
from benchmarks.world.vocabulary import CATEGORIES, require_entries

EMBLEM_SPOTS = ("left", "centre", "right")  # where an emblem sits, as seen in the image
# the fields of Details: where a trim band runs and its colour; an emblem's shape, spot and colour
DETAIL_FIELDS = ("trim", "trim_colour", "emblem", "emblem_at", "emblem_colour")


@dataclass(frozen=True)
class GarmentShape:
    torso_hem: float | None  # y where the garment's torso part ends; None: torso not covered
    hem_half: float = 0.12  # half width of the torso part at its hem
    straps: bool = False  # sleeveless with narrow shoulder straps (shoulders bare)
    sleeves: float = 0.0  # fraction of each arm covered from the shoulder (1: to the wrist)
    skirt: tuple[float, float] | None = None  # (hem y, hem half width) of a skirt flaring down from the waist
    legs: float = 0.0  # fraction of each leg covered from the hip (1: to the ankle)
    opening: bool = False  # a front opening line down the centre (coats)
    under: str | None = None  # plain grey clothes drawn beneath: "top" | "trousers" | None
    trims: tuple[str, ...] = ()  # where a trim band can run: "hem", "collar", "cuffs", "waist"
    emblem_spots: tuple[tuple[float, float], ...] = ((-0.055, 0.3), (0.0, 0.3), (0.055, 0.3))  # (x, y) per EMBLEM_SPOTS
    leg_emblem: float = 0.0  # > 0: left/right emblems ride the legs, this fraction down from the hip


GARMENTS: dict[str, GarmentShape] = {
    "dress": GarmentShape(
        torso_hem=0.41,
        hem_half=0.095,
        straps=True,
        skirt=(0.78, 0.21),
        trims=("hem", "collar", "waist"),
        emblem_spots=((-0.05, 0.31), (0.0, 0.31), (0.05, 0.31)),
    ),
    "skirt": GarmentShape(
        torso_hem=None,
        skirt=(0.76, 0.2),
        under="top",
        trims=("hem", "waist"),
        emblem_spots=((-0.08, 0.62), (0.0, 0.6), (0.08, 0.62)),
    ),
    "top": GarmentShape(torso_hem=0.53, hem_half=0.12, sleeves=0.5, under="trousers", trims=("hem", "collar", "cuffs")),
    "sweater": GarmentShape(
        torso_hem=0.55, hem_half=0.12, sleeves=1.0, under="trousers", trims=("hem", "collar", "cuffs")
    ),
    "vest": GarmentShape(
        torso_hem=0.53,
        hem_half=0.12,
        straps=True,
        under="trousers",
        trims=("hem", "collar"),
        emblem_spots=((-0.05, 0.32), (0.0, 0.32), (0.05, 0.32)),
    ),
    "coat": GarmentShape(
        torso_hem=0.74,
        hem_half=0.17,
        sleeves=1.0,
        opening=True,
        under="trousers",
        trims=("hem", "collar", "cuffs", "waist"),
        emblem_spots=((-0.06, 0.3), (0.0, 0.58), (0.06, 0.3)),
    ),
    "trousers": GarmentShape(
        torso_hem=None,
        legs=0.95,
        under="top",
        trims=("hem", "waist"),
        emblem_spots=((-0.065, 0.66), (0.0, 0.47), (0.065, 0.66)),
        leg_emblem=0.3,
    ),
    "shorts": GarmentShape(
        torso_hem=None,
        legs=0.45,
        under="top",
        trims=("hem", "waist"),
        emblem_spots=((-0.065, 0.6), (0.0, 0.47), (0.065, 0.6)),
        leg_emblem=0.2,
    ),
}
require_entries(GARMENTS, CATEGORIES, "garments.GARMENTS")


@dataclass(frozen=True)
class Details:
    """What makes one garment this garment beyond its words. No caption ever names any of it."""

    trim: str | None = None  # where a band of trim_colour runs (GarmentShape.trims); None: no band
    trim_colour: str | None = None  # colour name of the band
    emblem: str | None = None  # shape printed on the garment (WorldConfig.emblems); None: none
    emblem_at: str | None = None  # one of EMBLEM_SPOTS
    emblem_colour: str | None = None  # colour name of the emblem

    def differences(self, other: "Details") -> int:
        """How many of the five fields differ: a visual distance between two garments with the same words."""
        return sum(getattr(self, f) != getattr(other, f) for f in DETAIL_FIELDS)


def pattern_ink(rgb: RGB) -> RGB:
    """The second colour of a pattern (stripes, dots, check lines): white on dark garments, near-black on light ones."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (250, 250, 250) if luma < 150 else (35, 35, 38)


def _far(a: RGB, b: RGB, min_distance: float = 130.0) -> bool:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float))) >= min_distance


def detail_colours(config: WorldConfig, colour: str) -> tuple[str, ...]:
    """Colours a detail may take on a garment of `colour`: far from both the garment's colour and its pattern ink."""
    rgb = config.colour_rgb
    main = rgb[colour]
    ink = pattern_ink(main)
    options = tuple(name for name, c in config.colours if _far(c, main) and _far(c, ink))
    if not options:
        raise ValueError(f"no colour of the config contrasts with {colour!r} and its pattern ink; add colours")
    return options


def sample_details(
    rng: np.random.Generator, config: WorldConfig, category: str, colour: str, probability: float
) -> Details:
    """Random details: a trim band with `probability`, an emblem with `probability` (independently)."""
    shape = GARMENTS[category]
    colours = detail_colours(config, colour)
    trim = trim_colour = emblem = emblem_at = emblem_colour = None
    if shape.trims and rng.random() < probability:
        trim = str(rng.choice(shape.trims))
        trim_colour = str(rng.choice(colours))
    if rng.random() < probability:
        emblem = str(rng.choice(config.emblems))
        emblem_at = str(rng.choice(EMBLEM_SPOTS))
        emblem_colour = str(rng.choice(colours))
    return Details(trim, trim_colour, emblem, emblem_at, emblem_colour)
