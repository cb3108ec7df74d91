"""The pruning-method registry. One method per file here; ``pruneflow methods`` lists them."""

from __future__ import annotations

from typing import Callable

from pruneflow.methods.base import PruneResult, PruneTarget, PruningMethod
from pruneflow.registry import Registry

METHODS: Registry[type[PruningMethod]] = Registry("pruning method")


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    return METHODS.register(cls.name)(cls)


def create_method(name: str, params: dict | None = None) -> PruningMethod:
    return METHODS.get(name)(params)


from pruneflow.methods import l1, random, slimming  # noqa: E402,F401  (each registers itself)

__all__ = ["METHODS", "PruneResult", "PruneTarget", "PruningMethod", "create_method", "register_method"]
