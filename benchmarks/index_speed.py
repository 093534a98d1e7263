"""Benchmark the index layer: search speed and recall of each index type (`--part search`), and the
encoder's embedding speed (`--part embed`: benchmarks/embed_speed.py).

    python -m benchmarks.index_speed --part search --sizes 100000 1000000 --dim 768
    python benchmarks/index_speed.py --part search --sizes 100000 --types flat auto ivf --queries 500

Search part, for each database size and index type: build time (train + add + recall tuning), queries/s
for one batch of held-out queries, recall@10 against exact search, and the index's size on disk (what it
holds in memory). Printed as a markdown table. The target: `auto` at 1M vectors reaches recall@10 >= 0.95
at >= 5x the queries/s of exact (flat) search.

Re-ranking reads vectors from an in-memory float32 array here; `IndexStore` reads them from memory-mapped
float16 embeddings, which adds the cost of reading k * rerank_factor rows per query.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexes.vector_index import (  # noqa: E402
    IndexConfig,
    IndexType,
    build_index,
    choose_index_type,
    exact_search,
    recall_at_k,
    save_index,
    search,
)

K = 10
CHUNK = 100_000  # rows generated per seeded chunk (the data do not depend on --sizes' order)
PROBE_N = 20_000  # smallest probe build for estimating a build's time; sizes <= 5 * PROBE_N just build
# The estimate fits t = fixed + per-vector cost to builds on n/40 and n/20 vectors: fixed costs (IVF-PQ's
# codebook training, capped at train_sample vectors) do not grow with n. HNSW's per-vector cost also grows
# as log n (graph hops per insertion); IVF's grows slowly with nlist and is taken as constant.


# ---------------------------------------------------------------------------------------------------------
# data


def clustered_unit_vectors(n: int, d: int, seed: int = 0, stream: int = 0) -> np.ndarray:
    """(n, d) float32 unit vectors shaped like CLIP image embeddings, generated in seeded chunks.

    Why not uniform random vectors: in 768 dimensions they have no neighbourhood structure (every pair has
    cosine 0 +- 0.04, the nearest neighbour is hardly nearer than the farthest), so IVF cells and HNSW
    links carry no information and any approximate index looks far worse than on real embeddings. CLIP
    embeddings lie near a low-dimensional, clustered manifold and share a common direction. So: a
    two-level gaussian mixture (100 themes x 100 sub-clusters) in a 64-dimensional latent space, plus a
    shared offset, mapped into d dimensions by a random orthonormal basis, plus isotropic noise. Points
    spread wider than their sub-clusters are apart, so clusters overlap (tighter clusters made IVF
    unrealistically easy: nprobe 2 sufficed at 1M). `stream` draws other points (e.g. queries) from the
    same distribution. At d = 768 a point's cosine is ~0.84 to its nearest neighbour, ~0.80 to its 10th
    and 0.29 +- 0.11 to a random point (`describe` prints them).
    """
    latent, n_themes, n_sub = min(64, d), 100, 100
    model = np.random.default_rng([seed, 0])
    basis = np.linalg.qr(model.standard_normal((d, latent)))[0].T.astype(np.float32)  # (latent, d) orthonormal rows
    shared = model.standard_normal(latent) * 0.8  # common direction, norm ~6
    themes = model.standard_normal((n_themes, latent))  # norm ~8
    subs = themes[:, None, :] + model.standard_normal((n_themes, n_sub, latent)) * 0.5  # norm ~4 around a theme
    subs = subs.reshape(-1, latent)
    out = np.empty((n, d), np.float32)
    for c, a in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, 1 + stream, c])
        m = min(CHUNK, n - a)
        z = subs[rng.integers(len(subs), size=m)] + shared + rng.standard_normal((m, latent)) * 0.7  # (m, latent)
        x = z.astype(np.float32) @ basis + rng.standard_normal((m, d), dtype=np.float32) * 0.06  # (m, d)
        out[a : a + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def describe(vectors: np.ndarray, queries: np.ndarray, true_scores: np.ndarray, seed: int = 0) -> str:
    """Cosines that show the data's structure: query to its 1st and 10th neighbour, and random pairs."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(len(vectors), size=(2, 2000))
    random_pairs = np.einsum("ij,ij->i", vectors[a], vectors[b])
    return (
        f"cosine of a query to its 1st neighbour {true_scores[:, 0].mean():.3f}, 10th {true_scores[:, K - 1].mean():.3f}, "
        f"random pairs {random_pairs.mean():.3f} +- {random_pairs.std():.3f}"
    )


# ---------------------------------------------------------------------------------------------------------
# search benchmark


def config_for(index_type: str, seed: int) -> IndexConfig:
    return IndexConfig(index_type=IndexType(index_type), seed=seed)


def estimate_build_seconds(vectors: np.ndarray, kind: str, config: IndexConfig) -> float | None:
    """Seconds to build `kind` over all of `vectors`, extrapolated from builds on two prefixes of them
    (None: flat, or small enough to just build)."""
    n = len(vectors)
    if kind == "flat" or n <= 5 * PROBE_N:
        return None
    config = replace(config, index_type=IndexType(kind))  # `auto` would resolve to flat on a small prefix
    sizes = [max(PROBE_N // 2, n // 40), max(PROBE_N, n // 20)]
    seconds = []
    for m in sizes:
        t0 = time.perf_counter()
        build_index(vectors[:m], np.arange(m, dtype=np.int64), config)
        seconds.append(time.perf_counter() - t0)
    per_vector = max(seconds[1] - seconds[0], 0.0) / (sizes[1] - sizes[0])
    growth = math.log(n) / math.log(sizes[1]) if kind == "hnsw" else 1.0
    return seconds[1] + per_vector * growth * (n - sizes[1])


def index_bytes(index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        save_index(index, path)
        return path.stat().st_size


def bench_one(vectors, ids, queries, true_ids, config: IndexConfig) -> dict:
    """Build, tune and search one index; the measurements of one table row."""
    # 1. build (train, add, tune)
    t0 = time.perf_counter()
    index, params = build_index(vectors, ids, config)
    build_s = time.perf_counter() - t0

    # 2. search one batch of queries, re-ranking from the in-memory vectors
    def lookup(wanted: np.ndarray) -> np.ndarray:
        return vectors[wanted]  # ids are row numbers here

    search(index, params, queries, K, vectors_for_ids=lookup)  # warm-up: first-touch of large buffers
    t0 = time.perf_counter()
    _, found = search(index, params, queries, K, vectors_for_ids=lookup)
    search_s = time.perf_counter() - t0

    # 3. quality and size
    row = {
        "resolved": params.index_type,
        "setting": (
            f"nprobe={params.nprobe}"
            if params.nprobe
            else f"efSearch={params.ef_search}"
            if params.ef_search
            else "exact"
        ),
        "build_s": build_s,
        "qps": len(queries) / search_s,
        "recall": recall_at_k(found, true_ids, K),
        "tuned_recall": params.measured_recall,
        "index_mb": index_bytes(index) / 2**20,
        "load": os.getloadavg()[0],  # other processes on the machine slow every number down
    }
    del index
    gc.collect()
    return row


def bench_search(
    sizes: list[int],
    dim: int = 768,
    types: list[str] = ("flat", "auto", "hnsw", "ivf", "ivfpq"),
    n_queries: int = 1000,
    max_build_seconds: float = 900.0,
    seed: int = 0,
) -> list[dict]:
    """For each size and type: one row of build_s, qps, speedup over flat, recall@10, index MB (or skipped)."""
    rows = []
    for n in sizes:
        # 1. data, held-out queries, exact ground truth
        t0 = time.perf_counter()
        vectors = clustered_unit_vectors(n, dim, seed=seed)
        queries = clustered_unit_vectors(n_queries, dim, seed=seed, stream=1)
        ids = np.arange(n, dtype=np.int64)
        print(f"\n## n = {n:,}, d = {dim}: generated in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        true_scores, true_ids = exact_search(vectors, ids, queries, K)
        print(
            f"exact ground truth for {n_queries} queries: {time.perf_counter() - t0:.1f} s; "
            f"{describe(vectors, queries, true_scores, seed)}",
            flush=True,
        )

        # 2. each type: estimate, build, measure (auto reuses the row of the type it resolves to)
        done: dict[str, dict] = {}
        for index_type in types:
            config = config_for(index_type, seed)
            kind = choose_index_type(n, dim, config).value
            row = {"n": n, "type": index_type}
            if kind in done:
                row.update(done[kind], note=f"same index as {kind}")
            else:
                estimate = estimate_build_seconds(vectors, kind, config)
                if estimate is not None:
                    print(f"{index_type}: estimated build {estimate:.0f} s", flush=True)
                if estimate is not None and estimate > max_build_seconds:
                    reason = f"skipped: estimated build {estimate:.0f} s > --max-build-seconds {max_build_seconds:g}"
                    print(f"{index_type}: {reason}", flush=True)
                    rows.append({**row, "resolved": kind, "note": reason})
                    continue
                row.update(bench_one(vectors, ids, queries, true_ids, config))
                row["note"] = f"estimated build {estimate:.0f} s" if estimate is not None else ""
                done[kind] = {k: v for k, v in row.items() if k not in ("n", "type")}
            print(
                f"{index_type} ({row['resolved']}, {row['setting']}): build {row['build_s']:.1f} s, "
                f"{row['qps']:.0f} queries/s, recall@10 {row['recall']:.3f}",
                flush=True,
            )
            rows.append(row)
        flat = done.get("flat")
        for row in rows:
            if row["n"] == n and "qps" in row and flat:
                row["speedup"] = row["qps"] / flat["qps"]
        print("\n" + format_table([r for r in rows if r["n"] == n]), flush=True)
        del vectors
        gc.collect()
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "| n | type | resolved | setting | build s | queries/s | x flat | recall@10 | tuned recall@10 | index MB "
        "| load | note |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "qps" not in r:
            lines.append(f"| {r['n']:,} | {r['type']} | {r['resolved']} | | | | | | | | | {r['note']} |")
            continue
        tuned = f"{r['tuned_recall']:.3f}" if r["tuned_recall"] is not None else "exact"
        speedup = f"{r['speedup']:.1f}" if "speedup" in r else ""
        lines.append(
            f"| {r['n']:,} | {r['type']} | {r['resolved']} | {r['setting']} | {r['build_s']:.1f} | "
            f"{r['qps']:.0f} | {speedup} | {r['recall']:.3f} | {tuned} | {r['index_mb']:.0f} | {r['load']:.1f} "
            f"| {r['note']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# embedding benchmark


def bench_embed(args: argparse.Namespace) -> list[dict]:
    """Images/s of indexing end to end vs. the model alone (benchmarks/embed_speed.py); prints a table."""
    from benchmarks.embed_speed import bench_embed as run
    from benchmarks.embed_speed import format_embed_table

    rows = run(
        args.archs,
        args.images,
        batch_size=args.batch_size,
        workers=args.workers,
        photo_size=tuple(args.photo_size),
        device=args.device,
    )
    print(format_embed_table(rows))
    return rows


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        choices=["search", "embed", "all"],
        default="search",
        help="search: index types (this file); embed: encoder speed; all: both",
    )
    search_args = parser.add_argument_group("search part")
    search_args.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="database sizes")
    search_args.add_argument("--dim", type=int, default=768, help="vector dimension (ViT-L/14: 768)")
    search_args.add_argument(
        "--types",
        nargs="+",
        default=["flat", "auto", "hnsw", "ivf", "ivfpq"],
        choices=[t.value for t in IndexType],
        help="index types to measure",
    )
    search_args.add_argument("--queries", type=int, default=1000, help="held-out queries, searched as one batch")
    search_args.add_argument(
        "--max-build-seconds",
        type=float,
        default=900.0,
        help="skip a type whose build, extrapolated from builds on n/40 and n/20 vectors, would take longer",
    )
    search_args.add_argument("--seed", type=int, default=0)
    embed_args = parser.add_argument_group("embed part")
    embed_args.add_argument(
        "--archs",
        nargs="+",
        default=["ViT-B-32", "ViT-L-14-quickgelu"],
        help="open_clip architectures, random weights (speed does not depend on them)",
    )
    embed_args.add_argument("--images", type=int, nargs="+", default=[256, 32], help="gallery size per architecture")
    embed_args.add_argument("--batch-size", type=int, default=32)
    embed_args.add_argument("--workers", type=int, default=-1, help="decoding processes (-1: indexer default)")
    embed_args.add_argument("--photo-size", type=int, nargs=2, default=[1600, 1200], help="generated JPEG size")
    embed_args.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    if args.part in ("search", "all"):
        rows = bench_search(args.sizes, args.dim, args.types, args.queries, args.max_build_seconds, args.seed)
        if len(args.sizes) > 1:
            print("\n# all sizes\n" + format_table(rows))
    if args.part in ("embed", "all"):
        bench_embed(args)


if __name__ == "__main__":
    main()
