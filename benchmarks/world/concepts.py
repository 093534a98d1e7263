"""Concepts: specific garments, drawn in groups that share their words, so only unnamed details tell them apart.

As with DeepFashion2 products, "a red striped dress" is not one concept: each group of 2-3 concepts shares one
(category, colour, pattern) triple and differs in its details (trim band, emblem), which are the hard
negatives of the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.world.config import WorldConfig
from benchmarks.world.garments import Details, sample_details

CONCEPT_DETAIL_PROBABILITY = 0.8  # chance of a trim band, and of an emblem, on a concept (at least one is kept)


@dataclass(frozen=True)
class Concept:
    pair_id: str  # PerVL id: a decimal integer, as in the annotation files
    category: str  # garment category word
    colour: str  # main colour word
    pattern: str  # pattern word
    details: Details  # what only images show

    @property
    def words(self) -> tuple[str, str, str]:
        return self.category, self.colour, self.pattern


def group_sizes(rng: np.random.Generator, n: int, smallest: int, largest: int) -> list[int]:
    """Split n concepts into groups of smallest..largest (the last group may grow past largest when n forces it)."""
    sizes, left = [], n
    while left > 0:
        size = min(int(rng.integers(smallest, largest + 1)), left)
        if 0 < left - size < smallest:
            size = left - smallest if left - smallest >= smallest else left
        sizes.append(size)
        left -= size
    return sizes


def draw_concepts(rng: np.random.Generator, config: WorldConfig, n: int, first_id: int) -> list[Concept]:
    """n concepts with pair_ids first_id, first_id + 1, ...; consecutive concepts of one group share their words."""
    triples = [(c, k, p) for c in config.categories for k in config.colour_names for p in config.patterns]
    order = rng.permutation(len(triples))
    concepts: list[Concept] = []
    for g, size in enumerate(group_sizes(rng, n, *config.group_sizes)):
        category, colour, pattern = triples[order[g % len(triples)]]  # distinct triples until all are used
        group: list[Details] = []
        fewest, most = config.detail_differences
        for _ in range(10_000):
            if len(group) == size:
                break
            details = sample_details(rng, config, category, colour, CONCEPT_DETAIL_PROBABILITY)
            if details.trim is None and details.emblem is None:
                continue
            if all(fewest <= details.differences(other) <= most for other in group):
                group.append(details)
        if len(group) < size:
            raise ValueError(
                f"cannot draw {size} {colour} {pattern} {category} concepts that differ pairwise in "
                f"{fewest}-{most} details; add colours or emblems, widen detail_differences, or lower group_sizes"
            )
        for details in group:
            concepts.append(Concept(str(first_id + len(concepts)), category, colour, pattern, details))
    return concepts
