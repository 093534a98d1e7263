"""A scene: everything `render_scene` needs to draw one image, and the random draw of one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from benchmarks.world.concepts import Concept
from benchmarks.world.config import WorldConfig
from benchmarks.world.garments import Details, sample_details

SKIN_TONES = ((238, 204, 172), (205, 155, 115), (140, 96, 66))
HAIR_COLOURS = ((38, 28, 22), (105, 66, 36), (214, 184, 120), (20, 20, 20))
# a bag's colours: leather and canvas tones no caption names (grey is the under-clothes', so not here)
BAG_COLOURS = ((92, 60, 38), (38, 34, 32), (196, 164, 120), (84, 96, 70))


@dataclass(frozen=True)
class Bag:
    """A shoulder bag over the garment (WorldConfig.bag_share). Body units: fractions of the figure's height."""

    x: float  # centre, from the figure's centre line
    y: float  # centre, from the top of the head
    half: float  # half width; the height is 1.2 x the width
    colour: int  # index into BAG_COLOURS


@dataclass(frozen=True)
class Scene:
    # ----- what words describe
    context: str  # background (WorldConfig.contexts)
    category: str  # garment category
    colour: str  # garment's main colour
    pattern: str  # garment pattern
    pose: str  # the figure's pose
    # ----- what no word describes
    details: Details  # the garment's unnamed details
    concept: str | None  # pair_id of the concept worn; None: a random garment
    # ----- jitter
    person_x: float  # figure centre / image width
    person_height: float  # figure height / image height
    shift: tuple[float, float]  # background crop offset (x, y), fractions of the image
    brightness: float  # background brightness factor
    skin: int  # index into SKIN_TONES
    hair: int  # index into HAIR_COLOURS
    # ----- how this photo of the garment differs (WorldConfig's view shares); defaults: the v1 world's photo
    back_view: bool = False  # seen from behind
    bag: Bag | None = None  # occluding bag
    zoom: float = 1.0  # > 1: the figure is this much taller than person_height says, partly out of frame
    zoom_anchor: float = 0.0  # which part stays in frame when zoomed: 0 the feet (bottom edge) .. 1 the head (top)

    @property
    def words(self) -> tuple[str, str, str]:
        """(category, colour, pattern): what a caption may say about the garment."""
        return self.category, self.colour, self.pattern


def sample_scene(
    rng: np.random.Generator,
    config: WorldConfig,
    concept: Concept | None = None,
    context: str | None = None,
    pose: str | None = None,
) -> Scene:
    """One random scene. A concept fixes the garment (words and details); context and pose may be fixed too.

    The draws happen in a fixed order whatever is given, so one seed gives one sequence of scenes.
    """
    if context is not None and context not in config.contexts:
        raise ValueError(f"context {context!r} is not in this world's contexts {config.contexts}")
    if pose is not None and pose not in config.poses:
        raise ValueError(f"pose {pose!r} is not in this world's poses {config.poses}")
    # 1. words (drawn even when given, to keep the draw order fixed)
    drawn_context = str(rng.choice(config.contexts))
    drawn_pose = str(rng.choice(config.poses))
    category = str(rng.choice(config.categories))
    colour = str(rng.choice(config.colour_names))
    pattern = str(rng.choice(config.patterns))
    details = sample_details(rng, config, category, colour, config.detail_probability)
    if concept is not None:
        category, colour, pattern, details = concept.category, concept.colour, concept.pattern, concept.details
    # 2. jitter
    scene = Scene(
        context=context or drawn_context,
        category=category,
        colour=colour,
        pattern=pattern,
        pose=pose or drawn_pose,
        details=details,
        concept=concept.pair_id if concept is not None else None,
        person_x=float(rng.uniform(*config.person_x)),
        person_height=float(rng.uniform(*config.person_height)),
        shift=(float(rng.uniform(0, config.context_shift)), float(rng.uniform(0, 0.4 * config.context_shift))),
        brightness=float(rng.uniform(*config.brightness)),
        skin=int(rng.integers(len(SKIN_TONES))),
        hair=int(rng.integers(len(HAIR_COLOURS))),
    )
    # 3. the view; drawn only where a share is set, so worlds without views keep their random streams
    views = {}
    if config.back_view_share > 0:
        views["back_view"] = bool(rng.random() < config.back_view_share)
    if config.bag_share > 0 and rng.random() < config.bag_share:
        side = 1 if rng.random() < 0.5 else -1
        views["bag"] = Bag(
            x=side * float(rng.uniform(0.02, 0.14)),
            y=float(rng.uniform(0.38, 0.52)),
            half=float(rng.uniform(0.07, 0.11)),
            colour=int(rng.integers(len(BAG_COLOURS))),
        )
    if config.zoom_share > 0 and rng.random() < config.zoom_share:
        views["zoom"] = float(rng.uniform(*config.zoom))
        views["zoom_anchor"] = float(rng.uniform(0.0, 1.0))
    return dataclasses.replace(scene, **views) if views else scene
