"""Zero-shot evaluation in the toy world: does a CLIP read a scene's words (context, category, colour, pattern)?

Used to judge the toy world's CLIP (`train_clip`) and, with the same API, images a diffusion model generates.

Prompts are CLIP-style ensembles (Radford et al. 2021, Sec. 3.1.4) written in the training captions' own
grammar (`benchmarks.world.captions`), since a model trained only on that grammar knows no other words:
- context:  "a person {pose} {place}."           over the 4 poses and the context's 2 place phrases (8 prompts);
- category: "a person wearing {garment}."        the bare category and over every colour x pattern (41 prompts);
- colour:   "a person wearing {garment}."        over every category x pattern (32 prompts);
- pattern:  "a person wearing {garment}."        over every category x colour (80 prompts);
{garment} is `garment_phrase` ("a red striped dress", "a plain red dress", "striped trousers"). A word's class
vector is the normalised mean of its prompts' normalised text features; an image gets the word of highest cosine.
`factor_prompts` gives one canonical prompt per word (the first of its ensemble), e.g. for generating images.

Detail factors (issue #13, section 3), read only where a scene has the detail, in `detail_phrase`'s words:
- trim_colour: "a person wearing {category} with a {colour} {trim}."  over every category x its trims;
- emblem:      "a person wearing {category} with a {colour} {emblem} {spot}."  over every category x spot x colour.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from benchmarks.world.captions import CONTEXT_WORDS, POSE_WORDS, detail_phrase, garment_phrase
from benchmarks.world.config import WorldConfig
from benchmarks.world.garments import DETAIL_FIELDS, EMBLEM_SPOTS, GARMENTS, Details
from benchmarks.world.render import render_scene
from benchmarks.world.scene import Scene, sample_scene

FACTORS = ("context", "category", "colour", "pattern")
DETAIL_FACTORS = ("trim_colour", "emblem")  # read from scene.details; scored on the scenes that have them
# Held-out scenes come from np.random.default_rng(HELD_OUT_SEED); training pairs from default_rng([seed, chunk])
# (train_clip.render_pairs), a different stream for every integer seed.
HELD_OUT_SEED = 1_000_003


def _words(factor: str, config: WorldConfig) -> tuple[str, ...]:
    vocab = {
        "context": config.contexts,
        "category": config.categories,
        "colour": config.colour_names,
        "pattern": config.patterns,
        "trim_colour": config.colour_names,
        "emblem": config.emblems,
    }
    if factor not in vocab:
        raise ValueError(f"unknown factor {factor!r}; known: {FACTORS + DETAIL_FACTORS}")
    return tuple(vocab[factor])


def factor_prompt_sets(factor: str, config: WorldConfig) -> dict[str, list[str]]:
    """word -> its prompt ensemble (see the module docstring); the first prompt is the canonical one."""
    words = _words(factor, config)
    if factor == "context":
        poses = [POSE_WORDS[p].ing for p in config.poses]
        return {c: [f"a person {pose} {place}." for place in CONTEXT_WORDS[c].places for pose in poses] for c in words}
    if factor == "category":
        return {
            c: [f"a person wearing {garment_phrase(c, None, None)}."]
            + [
                f"a person wearing {garment_phrase(c, col, pat)}."
                for col in config.colour_names
                for pat in config.patterns
            ]
            for c in words
        }
    if factor == "trim_colour":
        return {
            col: [
                f"a person wearing {garment_phrase(cat, None, None)} {detail_phrase(Details(trim, col))}."
                for cat in config.categories
                for trim in GARMENTS[cat].trims
            ]
            for col in words
        }
    if factor == "emblem":
        return {
            e: [
                f"a person wearing {garment_phrase(cat, None, None)} "
                f"{detail_phrase(Details(emblem=e, emblem_at=spot, emblem_colour=col))}."
                for cat in config.categories
                for spot in EMBLEM_SPOTS
                for col in config.colour_names
            ]
            for e in words
        }
    if factor == "colour":
        return {
            col: [
                f"a person wearing {garment_phrase(cat, col, pat)}."
                for cat in config.categories
                for pat in config.patterns
            ]
            for col in words
        }
    return {
        pat: [
            f"a person wearing {garment_phrase(cat, col, pat)}."
            for cat in config.categories
            for col in config.colour_names
        ]
        for pat in words
    }


def factor_prompts(factor: str, config: WorldConfig) -> dict[str, str]:
    """word -> one canonical prompt, e.g. "a person standing in front of a brick wall."."""
    return {word: prompts[0] for word, prompts in factor_prompt_sets(factor, config).items()}


def class_vectors(encoder, factor: str, config: WorldConfig) -> tuple[list[str], np.ndarray]:
    """(words, (n_words, dim) float32): each word's normalised mean prompt feature."""
    sets = factor_prompt_sets(factor, config)
    words = list(sets)
    flat = [p for w in words for p in sets[w]]
    feats = encoder.encode_texts(flat)  # (n_prompts, dim), normalised
    vectors, start = [], 0
    for w in words:
        mean = feats[start : start + len(sets[w])].mean(0)
        vectors.append(mean / np.linalg.norm(mean))
        start += len(sets[w])
    return words, np.stack(vectors).astype(np.float32)


def _predict(image_features: np.ndarray, encoder, factor: str, config: WorldConfig) -> list[str]:
    words, vectors = class_vectors(encoder, factor, config)
    return [words[i] for i in (image_features @ vectors.T).argmax(1)]  # (n_images,) argmax cosine


def classify(encoder, images: Sequence[Image.Image], factor: str, config: WorldConfig) -> list[str]:
    """Zero-shot: each image's word for FACTOR (argmax cosine over the factor's class vectors)."""
    return _predict(encoder.encode_pil(list(images)), encoder, factor, config)


def zero_shot_report(
    encoder,
    images: Sequence[Image.Image],
    scenes: Sequence[Scene],
    config: WorldConfig,
    factors: Sequence[str] = FACTORS,
) -> dict[str, float]:
    """Accuracy per factor of zero-shot classification of IMAGES against their SCENES' words. A detail factor
    (DETAIL_FACTORS) is scored on the scenes that have that detail only (NaN when none has)."""
    if len(images) != len(scenes) or not scenes:
        raise ValueError(f"need one scene per image and at least one: got {len(images)} images, {len(scenes)} scenes")
    image_features = encoder.encode_pil(list(images))  # (n, dim), encoded once for all factors
    report = {}
    for factor in factors:
        truth = [factor_value(s, factor) for s in scenes]
        rows = [i for i, t in enumerate(truth) if t is not None]
        predicted = _predict(image_features[rows], encoder, factor, config) if rows else []
        report[factor] = float(np.mean([p == truth[i] for p, i in zip(predicted, rows)])) if rows else float("nan")
    return report


def factor_value(scene: Scene, factor: str) -> str | None:
    """The scene's word for FACTOR: a field of its garment's details (garments.DETAIL_FIELDS, among them
    DETAIL_FACTORS; None: no such detail), any other from the scene itself."""
    return getattr(scene.details, factor) if factor in DETAIL_FIELDS else getattr(scene, factor)


def held_out_scenes(config: WorldConfig, n: int, seed: int = HELD_OUT_SEED) -> list[Scene]:
    """N random scenes from a stream no training pair is drawn from (see HELD_OUT_SEED)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, config) for _ in range(n)]


def detailed_scenes(config: WorldConfig, n: int, seed: int) -> list[Scene]:
    """The first N scenes of the stream SEED whose garment has both a trim and an emblem (the detail probes)."""
    out, rng = [], np.random.default_rng(seed)
    while len(out) < n:
        scene = sample_scene(rng, config)
        if scene.details.trim and scene.details.emblem:
            out.append(scene)
    return out


def render_scenes(scenes: Sequence[Scene], config: WorldConfig) -> list[Image.Image]:
    return [render_scene(s, config) for s in scenes]
