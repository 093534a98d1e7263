"""The index folder: a self-describing, crash-safe, segmented store of gallery embeddings and their FAISS indexes.

Layout (index format 2):

    <index_dir>/manifest.json             the commit point: format version, version number, model, dim, the live
                                          segments, the tombstone and skipped files, the shared quantizer, ...
    <index_dir>/segments/seg-000007/      one immutable segment: rows added by one commit, or merged by compaction
        metadata.parquet                  id, path (relative to the gallery root), bytes, mtime_ns, width, height
        embeddings.npy                    (n, dim) float16, row i <-> metadata row i; the source of truth
        index.faiss [+ index.ivfdata]     FAISS index over the embeddings (ids = metadata.id); large IVF segments
                                          keep their inverted lists on disk, memory-mapped (indexes.vector_index)
    <index_dir>/tombstones/tomb-000009.npy   sorted int64 ids of deleted rows still held by some segment
    <index_dir>/skipped/skipped-000009.parquet  path, bytes, mtime_ns, reason: the gallery's unusable files
    <index_dir>/quantizers/q-000004.faiss    the coarse quantizer every new approximate segment shares
    <index_dir>/tuning/queries-3f2a.npy    (m, dim) float32 queries of the kind users send (CLIP text embeddings):
                                          approximate segments are tuned to reach the recall target on them too
    <index_dir>/writer.lock, writer.json  the writer lock and its holder (indexes.locking)
    <index_dir>/readers/*.json            readers' pins: the files of the version each one opened
    <index_dir>/work/shard-*/             finished shards of an interrupted or running indexing pass

A commit writes only what changed: the new rows as one new segment, the tombstones, the skipped files and the
manifest; its time and memory depend on the change, not on the index (Lucene's and LanceDB's design: immutable
segments + deletion markers). Every file is written under a temporary name and renamed into place, then the
manifest is replaced atomically: a SIGKILL at any moment leaves manifest.json naming complete files only.

Search runs over every live segment and merges exactly (`IndexStore.search`). Compaction (`IndexWriter.compact`)
merges segments of one size tier into one of the next tier, dropping deleted rows, the way Lucene's tiered merge
policy does; it runs after each commit when a tier is full, and on demand (`compact`, `cli.py compact`).

Concurrency: one writer at a time (`IndexWriter` holds `indexes.locking.WriterLock`); readers pin the files of the
version they opened (`indexes.locking.ReaderPin`), and a writer deletes a file only when no current manifest
names it and no live pin holds it. A reader therefore never loses a file under it, and a long-lived reader (the
engine) sees a newer version by re-reading the manifest between queries.

Format 1 folders (one `gen-NNNNNN/` generation rewritten by every commit) still open read-only; `migrate` (or the
next commit) converts them in place by hard-linking the generation's files into a segment (no copy).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import uuid
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from indexes.locking import ReaderPin, WriterLock, pinned_names
from indexes.vector_index import (
    IndexConfig,
    IndexType,
    SearchParams,
    apply_search_params,
    build_index,
    choose_index_type,
    load_index,
    load_quantizer,
    rerank_exact,  # the exact re-rank of search(), shared so merges tie alike
    save_index,
    save_quantizer,
    search,
    to_gpu_if_available,
    train_quantizer,
    unit_rows,
)
from retrieval.io.atomic import atomic_dir, remove_stale_temporaries, write_atomic, write_json
from retrieval.models.clip import weights_changed, weights_id

INDEX_FORMAT_VERSION = 2
SUBFOLDERS = ("segments", "tombstones", "skipped", "quantizers", "tuning")  # a writer cleans and collects in them
READABLE_FORMATS = (1, 2)
METRIC = "inner_product"
NORMALIZATION = "l2"
META_COLUMNS = ["id", "path", "bytes", "mtime_ns", "width", "height"]
META_DTYPES = {"id": "int64", "bytes": "int64", "mtime_ns": "int64", "width": "int64", "height": "int64"}
SKIP_COLUMNS = ["path", "bytes", "mtime_ns", "reason"]
SKIP_DTYPES = {"path": "str", "bytes": "int64", "mtime_ns": "int64", "reason": "str"}
OPEN_RETRIES = 20  # a reader re-reads the manifest this often when a commit removed files between read and pin

__all__ = [
    "INDEX_FORMAT_VERSION",
    "CompactionPolicy",
    "IndexStore",
    "IndexStoreError",
    "IndexWriter",
    "commit_rows",
    "compact",
    "index_config_dict",
    "migrate",
    "open_committed",
    "read_manifest",
    "rebuild_index",
    "unit_rows",
]


class IndexStoreError(RuntimeError):
    """An index folder that cannot be used as asked; the message says the fix."""


@dataclass(frozen=True)
class CompactionPolicy:
    """Size-tiered merging (Lucene's TieredMergePolicy, LanceDB's compaction, simplified).

    A segment's tier is floor(log_F(live rows / min_rows)) (tier 0 below F * min_rows). When a tier holds
    `merge_factor` segments, they are merged into one, which lands one tier up: a commit of m rows is rewritten
    O(log_F(n / m)) times over the index's life, and the index holds at most (F - 1) segments per tier, i.e.
    O(F log_F n) segments. A segment with more than `max_dead_fraction` of its rows deleted is rewritten
    (merged with its tier) to reclaim them."""

    merge_factor: int = 10  # F: segments per tier before they merge (Lucene's segmentsPerTier default, 10)
    min_rows: int = 1000  # segments below merge_factor * min_rows rows are tier 0
    max_dead_fraction: float = 0.5  # rewrite a segment once more than this share of its rows is deleted

    def tier(self, live: int) -> int:
        return max(0, int(math.floor(math.log(max(live, 1) / self.min_rows, self.merge_factor))))

    def plan(self, segments: Sequence[dict]) -> list[str]:
        """Names of the segments to merge now (empty: nothing to do): the lowest full tier, with any segment of
        that tier too full of deleted rows; else a single segment too full of deleted rows."""
        by_tier: dict[int, list[dict]] = {}
        for s in segments:
            by_tier.setdefault(self.tier(s["rows"] - s["dead"]), []).append(s)
        for tier in sorted(by_tier):
            if len(by_tier[tier]) >= self.merge_factor:
                return [s["name"] for s in by_tier[tier]]
        dead = [s for s in segments if s["rows"] and s["dead"] / s["rows"] > self.max_dead_fraction]
        return [dead[0]["name"]] if dead else []


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an index: from package metadata (importing torch takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    import faiss  # imported already (indexes.vector_index); faiss-cpu and faiss-gpu are different packages

    out = {"python": platform.python_version(), "faiss": faiss.__version__}
    for name, dist in (("torch", "torch"), ("open_clip", "open_clip_torch"), ("numpy", "numpy"), ("pandas", "pandas")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def read_manifest(index_dir: str | Path) -> dict | None:
    """The manifest of INDEX_DIR (format 1 or 2), or None if no index was ever committed there."""
    path = Path(index_dir) / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS:
        raise IndexStoreError(
            f"{index_dir} has index format {version}; this program reads formats {READABLE_FORMATS}: "
            "upgrade this program, or re-index the gallery into a new `index_dir`."
        )
    return manifest


def _check_weights(manifest: dict, model: str, where: Path) -> None:
    """Refuse MODEL when the weights behind its SPEC are not those the index's rows were embedded with (recorded as
    `model_weights`; an index from before the field, or a SPEC that pins its weights, is not checked)."""
    recorded = manifest.get("model_weights", "")
    now = weights_changed(model, recorded)
    if now:
        raise IndexStoreError(
            f"the index in {where} was built with other weights of `model={model}` (weights {recorded}, now {now}): "
            "the model was retrained or replaced since; index the gallery again into a new `index_dir`"
        )


def manifest_version(manifest: dict) -> int:
    """The commit number of a manifest (format 1 called it the generation)."""
    return manifest["version"] if manifest["format_version"] >= 2 else manifest["generation"]


def index_config_dict(config: IndexConfig) -> dict:
    """IndexConfig as JSON-ready data (enums as their values), as stored in the manifest."""
    return json.loads(json.dumps({k: (v.value if hasattr(v, "value") else v) for k, v in asdict(config).items()}))


def index_config_from_dict(d: dict) -> IndexConfig:
    known = set(IndexConfig.__dataclass_fields__)
    return IndexConfig(**{k: v for k, v in d.items() if k in known})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------
# the read side


class Segment:
    """One immutable segment of an opened index: its rows' ids, metadata and embeddings, and its FAISS index,
    each read when first needed (a query touches only the index; a path lookup only the metadata)."""

    def __init__(self, folder: Path, entry: dict):
        self.folder = folder
        self.name = entry["name"]
        self.rows = int(entry["rows"])
        self.dead = int(entry.get("dead", 0))  # rows of this segment that are tombstoned (counted at commit)
        p = entry["index"]["params"]
        self.params = SearchParams.from_dict(p) if p else None
        self._ids = self._metadata = self._embeddings = self._index = None

    @property
    def ids(self) -> np.ndarray:
        """(rows,) int64 ids, in row order (the id column alone, unless the metadata is loaded already)."""
        if self._ids is None:
            source = self._metadata
            if source is None:
                source = pd.read_parquet(self.folder / "metadata.parquet", columns=["id"])
            self._ids = source["id"].to_numpy(np.int64)
        return self._ids

    @property
    def metadata(self) -> pd.DataFrame:
        if self._metadata is None:
            self._metadata = pd.read_parquet(self.folder / "metadata.parquet")
        return self._metadata

    @property
    def embeddings(self) -> np.ndarray:
        """(rows, dim) float16, memory-mapped: a gallery need not fit in RAM."""
        if self._embeddings is None:
            self._embeddings = np.load(self.folder / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        return self._embeddings

    @property
    def faiss_index(self):
        if self._index is None:
            index = load_index(self.folder / "index.faiss")
            apply_search_params(index, self.params)
            self._index = to_gpu_if_available(index)
        return self._index

    def vectors_for_rows(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")  # sorted reads from the memory map
        out = np.empty((len(rows), self.embeddings.shape[1]), np.float32)
        out[order] = unit_rows(self.embeddings[rows[order]])
        return out


class IndexStore:
    """An opened, committed index folder (read side): one consistent version, pinned while this object lives.

    store.search(queries, k) -> (scores, ids); store.paths(ids); store.vectors_for_ids(ids); store.metadata (the
    live rows); store.skipped. The files of the version are pinned (indexes.locking.ReaderPin) until `close()` or
    until the object is garbage-collected, so a writer never deletes them under this reader."""

    def __init__(self, index_dir: str | Path, manifest: dict | None = None):
        """MANIFEST: the folder's manifest when the caller has just read it (see `open_committed`)."""
        self.dir = Path(index_dir)
        for _ in range(OPEN_RETRIES):
            manifest = manifest if manifest is not None else read_manifest(self.dir)
            if manifest is None:
                raise IndexStoreError(f"no index in {self.dir}: index a gallery into `index_dir={self.dir}` first")
            pin = ReaderPin(self.dir, manifest_version(manifest), _files_of(manifest))
            if all((self.dir / name).exists() for name in pin.names):
                break
            pin.release()  # a commit removed files between our read of the manifest and the pin: read it again
            manifest = None
        else:
            raise IndexStoreError(f"{self.dir} changed {OPEN_RETRIES} times while opening it: try again")
        self.manifest = manifest
        self._pin = pin
        self._finalizer = weakref.finalize(self, pin.release)
        self.version = manifest_version(manifest)
        if manifest["format_version"] == 1:  # one generation = one segment
            entry = {"name": manifest["directory"], "rows": manifest["count"], "index": manifest["index"]}
            self.segments = [Segment(self.dir / manifest["directory"], entry)]
            self.tombstones = np.zeros(0, np.int64)
            self._skipped_path = self.dir / manifest["directory"] / "skipped.parquet"
        else:
            self.segments = [Segment(self.dir / "segments" / s["name"], s) for s in manifest["segments"]]
            t = manifest["tombstones"]["file"]
            self.tombstones = np.load(self.dir / t, allow_pickle=False) if t else np.zeros(0, np.int64)
            self._skipped_path = self.dir / manifest["skipped_file"]
        self._lookup = None  # (sorted live ids, their segment, their row), built on first use
        self._metadata = self._skipped = None

    # ----- what it is
    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def count(self) -> int:
        """Live images."""
        return self.manifest["count"]

    @property
    def index_types(self) -> list[str]:
        """The index type of each segment, in segment order."""
        return [s.params.index_type if s.params else "empty" for s in self.segments]

    def describe(self) -> str:
        """'3 segments (flat x2, ivf)', for messages."""
        types = pd.Series(self.index_types).value_counts() if self.segments else pd.Series(dtype=int)
        what = ", ".join(t if n == 1 else f"{t} x{n}" for t, n in types.items())
        return f"{len(self.segments)} segment{'s' * (len(self.segments) != 1)}" + (f" ({what})" if what else "")

    def check_model(self, model: str) -> None:
        """Refuse a query model that differs from the one the index was built with, or that has other weights behind
        the same SPEC (a model folder retrained in place: its text embeddings do not live in the index's space)."""
        if model != self.model:
            raise IndexStoreError(
                f"the index in {self.dir} was built with `model={self.model}`, this query uses `model={model}`: "
                f"query with `model={self.model}`, or index the gallery again with `model={model}` into a new "
                "`index_dir`"
            )
        _check_weights(self.manifest, model, self.dir)

    def is_current(self) -> bool:
        """Whether this is still the folder's committed version."""
        m = read_manifest(self.dir)
        return m is not None and manifest_version(m) == self.version

    def close(self) -> None:
        """Release the pin now (it is released anyway when the object is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- rows
    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._lookup is None:
            ids = [s.ids for s in self.segments]
            seg = np.concatenate([np.full(len(i), n, np.int32) for n, i in enumerate(ids)] + [np.zeros(0, np.int32)])
            row = np.concatenate([np.arange(len(i), dtype=np.int64) for i in ids] + [np.zeros(0, np.int64)])
            all_ids = np.concatenate(ids + [np.zeros(0, np.int64)])
            live = ~np.isin(all_ids, self.tombstones)
            order = np.argsort(all_ids[live], kind="stable")
            self._lookup = (all_ids[live][order], seg[live][order], row[live][order])
        return self._lookup

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Live ids -> (segment number, row in it); a KeyError names unknown or deleted ids."""
        ids = np.asarray(ids, np.int64).ravel()
        sorted_ids, seg, row = self._rows()
        pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
        missing = (sorted_ids[pos] != ids) if len(sorted_ids) else np.ones(len(ids), bool)
        if missing.any():
            raise KeyError(f"no image with id {ids[missing][:5].tolist()} in the index in {self.dir}")
        return seg[pos], row[pos]

    def has_ids(self, ids: Sequence[int]) -> np.ndarray:
        sorted_ids = self._rows()[0]
        return np.isin(np.asarray(ids, np.int64), sorted_ids)

    @property
    def ids(self) -> np.ndarray:
        """Every live id, ascending."""
        return self._rows()[0]

    @property
    def metadata(self) -> pd.DataFrame:
        """The live rows (id + path, bytes, mtime_ns, width, height), in segment order then row order."""
        if self._metadata is None:
            parts = [s.metadata[~np.isin(s.ids, self.tombstones)] for s in self.segments]
            self._metadata = (
                pd.concat(parts, ignore_index=True).astype(META_DTYPES)
                if parts
                else pd.DataFrame(columns=META_COLUMNS).astype(META_DTYPES)
            )
        return self._metadata

    @property
    def skipped(self) -> pd.DataFrame:
        if self._skipped is None:
            self._skipped = pd.read_parquet(self._skipped_path)
        return self._skipped

    def vectors_for_ids(self, ids: np.ndarray) -> np.ndarray:
        """float32 unit vectors (m, dim) of the given ids, from the stored embeddings."""
        seg, row = self.locate(ids)
        out = np.empty((len(seg), self.dim), np.float32)
        for n in np.unique(seg):
            at = np.flatnonzero(seg == n)
            out[at] = self.segments[n].vectors_for_rows(row[at])
        return out

    @property
    def embeddings(self) -> np.ndarray:
        """Every live row's stored float16 embedding (count, dim), row i <-> metadata row i: read into RAM, for
        small indexes and tests; large ones are read by id (`vectors_for_ids`, `embeddings_of`)."""
        return self.embeddings_of(self.metadata["id"].to_numpy(np.int64))

    def embeddings_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored float16 rows (m, dim) of the given ids, as written (no normalisation)."""
        seg, row = self.locate(ids)
        out = np.empty((len(seg), self.dim), np.float16)
        for n in np.unique(seg):
            at = np.flatnonzero(seg == n)
            out[at] = self.segments[n].embeddings[row[at]]
        return out

    def paths(self, ids: np.ndarray) -> list[str]:
        seg, row = self.locate(ids)
        out = np.empty(len(seg), object)
        for n in np.unique(seg):
            at = np.flatnonzero(seg == n)
            out[at] = self.segments[n].metadata["path"].to_numpy()[row[at]]
        return out.tolist()

    # ----- search
    def search(self, queries: np.ndarray, k: int, images: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(nq, dim) unit queries -> (scores (nq, k), ids (nq, k)): exact scores, descending, ties by id, -1 / -inf
        padding (indexes.vector_index's contract). Each live segment answers its top k + (its deleted rows), the
        deleted are dropped, and the union is re-ranked exactly: over flat segments this equals one flat index
        over the live rows. IMAGES: the queries are image embeddings (query by image): approximate segments tuned
        on text queries too search with the smaller setting image-like queries need (SearchParams.for_images)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise IndexStoreError(f"queries of shape {queries.shape} for an index of dim {self.dim}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        nq = len(queries)
        if self.count == 0:  # an empty index answers nothing (not k padding columns)
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        candidates = []
        for s in self.segments:
            dead = s.dead  # from the manifest: no pass over the segment's ids per query
            if s.rows - dead <= 0:
                continue
            params = s.params.for_images() if images else s.params
            _, found = search(s.faiss_index, params, queries, min(s.rows, k + dead), vectors_for_ids=_by_id(s))
            if dead:
                found = np.where(np.isin(found, self.tombstones), -1, found)
            candidates.append(found)
        if not candidates:
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        if len(candidates) == 1 and not len(self.tombstones):
            cand = candidates[0]
        else:
            cand = np.concatenate(candidates, axis=1)
        return rerank_exact(queries, cand, self.vectors_for_ids, k)


def _by_id(segment: Segment):
    """ids of SEGMENT -> their vectors, for the segment's own re-ranking."""
    order = np.argsort(segment.ids, kind="stable")
    sorted_ids = segment.ids[order]

    def lookup(ids: np.ndarray) -> np.ndarray:
        return segment.vectors_for_rows(order[np.searchsorted(sorted_ids, ids)])

    return lookup


def _files_of(manifest: dict) -> list[str]:
    """The files (relative names) a version reads: what its readers pin and what a writer must keep."""
    if manifest["format_version"] == 1:
        return [manifest["directory"]]
    names = [f"segments/{s['name']}" for s in manifest["segments"]] + [manifest["skipped_file"]]
    if manifest["tombstones"]["file"]:
        names.append(manifest["tombstones"]["file"])
    if manifest.get("quantizer"):
        names.append(f"quantizers/{manifest['quantizer']['name']}.faiss")
    if manifest.get("tuning_queries"):
        names.append(manifest["tuning_queries"]["file"])
    return names


def open_committed(index_dir: str | Path) -> IndexStore | None:
    """The committed version of INDEX_DIR, opened and pinned, or None if none was ever committed there."""
    manifest = read_manifest(index_dir)
    return None if manifest is None else IndexStore(index_dir, manifest)


# ---------------------------------------------------------------------------------------------------------
# the write side


@dataclass(frozen=True)
class Rows:
    """Rows to add: metadata (META_COLUMNS) and their float16 embeddings (n, dim), row i <-> row i."""

    metadata: pd.DataFrame
    embeddings: np.ndarray


class IndexWriter:
    """The one writer of an index folder, while the `with` block runs (indexes.locking.WriterLock):

        with IndexWriter(index_dir, wait=False, purpose="indexing") as writer:
            committed = writer.open()                       # the committed version, or None
            writer.commit(Rows(meta, emb), delete_ids=..., skipped=..., model=..., ...)

    Another writer gets IndexLockedError naming this one (pid, host, since when), or waits with `wait`."""

    def __init__(
        self,
        index_dir: str | Path,
        *,
        wait: bool | float = False,
        purpose: str = "writing",
        policy: CompactionPolicy = CompactionPolicy(),
    ):
        self.dir = Path(index_dir)
        self.policy = policy
        self._lock = WriterLock(self.dir, wait=wait, purpose=purpose)

    def __enter__(self) -> IndexWriter:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        remove_stale_temporaries(self.dir)
        for sub in SUBFOLDERS:
            if (self.dir / sub).is_dir():
                remove_stale_temporaries(self.dir / sub)
        self.collect_garbage()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _check_held(self) -> None:
        if not self._lock.held:
            raise RuntimeError("IndexWriter used outside its `with` block")

    def open(self) -> IndexStore | None:
        """The committed version, opened and pinned (kept: the commit that follows reuses what it has read)."""
        self._opened = open_committed(self.dir)
        return self._opened

    def _store_of(self, manifest: dict) -> IndexStore:
        """An opened store of MANIFEST's version: the one `open` gave when it is that version, else a new one."""
        opened = getattr(self, "_opened", None)
        if opened is not None and opened.version == manifest_version(manifest) and opened.manifest == manifest:
            return opened
        return IndexStore(self.dir, manifest)

    # ----- commit
    def commit(
        self,
        add: Rows | None,
        *,
        delete_ids: np.ndarray = np.zeros(0, np.int64),
        skipped: pd.DataFrame | None = None,
        model: str,
        gallery_root: str,
        next_id: int,
        index_config: IndexConfig,
        indexing_config: dict | None = None,
        auto_compact: bool = True,
        tuning_queries: np.ndarray | None = None,
    ) -> dict:
        """Add ADD's rows as one new segment, tombstone DELETE_IDS (live ids), record SKIPPED (None: keep the
        committed list), then make it the committed version. Then merge a full tier (`auto_compact`) and delete
        files no version in use needs. Returns the manifest. TUNING_QUERIES (m, dim): queries of the kind users
        send (the indexer gives CLIP text embeddings), kept in the folder and used to tune every approximate
        segment built from now on, compactions included (`indexes.vector_index.build_index`); None keeps the
        committed ones."""
        self._check_held()
        # 1. the committed version (a format 1 folder is migrated first) and checks
        old = self._migrated_manifest()
        dim = add.embeddings.shape[1] if add is not None else (old["dim"] if old else None)
        if tuning_queries is not None and (np.ndim(tuning_queries) != 2 or np.shape(tuning_queries)[1] != dim):
            raise ValueError(f"`tuning_queries` of shape {np.shape(tuning_queries)} for rows of dim {dim}")
        if old is not None:
            if old["model"] != model:
                raise IndexStoreError(
                    f"the index in {self.dir} was built with `model={old['model']}`, not {model}: index into a "
                    f"new `index_dir`, or run with `model={old['model']}`"
                )
            if add is not None and len(add.metadata):
                _check_weights(old, model, self.dir)
            if dim != old["dim"]:
                raise IndexStoreError(f"rows of dim {dim} for the index in {self.dir} of dim {old['dim']}")
        if dim is None:
            raise IndexStoreError(f"no index in {self.dir} yet and no rows to commit: nothing to write")
        version = manifest_version(old) + 1 if old else 1
        segments = [dict(s) for s in old["segments"]] if old else []

        # 2. the new rows: one new segment (tuned on the new tuning queries, when given)
        if tuning_queries is not None:
            self._new_tuning = self._write_tuning(tuning_queries)
        if add is not None and len(add.metadata):
            segments.append(self._write_segment(f"seg-{version:06d}", add, index_config, old))

        # 3. the tombstones: the old ones and DELETE_IDS, counted per segment
        tombstones = self._tombstones(old, np.asarray(delete_ids, np.int64), segments)

        # 4. the skipped files
        if skipped is None:
            skipped_file = old["skipped_file"] if old else self._write_skipped(version, _empty_skipped())
        else:
            skipped_file = self._write_skipped(version, skipped)

        # 5. the commit point
        manifest = self._manifest(
            old,
            version=version,
            segments=segments,
            tombstones=tombstones,
            skipped_file=skipped_file,
            model=model,
            dim=dim,
            gallery_root=gallery_root,
            next_id=next_id,
            index_config=index_config,
            indexing_config=indexing_config if indexing_config is not None else (old or {}).get("indexing_config", {}),
        )
        write_json(self.dir / "manifest.json", manifest)

        # 6. merge a full tier, then delete what no version in use needs
        if auto_compact:
            manifest = self.compact() or manifest
        self.collect_garbage()
        return manifest

    def _write_segment(self, name: str, add: Rows, index_config: IndexConfig, old: dict | None) -> dict:
        meta = add.metadata[META_COLUMNS].astype(META_DTYPES).reset_index(drop=True)
        if len(meta) != len(add.embeddings):
            raise ValueError(f"{len(meta)} metadata rows for {len(add.embeddings)} embeddings")
        folder = self.dir / "segments" / name
        (self.dir / "segments").mkdir(exist_ok=True)
        if folder.exists():  # written by a commit killed before its manifest switch: never committed
            shutil.rmtree(folder)
        with atomic_dir(folder) as tmp:
            meta.to_parquet(tmp / "metadata.parquet", index=False)
            with open(tmp / "embeddings.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(add.embeddings, dtype=np.float16), allow_pickle=False)
            embeddings = np.load(tmp / "embeddings.npy", mmap_mode="r", allow_pickle=False)
            params, quantizer = self._build(tmp, embeddings, meta["id"].to_numpy(np.int64), index_config, old)
        return {
            "name": name,
            "rows": int(len(meta)),
            "dead": 0,
            "min_id": int(meta["id"].min()),
            "max_id": int(meta["id"].max()),
            "index": {
                "params": params.to_dict(),
                "quantizer": quantizer,
                "built_with": index_config_dict(index_config),
            },
        }

    def _build(self, folder: Path, embeddings: np.ndarray, ids: np.ndarray, config: IndexConfig, old: dict | None):
        """Build and save the FAISS index of one segment from its stored float16 rows. Approximate segments share the
        index's coarse quantizer (trained once, on the first approximate segment); if the recall measured with it
        on this segment's own stored vectors misses the target, a new one is trained on them and shared from then
        on (it is recorded in the manifest written next). Returns (search params, quantizer name or None)."""
        kind = choose_index_type(len(ids), embeddings.shape[1], config)
        ondisk = folder / "index.ivfdata"
        tuning = self._tuning_queries(old) if kind != IndexType.FLAT else None
        if kind not in (IndexType.IVF, IndexType.IVFPQ):
            index, params = build_index(embeddings, ids, config, ondisk_path=ondisk, tuning_queries=tuning)
            save_index(index, folder / "index.faiss")
            return params, None
        shared = (old or {}).get("quantizer") or getattr(self, "_new_quantizer", None)
        if shared:
            quantizer_name = shared["name"]
            quantizer = load_quantizer(self.dir / "quantizers" / f"{quantizer_name}.faiss")
            index, params = build_index(
                embeddings, ids, config, quantizer=quantizer, ondisk_path=ondisk, tuning_queries=tuning
            )
            if (params.measured_recall or 0) >= config.recall_target:
                save_index(index, folder / "index.faiss")
                return params, quantizer_name
            del index  # the shared centroids no longer fit the data: retrain on this segment's stored vectors
            if ondisk.exists():
                ondisk.unlink()
        quantizer = train_quantizer(embeddings, config)
        quantizer_name = f"q-{uuid.uuid4().hex[:8]}"
        (self.dir / "quantizers").mkdir(exist_ok=True)
        save_quantizer(quantizer, self.dir / "quantizers" / f"{quantizer_name}.faiss")
        self._new_quantizer = {"name": quantizer_name, "nlist": int(quantizer.ntotal), "trained_rows": len(ids)}
        index, params = build_index(
            embeddings, ids, config, quantizer=quantizer, ondisk_path=ondisk, tuning_queries=tuning
        )
        save_index(index, folder / "index.faiss")
        return params, quantizer_name

    def _tombstones(self, old: dict | None, delete_ids: np.ndarray, segments: list[dict]) -> dict:
        """Union of the committed tombstones and DELETE_IDS, which must be live ids; counts them per segment."""
        current = np.zeros(0, np.int64)
        if old and old["tombstones"]["file"]:
            current = np.load(self.dir / old["tombstones"]["file"], allow_pickle=False)
        delete_ids = np.unique(delete_ids)
        if not len(delete_ids):
            return dict(old["tombstones"]) if old else {"file": None, "count": 0}
        seg = self._segment_of(old, delete_ids)
        known = (seg >= 0) & ~np.isin(delete_ids, current)
        if not known.all():
            raise KeyError(f"cannot delete ids {delete_ids[~known][:5].tolist()}: not live in {self.dir}")
        names = [s["name"] for s in old["segments"]]
        for n, count in zip(*np.unique(seg, return_counts=True)):
            entry = next(s for s in segments if s["name"] == names[n])
            entry["dead"] = int(entry["dead"] + count)
        merged = np.union1d(current, delete_ids)
        name = f"tombstones/tomb-{uuid.uuid4().hex[:12]}.npy"
        (self.dir / "tombstones").mkdir(exist_ok=True)
        write_atomic(self.dir / name, lambda tmp: _save_npy(tmp, merged))
        return {"file": name, "count": int(len(merged))}

    def _segment_of(self, old: dict | None, ids: np.ndarray) -> np.ndarray:
        """The committed segment (its place in old["segments"]) that holds each of IDS, -1 where none does. A
        commit's cost must not grow with the index: only segments whose [min_id, max_id] holds one of IDS are
        looked at, and a segment whose ids are that whole range (every fresh segment: ids are handed out in order)
        answers by arithmetic; the others read their id column."""
        where = np.full(len(ids), -1, np.int64)
        if old is None:
            return where
        store = None
        for n, entry in enumerate(old["segments"]):
            lo, hi = entry.get("min_id"), entry.get("max_id")
            if lo is None or hi is None:  # not recorded: read its ids
                lo, hi = np.iinfo(np.int64).min, np.iinfo(np.int64).max
            todo = np.flatnonzero((where < 0) & (ids >= lo) & (ids <= hi))
            if not len(todo):
                continue
            if entry["rows"] == hi - lo + 1:
                where[todo] = n
                continue
            store = store or self._store_of(old)
            where[todo[np.isin(ids[todo], store.segments[n].ids)]] = n
        return where

    def _write_tuning(self, queries: np.ndarray) -> dict:
        """Save the tuning queries (float32, unit rows) under tuning/; their manifest entry."""
        q = np.asarray(queries, np.float32)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        name = f"tuning/queries-{uuid.uuid4().hex[:12]}.npy"
        (self.dir / "tuning").mkdir(exist_ok=True)
        write_atomic(self.dir / name, lambda tmp: _save_npy(tmp, q))
        return {"file": name, "count": int(len(q))}

    def _tuning_queries(self, old: dict | None) -> np.ndarray | None:
        """The tuning queries a build uses: those of this commit, else the committed ones, else None."""
        entry = getattr(self, "_new_tuning", None) or (old or {}).get("tuning_queries")
        return np.load(self.dir / entry["file"], allow_pickle=False) if entry else None

    def _write_skipped(self, version: int, skipped: pd.DataFrame) -> str:
        name = f"skipped/skipped-{uuid.uuid4().hex[:12]}.parquet"
        (self.dir / "skipped").mkdir(exist_ok=True)
        frame = skipped[SKIP_COLUMNS].astype(SKIP_DTYPES).reset_index(drop=True) if len(skipped) else _empty_skipped()
        write_atomic(self.dir / name, lambda tmp: frame.to_parquet(tmp, index=False))
        self._skipped_counts = {**getattr(self, "_skipped_counts", {}), name: len(frame)}
        return name

    def _manifest(self, old: dict | None, **fields) -> dict:
        now = _now()
        segments = fields["segments"]
        quantizer = getattr(self, "_new_quantizer", None) or (old or {}).get("quantizer")
        self._new_quantizer = None
        tuning = getattr(self, "_new_tuning", None) or (old or {}).get("tuning_queries")
        self._new_tuning = None
        skipped_count = getattr(self, "_skipped_counts", {}).get(fields["skipped_file"])
        if skipped_count is None:  # the committed list, kept as it was
            skipped_count = old["skipped"]
        return {
            "format_version": INDEX_FORMAT_VERSION,
            "version": fields["version"],
            "model": fields["model"],
            # the weights the rows were embedded with (retrieval.models.clip.weights_id; "": pinned by the SPEC, or
            # unknown in a folder from before the field): set by the first commit, kept by every later one
            "model_weights": old.get("model_weights", "") if old else weights_id(fields["model"]),
            "dim": int(fields["dim"]),
            "metric": METRIC,
            "normalization": NORMALIZATION,
            "embedding_dtype": "float16",
            "count": int(sum(s["rows"] - s["dead"] for s in segments)),
            "skipped": int(skipped_count),
            "next_id": int(fields["next_id"]),
            "gallery_root": fields["gallery_root"],
            "created_at": old["created_at"] if old else now,
            "updated_at": now,
            "segments": segments,
            "tombstones": fields["tombstones"],
            "skipped_file": fields["skipped_file"],
            "quantizer": quantizer,
            **({"tuning_queries": tuning} if tuning else {}),
            "index": {"config": index_config_dict(fields["index_config"])},
            "indexing_config": fields["indexing_config"],
            "library_versions": library_versions(),
            **({"migrated_from": old["migrated_from"]} if old and "migrated_from" in old else {}),
        }

    # ----- compaction
    def compact(
        self,
        index_config: IndexConfig | None = None,
        *,
        full: bool = False,
        names: Sequence[str] | None = None,
        tuning_queries: np.ndarray | None = None,
    ) -> dict | None:
        """Merge segments until the policy is satisfied (FULL: everything into one segment, with INDEX_CONFIG if
        given, else the committed one; NAMES: exactly these). Each merge is its own crash-safe commit: the merged
        segment is written, then the manifest switches to it. Returns the last manifest, or None if nothing was
        merged. TUNING_QUERIES: new tuning queries for the merged segments and later builds (see `commit`)."""
        self._check_held()
        if tuning_queries is not None:
            self._new_tuning = self._write_tuning(tuning_queries)
        manifest = None
        while True:
            old = self._migrated_manifest()
            if old is None:
                return manifest
            if names is not None:
                chosen = list(names)
            elif full:
                wanted = index_config_dict(index_config) if index_config is not None else None
                stale = wanted is not None and any(s["index"].get("built_with") != wanted for s in old["segments"])
                chosen = [s["name"] for s in old["segments"]] if len(old["segments"]) > 1 or stale else []
                chosen = chosen or [s["name"] for s in old["segments"] if s["dead"]]
            else:
                chosen = self.policy.plan(old["segments"])
            if not chosen:
                return manifest
            manifest = self._merge(old, chosen, index_config)
            self.collect_garbage()
            if names is not None or full:
                return manifest

    def _merge(self, old: dict, chosen: Sequence[str], index_config: IndexConfig | None) -> dict:
        """One compaction commit: the live rows of the CHOSEN segments, in id order, as one new segment."""
        config = index_config or index_config_from_dict(old["index"]["config"])
        version = manifest_version(old) + 1
        unknown = set(chosen) - {s["name"] for s in old["segments"]}
        if unknown:
            raise IndexStoreError(f"no segments {sorted(unknown)} in {self.dir}")
        with IndexStore(self.dir, old) as store:
            parts = [s for s in store.segments if s.name in set(chosen)]
            keep = [~np.isin(s.ids, store.tombstones) for s in parts]
            meta = pd.concat([s.metadata[k] for s, k in zip(parts, keep)], ignore_index=True)
            order = np.argsort(meta["id"].to_numpy(), kind="stable")
            n = int(sum(k.sum() for k in keep))
            name = f"seg-{version:06d}"
            segments = [dict(s) for s in old["segments"] if s["name"] not in set(chosen)]
            if n:
                segments.append(self._write_merged(name, parts, keep, meta, order, config, old))
            dropped = np.concatenate([s.ids[~k] for s, k in zip(parts, keep)] + [np.zeros(0, np.int64)])
        tomb = self._drop_tombstones(old, dropped)
        # keep the committed segment order: the merged segment takes the place of the first one merged
        position = min(i for i, s in enumerate(old["segments"]) if s["name"] in set(chosen))
        if n:
            segments.insert(position, segments.pop())
        manifest = self._manifest(
            old,
            version=version,
            segments=segments,
            tombstones=tomb,
            skipped_file=old["skipped_file"],
            model=old["model"],
            dim=old["dim"],
            gallery_root=old["gallery_root"],
            next_id=old["next_id"],
            index_config=config,
            indexing_config=old.get("indexing_config", {}),
        )
        write_json(self.dir / "manifest.json", manifest)
        return manifest

    def _write_merged(self, name, parts, keep, meta, order, config, old) -> dict:
        """Write the merged segment, streaming the rows into its embeddings file (no second copy in RAM)."""
        folder = self.dir / "segments" / name
        if folder.exists():
            shutil.rmtree(folder)
        dim = old["dim"]
        n = len(meta)
        with atomic_dir(folder) as tmp:
            meta.iloc[order].reset_index(drop=True).astype(META_DTYPES).to_parquet(
                tmp / "metadata.parquet", index=False
            )
            rows = [(p.embeddings, np.flatnonzero(k)) for p, k in zip(parts, keep)]
            embeddings = write_in_order(tmp / "embeddings.npy", rows, order, dim)
            ids = meta["id"].to_numpy(np.int64)[order]
            params, quantizer = self._build(tmp, embeddings, ids, config, old)
        return {
            "name": name,
            "rows": int(n),
            "dead": 0,
            "min_id": int(ids.min()),
            "max_id": int(ids.max()),
            "index": {"params": params.to_dict(), "quantizer": quantizer, "built_with": index_config_dict(config)},
        }

    def _drop_tombstones(self, old: dict, dropped: np.ndarray) -> dict:
        """Tombstones minus the ids a merge removed physically."""
        if not old["tombstones"]["file"] or not len(dropped):
            return dict(old["tombstones"])
        current = np.load(self.dir / old["tombstones"]["file"], allow_pickle=False)
        rest = np.setdiff1d(current, dropped)
        if not len(rest):
            return {"file": None, "count": 0}
        name = f"tombstones/tomb-{uuid.uuid4().hex[:12]}.npy"
        write_atomic(self.dir / name, lambda tmp: _save_npy(tmp, rest))
        return {"file": name, "count": int(len(rest))}

    # ----- format 1
    def _migrated_manifest(self) -> dict | None:
        old = read_manifest(self.dir)
        if old is not None and old["format_version"] == 1:
            old = self.migrate()
        return old

    def migrate(self) -> dict | None:
        """Convert a format 1 folder in place: its generation's files are hard-linked (copied where links are not
        possible) into one segment, its skipped list into skipped/; the manifest switches to format 2 atomically;
        the old generation is deleted once no reader pins it. A format 2 folder is left as it is."""
        self._check_held()
        old = read_manifest(self.dir)
        if old is None or old["format_version"] == 2:
            return old
        gen = self.dir / old["directory"]
        version = old["generation"]
        name = f"seg-{version:06d}"
        (self.dir / "segments").mkdir(exist_ok=True)
        folder = self.dir / "segments" / name
        if folder.exists():
            shutil.rmtree(folder)
        has_rows = old["count"] > 0
        if has_rows:
            with atomic_dir(folder) as tmp:
                for f in ("metadata.parquet", "embeddings.npy", "index.faiss"):
                    _link_or_copy(gen / f, tmp / f)
        skipped_file = self._write_skipped(version, pd.read_parquet(gen / "skipped.parquet"))
        meta_ids = pd.read_parquet(gen / "metadata.parquet", columns=["id"])["id"] if has_rows else None
        segments = (
            [
                {
                    "name": name,
                    "rows": int(old["count"]),
                    "dead": 0,
                    "min_id": int(meta_ids.min()),
                    "max_id": int(meta_ids.max()),
                    "index": {
                        "params": old["index"]["params"],
                        "quantizer": None,
                        "built_with": old["index"]["config"],
                    },
                }
            ]
            if has_rows
            else []
        )
        manifest = self._manifest(
            {**old, "migrated_from": 1},
            version=version,
            segments=segments,
            tombstones={"file": None, "count": 0},
            skipped_file=skipped_file,
            model=old["model"],
            dim=old["dim"],
            gallery_root=old["gallery_root"],
            next_id=old["next_id"],
            index_config=index_config_from_dict(old["index"]["config"]),
            indexing_config=old.get("indexing_config", {}),
        )
        write_json(self.dir / "manifest.json", manifest)
        self.collect_garbage()
        return manifest

    # ----- garbage
    def collect_garbage(self) -> list[str]:
        """Delete the files that neither the committed version nor any live reader's pin names: merged-away
        segments, old tombstone and skipped files, unused quantizers, format 1 generations. A file is first renamed
        out of the way (atomic), then removed, so a reader never sees half of it. Returns the names deleted."""
        manifest = read_manifest(self.dir)
        keep = set(_files_of(manifest)) if manifest else set()
        if manifest and manifest["format_version"] == 2:  # quantizers of live segments stay for their retraining record
            keep |= {
                f"quantizers/{s['index']['quantizer']}.faiss"
                for s in manifest["segments"]
                if s["index"].get("quantizer")
            }
        keep |= pinned_names(self.dir)
        found = [p.name for p in self.dir.glob("gen-*") if p.is_dir()]
        for sub in SUBFOLDERS:
            if (self.dir / sub).is_dir():
                found += [f"{sub}/{p.name}" for p in (self.dir / sub).iterdir() if not p.name.startswith(".")]
        deleted = []
        for name in sorted(set(found) - keep):
            path = self.dir / name
            trash = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                os.replace(path, trash)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
            deleted.append(name)
        return deleted


COPY_ROWS = 65536  # rows copied at a time by write_in_order (100 MB of float16 at d=768)


def write_in_order(
    path: Path, parts: Sequence[tuple[np.ndarray, np.ndarray]], order: np.ndarray, dim: int
) -> np.ndarray:
    """Write the chosen rows of PARTS ((array, row numbers) each), concatenated, into the float16 .npy file PATH in
    ORDER (output row j is input row order[j]), COPY_ROWS rows at a time, so that no second copy of them is made in
    RAM (compaction's merged segment, the indexer's new rows). Returns the file, memory-mapped."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(order), dim))
    where = np.empty(len(order), np.int64)
    where[order] = np.arange(len(order))  # input row -> output position
    start = 0
    for array, rows in parts:
        for c in range(0, len(rows), COPY_ROWS):
            chunk = rows[c : c + COPY_ROWS]
            out[where[start + c : start + c + len(chunk)]] = array[chunk]
        start += len(rows)
    out.flush()
    del out
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _empty_skipped() -> pd.DataFrame:
    return pd.DataFrame(columns=SKIP_COLUMNS).astype(SKIP_DTYPES)


# ---------------------------------------------------------------------------------------------------------
# one-call forms (each takes the writer lock for its duration)


def commit_rows(
    index_dir: str | Path,
    metadata: pd.DataFrame,
    embeddings: np.ndarray,
    skipped: pd.DataFrame | None = None,
    delete_ids: Iterable[int] = (),
    *,
    model: str,
    gallery_root: str,
    next_id: int,
    index_config: IndexConfig = IndexConfig(),
    indexing_config: dict | None = None,
    auto_compact: bool = True,
    wait: bool | float = False,
    tuning_queries: np.ndarray | None = None,
) -> dict:
    """Add rows (METADATA: META_COLUMNS; EMBEDDINGS: (n, dim) float16 unit rows) and delete ids, in one commit
    (TUNING_QUERIES: see `IndexWriter.commit`)."""
    with IndexWriter(index_dir, wait=wait, purpose="commit") as writer:
        return writer.commit(
            Rows(metadata, embeddings),
            delete_ids=np.fromiter(delete_ids, np.int64),
            skipped=skipped,
            model=model,
            gallery_root=gallery_root,
            next_id=next_id,
            index_config=index_config,
            indexing_config=indexing_config,
            auto_compact=auto_compact,
            tuning_queries=tuning_queries,
        )


def compact(
    index_dir: str | Path,
    index_config: IndexConfig | None = None,
    *,
    full: bool = False,
    wait: bool | float = False,
    policy: CompactionPolicy = CompactionPolicy(),
) -> dict | None:
    """Merge segments by the size-tier policy (FULL: into one). Returns the new manifest, None if nothing merged."""
    if read_manifest(index_dir) is None:
        raise IndexStoreError(f"no index in {index_dir}: index a gallery into `index_dir={index_dir}` first")
    with IndexWriter(index_dir, wait=wait, purpose="compact", policy=policy) as writer:
        return writer.compact(index_config, full=full)


def rebuild_index(
    index_dir: str | Path,
    index_config: IndexConfig,
    *,
    wait: bool | float = False,
    tuning_queries: np.ndarray | None = None,
) -> dict:
    """Rebuild the FAISS index of INDEX_DIR with another type or tuning from the stored embeddings (no image is
    re-embedded): everything is merged into one segment built with INDEX_CONFIG (and tuned on TUNING_QUERIES, when
    given, else the stored ones). Returns the manifest."""
    if read_manifest(index_dir) is None:
        raise IndexStoreError(f"no index in {index_dir}: index a gallery into `index_dir={index_dir}` first")
    with IndexWriter(index_dir, wait=wait, purpose="reindex") as writer:
        old = writer._migrated_manifest()
        if not old["segments"]:
            return writer.commit(
                None,
                model=old["model"],
                gallery_root=old["gallery_root"],
                next_id=old["next_id"],
                index_config=index_config,
                auto_compact=False,
                tuning_queries=tuning_queries,
            )
        return writer.compact(index_config, names=[s["name"] for s in old["segments"]], tuning_queries=tuning_queries)


def migrate(index_dir: str | Path, *, wait: bool | float = False) -> dict:
    """Convert a format 1 index folder to format 2 in place (a format 2 folder is left as it is)."""
    if read_manifest(index_dir) is None:
        raise IndexStoreError(f"no index in {index_dir}")
    with IndexWriter(index_dir, wait=wait, purpose="migrate") as writer:
        return writer.migrate()


_ = replace  # dataclasses.replace is re-exported for callers that adjust an IndexConfig (kept importable)
