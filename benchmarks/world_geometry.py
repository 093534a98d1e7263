"""Geometry of the world CLIP's embedding space, beside published figures for real CLIP (issue #13, section 4).

    python -m benchmarks.world_geometry [--world-seed N] [--n 256] [--concepts 16] [--model toyworld] [--json]

Every embedding is L2-normalised, so a cosine is a dot product. What each number is:

  modality gap            ||mean f(x_i) - mean g(t_i)|| over N random (scene, training caption) pairs, f and g
                          normalised first: the distance between the image and the text centroids (Liang et al.
                          2022, "Mind the Gap", Sec. 4.2). 0 = the centroids meet; at most 2.
  matching caption-image  mean cos(f(x_i), g(t_i)): an image and its own caption (CLIPScore's raw quantity).
  non-matching            mean cos(f(x_i), g(t_j)), i != j: an image and another scene's caption. Both scenes are
                          random, so they share a word now and then (1 in 14 share the context).
  same concept, other     mean cos(f(x_a), f(x_b)) over pairs of images of one concept (the test split's few-shot
    context               and evaluation images) whose contexts differ: what a concept's own images share.
  unrelated images        mean cos(f(x_i), f(x_j)), i != j, over the N random scenes (the cone, Liang Sec. 2.1).
  unrelated texts         mean cos(g(t_i), g(t_j)), i != j, over their N captions.
  held-out image vs       for each evaluation image of a concept: its cosine to the `text` baseline's query (its
    parent-word text      PerVL caption with the parent word, "a person wearing a dress with raised arms."; as
                          benchmarks/pervl.py builds it),
    vs mean of shots      to unit(mean f(shots)) of its own concept (the `shots` few-shot images pervl.py draws for
                          seed 0, in contexts the evaluation image is not in),
    vs text + avg image   to the `text+image` baseline's query unit(g(text) + unit(mean f(shots))),
    vs a look-alike's     to unit(mean f(shots)) of another concept of its group (same category, colour and pattern,
      shots               other unnamed details): the hard negative the mean-of-shots query must beat.

Below the table, whether the CLIP sees the concepts' unnamed details at all (issue #13, section 3), on held-out scenes
whose garment has both a trim and an emblem:
  linear probe            held-out accuracy of a ridge least-squares read-out of each factor (every field of the
                          details: where the trim runs and its colour, the emblem's shape, spot and colour; then the
                          garment's colour and category) from the image embeddings: 2/3 of the images fit it, 1/3
                          test it; chance is the tested third's majority class. What the image embedding carries,
                          whatever the text tower knows.
  detail-swap cosine      mean cos(g(t), g(t')) where t' is t with one named detail changed (captions.detail_negative),
                          beside t' with the garment's colour changed instead: 1.000 = the text tower ignores it.

Each cosine is reported as mean, standard deviation and the number of pairs. Beside each number: the published
figure for CLIP ViT-B/32 and ViT-L/14 where a source was found and read (PUBLISHED in this file, each with its
paper, section and figure), otherwise "not found". The published figures are on MSCOCO photographs and captions; ours on the toy world's rendered scenes.

Reproducible: the split's concepts are drawn from --world-seed (as `benchmarks.world.split.plan_split` draws them),
the random pairs from numpy's default_rng([GEOMETRY_SEED, world seed]), a stream no training pair is drawn from.
Images are embedded as rendered (no JPEG round trip, unlike the written split the pervl benchmark reads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from benchmarks.pervl import sample_shots
from benchmarks.world import plan_split, render_scene, sample_training_pair, trained_world, world_config
from benchmarks.world.captions import detail_negative, detail_phrase, garment_phrase
from benchmarks.world.evaluate import HELD_OUT_SEED, detailed_scenes, factor_value, render_scenes
from benchmarks.world.garments import DETAIL_FIELDS, detail_colours
from retrieval.composed import insert_concept
from retrieval.models.encoders import ClipEncoder

# HELD_OUT_SEED (+1: the trainer's final evaluation, +2: tests/test_toyworld_clip.py); training pairs use integer seeds
GEOMETRY_SEED = HELD_OUT_SEED + 3


@dataclass(frozen=True)
class GeometryConfig:
    model: str = "toyworld"  # CLIP spec (retrieval.models: a preset, ARCH/PRETRAINED or a folder)
    world_seed: int = 0  # WorldConfig.seed: draws the split's concepts, and with GEOMETRY_SEED the random pairs
    world_preset: str | None = None  # benchmarks.world.config.PRESETS; None: the one the CLIP was trained in
    n_pairs: int = 256  # random (scene, training caption) pairs
    n_concepts: int = 16  # the test split's first concepts (all of their few-shot and evaluation images)
    shots: int = 5  # few-shot images per concept behind the mean-of-shots query (pervl.py's default)
    probe_scenes: int = 600  # held-out scenes (with a trim and an emblem) behind the detail probe
    device: str = "cpu"


# ----- the statistics: pure functions on (n, d) arrays
def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to norm 1, in float64."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a zero vector has no direction; every row must be non-zero")
    return x / norms


def modality_gap(images: np.ndarray, texts: np.ndarray) -> float:
    """||mean of unit image rows - mean of unit text rows|| (Liang et al. 2022, Sec. 4.2)."""
    return float(np.linalg.norm(unit(images).mean(0) - unit(texts).mean(0)))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) cos(a_i, b_i) of two (n, d) arrays."""
    if a.shape != b.shape:
        raise ValueError(f"row_cosines needs two arrays of one shape, got {a.shape} and {b.shape}")
    return (unit(a) * unit(b)).sum(-1)


def off_diagonal_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n * (n - 1),) cos(a_i, b_j) for every i != j; for a is b, each unordered pair appears twice."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two arrays of one length >= 2, got {len(a)} and {len(b)} rows")
    sim = unit(a) @ unit(b).T  # (n, n)
    return sim[~np.eye(len(a), dtype=bool)]


@dataclass(frozen=True)
class ConceptFeatures:
    """One concept's embedded images, as the baselines see them."""

    words: tuple[str, str, str]  # (category, colour, pattern): concepts of one group share them
    shots: np.ndarray  # (k, d) few-shot image features: the mean-of-shots query
    shot_contexts: tuple[str, ...]  # (k,)
    others: np.ndarray  # (m, d) the concept's remaining few-shot images (only for the same-concept pairs)
    other_contexts: tuple[str, ...]  # (m,)
    queries: np.ndarray  # (q, d) evaluation image features, in contexts no few-shot image shows
    query_contexts: tuple[str, ...]  # (q,)
    query_texts: np.ndarray  # (q, d) the `text` baseline's query for each evaluation image


def same_concept_cosines(concept: ConceptFeatures) -> np.ndarray:
    """cos of every unordered pair of the concept's images (shots, other shots, evaluation images) in two
    different contexts."""
    feats = unit(np.concatenate([concept.shots, concept.others, concept.queries]))  # (k + m + q, d)
    contexts = np.array([*concept.shot_contexts, *concept.other_contexts, *concept.query_contexts])
    if len(contexts) != len(feats):
        raise ValueError(f"{len(feats)} images but {len(contexts)} contexts: give one context per image")
    i, j = np.triu_indices(len(feats), k=1)
    keep = contexts[i] != contexts[j]
    return (feats[i[keep]] * feats[j[keep]]).sum(-1)


def shot_mean(concept: ConceptFeatures) -> np.ndarray:
    """(d,) unit(mean of the unit shot features): the `text+image` baseline's image part (pervl.py)."""
    return unit(unit(concept.shots).mean(0, keepdims=True))[0]


def held_out_cosines(concepts: Sequence[ConceptFeatures]) -> dict[str, np.ndarray]:
    """Per evaluation image: cosine to its parent-word text, its concept's shot mean, the text+image query, and
    (one value per look-alike) the shot means of the other concepts with the same words."""
    out: dict[str, list[np.ndarray]] = {"parent_text": [], "shot_mean": [], "text_plus_shots": [], "lookalike": []}
    means = [shot_mean(c) for c in concepts]
    for c, mean in zip(concepts, means):
        q = unit(c.queries)  # (q, d)
        text = unit(c.query_texts)  # (q, d)
        out["parent_text"].append((q * text).sum(-1))
        out["shot_mean"].append(q @ mean)
        out["text_plus_shots"].append((q * unit(text + mean)).sum(-1))
        for other, other_mean in zip(concepts, means):
            if other is not c and other.words == c.words:
                out["lookalike"].append(q @ other_mean)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def summary(values: np.ndarray) -> dict:
    """{"value": mean, "sd": standard deviation, "n": count}; None where there are no values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"value": None, "sd": None, "n": 0}
    return {"value": float(v.mean()), "sd": float(v.std()), "n": int(v.size)}


def geometry(images: np.ndarray, texts: np.ndarray, concepts: Sequence[ConceptFeatures]) -> dict[str, dict]:
    """Every statistic of STATISTICS from N paired image/caption features (row i of each is one pair) and the
    concepts' features. Off-diagonal means count each ordered pair (i, j), i != j, once."""
    held = held_out_cosines(concepts)
    image_pairs = off_diagonal_cosines(images, images)
    text_pairs = off_diagonal_cosines(texts, texts)
    return {
        "modality_gap": {"value": modality_gap(images, texts), "sd": None, "n": len(images)},
        "matching_pair": summary(row_cosines(images, texts)),
        "non_matching_pair": summary(off_diagonal_cosines(images, texts)),
        "same_concept_other_context": summary(np.concatenate([same_concept_cosines(c) for c in concepts])),
        "unrelated_images": {**summary(image_pairs), "n": len(image_pairs) // 2},  # unordered pairs
        "unrelated_texts": {**summary(text_pairs), "n": len(text_pairs) // 2},
        "held_out_vs_parent_text": summary(held["parent_text"]),
        "held_out_vs_shot_mean": summary(held["shot_mean"]),
        "held_out_vs_text_plus_shots": summary(held["text_plus_shots"]),
        "held_out_vs_lookalike_shot_mean": summary(held["lookalike"]),
    }


# ----- does the CLIP see the unnamed details? (section 3)
# every field of the details (where the trim runs, its colour; the emblem's shape, spot and colour: look-alike
# concepts differ in two of them), then the garment's colour and category as controls
PROBE_FACTORS = (*DETAIL_FIELDS, "colour", "category")
PROBE_FIT_SHARE = 2 / 3  # of the probe's rows fit the read-out, the rest test it


def linear_probe(features: np.ndarray, labels: Sequence[str], fit_share: float = 2 / 3, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a ridge least-squares read-out (one-hot targets) of LABELS from FEATURES (n, d), fitted
    on the first FIT_SHARE of the rows and tested on the rest."""
    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    x = np.asarray(features, dtype=np.float64)
    n = int(len(y) * fit_share)
    if n < 1 or n >= len(y):
        raise ValueError(f"need rows both to fit and to test the probe, got {len(y)} rows")
    w = np.linalg.solve(x[:n].T @ x[:n] + ridge * np.eye(x.shape[1]), x[:n].T @ np.eye(len(classes))[y[:n]])
    return float(((x[n:] @ w).argmax(1) == y[n:]).mean())


def detail_probe(encoder: ClipEncoder, world, n_scenes: int = 600) -> dict:
    """{"probe": {factor: {"accuracy", "chance"}}, "detail_swap": summary, "colour_swap": summary, "scenes": n}
    on held-out scenes (GEOMETRY_SEED's stream) whose garment has a trim and an emblem."""
    scenes, rng = detailed_scenes(world, n_scenes, GEOMETRY_SEED), np.random.default_rng([GEOMETRY_SEED, 1])
    features = encoder.encode_pil(render_scenes(scenes, world))
    probe = {}
    for factor in PROBE_FACTORS:
        labels = [factor_value(s, factor) for s in scenes]
        tested = labels[int(len(labels) * PROBE_FIT_SHARE) :]
        probe[factor] = {
            "accuracy": linear_probe(features, labels, PROBE_FIT_SHARE),
            "chance": max(Counter(tested).values()) / len(tested),  # always naming the tested rows' majority class
        }
    texts, detail_swaps, colour_swaps = [], [], []
    for s in scenes[:128]:
        text = f"a person wearing {garment_phrase(s.category, s.colour, s.pattern)} {detail_phrase(s.details)}."
        other = str(rng.choice([c for c in detail_colours(world, s.colour) if c != s.colour]))
        texts.append(text)
        detail_swaps.append(detail_negative(text, s.details, s.colour, rng, world)[0])
        colour_swaps.append(
            text.replace(garment_phrase(s.category, s.colour, s.pattern), garment_phrase(s.category, other, s.pattern))
        )
    t, d, c = (encoder.encode_texts(x) for x in (texts, detail_swaps, colour_swaps))
    return {
        "probe": probe,
        "detail_swap": summary(row_cosines(t, d)),
        "colour_swap": summary(row_cosines(t, c)),
        "scenes": len(scenes),
    }


# ----- what each number is called, and what real CLIP measures (only figures whose source was read)
STATISTICS: dict[str, str] = {
    "modality_gap": "modality gap ‖mean image − mean text‖",
    "matching_pair": "cos, matching caption-image pair",
    "non_matching_pair": "cos, non-matching caption-image pair",
    "same_concept_other_context": "cos, two images of one concept, different contexts",
    "unrelated_images": "cos, unrelated images",
    "unrelated_texts": "cos, unrelated texts",
    "held_out_vs_parent_text": "cos, held-out image vs parent-word text (`text` query)",
    "held_out_vs_shot_mean": "cos, held-out image vs mean of its concept's shots",
    "held_out_vs_text_plus_shots": "cos, held-out image vs `text+image` query",
    "held_out_vs_lookalike_shot_mean": "cos, held-out image vs mean of a look-alike concept's shots",
}
MODELS = ("ViT-B/32", "ViT-L/14")


@dataclass(frozen=True)
class Published:
    value: str  # as the source states it
    source: str  # paper, section / table / figure, and what it was measured on


LIANG = "Liang et al. 2022, Mind the Gap (NeurIPS)"
HESSEL = "Hessel et al. 2021, CLIPScore (EMNLP)"
PUBLISHED: dict[str, dict[str, Published]] = {
    "modality_gap": {
        "ViT-B/32": Published(
            "0.82",
            f"{LIANG}, Sec. 4.2 and Fig. 3: 5,000 MSCOCO val image-caption pairs; Sec. 5.2 shifts this gap "
            "'from 0.82 to 0.97' on CLIP ViT-B/32",
        ),
    },
    "matching_pair": {
        "ViT-B/32": Published(
            "≈0 to ≈0.4 (range; no mean given)",
            f"{HESSEL}, Sec. 3 footnote 6 and App. B, Fig. 4: 'we generally observe values ranging from roughly "
            "zero to roughly .4', never negative; hence w = 2.5. App. B: the rescaling 'only appl[ies] to CLIP "
            "ViT-B/32'",
        ),
    },
    "unrelated_images": {
        "ViT-B/32": Published(
            "0.47†",
            f"{LIANG}, Sec. 2.1 and Fig. 2(a): mean over all pairs of 5,000 MSCOCO val images (min 0.05)",
        ),
    },
    "unrelated_texts": {
        "ViT-B/32": Published(
            "0.51†",
            f"{LIANG}, Sec. 2.1 and Fig. 2(a): mean over all pairs of 5,000 MSCOCO val captions (min 0.01)",
        ),
    },
}
FOOTNOTE = (
    "† Liang et al. Sec. 2.1 take the 'Vision Transformer and Text Transformer from pre-trained CLIP' without "
    "naming the variant; ViT-B/32 is the CLIP of their Sec. 5.2 and of the 0.82 gap."
)


# ----- the measurement
def embed_world(config: GeometryConfig, encoder: ClipEncoder) -> tuple[np.ndarray, np.ndarray, list[ConceptFeatures]]:
    """(images (N, d), captions (N, d), concepts): the world's scenes rendered and embedded (config.world_preset
    resolved, as `measure` does)."""
    world = world_config(config.world_preset, seed=config.world_seed)
    # 1. random (scene, training caption) pairs, from a stream of their own
    rng = np.random.default_rng([GEOMETRY_SEED, config.world_seed])
    pairs = [sample_training_pair(rng, world) for _ in range(config.n_pairs)]
    images = encoder.encode_pil([im for im, _ in pairs])  # (N, d)
    texts = encoder.encode_texts([t for _, t in pairs])  # (N, d)
    # 2. the test split's first concepts: few-shot and evaluation images, and the `text` baseline's queries
    plan = plan_split(world, "test")
    concepts = []
    for concept in plan.concepts[: config.n_concepts]:
        fsl = plan.fsl[concept.pair_id]
        chosen = set(sample_shots([p.name for p in fsl], config.shots, seed=0, pair_id=concept.pair_id))
        shots = [p for p in fsl if p.name in chosen]
        others = [p for p in fsl if p.name not in chosen]
        queries = [q for q in plan.queries if q.scene.concept == concept.pair_id]
        feats = encoder.encode_pil([render_scene(p.scene, world) for p in shots + others + queries])
        k, m = len(shots), len(others)
        concepts.append(
            ConceptFeatures(
                words=concept.words,
                shots=feats[:k],
                shot_contexts=tuple(p.scene.context for p in shots),
                others=feats[k : k + m],
                other_contexts=tuple(p.scene.context for p in others),
                queries=feats[k + m :],
                query_contexts=tuple(q.scene.context for q in queries),
                query_texts=encoder.encode_texts([insert_concept(q.caption, concept.category) for q in queries]),
            )
        )
    return images, texts, concepts


def measure(config: GeometryConfig, encoder: ClipEncoder | None = None) -> dict:
    """{"config", "statistics": {key: {"value", "sd", "n"}}, "images", "seconds"}; loads config.model unless given
    an encoder."""
    if config.n_pairs < 2 or config.n_concepts < 1 or config.shots < 1 or config.probe_scenes < 3:
        raise ValueError(
            f"need n_pairs >= 2, n_concepts >= 1, shots >= 1 and probe_scenes >= 3, got {config.n_pairs}, "
            f"{config.n_concepts}, {config.shots}, {config.probe_scenes}"
        )
    start = time.perf_counter()
    config = replace(config, world_preset=config.world_preset or trained_world(config.model))  # named in the report
    encoder = encoder or ClipEncoder.from_spec(config.model, device=config.device, precision="fp32")
    images, texts, concepts = embed_world(config, encoder)
    details = detail_probe(encoder, world_config(config.world_preset, seed=config.world_seed), config.probe_scenes)
    n_concept_images = sum(len(c.shots) + len(c.others) + len(c.queries) for c in concepts)
    return {
        "config": {**asdict(config), "model": encoder.spec},
        "statistics": geometry(images, texts, concepts),
        "details": details,
        "images": {"pairs": len(images), "concepts": len(concepts), "concept_images": n_concept_images},
        "seconds": round(time.perf_counter() - start, 2),
    }


def _cell(stat: dict) -> str:
    if stat["n"] == 0:
        return "n/a (no pairs)"
    if stat["sd"] is None:
        return f"{stat['value']:.3f} (n = {stat['n']})"
    return f"{stat['value']:.3f} ± {stat['sd']:.3f} (n = {stat['n']})"


def markdown(result: dict) -> str:
    """The table: our numbers beside the published real-CLIP figures, and their sources."""
    cfg, imgs = result["config"], result["images"]
    lines = [
        f"| statistic | {cfg['model']} (mean ± sd, n) | CLIP {MODELS[0]} | CLIP {MODELS[1]} |",
        "|---|---|---|---|",
    ]
    sources = []
    for key, label in STATISTICS.items():
        cells = []
        for model in MODELS:
            pub = PUBLISHED.get(key, {}).get(model)
            if pub is None:
                cells.append("not found")
            else:
                sources.append(f"[{len(sources) + 1}] {pub.source}")
                cells.append(f"{pub.value} [{len(sources)}]")
        lines.append(f"| {label} | {_cell(result['statistics'][key])} | {cells[0]} | {cells[1]} |")
    lines += ["", *sources, FOOTNOTE, ""]
    det = result["details"]
    probe = ", ".join(
        f"{f.replace('_', ' ')} {v['accuracy']:.2f} (chance {v['chance']:.2f})" for f, v in det["probe"].items()
    )
    lines += [
        f"Unnamed details, {det['scenes']} held-out scenes with a trim and an emblem. Linear probe of the image "
        f"embeddings: {probe}. Text tower, caption vs the same with one detail changed: cos "
        f"{_cell(det['detail_swap'])}; with the garment's colour changed instead: {_cell(det['colour_swap'])}.",
        "",
    ]
    lines.append(
        f"World seed {cfg['world_seed']} ({cfg['world_preset']}), {imgs['pairs']} random scene-caption pairs, "
        f"{imgs['concepts']} concepts of the test split ({imgs['concept_images']} images, {cfg['shots']} shots each "
        f"behind the shot mean); {result['seconds']} s."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.world_geometry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = GeometryConfig()
    p.add_argument("--model", default=d.model, help=f"CLIP spec (default {d.model})")
    p.add_argument("--world-seed", type=int, default=d.world_seed, help="the world's seed (default %(default)s)")
    p.add_argument("--world-preset", default=d.world_preset, help="world preset (default: the CLIP's own)")
    p.add_argument("--n", type=int, default=d.n_pairs, help="random scene-caption pairs (default %(default)s)")
    p.add_argument(
        "--concepts", type=int, default=d.n_concepts, help="the test split's first N concepts (default %(default)s)"
    )
    p.add_argument("--shots", type=int, default=d.shots, help="shots behind the shot mean (default %(default)s)")
    p.add_argument(
        "--probe-scenes",
        type=int,
        default=d.probe_scenes,
        help="held-out scenes with a trim and an emblem behind the detail probe (default %(default)s)",
    )
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    config = GeometryConfig(
        model=a.model,
        world_seed=a.world_seed,
        world_preset=a.world_preset,
        n_pairs=a.n,
        n_concepts=a.concepts,
        shots=a.shots,
        probe_scenes=a.probe_scenes,
        device=a.device,
    )
    result = measure(config)
    if a.json:
        published = {k: {m: asdict(p) for m, p in v.items()} for k, v in PUBLISHED.items()}
        json.dump({**result, "published": published}, sys.stdout, indent=1)
        print()
    else:
        print(markdown(result))
    return result


if __name__ == "__main__":
    main()
