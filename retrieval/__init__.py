"""personal-retrieval: find *your* things in an image gallery.

The API is the engine (`retrieval.engine`): `from retrieval import Engine`. Its layers, bottom to top (README,
"Layers"; checked by import-linter): `retrieval.io` -> `retrieval.models` -> `indexes` | `tokens` -> the query
modules of this package (composed, gair, search, report, indexer, gallery) -> `retrieval.engine` -> `cli.py`,
`benchmarks`.

The lower layers live in this package too (`retrieval.io`, `retrieval.models`), and Python runs this file before
any of its submodules: importing the engine here eagerly would make `import retrieval.io.atomic` (which `indexes`
does) load the whole engine, in a circle through `indexes`. So the public names are resolved on first access
(PEP 562), as diffusers' and transformers' top-level packages do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.io.lazy import lazy_exports

_EXPORTS = {
    "Engine": "retrieval.engine",
    "ComposedResult": "retrieval.engine",
    "Generated": "retrieval.engine",
    "MixResult": "retrieval.engine",
    "GairConfig": "retrieval.gair",
    "QueryError": "retrieval.composed",
    "QueryResult": "retrieval.search",
    "Hit": "retrieval.search",
    "IndexSummary": "retrieval.indexer",
}
__all__ = [
    "ComposedResult",
    "Engine",
    "GairConfig",
    "Generated",
    "Hit",
    "IndexSummary",
    "MixResult",
    "QueryError",
    "QueryResult",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and readers; at run time `__getattr__` below resolves these
    from retrieval.composed import QueryError
    from retrieval.engine import ComposedResult, Engine, Generated, MixResult
    from retrieval.gair import GairConfig
    from retrieval.indexer import IndexSummary
    from retrieval.search import Hit, QueryResult


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
