"""The built-in demo: the README's main job, end to end with no download.

    run_demo("demo")   # == python cli.py demo

1. write the synthetic world's PerVL-style test split (rendered scenes + captions) into OUT/world;
2. index its images as a gallery into OUT/index (incremental: a rerun embeds nothing);
3. answer text queries that name the words (garment, colour, pattern, place) of known evaluation images, and
   report the rank of each such image;
4. write a self-contained HTML page of the results to OUT/results.html;
5. learn a custom token (method `ours`, initialised from an `auto` caption: Qiu et al.'s One-Sentence
   initialisation, the fastest to converge in `benchmarks/token_quality.py`; at 300 steps its GAIR images show
   the concept's pink and checks where the parent-word start drew a pale garment) for one concept from its
   few-shot images (OUT/tokens) and answer that concept's evaluation captions three ways: words only (the parent
   word), with the token, and with the token and GAIR; report the rank of each caption's own image and write
   OUT/gair.html (the query visualised: the image generated for each weight w, the context image, the results).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from benchmarks.world import trained_world, world_config, write_split
from benchmarks.world.captions import CONTEXT_WORDS, garment_phrase
from retrieval import Engine, GairConfig, IndexSummary, QueryResult
from retrieval.composed import insert_concept
from retrieval.io.atomic import write_json
from retrieval.io.images import load_image
from retrieval.models.clip import weights_id
from tokens.learn import LearnRequest, request_config
from tokens.trainer import json_safe

DEMO_QUERIES = 4  # queries asked by the demo: the first concepts, one evaluation image each, no caption twice
DEMO_TOKEN_STEPS = 300  # optimiser steps of the demo's token (ours, caption-initialised)
DEMO_SAMPLE_STEPS = 25  # sampler steps of the demo's negatives (the toy diffusion model's default)
DEMO_STAMP = "demo.json"  # the models a demo folder was made by (start_afresh_if_stale)
DEMO_ENTRIES = ("world", "index", "tokens", "results.html", "gair.html", DEMO_STAMP)  # and concept-*/


@dataclass
class TokenDemo:
    """Step 5: one concept's token and its queries, answered three ways."""

    token: str  # token name
    concept: str  # pair_id
    parent: str
    seconds: float  # learning the token
    reused: bool  # the token of an earlier run with the same request was reused
    queries: list[str]  # as written, with *
    targets: list[str]  # the image each was written for
    ranks: dict[str, list[int]]  # "words", "token", "token+gair" -> the target's rank per query
    gair_w: list[float]  # w* per query
    html: Path


@dataclass
class DemoResult:
    summary: IndexSummary
    results: list[QueryResult]
    target_ranks: list[int | None]  # rank of the image each query was written for (None: not in the top k)
    targets: list[str]  # that image, relative to the gallery root
    concepts: list[str]  # the concept (pair_id) it shows
    html: Path
    token: TokenDemo | None = None
    started_afresh: bool = False  # OUT held a demo made by other models, cleared first (start_afresh_if_stale)


def run_demo(
    out_dir: str | Path = "demo",
    model: str = "toyworld",
    k: int = 5,
    progress: bool = True,
    device: str = "auto",
    token_steps: int = DEMO_TOKEN_STEPS,
    sample_steps: int | None = None,
    tokens: bool = True,
) -> DemoResult:
    out = Path(out_dir)
    world = world_config(trained_world(model))
    afresh = start_afresh_if_stale(out, world, model)
    # 1. the world's test split: 50 concepts, few-shot + evaluation images, PerVL files
    paths = write_split(out / "world", world, split="test")
    # 2. the gallery is every image of the split; one engine (its models load once) for everything below
    engine = Engine(out / "index", tokens_dir=out / "tokens", model=model, device=device)
    summary = engine.index(paths.images, progress=progress)
    # 3. queries with a known answer: the words of an evaluation image (garment and place). Its concept's
    #    look-alikes (same words, same place, other unnamed details) share the caption: words alone cannot
    #    single it out, which is what custom tokens are for.
    scenes = pd.read_csv(paths.scenes)
    #    Each query asks other words: look-alikes' evaluation images can share a caption, asked once.
    evals = scenes[scenes["role"] != "few-shot"].drop_duplicates("pair_id").copy()
    evals["caption"] = [
        f"a person wearing {garment_phrase(r.category, r.colour, r.pattern)} {CONTEXT_WORDS[r.context].places[0]}"
        for r in evals.itertuples()
    ]
    evals = evals.drop_duplicates("caption").head(DEMO_QUERIES)
    queries = evals[["image_name", "caption"]]
    results = engine.query_many(queries["caption"].tolist(), k=k)
    # gallery paths are relative to the images root, as PerVL's image_name ("train/image/000123.jpg")
    ranks = [next((h.rank for h in r.hits if h.path == t), None) for r, t in zip(results, queries["image_name"])]
    # 4. the page
    html = engine.report(results, out / "results.html")
    result = DemoResult(
        summary=summary,
        results=results,
        target_ranks=ranks,
        targets=queries["image_name"].tolist(),
        concepts=[str(c) for c in evals["pair_id"]],
        html=html,
        started_afresh=afresh,
    )
    # 5. a custom token for the first concept, then composed and GAIR queries
    if tokens:
        result.token = token_demo(engine, out, paths, scenes, k, token_steps, sample_steps, progress)
    return result


def start_afresh_if_stale(out: Path, world, model: str) -> bool:
    """Clear what an earlier demo run wrote into OUT when it was made by other models: another --model, or the same
    SPEC whose committed weights changed (a new `toyworld` pair brings its own world, whose split, index and token
    the old folder's would refuse: "another config", "other weights"). Everything the demo writes is derived from
    the models and rebuilt in a minute, so the demo starts afresh instead of failing; it removes only its own
    entries (DEMO_ENTRIES and concept-*), and only in a folder its stamp (or, from before the stamp, a toy-world
    split) marks as a demo's. True when it cleared the folder."""
    stamp = {"format_version": 1, "world": json_safe(asdict(world)), "model": model, "model_weights": weights_id(model)}
    path = out / DEMO_STAMP
    if path.is_file():
        stale = json.loads(path.read_text()) != stamp
    else:  # a folder from before the stamp: rebuilt once when it holds the demo's world
        stale = (out / "world" / "toyworld_config.json").is_file()
    if stale:
        for entry in [out / e for e in DEMO_ENTRIES] + sorted(out.glob("concept-*")):
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    write_json(path, stamp)
    return stale


def token_demo(
    engine: Engine, out: Path, paths, scenes: pd.DataFrame, k: int, steps: int, sample_steps: int | None, progress: bool
) -> TokenDemo:
    # the first concept: its few-shot images in a folder of their own, its evaluation captions as queries
    first = scenes[scenes["role"] == "few-shot"].iloc[0]
    pair_id, parent = str(first["pair_id"]), str(first["category"])
    shots = scenes[(scenes["pair_id"] == first["pair_id"]) & (scenes["role"] == "few-shot")]["image_name"].tolist()
    folder = out / f"concept-{pair_id}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in shots:
        if not (folder / Path(name).name).is_file():
            shutil.copyfile(paths.images / name, folder / Path(name).name)
    captions = pd.read_csv(paths.captions)
    mine = captions[captions["pair_id"].astype(str) == pair_id]
    # learn the token (reused on a rerun with the same model and steps)
    name = f"concept-{pair_id}"
    t0 = time.perf_counter()
    # 8 negatives at the toy model's sampler steps keep the demo within minutes on 2 CPU cores
    options = dict(
        method="ours",
        init_caption="auto",
        steps=steps,
        seed=0,
        overwrite=True,
        overrides={"n_negatives": 8, "negative_steps": sample_steps or DEMO_SAMPLE_STEPS},
    )
    request = LearnRequest(name=name, images=folder, parent=parent, model=engine.model, **options)
    info = engine.tokens.info(name) if engine.tokens.exists(name) else None
    reused = (
        info is not None
        and info.model == engine.model
        and info.model_weights == weights_id(engine.model)  # not a token of the same SPEC's earlier weights
        and info.config == json_safe(asdict(request_config(request)))
    )
    if not reused:
        engine.learn_token(name, folder, parent, progress=progress, **options)
    seconds = time.perf_counter() - t0
    # the queries three ways
    queries = [insert_concept(c, "*") for c in mine["caption"]]
    targets = mine["image_name"].tolist()
    everything = engine.store.count
    words = engine.query_many(
        [q.replace("*", parent) for q in queries], [], k=everything
    )  # the parent word in the token's place
    plain = engine.query_many(queries, [name], k=everything)
    gair = engine.query_many(
        queries, [name], k=everything, gair=True, gair_config=GairConfig(steps=sample_steps), progress=progress
    )  # every query and weight in one batched generation
    ranks = {
        key: [next(h.rank for h in r.hits if h.path == t) for r, t in zip(results, targets)]
        for key, results in (("words", words), ("token", plain), ("token+gair", gair))
    }
    ws = [r.gair.w for r in gair]
    for r in gair:
        r.hits = r.hits[:k]
    gair_results = gair
    concept_images = [load_image(folder / Path(n).name) for n in shots[:4]]
    html = engine.report(gair_results, out / "gair.html", concept_images)
    return TokenDemo(name, pair_id, parent, seconds, reused, queries, targets, ranks, ws, html)
