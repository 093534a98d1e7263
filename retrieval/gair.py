"""GAIR, Generation Aided Image Retrieval (Perera et al., Sec. 4.4, Algorithm 1), for a batch of planned queries.
The engine (`retrieval.engine.Engine.query_many`) runs it; the benchmark calls `run_gair` on its own features.

Algorithm 1, for one query [t, *, c] with attribute words A and weights W (default 0.0, 0.1, ..., 1.0):
  1. g_* = g([t, *, c]);  g_A = mean_i g([t, a_i, c])                       (retrieval.composed)
  2. for each w in W:  q(w) = w g_* + (1 - w) g_A
     and I(w) = the image generated from the same mixture of the per-position conditioning sequences
  3. x_c = images generated from the attribute-only mixture (w = 0), once per query
  4. score(w) = min( cos(f(I(w)), mean f(concept images)), cos(f(I(w)), mean f(x_c)) )
  5. w* = argmax_w score(w) (ties: the smallest w); search the index with q(w*) / |q(w*)|.
f is the CLIP image encoder (the index's model, which the tokens were made for); cosines are taken against the
normalised means. Every I(w) of a query uses the same noise (seed), so the images differ by w only; context image
j uses seed + 1 + j. All rows of a batch of queries are generated in few batched sampler calls (`batch_size` rows
each), never one call per weight; context images are cached on disk per (query, each slot's number of token
vectors, attributes, models, seed, sampler): `context_key`.
Each outcome keeps g_* and g_A, so that q(w) for another w (`GairOutcome.query_at`) needs no encoding again.

Against the paper (Perera et al. Sec. 4.4, Algorithm 1; the README's "Fidelity to the papers" has the table):
- W: Algorithm 1 writes "W <- [w_0, ..., w_N]" and gives no values; 0.0, 0.1, ..., 1.0 is our choice.
- d(g[q]) (Algorithm 1) applies the mixture to a pooled feature q; Stable Diffusion is conditioned on per-position
  hidden states, so I(w) is generated from the same mixture of those sequences (step 2, `mix_conditioning`),
  and x_c from its w = 0 end: the attribute sentences' states aligned to the composed sequence, the attribute's
  state repeated over the token's n positions (`retrieval.composed.align_index`), not the plain sentence
  d(g([t, a_i, c])) of Sec. 4.4.
- f(I)^T f(x) and f(I)^T f(x_c) for sets x, x_c: we take cosines to their normalised means (step 4); the
  paper's dot product with unit features averaged over the set would scale each term by the mean's norm.
- Sampler steps, guidance, the number of context images and the tie rule are not given: the diffusion model's
  defaults (SD: 50 DDIM steps, guidance 7.5), one context image, the smallest w.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from retrieval.composed import (
    ComposedQuery,
    QueryError,
    check_attributes,
    composed_feature,
    conditioning_pair,
    context_features,
    mix,
    mix_conditioning,
)
from retrieval.io.cache import read_cached, write_cached

# W of Algorithm 1: 0.0 to 1.0 by 0.1. Perera et al. give no grid ("W <- [w_0, ..., w_N]"): this one is ours.
DEFAULT_WEIGHTS: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))
CONTEXT_CACHE_DIR = ".gair_context"  # under the token store


@dataclass(frozen=True)
class GairConfig:
    weights: tuple[float, ...] = DEFAULT_WEIGHTS  # W (Algorithm 1; values not given in the paper)
    steps: int | None = None  # sampler steps; None: the diffusion model's default (SD: 50 DDIM); paper: not given
    guidance_scale: float | None = None  # classifier-free guidance; None: the model's default (SD: 7.5); not given
    seed: int = 0  # I(w) noise; context image j: seed + 1 + j
    n_context: int = 1  # context images x_c per query (their features are averaged); paper: not given
    batch_size: int = 64  # rows per sampler call (a row: one image)

    def __post_init__(self):
        if not self.weights or any(not 0.0 <= float(w) <= 1.0 for w in self.weights):
            raise QueryError(f"GAIR weights must be a non-empty list of numbers in [0, 1], got {list(self.weights)}")
        if len(set(self.weights)) != len(self.weights):
            raise QueryError(f"GAIR weights repeat: {list(self.weights)}")
        if self.n_context < 1 or self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise QueryError("n_context, batch_size and steps must be >= 1")

    def steps_and_guidance(self, backbone) -> tuple[int, float]:
        """(sampler steps, guidance scale): these, or the diffusion model's own defaults where None."""
        return (
            self.steps or backbone.sampling["steps"],
            float(self.guidance_scale if self.guidance_scale is not None else backbone.sampling["guidance_scale"]),
        )


def parse_weights(text: str) -> tuple[float, ...]:
    """'0,0.25,0.5' or '0:1:0.1' (start:stop:step, stop included) -> weights."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(np.floor((stop - start) / step + 1e-9)) + 1
            return tuple(round(start + i * step, 6) for i in range(n))
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QueryError(
            f"`weights={text!r}`: give numbers in [0, 1] separated by commas, or start:stop:step"
        ) from None


@dataclass
class GairOutcome:
    """Algorithm 1's record for one query."""

    weights: tuple[float, ...]
    scores: np.ndarray  # (|W|,) score(w) = min of the two cosines
    concept_similarity: np.ndarray  # (|W|,) cos(f(I(w)), mean f(concept images))
    context_similarity: np.ndarray  # (|W|,) cos(f(I(w)), mean f(x_c))
    best: int  # index of w* in weights
    query_vector: np.ndarray  # (dim,) q(w*) normalised: what the index is searched with
    composed_feature: np.ndarray  # (dim,) float32 g_* = g([t, *, c]), step 1
    context_feature: np.ndarray  # (dim,) float32 g_A = mean_i g([t, a_i, c]), step 1
    images: list[Image.Image] = field(default_factory=list)  # I(w), one per weight
    context_images: list[Image.Image] = field(default_factory=list)  # x_c

    @property
    def w(self) -> float:
        return float(self.weights[self.best])

    def query_at(self, w: float) -> np.ndarray:
        """q(w) = w g_* + (1 - w) g_A, normalised (step 2): another w to search with, nothing encoded again."""
        return mix(self.composed_feature, self.context_feature, w)

    def to_json(self) -> dict:
        return {"w": self.w, "scores": {f"{w:g}": round(float(s), 6) for w, s in zip(self.weights, self.scores)}}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def gair_scores(
    image_features: np.ndarray, concept_mean: np.ndarray, context_mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, cos to concept, cos to context) for (|W|, dim) features of I(w): step 4 of Algorithm 1,
    "score <- min(f(I)^T f(x_c), f(I)^T f(x))" (Perera et al. Sec. 4.4), with cosines to the normalised means of
    the concept images' and the context images' features (the paper does not say how a set x enters)."""
    f = _unit(image_features.astype(np.float64))
    to_concept = f @ _unit(concept_mean.astype(np.float64))
    to_context = f @ _unit(context_mean.astype(np.float64))
    return np.minimum(to_concept, to_context), to_concept, to_context


def context_key(backbone, plan: ComposedQuery, attributes: Sequence[str], config: GairConfig) -> dict:
    """What x_c is made from, as the cache key of a query's context images. The context conditioning is the
    attribute sentences aligned to the composed sequence (`conditioning_pair`), so besides the sentence it depends
    on each slot's number of vectors n (the attribute's state is repeated over n positions, the tail shifted by
    m - n), not on the token's values. Entries written under an older key (without "slot_vectors") do not match
    and are made again."""
    steps, guidance = config.steps_and_guidance(backbone)
    return {
        "query": plan.with_word("{attribute}"),
        "slot_vectors": [int(plan.tokens[p].vectors.shape[0]) for p in plan.parts if isinstance(p, int)],
        "attributes": list(attributes),
        "diffusion": backbone.spec,
        "clip": backbone.clip.spec,
        "seed": config.seed,
        "n": config.n_context,
        "steps": steps,
        "guidance": guidance,
        "size": backbone.image_size,
    }


def run_gair(
    plans: Sequence[ComposedQuery],
    backbone,
    concept_means: np.ndarray,
    attributes: Sequence[Sequence[str]] | Sequence[str],
    config: GairConfig = GairConfig(),
    cache_dir: str | Path | None = None,
    progress: bool = False,
    on_image: Callable[[int, int], None] | None = None,
) -> list[GairOutcome]:
    """Algorithm 1 for a batch of queries. concept_means (Q, dim): mean CLIP image feature of each query's concept
    images (any norm); attributes: one list for all queries or one per query. The image encoder f and the text
    encoder g are backbone.clip. ON_IMAGE(images done, total): told at the start (0 done) and as images arrive,
    one call per sampler batch (context images read from the cache count as done); total = Q (|W| + n_context)."""
    clip = backbone.clip
    Q = len(plans)
    per_query = (
        [check_attributes(a) for a in attributes]
        if attributes and not isinstance(attributes[0], str)
        else [check_attributes(attributes)] * Q
    )
    concept_means = np.asarray(concept_means, dtype=np.float32).reshape(Q, -1)
    steps, guidance = config.steps_and_guidance(backbone)
    W = list(config.weights)
    total, done = Q * (len(W) + config.n_context), 0
    bar = tqdm(total=total, desc="GAIR images", unit="img", leave=False, disable=not progress)

    def arrived(n: int) -> None:
        nonlocal done
        done += n
        bar.update(n)
        if on_image is not None:
            on_image(done, total)

    if on_image is not None:
        on_image(0, total)
    # 1. features g_* = g([t, *, c]) and g_A = (1/|A|) sum_i g([t, a_i, c]) (Sec. 4.4); conditioning sequences H_*
    #    and aligned H_A (our stand-in for d(g[q]): SD attends to per-position states, not to a pooled q)
    g_star = np.stack([composed_feature(clip, p) for p in plans])  # (Q, d)
    g_ctx = np.stack([context_features(clip, p, a).mean(0) for p, a in zip(plans, per_query)])  # (Q, d)
    pairs = [conditioning_pair(backbone, p, a) for p, a in zip(plans, per_query)]
    # 2. context images x_c (cached per query), generated together for the queries that miss the cache; Sec. 4.4:
    #    "generated with the same query where custom tokens are replaced with a related attribute"
    keys = [context_key(backbone, p, a, config) for p, a in zip(plans, per_query)]
    context_images = [read_cached(cache_dir, "context", key, config.n_context) for key in keys]
    missing = [q for q, found in enumerate(context_images) if found is None]
    if len(missing) < Q:
        arrived((Q - len(missing)) * config.n_context)
    if missing:
        cond = torch.cat([pairs[q][1][None].expand(config.n_context, -1, -1) for q in missing])
        seeds = [config.seed + 1 + j for _ in missing for j in range(config.n_context)]
        made = backbone.sample_images(cond, seeds, guidance, steps, config.batch_size, on_batch=arrived)
        for i, q in enumerate(missing):
            context_images[q] = write_cached(
                cache_dir, "context", keys[q], made[i * config.n_context : (i + 1) * config.n_context]
            )
    context_images = [found.images for found in context_images]
    # 3. I(w) for every query and weight: |Q| x |W| rows, batched (Algorithm 1: "Generate image I <- d(g[q])")
    cond = torch.cat([mix_conditioning(h_star, h_ctx, W) for h_star, h_ctx in pairs])  # (Q |W|, L, width)
    images = backbone.sample_images(
        cond, [config.seed] * cond.shape[0], guidance, steps, config.batch_size, on_batch=arrived
    )
    bar.close()
    # 4. scores, w*, q(w*) (Algorithm 1: score = min of the two CLIP scores; "w* <- W[arg max(S)]")
    f_images = clip.encode_pil(images).reshape(Q, len(W), -1)
    f_context = clip.encode_pil([im for ims in context_images for im in ims]).reshape(Q, config.n_context, -1).mean(1)
    out = []
    for q in range(Q):
        scores, to_concept, to_context = gair_scores(f_images[q], concept_means[q], f_context[q])
        best = int(np.argmax(scores))  # first maximum: the smallest w among ties
        out.append(
            GairOutcome(
                tuple(W),
                scores,
                to_concept,
                to_context,
                best,
                mix(g_star[q], g_ctx[q], W[best]),
                g_star[q].astype(np.float32),
                g_ctx[q].astype(np.float32),
                images[q * len(W) : (q + 1) * len(W)],
                context_images[q],
            )
        )
    return out
