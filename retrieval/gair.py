"""GAIR, Generation Aided Image Retrieval (Perera et al., Sec. 4.4, Algorithm 1), and the composed-query search
entry point (`PersonalSearch`) that the CLI, the benchmark and notebooks share.

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
each), never one call per weight; context images are cached per (query, attributes, models, seed, sampler) on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from retrieval.io.cache import read_cached, write_cached
from retrieval.composed import (
    PAPER_ATTRIBUTES,
    ComposedQuery,
    QueryError,
    check_attributes,
    check_query_model,
    composed_feature,
    conditioning_pair,
    context_features,
    mix,
    mix_conditioning,
    plan_query,
    truncated,
)

DEFAULT_WEIGHTS: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))  # Perera et al.: 0.0 to 1.0 by 0.1
CONTEXT_CACHE_DIR = ".gair_context"  # under the token store


@dataclass(frozen=True)
class GairConfig:
    weights: tuple[float, ...] = DEFAULT_WEIGHTS  # W
    steps: int | None = None                    # sampler steps; None: the diffusion model's default (SD: 50 DDIM)
    guidance_scale: float | None = None         # classifier-free guidance; None: the model's default (SD: 7.5)
    seed: int = 0                               # I(w) noise; context image j: seed + 1 + j
    n_context: int = 1                          # context images x_c per query (their features are averaged)
    batch_size: int = 64                        # rows per sampler call (a row: one image)

    def __post_init__(self):
        if not self.weights or any(not 0.0 <= float(w) <= 1.0 for w in self.weights):
            raise QueryError(f"GAIR weights must be a non-empty list of numbers in [0, 1], got {list(self.weights)}")
        if len(set(self.weights)) != len(self.weights):
            raise QueryError(f"GAIR weights repeat: {list(self.weights)}")
        if self.n_context < 1 or self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise QueryError("n_context, batch_size and steps must be >= 1")

    def sampler(self, backbone) -> tuple[int, float]:
        return (self.steps or backbone.sampling["steps"],
                float(self.guidance_scale if self.guidance_scale is not None else backbone.sampling["guidance_scale"]))


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
        raise QueryError(f"--weights {text!r}: give numbers in [0, 1] separated by commas, or start:stop:step") from None


@dataclass
class GairOutcome:
    """Algorithm 1's record for one query."""

    weights: tuple[float, ...]
    scores: np.ndarray                          # (|W|,) score(w) = min of the two cosines
    concept_similarity: np.ndarray              # (|W|,) cos(f(I(w)), mean f(concept images))
    context_similarity: np.ndarray              # (|W|,) cos(f(I(w)), mean f(x_c))
    best: int                                   # index of w* in weights
    query_vector: np.ndarray                    # (dim,) q(w*) normalised: what the index is searched with
    images: list[Image.Image] = field(default_factory=list)  # I(w), one per weight
    context_images: list[Image.Image] = field(default_factory=list)  # x_c

    @property
    def w(self) -> float:
        return float(self.weights[self.best])

    def to_json(self) -> dict:
        return {"w": self.w, "scores": {f"{w:g}": round(float(s), 6) for w, s in zip(self.weights, self.scores)}}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def gair_scores(image_features: np.ndarray, concept_mean: np.ndarray, context_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, cos to concept, cos to context) for (|W|, dim) features of I(w): step 4 of Algorithm 1."""
    f = _unit(image_features.astype(np.float64))
    to_concept = f @ _unit(concept_mean.astype(np.float64))
    to_context = f @ _unit(context_mean.astype(np.float64))
    return np.minimum(to_concept, to_context), to_concept, to_context


def context_key(backbone, plan: ComposedQuery, attributes: Sequence[str], config: GairConfig) -> dict:
    steps, guidance = config.sampler(backbone)
    return {"query": plan.with_word("{attribute}"), "attributes": list(attributes), "diffusion": backbone.spec,
            "clip": backbone.clip.spec, "seed": config.seed, "n": config.n_context, "steps": steps,
            "guidance": guidance, "size": backbone.image_size}


def run_gair(plans: Sequence[ComposedQuery], backbone, concept_means: np.ndarray,
             attributes: Sequence[Sequence[str]] | Sequence[str], config: GairConfig = GairConfig(),
             cache_dir: str | Path | None = None, progress: bool = False) -> list[GairOutcome]:
    """Algorithm 1 for a batch of queries. concept_means (Q, dim): mean CLIP image feature of each query's concept
    images (any norm); attributes: one list for all queries or one per query. The image encoder f and the text
    encoder g are backbone.clip."""
    clip = backbone.clip
    Q = len(plans)
    per_query = [check_attributes(a) for a in attributes] if attributes and not isinstance(attributes[0], str) else [check_attributes(attributes)] * Q
    concept_means = np.asarray(concept_means, dtype=np.float32).reshape(Q, -1)
    steps, guidance = config.sampler(backbone)
    W = list(config.weights)
    bar = tqdm(total=Q * (len(W) + config.n_context), desc="GAIR images", unit="img", leave=False, disable=not progress)
    # 1. features g_* and g_A; conditioning sequences H_* and aligned H_A
    g_star = np.stack([composed_feature(clip, p) for p in plans])  # (Q, d)
    g_ctx = np.stack([context_features(clip, p, a).mean(0) for p, a in zip(plans, per_query)])  # (Q, d)
    pairs = [conditioning_pair(backbone, p, a) for p, a in zip(plans, per_query)]
    # 2. context images x_c (cached per query), generated together for the queries that miss the cache
    keys = [context_key(backbone, p, a, config) for p, a in zip(plans, per_query)]
    context_images = [read_cached(cache_dir, "context", key, config.n_context) for key in keys]
    missing = [q for q, found in enumerate(context_images) if found is None]
    bar.update((Q - len(missing)) * config.n_context)
    if missing:
        cond = torch.cat([pairs[q][1][None].expand(config.n_context, -1, -1) for q in missing])
        seeds = [config.seed + 1 + j for _ in missing for j in range(config.n_context)]
        made = backbone.sample_images(cond, seeds, guidance, steps, config.batch_size, on_batch=bar.update)
        for i, q in enumerate(missing):
            context_images[q] = write_cached(cache_dir, "context", keys[q], made[i * config.n_context : (i + 1) * config.n_context])
    context_images = [found.images for found in context_images]
    # 3. I(w) for every query and weight: |Q| x |W| rows, batched
    cond = torch.cat([mix_conditioning(h_star, h_ctx, W) for h_star, h_ctx in pairs])  # (Q |W|, L, width)
    images = backbone.sample_images(cond, [config.seed] * cond.shape[0], guidance, steps, config.batch_size,
                                    on_batch=bar.update)
    bar.close()
    # 4. scores, w*, q(w*)
    f_images = clip.encode_pil(images).reshape(Q, len(W), -1)
    f_context = clip.encode_pil([im for ims in context_images for im in ims]).reshape(Q, config.n_context, -1).mean(1)
    out = []
    for q in range(Q):
        scores, to_concept, to_context = gair_scores(f_images[q], concept_means[q], f_context[q])
        best = int(np.argmax(scores))  # first maximum: the smallest w among ties
        out.append(GairOutcome(tuple(W), scores, to_concept, to_context, best, mix(g_star[q], g_ctx[q], W[best]),
                               images[q * len(W) : (q + 1) * len(W)], context_images[q]))
    return out


# ----- the entry point
@dataclass
class PersonalResult:
    """A composed query's answer: the plan, the hits, and GAIR's record when it ran."""

    query: str                                  # as written
    composed: str                               # [t, *, c] as encoded
    model: str
    hits: list                                  # retrieval.search.Hit
    tokens: tuple[str, ...]
    attributes: tuple[str, ...]
    truncated: bool = False
    gair: GairOutcome | None = None

    def to_json(self) -> dict:
        out = {
            "query": self.query,
            "composed": self.composed,
            "model": self.model,
            "tokens": list(self.tokens),
            "results": [{"rank": h.rank, "score": round(h.score, 6), "path": h.path, "id": h.id} for h in self.hits],
        }
        if self.truncated:
            out["truncated"] = True
        if self.gair is not None:
            out["attributes"] = list(self.attributes)
            out["gair"] = self.gair.to_json()
        return out


class PersonalSearch:
    """Composed queries with custom tokens over one index, with optional GAIR. The one entry point for notebooks:

        engine = PersonalSearch(clip, IndexStore("index"), TokenStore("custom_tokens"), backbone)
        result = engine.query("a person wearing a * in front of a brick wall", tokens=["my-dress"], gair=True)

    clip must be the index's model (the tokens' too); backbone (conditioned on that clip) is needed for GAIR only;
    tokens is a TokenStore or a {name: CustomToken} mapping."""

    def __init__(self, clip, index, tokens, backbone=None, cache_dir: str | Path | None = None):
        self.clip, self.index, self.tokens, self.backbone = clip, index, tokens, backbone
        if cache_dir is None and hasattr(tokens, "root"):
            cache_dir = Path(tokens.root) / CONTEXT_CACHE_DIR
        self.cache_dir = cache_dir
        if index is not None:
            index.check_model(clip.spec)
        if backbone is not None and backbone.clip is not clip:
            raise ValueError("the diffusion backbone must be conditioned on the same ClipEncoder object as the search")

    def token(self, name: str):
        if isinstance(self.tokens, Mapping):
            if name not in self.tokens:
                raise QueryError(f"no token named {name!r} (have: {', '.join(sorted(self.tokens)) or 'none'})")
            return self.tokens[name]
        return self.tokens.load(name)

    def plan(self, text: str, tokens: Sequence[str] = ()) -> ComposedQuery:
        plan = plan_query(text, [self.token(n) for n in tokens])
        check_query_model(plan, self.clip.spec, self.clip.width)
        return plan

    def concept_mean(self, plan: ComposedQuery, concept_images: Sequence[Image.Image] | None = None) -> np.ndarray:
        """Mean CLIP feature of the concept images: of CONCEPT_IMAGES if given, else the token files' stored means
        (averaged over the query's tokens)."""
        if concept_images:
            return self.clip.encode_pil(list(concept_images)).mean(0)
        stored = [np.asarray(t.info.concept_feature, np.float32) for t in plan.tokens]
        if not plan.tokens or any(s.shape != (self.clip.dim,) for s in stored):
            missing = [t.info.name for t, s in zip(plan.tokens, stored) if s.shape != (self.clip.dim,)]
            raise QueryError(
                f"GAIR scores generated images against the concept images, but token(s) {', '.join(missing) or '(none)'} "
                "carry no concept feature (learned by an older version): pass --concept-images DIR"
            )
        return np.mean(stored, axis=0)

    def attributes_for(self, plan: ComposedQuery, attributes: Sequence[str] | None) -> tuple[str, ...]:
        """--attributes, else the tokens' own context_attributes, else the paper's DeepFashion2 list."""
        if attributes:
            return check_attributes(attributes)
        own = [a for t in plan.tokens for a in t.info.context_attributes]
        return check_attributes(list(dict.fromkeys(own))) if own else PAPER_ATTRIBUTES

    def query(self, text: str, tokens: Sequence[str] = (), k: int = 10, gair: bool = False,
              attributes: Sequence[str] | None = None, config: GairConfig = GairConfig(),
              concept_images: Sequence[Image.Image] | None = None, progress: bool = False) -> PersonalResult:
        """One query (see `query_many`)."""
        return self.query_many([text], tokens, k, gair, attributes, config, concept_images, progress)[0]

    def query_many(self, texts: Sequence[str], tokens: Sequence[str] = (), k: int = 10, gair: bool = False,
                   attributes: Sequence[str] | None = None, config: GairConfig = GairConfig(),
                   concept_images: Sequence[Image.Image] | None = None, progress: bool = False) -> list[PersonalResult]:
        """Answer TEXTS with TOKENS; with GAIR, the images of all queries and weights are generated in batches
        of `config.batch_size` rows (Algorithm 1 for each query)."""
        from retrieval.search import search_vectors

        plans = [self.plan(t, tokens) for t in texts]
        attrs = [self.attributes_for(p, attributes) if p.tokens else () for p in plans]
        outcomes: list[GairOutcome | None] = [None] * len(plans)
        if gair:
            if not all(p.tokens for p in plans):
                raise QueryError("--gair mixes the query with and without a token: give --token NAME and write * in the query")
            if self.backbone is None:
                raise QueryError("--gair needs a diffusion model (--diffusion)")
            means = np.stack([self.concept_mean(p, concept_images) for p in plans])
            outcomes = run_gair(plans, self.backbone, means, attrs, config, self.cache_dir, progress)
            vectors = np.stack([o.query_vector for o in outcomes])
        else:
            vectors = np.stack([composed_feature(self.clip, p) for p in plans])
        hits = search_vectors(self.index, vectors.astype(np.float32), k) if self.index is not None else [[] for _ in plans]
        return [PersonalResult(t, p.composed, self.clip.spec, h, tuple(x.info.name for x in p.tokens), tuple(a),
                               truncated(self.clip, p, a), o)
                for t, p, h, a, o in zip(texts, plans, hits, attrs, outcomes)]
