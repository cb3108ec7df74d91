"""The pruning-method registry. One method per file here; ``pruneflow methods`` lists them."""

from __future__ import annotations

import importlib
import pkgutil

from pruneflow.methods.base import PruneResult, PruneTarget, PruningMethod
from pruneflow.registry import Registry

METHODS: Registry[type[PruningMethod]] = Registry("pruning method")


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    return METHODS.register(cls.name)(cls)


def create_method(name: str, params: dict | None = None) -> PruningMethod:
    return METHODS.get(name)(params)


def _import_all() -> None:
    """Import every module of this package: adding a method is adding one file."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = ["METHODS", "PruneResult", "PruneTarget", "PruningMethod", "create_method", "register_method"]
