"""How the index layer scales: commit cost, segment count, hard query distributions, on-disk IVF, autofaiss.

    python -m benchmarks.index_scale commit --sizes 10000 100000 1000000
    python -m benchmarks.index_scale segments                     # 100k rows as 50 commits of 2k, then compacted
    python -m benchmarks.index_scale hard --sizes 200000 1000000
    python -m benchmarks.index_scale ondisk --sizes 1000000
    python -m benchmarks.index_scale autofaiss                    # 1M x 768; --quick: 100k
    python -m benchmarks.index_scale ingest                       # a first index's merge + commit of 1M rows
    python -m benchmarks.index_scale SUBCOMMAND --help             # what each measures, its options

Each measurement runs in a fresh subprocess (`_worker`), so that its peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, KiB on Linux) is its own. A vfork-ed child inherits its parent's
peak through exec, so the driver holds no data (numpy + faiss imported: ~45 MB) and each worker also reports
the kernel's VmHWM of its own address space; the tables print ru_maxrss. RSS counts file pages a process maps
and touches (memory-mapped embeddings and on-disk lists) as well as its own memory.

Data: seeded synthetic unit vectors, d = 768, stored as float16 as the index folder stores them, drawn from a
two-level gaussian mixture (`Distribution`; presets `easy` and `hard`). Queries come in three kinds: `tuning`
(database rows plus the gaussian perturbation `build_index` tunes nprobe on), `image` (held-out draws from the
same mixture) and `text` (held-out draws displaced by one fixed modality-gap vector, as CLIP's text embeddings
sit apart from its image embeddings: Liang et al. 2022, "Mind the Gap: Understanding the Modality Gap in
Multi-modal Contrastive Representation Learning", NeurIPS, arXiv 2203.02053).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexes.vector_index import (  # noqa: E402
    TUNE_NOISE,
    IndexConfig,
    IndexType,
    build_index,
    exact_search,
    recall_at_k,
    search,
    unit_rows,
)

REPO = Path(__file__).resolve().parents[1]
D = 768  # CLIP ViT-L/14
K = 10
CHUNK = 100_000  # rows generated per seeded chunk: the data do not depend on how they are requested
ADDED, DELETED = 100, 10  # the `commit` subcommand's commit: +100 rows, 10 ids tombstoned
OLD_STORE_COMMIT = "f03f634"  # the last commit whose indexes/store.py rewrote the whole generation per commit
TEXT_IMAGE_COSINE = 0.3  # cos(text query, its matching image) of the text-like queries (see `gap_vector`)
MB = 2**20


# ---------------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Distribution:
    """A seeded two-level gaussian mixture of unit vectors: themes -> clusters -> points.

    A point is (its cluster's centre + a shared offset + point noise) in a `latent`-dimensional subspace,
    mapped into d dimensions by a random orthonormal basis, plus isotropic noise, normalised: CLIP embeddings
    lie near a low-dimensional, clustered manifold and share a common direction (random pairs ~0.3)."""

    n_themes: int  # groups of clusters; cluster j belongs to theme j % n_themes; themes ~ N(0, I_latent)
    n_clusters: int  # cluster centres
    latent: int  # dimension of the subspace of the centres and the point noise (d: the whole space)
    cluster_spread: float  # std per latent dimension of a centre around its theme
    point_spread: float  # std per latent dimension of a point around its centre
    shared: float  # std per latent dimension of the one offset every point shares (CLIP's narrow cone)
    noise: float  # std per ambient dimension of isotropic noise


DISTRIBUTIONS = {
    # 1000 centres drawn independently in all 768 dimensions (cosine between centres 0 +- 0.04): well
    # separated, about one cluster per IVF list (auto nlist: 894 at 50k, 1789 at 200k, 2564 at 1M).
    # Image to image: ~0.82 within a cluster, ~0 across.
    "easy": Distribution(1000, 1000, D, cluster_spread=0.0, point_spread=0.5, shared=0.0, noise=0.0),
    # 100k small clusters (2 to 10 points each at 200k to 1M), far more than lists, around 1000 themes in a
    # 64-dimensional subspace plus noise: neighbours at every scale, lists cut through clusters. Image to
    # image at 200k: 1st neighbour ~0.81, 10th ~0.76, random pairs 0.28 +- 0.11 (`hard` prints them).
    "hard": Distribution(1000, 100_000, 64, cluster_spread=0.5, point_spread=0.7, shared=0.8, noise=0.06),
}


def _chunks(n: int, dist: Distribution, seed: int, stream: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, (m, d) float16 unit rows) for rows [0, n) of a stream, in seeded chunks of CHUNK rows."""
    model = np.random.default_rng([seed, 0])
    basis = np.linalg.qr(model.standard_normal((D, dist.latent)))[0].T.astype(np.float32)  # (latent, d)
    shared = model.standard_normal(dist.latent) * dist.shared
    themes = model.standard_normal((dist.n_themes, dist.latent))
    centres = themes[np.arange(dist.n_clusters) % dist.n_themes]
    centres = centres + model.standard_normal((dist.n_clusters, dist.latent)) * dist.cluster_spread
    for c, a in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, 1 + stream, c])
        m = min(CHUNK, n - a)
        z = centres[rng.integers(dist.n_clusters, size=m)] + shared
        z += rng.standard_normal((m, dist.latent)) * dist.point_spread  # (m, latent)
        x = z.astype(np.float32) @ basis  # (m, d)
        if dist.noise:
            x += rng.standard_normal((m, D), dtype=np.float32) * dist.noise
        yield a, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def mixture_unit_vectors(n: int, dist: Distribution, seed: int = 0, stream: int = 0) -> np.ndarray:
    """(n, d) float16 unit rows (the stored form) of `dist`. `stream` draws other points of the same mixture:
    0 the database, 1 held-out queries, 2 rows a commit adds."""
    out = np.empty((n, D), np.float16)
    for a, rows in _chunks(n, dist, seed, stream):
        out[a : a + len(rows)] = rows
    return out


def write_rows(path: Path, n: int, dist: Distribution, seed: int, stream: int = 0) -> None:
    """mixture_unit_vectors(n, ...) written to PATH (.npy) chunk by chunk, never all in memory."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, D))
    for a, rows in _chunks(n, dist, seed, stream):
        out[a : a + len(rows)] = rows
    out.flush()
    del out


def gap_vector(seed: int = 0, cosine: float = TEXT_IMAGE_COSINE) -> np.ndarray:
    """(d,) the modality gap: a fixed random direction g with |g| such that a unit image x moved by it,
    normalise(x + g), has cosine `cosine` to x (g is nearly orthogonal to x: cos = 1 / sqrt(1 + |g|^2)).
    CLIP's matching image-text cosines are ~0.3 while its image-image neighbours are ~0.8."""
    g = np.random.default_rng([seed, 99]).standard_normal(D)
    return (g / np.linalg.norm(g) * math.sqrt(1 / cosine**2 - 1)).astype(np.float32)


def query_sets(vectors: np.ndarray, dist: Distribution, m: int, seed: int) -> dict[str, np.ndarray]:
    """m queries of each kind (module docstring) against `vectors` (n, d) float16: (m, d) float32 unit rows."""
    rng = np.random.default_rng([seed, 7])
    rows = np.sort(rng.choice(len(vectors), size=m, replace=False))
    tuning = unit_rows(vectors[rows])
    tuning += rng.standard_normal(tuning.shape).astype(np.float32) * (TUNE_NOISE / math.sqrt(D))  # as _tune does
    images = unit_rows(mixture_unit_vectors(m, dist, seed, stream=1))
    text = images + gap_vector(seed)
    return {
        "tuning": tuning / np.linalg.norm(tuning, axis=1, keepdims=True),
        "image": images,
        "text": text / np.linalg.norm(text, axis=1, keepdims=True),
    }


def describe(vectors: np.ndarray, queries: dict[str, np.ndarray], truth_scores: dict, seed: int) -> dict:
    """Cosines that show the data's structure: each query kind to its 1st / 10th neighbour, random pairs of
    database vectors, a text query to its matching image."""
    a, b = np.random.default_rng([seed, 3]).integers(len(vectors), size=(2, 2000))
    pairs = np.einsum("ij,ij->i", unit_rows(vectors[a]), unit_rows(vectors[b]))
    out = {"random pairs": f"{pairs.mean():.2f} +- {pairs.std():.2f}"}
    for kind, scores in truth_scores.items():
        out[f"{kind} query: 1st / 10th neighbour"] = f"{scores[:, 0].mean():.2f} / {scores[:, K - 1].mean():.2f}"
    if "text" in queries:
        out["text query to its image"] = f"{np.einsum('ij,ij->i', queries['text'], queries['image']).mean():.2f}"
    return out


def synthetic_metadata(first_id: int, n: int):
    """The metadata frame of n synthetic images with ids first_id.. (the store's META columns)."""
    import pandas as pd  # function-level: the driver and the search-only workers stay free of pandas' ~70 MB

    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    return pd.DataFrame(
        {
            "id": ids,
            "path": [f"img/{i:08d}.jpg" for i in ids],
            "bytes": np.full(n, 200_000, np.int64),
            "mtime_ns": np.full(n, 1_700_000_000_000_000_000, np.int64),
            "width": np.full(n, 512, np.int64),
            "height": np.full(n, 512, np.int64),
        }
    )


def empty_skipped():
    import pandas as pd

    return pd.DataFrame(
        {
            "path": pd.Series(dtype=str),
            "bytes": pd.Series(dtype=np.int64),
            "mtime_ns": pd.Series(dtype=np.int64),
            "reason": pd.Series(dtype=str),
        }
    )


# ---------------------------------------------------------------------------------------------------------
# measuring in fresh processes


def memory() -> dict:
    """This process's memory in MB: peak RSS (ru_maxrss), the kernel's VmHWM, and current RSS split into
    anonymous memory and mapped file pages."""
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()
    kib = lambda key: int(status[key][0]) / 1024 if key in status else float("nan")  # noqa: E731
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "hwm_mb": kib("VmHWM"),
        "rss_mb": kib("VmRSS"),
        "rss_anon_mb": kib("RssAnon"),
        "rss_file_mb": kib("RssFile"),
        "load": os.getloadavg()[0],  # other processes on the machine slow every timing down
    }


def rss_now_mb() -> float:
    return memory()["rss_mb"]


class WorkerError(RuntimeError):
    pass


def run_worker(task: str, **kwargs) -> dict:
    """Run WORKERS[task](**kwargs) in a fresh Python process; its result dict, with its `memory()` at the end."""
    cmd = [sys.executable, "-m", "benchmarks.index_scale", "_worker", task, json.dumps(kwargs)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
    results = [line[len("RESULT ") :] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise WorkerError(f"worker {task} failed with exit code {proc.returncode} (its stderr is above)")
    return json.loads(results[-1])


def files_of(folder: Path) -> dict[str, tuple[int, int, int]]:
    """relative path -> (inode, size, mtime_ns) of every file under FOLDER."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = Path(root) / name
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out[str(p.relative_to(folder))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def written_bytes(before: dict, after: dict) -> tuple[int, int]:
    """(bytes, files) of files that are new or replaced (another inode, size or mtime) between two files_of."""
    new = [k for k, v in after.items() if before.get(k) != v]
    return sum(after[k][1] for k in new), len(new)


def folder_bytes(folder: Path) -> int:
    return sum(size for _, size, _ in files_of(folder).values())


def timed_search(fn: Callable[[np.ndarray], tuple], queries: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """(queries/s, ids (nq, k)) of fn over QUERIES in batches of BATCH, after one warm-up batch."""
    fn(queries[:batch])
    ids = []
    t0 = time.perf_counter()
    for a in range(0, len(queries), batch):
        ids.append(fn(queries[a : a + batch])[1])
    return len(queries) / (time.perf_counter() - t0), np.concatenate(ids)


# ---------------------------------------------------------------------------------------------------------
# workers: each runs in its own process (run_worker); arguments and results are JSON


def w_data(work: str, n: int, dist: str, seed: int, added: int = 0, queries: int = 0) -> dict:
    """Write WORK/db.npy (n rows), WORK/added.npy (ADDED rows, stream 2), and with QUERIES > 0 the image and
    text queries and their exact ground truth (WORK/queries.npz, WORK/truth.npz)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_rows(work / "db.npy", n, DISTRIBUTIONS[dist], seed)
    if added:
        write_rows(work / "added.npy", added, DISTRIBUTIONS[dist], seed, stream=2)
    out = {"generate_s": time.perf_counter() - t0}
    if queries:
        db = np.load(work / "db.npy", mmap_mode="r")
        sets = query_sets(db, DISTRIBUTIONS[dist], queries, seed)
        del sets["tuning"]
        vectors = unit_rows(db)  # (n, d) float32: the vectors every index here is built from
        t0 = time.perf_counter()
        truth = {kind: exact_search(vectors, np.arange(n), q, K) for kind, q in sets.items()}
        out["truth_s"] = time.perf_counter() - t0
        np.savez(work / "queries.npz", **sets)
        np.savez(work / "truth.npz", **{kind: ids for kind, (_, ids) in truth.items()})
        out["describe"] = describe(db, sets, {kind: s for kind, (s, _) in truth.items()}, seed)
    return out


def preload_models() -> None:
    """Import torch and open_clip before a timed commit: both stores record their versions in the manifest
    (library_versions), and the indexer that commits has them loaded already, having just embedded images.
    Without this a commit's time would include ~6-10 s of imports on this machine."""
    import open_clip  # noqa: F401
    import torch  # noqa: F401


def w_store_commit(
    index_dir: str,
    rows_file: str,
    first_id: int,
    n_delete: int,
    next_id: int,
    config: dict,
    auto_compact: bool = True,
) -> dict:
    """One `indexes.store.commit_rows` of the rows in ROWS_FILE (ids first_id..), tombstoning N_DELETE ids
    spread over [0, first_id); time, bytes written, the manifest's segments."""
    from indexes.store import IndexStore, commit_rows  # function-level: the new store's API is optional here

    preload_models()
    embeddings = np.load(rows_file, mmap_mode="r")  # (m, d) float16: the store reads it as it needs
    metadata = synthetic_metadata(first_id, len(embeddings))
    delete = np.linspace(0, first_id - 1, n_delete).astype(np.int64) if n_delete else np.zeros(0, np.int64)
    index_dir = Path(index_dir)
    before = files_of(index_dir) if index_dir.exists() else {}
    rss_before = rss_now_mb()
    t0 = time.perf_counter()
    manifest = commit_rows(
        index_dir,
        metadata,
        embeddings,
        empty_skipped(),
        delete_ids=delete,
        model="synthetic",
        gallery_root="/synthetic",
        next_id=next_id,
        index_config=IndexConfig(**config),
        auto_compact=auto_compact,
    )
    seconds = time.perf_counter() - t0
    written, n_files = written_bytes(before, files_of(index_dir))
    store = IndexStore(index_dir, manifest)
    out = {"seconds": seconds, "written": written, "files": n_files, "rss_before_mb": rss_before}
    ondisk = sum(size for name, (_, size, _) in files_of(index_dir).items() if name.endswith(".ivfdata"))
    out.update(
        count=store.count, segments=store.describe() + (f", {ondisk / MB:.0f} MB of on-disk lists" if ondisk else "")
    )
    store.close()
    return out


def _old_store():
    """indexes/store.py as of OLD_STORE_COMMIT (one generation, rewritten per commit), imported from a
    temporary file. It imports indexes.vector_index and retrieval.io.atomic, which keep its API."""
    source = subprocess.run(
        ["git", "show", f"{OLD_STORE_COMMIT}:indexes/store.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="old-store-")) / f"store_{OLD_STORE_COMMIT}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def w_old_commit(index_dir: str, work: str, n: int, config: dict, base: bool) -> dict:
    """Today's design. BASE: commit the n rows of WORK/db.npy as generation 1 with a flat index (its index
    type does not matter: the next commit rebuilds from the embeddings, and flat skips a long IVF build).
    Otherwise the old indexer's commit of +ADDED rows and DELETED deletions: merge (kept rows read from the
    memory-mapped generation + the new rows, as retrieval/indexer.py's merge did) and commit_generation
    (all embeddings rewritten, the index rebuilt with CONFIG)."""
    old = _old_store()
    import pandas as pd

    preload_models()

    index_dir, work = Path(index_dir), Path(work)
    rss_before = rss_now_mb()
    if base:
        embeddings = np.load(work / "db.npy", mmap_mode="r")
        t0 = time.perf_counter()
        old.commit_generation(
            index_dir,
            synthetic_metadata(0, n),
            np.asarray(embeddings),
            empty_skipped(),
            model="synthetic",
            gallery_root="/synthetic",
            next_id=n,
            index_config=IndexConfig(index_type=IndexType.FLAT),
        )
        return {"seconds": time.perf_counter() - t0, "rss_before_mb": rss_before}
    before = files_of(index_dir)
    t0 = time.perf_counter()
    # 1. merge: what stays, plus what is new
    committed = old.open_committed(index_dir)
    deleted = np.linspace(0, n - 1, DELETED).astype(np.int64)
    kept_rows = np.flatnonzero(~committed.metadata["id"].isin(deleted).to_numpy())
    metadata = pd.concat([committed.metadata.iloc[kept_rows], synthetic_metadata(n, ADDED)], ignore_index=True)
    embeddings = np.concatenate([np.asarray(committed.embeddings[kept_rows]), np.load(work / "added.npy")]).astype(
        np.float16
    )  # (n - DELETED + ADDED, d)
    merge_s = time.perf_counter() - t0
    # 2. the commit: a whole new generation
    manifest = old.commit_generation(
        index_dir,
        metadata,
        embeddings,
        committed.skipped,
        model="synthetic",
        gallery_root="/synthetic",
        next_id=n + ADDED,
        index_config=IndexConfig(**config),
    )
    seconds = time.perf_counter() - t0
    written, n_files = written_bytes(before, files_of(index_dir))
    return {
        "seconds": seconds,
        "merge_s": merge_s,
        "written": written,
        "files": n_files,
        "rss_before_mb": rss_before,
        "count": manifest["count"],
        "segments": f"1 generation ({manifest['index']['params']['index_type']})",
    }


def w_segments_build(index_dir: str, n: int, commits: int, dist: str, seed: int, config: dict) -> dict:
    """N rows of DIST committed as COMMITS commit_rows calls of n / COMMITS rows each, auto_compact=False."""
    from indexes.store import IndexStore, commit_rows

    preload_models()
    vectors = mixture_unit_vectors(n, DISTRIBUTIONS[dist], seed)
    per = n // commits
    seconds = []
    for c in range(commits):
        a, b = c * per, n if c == commits - 1 else (c + 1) * per
        t0 = time.perf_counter()
        manifest = commit_rows(
            index_dir,
            synthetic_metadata(a, b - a),
            vectors[a:b],
            empty_skipped(),
            model="synthetic",
            gallery_root="/synthetic",
            next_id=b,
            index_config=IndexConfig(**config),
            auto_compact=False,
        )
        seconds.append(time.perf_counter() - t0)
    store = IndexStore(index_dir, manifest)
    out = {"commit_s_mean": float(np.mean(seconds)), "commit_s_last": seconds[-1], "segments": store.describe()}
    store.close()
    return out


def w_compact(index_dir: str, config: dict) -> dict:
    from indexes.store import IndexStore, compact

    preload_models()
    t0 = time.perf_counter()
    manifest = compact(index_dir, IndexConfig(**config), full=True)
    seconds = time.perf_counter() - t0
    store = IndexStore(index_dir, manifest)
    out = {"seconds": seconds, "segments": store.describe()}
    store.close()
    return out


def w_store_search(
    index_dir: str, work: str, out_ids: str | None = None, singles: int = 200, batch: int = 64, kinds=("image",)
) -> dict:
    """Open the store, search WORK/queries.npz (k=10): queries/s one query at a time (the first SINGLES) and
    in batches of BATCH; recall@10 against WORK/truth.npz where it exists; RSS of the searching process vs
    the index folder's size on disk."""
    from indexes.store import IndexStore

    work = Path(work)
    queries = np.load(work / "queries.npz")
    truth = np.load(work / "truth.npz") if (work / "truth.npz").exists() else None
    rss_before = rss_now_mb()
    t0 = time.perf_counter()
    store = IndexStore(index_dir)
    store.search(queries[kinds[0]][:1], K)  # first search: loads the segments' indexes
    out = {"open_s": time.perf_counter() - t0, "segments": store.describe(), "rss_before_mb": rss_before}
    saved = {}
    for kind in kinds:
        q = queries[kind]
        out[f"{kind}_qps_1"], _ = timed_search(lambda x: store.search(x, K), q[:singles], 1)
        out[f"{kind}_qps_{batch}"], ids = timed_search(lambda x: store.search(x, K), q, batch)
        saved[kind] = ids
        if truth is not None:
            out[f"{kind}_recall"] = recall_at_k(ids, truth[kind], K)
    if out_ids:
        np.savez(out_ids, **saved)
    out["index_disk_mb"] = folder_bytes(Path(index_dir)) / MB
    out["after_search"] = memory()
    store.close()
    return out


def text_tuning_queries(m: int, dist: Distribution, seed: int) -> np.ndarray:
    """M text-like queries for `build_index(tuning_queries=...)`, drawn apart from the evaluated ones (stream 4):
    what the indexer gives the store in their place, the CLIP text embeddings of generic prompts, which share the
    model's modality gap as these share `gap_vector`."""
    text = unit_rows(mixture_unit_vectors(m, dist, seed, stream=4)) + gap_vector(seed)
    return text / np.linalg.norm(text, axis=1, keepdims=True)


def w_hard(n: int, dist: str, seed: int, queries: int, config: dict, tuning_text: int = 0) -> dict:
    """The project's IVF on N vectors of DIST: recall@10 and queries/s of each query kind at the tuned nprobe,
    and the smallest nprobe (doubling, as tuning does) at which each kind reaches the recall target. TUNING_TEXT:
    that many text-like queries (`text_tuning_queries`) are given to the tuning as well (0: none)."""
    vectors16 = mixture_unit_vectors(n, DISTRIBUTIONS[dist], seed)
    sets = query_sets(vectors16, DISTRIBUTIONS[dist], queries, seed)
    vectors = unit_rows(vectors16)  # (n, d) float32
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    truth = {kind: exact_search(vectors, ids, q, K) for kind, q in sets.items()}
    truth_s = time.perf_counter() - t0
    info = describe(vectors16, sets, {kind: s for kind, (s, _) in truth.items()}, seed)
    del vectors16

    cfg = IndexConfig(**{**config, "index_type": IndexType.IVF})
    t0 = time.perf_counter()
    tuning = text_tuning_queries(tuning_text, DISTRIBUTIONS[dist], seed) if tuning_text else None
    index, params = build_index(vectors, ids, cfg, tuning_queries=tuning)
    build_s = time.perf_counter() - t0
    nlist = faiss.extract_index_ivf(index).nlist

    def lookup(wanted: np.ndarray) -> np.ndarray:
        return vectors[wanted]  # ids are row numbers

    def measure(nprobe: int, kind: str) -> tuple[float, float]:
        p = replace(params, nprobe=nprobe)
        qps, found = timed_search(lambda x: search(index, p, x, K, vectors_for_ids=lookup), sets[kind], len(sets[kind]))
        return recall_at_k(found, truth[kind][1], K), qps

    out = {
        "n": n,
        "dist": dist,
        "nlist": nlist,
        "tuned_nprobe": params.nprobe,
        "tuned_recall": params.measured_recall,
        "build_s": build_s,
        "truth_s": truth_s,
        "describe": info,
        "kinds": {},
    }
    for kind in sets:
        # text queries search with the tuned nprobe; image-like ones with the setting tuned for them (the engine's
        # query by image: SearchParams.for_images), the same unless text tuning queries were given
        tuned = params.nprobe if kind == "text" else params.for_images().nprobe
        recall, qps = measure(tuned, kind)
        row = {"recall": recall, "qps": qps, "sweep": [], "tuned_nprobe": tuned}
        nprobe = 1
        while True:  # doubling from 1, as tuning does
            r, s = (recall, qps) if nprobe == tuned else measure(nprobe, kind)
            row["sweep"].append([nprobe, r, s])
            if r >= cfg.recall_target or nprobe >= min(nlist, 2048):
                break
            nprobe = min(2 * nprobe, nlist, 2048)
        row["needed_nprobe"] = nprobe if r >= cfg.recall_target else None
        row["needed_recall"], row["needed_qps"] = r, s
        out["kinds"][kind] = row
        print(
            f"  {dist} n={n} {kind}: recall {recall:.3f} at tuned nprobe {tuned}; nprobe {nprobe} -> {r:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return out


def w_project_build(work: str, config: dict) -> dict:
    """The project's `auto` index over WORK/db.npy as float32 (the same array autofaiss gets): build time and
    peak RSS, queries/s (one batch of all queries) and recall@10 per query kind."""
    work = Path(work)
    vectors = unit_rows(np.load(work / "db.npy", mmap_mode="r"))  # (n, d) float32
    ids = np.arange(len(vectors), dtype=np.int64)
    queries, truth = np.load(work / "queries.npz"), np.load(work / "truth.npz")
    rss_before = rss_now_mb()
    t0 = time.perf_counter()
    index, params = build_index(vectors, ids, IndexConfig(**config))
    out = {"build_s": time.perf_counter() - t0, "rss_before_mb": rss_before, "build": memory()}
    setting = f"nprobe={params.nprobe}" if params.nprobe else "exact"
    out["index"] = f"auto -> {params.index_type} ({setting}, re-ranked)"
    for kind in queries.files:
        qps, found = timed_search(lambda x: search(index, params, x, K), queries[kind], len(queries[kind]))
        out[kind] = {"qps": qps, "recall": recall_at_k(found, truth[kind], K)}
    return out


def w_autofaiss_build(work: str, max_index_memory: str, memory_available: str) -> dict:
    """autofaiss.build_index over the same float32 array: the index it chose, build time and peak RSS,
    queries/s and recall@10 per query kind with the search parameters it tuned."""
    import logging

    import autofaiss  # function-level: an optional extra (`pip install -e ".[bench]"`)
    import faiss

    work = Path(work)
    vectors = unit_rows(np.load(work / "db.npy", mmap_mode="r"))
    queries, truth = np.load(work / "queries.npz"), np.load(work / "truth.npz")
    rss_before = rss_now_mb()
    with tempfile.TemporaryDirectory(dir=work) as tmp:  # autofaiss writes its index infos to the working folder
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            t0 = time.perf_counter()
            index, info = autofaiss.build_index(
                embeddings=vectors,
                max_index_memory_usage=max_index_memory,
                current_memory_available=memory_available,
                metric_type="ip",
                save_on_disk=False,
                verbose=logging.WARNING,
            )
            build_s = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
    if index is None:
        raise RuntimeError(
            f"autofaiss.build_index returned no index (max_index_memory_usage={max_index_memory}, "
            f"current_memory_available={memory_available}): it refuses unless the second exceeds the first by 10%"
        )
    out = {"build_s": build_s, "rss_before_mb": rss_before, "build": memory()}
    out["index"] = f"{info['index_key']} ({info.get('index_param', '')})"
    faiss.ParameterSpace().set_index_parameters(index, info["index_param"])
    for kind in queries.files:
        qps, found = timed_search(lambda x: index.search(x, K), queries[kind], len(queries[kind]))
        out[kind] = {"qps": qps, "recall": recall_at_k(found, truth[kind], K)}
    return out


def w_shards(work: str, n: int, shard_rows: int, dist: str, seed: int) -> dict:
    """WORK/shards/shard-NNNNNN: N rows of DIST as finished shards of SHARD_ROWS rows (indexes.shards.write_shard),
    what an interrupted or finished embedding run leaves in an index's work/ folder."""
    import pandas as pd

    from indexes.shards import ShardInput, ShardOutput, write_shard

    t0 = time.perf_counter()
    folder = Path(work) / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    files = pd.DataFrame({"path": ["x.jpg"], "bytes": [1], "mtime_ns": [1]})
    done = 0
    for a, rows in _chunks(n, DISTRIBUTIONS[dist], seed, stream=3):
        for b in range(0, len(rows), shard_rows):
            part = rows[b : b + shard_rows]
            meta = synthetic_metadata(a + b, len(part)).drop(columns="id")
            out = ShardOutput(embeddings=part, metadata=meta, skipped=empty_skipped())
            write_shard(folder, done, ShardInput(files=files, model="synthetic", gallery_root="/synthetic"), out)
            done += 1
    return {"seconds": time.perf_counter() - t0, "shards": done}


def w_ingest(work: str, index_dir: str, scratch: bool, config: dict) -> dict:
    """The indexer's last steps on the shards in WORK/shards, as `index_gallery` runs them for a first index:
    read the finished shards (memory-mapped), `retrieval.indexer.merge` them (into a scratch file when SCRATCH,
    else in RAM as before), `commit` one segment. Peak RSS against the bytes of the vectors."""
    import pandas as pd

    from indexes.shards import finished_shards
    from indexes.store import IndexWriter
    from retrieval.indexer import FILE_KEY, GalleryScan, IndexingConfig, commit, diff, merge

    preload_models()
    rss_before = rss_now_mb()
    t0 = time.perf_counter()
    outputs = [out for _, out in finished_shards(Path(work) / "shards", "synthetic", "/synthetic")]
    n = sum(len(o.metadata) for o in outputs)
    paths = pd.concat([o.metadata[["path", "bytes", "mtime_ns"]] for o in outputs], ignore_index=True)
    changes = diff(GalleryScan(root="/synthetic", files=paths[list(FILE_KEY)]), None)
    index_dir = Path(index_dir)
    config_ = IndexingConfig(model="synthetic", index=IndexConfig(**config))
    with IndexWriter(index_dir) as writer:
        writer.open()
        target = Path(work) / "merged-embeddings.npy" if scratch else None
        change = merge(None, changes, outputs, D, scratch=target)
        merge_s = time.perf_counter() - t0
        manifest = commit(writer, change, config_, "/synthetic")
    return {
        "seconds": time.perf_counter() - t0,
        "merge_s": merge_s,
        "rows": n,
        "rss_before_mb": rss_before,
        "count": manifest["count"],
        "segments": f"{len(manifest['segments'])} segment ({manifest['segments'][0]['index']['params']['index_type']})",
    }


WORKERS = {
    "data": w_data,
    "store_commit": w_store_commit,
    "old_commit": w_old_commit,
    "segments_build": w_segments_build,
    "compact": w_compact,
    "store_search": w_store_search,
    "hard": w_hard,
    "project_build": w_project_build,
    "autofaiss_build": w_autofaiss_build,
    "shards": w_shards,
    "ingest": w_ingest,
}


# ---------------------------------------------------------------------------------------------------------
# subcommands: each builds its data, runs its workers, returns markdown


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def index_config(args, **extra) -> dict:
    return {"seed": args.seed, "train_sample": args.train_sample, **extra}


def cmd_commit(args, work: Path) -> str:
    """Commit time, peak RSS and bytes written of +100 images (and 10 deletions) on an index of each size:
    the segmented store (indexes.store.commit_rows: one new segment, a tombstone file, the manifest) vs today's
    design (indexes/store.py at f03f634: the indexer's merge, then commit_generation rewrites every embedding
    and rebuilds the index over n + 90 rows)."""
    rows, times = [], {"new": {}, "old": {}}
    for n in args.sizes:
        w = work / f"commit-{n}"
        print(f"# commit, n = {n:,}", file=sys.stderr, flush=True)
        run_worker("data", work=str(w), n=n, dist=args.distribution, seed=args.seed, added=ADDED)
        cfg = index_config(args)
        base = run_worker(
            "store_commit",
            index_dir=str(w / "new"),
            rows_file=str(w / "db.npy"),
            first_id=0,
            n_delete=0,
            next_id=n,
            config=cfg,
        )
        new = run_worker(
            "store_commit",
            index_dir=str(w / "new"),
            rows_file=str(w / "added.npy"),
            first_id=n,
            n_delete=DELETED,
            next_id=n + ADDED,
            config=cfg,
        )
        old_base = run_worker("old_commit", index_dir=str(w / "old"), work=str(w), n=n, config=cfg, base=True)
        old = run_worker("old_commit", index_dir=str(w / "old"), work=str(w), n=n, config=cfg, base=False)
        for design, r, b in (("new (segments)", new, base), (f"today ({OLD_STORE_COMMIT})", old, old_base)):
            times["new" if design.startswith("new") else "old"][n] = r["seconds"]
            merge = f" (merge {r['merge_s']:.2f})" if "merge_s" in r else ""
            rows.append(
                [
                    f"{n:,}",
                    design,
                    f"{r['seconds']:.2f}{merge}",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['rss_before_mb']:.0f}",
                    f"{r['written'] / MB:.2f}",
                    r["files"],
                    r["segments"],
                    f"{b['seconds']:.1f}",
                    f"{r['load']:.1f}",
                ]
            )
        if not args.keep:
            shutil.rmtree(w, ignore_errors=True)
    out = table(
        [
            "n",
            "design",
            "commit s",
            "peak RSS MB",
            "RSS before MB",
            "written MB",
            "files written",
            "index after the commit",
            "base build s",
            "load",
        ],
        rows,
    )
    lo, hi = min(args.sizes), max(args.sizes)
    if lo != hi:
        out += "\n\n" + "\n".join(
            f"- {name}: commit time at {hi:,} / at {lo:,} = {times[key][hi] / times[key][lo]:.1f}x"
            for key, name in (("new", "new store"), ("old", "today's design"))
        )
    return out


def cmd_segments(args, work: Path) -> str:
    """Search over many segments vs one: N rows committed as --commits commits (auto_compact=False), queries/s
    one query at a time and in batches of 64 (k=10), then compact(full=True) and the same again. Below
    flat_max_vectors every segment is flat (exact), so the ids must be identical, which is checked."""
    out = []
    for n in args.sizes:
        w = work / f"segments-{n}"
        print(f"# segments, n = {n:,} as {args.commits} commits", file=sys.stderr, flush=True)
        w.mkdir(parents=True, exist_ok=True)
        dist = DISTRIBUTIONS[args.distribution]
        np.savez(w / "queries.npz", image=unit_rows(mixture_unit_vectors(args.queries, dist, args.seed, stream=1)))
        cfg = index_config(args)
        build = run_worker(
            "segments_build",
            index_dir=str(w / "index"),
            n=n,
            commits=args.commits,
            dist=args.distribution,
            seed=args.seed,
            config=cfg,
        )
        many = run_worker("store_search", index_dir=str(w / "index"), work=str(w), out_ids=str(w / "many.npz"))
        comp = run_worker("compact", index_dir=str(w / "index"), config=cfg)
        one = run_worker("store_search", index_dir=str(w / "index"), work=str(w), out_ids=str(w / "one.npz"))
        a, b = np.load(w / "many.npz")["image"], np.load(w / "one.npz")["image"]
        same = bool(np.array_equal(a, b))
        rows = [
            [
                f"{n:,}",
                f"{args.commits} commits of {n // args.commits:,}",
                many["segments"],
                f"{many['image_qps_1']:.0f}",
                f"{many['image_qps_64']:.0f}",
                f"{many['open_s']:.2f}",
                f"{many['peak_rss_mb']:.0f}",
                f"{many['load']:.1f}",
            ],
            [
                f"{n:,}",
                f"compact(full=True): {comp['seconds']:.1f} s",
                one["segments"],
                f"{one['image_qps_1']:.0f}",
                f"{one['image_qps_64']:.0f}",
                f"{one['open_s']:.2f}",
                f"{one['peak_rss_mb']:.0f}",
                f"{one['load']:.1f}",
            ],
        ]
        out.append(
            table(
                [
                    "n",
                    "layout",
                    "segments",
                    "queries/s, batch 1",
                    "queries/s, batch 64",
                    "open + first s",
                    "peak RSS MB",
                    "load",
                ],
                rows,
            )
        )
        out.append(
            f"- one segment / {args.commits} segments: batch 1 {one['image_qps_1'] / many['image_qps_1']:.1f}x, "
            f"batch 64 {one['image_qps_64'] / many['image_qps_64']:.1f}x; mean commit of "
            f"{n // args.commits:,} rows {build['commit_s_mean']:.2f} s\n"
            f"- ids of all {args.queries} queries identical before and after compaction: {same}"
            + ("" if same else f" ({int((a != b).any(axis=1).sum())} queries differ)")
        )
        if not args.keep:
            shutil.rmtree(w, ignore_errors=True)
    return "\n\n".join(out)


def cmd_hard(args, work: Path) -> str:
    """recall@10 and queries/s of the project's IVF (build_index with index_type ivf; search with exact
    re-ranking) for tuning-like, image-like and text-like queries (module docstring), on the easy
    distribution and on the hard one; the nprobe each query kind needs to reach the recall target that
    tuning (on tuning-like queries) reached. Each is built twice: tuned on perturbed database rows alone, and
    also on --tuning-text text-like queries drawn apart from the evaluated ones (what the indexer does with the
    CLIP's text embeddings of generic prompts: retrieval.indexer.tuning_queries)."""
    rows, notes = [], []
    for n in args.sizes:
        for dist, tuning_text in [(d, t) for d in args.distributions for t in (0, args.tuning_text)]:
            print(f"# hard, {dist}, n = {n:,}, text tuning queries {tuning_text}", file=sys.stderr, flush=True)
            r = run_worker(
                "hard",
                n=n,
                dist=dist,
                seed=args.seed,
                queries=args.queries,
                config=index_config(args),
                tuning_text=tuning_text,
            )
            notes.append(
                f"- {dist}, n = {n:,}, tuned with {tuning_text} text queries: "
                + "; ".join(f"{k} {v}" for k, v in r["describe"].items())
                + f"; build {r['build_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
            )
            for kind, k in r["kinds"].items():
                needed = k["needed_nprobe"] or f"> {k['sweep'][-1][0]}"
                rows.append(
                    [
                        dist,
                        f"{n:,}",
                        "rows + text" if tuning_text else "rows",
                        r["nlist"],
                        f"{k['tuned_nprobe']} ({r['tuned_recall']:.3f})",
                        kind,
                        f"{k['recall']:.3f}",
                        f"{k['qps']:.0f}",
                        needed,
                        f"{k['needed_recall']:.3f}",
                        f"{k['needed_qps']:.0f}",
                        " ".join(f"{p}:{rec:.2f}" for p, rec, _ in k["sweep"]),
                        f"{r['load']:.1f}",
                    ]
                )
    head = [
        "distribution",
        "n",
        "tuned on",
        "nlist",
        "tuned nprobe (tuning recall)",
        "queries",
        "recall@10 at tuned",
        "queries/s at tuned",
        f"nprobe for >= {IndexConfig().recall_target}",
        "recall there",
        "queries/s there",
        "sweep nprobe:recall",
        "load",
    ]
    return table(head, rows) + "\n\n" + "\n".join(notes)


def cmd_ondisk(args, work: Path) -> str:
    """A store whose one segment is an on-disk IVF (n >= IndexConfig.ondisk_min_vectors): build time and peak
    RSS vs the vectors' float32 bytes (target <= 1.5x; RSS before the commit is torch + open_clip, loaded as in
    the indexer: `preload_models`), then in a fresh process queries/s, recall@10 vs exact
    search, and the searching process's RSS vs the index folder's size on disk."""
    rows = []
    for n in args.sizes:
        w = work / f"ondisk-{n}"
        print(f"# ondisk, n = {n:,}", file=sys.stderr, flush=True)
        data = run_worker("data", work=str(w), n=n, dist=args.distribution, seed=args.seed, queries=args.queries)
        # ivf explicitly: `auto` is ivf at 1M anyway, but flat at the --quick size
        cfg = index_config(args, index_type="ivf", ondisk_min_vectors=args.ondisk_min_vectors or n)
        build = run_worker(
            "store_commit",
            index_dir=str(w / "index"),
            rows_file=str(w / "db.npy"),
            first_id=0,
            n_delete=0,
            next_id=n,
            config=cfg,
        )
        (w / "db.npy").unlink()  # the store holds its own copy of the rows
        s = run_worker("store_search", index_dir=str(w / "index"), work=str(w), kinds=["image", "text"])
        f32 = n * D * 4 / MB
        after = s["after_search"]
        rows.append(
            [
                f"{n:,}",
                build["segments"],
                f"{build['seconds']:.0f}",
                f"{build['peak_rss_mb']:.0f}",
                f"{f32:.0f}",
                f"{build['peak_rss_mb'] / f32:.2f}",
                f"{(build['peak_rss_mb'] - build['rss_before_mb']) / f32:.2f}",
                f"{s['index_disk_mb']:.0f}",
                f"{s['image_qps_1']:.0f}",
                f"{s['image_qps_64']:.0f}",
                f"{s['image_recall']:.3f}",
                f"{s['text_recall']:.3f}",
                f"{after['rss_mb']:.0f} ({after['rss_anon_mb']:.0f} + {after['rss_file_mb']:.0f} file)",
                f"{s['peak_rss_mb']:.0f}",
                f"{s['peak_rss_mb'] / s['index_disk_mb']:.2f}",
                f"{s['load']:.1f}",
            ]
        )
        print(f"  data: {data['describe']}", file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(w, ignore_errors=True)
    head = [
        "n",
        "segments",
        "build s",
        "build peak RSS MB",
        "float32 vectors MB",
        "build peak / float32",
        "(build peak - RSS before) / float32",
        "index folder on disk MB",
        "queries/s, batch 1",
        "queries/s, batch 64",
        "recall@10 image",
        "recall@10 text",
        "search RSS MB after (anon + file)",
        "search peak RSS MB",
        "search peak / on disk",
        "load",
    ]
    return table(head, rows)


def cmd_autofaiss(args, work: Path) -> str:
    """The project's `auto` index and autofaiss's chosen index, built from the same float32 array in separate
    processes: build seconds and peak RSS, queries/s (one batch) and recall@10 against exact search, for
    image-like and text-like queries. autofaiss tunes its search parameters to a latency target
    (max_index_query_time_ms, default 10 ms), not to a recall; the project re-ranks exactly."""
    rows, notes = [], []
    for n in args.sizes:
        for dist in args.distributions:
            w = work / f"autofaiss-{dist}-{n}"
            print(f"# autofaiss, {dist}, n = {n:,}", file=sys.stderr, flush=True)
            data = run_worker("data", work=str(w), n=n, dist=dist, seed=args.seed, queries=args.queries)
            notes.append(f"- {dist}, n = {n:,}: " + "; ".join(f"{k} {v}" for k, v in data["describe"].items()))
            runs = [
                ("project", "project_build", {"config": index_config(args)}),
                (
                    "autofaiss",
                    "autofaiss_build",
                    {"max_index_memory": args.max_index_memory, "memory_available": args.memory_available},
                ),
            ]
            for name, task, kw in runs:
                try:
                    r = run_worker(task, work=str(w), **kw)
                except WorkerError as e:
                    rows.append([dist, f"{n:,}", name, f"failed: {e}"] + [""] * 8)
                    continue
                rows.append(
                    [
                        dist,
                        f"{n:,}",
                        name,
                        r["index"],
                        f"{r['build_s']:.0f}",
                        f"{r['peak_rss_mb']:.0f}",
                        f"{r['rss_before_mb']:.0f}",
                        f"{r['image']['qps']:.0f}",
                        f"{r['image']['recall']:.3f}",
                        f"{r['text']['qps']:.0f}",
                        f"{r['text']['recall']:.3f}",
                        f"{r['load']:.1f}",
                    ]
                )
            if not args.keep:
                shutil.rmtree(w, ignore_errors=True)
    head = [
        "distribution",
        "n",
        "library",
        "index",
        "build s",
        "peak RSS MB",
        "RSS before build MB",
        "queries/s image",
        "recall@10 image",
        "queries/s text",
        "recall@10 text",
        "load",
    ]
    return table(head, rows) + "\n\n" + "\n".join(notes)


def cmd_ingest(args, work: Path) -> str:
    """Peak RSS of a first index's merge and commit of N embedded rows (finished shards of --shard-rows rows in
    work/): `merge` into a memory-mapped scratch file (now) vs `merge` in RAM (np.concatenate, as before), each
    followed by the same commit of one segment (--index-type; flat isolates merge and commit from an IVF build).
    Peak RSS counts the file pages mapped and touched (shards, scratch, segment) as well as anonymous memory;
    "peak - before" / the rows' float32 bytes is the ratio the <= 1.5x target is about."""
    rows = []
    for n in args.sizes:
        w = work / f"ingest-{n}"
        print(f"# ingest, n = {n:,}", file=sys.stderr, flush=True)
        run_worker("shards", work=str(w), n=n, shard_rows=args.shard_rows, dist=args.distribution, seed=args.seed)
        f32 = n * D * 4
        for scratch in (True, False):
            cfg = index_config(args, index_type=args.index_type)
            r = run_worker("ingest", work=str(w), index_dir=str(w / f"idx-{scratch}"), scratch=scratch, config=cfg)
            grown = r["peak_rss_mb"] - r["rss_before_mb"]
            rows.append(
                [
                    f"{n:,}",
                    "scratch file (now)" if scratch else "in RAM (before)",
                    f"{r['seconds']:.1f} (merge {r['merge_s']:.1f})",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['rss_before_mb']:.0f}",
                    f"{grown * MB / f32:.2f}x",
                    f"{r['rss_anon_mb']:.0f}",
                    r["segments"],
                    f"{r['load']:.1f}",
                ]
            )
            shutil.rmtree(w / f"idx-{scratch}", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(w, ignore_errors=True)
    head = ["n", "merge", "merge + commit s", "peak RSS MB", "RSS before MB", "(peak - before) / float32 bytes"]
    return table(head + ["anon RSS at end MB", "index", "load"], rows)


COMMANDS = {  # name: (function, default sizes, --quick sizes, one-line help)
    "commit": (cmd_commit, [10_000, 100_000, 1_000_000], [10_000, 50_000], "cost of a +100-image commit, new vs today"),
    "segments": (cmd_segments, [100_000], [10_000], "search over 50 segments vs one compacted segment"),
    "hard": (cmd_hard, [200_000, 1_000_000], [50_000], "IVF recall on hard distributions and text-like queries"),
    "ondisk": (cmd_ondisk, [1_000_000], [100_000], "a store searched from an on-disk IVF: speed, recall, RSS"),
    "autofaiss": (cmd_autofaiss, [1_000_000], [100_000], "the project's auto index beside autofaiss's choice"),
    "ingest": (cmd_ingest, [1_000_000], [100_000], "peak RSS of a first index's merge + commit, scratch vs RAM"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.index_scale",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (fn, sizes, quick, summary) in COMMANDS.items():
        s = sub.add_parser(
            name,
            help=summary,
            description=fn.__doc__,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        s.add_argument("--sizes", type=int, nargs="+", default=sizes, help="database sizes (rows)")
        s.add_argument(
            "--quick", action="store_true", help=f"small sizes for a try-out: --sizes {' '.join(map(str, quick))}"
        )
        s.add_argument("--seed", type=int, default=0, help="seeds the data and the index (IndexConfig.seed)")
        s.add_argument(
            "--train-sample",
            type=int,
            default=IndexConfig().train_sample,
            help="IndexConfig.train_sample: vectors that train IVF k-means",
        )
        s.add_argument(
            "--work-dir", type=Path, default=None, help="where data and indexes go (default: a new temporary folder)"
        )
        s.add_argument("--keep", action="store_true", help="keep the work folder (default: deleted at the end)")
        if name == "ingest":
            s.add_argument("--shard-rows", type=int, default=10_000, help="rows per finished shard")
            s.add_argument("--index-type", default="flat", help="IndexConfig.index_type of the committed segment")
        if name in ("commit", "segments", "ondisk", "ingest"):
            s.add_argument("--distribution", choices=sorted(DISTRIBUTIONS), default="hard", help="data distribution")
        if name in ("hard", "autofaiss"):
            s.add_argument("--distributions", nargs="+", choices=sorted(DISTRIBUTIONS), default=["easy", "hard"])
        if name == "hard":
            s.add_argument("--tuning-text", type=int, default=200, help="text-like tuning queries of the 2nd build")
        if name in ("segments", "hard", "ondisk", "autofaiss"):
            s.add_argument("--queries", type=int, default=1000, help="queries of each kind")
        if name == "segments":
            s.add_argument("--commits", type=int, default=50, help="commits the rows are split into (--quick: 10)")
        if name == "ondisk":
            s.add_argument(
                "--ondisk-min-vectors",
                type=int,
                default=None,
                help="IndexConfig.ondisk_min_vectors (default: the size, so the segment is on disk)",
            )
        if name == "autofaiss":
            s.add_argument(
                "--max-index-memory",
                default="4G",
                help="autofaiss max_index_memory_usage. At 1M x 768 any value from 4G up (8G is "
                "IndexConfig.memory_budget_bytes) makes it choose HNSW32; below ~3.1G it quantises",
            )
            s.add_argument(
                "--memory-available",
                default="8G",
                help="autofaiss current_memory_available; it must exceed --max-index-memory by 10%%",
            )
        s.set_defaults(fn=fn, quick_sizes=quick)
    w = sub.add_parser("_worker")  # internal: one measurement in this fresh process (run_worker)
    w.add_argument("task", choices=sorted(WORKERS))
    w.add_argument("kwargs", help="JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "_worker":
        result = WORKERS[args.task](**json.loads(args.kwargs))
        result.update(memory())
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.quick:
        args.sizes = args.quick_sizes
        if args.command == "segments":
            args.commits = 10
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="index_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        body = args.fn(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    cmd = "python -m benchmarks.index_scale " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"\n## {args.command}\n\n`{cmd}` ({time.perf_counter() - started:.0f} s, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f})\n\n{body}\n",
        flush=True,
    )


if __name__ == "__main__":
    main()
