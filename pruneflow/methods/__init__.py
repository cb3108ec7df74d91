"""The pruning-method registry. One method per file here; ``pruneflow methods`` lists them."""

from __future__ import annotations

import importlib
import pkgutil

from pruneflow.methods.base import MethodUnsuitable, PruneResult, PruningMethod
from pruneflow.registry import Registry

METHODS: Registry[type[PruningMethod]] = Registry("pruning method")


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    return METHODS.register(cls.name)(cls)


def method_name(entry: str) -> str:
    """The registered method a ``methods`` entry runs: ``cascade-both`` runs ``cascade`` (the label only tells
    apart entries of one method with different params)."""
    return entry.partition("-")[0]


def create_method(entry: str, params: dict | None = None) -> PruningMethod:
    """The method of a ``methods`` entry (a registered name, or ``<name>-<label>``) with its params."""
    return METHODS.get(method_name(entry))(params)


def _import_all() -> None:
    """Import every module of this package: adding a method is adding one file."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = ["METHODS", "MethodUnsuitable", "PruneResult", "PruningMethod", "create_method", "method_name",
           "register_method"]
