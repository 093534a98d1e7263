"""Negatives of l_CE (Perera et al., Sec. 4.2): images of the parent class sampled from the diffusion model.

Sec. 4.2: "we sample k images x' = [x'_1, ..., x'_k] from the diffusion model with the prompt 'image of a c'";
Sec. 5 gives prompt tuning the same negatives. k, the sampler and the guidance are not given (TokenTrainConfig:
k = 16, the diffusion model's own steps and guidance).

A user folder (`negatives=DIR`, read by `retrieval.io.images.read_image_folder`), or k images sampled for the
parent prompt ("image of a dress"), cached per (CLIP, diffusion model, prompt, k, seed, sampler settings) under
<tokens-dir>/.negatives/ (`retrieval.io.cache`), so that every token of that parent reuses them.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.io.cache import cached_images
from retrieval.io.images import ImageSet


def negatives_key(backbone, prompt: str, k: int, seed: int, steps: int, guidance: float) -> dict:
    return {
        "diffusion": backbone.spec,
        "clip": backbone.clip.spec,
        "prompt": prompt,
        "k": k,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "size": backbone.image_size,
    }


def sampled_negatives(
    backbone, prompt: str, k: int, seed: int, steps: int, guidance: float, cache_dir: str | Path | None = None
) -> ImageSet:
    """K images sampled for PROMPT (image i with seed + i), cached in CACHE_DIR (see `cached_images`)."""
    key = negatives_key(backbone, prompt, k, seed, steps, guidance)
    return cached_images(
        cache_dir,
        prompt,
        key,
        k,
        lambda: backbone.generate([prompt], n=k, guidance_scale=guidance, steps=steps, seed=seed),
    )
