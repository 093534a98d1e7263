"""The built-in demo: the README's main job, end to end with no download.

    run_demo("demo")   # == python cli.py demo

1. write the synthetic world's PerVL-style test split (rendered scenes + captions) into OUT/world;
2. index its images as a gallery into OUT/index (incremental: a rerun embeds nothing);
3. answer text queries that name the words (garment, colour, pattern, place) of known evaluation images, and
   report the rank of each such image;
4. write a self-contained HTML page of the results to OUT/results.html.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from retrieval.indexer import IndexingConfig, IndexSummary, index_gallery
from retrieval.report import results_html, write_html
from retrieval.search import QueryResult, run_queries
from retrieval.toyworld import world_config, write_split
from retrieval.toyworld.captions import CONTEXT_WORDS, garment_phrase

DEMO_QUERIES = 4  # queries asked by the demo: one per concept, for the first concepts


@dataclass
class DemoResult:
    summary: IndexSummary
    results: list[QueryResult]
    target_ranks: list[int | None]   # rank of the image each query was written for (None: not in the top k)
    targets: list[str]               # that image, relative to the gallery root
    concepts: list[str]              # the concept (pair_id) it shows
    html: Path


def run_demo(out_dir: str | Path = "demo", model: str = "toyworld", k: int = 5, progress: bool = True,
             device: str = "auto") -> DemoResult:
    out = Path(out_dir)
    # 1. the world's test split: 50 concepts, few-shot + evaluation images, PerVL files
    paths = write_split(out / "world", world_config("pervl"), split="test")
    # 2. the gallery is every image of the split
    gallery = paths.images
    config = IndexingConfig(model=model, device=device)
    summary = index_gallery(gallery, out / "index", config, progress=progress)
    # 3. queries with a known answer: the words of an evaluation image (garment and place). Its concept's
    #    look-alikes (same words, same place, other unnamed details) share the caption: words alone cannot
    #    single it out, which is what custom tokens are for.
    scenes = pd.read_csv(paths.scenes)
    evals = scenes[scenes["role"] != "few-shot"].drop_duplicates("pair_id").head(DEMO_QUERIES)
    queries = pd.DataFrame({
        "image_name": evals["image_name"],
        "caption": [f"a person wearing {garment_phrase(r.category, r.colour, r.pattern)} {CONTEXT_WORDS[r.context].places[0]}"
                    for r in evals.itertuples()],
    })
    store, results = run_queries(out / "index", queries["caption"].tolist(), k=k, device=device)
    # gallery paths are relative to the images root, as PerVL's image_name ("train/image/000123.jpg")
    ranks = [next((h.rank for h in r.hits if h.path == t), None) for r, t in zip(results, queries["image_name"])]
    # 4. the page
    html = write_html(out / "results.html", results_html(results, store.manifest["gallery_root"]))
    return DemoResult(summary=summary, results=results, target_ranks=ranks, targets=queries["image_name"].tolist(),
                      concepts=[str(c) for c in evals["pair_id"]], html=html)
