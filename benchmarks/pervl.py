"""MRR tables on PerVL-DeepFashion2 and on the synthetic world, method by method (Perera et al., Table 4).

    python benchmarks/pervl.py --annotations ../shared/pervl/deep_fashion --images /data/DeepFashion2 \\
        --model ViT-L-14-quickgelu/openai --diffusion sd14 --parent dress --shots 21    # the paper's setting (GPU)
    python benchmarks/pervl.py --world synthetic --quick                                 # the toy world, CPU, minutes

Protocol (PALAVRA's caption-retrieval evaluation, as PerVL publishes it):
- Concepts: the split's few-shot lists (`<split>_fsl_train.txt`). For each seed, `--shots` images per concept are
  drawn without replacement from its list (numpy Generator seeded [seed, pair_id]; all of them if fewer). The
  paper trains on "all available training images per class": `--shots 21`, the longest list (10 to 21 images).
- Parent word c: the concept's coarse category (`train_coarse_grained_names.csv`), or a fixed word (`--parent
  dress`, the paper's choice).
- Queries: one per evaluation caption. The concept goes beside the first "person": `insert_concept` turns
  "a wide lawn is behind a person with raised arms." into "... a person wearing a SLOT with raised arms." (a
  caption without "person" gets "a person wearing a SLOT, " in front; `retrieval.composed.insert_concept`). SLOT per method:
    text                  the parent word: "a person wearing a dress with raised arms"
    text+image            the same text; q = unit(unit(g(text)) + unit(mean f(shots)))
    pt, ti, batex, ours   "*" and the planner's parent: "a person wearing a <c12> dress with raised arms"
                          (retrieval.composed, [t, *, c]); q = g(that)
    pt+gair, ours+gair    the same query through GAIR (retrieval.gair, Algorithm 1), the same tokens as pt / ours
- Gallery: every evaluation image of the split. The one correct answer is the image the caption was written for.
  Its rank = 1 + the number of OTHER gallery images scoring >= it (ties count against the method: a tie never
  helps). MRR = mean of 1/rank (x100 in the table); Recall@k = share of queries with rank <= k (x100).
- Not reproduced: PALAVRA (needs its inversion network trained on COCO captions, neither shipped nor trainable
  offline) and Ideal Words (not implemented yet); both are listed in the table with the paper's number only.

Everything expensive is cached under `--out/cache` by a key of what made it (gallery features; learned tokens
per method and seed; per-query ranks per method and seed; GAIR context images), so an interrupted run resumes.
Outputs: the markdown table on stdout, `ranks.csv` and `ranks.parquet` (one row per method, seed and query) and
`summary.json` ({"config", "methods": {NAME: {"mrr", "mrr_std", "n_queries", ...}}, ...}, MRR x100) in `--out`.
`--merge RUN [RUN ...]` makes one table (and those three files) from several runs' outputs of one protocol, e.g.
seeds run in different sessions (`merge_runs`).

Defaults for real data are the papers' (Perera et al. Sec. 5: 20000 steps, lr 5e-4, batch 4, 10 vectors,
lambda_CE 1e-5; BaTex 500 steps), except GAIR's weights W: Algorithm 1 writes only "W <- [w_0, ..., w_N]" and the
paper gives no values, so the default grid 0.0..1.0 by 0.1 (`--gair-weights 0:1:0.1`, the grid of
`retrieval.gair.DEFAULT_WEIGHTS`) is ours, not the paper's. The synthetic world (`--world synthetic`) runs on 2 CPU
cores, so its profile is smaller and says so: `SYNTHETIC` and `QUICK` below.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python benchmarks/pervl.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from benchmarks.pervl_data import PervlSplit, fsl_image_path, missing_images, query_image_path, read_split
from benchmarks.world.config import WorldConfig, parse_overrides
from retrieval import Engine
from retrieval.composed import insert_concept, plan_query
from retrieval.distributed import TokenJob, learn_tokens_on_ray
from retrieval.gair import GairConfig, parse_weights, run_gair
from retrieval.io.atomic import write_atomic, write_json, write_npy, write_parquet
from retrieval.io.images import load_image
from retrieval.models import DEFAULT_MODEL
from tokens.learn import ConceptImages, learn_tokens
from tokens.methods import METHOD_DEFAULTS, MODEL_DEFAULTS, token_train_config
from tokens.token_file import load_token_file, save_token_file

FORMAT_VERSION = 1
METHOD_NAMES = {
    "text": "Text only",
    "text+image": "Text + avg image",
    "pt": "Prompt tuning",
    "pt+gair": "Prompt tuning + GAIR",
    "ti": "Textual inversion",
    "batex": "BaTex",
    "ours": "Ours",
    "ours+gair": "Ours + GAIR",
}
METHODS = tuple(METHOD_NAMES)
TOKEN_METHOD = {"pt": "pt", "pt+gair": "pt", "ti": "ti", "batex": "batex", "ours": "ours", "ours+gair": "ours"}
# Perera et al., Table 4 (DeepFashion2, 50 concepts, MRR x100)
PAPER_TABLE4 = {
    "text": 17.6,
    "text+image": 21.7,
    "palavra": 28.4,
    "ideal-words": 37.0,
    "pt": 51.4,
    "pt+gair": 45.2,
    "ours": 56.6,
    "ours+gair": 58.8,
}
NOT_REPRODUCED = {
    "palavra": (
        "PALAVRA",
        "needs PALAVRA's inversion network, trained on COCO captions; neither the network nor COCO "
        "can be had offline, and training it is a project of its own",
    ),
    "ideal-words": ("Ideal Words", "not implemented in this project yet"),
}
PAPER_ATTRIBUTES_NOTE = "red, old, worn, bright, dark, pink (Perera et al., DeepFashion2)"
# The toy world's CLIP knows only its own grammar and words: its prompt templates and GAIR words (the paper's red and
# pink, white and black for bright and dark) are tokens.methods.MODEL_DEFAULTS["toyworld"].
SYNTHETIC_ATTRIBUTES = MODEL_DEFAULTS["toyworld"]["context_attributes"]
SYNTHETIC_SD_TEMPLATES = MODEL_DEFAULTS["toyworld"]["sd_templates"]
SYNTHETIC_CLASS_TEMPLATE = MODEL_DEFAULTS["toyworld"]["class_template"]


@dataclass
class BenchConfig:
    annotations: str | None = None  # PerVL annotation folder; None with world="synthetic"
    images: str | None = None  # images root holding train/image/
    split: str = "test"
    captions: str = "default"  # default ({split}_captions.csv), short, detailed
    shots: int = 5  # few-shot images per concept and seed
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    model: str = DEFAULT_MODEL  # CLIP SPEC (the tokens' and the gallery's)
    diffusion: str = "auto"  # diffusion SPEC; auto: paired with model
    parent: str = "category"  # "category" or a fixed word
    out: str = "out/pervl"
    concepts: int = 0  # first N concepts of the split; 0: all
    steps: dict = field(default_factory=dict)  # method -> optimiser steps; missing: the method's default
    vectors: int = 10
    lr: float = 5e-4
    lambda_ce: float | None = None  # ours' weight of l_CE (Perera et al. Sec. 4.2); None: the paper's 1e-5 (Sec. 5)
    n_negatives: int = 16
    negative_steps: int | None = None  # None: the diffusion model's default sampler steps
    sd_templates: tuple[str, ...] | None = None  # None: the token trainer's defaults
    class_template: str | None = None
    gair_weights: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))
    gair_steps: int | None = None  # None: the diffusion model's default
    gair_guidance: float | None = None
    attributes: tuple[str, ...] = ("red", "old", "worn", "bright", "dark", "pink")
    world: str | None = None  # "synthetic": the toy world's split with its models
    world_seed: int = 0
    world_preset: str | None = None  # None: the world the CLIP was trained in (benchmarks.world.trained_world)
    world_overrides: dict = field(default_factory=dict)  # WorldConfig fields over the preset (--world-set)
    device: str = "auto"
    progress: bool = True
    engine: str = "local"  # local | ray: each (method, seed)'s tokens learned on a Ray cluster, in concept batches
    address: str | None = None  # with engine ray: the cluster (auto, HOST:PORT); None: a new local Ray


# ----- profiles for the synthetic world (2 CPU cores). Steps are the one CPU-bound knob: measured costs are in
# the closing note of issue 6; the papers' 20000 steps would take days here.
SYNTHETIC = {
    "model": "toyworld",
    "diffusion": "toyworld",
    "parent": "category",
    "attributes": SYNTHETIC_ATTRIBUTES,
    "sd_templates": SYNTHETIC_SD_TEMPLATES,
    "class_template": SYNTHETIC_CLASS_TEMPLATE,
    "steps": {"pt": 200, "ti": 200, "ours": 200, "batex": 200},
    "n_negatives": 16,
    "negative_steps": 25,
    "gair_weights": tuple(round(i / 5, 1) for i in range(6)),
    "gair_steps": 10,
}
QUICK = {
    "concepts": 10,
    "seeds": (0,),
    "steps": {"pt": 100, "ti": 100, "ours": 100, "batex": 100},
    "n_negatives": 8,
    "negative_steps": 10,
    "gair_weights": (0.0, 0.25, 0.5, 0.75, 1.0),
    "gair_steps": 8,
}


# ----- the protocol, as functions that tests check by hand
def target_rank(scores: np.ndarray, target: int) -> int:
    """1 + the number of other gallery images scoring >= the target's score (ties count against)."""
    s = scores[target]
    return int((scores > s).sum() + (scores == s).sum())  # (== s) counts the target itself: the "1 +"


def metrics(ranks) -> dict[str, float]:
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no queries")
    return {
        "mrr": float(100 * np.mean(1.0 / r)),
        "r1": float(100 * np.mean(r <= 1)),
        "r5": float(100 * np.mean(r <= 5)),
        "r10": float(100 * np.mean(r <= 10)),
    }


def paired_mrr_difference(ranks_a, ranks_b, concepts, draws: int = 5000, seed: int = 0) -> dict[str, float]:
    """MRR(a) - MRR(b) (x100) over the same queries, with a 95% interval from a bootstrap that resamples CONCEPTS
    (a concept's queries share its token and its shots, so they are not independent draws): one seed's table can
    then say whether two rows differ. Queries are matched by position; `concepts` gives each query's concept."""
    a, b = (1.0 / np.asarray(r, dtype=np.float64) for r in (ranks_a, ranks_b))
    groups = np.asarray(concepts)
    if not (a.shape == b.shape == groups.shape) or a.size == 0:
        raise ValueError(f"ranks {a.shape}, {b.shape} and concepts {groups.shape}: one equal, non-empty length")
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=a - b, minlength=len(ids))  # per concept: sum of reciprocal-rank changes
    counts = np.bincount(inverse, minlength=len(ids))
    pick = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))  # concepts with replacement
    boot = sums[pick].sum(1) / counts[pick].sum(1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(100 * (a - b).mean()), "low": float(100 * low), "high": float(100 * high)}


def sample_shots(names: list[str], k: int, seed: int, pair_id: str) -> list[str]:
    """K of a concept's few-shot image names, drawn without replacement (all when fewer), in list order."""
    if len(names) <= k:
        return list(names)
    rng = np.random.default_rng([seed, int(pair_id)])
    return [names[i] for i in sorted(rng.choice(len(names), size=k, replace=False))]


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----- the run
class Benchmark:
    def __init__(self, config: BenchConfig):
        if config.world == "synthetic" and config.world_preset is None:  # the CLIP's own world, named in the summary
            from benchmarks.world import trained_world

            config = replace(config, world_preset=trained_world(config.model))
        self.cfg = config
        self.out = Path(config.out)
        self.cache = self.out / "cache"
        self._engine = None  # retrieval.Engine: the models, loaded on first use
        self.timings: dict[str, float] = {}

    # 1. data
    def load_split(self) -> tuple[PervlSplit, Path]:
        cfg = self.cfg
        if cfg.world == "synthetic":
            from benchmarks.world import world_config, write_split

            world = world_config(cfg.world_preset, **{"seed": cfg.world_seed, **cfg.world_overrides})
            paths = write_split(self.out / "world", world, cfg.split)
            annotations, images = paths.annotations, paths.images
        else:
            if not cfg.annotations or not cfg.images:
                raise SystemExit("give --annotations DIR and --images DIR (or --world synthetic)")
            annotations, images = Path(cfg.annotations), Path(cfg.images)
        split = read_split(annotations, cfg.split, cfg.captions)
        self.gallery_names = split.queries["image_name"].tolist()  # the gallery: every evaluation image of the split
        if cfg.concepts:  # queries of the first N concepts only; the gallery stays whole
            keep = split.pair_ids[: cfg.concepts]
            split = PervlSplit(
                split.split,
                {p: split.fsl_train[p] for p in keep},
                split.queries[split.queries["pair_id"].isin(keep)].reset_index(drop=True),
                {p: split.categories[p] for p in keep},
            )
        missing = missing_images(split, images)
        if missing:
            total = split.n_fsl_images + len(split.queries)
            raise SystemExit(
                f"{len(missing)} of {total} images of the {cfg.split} split are missing under {images}, e.g. "
                f"{', '.join(str(p) for p in missing[:3])}. PerVL uses DeepFashion2's training images "
                "(train/image/NNNNNN.jpg), which its owners hand out on request "
                "(https://github.com/switchablenorms/DeepFashion2): point --images at the folder holding train/image/"
            )
        return split, images

    def parent_of(self, split: PervlSplit, pair_id: str) -> str:
        return split.categories[pair_id] if self.cfg.parent == "category" else self.cfg.parent

    # 2. models
    def models(self, need_diffusion: bool):
        """(clip, backbone or None) of the engine: each loads once, the diffusion model only when needed."""
        if self._engine is None:
            self._engine = Engine(model=self.cfg.model, diffusion=self.cfg.diffusion or "auto", device=self.cfg.device)
        return self._engine.clip, self._engine.backbone if need_diffusion else None

    def gallery_features(self, split: PervlSplit, images: Path) -> np.ndarray:
        """(G, dim) unit CLIP features of every evaluation image of the split (the gallery), cached."""
        clip, _ = self.models(False)
        names = self.gallery_names
        path = self.cache / f"gallery-{_key([self.cfg.model, str(images), names])}.npy"
        if path.is_file():
            return np.load(path)
        feats = clip.encode_pil([load_image(query_image_path(images, n)) for n in names])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npy(path, feats)
        return feats

    # 3. tokens
    def ablated_lambda_ce(self, method: str) -> float | None:
        """--lambda-ce where it applies (ours and ours+gair's tokens); None: the paper's weight, and the cache names
        and keys made before the option."""
        return self.cfg.lambda_ce if TOKEN_METHOD.get(method) == "ours" else None

    def train_config(self, method: str, seed: int):
        cfg = self.cfg
        over = {"lr": cfg.lr, "n_vectors": cfg.vectors, "seed": seed, "n_negatives": cfg.n_negatives, "min_images": 1}
        if method in cfg.steps:
            over["steps"] = cfg.steps[method]
        if self.ablated_lambda_ce(method) is not None:
            over["lambda_ce"] = self.ablated_lambda_ce(method)
        if cfg.sd_templates:
            over["sd_templates"] = tuple(cfg.sd_templates)
        if cfg.class_template:
            over["class_template"] = cfg.class_template
        return token_train_config(method, **over)

    def tokens(self, method: str, seed: int, split: PervlSplit, images: Path, shots: dict[str, list[str]]):
        """{pair_id: CustomToken} learned for every concept in ONE batched loop (tokens.learn.learn_tokens), cached
        per (method, seed)."""

        config = self.train_config(method, seed)
        # a lambda_CE other than the paper's gets its own folder, so that one cache holds an ablation's tokens
        weight = "" if self.ablated_lambda_ce(method) is None else f"-lambda_ce{config.lambda_ce:g}"
        folder = self.cache / "tokens" / f"{method}{weight}-seed{seed}"
        key = json.loads(
            json.dumps(
                {  # as it reads back from key.json
                    "config": asdict(config),
                    "model": self.cfg.model,
                    "diffusion": self.cfg.diffusion,
                    "shots": shots,
                    "parents": {p: self.parent_of(split, p) for p in shots},
                    "images": str(images),
                    "negative_steps": self.cfg.negative_steps,
                },
                default=str,
            )
        )
        if (folder / "key.json").is_file() and json.loads((folder / "key.json").read_text()) == key:
            return {p: load_token_file(folder / f"c{p}.safetensors") for p in shots}
        clip, backbone = self.models(config.needs_diffusion(negatives_given=False))
        if backbone is not None:  # negatives are sampled the diffusion model's own way (steps, guidance)
            config = replace(
                config,
                negative_steps=self.cfg.negative_steps or backbone.sampling["steps"],
                negative_guidance=backbone.sampling["guidance_scale"],
            )
        concepts = [
            ConceptImages(
                f"c{pair_id}",
                self.parent_of(split, pair_id),
                [load_image(fsl_image_path(images, n)) for n in names],
                seed=seed * 1000 + i,
            )
            for i, (pair_id, names) in enumerate(shots.items())
        ]
        if self.cfg.engine == "ray":  # the same tokens (seeds fixed per concept), batches of concepts over the workers
            [learned] = learn_tokens_on_ray(
                self.cfg.model,
                self.cfg.diffusion or "auto",
                [TokenJob(config, concepts)],
                self.cache / "negatives",
                address=self.cfg.address,
                device=self.cfg.device,
                progress=self.cfg.progress,
            )
        else:
            learned = learn_tokens(
                clip, backbone, config, concepts, self.cache / "negatives", progress=self.cfg.progress
            )
        self.timings[f"train {method} seed {seed}"] = learned[0].info.training["seconds"]  # the batched loop's
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for pair_id, token in zip(shots, learned):
            save_token_file(folder / f"c{pair_id}.safetensors", token)
            out[pair_id] = token
        write_json(folder / "key.json", key)  # last: the tokens are complete
        return out

    # 4. query vectors per method
    def query_vectors(self, method: str, seed: int, split: PervlSplit, images: Path, shots) -> tuple[np.ndarray, list]:
        """(Q, dim) query vectors, and per query (query text, GAIR w or None)."""
        clip, _ = self.models(False)
        q = split.queries
        parents = [self.parent_of(split, p) for p in q["pair_id"]]
        if method in ("text", "text+image"):
            texts = [insert_concept(c, parent) for c, parent in zip(q["caption"], parents)]
            vecs = clip.encode_texts(texts)
            if method == "text+image":
                means = {}
                for p in shots:
                    f = clip.encode_pil([load_image(fsl_image_path(images, n)) for n in shots[p]]).mean(0)
                    means[p] = f / np.linalg.norm(f)
                vecs = vecs + np.stack([means[p] for p in q["pair_id"]])
                vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
            return vecs.astype(np.float32), [(t, None) for t in texts]
        tokens = self.tokens(TOKEN_METHOD[method], seed, split, images, shots)
        plans = [plan_query(insert_concept(c, "*"), [tokens[p]]) for c, p in zip(q["caption"], q["pair_id"])]
        if not method.endswith("+gair"):
            vectors = {t.placeholder: t.vectors.to(clip.device) for t in tokens.values()}
            return clip.encode_texts([p.composed for p in plans], vectors), [(p.composed, None) for p in plans]
        _, backbone = self.models(True)
        gcfg = GairConfig(
            weights=tuple(self.cfg.gair_weights),
            steps=self.cfg.gair_steps,
            guidance_scale=self.cfg.gair_guidance,
            seed=seed,
        )
        concept_means = np.stack([np.asarray(tokens[p].info.concept_feature, np.float32) for p in q["pair_id"]])
        outcomes = []
        chunk = max(1, gcfg.batch_size // len(gcfg.weights))
        for start in range(0, len(plans), chunk):
            outcomes += run_gair(
                plans[start : start + chunk],
                backbone,
                concept_means[start : start + chunk],
                list(self.cfg.attributes),
                gcfg,
                cache_dir=self.cache / "gair_context",
            )
            if self.cfg.progress:
                print(
                    f"\r  {method} seed {seed}: GAIR {min(start + chunk, len(plans))}/{len(plans)} queries",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        if self.cfg.progress:
            print(file=sys.stderr)
        return np.stack([o.query_vector for o in outcomes]), [(p.composed, o.w) for p, o in zip(plans, outcomes)]

    # 5. ranks of one (method, seed), cached
    def ranks(self, method: str, seed: int, split: PervlSplit, images: Path, gallery: np.ndarray) -> pd.DataFrame:
        shots = {p: sample_shots(split.fsl_train[p], self.cfg.shots, seed, p) for p in split.pair_ids}
        cfg = asdict(self.cfg)
        relevant = {
            k: cfg[k]
            for k in (
                "model",
                "diffusion",
                "parent",
                "shots",
                "vectors",
                "lr",
                "n_negatives",
                "negative_steps",
                "sd_templates",
                "class_template",
                "captions",
                "split",
            )
        }
        if method != "text":
            relevant["steps"] = cfg["steps"].get(TOKEN_METHOD.get(method, ""), None)
        if self.ablated_lambda_ce(method) is not None:
            relevant["lambda_ce"] = self.ablated_lambda_ce(method)
        if method.endswith("+gair"):
            relevant.update({k: cfg[k] for k in ("gair_weights", "gair_steps", "gair_guidance", "attributes")})
        key = _key(
            [
                FORMAT_VERSION,
                method,
                seed,
                relevant,
                shots,
                split.queries.to_dict("list"),
                self.gallery_names,
                str(images),
            ]
        )
        path = self.cache / "ranks" / f"{method.replace('+', '_')}-seed{seed}-{key}.parquet"
        if path.is_file():
            return pd.read_parquet(path)
        t0 = time.perf_counter()
        vecs, info = self.query_vectors(method, seed, split, images, shots)
        scores = vecs @ gallery.T  # (Q, G)
        where = {n: i for i, n in enumerate(self.gallery_names)}
        ranks = [target_rank(scores[i], where[n]) for i, n in enumerate(split.queries["image_name"])]
        frame = pd.DataFrame(
            {
                "method": method,
                "seed": seed,
                "pair_id": split.queries["pair_id"].astype(str),
                "image_name": split.queries["image_name"],
                "caption": split.queries["caption"],
                "query": [t for t, _ in info],
                "rank": ranks,
                "rr": [1.0 / r for r in ranks],
                "gair_w": [np.nan if w is None else w for _, w in info],
                "seconds": time.perf_counter() - t0,
            }
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(path, frame)
        return frame

    def run(self) -> dict:
        t0 = time.perf_counter()
        split, images = self.load_split()
        gallery = self.gallery_features(split, images)
        frames = []
        for method in self.cfg.methods:
            for seed in self.cfg.seeds:
                if self.cfg.progress:
                    print(f"{method} seed {seed} ...", file=sys.stderr, flush=True)
                frames.append(self.ranks(method, seed, split, images, gallery))
        ranks = pd.concat(frames, ignore_index=True)
        summary = self.summarise(ranks, split, time.perf_counter() - t0)
        write_outputs(self.out, ranks, summary)
        return summary

    # 6. outputs
    def summarise(self, ranks: pd.DataFrame, split: PervlSplit, seconds: float) -> dict:
        split_record = {
            "name": split.split,
            "concepts": len(split.pair_ids),
            "queries": len(split.queries),
            "gallery": len(self.gallery_names),
        }
        return summary_record(
            asdict(self.cfg), split_record, method_rows(ranks, self.cfg.methods), seconds, self.timings
        )


# ----- the table from rank rows: one run's, or several runs' merged (`--merge`)
def method_rows(ranks: pd.DataFrame, methods: Sequence[str]) -> dict[str, dict]:
    """{method: MRR, R@k (mean and std over the method's seeds, x100), n_queries, seeds, ...} from rank rows (one per
    method, seed and query). Each method's seeds are those its rows hold, so a merged table may give methods
    different seeds; every seed of a method must rank the same number of queries."""
    rows = {}
    for method in methods:
        sub = ranks[ranks["method"] == method]
        if sub.empty:
            raise ValueError(f"no ranks for method {method!r}")
        counts = sub.groupby("seed").size()
        if counts.nunique() != 1:
            raise ValueError(f"{method}: seeds rank different numbers of queries ({counts.to_dict()})")
        per_seed = [metrics(g["rank"]) for _, g in sub.groupby("seed")]
        row = {}
        for k in ("mrr", "r1", "r5", "r10"):
            values = np.array([m[k] for m in per_seed])
            row[k] = float(values.mean())
            row[f"{k}_std"] = float(values.std(ddof=0))
        row.update(
            n_queries=int(counts.iloc[0]),
            seeds=[int(x) for x in counts.index],
            seconds=float(sub.groupby("seed")["seconds"].first().sum()),
            name=METHOD_NAMES[method],
            paper_mrr=PAPER_TABLE4.get(method),
        )
        if method.endswith("+gair"):
            row["gair_w_mean"] = float(sub["gair_w"].mean())
        rows[method] = row
    return rows


def summary_record(config: dict, split: dict, methods: dict, seconds: float, timings: dict, **extra) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "config": config,
        "split": split,
        "methods": methods,
        "not_reproduced": {
            k: {"name": n, "reason": r, "paper_mrr": PAPER_TABLE4[k]} for k, (n, r) in NOT_REPRODUCED.items()
        },
        "paper_table4": PAPER_TABLE4,
        "seconds": seconds,
        "timings": timings,
        "tie_rule": "rank = 1 + other gallery images scoring >= the answer",
        **extra,
    }


# config fields that may differ between runs merged into one table: which rows and seeds a run computed, and how
MERGE_FREE = ("seeds", "methods", "out", "device", "progress", "engine", "address")


def merge_runs(runs: Sequence[str | Path], out: str | Path) -> dict:
    """One table from several runs' outputs (their `--out` folders: summary.json and ranks.parquet), e.g. seeds or
    methods computed in different sessions. The runs must share the protocol (every config field but MERGE_FREE's)
    and the split; a (method, seed) that two runs both hold must have the same ranks there (the same tokens), and
    is counted once. Writes summary.json, ranks.parquet and ranks.csv to `out`, as a run does."""
    frames, protocol, split, seconds = [], None, None, 0.0
    for run in map(Path, runs):
        try:
            summary = json.loads((run / "summary.json").read_text())
            frame = pd.read_parquet(run / "ranks.parquet")
        except (OSError, ValueError) as e:
            raise ValueError(f"{run}: not a benchmark output (summary.json and ranks.parquet): {e}") from e
        if summary.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{run}: summary format {summary.get('format_version')}, this script reads {FORMAT_VERSION}"
            )
        mine = {k: v for k, v in summary["config"].items() if k not in MERGE_FREE}
        if protocol is None:
            protocol, split, first = mine, summary["split"], run
        elif mine != protocol or summary["split"] != split:
            fields = sorted(k for k in set(mine) | set(protocol) if mine.get(k) != protocol.get(k))
            raise ValueError(f"{run} and {first} ran different protocols (fields {fields or ['split']}): not one table")
        frames.append(frame.assign(_run=str(run)))
        seconds += float(summary.get("seconds", 0.0))
    if not frames:
        raise ValueError("give at least one run to merge")
    ranks = pd.concat(frames, ignore_index=True)
    query = ["method", "seed", "image_name"]
    clash = ranks.groupby(query)["rank"].transform("nunique") > 1
    if clash.any():
        method, seed = ranks.loc[clash, ["method", "seed"]].iloc[0]
        runs_of = sorted(set(ranks.loc[clash & (ranks["method"] == method) & (ranks["seed"] == seed), "_run"]))
        raise ValueError(f"{method} seed {seed}: runs {runs_of} rank it differently")
    ranks = ranks.drop_duplicates(query).drop(columns="_run").reset_index(drop=True)
    methods = [m for m in METHODS if m in set(ranks["method"])]
    config = {**protocol, "methods": methods, "seeds": sorted({int(s) for s in ranks["seed"]}), "out": str(out)}
    summary = summary_record(
        config, split, method_rows(ranks, methods), seconds, {}, merged_from=[str(r) for r in runs]
    )
    write_outputs(Path(out), ranks, summary)
    return summary


def write_outputs(out: Path, ranks: pd.DataFrame, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / "ranks.parquet", ranks)
    write_atomic(out / "ranks.csv", lambda p: ranks.to_csv(p, index=False), suffix=".csv")
    write_json(out / "summary.json", summary)


def markdown(summary: dict) -> str:
    """The table: MRR as mean +- std over the method's seeds (the seeds column says how many)."""
    lines = [
        "| method | MRR | R@1 | R@5 | R@10 | seeds | queries | paper MRR (Table 4) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in summary["methods"].values():
        paper = "-" if m["paper_mrr"] is None else f"{m['paper_mrr']:.1f}"
        mrr = f"{m['mrr']:.1f}" + (f" ± {m['mrr_std']:.1f}" if len(m["seeds"]) > 1 else "")
        lines.append(
            f"| {m['name']} | {mrr} | {m['r1']:.1f} | {m['r5']:.1f} | {m['r10']:.1f} | {len(m['seeds'])} | "
            f"{m['n_queries']} | {paper} |"
        )
    for m in summary["not_reproduced"].values():
        lines.append(f"| {m['name']} | not reproduced: {m['reason']} | | | | | | {m['paper_mrr']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(
        prog="python benchmarks/pervl.py",
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for the protocol.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--annotations", help="PerVL annotation folder (e.g. ../shared/pervl/deep_fashion)")
    p.add_argument("--images", help="DeepFashion2 root: the folder holding train/image/")
    p.add_argument("--world", choices=("synthetic",), help="run on the synthetic world's split with its small models")
    p.add_argument(
        "--world-seed", type=int, default=0, help="seed of the synthetic world (another seed, another world)"
    )
    p.add_argument(
        "--world-preset",
        help="with --world synthetic: the world's preset (benchmarks.world.config.PRESETS; default: the one the CLIP "
        "was trained in, from its train_config.json)",
    )
    p.add_argument(
        "--world-set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="with --world synthetic: override a WorldConfig field, e.g. --world-set group_sizes=[4,6] (repeatable; "
        "another world: give it its own --out). The calibration screen in the README uses it",
    )
    p.add_argument("--split", default="test", choices=("test", "validation"))
    p.add_argument(
        "--captions",
        default="default",
        choices=("default", "short", "detailed"),
        help="default: <split>_captions.csv; short / detailed: the shortened_ / detailed_ variants",
    )
    p.add_argument(
        "--shots", type=int, default=5, help="few-shot images per concept (default 5; the paper's setting: 21, all)"
    )
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--model", help="CLIP SPEC (default ViT-L-14-quickgelu/openai; synthetic: toyworld)")
    p.add_argument("--diffusion", help="diffusion SPEC (default: paired with --model)")
    p.add_argument(
        "--parent", help="'category' (each concept's coarse category, the default) or a fixed word (the paper: dress)"
    )
    p.add_argument(
        "--steps", type=int, help="optimiser steps for every token method (default: the method's; see profiles)"
    )
    p.add_argument(
        "--lambda-ce",
        type=float,
        help="ours' weight of the classification loss l_CE (default: the paper's 1e-5, Perera et al. Sec. 5); for an "
        "ablation, one value per run: each keeps its own tokens and ranks in --out's cache",
    )
    p.add_argument("--concepts", type=int, help="only the first N concepts (default all; --quick 10)")
    p.add_argument("--attributes", help="GAIR context words, comma-separated (default: " + PAPER_ATTRIBUTES_NOTE + ")")
    p.add_argument(
        "--gair-weights",
        help="GAIR weights, comma-separated or start:stop:step (default 0:1:0.1: our grid, the paper gives no values)",
    )
    p.add_argument("--gair-steps", type=int, help="GAIR sampler steps (default: the diffusion model's)")
    p.add_argument("--quick", action="store_true", help="10 concepts, 1 seed, fewer steps: minutes on 2 CPU cores")
    p.add_argument("--out", default="out/pervl", help="results and caches (default out/pervl)")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="RUN",
        help="print and write (to --out) one table from earlier runs' --out folders, e.g. seeds or methods run in "
        "different sessions; they must share the protocol. Takes no other option but --out",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (none either when stderr is not a terminal)"
    )
    p.add_argument(
        "--engine", default="local", choices=("local", "ray"), help="ray: learn the tokens on a Ray cluster (--address)"
    )
    p.add_argument("--address", help="with --engine ray: the cluster (auto, HOST:PORT; default: a new local Ray)")
    a = p.parse_args(argv)
    if a.world is None and not (a.annotations and a.images):
        p.error("give --annotations DIR and --images DIR, or --world synthetic")
    cfg = BenchConfig(
        annotations=a.annotations,
        images=a.images,
        split=a.split,
        captions=a.captions,
        shots=a.shots,
        out=a.out,
        device=a.device,
        progress=not a.no_progress and sys.stderr.isatty(),  # no bars in a log file
        engine=a.engine,
        address=a.address,
        world=a.world,
        world_seed=a.world_seed,
        world_preset=a.world_preset,
        world_overrides=parse_overrides(a.world_set, WorldConfig, "--world-set"),
    )
    if cfg.world_overrides and a.world != "synthetic":
        raise SystemExit("--world-set changes the synthetic world: give it with --world synthetic")
    if a.world == "synthetic":
        cfg = replace(cfg, **SYNTHETIC)
    if a.quick:
        cfg = replace(cfg, **QUICK)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        not_here = [m for m in unknown if m in NOT_REPRODUCED]
        p.error(
            f"unknown method(s) {unknown}"
            + (f" ({not_here}: not reproduced, see the module docstring)" if not_here else "")
            + f"; choose from {','.join(METHODS)}"
        )
    cfg = replace(cfg, methods=methods)
    if a.seeds:
        cfg = replace(cfg, seeds=tuple(a.seeds))
    for name in ("model", "diffusion", "parent", "concepts", "gair_steps", "lambda_ce"):
        if getattr(a, name) is not None:
            cfg = replace(cfg, **{name: getattr(a, name)})
    if a.lambda_ce is not None and not a.lambda_ce >= 0:
        p.error(f"--lambda-ce {a.lambda_ce}: give a weight >= 0")
    if a.lambda_ce == METHOD_DEFAULTS["ours"]["lambda_ce"]:  # the paper's: the default's tokens and ranks, not new ones
        cfg = replace(cfg, lambda_ce=None)
    if a.steps is not None:
        cfg = replace(cfg, steps={m: a.steps for m in ("pt", "ti", "batex", "ours")})
    if a.attributes:
        cfg = replace(cfg, attributes=tuple(w.strip() for w in a.attributes.split(",") if w.strip()))
    if a.gair_weights:
        cfg = replace(cfg, gair_weights=parse_weights(a.gair_weights))
    return cfg


def main(argv=None) -> dict:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--merge", nargs="+")
    pre.add_argument("--out", default="out/pervl")
    merge, rest = pre.parse_known_args(argv)
    if merge.merge:
        if rest:
            raise SystemExit(f"--merge takes no option but --out (got {' '.join(rest)})")
        try:
            summary = merge_runs(merge.merge, merge.out)
        except ValueError as e:
            raise SystemExit(f"--merge: {e}") from e
        print(markdown(summary))
        s = summary["split"]
        print(
            f"\n{s['concepts']} concepts, {s['queries']} queries, gallery {s['gallery']} images; merged from "
            f"{', '.join(summary['merged_from'])}. Outputs in {merge.out}/ (summary.json, ranks.csv, ranks.parquet)."
        )
        return summary
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    summary = Benchmark(cfg).run()
    print(markdown(summary))
    s = summary["split"]
    # text and text+image load no diffusion model: naming one would say it shaped the numbers
    diffusion = cfg.diffusion if set(cfg.methods) - {"text", "text+image"} else "not used"
    print(
        f"\n{s['concepts']} concepts, {s['queries']} queries, gallery {s['gallery']} images; seeds "
        f"{list(cfg.seeds)}; model {cfg.model}, diffusion {diffusion}"
        + ("" if cfg.lambda_ce is None else f"; ours' lambda_CE {cfg.lambda_ce:g}")
        + f"; {time.perf_counter() - t0:.0f} s. "
        f"Outputs in {cfg.out}/ (summary.json, ranks.csv, ranks.parquet)."
    )
    return summary


if __name__ == "__main__":
    main()
