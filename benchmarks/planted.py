"""Planted-token recovery: a correctness test of token learning that does not depend on the world being faithful.

    python -m benchmarks.planted --threads 1             # 4 planted garments, 500 steps, ours,ti,pt,batex: ~15 min
    python -m benchmarks.planted --quick --threads 1     # 2 garments, 100 steps, 4 images per prompt: ~3 min
    python -m benchmarks.planted --methods pt,ti --concepts 4 --steps 300 --json

Issue #13, section 5. PerVL's concepts differ in details no word names, so there a token that falls short of the
words may be the world's fault as much as the method's. Here every planted garment is fully described by words the
world's models know (category, colour, pattern; no trim band, no emblem): a token learned from its images should
carry exactly what the words say, and a learner that recovers it passes two checks.

World (the toy world's renderer, `benchmarks.world.render_scene`, in the world the CLIP was trained in,
`benchmarks.world.trained_world`; everything seeded by `--seed`). Its views (back view, bag, zoom-in: WorldConfig's
view shares) are off unless `--views`: a back view hides part of the garment, a bag covers it, a zoom crops it, so
such a photo no longer shows all the words say, and the premise above no longer holds. With views the check
measures robustness instead (pt on the fast test's tiny case at 300 steps, in `pervl-v2-views`: MRR 69.8 against the words' 100; 600 steps: 83.3).
- planted garments: N distinct (category, colour, pattern) triples with no unnamed details;
- contexts: a seeded permutation of the world's 14; the first `--held-out` are held-out contexts, the rest are
  shot contexts. Each garment gets `--shots` training images in shot contexts and one held-out image in every
  held-out context (random pose and jitter), so no held-out context is seen in training;
- gallery: the held-out images of every planted garment, plus distractors rendered in the same held-out contexts
  (so the background never tells them apart), none with unnamed details:
  - look-alikes: per planted garment and per word (category, colour, pattern), `--lookalikes` triples that
    differ from it in that one word only (two of three words shared), each in every held-out context;
  - `--random-distractors` random garments (any words), one image each in a random held-out context.
  A distractor never has a planted garment's words: with no details, that would be the same garment.

(a) Retrieval. Each planted garment's token is learned (parent word = its category) from its shots with
`tokens.learn.learn_tokens`, all garments of a method in ONE batched loop. Queries go through the project's
composed-query path (`Engine.plan`, `retrieval.composed.composed_feature`, [t, *, c]), in the toy grammar:
    token   "a person wearing a * <category>."   ->  "a person wearing a <planted-3> dress."
    words   "a person wearing <garment phrase>."  ->  "a person wearing a red striped dress."   (the reference)
    parent  "a person wearing <category>."        ->  "a person wearing a dress."        (control: no token)
    random  the token query with random vectors of the parent word's norm          (control: a token that knows
                                                                                        nothing)
One query per garment, one target per held-out image of it: the target's rank = 1 + the gallery images scoring
>= it, the garment's OTHER held-out images left out (they are right answers too, not competitors); ties count
against (`benchmarks.pervl.target_rank`). MRR = mean of 1/rank over all targets (x100, `benchmarks.pervl.metrics`).
Pass: token MRR >= 0.9 x words MRR ("within 10%").

(b) Generation. `--gen-images` images per garment from the world's diffusion model for the token prompt and for
the words prompt (the same prompts as (a); `Engine.generate`, the model's own sampler settings, the same seeds for
both, so image i of each prompt starts from the same noise), read back zero-shot by the world's CLIP
(`benchmarks.world.evaluate.classify`, the readback that `weights/toyworld/diffusion/eval.json` reports): the share
of images read as the planted category, colour, pattern, and all three at once. The table prints the token's rates
beside the words'; pass: each of the three words is read back >= 0.9 x as often as from the words' images. The
all-three ratio is printed too, but is not the pass rule: the words' own all-three rate is low (the diffusion
model's ceiling here, not 1; eval.json: category 0.89, pattern 0.71 on held-out captions), so on a few dozen images
its ratio is mostly noise.

Training: the papers' lr (5e-4), batch (4) and 10 vectors; `--steps` for every method (BaTex included, whose paper
budget is 500), a CPU budget like `benchmarks/token_quality.py`'s. l_CE negatives (ours, pt) are sampled from the
diffusion model for the parent prompt, as `learn-token` does (`--negatives world`: rendered scenes of the
category instead). Learned tokens are cached per method under `--out`/cache/tokens/<method>-seed<seed>/ with the
key of what made them (as benchmarks/pervl.py does): a killed run resumes without retraining finished methods.
Outputs: markdown tables on stdout (or one JSON object with --json) and `--out`/summary.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.pervl import metrics, target_rank
from benchmarks.world import (
    Concept,
    Details,
    Scene,
    garment_phrase,
    render_scene,
    sample_scene,
    trained_world,
    world_config,
)
from benchmarks.world.evaluate import classify
from retrieval import Engine
from retrieval.composed import composed_feature
from retrieval.io.atomic import write_json
from tokens.learn import ConceptImages, learn_tokens
from tokens.methods import METHODS, model_defaults, token_train_config, word_embeddings
from tokens.token_file import CustomToken, TokenInfo, load_token_file, save_token_file

FORMAT_VERSION = 1
CONTROLS = ("words", "parent", "random")  # reference and controls, beside the methods
FACTORS = ("category", "colour", "pattern")  # what a planted garment's words say
WITHIN = 0.9  # pass: a token reaches this fraction of the words' MRR / readback rate ("within 10%")
GENERIC_TEMPLATE = "a person wearing a {token} {parent}."  # the query frame when the CLIP has no MODEL_DEFAULTS


@dataclass(frozen=True)
class PlantedConfig:
    # ----- the planted world
    concepts: int = 4  # planted garments (distinct category, colour, pattern)
    shots: int = 5  # training images per garment, in shot contexts
    held_out: int = 4  # held-out contexts: one held-out image per garment in each; never in a shot
    lookalikes: int = 2  # per planted garment and per word: distractors differing in that word only
    views: bool = False  # keep the world's views (back view, bag, zoom-in); off: every photo shows the whole garment
    random_distractors: int = 40  # distractors of random words, one image each
    seed: int = 0  # draws the world, seeds the tokens and the generated images
    # ----- tokens (papers' lr, batch, vectors; a CPU budget of steps for every method)
    methods: tuple[str, ...] = METHODS
    steps: int = 500  # optimiser steps, every method (Perera et al.: 20000; BaTex: 500)
    lr: float = 5e-4  # Perera et al. Sec. 5
    vectors: int = 10  # Perera et al. Sec. 5: "10 trainable tokens"
    negatives: str = "diffusion"  # l_CE negatives: diffusion (sampled for the parent prompt) | world (rendered)
    n_negatives: int = 16  # k negatives per parent (ours, pt)
    # ----- generation (b)
    gen_images: int = 8  # images per garment and prompt
    gen_steps: int | None = None  # sampler steps; None: the diffusion model's own
    guidance: float | None = None  # classifier-free guidance; None: the diffusion model's own
    # ----- models and run
    model: str = "toyworld"  # CLIP SPEC; only the world's CLIP speaks the world's grammar
    diffusion: str = "auto"  # diffusion SPEC; auto: the one paired with the CLIP
    device: str = "auto"
    out: str = "out/planted"  # summary.json and the token cache
    progress: bool = True
    controls: tuple[str, ...] = CONTROLS  # reference and controls measured beside the methods

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}: use any of {','.join(METHODS)}")
        if self.concepts < 1 or self.shots < 1 or self.held_out < 1 or self.gen_images < 0 or self.steps < 0:
            raise ValueError("concepts, shots and held_out must be >= 1; gen_images and steps >= 0")
        if self.negatives not in ("diffusion", "world"):
            raise ValueError(f"negatives must be diffusion or world, got {self.negatives!r}")
        bad = [c for c in self.controls if c not in CONTROLS]
        if bad:
            raise ValueError(f"unknown controls {bad}: use any of {','.join(CONTROLS)}")


# --quick: a smoke run of every part in a few minutes on 2 shared cores (too few steps for tokens to pass)
QUICK = {"concepts": 2, "steps": 100, "gen_images": 4, "random_distractors": 20, "n_negatives": 8}


# ----- the planted world
@dataclass
class Planted:
    garments: list[Concept]  # the planted garments, in order; garment g's token is "planted-g"
    shots: list[list[Scene]]  # per garment, its training scenes
    gallery: list[Scene]  # held-out images of every garment, then the distractors
    owner: np.ndarray  # (G,) int: the planted garment a gallery image shows, -1 for a distractor
    kind: list[str]  # per gallery image: planted | look-alike | random


def _garment(pair_id: str, words: tuple[str, str, str]) -> Concept:
    """A garment fully described by (category, colour, pattern): no trim band, no emblem."""
    return Concept(pair_id, *words, details=Details())


def plant(world, cfg: PlantedConfig) -> Planted:
    """The planted garments, their shots and the gallery (module docstring), drawn from one seeded stream."""
    rng = np.random.default_rng([cfg.seed, 13])
    triples = [(c, k, p) for c in world.categories for k in world.colour_names for p in world.patterns]
    if cfg.concepts > len(triples):
        raise ValueError(f"concepts={cfg.concepts}: the world has only {len(triples)} (category, colour, pattern)")
    if cfg.held_out >= len(world.contexts):
        raise ValueError(f"held_out={cfg.held_out} leaves no shot context of the world's {len(world.contexts)}")
    # 1. planted words, distinct
    words = [triples[i] for i in rng.permutation(len(triples))[: cfg.concepts]]
    planted_set = set(words)
    garments = [_garment(str(g), w) for g, w in enumerate(words)]
    # 2. contexts: held-out first, the rest for shots
    contexts = [world.contexts[i] for i in rng.permutation(len(world.contexts))]
    held, shot_contexts = contexts[: cfg.held_out], contexts[cfg.held_out :]
    # 3. shots and held-out images of each planted garment
    shots, gallery, owner, kind = [], [], [], []
    for g, garment in enumerate(garments):
        order = rng.permutation(len(shot_contexts))
        shots.append(
            [sample_scene(rng, world, garment, shot_contexts[order[i % len(order)]]) for i in range(cfg.shots)]
        )
        for context in held:
            gallery.append(sample_scene(rng, world, garment, context))
            owner.append(g)
            kind.append("planted")
    # 4. look-alikes: one word changed, in every held-out context
    vocab = {0: world.categories, 1: world.colour_names, 2: world.patterns}
    seen: set = set()
    for w in words:
        for factor, options in vocab.items():
            others = [o for o in options if o != w[factor]]
            picked = 0
            for i in rng.permutation(len(others)):
                t = tuple(others[i] if j == factor else w[j] for j in range(3))
                if picked == cfg.lookalikes:
                    break
                if t in planted_set or t in seen:
                    continue
                seen.add(t)
                picked += 1
                for context in held:
                    gallery.append(sample_scene(rng, world, _garment("-1", t), context))
                    owner.append(-1)
                    kind.append("look-alike")
    # 5. random distractors, any words but a planted garment's
    while kind.count("random") < cfg.random_distractors:
        t = triples[int(rng.integers(len(triples)))]
        if t in planted_set:
            continue
        gallery.append(sample_scene(rng, world, _garment("-1", t), held[int(rng.integers(len(held)))]))
        owner.append(-1)
        kind.append("random")
    return Planted(garments, shots, gallery, np.asarray(owner), kind)


# ----- prompts
WORDS_TEMPLATE = "a person wearing {garment}."  # the world's caption grammar (benchmarks.world.evaluate's prompts)


def query_template(model: str) -> str:
    """The token prompt frame in the CLIP's own language: the toy grammar's "a person wearing a {token} {parent}."."""
    return model_defaults(model).get("class_template", GENERIC_TEMPLATE)


def prompts_for(garment: Concept, template: str) -> dict[str, str]:
    """The prompt of each query kind for GARMENT: token (with *), words, parent (module docstring)."""
    return {
        "token": " ".join(template.format(token="*", parent=garment.category).split()),
        "words": WORDS_TEMPLATE.format(garment=garment_phrase(garment.category, garment.colour, garment.pattern)),
        "parent": WORDS_TEMPLATE.format(garment=garment_phrase(garment.category, None, None)),
    }


def random_token(clip, like: CustomToken, seed: int) -> CustomToken:
    """A control token shaped like LIKE: random directions, each row of the parent word's embedding norm."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(like.vectors.shape, generator=g)
    norm = word_embeddings(clip, [like.info.parent]).norm(dim=1).item()
    v = v / v.norm(dim=1, keepdim=True) * norm
    info = TokenInfo(
        name=f"random-{like.info.name}",
        model=like.info.model,
        width=like.info.width,
        n_vectors=like.info.n_vectors,
        parent=like.info.parent,
        method="random",
    )
    return CustomToken(v, info)


# ----- the two measurements, as functions
def held_out_ranks(scores: np.ndarray, owner: np.ndarray, garment: int) -> list[int]:
    """Rank of each held-out image of GARMENT under one query's SCORES (G,): among the gallery without the garment's
    other held-out images; ties count against (`target_rank`)."""
    ranks = []
    for i in np.flatnonzero(owner == garment):
        keep = (owner != garment) | (np.arange(len(owner)) == i)  # (G,) the target and every wrong answer
        ranks.append(target_rank(scores[keep], int(keep[:i].sum())))  # the target's place among the kept
    return ranks


def readback(clip, images, owner: np.ndarray, garments: list[Concept], world) -> dict[str, np.ndarray]:
    """(n_images,) bool per factor: does the world's CLIP read (zero-shot) the words of garment OWNER[i] from image i;
    and "all": all three at once. One `classify` per factor for every image (its class vectors are built per call)."""
    got = {
        f: np.array([w == getattr(garments[o], f) for w, o in zip(classify(clip, images, f, world), owner)])
        for f in FACTORS
    }
    got["all"] = got["category"] & got["colour"] & got["pattern"]
    return got


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----- the run
class PlantedBenchmark:
    def __init__(self, cfg: PlantedConfig, engine: Engine | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.cache = self.out / "cache"
        self.engine = engine or Engine(
            tokens_dir=self.cache / "store", model=cfg.model, diffusion=cfg.diffusion, device=cfg.device
        )
        self.world = world_config(trained_world(cfg.model))
        if not cfg.views:
            self.world = replace(self.world, back_view_share=0.0, bag_share=0.0, zoom_share=0.0)
        self.planted = plant(self.world, cfg)
        self.template = query_template(cfg.model)
        self.timings: dict[str, float] = {}

    def train_config(self, method: str):
        cfg, known = self.cfg, model_defaults(self.cfg.model)
        over = {k: known[k] for k in ("sd_templates", "class_template") if k in known}
        config = token_train_config(
            method,
            steps=cfg.steps,
            lr=cfg.lr,
            n_vectors=cfg.vectors,
            seed=cfg.seed,
            n_negatives=cfg.n_negatives,
            min_images=1,
            **over,
        )
        if config.needs_diffusion(negatives_given=cfg.negatives == "world"):
            sampling = self.engine.backbone.sampling  # negatives sampled the diffusion model's own way
            config = replace(config, negative_steps=sampling["steps"], negative_guidance=sampling["guidance_scale"])
        return config

    def tokens(self, method: str) -> list[CustomToken]:
        """One token per planted garment, learned in ONE batched loop; cached by the key of what made them."""
        cfg, p = self.cfg, self.planted
        config = self.train_config(method)
        folder = self.cache / "tokens" / f"{method}-seed{cfg.seed}"
        names = [f"planted-{g}" for g in range(len(p.garments))]
        key = json.loads(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "config": asdict(config),
                    "model": cfg.model,
                    "diffusion": cfg.diffusion,
                    "negatives": cfg.negatives,
                    "shots": [[asdict(s) for s in shots] for shots in p.shots],
                },
                default=str,
            )
        )
        if (folder / "key.json").is_file() and json.loads((folder / "key.json").read_text()) == key:
            return [load_token_file(folder / f"{n}.safetensors", model=cfg.model) for n in names]
        clip = self.engine.clip
        backbone = self.engine.backbone if config.needs_diffusion(negatives_given=cfg.negatives == "world") else None
        concepts = []
        for g, (garment, shots) in enumerate(zip(p.garments, p.shots)):
            negatives = None  # sampled for the parent prompt by learn_tokens (cached under cache/negatives)
            if config.uses_ce and cfg.negatives == "world":
                negatives = [render_scene(s, self.world) for s in self.parent_scenes(garment.category)]
            images = [render_scene(s, self.world) for s in shots]
            concepts.append(ConceptImages(names[g], garment.category, images, negatives, seed=cfg.seed * 1000 + g))
        learned = learn_tokens(clip, backbone, config, concepts, self.cache / "negatives", progress=cfg.progress)
        self.timings[f"train {method}"] = learned[0].info.training["seconds"]
        folder.mkdir(parents=True, exist_ok=True)
        for t in learned:
            save_token_file(folder / f"{t.info.name}.safetensors", t)
        write_json(folder / "key.json", key)  # last: the tokens are complete
        return learned

    def parent_scenes(self, category: str) -> list[Scene]:
        """`n_negatives` rendered scenes of CATEGORY with any other words (l_CE negatives for --negatives world)."""
        rng = np.random.default_rng([self.cfg.seed, 17, self.world.categories.index(category)])
        planted = {g.words for g in self.planted.garments}
        out = []
        while len(out) < self.cfg.n_negatives:
            s = sample_scene(rng, self.world)
            if s.category == category and s.words not in planted:
                out.append(s)
        return out

    def query_vectors(self, kind: str, tokens: list[CustomToken] | None) -> np.ndarray:
        """(N, dim) one query per planted garment, planned and encoded as Engine.query does."""
        clip, rows = self.engine.clip, []
        for g, garment in enumerate(self.planted.garments):
            prompts = prompts_for(garment, self.template)
            text, given = (prompts["token"], [tokens[g]]) if tokens is not None else (prompts[kind], [])
            rows.append(composed_feature(clip, self.engine.plan(text, given)))
        return np.stack(rows)

    def retrieval(self, vectors: np.ndarray, gallery: np.ndarray) -> dict:
        scores = vectors @ gallery.T  # (N, G)
        per = [held_out_ranks(scores[g], self.planted.owner, g) for g in range(len(vectors))]
        return {
            **metrics([r for ranks in per for r in ranks]),
            "per_garment_mrr": [metrics(r)["mrr"] for r in per],
            "ranks": per,
        }

    def generation(self, kind: str, tokens: list[CustomToken] | None) -> dict:
        cfg, garments = self.cfg, self.planted.garments
        if cfg.gen_images == 0:
            return {}
        images = []
        for g, garment in enumerate(garments):
            prompts = prompts_for(garment, self.template)
            text, given = (prompts["token"], [tokens[g]]) if tokens is not None else (prompts[kind], [])
            seed = 10_000 * cfg.seed + 100 * g  # the same noise for every prompt of this garment
            images += self.engine.generate(
                text, given, n=cfg.gen_images, steps=cfg.gen_steps, guidance_scale=cfg.guidance, seed=seed
            ).images
        hits = readback(
            self.engine.clip, images, np.repeat(np.arange(len(garments)), cfg.gen_images), garments, self.world
        )
        out = {f: float(np.mean(hits[f])) for f in (*FACTORS, "all")}
        out["per_garment_all"] = [float(x) for x in hits["all"].reshape(len(garments), -1).mean(1)]
        return out

    def run(self) -> dict:
        t0 = time.perf_counter()
        cfg, p, clip = self.cfg, self.planted, self.engine.clip
        gallery = clip.encode_pil([render_scene(s, self.world) for s in p.gallery])  # (G, dim)
        rows: dict[str, dict] = {}
        learned = {}
        for method in cfg.methods:  # 1. tokens (the expensive part, cached)
            self._say(f"{method}: learning {len(p.garments)} tokens, {cfg.steps} steps ...")
            learned[method] = self.tokens(method)
        runs = [(c, None) for c in cfg.controls if c != "random"]
        if "random" in cfg.controls:
            like = learned[cfg.methods[0]] if cfg.methods else None
            if like is None:
                raise ValueError("the random control is shaped like a learned token: give at least one method")
            runs.append(("random", [random_token(clip, t, cfg.seed * 1000 + g) for g, t in enumerate(like)]))
        runs += [(m, learned[m]) for m in cfg.methods]
        for name, tokens in runs:  # 2. (a) retrieval and (b) generation for every query kind
            self._say(f"{name}: retrieval and generation ...")
            t = time.perf_counter()
            rows[name] = {
                "retrieval": self.retrieval(self.query_vectors(name, tokens), gallery),
                "generation": self.generation(name, tokens),
            }
            self.timings[f"measure {name}"] = time.perf_counter() - t
        summary = self.summarise(rows, time.perf_counter() - t0)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "summary.json", summary)
        return summary

    def summarise(self, rows: dict, seconds: float) -> dict:
        words = rows.get("words")
        for name, r in rows.items():
            if words is None or name == "words":
                continue
            ref = words["retrieval"]["mrr"]
            r["retrieval"]["ratio"] = r["retrieval"]["mrr"] / ref if ref > 0 else float("nan")
            r["retrieval"]["within"] = bool(r["retrieval"]["mrr"] >= WITHIN * ref)
            b, ref = r["generation"], words["generation"]
            if b:  # pass: each word read back within 10% as often as from the words' images
                b["ratio"] = b["all"] / ref["all"] if ref["all"] > 0 else float("nan")
                b["within"] = bool(all(b[f] >= WITHIN * ref[f] for f in FACTORS))
        p = self.planted
        return {
            "format_version": FORMAT_VERSION,
            "config": asdict(self.cfg),
            "garments": [
                {"token": f"planted-{g}", **dict(zip(("category", "colour", "pattern"), x.words))}
                for g, x in enumerate(p.garments)
            ],
            "gallery": {k: p.kind.count(k) for k in ("planted", "look-alike", "random")},
            "prompts": prompts_for(p.garments[0], self.template),
            "rows": rows,
            "within": WITHIN,
            "seconds": seconds,
            "timings": self.timings,
        }

    def _say(self, message: str) -> None:
        if self.cfg.progress:
            print(message, file=sys.stderr, flush=True)


# ----- outputs
LABELS = {"words": "words (reference)", "parent": "parent word only (control)", "random": "random token (control)"}


def _cell(x, fmt: str = "{:.1f}") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else fmt.format(x)


def markdown(summary: dict) -> str:
    rows, g = summary["rows"], summary["gallery"]
    n = len(summary["garments"])
    pr = summary["prompts"]
    out = [
        f"(a) Retrieval: {n} planted garments x {g['planted'] // n} held-out images; gallery {sum(g.values())} "
        f"({g['planted']} planted, {g['look-alike']} look-alikes, {g['random']} random). "
        f'Queries e.g. "{pr["token"]}" vs "{pr["words"]}". MRR and R@k x100.',
        "",
        "| query | MRR | R@1 | R@5 | MRR / words | within 10% |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        a = r["retrieval"]
        within = "-" if "within" not in a else ("yes" if a["within"] else "no")
        out.append(
            f"| {LABELS.get(name, name)} | {a['mrr']:.1f} | {a['r1']:.1f} | {a['r5']:.1f} | "
            f"{_cell(a.get('ratio'), '{:.2f}')} | {within} |"
        )
    if any(r["generation"] for r in rows.values()):
        k = summary["config"]["gen_images"]
        out += [
            "",
            f"(b) Generation readback: {k} images per garment and prompt, read by the world's CLIP zero-shot: "
            "share read as the planted word (token prompt | words prompt, same seeds).",
            "",
            "| prompt | category | colour | pattern | all three | all three / words | each word within 10% |",
            "|---|---|---|---|---|---|---|",
        ]
        words = rows.get("words", {}).get("generation", {})
        for name, r in rows.items():
            b = r["generation"]
            cells = [
                f"{b[f]:.2f}" if name == "words" or not words else f"{b[f]:.2f} \\| {words[f]:.2f}"
                for f in (*FACTORS, "all")
            ]
            within = "-" if "within" not in b else ("yes" if b["within"] else "no")
            out.append(
                f"| {LABELS.get(name, name)} | {' | '.join(cells)} | {_cell(b.get('ratio'), '{:.2f}')} | {within} |"
            )
    names = list(rows)
    out += [
        "",
        "Per garment: MRR x100 (a) / all-three readback (b).",
        "",
        "| garment | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for i, garment in enumerate(summary["garments"]):
        cells = []
        for name in names:
            mrr = rows[name]["retrieval"]["per_garment_mrr"][i]
            gen = rows[name]["generation"].get("per_garment_all")
            cells.append(f"{mrr:.0f}" + (f" / {gen[i]:.2f}" if gen else ""))
        words = garment_phrase(garment["category"], garment["colour"], garment["pattern"])
        out.append(f"| {words} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv=None) -> tuple[PlantedConfig, bool, int]:
    """(config, print JSON instead of tables, torch threads or 0)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.planted",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = PlantedConfig()
    p.add_argument("--concepts", type=int, help=f"planted garments (default {d.concepts}; --quick {QUICK['concepts']})")
    p.add_argument(
        "--steps", type=int, help=f"optimiser steps, every method (default {d.steps}; --quick {QUICK['steps']})"
    )
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=d.seed, help="draws the world; seeds tokens and generated images")
    p.add_argument(
        "--quick", action="store_true", help="2 garments, 100 steps, 4 images per prompt: a smoke run of a few minutes"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of the tables")
    p.add_argument("--shots", type=int, default=d.shots, help="training images per garment")
    p.add_argument("--held-out", type=int, default=d.held_out, help="held-out contexts (one image per garment each)")
    p.add_argument("--lookalikes", type=int, default=d.lookalikes, help="look-alikes per garment and word changed")
    p.add_argument(
        "--views",
        action="store_true",
        help="keep the world's views (back view, bag, zoom-in), which hide part of a garment in some photos: "
        "robustness rather than recovery",
    )
    p.add_argument("--random-distractors", type=int, help=f"random distractor images (default {d.random_distractors})")
    p.add_argument(
        "--gen-images", type=int, help=f"generated images per garment and prompt (default {d.gen_images}; 0: skip (b))"
    )
    p.add_argument(
        "--negatives",
        default=d.negatives,
        choices=("diffusion", "world"),
        help="l_CE negatives of ours/pt: sampled from the diffusion model for the parent prompt (as learn-token), "
        "or rendered scenes of the category",
    )
    p.add_argument("--model", default=d.model, help="CLIP SPEC (default toyworld: only it speaks the world's grammar)")
    p.add_argument("--diffusion", default=d.diffusion, help="diffusion SPEC (auto: the one paired with --model)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", default=d.out, help="summary.json and the token cache (default out/planted)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: torch's; 1 on cores shared with other jobs)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (none either when stderr is not a terminal)"
    )
    a = p.parse_args(argv)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    cfg = replace(
        d,
        methods=methods,
        seed=a.seed,
        shots=a.shots,
        held_out=a.held_out,
        lookalikes=a.lookalikes,
        views=a.views,
        negatives=a.negatives,
        model=a.model,
        diffusion=a.diffusion,
        device=a.device,
        out=a.out,
        progress=not a.no_progress and sys.stderr.isatty(),  # no bars in a log file
    )
    if a.quick:
        cfg = replace(cfg, **QUICK)
    given = {
        "concepts": a.concepts,
        "steps": a.steps,
        "random_distractors": a.random_distractors,
        "gen_images": a.gen_images,
    }
    return replace(cfg, **{k: v for k, v in given.items() if v is not None}), a.json, a.threads


def main(argv=None) -> dict:
    cfg, as_json, threads = parse_args(argv)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    summary = PlantedBenchmark(cfg).run()
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(markdown(summary))
        print(
            f"\n{cfg.concepts} garments, {cfg.steps} steps, methods {','.join(cfg.methods)}, seed {cfg.seed}, "
            f"negatives from {cfg.negatives}; model {cfg.model}; {time.perf_counter() - t0:.0f} s. "
            f"Summary in {cfg.out}/summary.json."
        )
    return summary


if __name__ == "__main__":
    main()
