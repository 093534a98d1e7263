"""The names the toy world knows: every context, category, pattern, pose and emblem it can both draw and say.

A leaf that the world's other modules import, so the dependency runs one way: `config` checks a WorldConfig's
names against these tuples, and each module holding one entry per name (the painters in `contexts`, the
silhouettes in `garments`, pose angles and emblem drawers in `render`, the caption words in `captions`) checks
on import that it covers them (`require_entries`). Adding a name here without its entries fails at import.
Colours are free (name, RGB) pairs of the config and are not listed here.
"""

from __future__ import annotations

from collections.abc import Mapping

CONTEXTS: tuple[str, ...] = (
    "brick wall",
    "cabinets",
    "railing",
    "trees",
    "beach",
    "couch",
    "marble floor",
    "shelves",
    "water",
    "grass",
    "curtains",
    "shop window",
    "street",
    "tiled wall",
)
CATEGORIES: tuple[str, ...] = ("dress", "skirt", "top", "sweater", "vest", "coat", "trousers", "shorts")
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checked")
POSES: tuple[str, ...] = ("standing", "walking", "arms raised", "hands on hips")
EMBLEMS: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")

# WorldConfig field -> every name it may hold
NAMES: dict[str, tuple[str, ...]] = {
    "contexts": CONTEXTS,
    "categories": CATEGORIES,
    "patterns": PATTERNS,
    "poses": POSES,
    "emblems": EMBLEMS,
}


def require_entries(table: Mapping[str, object], names: tuple[str, ...], what: str) -> None:
    """Raise unless TABLE has one entry per name of NAMES and no other (WHAT names the table in the message)."""
    missing, unknown = sorted(set(names) - set(table)), sorted(set(table) - set(names))
    if missing or unknown:
        raise ValueError(
            f"{what} must have one entry per name of benchmarks.world.vocabulary: missing {missing}, "
            f"not in the vocabulary {unknown}; add the entries or the names"
        )
