"""Models from outside the registry: ``torchvision:<name>`` and a user factory ``package.module:function``.

Both resolve to a factory with the registry's signature ``(in_channels, num_classes, **kwargs)``, so the
rest of pruneflow never needs to know where a model came from. Errors are ``ValueError`` worded for
the user, since config validation shows them as the ``model`` key's problem.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]


def torchvision_factory(name: str) -> ModelFactory:
    """A torchvision classification model, built untrained (``weights=None``) with our class count."""
    import torchvision  # imported on demand: it is slow to import and most runs never use it

    known = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in known:
        raise ValueError(f"torchvision has no classification model {name!r}; known: {', '.join(known)}")

    def build(in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            replace_stem(model, in_channels)
        return model

    return build


def replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel conv for an ``in_channels`` one (e.g. for 1-channel digits); weights are fresh anyway."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            stem = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, module.groups, module.bias is not None, module.padding_mode)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, stem)
            return
    raise ValueError(f"{type(model).__name__} has no 3-channel input conv to adapt to {in_channels} channels")


def import_factory(path: str) -> ModelFactory:
    """The callable named by ``package.module:function``; it must accept ``in_channels``, ``num_classes``, kwargs."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"model {path!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {path!r}: cannot import module {module_name!r} ({err})") from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise ValueError(f"model {path!r}: module {module_name!r} has no attribute {attribute!r}")
    if not callable(factory):
        raise ValueError(f"model {path!r}: {attribute!r} is not callable")
    return factory
