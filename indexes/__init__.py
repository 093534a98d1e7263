"""Storing and searching vectors.

`vector_index` builds, tunes, saves and searches FAISS indexes of unit vectors; its public API is
re-exported here. The index folder (`indexes.store`), shards and atomic writes are imported from their
modules (`from indexes.store import IndexStore`), which keeps `import indexes` free of pandas.
"""

from indexes.vector_index import (
    IndexConfig,
    IndexType,
    SearchParams,
    apply_search_params,
    build_index,
    choose_index_type,
    exact_search,
    load_index,
    recall_at_k,
    save_index,
    search,
    to_gpu_if_available,
)

__all__ = [
    "IndexConfig",
    "IndexType",
    "SearchParams",
    "apply_search_params",
    "build_index",
    "choose_index_type",
    "exact_search",
    "load_index",
    "recall_at_k",
    "save_index",
    "search",
    "to_gpu_if_available",
]
