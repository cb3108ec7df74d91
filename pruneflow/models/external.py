"""Models from outside the registry: ``torchvision:<name>`` and a user factory ``package.module:function``.

Both resolve to a factory with the registry's signature ``(in_channels, num_classes, **kwargs)``, so the
rest of pruneflow never needs to know where a model came from. Errors are ``ValueError`` worded for
the user, since config validation shows them as the ``model`` key's problem.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

ModelFactory = Callable[..., nn.Module]


def torchvision_factory(name: str) -> ModelFactory:
    """A torchvision classification model with our class count: untrained, or from torchvision's pretrained
    ``weights`` (``model.kwargs: {weights: DEFAULT}``, or a name such as ``IMAGENET1K_V1``).

    Pretrained weights come with their own class count (1000 for ImageNet); when the data has another, the
    classifier is replaced by a fresh one (the usual transfer-learning start), and the backbone keeps its weights.
    The weights are downloaded into torch's hub cache, or read from it: on a machine without internet, copy the
    file there, or load your own weights with ``baseline.checkpoint``.
    """
    import torchvision  # imported on demand: it is slow to import and most runs never use it

    known = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in known:
        raise ValueError(f"torchvision has no classification model {name!r}; known: {', '.join(known)}")

    def build(in_channels: int = 3, num_classes: int = 10, weights: str | None = None, **kwargs: Any) -> nn.Module:
        if weights is None:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        else:
            model = pretrained(name, weights, kwargs)
            replace_head(model, num_classes)
        if in_channels != 3:
            replace_stem(model, in_channels)
        return model

    return build


def pretrained(name: str, weights: str, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's ``name`` with its pretrained ``weights``; a failed download or an unknown weights name is one
    ValueError naming ``model.kwargs.weights``."""
    import torch
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except OSError as err:  # urllib's URLError, a refused connection, a read-only cache
        raise ValueError(f"model.kwargs.weights={weights!r}: cannot get torchvision's {name} weights "
                         f"({getattr(err, 'reason', err)}); without internet, copy the weights file into "
                         f"{torch.hub.get_dir()}/checkpoints, or give your own as baseline.checkpoint") from None
    except KeyError:  # torchvision's enum lookup of an unknown name
        names = ", ".join(["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(name))])
        raise ValueError(f"model.kwargs.weights={weights!r}: torchvision has no such weights for {name}; "
                         f"known: {names}") from None
    except ValueError as err:  # kwargs that the weights fix otherwise
        raise ValueError(f"model.kwargs.weights={weights!r}: {err}") from None


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Give a pretrained classifier ``num_classes`` outputs: its last linear (or 1x1 conv) layer, if it has another
    count, is replaced by a fresh one."""
    heads = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no linear or conv layer to use as its classifier")
    name, head = heads[-1]
    if isinstance(head, nn.Linear):
        if head.out_features == num_classes:
            return
        fresh: nn.Module = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    else:
        if head.out_channels == num_classes:
            return
        # torch types _ConvNd's geometry tuple[int, ...] where Conv2d's constructor wants pairs: a Conv2d's are
        fresh = nn.Conv2d(head.in_channels, num_classes, head.kernel_size, head.stride,  # type: ignore[arg-type]
                          head.padding, bias=head.bias is not None)  # type: ignore[arg-type]
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel conv for an ``in_channels`` one (e.g. for 1-channel digits); a pretrained stem loses
    its weights: they were for another input."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            # torch types _ConvNd's geometry tuple[int, ...] where Conv2d's constructor wants pairs: a Conv2d's are
            stem = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,  # type: ignore[arg-type]
                             module.padding, module.dilation, module.groups,  # type: ignore[arg-type]
                             module.bias is not None, module.padding_mode)
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
