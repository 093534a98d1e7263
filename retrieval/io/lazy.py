"""Package attributes resolved on first access (PEP 562), as diffusers' and transformers' top-level packages do.

A package whose `__init__` re-exports names from heavy submodules (torch, faiss) makes every import of any of its
submodules pay for them, and a package that holds lower layers too (`retrieval.io` under `retrieval`) would import
its upper layers whenever a lower one is used. `lazy_exports` gives such a package a `__getattr__` and `__dir__`
that import a name's module only when the name is first used.
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for PACKAGE: EXPORTS maps a public name to the module that defines it; a resolved name
    is cached in NAMESPACE (the package's globals())."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
