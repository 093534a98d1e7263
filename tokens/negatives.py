"""Images in: a folder of concept (or negative) images read safely, and negatives sampled from the diffusion model.

Negatives of l_CE are images of the parent class: a user folder (`--negatives DIR`), or k images sampled for
the parent prompt ("image of a dress") and cached on disk per (CLIP, diffusion model, prompt, k, seed, sampler
settings), under <tokens-dir>/.negatives/, so that every token of that parent reuses them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from indexes.atomic import atomic_dir
from retrieval.images import IMAGE_EXTENSIONS, BadImage, load_image

MANIFEST = "negatives.json"


@dataclass
class ImageSet:
    images: list[Image.Image]                   # RGB
    paths: list[Path]                           # one per image
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason) of unusable files


def read_image_folder(folder: str | Path, min_images: int, what: str = "concept images") -> ImageSet:
    """Every image file directly in FOLDER (sorted by name), decoded to RGB. Unreadable files are skipped with a
    warning while at least MIN_IMAGES remain; otherwise the error says how many are needed."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{what}: no folder {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what}: {folder} is a file; give the folder that holds the images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    images, paths, skipped = [], [], []
    for p in files:
        try:
            images.append(load_image(p))
            paths.append(p)
        except BadImage as e:
            skipped.append((p, e.reason))
    if len(images) < min_images:
        found = f"{len(images)} usable image{'s' * (len(images) != 1)}"
        why = f" ({len(skipped)} unreadable: " + "; ".join(f"{p.name}: {r}" for p, r in skipped[:5]) + ")" if skipped else ""
        raise ValueError(
            f"{what}: {folder} has {found}{why}; at least {min_images} are needed "
            f"(files ending in {', '.join(sorted(IMAGE_EXTENSIONS))}): add images"
        )
    if skipped:
        warnings.warn(f"{what}: skipped {len(skipped)} unreadable file(s) in {folder}: "
                      + "; ".join(f"{p.name} ({r})" for p, r in skipped))
    return ImageSet(images, paths, skipped)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def negatives_key(backbone, prompt: str, k: int, seed: int, steps: int, guidance: float) -> dict:
    return {"diffusion": backbone.spec, "clip": backbone.clip.spec, "prompt": prompt, "k": k, "seed": seed,
            "steps": steps, "guidance": guidance, "size": backbone.image_size}


def _cache_folder(cache_dir: str | Path, label: str, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{_slug(label)}-{digest}"


def read_cached(cache_dir: str | Path | None, label: str, key: dict, k: int) -> ImageSet | None:
    """The K images cached for KEY (see `cached_images`), or None when there are none, or not all K."""
    if cache_dir is None:
        return None
    folder = _cache_folder(cache_dir, label, key)
    manifest = folder / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == key:
        paths = [folder / f"{i:04d}.png" for i in range(k)]
        if all(p.is_file() for p in paths):
            return ImageSet([load_image(p) for p in paths], paths)
    return None


def write_cached(cache_dir: str | Path | None, label: str, key: dict, images: list[Image.Image]) -> ImageSet:
    """Cache IMAGES for KEY atomically (see `cached_images`); CACHE_DIR None: keep them in memory only."""
    if cache_dir is None:
        return ImageSet(images, [Path(f"<generated {i}>") for i in range(len(images))])
    folder = _cache_folder(cache_dir, label, key)
    if folder.exists():  # a stale or partial cache entry: replaced
        shutil.rmtree(folder)
    try:
        with atomic_dir(folder) as tmp:
            for i, im in enumerate(images):
                im.save(tmp / f"{i:04d}.png")
            (tmp / MANIFEST).write_text(json.dumps({"key": key}, indent=2))
    except OSError:
        if not (folder / MANIFEST).is_file():  # not another process writing the same entry first
            raise
    return ImageSet(images, [folder / f"{i:04d}.png" for i in range(len(images))])


def cached_images(cache_dir: str | Path | None, label: str, key: dict, k: int,
                  make: Callable[[], list[Image.Image]]) -> ImageSet:
    """K images that MAKE produces for KEY, read from CACHE_DIR when made before, else made and written there
    atomically: one folder per key (`<slug of label>-<sha1 of key>`) with the PNGs and negatives.json holding
    the key. A partial or stale folder is replaced. CACHE_DIR None: made every time."""
    found = read_cached(cache_dir, label, key, k)
    if found is not None:
        return found
    images = make()
    if len(images) != k:
        raise RuntimeError(f"expected {k} images for {label!r}, got {len(images)}")
    return write_cached(cache_dir, label, key, images)


def sampled_negatives(backbone, prompt: str, k: int, seed: int, steps: int, guidance: float,
                      cache_dir: str | Path | None = None) -> ImageSet:
    """K images sampled for PROMPT (image i with seed + i), cached in CACHE_DIR (see `cached_images`)."""
    key = negatives_key(backbone, prompt, k, seed, steps, guidance)
    return cached_images(cache_dir, prompt, key, k,
                         lambda: backbone.generate([prompt], n=k, guidance_scale=guidance, steps=steps, seed=seed))
