"""The model registry: ``model.name`` in params picks a factory ``(in_channels, num_classes, **kwargs) -> nn.Module``
(super-resolution models: ``(in_channels, upscale_factor, **kwargs)``).

Besides registered names, ``torchvision:<name>`` and ``package.module:function`` name models from outside
(see ``external.py``); ``resolve_model`` is the one place that reads a name, for building and validation alike.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from torch import nn

from pruneflow.models.external import ModelFactory, import_factory, torchvision_factory
from pruneflow.registry import Registry, UnknownNameError

MODELS: Registry[ModelFactory] = Registry("model")
TORCHVISION_PREFIX = "torchvision:"


def resolve_model(name: str) -> ModelFactory:
    """The factory a model name stands for; raises ValueError (listing what exists) for unknown names."""
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_factory(name.removeprefix(TORCHVISION_PREFIX))
    if ":" in name:
        return import_factory(name)
    try:
        return MODELS.get(name)
    except UnknownNameError as err:
        raise UnknownNameError(f"{err}; or torchvision:<name>, or package.module:function") from None


def accepts(name: str, argument: str) -> bool:
    """Whether the named model's factory takes ``argument`` (``num_classes``: a classifier, ``upscale_factor``: a
    super-resolution model); a factory with ``**kwargs`` takes anything."""
    parameters = inspect.signature(resolve_model(name)).parameters.values()
    return any(p.name == argument or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def build_model(name: str, in_channels: int, num_classes: int | None,
                kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``num_classes`` None: a model that outputs no class scores (super-resolution takes ``upscale_factor`` in
    ``kwargs`` instead), so the factory is not given one."""
    classes = {} if num_classes is None else {"num_classes": num_classes}
    return resolve_model(name)(in_channels=in_channels, **classes, **(kwargs or {}))


def _import_all() -> None:
    """Import every module of this package: adding a model is adding one file."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_all()
