"""Captions from a small grammar. They name words (context, pose, category, colour, pattern), never identity:
no concept id. Only training captions may name a garment's details, and only when asked (`detail_share`).

- `caption`: training captions, mostly the whole description ("a person wearing a red striped dress standing
  in front of a brick wall."), sometimes part of it, so every word is also seen on its own; with `detail_share`
  > 0, that share of them also names the garment's details ("... a red striped dress with a white collar and a
  yellow circle on the left ..."), as real captions name trims and logos (issue #13, section 3);
- `detail_phrase`: the words for a garment's details;
- `context_caption`: PerVL-style evaluation captions that describe the person's context and pose but never the
  garment, and always say "person" (where a query inserts the concept);
- `short_caption` / `detailed_caption`: the shortened_ / detailed_ variants of an evaluation caption.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from benchmarks.world.config import WorldConfig
from benchmarks.world.garments import DETAIL_FIELDS, EMBLEM_SPOTS, GARMENTS, Details, detail_colours
from benchmarks.world.scene import Scene
from benchmarks.world.vocabulary import CONTEXTS, POSES, require_entries


@dataclass(frozen=True)
class ContextWords:
    places: tuple[str, ...]  # prepositional phrases: "in front of a brick wall"
    noun: str  # the context as a subject: "a brick wall"
    plural: bool  # noun takes "are"
    detailed: str  # a longer place phrase, for detailed captions


# No phrase here may contain a category, colour, pattern or emblem word (tests check it).
CONTEXT_WORDS: dict[str, ContextWords] = {
    "brick wall": ContextWords(
        ("in front of a brick wall", "by a brick wall"),
        "a brick wall",
        False,
        "in front of a brick wall with pale mortar, above a paved path",
    ),
    "cabinets": ContextWords(
        ("in front of kitchen cabinets", "in a kitchen by the cabinets"),
        "kitchen cabinets",
        True,
        "in front of kitchen cabinets with small knobs under a dark countertop",
    ),
    "railing": ContextWords(
        ("by a railing with a building behind", "at a railing in front of a building"),
        "a railing and a building",
        True,
        "by a metal railing, with a tall building full of windows behind",
    ),
    "trees": ContextWords(
        ("under some trees", "in a park among trees"),
        "leafy trees",
        True,
        "under leafy trees with thick trunks beside a park path",
    ),
    "beach": ContextWords(
        ("on a beach", "on the sand by the sea"),
        "the sea",
        False,
        "on a sandy beach, with the sea and a clear sky behind",
    ),
    "couch": ContextWords(
        ("in front of a couch", "by a couch in a living room"),
        "a couch",
        False,
        "in front of a large couch with cushions, on a rug",
    ),
    "marble floor": ContextWords(
        ("on a marble floor", "on a polished marble floor"),
        "a hall with a marble floor",
        False,
        "on a polished marble floor with veins, in a hall with pale walls",
    ),
    "shelves": ContextWords(
        ("in front of shelves full of goods", "by store shelves"),
        "shelves full of goods",
        True,
        "in front of wooden shelves stacked with colourful boxes",
    ),
    "water": ContextWords(
        ("by the water", "next to a lake"), "a lake", False, "next to a lake with rippling water and a distant shore"
    ),
    "grass": ContextWords(
        ("on the grass", "on a lawn"), "a wide lawn", False, "on a wide lawn, with a row of trees and the sky behind"
    ),
    "curtains": ContextWords(
        ("in front of curtains", "before heavy curtains"),
        "heavy curtains",
        True,
        "in front of heavy curtains with deep folds hanging from a rod",
    ),
    "shop window": ContextWords(
        ("in front of a shop window", "by a store display window"),
        "a shop window",
        False,
        "in front of a glass shop window with metal frames and reflections",
    ),
    "street": ContextWords(
        ("on a street", "on a sidewalk by the road"),
        "a city street",
        False,
        "on a sidewalk by a road with a dashed line, buildings in the distance",
    ),
    "tiled wall": ContextWords(
        ("in front of a tiled wall", "by a wall of tiles"),
        "a tiled wall",
        False,
        "in front of a wall covered in small glossy tiles",
    ),
}
require_entries(CONTEXT_WORDS, CONTEXTS, "captions.CONTEXT_WORDS")


@dataclass(frozen=True)
class PoseWords:
    ing: str  # "a person {ing} ..."
    verb: str  # "the person {verb} ..."
    person: str  # "... is behind {person}"


POSE_WORDS: dict[str, PoseWords] = {
    "standing": PoseWords("standing", "stands", "a standing person"),
    "walking": PoseWords("walking", "walks", "a walking person"),
    "arms raised": PoseWords("standing with raised arms", "raises both arms", "a person with raised arms"),
    "hands on hips": PoseWords("posing with hands on hips", "poses with hands on hips", "a person with hands on hips"),
}
require_entries(POSE_WORDS, POSES, "captions.POSE_WORDS")

PLURAL_CATEGORIES = frozenset({"trousers", "shorts"})

# Training templates and their weights. {g}: garment phrase with its article, {pose}: PoseWords.ing,
# {place}: one of ContextWords.places. Weighted towards full descriptions.
# Weights: 50% name garment and place, 40% the garment only, 10% the place only. The garment-only share is high on
# purpose: in a caption that names the place, the context (14 kinds, read within a few hundred steps) tells almost
# every in-batch negative apart, so category and pattern teach the contrastive loss little; without the place,
# ~1 in 10 negatives shares the colour and only category or pattern tell them apart. Measured (ResNet CLIP, 1000
# steps x 64 pairs): held-out zero-shot category 0.43 -> 0.69 and pattern 0.34 -> 0.61 against the earlier
# weights (30/20/15/10 with place, 10/5 garment only, 10 place only), context 1.00 and colour 0.90 -> 0.95.
CAPTION_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("a person wearing {g} {pose} {place}.", 0.2),
    ("a photo of a person in {g} {place}.", 0.1),
    ("a person in {g} {pose} {place}.", 0.1),
    ("{g} on a person {place}.", 0.1),
    ("a person wearing {g}.", 0.2),
    ("a photo of {g}.", 0.2),
    ("a person {pose} {place}.", 0.1),
)
# How much of the garment a training caption names: (colour, pattern) kept, with weights.
GARMENT_PARTS: tuple[tuple[tuple[bool, bool], float], ...] = (
    ((True, True), 0.8),
    ((True, False), 0.1),
    ((False, True), 0.05),
    ((False, False), 0.05),
)
CONTEXT_TEMPLATES: tuple[str, ...] = (
    "a person {pose} {place}.",
    "the person {verb} {place}.",
    "{noun} {be} behind {person}.",
)


def garment_phrase(category: str, colour: str | None, pattern: str | None) -> str:
    """'a red striped dress', 'a plain orange top' -> 'a plain orange top', 'striped trousers', 'a dress'."""
    if pattern == "plain":
        words = ["plain", colour] if colour else ["plain"]
    else:
        words = [w for w in (colour, pattern) if w]
    phrase = " ".join([*words, category])
    if category in PLURAL_CATEGORIES:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# Details in words: where a trim band runs -> its noun phrase; where an emblem sits -> its preposition phrase.
TRIM_WORDS: dict[str, str] = {"hem": "hem", "collar": "collar", "cuffs": "cuffs", "waist": "waistband"}
EMBLEM_SPOT_WORDS: dict[str, str] = {"left": "on the left", "centre": "in the centre", "right": "on the right"}


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def detail_phrase(details: Details) -> str:
    """'with a white collar and a yellow circle on the left', 'with blue cuffs', '' for a garment without details."""
    parts = []
    if details.trim:
        noun = f"{details.trim_colour} {TRIM_WORDS[details.trim]}"
        parts.append(noun if details.trim == "cuffs" else _a(noun))
    if details.emblem:
        parts.append(f"{_a(f'{details.emblem_colour} {details.emblem}')} {EMBLEM_SPOT_WORDS[details.emblem_at]}")
    return f"with {' and '.join(parts)}" if parts else ""


def detail_negative(
    text: str,
    details: Details,
    colour: str,
    rng: np.random.Generator,
    world: WorldConfig,
    category: str | None = None,
    changeable: tuple[str, ...] = ("trim_colour", "emblem"),
) -> tuple[str, Details] | None:
    """A hard negative for the CLIP's training: (TEXT with one of the details it names changed, the changed details),
    so that only the details tell it from TEXT; None when TEXT names none. CHANGEABLE: the fields of Details
    (garments.DETAIL_FIELDS) that may change, one drawn uniformly among those the garment has; where the trim runs
    ("trim") needs the garment's CATEGORY. NegCLIP's targeted negative captions (Yuksekgonul et al. 2023, "When and
    why vision-language models behave like bags-of-words", Fig. 3); with the changed details rendered, TripletCLIP's
    negative image for it too (Patel et al. 2024; train_clip's detail_twins), for words a random batch never needs
    (README)."""
    unknown = set(changeable) - set(DETAIL_FIELDS)
    if unknown:
        raise ValueError(f"unknown detail fields {sorted(unknown)}; known: {DETAIL_FIELDS}")
    phrase = detail_phrase(details)
    if not phrase or phrase not in text:
        return None
    options: dict[str, list] = {}  # field -> the values it may change to, in DETAIL_FIELDS order
    if details.trim:
        if category is not None:
            options["trim"] = [t for t in GARMENTS[category].trims if t != details.trim]
        options["trim_colour"] = [c for c in detail_colours(world, colour) if c != details.trim_colour]
    if details.emblem:
        options["emblem"] = [e for e in world.emblems if e != details.emblem]
        options["emblem_at"] = [a for a in EMBLEM_SPOTS if a != details.emblem_at]
        options["emblem_colour"] = [c for c in detail_colours(world, colour) if c != details.emblem_colour]
    if "trim" in changeable and details.trim and category is None:
        raise ValueError("changing where the trim runs needs the garment's category")
    changes = [
        replace(details, **{f: str(rng.choice(values))}) for f, values in options.items() if f in changeable and values
    ]
    if not changes:
        return None
    changed = changes[int(rng.integers(len(changes)))]
    return text.replace(phrase, detail_phrase(changed)), changed


def _choice(rng: np.random.Generator, weighted):
    weights = np.array([w for _, w in weighted], dtype=float)
    return weighted[int(rng.choice(len(weighted), p=weights / weights.sum()))][0]


@lru_cache(maxsize=16)  # called once per training caption
def garment_templates(share: float | None) -> tuple[tuple[str, float], ...]:
    """CAPTION_TEMPLATES reweighted so that a caption names the garment with probability SHARE (None: as written,
    0.9). Web captions of photos of people seldom describe the clothes; a lower share is a calibration lever of
    issue #13, section 4 (README, "Calibration on the baselines")."""
    if share is None:
        return CAPTION_TEMPLATES
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"garment caption share must be in [0, 1], got {share}")
    with_g = sum(w for t, w in CAPTION_TEMPLATES if "{g}" in t)
    without = sum(w for t, w in CAPTION_TEMPLATES if "{g}" not in t)
    return tuple((t, w * share / with_g if "{g}" in t else w * (1 - share) / without) for t, w in CAPTION_TEMPLATES)


def caption(
    scene: Scene, rng: np.random.Generator, detail_share: float = 0.0, garment_share: float | None = None
) -> str:
    """A training caption of the scene's words (never its concept); with probability DETAIL_SHARE its garment
    phrase also names the details (`detail_phrase`). With DETAIL_SHARE 0 no extra random draw is made, so the
    stream of captions is the one the committed models were trained on. GARMENT_SHARE: the probability that the
    caption names the garment at all (`garment_templates`; None: the grammar's 0.9), the same number of draws."""
    template = _choice(rng, garment_templates(garment_share))
    with_colour, with_pattern = _choice(rng, GARMENT_PARTS)
    places = CONTEXT_WORDS[scene.context].places
    place = places[int(rng.integers(len(places)))]
    g = garment_phrase(scene.category, scene.colour if with_colour else None, scene.pattern if with_pattern else None)
    if detail_share > 0 and rng.random() < detail_share and (details := detail_phrase(scene.details)):
        g = f"{g} {details}"
    return template.format(g=g, pose=POSE_WORDS[scene.pose].ing, place=place)


def context_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A PerVL-style evaluation caption: the person's context and pose, never the garment; always says 'person'."""
    words, pose = CONTEXT_WORDS[scene.context], POSE_WORDS[scene.pose]
    template = CONTEXT_TEMPLATES[int(rng.integers(len(CONTEXT_TEMPLATES)))]
    place = words.places[int(rng.integers(len(words.places)))]
    return template.format(
        pose=pose.ing,
        verb=pose.verb,
        place=place,
        noun=words.noun,
        be="are" if words.plural else "is",
        person=pose.person,
    )


def short_caption(scene: Scene) -> str:
    """The shortened_ variant: where the person is, nothing else."""
    return f"a person {CONTEXT_WORDS[scene.context].places[0]}."


def detailed_caption(scene: Scene) -> str:
    """The detailed_ variant: pose and a fuller description of the context."""
    return f"a person {POSE_WORDS[scene.pose].ing} {CONTEXT_WORDS[scene.context].detailed}."
