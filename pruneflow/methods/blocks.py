"""Residual blocks that can be removed whole, found in any model by tracing.

A submodule can go (be replaced by identity) when its output is its input plus something: ``x + f(x)``, or
an activation of it (``relu(x + f(x))``, the ResNet block: its input is already an activation's output),
with the output shaped like the input. Each candidate (a submodule whose output shape equals its input shape
on an example forward) is traced alone with ``torch.fx``, so the whole model need not be traceable; it is a
block when an ``add`` of its graph takes the block's input itself (through identity modules only) and
leads to the output through at most elementwise activations. This finds the shape-keeping blocks of
torchvision's ResNet, RegNet, MobileNetV2/V3 and EfficientNet, and of the project's own models.

A model that declares ``removable_blocks()`` is taken at its word (a multi-branch model's extra branches are
removable without being residual).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from pruneflow.metrics import forward_hooked

ADDS = {operator.add, operator.iadd, torch.add}
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Identity, nn.Dropout)
ACTIVATION_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.silu}


def _shape_keeping(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """Submodules (not the model itself) whose single tensor output has the shape of their single tensor input."""
    keeps: list[str] = []

    def check(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if (len(inputs) == 1 and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor)
                    and inputs[0].shape == output.shape and name not in keeps):
                keeps.append(name)
        return hook

    # a leaf layer (a conv, an activation) is not a block
    forward_hooked(model, example_inputs, {module: check(name) for name, module in model.named_modules()
                                           if name and list(module.children())})
    return keeps


def _called_module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module a ``call_module`` node calls (its target is the module's qualified name), else None."""
    return modules[node.target] if node.op == "call_module" and isinstance(node.target, str) else None


def _through(node: fx.Node, modules: dict[str, nn.Module], kinds: tuple) -> fx.Node:
    """Follow single-argument identity-like steps backwards (calls of modules of ``kinds``)."""
    while (isinstance(_called_module(node, modules), kinds) and len(node.args) == 1
           and isinstance(node.args[0], fx.Node)):
        node = node.args[0]
    return node


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return (isinstance(_called_module(node, modules), ACTIVATIONS)
            or (node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("relu", "relu_")))


def is_residual(module: nn.Module) -> bool:
    """Whether ``module`` computes ``x + f(x)`` (optionally followed by elementwise activations)."""
    try:
        traced = fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - any failure to trace means "cannot tell", so not removable
        return False
    modules = dict(traced.named_modules())
    inputs = [node for node in traced.graph.nodes if node.op == "placeholder"]
    outputs = [node for node in traced.graph.nodes if node.op == "output"]
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        return False
    result = outputs[0].args[0]
    while _is_activation(result, modules) and isinstance(result.args[0], fx.Node):  # back through activations
        result = result.args[0]
    if not ((result.op == "call_function" and result.target in ADDS)
            or (result.op == "call_method" and result.target in ("add", "add_", "__add__", "__iadd__"))):
        return False
    operands = [arg for arg in result.args[:2] if isinstance(arg, fx.Node)]
    return len(operands) == 2 and any(_through(arg, modules, (nn.Identity,)) is inputs[0] for arg in operands)


def find_residual_blocks(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """Names of the submodules that compute ``x + f(x)`` with matching shapes, outermost only, in model order."""
    order = [name for name, _ in model.named_modules()]
    found: list[str] = []
    for name in sorted(_shape_keeping(model, example_inputs), key=order.index):  # outer blocks come first
        if not any(name.startswith(outer + ".") for outer in found) and is_residual(model.get_submodule(name)):
            found.append(name)
    return found


def removable_blocks(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """The model's own ``removable_blocks()`` if it declares them, else the residual blocks found by tracing."""
    declare = getattr(model, "removable_blocks", None)
    if callable(declare):
        return list(declare())
    return find_residual_blocks(model, example_inputs)
