"""Random (image, caption) pairs for training the toy world's CLIP and diffusion model.

Every factor is drawn uniformly and independently, so every (context, category, colour, pattern, pose)
combination occurs; garments carry random unnamed details (trim bands, emblems) that captions never name,
so the models see details they cannot learn a word for, as custom tokens later must.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.world.captions import caption
from benchmarks.world.config import WorldConfig
from benchmarks.world.render import render_scene
from benchmarks.world.scene import sample_scene


def sample_training_pair(rng: np.random.Generator, config: WorldConfig) -> tuple[Image.Image, str]:
    """One random scene rendered, with one caption of its words."""
    scene = sample_scene(rng, config)
    return render_scene(scene, config), caption(scene, rng)


def n_word_combinations(config: WorldConfig) -> int:
    """How many (context, category, colour, pattern, pose) combinations the world has."""
    return (
        len(config.contexts) * len(config.categories) * len(config.colours) * len(config.patterns) * len(config.poses)
    )
