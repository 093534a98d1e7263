"""A PerVL-DeepFashion2-style benchmark split drawn from the toy world, written in PerVL's own file formats.

    paths = write_split("out/toyworld", WorldConfig(), split="test")
    split = benchmarks.pervl_data.read_split(paths.annotations, "test")   # the reader of the real files

Layout (as PerVL's annotations/deep_fashion/ plus DeepFashion2's image folder):
    <out>/annotations/<split>_fsl_train.txt           codes_infer/<pair_id>: then one image name per line
    <out>/annotations/<split>_captions.csv            image_name,pair_id,caption (one evaluation image a row)
    <out>/annotations/train_coarse_grained_names.csv  unique_pair_ids,pair_id_categories (every split's concepts)
    <out>/annotations/shortened_deepfashion2_captions.csv, detailed_deepfashion2_captions.csv (every split)
    <out>/images/train/image/NNNNNN.jpg
    <out>/<split>_scenes.csv                          ground truth of every image (not a PerVL file)
    <out>/toyworld_config.json                        the WorldConfig that made the folder

Each concept has few-shot images in assorted contexts and `eval_per_concept` evaluation images, one per
context, in contexts none of its few-shot images shows. The concepts of a group (same words) are evaluated in
the same contexts, so the gallery holds hard negatives: same words, same place, other details.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.world.captions import context_caption, detailed_caption, short_caption
from benchmarks.world.concepts import Concept, draw_concepts
from benchmarks.world.config import WorldConfig, written_as
from benchmarks.world.render import render_scene
from benchmarks.world.scene import Scene, sample_scene
from retrieval.io.atomic import write_atomic

FORMAT_VERSION = 1
SPLITS = ("test", "validation")  # PerVL's splits; the index seeds the draw and offsets the ids
PAIR_ID_STRIDE = 10_000  # pair_ids of split i: i * stride + 1, + 2, ...
IMAGE_ID_STRIDE = 100_000  # image numbers of split i: i * stride + 1, ... (6 digits, as DeepFashion2)
IMAGE_DIR = "train/image"  # DeepFashion2's folder, relative to the images root


@dataclass(frozen=True)
class PlannedImage:
    name: str  # file name, e.g. "000123.jpg"
    scene: Scene
    caption: str | None  # evaluation caption; None for a few-shot image

    @property
    def image_name(self) -> str:
        """The name as PerVL's captions files write it: relative to the images root."""
        return f"{IMAGE_DIR}/{self.name}"


@dataclass(frozen=True)
class SplitPlan:
    split: str
    concepts: list[Concept]
    fsl: dict[str, list[PlannedImage]]  # pair_id -> few-shot images
    queries: list[PlannedImage]  # evaluation images, concept by concept


@dataclass(frozen=True)
class SplitPaths:
    root: Path
    annotations: Path  # what benchmarks.pervl_data.read_split reads
    images: Path  # images root: few-shot images are images/train/image/<name>
    fsl_train: Path
    captions: Path
    categories: Path
    short_captions: Path
    detailed_captions: Path
    scenes: Path


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the toy world draws PerVL's splits {SPLITS}")
    return SPLITS.index(split)


def plan_split(config: WorldConfig, split: str = "test") -> SplitPlan:
    """Every scene, file name and caption of a split, drawn from (config.seed, split); nothing is rendered."""
    index = _split_index(split)
    if config.n_concepts >= PAIR_ID_STRIDE:
        raise ValueError(f"n_concepts={config.n_concepts} overflows a split's pair_id range ({PAIR_ID_STRIDE - 1})")
    rng = np.random.default_rng([config.seed, index])
    # 1. concepts, in groups sharing their words
    concepts = draw_concepts(rng, config, config.n_concepts, first_id=index * PAIR_ID_STRIDE + 1)
    numbers = itertools.count(index * IMAGE_ID_STRIDE + 1)
    fsl: dict[str, list[PlannedImage]] = {}
    queries: list[PlannedImage] = []
    for _, group in itertools.groupby(concepts, key=lambda c: c.words):
        group = list(group)
        # 2. the group's evaluation contexts; few-shot images use the others
        eval_contexts = [str(c) for c in rng.choice(config.contexts, config.eval_per_concept, replace=False)]
        others = [c for c in config.contexts if c not in eval_contexts]
        for concept in group:
            n_shots = int(rng.integers(config.shots[0], config.shots[1] + 1))
            # every other context once (in random order) before any repeats
            contexts = [
                others[i]
                for i in np.concatenate([rng.permutation(len(others)) for _ in range(-(-n_shots // len(others)))])
            ]
            fsl[concept.pair_id] = [
                PlannedImage(f"{next(numbers):06d}.jpg", sample_scene(rng, config, concept, context), None)
                for context in contexts[:n_shots]
            ]
            for context in eval_contexts:
                scene = sample_scene(rng, config, concept, context)
                queries.append(PlannedImage(f"{next(numbers):06d}.jpg", scene, context_caption(scene, rng)))
    last = int(queries[-1].name[:-4]) if queries else 0
    if last >= (index + 1) * IMAGE_ID_STRIDE:
        raise ValueError(
            f"split {split!r} has more images than its {IMAGE_ID_STRIDE - 1} file numbers; lower n_concepts or shots"
        )
    return SplitPlan(split, concepts, fsl, queries)


def _check_same_world(root: Path, config: WorldConfig) -> dict:
    """The folder's config record; an error if the folder was written from another config. A field WorldConfig gained
    after the folder was written counts as set to its default, which is what drew that world (fields are added
    with defaults that keep the old world: the view shares, say), so such a folder is the same world
    (`config.written_as`)."""
    record = {"format_version": FORMAT_VERSION, "config": json.loads(json.dumps(dataclasses.asdict(config)))}
    path = root / "toyworld_config.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if existing.get("format_version") != FORMAT_VERSION or not written_as(existing.get("config", {}), config):
            raise ValueError(
                f"{root} holds a toy-world split of another config ({path}); write to an empty folder "
                f"or use the same WorldConfig"
            )
    return record


def _scene_rows(images: list[PlannedImage], role: str) -> list[dict]:
    rows = []
    for im in images:
        s, d = im.scene, im.scene.details
        rows.append(
            {
                "image_name": im.image_name,
                "pair_id": s.concept,
                "role": role,
                "context": s.context,
                "category": s.category,
                "colour": s.colour,
                "pattern": s.pattern,
                "pose": s.pose,
                "trim": d.trim or "",
                "trim_colour": d.trim_colour or "",
                "emblem": d.emblem or "",
                "emblem_at": d.emblem_at or "",
                "emblem_colour": d.emblem_colour or "",
                "back_view": s.back_view,
                "bag": s.bag is not None,
                "zoom": round(s.zoom, 3),
            }
        )
    return rows


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, lineterminator="\n")


def write_split(out_dir: str | Path, config: WorldConfig, split: str = "test") -> SplitPaths:
    """Render a split and write it in PerVL's formats under out_dir (byte-identical files for one config)."""
    root = Path(out_dir)
    paths = SplitPaths(
        root=root,
        annotations=root / "annotations",
        images=root / "images",
        fsl_train=root / "annotations" / f"{split}_fsl_train.txt",
        captions=root / "annotations" / f"{split}_captions.csv",
        categories=root / "annotations" / "train_coarse_grained_names.csv",
        short_captions=root / "annotations" / "shortened_deepfashion2_captions.csv",
        detailed_captions=root / "annotations" / "detailed_deepfashion2_captions.csv",
        scenes=root / f"{split}_scenes.csv",
    )
    # 1. plan every split: the shared files (categories, caption variants) cover them all, as PerVL's do
    plans = {name: plan_split(config, name) for name in SPLITS}
    plan = plans[split]
    record = _check_same_world(root, config)
    image_dir = paths.images / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    paths.annotations.mkdir(parents=True, exist_ok=True)

    # 2. images; an identical file already there is left alone (its mtime too), so that an index of this
    #    folder sees nothing changed when the same world is written again
    fsl_images = [im for images in plan.fsl.values() for im in images]
    for im in fsl_images + plan.queries:
        buf = io.BytesIO()
        render_scene(im.scene, config).save(buf, format="JPEG", quality=config.jpeg_quality)
        target = image_dir / im.name
        if not (target.is_file() and target.read_bytes() == buf.getvalue()):
            write_atomic(target, lambda p, data=buf.getvalue(): p.write_bytes(data))

    # 3. few-shot lists: blocks separated by one blank line, newline at the end (as test_fsl_train.txt)
    blocks = [
        "\n".join([f"codes_infer/{pair_id}:", *(im.name for im in images)]) for pair_id, images in plan.fsl.items()
    ]
    paths.fsl_train.write_text("\n\n".join(blocks) + "\n")

    # 4. evaluation captions, then the files every split shares
    _write_csv(
        pd.DataFrame(
            {
                "image_name": [q.image_name for q in plan.queries],
                "pair_id": [q.scene.concept for q in plan.queries],
                "caption": [q.caption for q in plan.queries],
            }
        ),
        paths.captions,
    )
    all_concepts = [c for p in plans.values() for c in p.concepts]
    _write_csv(
        pd.DataFrame(
            {
                "unique_pair_ids": [int(c.pair_id) for c in all_concepts],
                "pair_id_categories": [c.category for c in all_concepts],
            }
        ),
        paths.categories,
    )
    all_queries = [q for p in plans.values() for q in p.queries]
    for path, variant in ((paths.short_captions, short_caption), (paths.detailed_captions, detailed_caption)):
        _write_csv(
            pd.DataFrame(
                {
                    "image_name": [q.image_name for q in all_queries],
                    "pair_id": [q.scene.concept for q in all_queries],
                    "caption": [variant(q.scene) for q in all_queries],
                }
            ),
            path,
        )

    # 5. what is not PerVL: ground truth of every image, and the config that made the folder
    _write_csv(
        pd.DataFrame(_scene_rows(fsl_images, "few-shot") + _scene_rows(plan.queries, "evaluation")), paths.scenes
    )
    (root / "toyworld_config.json").write_text(json.dumps(record, indent=1) + "\n")
    return paths
