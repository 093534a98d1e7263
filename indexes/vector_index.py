"""The vector index: build, tune, save, load and search a FAISS index of unit vectors by inner product.

    index, params = build_index(vectors, ids, IndexConfig())           # (n, d) unit rows, (n,) int64 ids
    scores, found = search(index, params, queries, k=10, vectors_for_ids=store.vectors_for_ids)

Index types (`IndexType`; `choose_index_type` resolves `auto`):
    flat    exact search (IndexFlatIP)
    hnsw    graph search (IndexHNSWFlat, M links per node); CPU only
    ivf     inverted lists holding the full vectors (IndexIVFFlat)
    ivfpq   inverted lists holding product-quantised codes (IndexIVFPQ): d*4 bytes -> pq_m bytes per vector
In-RAM indexes are an IndexIDMap2 around their base index, filled with add_with_ids: ids are the caller's and
reconstruct(id) works (ENVIRONMENT.md, pitfalls).

Input vectors: float32 unit rows, used as given; or float16 stored rows (an array, np.memmap or
np.load(mmap_mode="r")), read CHUNK_ROWS at a time and normalised to float32 by `unit_rows`, so that no float32
copy of the whole set is made: training takes a float32 copy of its seeded sample only, tuning's ground truth
is `exact_search_chunked`. A float16 build equals the float32 build of `unit_rows(vectors)` (flat, ivf, ivfpq;
an hnsw graph depends on how its adds are batched). Rows of a shared memmap are unmapped again once read.

Shared coarse quantizer: `train_quantizer` trains the nlist centroids (IndexFlatIP) once, e.g. for all
segments of a collection; `build_index(..., quantizer=q)` gives ivf / ivfpq a copy of it instead of training
k-means (ivfpq still trains its PQ on the sample). With the quantizer that build_index would train itself
(same vectors and config) the index is identical.

On-disk layout (ivf with n >= ondisk_min_vectors and `ondisk_path` given), after the faiss wiki's "Indexes
that do not fit in RAM", demos/demo_ondisk_ivf.py and contrib/ondisk.py (merge_ondisk):
    <folder>/index.faiss      a bare IndexIVFFlat (no IndexIDMap2): quantizer, list sizes and offsets;
                              the lists hold the caller's ids
    <folder>/index.ivfdata    its OnDiskInvertedLists: per list codes[size * d*4] then ids[size] int64
`load_index` maps the .ivfdata beside the .faiss file (the folder may be renamed after writing) read-only: the
lists are paged in as searches visit them, never read into RAM. Re-ranking needs `vectors_for_ids`.

The contract of `search` and `exact_search` (what "exact" means here):
    score   the inner product computed in float64 from the float32 vectors, rounded to float32
    order   descending score; equal float32 scores (ties, e.g. duplicate images) by ascending id
    k > n   columns beyond n hold id -1 and score -inf
So flat search equals numpy brute force, `(q64 @ x64.T).astype(float32)` ranked by (-score, id), exactly.
Approximate types fetch k * rerank_factor candidates and re-rank them exactly (the modality gap makes
compressed scores unreliable for text queries, clip-retrieval#76): their scores are exact, their ids may
miss true neighbours; `build_index` tunes nprobe / efSearch until recall@10 >= recall_target.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import math
import mmap
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from retrieval.io.atomic import write_atomic

logger = logging.getLogger(__name__)

GPU_MAX_K = 2048  # faiss GPU kernels select at most 2048 results per query and probe at most 2048 lists
NORM_TOLERANCE = 1e-3  # allowed | ||x|| - 1 |: catches unnormalised input, accepts fp16-rounded unit vectors
TUNE_K = 10  # tuning measures recall@10
TUNE_NOISE = 0.5  # norm of the gaussian perturbation of tuning queries: cosine to their source ~0.9
FLAT_MARGIN = 16  # flat search fetches k + margin candidates before its exact re-rank
MIN_POINTS_PER_CENTROID = 39  # faiss k-means wants >= 39 training points per centroid (it warns below)
CHUNK_ROWS = 65536  # float16 input is validated, converted and added this many rows at a time (200 MB at d=768)
GATHER_ROWS = 1024  # scattered float16 rows (training sample, re-ranking) are read this many at a time
ONDISK_TUNE_BATCH = 50  # tuning searches an on-disk index this many queries at a time (see _tuning_search)
ONDISK_SUFFIX = ".ivfdata"  # the on-disk lists of <folder>/<stem>.faiss are <folder>/<stem>.ivfdata
_ONDISK_FOURCC = b"IwFl"  # a saved bare IndexIVFFlat: the on-disk layout (in-RAM indexes start with IxM2)
_QUANTIZER_FOURCC = b"IxFI"  # a saved IndexFlatIP: a coarse quantizer
_PAD_SORT_KEY = np.iinfo(np.int64).max  # sort key of padding (-1 ids): after every real id

VectorLookup = Callable[[np.ndarray], np.ndarray]  # ids (m,) int64 -> their vectors (m, d) float32


class IndexType(str, enum.Enum):
    AUTO = "auto"
    FLAT = "flat"
    HNSW = "hnsw"
    IVF = "ivf"
    IVFPQ = "ivfpq"


@dataclass(frozen=True)
class IndexConfig:
    """How to build an index: its type (or `auto`), the recall it is tuned to, and each type's sizes."""

    index_type: IndexType = IndexType.AUTO  # auto: choose_index_type(n, d, config)
    recall_target: float = 0.95  # recall@10 vs exact search that tuning must reach (with re-ranking)
    # auto: exact search up to this many vectors. Measured on 2 CPU cores at d=768 (IndexFlatIP): one query
    # takes 15 ms at 100k, 28 ms at 200k, 78 ms at 500k; batches run ~750 queries/s at 200k. Below 200k exact
    # search stays interactive on a laptop CPU (and is ~1 ms on a GPU), while IVF would add k-means training
    # and a recall loss for little gain.
    flat_max_vectors: int = 200_000
    memory_budget_bytes: int = 8 << 30  # auto: if full float32 vectors (n*d*4 bytes) exceed this, use IVF-PQ
    hnsw_m: int = 32  # HNSW links per node (Malkov & Yashunin 2018); high-dimensional data wants 32+
    hnsw_ef_construction: int = 200  # HNSW candidate list while inserting: larger = better graph, slower build
    # IVF lists. None: round(4*sqrt(n)) (faiss wiki guideline: 4..16*sqrt(n)), clipped to
    # [1, n_train // 39] so that k-means has its 39 training points per centroid.
    ivf_nlist: int | None = None
    pq_m: int | None = None  # IVF-PQ sub-quantizers (bytes per code); None: largest divisor of d <= d//4
    train_sample: int = 100_000  # at most this many vectors (a seeded sample) train IVF / PQ
    tune_queries: int = 500  # database vectors, perturbed, used as queries when tuning
    rerank_factor: int = 4  # approximate types fetch k*rerank_factor candidates, then re-rank exactly
    seed: int = 0  # seeds the training sample, the tuning queries and k-means
    # ivf with at least this many vectors keeps its inverted lists in a file beside the index (build_index's
    # ondisk_path; see the module docstring), memory-mapped when loaded: 1M x 768 float32 codes are 3 GB.
    ondisk_min_vectors: int = 1_000_000

    def __post_init__(self):
        try:
            object.__setattr__(self, "index_type", IndexType(self.index_type))
        except ValueError:
            raise ValueError(
                f"unknown index_type {self.index_type!r}: use one of {', '.join(t.value for t in IndexType)}"
            ) from None
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        for name in (
            "memory_budget_bytes",
            "hnsw_m",
            "hnsw_ef_construction",
            "train_sample",
            "tune_queries",
            "rerank_factor",
            "ondisk_min_vectors",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.flat_max_vectors < 0:
            raise ValueError(f"flat_max_vectors must be >= 0, got {self.flat_max_vectors}")
        for name in ("ivf_nlist", "pq_m"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None (automatic) or >= 1, got {getattr(self, name)}")


_PARAM_TYPES = ("flat", "hnsw", "ivf", "ivfpq")


@dataclass(frozen=True)
class SearchParams:
    """How to search a built index; stored beside it (the manifest) so a loaded index searches as tuned."""

    index_type: str  # resolved type: flat | hnsw | ivf | ivfpq (never auto)
    nprobe: int | None  # ivf, ivfpq: inverted lists visited per query
    ef_search: int | None  # hnsw: size of the candidate list of the graph walk
    measured_recall: float | None  # recall@10 vs exact measured while tuning, with re-ranking (None: flat)
    rerank_factor: int = 4  # approximate types fetch k*rerank_factor candidates (the factor tuned with)
    # tuned with text-like `tuning_queries` as well: the smaller nprobe / efSearch that suffices for image-like
    # queries (query by image, "more like this"), and the recall measured there; None: the same as above
    image_nprobe: int | None = None
    image_ef_search: int | None = None
    image_recall: float | None = None

    def __post_init__(self):
        if self.index_type not in _PARAM_TYPES:
            raise ValueError(f"SearchParams.index_type must be one of {_PARAM_TYPES}, got {self.index_type!r}")
        if self.index_type in ("ivf", "ivfpq") and (self.nprobe is None or self.nprobe < 1):
            raise ValueError(f"{self.index_type} needs nprobe >= 1, got {self.nprobe}")
        if self.index_type == "hnsw" and (self.ef_search is None or self.ef_search < 1):
            raise ValueError(f"hnsw needs ef_search >= 1, got {self.ef_search}")
        if self.rerank_factor < 1:
            raise ValueError(f"rerank_factor must be >= 1, got {self.rerank_factor}")

    def for_images(self) -> SearchParams:
        """The parameters for image-like queries: the smaller setting tuning found enough for them, if any."""
        if self.image_nprobe is None and self.image_ef_search is None:
            return self
        return replace(
            self,
            nprobe=self.image_nprobe or self.nprobe,
            ef_search=self.image_ef_search or self.ef_search,
            measured_recall=self.image_recall,
            image_nprobe=None,
            image_ef_search=None,
            image_recall=None,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("image_nprobe", "image_ef_search", "image_recall"):  # manifests of older versions had none
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchParams:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown SearchParams keys {sorted(unknown)} (known: {sorted(known)}): "
                "the index was written by a newer version; rebuild it or upgrade"
            )
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------
# choosing and building


def choose_index_type(n: int, d: int, config: IndexConfig) -> IndexType:
    """The index type for n vectors of dimension d: an explicit type as given; `auto`:
    IVF-PQ if full vectors (n*d*4 bytes, the same for flat, HNSW and IVF) exceed the memory budget,
    else flat up to `flat_max_vectors`, else IVF. HNSW is never automatic: its build is slow on few
    CPU cores, it keeps a graph on top of the vectors and it has no GPU implementation."""
    if config.index_type != IndexType.AUTO:
        return config.index_type
    if n * d * 4 > config.memory_budget_bytes:
        return IndexType.IVFPQ
    if n <= config.flat_max_vectors:
        return IndexType.FLAT
    return IndexType.IVF


def _nlist(n: int, n_train: int, config: IndexConfig) -> int:
    """IVF list count (see IndexConfig.ivf_nlist)."""
    if config.ivf_nlist is not None:
        if config.ivf_nlist > n_train:
            raise ValueError(
                f"ivf_nlist={config.ivf_nlist} needs at least as many training vectors, got {n_train}: "
                f"set ivf_nlist <= {n_train // MIN_POINTS_PER_CENTROID or 1} or None (automatic)"
            )
        return config.ivf_nlist
    return int(np.clip(round(4 * math.sqrt(n)), 1, max(1, n_train // MIN_POINTS_PER_CENTROID)))


def _pq_m(d: int, config: IndexConfig) -> int:
    """Sub-quantizer count: must divide d; default the largest divisor of d that is <= d // 4."""
    if config.pq_m is not None:
        if d % config.pq_m:
            divisors = [m for m in range(1, d + 1) if d % m == 0]
            raise ValueError(f"pq_m={config.pq_m} does not divide d={d}: choose one of {divisors}")
        return config.pq_m
    return max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)


def _pq_nbits(n_train: int) -> int:
    """Bits per sub-quantizer code: 8 (256 centroids per sub-space); fewer only when there are fewer than 256
    training vectors, which happens only for a tiny database trained on all of itself."""
    if n_train < 2:
        raise ValueError(f"IVF-PQ needs at least 2 vectors to train its codebooks, got {n_train}: use index_type flat")
    return min(8, int(math.log2(n_train)))


def _base_index(
    kind: IndexType, d: int, n: int, n_train: int, config: IndexConfig, coarse: faiss.Index | None = None
) -> faiss.Index:
    """An empty, untrained base index of the given type. `coarse`: a trained quantizer (checked by
    _check_quantizer) that ivf / ivfpq get a copy of, so they need no k-means."""
    if kind == IndexType.FLAT:
        return faiss.IndexFlatIP(d)
    if kind == IndexType.HNSW:
        base = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = config.hnsw_ef_construction
        return base
    if coarse is not None:
        nlist, quantizer = coarse.ntotal, faiss.clone_index(coarse)  # a copy: the caller keeps its object
    else:
        nlist, quantizer = _nlist(n, n_train, config), faiss.IndexFlatIP(d)
    if kind == IndexType.IVF:
        base = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        m, nbits = _pq_m(d, config), _pq_nbits(n_train)
        base = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        base.pq.cp.seed = config.seed
        if n_train < MIN_POINTS_PER_CENTROID * (1 << nbits):  # small set trained on all of itself: no k-means warning
            base.pq.cp.min_points_per_centroid = 1
    base.cp.seed = config.seed
    if n_train < MIN_POINTS_PER_CENTROID * nlist:
        base.cp.min_points_per_centroid = 1
    return base


def _as_flat(index) -> faiss.IndexFlat | None:
    """`index` as an IndexFlat, or None. The caller keeps `index` alive: a downcast proxy does not own it."""
    if isinstance(index, faiss.IndexFlat):
        return index
    q = faiss.downcast_index(index) if isinstance(index, faiss.Index) else None
    return q if isinstance(q, faiss.IndexFlat) else None


def _check_quantizer(quantizer, d: int, config: IndexConfig) -> faiss.Index:
    """A trained coarse quantizer for vectors of dimension d (an IndexFlatIP holding nlist centroids)."""
    q = _as_flat(quantizer)
    if q is None or q.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(
            f"quantizer must be a faiss.IndexFlatIP of trained centroids (train_quantizer or load_quantizer), "
            f"got {type(quantizer).__name__}"
        )
    if q.d != d:
        raise ValueError(f"quantizer has d={q.d} but the vectors have d={d}: train it on vectors of the same model")
    if q.ntotal < 1:
        raise ValueError("quantizer holds no centroids: train it with train_quantizer")
    if config.ivf_nlist is not None and config.ivf_nlist != q.ntotal:
        raise ValueError(
            f"config.ivf_nlist={config.ivf_nlist} but the quantizer has {q.ntotal} centroids: "
            "set ivf_nlist=None (the quantizer decides) or train a quantizer with that many"
        )
    return q


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Stored float16 rows -> float32 unit vectors (the fp16 cast moves norms by ~1e-3)."""
    x = np.asarray(embeddings, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# Reading float16 input. Rows of a memory-mapped file stay mapped into the process once read and count in its
# RSS (as file pages) until it exits; a build reads each row a few times, so the rows of a shared mapping
# (np.memmap modes r, r+, w+; never the private mode c, whose changed pages would be lost) are dropped from
# this process after each read with madvise(MADV_DONTNEED): they stay in the page cache, a later read maps them
# again. float32 input is used as given, as before.
_SHARED_MEMMAP_MODES = ("r", "r+", "w+")


def _madvise_dontneed(address: int, nbytes: int) -> None:
    """Drop the pages of [address, address + nbytes) of a shared file mapping from this process's RSS."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return
    start = address - address % mmap.PAGESIZE
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), mmap.MADV_DONTNEED)


_LIBC: list = []  # [ctypes libc or None], resolved once


def _libc():
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC.append(libc if hasattr(mmap, "MADV_DONTNEED") else None)
        except (OSError, AttributeError, TypeError):  # no libc madvise (Windows): pages stay mapped
            _LIBC.append(None)
    return _LIBC[0]


def _release_rows(rows: np.ndarray) -> None:
    """Unmap the pages of `rows` (a contiguous array) if they are rows of a shared np.memmap."""
    a = rows
    while a is not None and not isinstance(a, np.memmap):
        a = a.base if isinstance(a, np.ndarray) else None
    if a is not None and a.mode in _SHARED_MEMMAP_MODES and rows.flags.c_contiguous:
        _madvise_dontneed(rows.ctypes.data, rows.nbytes)


def _rows(vectors: np.ndarray, a: int, b: int) -> np.ndarray:
    """Rows a:b as float32 unit vectors: float32 input as given (a view), float16 through unit_rows."""
    if vectors.dtype == np.float32:
        return vectors[a:b]
    out = unit_rows(vectors[a:b])
    _release_rows(vectors[a:b])
    return out


def _gather(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """vectors[rows] as float32 unit vectors (a copy), like _rows. float16 rows are read in ascending order,
    GATHER_ROWS at a time, releasing each batch's span: the kernel maps up to 64 KB around each page fault
    (fault-around), so 20k scattered rows of a 1.5 GB memmap would otherwise map nearly all of it."""
    if vectors.dtype == np.float32:
        return vectors[rows]
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), vectors.shape[1]), np.float32)
    for a in range(0, len(rows), GATHER_ROWS):
        batch = order[a : a + GATHER_ROWS]
        out[batch] = unit_rows(vectors[rows[batch]])
        _release_rows(vectors[rows[batch[0]] : rows[batch[-1]] + 1])
    return out


def _check_rows(vectors: np.ndarray) -> None:
    """Validate the database vectors chunk by chunk: float32 unit rows, or float16 stored rows (normalised by
    unit_rows, so any finite non-zero row is accepted, as the store accepted them)."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
        raise ValueError(
            f"vectors must be a 2-D numpy array (n, d), got {type(vectors).__name__} "
            f"of shape {getattr(vectors, 'shape', None)}"
        )
    if vectors.dtype not in (np.float32, np.float16):
        raise ValueError(
            f"vectors must be float32 (or float16 stored rows), got {vectors.dtype}: pass vectors.astype(np.float32)"
        )
    n, d = vectors.shape
    if n == 0 or d == 0:
        raise ValueError(f"cannot index {n} vectors of dimension {d}: there must be at least one vector of d >= 1")
    for a in range(0, n, CHUNK_ROWS):  # chunks: no (n, d) temporaries for large n
        with np.errstate(invalid="ignore"):  # float16 inf / inf: NaN, reported below
            chunk = _rows(vectors, a, a + CHUNK_ROWS)
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            raise ValueError(f"vector row {a + int(np.argmin(finite))} contains NaN or inf: drop or fix it")
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        bad = np.abs(norms - 1.0) > NORM_TOLERANCE
        if bad.any():
            row = a + int(np.argmax(bad))
            if vectors.dtype == np.float16:
                raise ValueError(f"float16 vector row {row} is all zeros: it has no direction; drop it")
            raise ValueError(
                f"vectors must be L2-normalised (inner product = cosine); row {row} has norm "
                f"{norms[row - a]:.6f}: pass vectors / np.linalg.norm(vectors, axis=1, keepdims=True)"
            )


def _check_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """Validate the ids of n vectors; returns them as int64."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"ids must be a 1-D array with one id per vector: got shape {ids.shape} for {n} vectors")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers (int64), got {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.min() < 0:
        raise ValueError(f"ids must be >= 0 (-1 marks 'no result' in search output), got {ids.min()}")
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != n:
        raise ValueError(
            f"ids must be unique; repeated: {uniq[counts > 1][:5].tolist()}{' ...' if (counts > 1).sum() > 5 else ''}"
        )
    return ids


def _check_vectors(vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Validate the database; returns ids as int64."""
    _check_rows(vectors)
    return _check_ids(ids, len(vectors))


def _train_rows(n: int, config: IndexConfig, rng: np.random.Generator) -> np.ndarray:
    """The seeded training sample: sorted rows, at most config.train_sample of n."""
    n_train = min(n, config.train_sample)
    return np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)


def _check_ondisk_path(path) -> Path:
    path = Path(os.path.abspath(path))
    if path.suffix != ONDISK_SUFFIX:
        raise ValueError(
            f"ondisk_path must end in {ONDISK_SUFFIX} and sit beside the index file it belongs to "
            f"(<folder>/index.faiss -> <folder>/index{ONDISK_SUFFIX}), got {path}"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of ondisk_path {path} does not exist: create it first")
    if path.exists():
        raise FileExistsError(
            f"{path} exists: build into a new folder (a loaded index may still be reading that file; "
            "overwriting it in place would corrupt that index)"
        )
    return path


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    config: IndexConfig = IndexConfig(),
    *,
    quantizer: faiss.Index | None = None,
    ondisk_path: Path | None = None,
    tuning_queries: np.ndarray | None = None,
) -> tuple[faiss.Index, SearchParams]:
    """Build an index over `vectors` (n, d) with `ids` (n,) int64, and tune it.

    vectors: float32 unit rows, or float16 stored rows (array or memmap; see the module docstring).
    quantizer: a trained IndexFlatIP (train_quantizer) that ivf / ivfpq copy instead of training k-means; its
        centroid count is nlist. Flat and hnsw have no coarse quantizer and ignore it.
    ondisk_path: where an ivf with n >= config.ondisk_min_vectors writes its inverted lists: <folder>/<stem>.ivfdata
        for the index later saved as <folder>/<stem>.faiss (save_index checks it); the file must not exist. The
        index is then a bare IndexIVFFlat holding the caller's ids (see `is_ondisk`). Otherwise unused.

    Approximate types are tuned to the smallest nprobe / efSearch (doubling from 1 / k*rerank_factor, at
    most 2048, the GPU cap) whose recall@10 against exact search reaches `config.recall_target`, measured
    with the re-ranking `search` applies, on `tune_queries` database vectors perturbed by seeded gaussian
    noise (so a query is not trivially its own neighbour), and on `tuning_queries` (m, d) when given: queries
    of the kind users send, e.g. CLIP text embeddings, which sit apart from the images (the modality gap, Liang
    et al. 2022) and need a larger nprobe than image-like queries (benchmarks/index_scale.py `hard`: recall@10
    0.85 for text-like queries at the nprobe that gives image-like ones 0.99). The target must be met on each
    set. If even the cap misses the target, a warning says so and the lowest measured recall is recorded.
    """
    # 1. check inputs
    ids = _check_vectors(vectors, ids)
    if vectors.dtype == np.float32:
        vectors = np.ascontiguousarray(vectors)
    n, d = vectors.shape
    kind = choose_index_type(n, d, config)
    coarse = None
    if quantizer is not None and kind in (IndexType.IVF, IndexType.IVFPQ):
        coarse = _check_quantizer(quantizer, d, config)
    ondisk = ondisk_path is not None and kind == IndexType.IVF and n >= config.ondisk_min_vectors
    if ondisk:
        ondisk_path = _check_ondisk_path(ondisk_path)
    rng = np.random.default_rng(config.seed)

    # 2. seeded training sample (IVF types; drawn in every case so that tuning draws the same queries)
    train_rows = _train_rows(n, config, rng)

    # 3. build and train (float16: a float32 copy of the sample only)
    base = _base_index(kind, d, n, len(train_rows), config, coarse)
    if not base.is_trained:
        base.train(_gather(vectors, train_rows))

    # 4. add: in RAM through an IndexIDMap2, or straight into on-disk lists
    if ondisk:
        index = _fill_ondisk(base, vectors, ids, ondisk_path)
    else:
        index = faiss.IndexIDMap2(base)
        if vectors.dtype == np.float32:
            index.add_with_ids(vectors, ids)
        elif kind == IndexType.IVF:
            _add_presized(index, vectors, ids)
        else:
            for a in range(0, n, CHUNK_ROWS):
                index.add_with_ids(_rows(vectors, a, a + CHUNK_ROWS), ids[a : a + CHUNK_ROWS])
        if kind == IndexType.IVF:
            base.make_direct_map()  # reconstruct(id) reads vectors back for re-ranking without vectors_for_ids
    logger.debug("built %s over %d x %d%s", kind.value, n, d, " on disk" if ondisk else "")

    # 5. tune nprobe / efSearch
    params = _tune(index, kind, vectors, ids, config, rng, tuning_queries)
    apply_search_params(index, params)
    return index, params


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _assign(ivf: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """(n,) int64: the list of every vector, its nearest centroid, as IndexIVF.add assigns it."""
    list_nos = np.empty(len(vectors), np.int64)
    for a in range(0, len(vectors), CHUNK_ROWS):
        x = np.ascontiguousarray(_rows(vectors, a, a + CHUNK_ROWS))
        list_nos[a : a + len(x)] = ivf.quantizer.assign(x, 1).ravel()
    return list_nos


def _fill_lists(
    ivf: faiss.Index,
    vectors: np.ndarray,
    entry_ids: np.ndarray,
    list_nos: np.ndarray,
    append: Callable[[int, np.ndarray, np.ndarray], None],
) -> None:
    """Encode the vectors a chunk at a time and hand each list its entries: append(list_no, codes (c,
    code_size) uint8, ids (c,) int64), in row order within a list, as IndexIVF.add stores them."""
    for a in range(0, len(vectors), CHUNK_ROWS):
        x = np.ascontiguousarray(_rows(vectors, a, a + CHUNK_ROWS))
        m, block_lists = len(x), list_nos[a : a + CHUNK_ROWS]
        codes = np.empty((m, ivf.code_size), np.uint8)
        ivf.encode_vectors(m, faiss.swig_ptr(x), faiss.swig_ptr(block_lists), faiss.swig_ptr(codes))
        del x
        order = np.argsort(block_lists, kind="stable")  # by list, rows in order within a list
        codes, block_ids = codes[order], np.ascontiguousarray(entry_ids[a : a + m][order])
        lists, starts, counts = np.unique(block_lists[order], return_index=True, return_counts=True)
        for lst, s, c in zip(lists.tolist(), starts.tolist(), counts.tolist()):
            append(lst, codes[s : s + c], block_ids[s : s + c])


def _add_presized(index: faiss.IndexIDMap2, vectors: np.ndarray, ids: np.ndarray) -> None:
    """index.add_with_ids(vectors, ids) for an empty IndexIDMap2 around a trained IndexIVFFlat, from float16
    rows, with every list allocated once at its final size: adding chunk by chunk would grow the lists'
    vectors by doubling and leave ~30% of the codes' size as slack (measured at 1M x 768). The result is what
    add_with_ids builds: lists of positions 0..n-1 in row order, id_map = ids."""
    ivf = faiss.downcast_index(index.index)
    list_nos = _assign(ivf, vectors)
    sizes = np.bincount(list_nos, minlength=ivf.nlist)  # (nlist,)
    invlists = faiss.downcast_InvertedLists(ivf.invlists)  # ArrayInvertedLists
    for lst in np.flatnonzero(sizes).tolist():
        invlists.resize(lst, int(sizes[lst]))
    filled = np.zeros(ivf.nlist, np.int64)

    def append(lst: int, codes: np.ndarray, positions: np.ndarray) -> None:
        invlists.update_entries(lst, int(filled[lst]), len(positions), faiss.swig_ptr(positions), faiss.swig_ptr(codes))
        filled[lst] += len(positions)

    _fill_lists(ivf, vectors, np.arange(len(ids), dtype=np.int64), list_nos, append)
    assert (filled == sizes).all(), "in-RAM lists were not filled exactly"
    # the bookkeeping IndexIDMap2.add_with_ids does
    ivf.ntotal = len(ids)
    faiss.copy_array_to_vector(ids, index.id_map)
    index.ntotal = len(ids)
    index.construct_rev_map()


def _fill_ondisk(ivf: faiss.Index, vectors: np.ndarray, ids: np.ndarray, path: Path) -> faiss.Index:
    """Add all vectors to the trained, empty `ivf` with its inverted lists in one compact OnDiskInvertedLists
    file at `path`; returns `ivf`, its lists holding the caller's ids.

    faiss's recipe (demos/demo_ondisk_ivf.py, contrib/ondisk.py merge_ondisk) adds blocks of vectors to copies
    of the trained index, writes each block, then merges the blocks' lists into an OnDiskInvertedLists
    (merge_from_multiple). Here the blocks are merged as they come, into lists laid out from their final sizes
    (set_all_lists_sizes: the same compact layout merge_from_multiple writes), so there are no block files.
    The entries are written with pwrite, not through the mapping, so the written pages never count in this
    process's RSS. Each list holds its entries in row order, as IndexIVF.add would.
    """
    n, nlist, code_size = len(ids), ivf.nlist, ivf.code_size

    # 1. the list of every vector
    list_nos = _assign(ivf, vectors)

    # 2. lay out the lists: list l at offset[l] holds codes[size_l * code_size], then ids[size_l] int64
    sizes = np.bincount(list_nos, minlength=nlist).astype(np.uint64)  # (nlist,)
    invlists = faiss.OnDiskInvertedLists(nlist, code_size, str(path))
    invlists.set_all_lists_sizes(faiss.swig_ptr(sizes))
    code_at = np.array([invlists.lists.at(i).offset for i in range(nlist)], np.int64)  # (nlist,) next code
    id_at = code_at + sizes.astype(np.int64) * code_size  # (nlist,) next id
    ids_end = id_at + sizes.astype(np.int64) * 8
    total = int(sizes.sum()) * (code_size + 8)

    # 3. encode each block and append its entries to their lists
    with open(path, "xb") as f:
        f.truncate(total)

        def append(lst: int, codes: np.ndarray, entry_ids: np.ndarray) -> None:
            _pwrite_all(f.fileno(), codes, int(code_at[lst]))
            _pwrite_all(f.fileno(), entry_ids, int(id_at[lst]))
            code_at[lst] += len(entry_ids) * code_size
            id_at[lst] += len(entry_ids) * 8

        _fill_lists(ivf, vectors, ids, list_nos, append)
        f.flush()
        os.fsync(f.fileno())
    assert (id_at == ids_end).all(), "on-disk lists were not filled exactly"

    # 4. map the file and hand the lists to the index (as merge_ondisk does)
    invlists.totsize = total
    invlists.do_mmap()
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()  # owned by ivf now
    ivf.ntotal = n
    return ivf


def train_quantizer(
    vectors: np.ndarray, config: IndexConfig = IndexConfig(), n: int | None = None
) -> faiss.IndexFlatIP:
    """The coarse quantizer build_index would train: k-means (seeded by config.seed) on the seeded sample of
    `vectors` (float32 unit rows or float16 stored rows), nlist by the IndexConfig.ivf_nlist rule for `n`
    vectors (default len(vectors); pass the size of the whole collection when segments share it).
    Returns an IndexFlatIP of nlist centroids for build_index(..., quantizer=)."""
    _check_rows(vectors)
    n_rows, d = vectors.shape
    n = n_rows if n is None else n
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the number of vectors the quantizer serves), got {n!r}")
    train_rows = _train_rows(n_rows, config, np.random.default_rng(config.seed))
    ivf = _base_index(IndexType.IVF, d, int(n), len(train_rows), config)
    ivf.train(_gather(vectors, train_rows))
    return faiss.clone_index(ivf.quantizer)  # an IndexFlatIP owned by its Python object


def _tune(
    index,
    kind: IndexType,
    vectors: np.ndarray,
    ids: np.ndarray,
    config: IndexConfig,
    rng: np.random.Generator,
    tuning_queries: np.ndarray | None = None,
) -> SearchParams:
    if kind == IndexType.FLAT:
        return SearchParams("flat", None, None, None, config.rerank_factor)
    n, d = vectors.shape
    k = min(TUNE_K, n)

    # 1. queries: sampled database vectors, perturbed and renormalised, then the caller's; exact ground truth
    rows = rng.choice(n, size=min(config.tune_queries, n), replace=False)
    noise = rng.standard_normal((len(rows), d)).astype(np.float32) * (TUNE_NOISE / math.sqrt(d))
    queries = _gather(vectors, rows) + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sets = [np.arange(len(queries))]  # recall is measured per set: the target holds for each
    if tuning_queries is not None and len(tuning_queries):
        given = np.asarray(tuning_queries, np.float32)
        if given.ndim != 2 or given.shape[1] != d:
            raise ValueError(f"`tuning_queries` of shape {given.shape}: expected (m, {d})")
        given = given / np.linalg.norm(given, axis=1, keepdims=True)
        sets.append(np.arange(len(queries), len(queries) + len(given)))
        queries = np.concatenate([queries, given])
    if vectors.dtype == np.float32:
        _, true_ids = exact_search(vectors, ids, queries, k)
    else:
        _, true_ids = exact_search_chunked(vectors, ids, queries, k)
    lookup = _id_lookup(vectors, ids)

    def params_for(value: int, recall: float | None) -> SearchParams:
        if kind == IndexType.HNSW:
            return SearchParams(kind.value, None, value, recall, config.rerank_factor)
        return SearchParams(kind.value, value, None, recall, config.rerank_factor)

    image_setting = None  # (value, recall): the first setting at which the image-like set met the target

    # 2. doubling search: the first value reaching the target
    if kind == IndexType.HNSW:
        value, cap = min(k * config.rerank_factor, GPU_MAX_K), GPU_MAX_K  # efSearch below the fetch count acts as it
    else:
        value, cap = 1, min(faiss.extract_index_ivf(index).nlist, GPU_MAX_K)
    while True:
        _, found = _tuning_search(index, params_for(value, None), queries, k, lookup)
        per_set = [recall_at_k(found[rows_], true_ids[rows_], k) for rows_ in sets]
        recall = min(per_set)
        if image_setting is None and per_set[0] >= config.recall_target:
            image_setting = (value, per_set[0])
        logger.debug(
            "tuning %s: %s=%d recall@%d=%.4f",
            kind.value,
            "efSearch" if kind == IndexType.HNSW else "nprobe",
            value,
            k,
            recall,
        )
        if recall >= config.recall_target or value >= cap:
            break
        value = min(2 * value, cap)
    if recall < config.recall_target:
        warnings.warn(
            f"{kind.value} reaches recall@{k}={recall:.3f} at the largest setting ({value}), below the target "
            f"{config.recall_target}: raise rerank_factor, use index_type ivf (or flat), or for ivfpq a larger pq_m",
            stacklevel=3,
        )
    params = params_for(value, round(float(recall), 6))
    if len(sets) > 1 and image_setting is not None and image_setting[0] < value:
        image_value, image_recall = image_setting
        params = replace(
            params,
            image_nprobe=image_value if kind != IndexType.HNSW else None,
            image_ef_search=image_value if kind == IndexType.HNSW else None,
            image_recall=round(float(image_recall), 6),
        )
    return params


def _tuning_search(index, params: SearchParams, queries: np.ndarray, k: int, lookup: VectorLookup):
    """search(); an on-disk index is searched ONDISK_TUNE_BATCH queries at a time, its mapped lists released
    after each batch: 500 queries visit most lists, which would map most of the file into this process."""
    if not is_ondisk(index):
        return search(index, params, queries, k, vectors_for_ids=lookup)
    parts = []
    for a in range(0, len(queries), ONDISK_TUNE_BATCH):
        parts.append(search(index, params, queries[a : a + ONDISK_TUNE_BATCH], k, vectors_for_ids=lookup))
        _release_lists(index)
    return np.concatenate([s for s, _ in parts]), np.concatenate([i for _, i in parts])


# ---------------------------------------------------------------------------------------------------------
# the index's type, parameters and device


def is_ondisk(index: faiss.Index) -> bool:
    """Whether `index` has the on-disk layout: a bare IVF whose inverted lists are an OnDiskInvertedLists
    (built with ondisk_path, or loaded from such a file). Its lists hold the caller's ids; it stays on the
    CPU and re-ranks only with vectors_for_ids."""
    return isinstance(index, faiss.IndexIVF) and isinstance(
        faiss.downcast_InvertedLists(index.invlists), faiss.OnDiskInvertedLists
    )


def _release_lists(index: faiss.Index) -> None:
    """Drop the mapped pages of an on-disk index's lists from this process's RSS (they stay in the page cache)."""
    if is_ondisk(index):
        invlists = faiss.downcast_InvertedLists(index.invlists)
        if invlists.ptr is not None:
            _madvise_dontneed(int(invlists.ptr), invlists.totsize)


def _inner(index: faiss.Index) -> faiss.Index:
    """The base index: inside the IndexIDMap2, or the on-disk IVF itself."""
    if is_ondisk(index):
        return index
    if not isinstance(index, faiss.IndexIDMap2):
        raise ValueError(f"expected an IndexIDMap2 made by build_index / load_index, got {type(index).__name__}")
    return faiss.downcast_index(index.index)


def _index_kind(index: faiss.Index) -> str:
    """flat | hnsw | ivf | ivfpq, from the base index's class (CPU or GPU)."""
    name = type(_inner(index)).__name__
    for prefix, kind in (
        ("IndexFlat", "flat"),
        ("GpuIndexFlat", "flat"),
        ("IndexHNSW", "hnsw"),
        ("IndexIVFPQ", "ivfpq"),
        ("GpuIndexIVFPQ", "ivfpq"),
        ("IndexIVFFlat", "ivf"),
        ("GpuIndexIVFFlat", "ivf"),
    ):
        if name.startswith(prefix):
            return kind
    raise ValueError(f"unsupported base index {name}: build indexes with build_index")


def _is_gpu(index: faiss.Index) -> bool:
    return type(_inner(index)).__name__.startswith("Gpu")


def _check_params(index: faiss.Index, params: SearchParams) -> str:
    if not isinstance(params, SearchParams):
        raise ValueError(f"params must be SearchParams (from build_index or SearchParams.from_dict), got {params!r}")
    kind = _index_kind(index)
    if kind != params.index_type:
        raise ValueError(
            f"search parameters are for a {params.index_type} index but this index is {kind}: "
            "use the SearchParams returned with this index (they are stored beside it)"
        )
    if _is_gpu(index) and (params.nprobe or 0) > GPU_MAX_K:
        raise ValueError(
            f"nprobe={params.nprobe} exceeds faiss GPU's limit {GPU_MAX_K}: rebuild the index "
            "(tuning caps nprobe at 2048) or search on the CPU"
        )
    return kind


def apply_search_params(index: faiss.Index, params: SearchParams) -> None:
    """Set nprobe / efSearch on `index` (through its IndexIDMap2, CPU or GPU, or on an on-disk IVF) so that plain
    `index.search` uses them. `search` passes them per call anyway."""
    kind = _check_params(index, params)
    inner = _inner(index)
    if kind in ("ivf", "ivfpq"):
        inner.nprobe = params.nprobe
    elif kind == "hnsw":
        inner.hnsw.efSearch = params.ef_search


def _faiss_params(params: SearchParams) -> faiss.SearchParameters | None:
    if params.index_type in ("ivf", "ivfpq"):
        return faiss.SearchParametersIVF(nprobe=params.nprobe)
    if params.index_type == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=params.ef_search)
    return None


_GPU_RESOURCES = None  # one StandardGpuResources for the process: it must outlive every GPU index


def to_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """The index on GPU 0 when faiss has GPU support and sees a GPU and the type runs there (flat, ivf,
    ivfpq); otherwise `index` itself. HNSW has no GPU implementation and stays on the CPU; so do on-disk
    indexes (copying them would read all their lists into GPU memory)."""
    global _GPU_RESOURCES
    if is_ondisk(index):
        logger.debug("an on-disk index stays on the CPU: its lists are memory-mapped")
        return index
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        logger.debug("faiss has no GPU support or sees no GPU: the index stays on the CPU")
        return index
    kind = _index_kind(index)
    if kind == "hnsw":
        logger.debug("HNSW has no faiss GPU implementation: the index stays on the CPU")
        return index
    if _is_gpu(index):
        return index
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    try:
        gpu_index = faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    except RuntimeError as e:  # e.g. an IVF-PQ code size the GPU kernels do not implement
        logger.warning(
            "faiss GPU cannot hold this %s index (%s); searching on the CPU", kind, str(e).strip().splitlines()[-1]
        )
        return index
    logger.debug("moved the %s index to GPU 0", kind)
    return gpu_index


# ---------------------------------------------------------------------------------------------------------
# search


def _exact_scores(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(nq, d), (u, d), (nq, m) rows into vectors -> (nq, m) float32: float64 inner products, rounded.
    Identical vectors get bit-identical scores (same summation order), so duplicates tie exactly."""
    nq, m = rows.shape
    out = np.empty((nq, m), np.float32)
    q64 = queries.astype(np.float64)
    step = max(1, (1 << 22) // max(1, m * vectors.shape[1]))  # ~32 MB of gathered float64 rows per chunk
    for a in range(0, nq, step):
        gathered = vectors[rows[a : a + step]].astype(np.float64)  # (c, m, d)
        out[a : a + step] = np.einsum("cmd,cd->cm", gathered, q64[a : a + step])
    return out


def rerank_exact(queries: np.ndarray, cand: np.ndarray, lookup: VectorLookup, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (nq, m) ids (-1: none) -> the best k by exact score, ties by id: (scores, ids) (nq, k)."""
    nq, m = cand.shape
    d = queries.shape[1]
    valid = cand >= 0
    uniq = np.unique(cand[valid])  # (u,)
    vecs = np.asarray(lookup(uniq), dtype=np.float32) if len(uniq) else np.zeros((0, d), np.float32)
    if vecs.shape != (len(uniq), d):
        raise ValueError(
            f"vectors_for_ids returned shape {vecs.shape} for {len(uniq)} ids; it must return "
            f"the (m, {d}) vectors of the ids it is given, in that order"
        )
    if not len(uniq):
        return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
    rows = np.searchsorted(uniq, np.where(valid, cand, uniq[0]))  # (nq, m) rows into vecs
    scores = _exact_scores(queries, vecs, rows)
    scores[~valid] = -np.inf
    order = np.lexsort((np.where(valid, cand, _PAD_SORT_KEY), -scores), axis=1)[:, :k]  # (nq, k)
    top_ids = np.take_along_axis(cand, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    if top_ids.shape[1] < k:  # fewer candidates than k
        pad = k - top_ids.shape[1]
        top_ids = np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1)
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_scores, top_ids


def _exact_top_k(
    queries: np.ndarray, k: int, n: int, fetch: Callable, lookup: VectorLookup, max_fetch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (k <= n) from a float32 candidate search `fetch(queries, kk) -> (scores, ids)`.

    float32 scores differ from exact ones by at most err = (d+2)*eps32*||q||*||x||. A row is settled once
    its k-th exact score exceeds the kk-th float32 score + err: nothing outside the candidates can reach
    it. Unsettled rows (near-ties at the boundary, e.g. many duplicates) fetch 4x more, up to all n.
    """
    nq, d = queries.shape
    err = (d + 2) * np.finfo(np.float32).eps * np.linalg.norm(queries, axis=1) * (1 + NORM_TOLERANCE)  # (nq,)
    scores, found = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
    todo = np.arange(nq)
    kk = min(n, max(2 * k, k + FLAT_MARGIN), max_fetch)
    while todo.size:
        approx, cand = fetch(queries[todo], kk)
        s, i = rerank_exact(queries[todo], cand, lookup, k)
        settled = (kk >= n) | (cand[:, -1] < 0) | (approx[:, -1] + err[todo] < s[:, -1])
        if kk >= max_fetch and not settled.all():  # only on GPU (k capped at 2048) with > 2048 near-ties
            warnings.warn(
                f"{int((~settled).sum())} queries have more than {kk} near-tied results; their "
                f"exact order beyond the {kk} fetched is not guaranteed (faiss GPU limit)",
                stacklevel=3,
            )
            settled[:] = True
        scores[todo[settled]], found[todo[settled]] = s[settled], i[settled]
        todo = todo[~settled]
        kk = min(n, 4 * kk, max_fetch)
    return scores, found


def _check_queries(queries: np.ndarray, d: int) -> np.ndarray:
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != d:
        raise ValueError(f"queries must have shape (nq, {d}) for this index, got {queries.shape}")
    if not np.issubdtype(queries.dtype, np.floating):
        raise ValueError(f"queries must be floating point, got {queries.dtype}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.isfinite(queries).all():
        raise ValueError("queries contain NaN or inf")
    return queries


def _padded(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    nq, have = ids.shape
    out_s, out_i = np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
    out_s[:, :have], out_i[:, :have] = scores, ids
    return out_s, out_i


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def search(
    index: faiss.Index,
    params: SearchParams,
    queries: np.ndarray,
    k: int,
    vectors_for_ids: VectorLookup | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query (nq, d): (scores (nq, k) float32, ids (nq, k) int64), exact scores, sorted by
    descending score then ascending id; -1 / -inf pad when k > n (see the module docstring).

    flat: exact (equal to numpy brute force). Approximate types: fetch min(k*rerank_factor, n) candidates,
    re-rank them exactly. `vectors_for_ids(ids) -> (m, d) float32` gives the vectors; without it they are
    read back from the index (flat, hnsw, ivf store them; ivfpq keeps only codes and needs it).
    """
    # 1. check inputs
    kind = _check_params(index, params)
    k = _check_k(k)
    queries = _check_queries(queries, index.d)
    n, nq = index.ntotal, len(queries)
    k_eff = min(k, n)  # faiss is asked for at most n results
    if k_eff == 0 or nq == 0:
        return _padded(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64), k)
    max_fetch = min(n, GPU_MAX_K) if _is_gpu(index) else n
    if k_eff > max_fetch:
        raise ValueError(
            f"k={k} exceeds faiss GPU's limit of {GPU_MAX_K} results: ask for fewer, or search "
            "the CPU index (without to_gpu_if_available)"
        )

    # 2. where exact vectors come from
    lookup = vectors_for_ids if vectors_for_ids is not None else _reader(index, kind)
    faiss_params = _faiss_params(params)

    def fetch(q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        return index.search(q, kk, params=faiss_params)  # (len(q), kk) each, -1 padded

    # 3. candidates and exact re-ranking
    if kind == "flat":
        scores, ids = _exact_top_k(queries, k_eff, n, fetch, lookup, max_fetch)
    else:
        _, cand = fetch(queries, min(max_fetch, k_eff * params.rerank_factor))
        scores, ids = rerank_exact(queries, cand, lookup, k_eff)
    return _padded(scores, ids, k)


def _reader(index: faiss.Index, kind: str) -> VectorLookup:
    """Read exact vectors back from an index that stores them (IndexIDMap2.reconstruct)."""
    if is_ondisk(index):
        raise ValueError(
            "an on-disk ivf index has no id map to read vectors back through: pass vectors_for_ids (e.g. "
            "IndexStore.vectors_for_ids) so results are re-ranked exactly, as when it was tuned"
        )
    if kind == "ivfpq":
        raise ValueError(
            "an ivfpq index keeps compressed codes only: pass vectors_for_ids (e.g. "
            "IndexStore.vectors_for_ids) so results are re-ranked exactly, as when it was tuned"
        )

    def read(ids: np.ndarray) -> np.ndarray:
        try:
            return index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        except RuntimeError as e:
            raise ValueError(
                f"cannot read vectors back from this {kind} index ({str(e).strip().splitlines()[-1]}): "
                "pass vectors_for_ids"
            ) from None

    return read


def _id_lookup(vectors: np.ndarray, ids: np.ndarray) -> VectorLookup:
    """ids -> rows of `vectors` as float32 unit vectors (float16 rows through unit_rows)."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def lookup(wanted: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(sorted_ids, wanted), len(ids) - 1)
        missing = sorted_ids[pos] != wanted
        if missing.any():
            raise KeyError(f"ids not in the database: {np.asarray(wanted)[missing][:5].tolist()}")
        return _gather(vectors, order[pos])

    return lookup


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over `vectors` (n, d) float32 with `ids` (n,): the ground truth. Same contract as
    `search` (exact float64 scores, ties by ascending id, -1 / -inf padding). Candidates come from
    faiss.knn in float32, then are re-ranked exactly; near-ties at the k-th place fetch more."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype != np.float32:
        raise ValueError(
            f"vectors must be a float32 (n, d) array, got {getattr(vectors, 'dtype', type(vectors))} "
            f"{getattr(vectors, 'shape', '')}"
        )
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (len(vectors),):
        raise ValueError(f"ids must have shape ({len(vectors)},), got {ids.shape}")
    k = _check_k(k)
    queries = _check_queries(queries, vectors.shape[1])
    vectors = np.ascontiguousarray(vectors)
    n = len(vectors)
    k_eff = min(k, n)
    if k_eff == 0 or len(queries) == 0:
        return _padded(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k)

    def fetch(q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = faiss.knn(q, vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)
        return scores, np.where(rows >= 0, ids[rows], -1)

    scores, found = _exact_top_k(queries, k_eff, n, fetch, _id_lookup(vectors, ids), max_fetch=n)
    return _padded(scores, found, k)


def exact_search_chunked(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """`exact_search` over `vectors` (n, d) float32, or float16 stored rows (an array or memmap, normalised by
    unit_rows), CHUNK_ROWS rows at a time: no float32 copy of the whole set. Same contract and results as
    exact_search over the float32 rows (ties included): the top-k of the union of each chunk's exact top-k,
    ranked by (-score, id), is the exact top-k, since that order is total (ids are unique)."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype not in (np.float32, np.float16):
        raise ValueError(
            f"vectors must be a float32 or float16 (n, d) array, got {getattr(vectors, 'dtype', type(vectors))} "
            f"{getattr(vectors, 'shape', '')}"
        )
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (len(vectors),):
        raise ValueError(f"ids must have shape ({len(vectors)},), got {ids.shape}")
    k = _check_k(k)
    queries = _check_queries(queries, vectors.shape[1])
    nq = len(queries)
    scores, found = _padded(np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64), k)  # all padding
    for a in range(0, len(vectors), CHUNK_ROWS):
        chunk_scores, chunk_ids = exact_search(
            np.ascontiguousarray(_rows(vectors, a, a + CHUNK_ROWS)), ids[a : a + CHUNK_ROWS], queries, k
        )
        s, i = np.concatenate([scores, chunk_scores], axis=1), np.concatenate([found, chunk_ids], axis=1)
        order = np.lexsort((np.where(i >= 0, i, _PAD_SORT_KEY), -s), axis=1)[:, :k]  # (nq, k): padding last
        scores, found = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
    return scores, found


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] & true[:k]| / |true[:k]|, ignoring -1 padding (nq, >=k) arrays."""
    found = np.asarray(found_ids, dtype=np.int64)[:, :k]
    true = np.asarray(true_ids, dtype=np.int64)[:, :k]
    if found.shape[0] != true.shape[0]:
        raise ValueError(f"found_ids has {found.shape[0]} rows, true_ids {true.shape[0]}")
    # distinct negative sentinels for padding, so padding never matches; ids are unique within a row
    found = np.where(found >= 0, found, -2 - np.arange(found.shape[1]))
    true_valid = true >= 0
    true = np.where(true_valid, true, -2 - found.shape[1] - np.arange(true.shape[1]))
    both = np.sort(np.concatenate([found, true], axis=1), axis=1)
    hits = (both[:, 1:] == both[:, :-1]).sum(axis=1)
    denom = true_valid.sum(axis=1)
    if (denom == 0).any():
        raise ValueError("true_ids has a row without any id")
    return float(np.mean(hits / denom))


# ---------------------------------------------------------------------------------------------------------
# files


def save_index(index: faiss.Index, path: Path) -> None:
    """Write `index` (a GPU index is copied to the CPU first) to `path` atomically: a temporary file in
    the same folder, fsync, os.replace. A crash leaves the old file or the new one, never a torn one.

    An on-disk index must be saved beside its lists: as <folder>/<stem>.faiss for lists at
    <folder>/<stem>.ivfdata. The lists file is fsynced first; the index file records its name."""
    path = Path(path)
    if is_ondisk(index):
        lists_path = Path(faiss.downcast_InvertedLists(index.invlists).filename)
        if os.path.abspath(lists_path) != os.path.abspath(path.with_suffix(ONDISK_SUFFIX)):
            raise ValueError(
                f"an on-disk index is saved beside its inverted lists {lists_path}: save it as "
                f"{lists_path.with_suffix('.faiss')} (load_index finds the lists by that name)"
            )
        with open(lists_path, "rb") as f:
            os.fsync(f.fileno())  # the lists are durable before the index file that refers to them
        write_atomic(path, lambda tmp: faiss.write_index(index, str(tmp)))
        return
    cpu_index = faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index
    write_atomic(path, lambda tmp: faiss.write_index(cpu_index, str(tmp)))


def _read_error(path: Path, e: Exception, what: str = "FAISS index") -> ValueError:
    detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return ValueError(
        f"{path} is not a readable {what} (corrupt or truncated: {detail}); rebuild it, "
        "e.g. `personal-retrieval reindex --index-dir DIR` rebuilds from the stored embeddings"
    )


def _file_head(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(
            f"no {what} file at {path}: build it with build_index "
            "(the CLI's `index`, or `reindex` from stored embeddings)"
        )
    with open(path, "rb") as f:
        return f.read(4)


def _read_ondisk(path: Path) -> faiss.Index:
    """Read an on-disk index: the index file without its list data, then map <stem>.ivfdata beside it
    read-only. This is what faiss's IO_FLAG_ONDISK_SAME_DIR does (it keeps the lists' file name and takes the
    index file's folder, so the folder may be renamed after writing), without the line that flag prints on
    stdout, which would corrupt a caller's JSON output."""
    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    if not is_ondisk(index):
        raise ValueError(f"{path} holds a bare {type(index).__name__} without on-disk lists, not written by save_index")
    invlists = faiss.downcast_InvertedLists(index.invlists)
    lists_path = path.with_suffix(ONDISK_SUFFIX)
    if not lists_path.is_file():
        raise FileNotFoundError(
            f"{path} is an on-disk index but its inverted lists {lists_path} are missing: keep "
            f"{path.name} and {lists_path.name} together in one folder, or rebuild the index"
        )
    if lists_path.stat().st_size < invlists.totsize:
        raise ValueError(
            f"{lists_path} holds {lists_path.stat().st_size} bytes but {path} expects {invlists.totsize}: "
            "it is truncated or belongs to another index; rebuild the index"
        )
    invlists.filename = str(lists_path)
    invlists.do_mmap()
    return index


def load_index(path: Path, mmap: bool = True) -> faiss.Index:
    """Read an index written by `save_index`; a clear error if it is missing or unreadable.

    mmap: in-RAM layouts map their codes and lists from the file (faiss IO_FLAG_MMAP_IFC, where this faiss
    has it) instead of reading them into RAM; False reads them. An on-disk index always maps its
    <stem>.ivfdata (read-only), found beside `path` whatever the folder is called now."""
    path = Path(path)
    head = _file_head(path, "FAISS index")
    try:
        if head == _ONDISK_FOURCC:
            return _read_ondisk(path)
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) if mmap else 0
        index = faiss.read_index(str(path), flags)
    except (RuntimeError, MemoryError, OverflowError) as e:
        raise _read_error(path, e) from None
    if not isinstance(index, faiss.IndexIDMap2):
        raise ValueError(f"{path} holds a {type(index).__name__}, not an IndexIDMap2 written by save_index: rebuild it")
    return index


def save_quantizer(quantizer: faiss.Index, path: Path) -> None:
    """Write a coarse quantizer (train_quantizer) to `path` atomically, like save_index."""
    q = _as_flat(quantizer)
    if q is None or q.metric_type != faiss.METRIC_INNER_PRODUCT or q.ntotal < 1:
        raise ValueError(
            f"save_quantizer writes a trained faiss.IndexFlatIP of centroids (train_quantizer), got "
            f"{type(quantizer).__name__}{f' with {q.ntotal} centroids' if q is not None else ''}"
        )
    write_atomic(Path(path), lambda tmp: faiss.write_index(q, str(tmp)))


def load_quantizer(path: Path) -> faiss.IndexFlatIP:
    """Read a quantizer written by `save_quantizer`; a clear error for a missing, corrupt or other file."""
    path = Path(path)
    head = _file_head(path, "coarse quantizer")
    if head != _QUANTIZER_FOURCC:  # checked before reading: an index file may be gigabytes
        raise ValueError(
            f"{path} is not a coarse quantizer written by save_quantizer (an IndexFlatIP file starts with "
            f"{_QUANTIZER_FOURCC!r}, this one with {head!r}): pass the quantizer file, or train one with train_quantizer"
        )
    try:
        q = faiss.read_index(str(path))
    except (RuntimeError, MemoryError, OverflowError) as e:
        raise _read_error(path, e, "coarse quantizer") from None
    if q.ntotal < 1:
        raise ValueError(f"{path} holds a quantizer without centroids: train one with train_quantizer")
    return q
