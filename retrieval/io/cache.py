"""Folders of generated images cached on disk, one folder per key (the negatives of l_CE, GAIR's context images).

A cache entry is `<cache_dir>/<slug of label>-<sha1 of key>/` with the PNGs 0000.png ... and `images.json` holding
the key (entries written before this name, with `negatives.json`, are read too). Entries are written atomically: a
reader sees a whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable

from PIL import Image

from retrieval.io.atomic import atomic_dir
from retrieval.io.images import ImageSet, load_image

MANIFEST = "images.json"
LEGACY_MANIFESTS = ("negatives.json",)  # format of the first version: same content


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def _cache_folder(cache_dir: str | Path, label: str, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{_slug(label)}-{digest}"


def read_cached(cache_dir: str | Path | None, label: str, key: dict, k: int) -> ImageSet | None:
    """The K images cached for KEY (see `cached_images`), or None when there are none, or not all K."""
    if cache_dir is None:
        return None
    folder = _cache_folder(cache_dir, label, key)
    manifest = next((folder / m for m in (MANIFEST, *LEGACY_MANIFESTS) if (folder / m).is_file()), None)
    if manifest is not None and json.loads(manifest.read_text()).get("key") == key:
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


def cached_images(
    cache_dir: str | Path | None, label: str, key: dict, k: int, make: Callable[[], list[Image.Image]]
) -> ImageSet:
    """K images that MAKE produces for KEY, read from CACHE_DIR when made before, else made and written there
    atomically: one folder per key (`<slug of label>-<sha1 of key>`) with the PNGs and images.json holding
    the key. A partial or stale folder is replaced. CACHE_DIR None: made every time."""
    found = read_cached(cache_dir, label, key, k)
    if found is not None:
        return found
    images = make()
    if len(images) != k:
        raise RuntimeError(f"expected {k} images for {label!r}, got {len(images)}")
    return write_cached(cache_dir, label, key, images)
