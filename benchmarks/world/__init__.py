"""The toy world: a synthetic stand-in for PerVL-DeepFashion2 in which the whole pipeline runs for real.

Procedurally rendered people wearing garments in contexts, captions from a grammar, concepts that only images
tell apart, and a benchmark split written in PerVL's file formats.

| module      | what it defines                                                        |
| ----------- | ---------------------------------------------------------------------- |
| vocabulary  | names the world can draw and say: contexts, poses, ... (a leaf)        |
| config      | WorldConfig (vocabularies, jitter, split sizes) and named presets      |
| garments    | silhouettes per category, unnamed Details, detail colours              |
| concepts    | Concept, draw_concepts (groups sharing their words: hard negatives)    |
| scene       | Scene, sample_scene                                                    |
| contexts    | background painters, one per context                                   |
| render      | render_scene                                                           |
| captions    | caption (training), context_caption (evaluation), short/detailed       |
| pairs       | sample_training_pair for CLIP / diffusion training                     |
| split       | plan_split, write_split (PerVL formats)                                |
| sheet       | contact_sheet, to look at the world                                    |
| evaluate    | zero-shot classification of images by factor (judges CLIP and samples) |
| schedule    | warmup_cosine_lr, the learning-rate schedule of both trainers          |
| train_clip  | the world's small CLIP, trained from scratch (`--model toyworld`)      |
| train_diffusion | the world's small text-to-image UNet (`--diffusion toyworld`)      |
| train       | both, one command: the CLIP, then the diffusion model on it (~70 min)  |

The trained models live in weights/clip and weights/diffusion (fp16 safetensors, with their training
config, log and evaluation); `python -m benchmarks.world.train` remakes both (`train_clip` / `train_diffusion`
one each).

Tests: tests/test_toyworld.py, tests/test_toyworld_clip.py, tests/test_toyworld_diffusion.py,
tests/test_toyworld_train.py (the reader of the
written split: tests/test_pervl_data.py).
"""

from benchmarks.world.captions import caption, context_caption, detailed_caption, garment_phrase, short_caption
from benchmarks.world.concepts import Concept, draw_concepts
from benchmarks.world.config import PRESETS, WorldConfig, trained_world, world_config
from benchmarks.world.garments import GARMENTS, Details, sample_details
from benchmarks.world.pairs import n_word_combinations, sample_training_pair
from benchmarks.world.render import render_scene
from benchmarks.world.scene import Scene, sample_scene
from benchmarks.world.sheet import contact_sheet, scene_label
from benchmarks.world.split import SplitPaths, SplitPlan, plan_split, write_split

__all__ = [
    "Concept",
    "Details",
    "GARMENTS",
    "PRESETS",
    "Scene",
    "SplitPaths",
    "SplitPlan",
    "WorldConfig",
    "caption",
    "contact_sheet",
    "context_caption",
    "detailed_caption",
    "draw_concepts",
    "garment_phrase",
    "n_word_combinations",
    "plan_split",
    "render_scene",
    "sample_details",
    "sample_scene",
    "sample_training_pair",
    "scene_label",
    "short_caption",
    "trained_world",
    "world_config",
    "write_split",
]
