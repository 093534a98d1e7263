"""Ray's overhead: images/s of embedding a gallery in this process vs. on Ray (retrieval.distributed.RayEmbedder),
side by side in one run, on the same generated gallery and model.

    python -m benchmarks.ray_overhead --model toyworld --images 768 --shard-size 64 --repeats 3

Four ways, each `index_gallery` on the same folder, timed over the embedding loop only (IndexSummary.embed_seconds:
no model loading, no Ray or actor start; the first Ray run, actors starting, is reported apart as `cold`):
- local: as `cli.py index` runs it (the encoder with all of torch's threads, decoding in `default_workers()`
  DataLoader processes);
- local, 1 thread: the encoder with one torch thread, decoding in this process: exactly one actor's work;
- ray, 1 actor: that same work in one Ray actor (1 CPU), the driver dispatching shards and writing them: the
  difference to `local, 1 thread` is Ray's overhead (target <= 15%);
- ray, N actors: one per CPU of the in-process Ray (`--cpus`), each as above.
The runs alternate so that other load on the machine hits all alike; the best of each is compared. On a loaded
2-core machine torch's multi-threaded kernels slow down far more than one thread per process does, so `local` can
lose to `ray, N actors` for reasons that are not Ray's; the overhead is read from the 1-thread pair.
The indexes must hold the same vectors (max |difference| is printed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.embed_speed import write_photo_gallery
from indexes.store import IndexStore
from retrieval.indexer import IndexingConfig, index_gallery
from retrieval.models.encoders import ClipEncoder


def images_per_second(root: Path, index_dir: Path, config: IndexingConfig, **how) -> float:
    """images/s of index_gallery's embedding loop; HOW: encoder= (this process) or embedder= (Ray)."""
    return index_gallery(root, index_dir, config, progress=False, **how).images_per_second


def bench(
    model: str, n_images: int, shard_size: int, batch_size: int, repeats: int, cpus: int, size: tuple[int, int]
) -> dict:
    import ray
    import torch

    from retrieval.distributed import RayEmbedder

    config = IndexingConfig(model=model, device="cpu", precision="fp32", batch_size=batch_size, shard_size=shard_size)
    one_thread = replace(config, workers=0)  # decoding in the encoding process, as in a 1-CPU actor
    runs: dict[str, list[float]] = {"local": [], "local, 1 thread": [], "ray, 1 actor": [], f"ray, {cpus} actors": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "gallery"
        write_photo_gallery(root, n_images, size)
        encoder = ClipEncoder.from_spec(model, device="cpu", precision="fp32")
        threads = torch.get_num_threads()
        t = time.perf_counter()
        # one CPU more than the N actors use: the kept 1-actor pool holds its CPU while the N-actor pool runs
        ray.init(address="local", num_cpus=cpus + 1, include_dashboard=False, logging_level="WARNING")
        ray_init = time.perf_counter() - t
        try:
            with (
                RayEmbedder(num_actors=1, keep_actors=True) as one,
                RayEmbedder(num_actors=cpus, keep_actors=True) as n,
            ):
                t = time.perf_counter()
                cold = images_per_second(root, tmp / "cold-1", config, embedder=one)
                images_per_second(root, tmp / "cold-n", config, embedder=n)
                cold_seconds = time.perf_counter() - t
                for r in range(repeats):
                    runs["local"].append(images_per_second(root, tmp / f"local-{r}", config, encoder=encoder))
                    torch.set_num_threads(1)
                    runs["local, 1 thread"].append(
                        images_per_second(root, tmp / f"l1-{r}", one_thread, encoder=encoder)
                    )
                    torch.set_num_threads(threads)
                    runs["ray, 1 actor"].append(images_per_second(root, tmp / f"ray1-{r}", config, embedder=one))
                    runs[f"ray, {cpus} actors"].append(images_per_second(root, tmp / f"ray-{r}", config, embedder=n))
        finally:
            torch.set_num_threads(threads)
            ray.shutdown()
        ref = IndexStore(tmp / "local-0")
        max_diff = 0.0
        for other in ("l1-0", "ray1-0", "ray-0"):
            store = IndexStore(tmp / other)
            assert store.metadata["path"].tolist() == ref.metadata["path"].tolist()
            diff = np.abs(store.embeddings.astype(np.float32) - ref.embeddings.astype(np.float32)).max()
            max_diff = max(max_diff, float(diff))
    return {
        "model": model,
        "images": n_images,
        "shards": -(-n_images // shard_size),
        "cpus": cpus,
        "runs": runs,
        "cold_images_per_s": cold,
        "cold_seconds": cold_seconds,
        "ray_init_seconds": ray_init,
        "max_abs_diff": max_diff,
    }


def table(r: dict) -> str:
    best = {k: max(v) for k, v in r["runs"].items()}
    overhead = 1 - best["ray, 1 actor"] / best["local, 1 thread"]
    scaling = best[f"ray, {r['cpus']} actors"] / best["local"]
    lines = [
        f"{r['images']} images ({r['shards']} shards), model {r['model']}, in-process Ray of {r['cpus']} CPUs",
        "",
        "| engine | images/s (best) | each run |",
        "| --- | ---: | --- |",
        *(f"| {k} | {best[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for k, v in r["runs"].items()),
        f"| ray, 1 actor, first run (actor starting) | {r['cold_images_per_s']:.1f} | "
        f"both pools' first runs {r['cold_seconds']:.1f} s |",
        "",
        f"Ray overhead (ray, 1 actor vs local, 1 thread): {100 * overhead:+.1f}% (target <= 15%); "
        f"ray, {r['cpus']} actors / local = {scaling:.2f}; "
        f"ray.init {r['ray_init_seconds']:.1f} s; max |embedding difference| {r['max_abs_diff']:.1e}",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toyworld", help="CLIP SPEC (default toyworld; tiny-random: the test model)")
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--shard-size", type=int, default=64, help="images per shard: the unit handed to an actor")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the in-process Ray (one actor each)")
    p.add_argument("--photo-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    a = p.parse_args(argv)
    result = bench(a.model, a.images, a.shard_size, a.batch_size, a.repeats, a.cpus, tuple(a.photo_size))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
