"""The index folder: a self-describing, crash-safe store of gallery embeddings and their FAISS index.

Layout (one committed *generation* at a time, named by the manifest):

    <index_dir>/manifest.json         the commit point: format version, model, dim, metric, count, ...
    <index_dir>/gen-000003/
        metadata.parquet              id, path (relative to gallery root), bytes, mtime_ns, width, height
        embeddings.npy                (n, dim) float16, row i <-> metadata row i; the source of truth
        index.faiss                   FAISS index over the embeddings (ids = metadata.id)
        skipped.parquet               path, bytes, mtime_ns, reason
    <index_dir>/work/shard-*/         finished shards of an interrupted or running indexing pass

A commit writes a whole new generation folder (renamed into place), then replaces manifest.json
atomically, then deletes older generations. A SIGKILL at any moment leaves manifest.json naming a
complete generation: the previous index stays readable.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from indexes.vector_index import (
    IndexConfig,
    SearchParams,
    apply_search_params,
    build_index,
    load_index,
    save_index,
    search,
    to_gpu_if_available,
)
from retrieval.io.atomic import atomic_dir, remove_stale_temporaries, write_json

INDEX_FORMAT_VERSION = 1
METRIC = "inner_product"
NORMALIZATION = "l2"


class IndexStoreError(RuntimeError):
    """An index folder that cannot be used as asked; the message says the fix."""


def library_versions() -> dict[str, str]:
    import faiss
    import open_clip
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }


def read_manifest(index_dir: str | Path) -> dict | None:
    """The manifest of INDEX_DIR, or None if no index was ever committed there."""
    path = Path(index_dir) / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    version = manifest.get("format_version")
    if version != INDEX_FORMAT_VERSION:
        raise IndexStoreError(
            f"{index_dir} has index format {version}; this program reads format {INDEX_FORMAT_VERSION}: "
            "re-index the gallery into a new `index_dir`."
        )
    return manifest


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Stored float16 rows -> float32 unit vectors (the fp16 cast moves norms by ~1e-3)."""
    x = np.asarray(embeddings, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def index_config_dict(config: IndexConfig) -> dict:
    """IndexConfig as JSON-ready data (enums as their values), as stored in the manifest."""
    return json.loads(json.dumps({k: (v.value if hasattr(v, "value") else v) for k, v in asdict(config).items()}))


def commit_generation(
    index_dir: str | Path,
    metadata: pd.DataFrame,
    embeddings: np.ndarray,
    skipped: pd.DataFrame,
    *,
    model: str,
    gallery_root: str,
    next_id: int,
    index_config: IndexConfig,
    indexing_config: dict | None = None,
) -> dict:
    """Write a new generation (embeddings, metadata, a freshly built FAISS index), then make it current.

    metadata: columns id, path, bytes, mtime_ns, width, height, row i <-> embeddings[i] (float16, (n, dim)).
    Returns the new manifest.
    """
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    old = read_manifest(index_dir)
    generation = (old["generation"] + 1) if old else 1
    n, dim = embeddings.shape
    if len(metadata) != n:
        raise ValueError(f"{len(metadata)} metadata rows for {n} embeddings")
    ids = metadata["id"].to_numpy(np.int64)

    # 1. build the FAISS index from exactly the stored (float16) vectors, so a rebuild reproduces it
    index, params = build_index(unit_rows(embeddings), ids, index_config) if n else (None, None)

    # 2. write the generation folder; it appears complete or not at all
    gen_name = f"gen-{generation:06d}"
    if (index_dir / gen_name).exists():  # written by a commit killed before its manifest switch: never current
        shutil.rmtree(index_dir / gen_name)
    with atomic_dir(index_dir / gen_name) as tmp:
        metadata.to_parquet(tmp / "metadata.parquet", index=False)
        with open(tmp / "embeddings.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(embeddings, dtype=np.float16), allow_pickle=False)
        skipped.to_parquet(tmp / "skipped.parquet", index=False)
        if index is not None:
            save_index(index, tmp / "index.faiss")

    # 3. the commit point: replace the manifest
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    manifest = {
        "format_version": INDEX_FORMAT_VERSION,
        "generation": generation,
        "directory": gen_name,
        "model": model,
        "dim": int(dim),
        "metric": METRIC,
        "normalization": NORMALIZATION,
        "embedding_dtype": "float16",
        "count": int(n),
        "skipped": int(len(skipped)),
        "next_id": int(next_id),
        "gallery_root": gallery_root,
        "created_at": old["created_at"] if old else now,
        "updated_at": now,
        "index": {
            "config": index_config_dict(index_config),
            "params": params.to_dict() if params else None,
        },
        "indexing_config": indexing_config or {},
        "library_versions": library_versions(),
    }
    write_json(index_dir / "manifest.json", manifest)

    # 4. clean up: older generations and leftovers of interrupted writes
    for p in index_dir.glob("gen-*"):
        if p.name != gen_name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    remove_stale_temporaries(index_dir)
    return manifest


class IndexStore:
    """An opened, committed index folder (read side): its manifest, metadata, skipped files and embeddings."""

    def __init__(self, index_dir: str | Path, manifest: dict | None = None):
        """MANIFEST: the folder's manifest when the caller has just read it (see `open_committed`)."""
        self.dir = Path(index_dir)
        manifest = manifest if manifest is not None else read_manifest(self.dir)
        if manifest is None:
            raise IndexStoreError(f"no index in {self.dir}: index a gallery into `index_dir={self.dir}` first")
        self.manifest = manifest
        self.gen_dir = self.dir / manifest["directory"]
        self.metadata = pd.read_parquet(self.gen_dir / "metadata.parquet")
        self.skipped = pd.read_parquet(self.gen_dir / "skipped.parquet")
        # float16 rows, memory-mapped: the gallery may not fit in RAM as float32
        self.embeddings = np.load(self.gen_dir / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        self._row_of_id = pd.Series(np.arange(len(self.metadata)), index=self.metadata["id"].to_numpy())
        self._index = None

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def count(self) -> int:
        return self.manifest["count"]

    @property
    def params(self) -> SearchParams | None:
        p = self.manifest["index"]["params"]
        return SearchParams.from_dict(p) if p else None

    def check_model(self, model: str) -> None:
        """Refuse a query model that differs from the one the index was built with."""
        if model != self.model:
            raise IndexStoreError(
                f"the index in {self.dir} was built with `model={self.model}`, this query uses `model={model}`: "
                f"query with `model={self.model}`, or index the gallery again with `model={model}` into a new "
                "`index_dir`"
            )

    def vectors_for_ids(self, ids: np.ndarray) -> np.ndarray:
        """float32 unit vectors (m, dim) of the given ids, from the stored embeddings."""
        rows = self._row_of_id.loc[np.asarray(ids).ravel()].to_numpy()
        return unit_rows(self.embeddings[rows])

    @property
    def faiss_index(self):
        if self._index is None:
            index = load_index(self.gen_dir / "index.faiss")
            apply_search_params(index, self.params)
            self._index = to_gpu_if_available(index)
        return self._index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, dim) unit queries -> (scores (nq, k), ids (nq, k)); exact scores (approximate types re-rank)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest["dim"]:
            raise IndexStoreError(f"queries of shape {queries.shape} for an index of dim {self.manifest['dim']}")
        if self.count == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return search(self.faiss_index, self.params, queries, k, vectors_for_ids=self.vectors_for_ids)

    def paths(self, ids: np.ndarray) -> list[str]:
        rows = self._row_of_id.loc[np.asarray(ids).ravel()].to_numpy()
        return self.metadata["path"].to_numpy()[rows].tolist()


def open_committed(index_dir: str | Path) -> IndexStore | None:
    """The committed generation of INDEX_DIR, opened (each of its files read once), or None if none was ever
    committed there. What an indexing pass diffs the gallery against."""
    manifest = read_manifest(index_dir)
    return None if manifest is None else IndexStore(index_dir, manifest)


def rebuild_index(index_dir: str | Path, index_config: IndexConfig) -> dict:
    """Rebuild the FAISS index of INDEX_DIR with another type or tuning, from the stored embeddings
    (no image is re-embedded). Commits a new generation; returns its manifest."""
    store = IndexStore(index_dir)
    return commit_generation(
        index_dir,
        store.metadata,
        np.asarray(store.embeddings),
        store.skipped,
        model=store.model,
        gallery_root=store.manifest["gallery_root"],
        next_id=store.manifest["next_id"],
        index_config=index_config,
        indexing_config=store.manifest.get("indexing_config"),
    )
