"""Embedding speed: images/s of the whole indexing pipeline vs. the model alone, in the same run.

    python -m benchmarks.index_speed --part embed --archs ViT-B-32 ViT-L-14-quickgelu --images 256 64

For each architecture (random weights: speed does not depend on them), on the same generated JPEG gallery:
- model-only: the images decoded and preprocessed beforehand, in memory; only `encode_images` is timed;
- end-to-end: `index_gallery` on the folder (scan, decode in DataLoader workers, encode, write the shard,
  commit), timed over its embedding loop: decoding must hide behind encoding (target: >= 90% of model-only).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval.gallery import GalleryDataset, collate_gallery, scan_gallery
from retrieval.indexer import IndexingConfig, index_gallery
from retrieval.models.encoders import ClipEncoder


def write_photo_gallery(root: Path, n: int, size: tuple[int, int] = (1600, 1200), seed: int = 0) -> None:
    """N photo-like JPEGs (smooth colour gradients + grain, quality 90): decoding cost like camera images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = np.stack([(xx / w) * 255 * a, (yy / h) * 255 * b, ((xx + yy) / (w + h)) * 255 * c], -1)
        img += rng.normal(0, 12, img.shape[:2] + (1,)).astype(np.float32)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"photo{i:05d}.jpg", quality=90)


def model_only(encoder: ClipEncoder, root: Path, batch_size: int) -> float:
    """images/s of encode_images alone, on batches decoded beforehand."""
    files = scan_gallery(root)
    ds = GalleryDataset(root, files, encoder.preprocess, min_size=encoder.image_size)
    batches = [
        collate_gallery([ds[i] for i in range(s, min(s + batch_size, len(files)))]).pixels
        for s in range(0, len(files), batch_size)
    ]
    encoder.encode_images(batches[0][:2])  # warm-up
    t = time.perf_counter()
    for pixels in batches:
        encoder.encode_images(pixels)
    return len(files) / (time.perf_counter() - t)


def end_to_end(encoder: ClipEncoder, root: Path, batch_size: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = IndexingConfig(model=encoder.spec, batch_size=batch_size, workers=workers)
        summary = index_gallery(root, Path(tmp) / "index", cfg, encoder=encoder, progress=False)
        return summary.images_per_second


def bench_embed(
    archs: list[str],
    n_images: list[int],
    batch_size: int = 32,
    workers: int = -1,
    photo_size: tuple[int, int] = (1600, 1200),
    device: str = "auto",
) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, n in zip(archs, n_images):
            root = Path(tmp) / f"gallery{n}"
            if not root.exists():
                write_photo_gallery(root, n, photo_size)
            encoder = ClipEncoder.from_spec(f"{arch}/random", device=device)
            mo = model_only(encoder, root, batch_size)
            e2e = end_to_end(encoder, root, batch_size, workers)
            rows.append(
                {
                    "arch": arch,
                    "images": n,
                    "photo": f"{photo_size[0]}x{photo_size[1]}",
                    "batch": batch_size,
                    "device": f"{encoder.device.type}/{encoder.precision}",
                    "threads": torch.get_num_threads(),
                    "model_only_img_s": mo,
                    "end_to_end_img_s": e2e,
                    "ratio": e2e / mo,
                }
            )
    return rows


def format_embed_table(rows: list[dict]) -> str:
    head = "| arch | images | photo size | batch | device | torch threads | model-only img/s | end-to-end img/s | end-to-end / model |"
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['images']} | {r['photo']} | {r['batch']} | {r['device']} | {r['threads']} | "
            f"{r['model_only_img_s']:.2f} | {r['end_to_end_img_s']:.2f} | {r['ratio']:.1%} |"
        )
    return "\n".join(lines)
