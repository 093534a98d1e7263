"""Text-to-image search over a committed index."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from indexes.store import IndexStore
from retrieval.models.encoders import ClipEncoder


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    score: float  # cosine similarity of the query and the image
    path: str  # relative to the gallery root
    id: int  # the image's id in the index


@dataclass(frozen=True)
class QueryResult:
    query: str
    model: str
    hits: list[Hit]

    def to_json(self) -> dict:
        return {
            "query": self.query,
            "model": self.model,
            "results": [{"rank": h.rank, "score": round(h.score, 6), "path": h.path, "id": h.id} for h in self.hits],
        }


def hits_from_arrays(store: IndexStore, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    """One query's (k,) scores and ids -> hits, dropping the -1 padding of k > count."""
    keep = ids >= 0
    paths = store.paths(ids[keep])
    return [
        Hit(rank=r + 1, score=float(s), path=p, id=int(i))
        for r, (s, p, i) in enumerate(zip(scores[keep], paths, ids[keep]))
    ]


def search_vectors(store: IndexStore, queries: np.ndarray, k: int, images: bool = False) -> list[list[Hit]]:
    """(nq, dim) unit query vectors -> the top-k hits of each. IMAGES: they are image embeddings (query by
    image), searched with the setting tuned for those (IndexStore.search)."""
    scores, ids = store.search(queries, k, images=images)
    return [hits_from_arrays(store, scores[q], ids[q]) for q in range(len(queries))]


def search_texts(store: IndexStore, encoder: ClipEncoder, texts: Sequence[str], k: int = 10) -> list[QueryResult]:
    """Encode TEXTS with the index's model and return the top-k images for each."""
    store.check_model(encoder.spec)
    hits = search_vectors(store, encoder.encode_texts(list(texts)), k)
    return [QueryResult(query=t, model=store.model, hits=h) for t, h in zip(texts, hits)]


def run_queries(
    index_dir: str | Path,
    texts: Sequence[str],
    k: int = 10,
    model: str | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> tuple[IndexStore, list[QueryResult]]:
    """Open INDEX_DIR, load its model (or check that MODEL is the same), answer every text."""
    store = IndexStore(index_dir)
    if model is not None:
        store.check_model(model)  # refuse before loading a possibly large model
    encoder = ClipEncoder.from_spec(store.model, device=device, precision=precision)
    return store, search_texts(store, encoder, texts, k)
