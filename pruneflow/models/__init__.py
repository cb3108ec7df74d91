"""The model registry: ``model.name`` in params picks a factory ``(in_channels, num_classes, **kwargs) -> nn.Module``."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from torch import nn

from pruneflow.registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def build_model(name: str, in_channels: int, num_classes: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    return MODELS.get(name)(in_channels=in_channels, num_classes=num_classes, **(kwargs or {}))


def _import_all() -> None:
    """Import every module of this package: adding a model is adding one file."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_all()
