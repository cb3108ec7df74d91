"""A model as ONNX Runtime runs it: convolution *units*, the tensors between them, and their channel groups.

Read from the model's exported ONNX file (the one the runtime loads), not from PyTorch, because the runtime's
own graph decides what costs time: it folds BatchNorm into the convolution and fuses the activation and a
residual ``Add`` into it, so a *unit* is a ``Conv`` with the elementwise nodes that follow it up to the next
tensor used twice (``Conv → Relu``, ``Conv → Add(skip) → Relu``, ``Conv → Clip``, ``Conv → Sigmoid/Mul``). An
``Add`` of two branches belongs to the unit producing its first input, as ONNX Runtime fuses it.

Channel groups are the tensors whose channel counts must stay equal (joined through elementwise nodes, residual
adds, depthwise convolutions and pooling). A count per group gives every unit its input and output channels,
which is all the latency table needs; ``sliced_model`` also writes the ONNX file of that pruned net, for
checking predictions against measurement without exporting again.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from pruneflow.metrics import forward_hooked

# Nodes that keep the channel count of their (first) input and are fused into, or run beside, a convolution.
ELEMENTWISE = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu",
               "Mul", "Add", "Sub", "Div", "BatchNormalization", "Dropout", "Identity"}
# Nodes that keep channels but change or drop the spatial size (joined into the input's group, not fused).
POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "Flatten",
           "Reshape", "Squeeze", "Unsqueeze"}


@dataclass(frozen=True)
class Unit:
    """A convolution and the nodes the runtime fuses into it."""

    name: str  # the PyTorch module of its convolution ("layer1.0.conv1")
    nodes: tuple[int, ...]  # indices into the graph's node list, in order
    x: str  # the tensor the convolution reads
    out: str  # the tensor the unit writes
    skip: str | None  # the other operand of a fused residual Add
    depthwise: bool
    kernel: tuple[int, int]
    stride: tuple[int, int]
    signature: str  # the node types in order, with the attributes that do not depend on channels

    @property
    def residual(self) -> bool:
        return self.skip is not None


@dataclass
class ModelGraph:
    """The units, tensor shapes (channels, height, width per sample) and channel groups of one ONNX model."""

    model: onnx.ModelProto
    units: list[Unit]
    shapes: dict[str, tuple[int, ...]]
    group_of: dict[str, int]  # tensor -> channel group
    sizes: dict[int, int]  # channel group -> channels in this model
    layer_keys: dict[str, str] = field(repr=False, default_factory=dict)  # unit -> its table key (a cache)

    @property
    def unit_by_name(self) -> dict[str, Unit]:
        return {unit.name: unit for unit in self.units}

    def channels(self, counts: dict[int, int], tensor: str) -> int:
        """Channels of ``tensor`` when the groups keep ``counts`` (groups not named keep their size)."""
        group = self.group_of[tensor]
        return counts.get(group, self.sizes[group])

    def unit_channels(self, unit: Unit, counts: dict[int, int] | None = None) -> tuple[int, int]:
        counts = counts or {}
        return self.channels(counts, unit.x), self.channels(counts, unit.out)

    def counts_of(self, channels: dict[str, tuple[int, int]]) -> dict[int, int]:
        """Group counts from modules' (in, out) channels, e.g. those of a pruned PyTorch model."""
        counts: dict[int, int] = {}
        for name, (c_in, c_out) in channels.items():
            unit = self.unit_by_name.get(name)
            if unit is None:
                continue
            for tensor, count in ((unit.x, c_in), (unit.out, c_out)):
                group = self.group_of[tensor]
                if counts.setdefault(group, count) != count:
                    raise ValueError(f"{name}: channel group of {tensor} has {counts[group]} and {count} channels")
        return counts

    def structure_hash(self) -> str:
        """Names the model's structure (node types, attributes, shapes), not its weights: the fixed-cost key."""
        digest = hashlib.sha256()
        for node in self.model.graph.node:
            digest.update(node.op_type.encode())
            digest.update(str(sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)).encode())
        digest.update(str(sorted(self.shapes.items())).encode())
        return digest.hexdigest()[:16]


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    return {init.name for init in graph.initializer} | {out for node in graph.node if node.op_type == "Constant"
                                                        for out in node.output}


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (without the batch axis) of every tensor with a static shape after inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) >= 2 and all(d.HasField("dim_value") for d in dims[1:]):
            shapes[info.name] = tuple(d.dim_value for d in dims[1:])
    return shapes


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _module_name(weight: str, index: int) -> str:
    return weight.removesuffix(".weight") if weight.endswith(".weight") else f"conv{index}"


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def conv_call_order(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    """The model's convolution modules in the order a forward pass calls them (the exported graph's order)."""
    order: list[str] = []
    forward_hooked(model, example_inputs, {module: lambda *_, name=name: order.append(name)
                                           for name, module in model.named_modules() if isinstance(module, nn.Conv2d)})
    return order


def read_graph(model: onnx.ModelProto | Path, names: list[str] | None = None) -> ModelGraph:
    """The units and channel groups of an exported classification or image-to-image CNN.

    Units are named after their convolution's module: from the weight's name (the default exporter keeps
    it), else from ``names``, the modules in call order (``conv_call_order``)."""
    model = _shared_weights_copied(onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model)
    shapes = _shapes(model)
    units = _units(model.graph, shapes, names)
    group_of = _channel_groups(model.graph, shapes, units)
    sizes = {group_of[t]: shapes[t][0] for t in shapes}
    return ModelGraph(model, units, shapes, group_of, sizes)


def _shared_weights_copied(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each ``Identity`` of an initializer replaced by a copy of it: the TorchScript exporter
    (opset < 18) shares equal weights (two zero biases) that way, and each convolution's weights must be its own
    to be cut to its channel counts."""
    inits = {init.name: init for init in model.graph.initializer}
    shared = [node for node in model.graph.node if node.op_type == "Identity" and node.input[0] in inits]
    if not shared:
        return model
    model = copy.deepcopy(model)
    for node in [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        clone = copy.deepcopy(inits[node.input[0]])
        clone.name = node.output[0]
        model.graph.initializer.append(clone)
        model.graph.node.remove(node)
    return model


@dataclass
class _OpenUnit:
    """A unit while the graph is read: its nodes so far, the tensor it writes, a fused Add's other operand."""

    nodes: list[int]
    out: str
    skip: str | None = None


def _units(graph: onnx.GraphProto, shapes: dict[str, tuple[int, ...]], names: list[str] | None) -> list[Unit]:
    constants = _constant_names(graph)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in constants:
                consumers.setdefault(name, []).append(index)
    outputs = {out.name for out in graph.output}

    def data_inputs(node: onnx.NodeProto) -> list[str]:
        return [name for name in node.input if name and name not in constants]

    def chain(start: int) -> tuple[list[int], str]:
        """The elementwise nodes after ``start``, up to a tensor read twice (a SiLU's Sigmoid and Mul are one step)."""
        nodes, tensor = [start], graph.node[start].output[0]
        while tensor not in outputs:
            users = [graph.node[i] for i in consumers.get(tensor, [])]
            if len(users) == 1 and users[0].op_type in ELEMENTWISE and data_inputs(users[0]) == [tensor]:
                nodes += consumers[tensor]
                tensor = users[0].output[0]
                continue
            kinds = {node.op_type: i for node, i in zip(users, consumers.get(tensor, []), strict=True)}
            if len(users) == 2 and set(kinds) == {"Sigmoid", "Mul"}:
                sigmoid, mul = graph.node[kinds["Sigmoid"]], graph.node[kinds["Mul"]]
                if sorted(mul.input) == sorted([tensor, sigmoid.output[0]]):
                    nodes += [kinds["Sigmoid"], kinds["Mul"]]
                    tensor = mul.output[0]
                    continue
            break
        return nodes, tensor

    weights = {init.name: init for init in graph.initializer}
    convs = [i for i, node in enumerate(graph.node) if node.op_type == "Conv" and node.input[1] in weights]
    if names is not None and len(names) != len(convs):
        raise ValueError(f"{len(names)} convolution names for {len(convs)} Conv nodes in the ONNX graph")
    found = {i: _OpenUnit(*chain(i)) for i in convs}
    ends = {entry.out: conv for conv, entry in found.items()}
    # A residual Add joins the unit of its first input (as ONNX Runtime fuses it), else of its second.
    for index, node in enumerate(graph.node):
        inputs = data_inputs(node)
        if node.op_type != "Add" or len(inputs) != 2 or shapes.get(inputs[0]) != shapes.get(inputs[1]):
            continue
        owner = next((ends[t] for t in inputs if t in ends and consumers.get(t) == [index]), None)
        if owner is None:
            continue
        entry = found[owner]
        del ends[entry.out]
        entry.skip = inputs[1] if inputs[0] == entry.out else inputs[0]
        rest, entry.out = chain(index)
        entry.nodes = entry.nodes + rest
        ends[entry.out] = owner

    units = []
    for position, conv in enumerate(convs):
        node, entry = graph.node[conv], found[conv]
        attrs = _attributes(node)
        weight = weights[node.input[1]]
        depthwise = attrs.get("group", 1) == shapes[node.input[0]][0] > 1 and weight.dims[1] == 1
        parts = []
        for i in entry.nodes:
            fixed = {k: v for k, v in _attributes(graph.node[i]).items() if k != "group"}
            parts.append(graph.node[i].op_type + (str(sorted(fixed.items())) if fixed else ""))
        name = names[position] if names is not None else _module_name(node.input[1], position)
        units.append(Unit(name, tuple(entry.nodes), node.input[0], entry.out, entry.skip, depthwise,
                          tuple(attrs.get("kernel_shape", weight.dims[2:])), tuple(attrs.get("strides", (1, 1))),
                          ">".join(parts)))
    return units


def _channel_groups(graph: onnx.GraphProto, shapes: dict[str, tuple[int, ...]], units: list[Unit]) -> dict[str, int]:
    """Tensor -> channel group: tensors joined by a depthwise convolution, or by an elementwise or pooling node
    whose inputs and output have the same channel count."""
    constants = _constant_names(graph)
    depthwise = {unit.nodes[0] for unit in units if unit.depthwise}
    groups = _UnionFind()
    for name in shapes:
        groups.find(name)
    for index, node in enumerate(graph.node):
        inputs = [t for t in node.input if t and t not in constants and t in shapes]
        if index in depthwise:
            groups.union(node.input[0], node.output[0])
        elif inputs and (node.op_type in ELEMENTWISE or node.op_type in POOLING):
            same = [t for t in [*inputs, *node.output] if t in shapes and shapes[t][0] == shapes[inputs[0]][0]]
            for tensor in same[1:]:
                groups.union(same[0], tensor)
    roots: dict[str, int] = {}
    return {tensor: roots.setdefault(groups.find(tensor), len(roots)) for tensor in shapes}


def _resize(array: np.ndarray, axis_sizes: dict[int, int]) -> np.ndarray:
    """Cut (or repeat, to grow) an array along the given axes."""
    for axis, size in axis_sizes.items():
        index = np.arange(size) % array.shape[axis]
        array = np.take(array, index, axis=axis)
    return array


def cut_channels(model: onnx.ModelProto, graph: ModelGraph, counts: dict[int, int]) -> onnx.ModelProto:
    """Cut, in place, the weights and shape constants of ``model`` (``graph``'s model or a part of it) to the
    channel counts of ``counts``: convolution and Gemm weights along their channel axes, per-channel constants
    of elementwise nodes, depthwise group counts, and a Reshape constant that names a group's channel count."""
    inits = {init.name: init for init in model.graph.initializer}
    new_values: dict[str, np.ndarray] = {}

    def count(tensor: str) -> int:
        return graph.channels(counts, tensor)

    for node in model.graph.node:
        data = [t for t in node.input if t in graph.group_of]
        if node.op_type == "Conv":
            c_in, c_out = count(node.input[0]), count(node.output[0])
            weight = numpy_helper.to_array(inits[node.input[1]])
            group = _attributes(node).get("group", 1)
            if group > 1 and weight.shape[1] == 1 and group == graph.shapes[node.input[0]][0]:
                for attr in node.attribute:
                    if attr.name == "group":
                        attr.i = c_in
                new_values[node.input[1]] = _resize(weight, {0: c_out})
            else:
                new_values[node.input[1]] = _resize(weight, {0: c_out, 1: c_in // group})
            if len(node.input) > 2 and node.input[2]:
                new_values[node.input[2]] = _resize(numpy_helper.to_array(inits[node.input[2]]), {0: c_out})
        elif node.op_type == "Gemm" and node.input[1] in inits:
            weight = numpy_helper.to_array(inits[node.input[1]])
            axis = 1 if _attributes(node).get("transB", 0) else 0
            new_values[node.input[1]] = _resize(weight, {axis: count(node.input[0])})
        elif node.op_type == "Reshape" and data and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).copy()
            old, new = graph.shapes[data[0]][0], count(data[0])
            if list(shape).count(old) == 1:
                shape[list(shape).index(old)] = new
                new_values[node.input[1]] = shape
        elif data and node.op_type in ELEMENTWISE:
            old, new = graph.shapes[data[0]][0], count(data[0])
            for name in node.input:
                if name not in inits:
                    continue
                value = numpy_helper.to_array(inits[name])
                channel_axis = {1: 0, 3: 0, 4: 1}.get(value.ndim)
                if channel_axis is not None and value.shape[channel_axis] == old != new:
                    new_values[name] = _resize(value, {channel_axis: new})
    for name, value in new_values.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
    for info in [*model.graph.input, *model.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if info.name in graph.group_of and len(dims) > 1 and dims[1].HasField("dim_value"):
            dims[1].dim_value = count(info.name)
    del model.graph.value_info[:]
    return model


def sources(graph: ModelGraph, removed: Iterable[str]) -> Callable[[str], str]:
    """Maps a tensor to the one that stands for it once the ``removed`` units are gone: a removed residual
    unit's output is its identity operand (the whole block became identity)."""
    gone = set(removed)
    skips = {unit.out: unit.skip for unit in graph.units if unit.name in gone and unit.skip}

    def source(tensor: str) -> str:
        while tensor in skips:
            tensor = skips[tensor]
        return tensor
    return source


def sliced_model(graph: ModelGraph, counts: dict[int, int], removed: Iterable[str] = ()) -> onnx.ModelProto:
    """The ONNX model of the same net with each channel group cut to ``counts`` (others whole) and the units of
    ``removed`` residual blocks gone (their input passed on, as ``remove_blocks`` does).

    What exporting the pruned PyTorch net writes, up to which channels are kept (the weights here are the
    first ones), so its latency is the pruned net's; it saves an export per net when checking predictions.
    """
    model = copy.deepcopy(graph.model)
    gone = set(removed)
    dropped = {i for unit in graph.units if unit.name in gone for i in unit.nodes}
    source = sources(graph, gone)
    kept = [node for i, node in enumerate(model.graph.node) if i not in dropped]
    for node in kept:
        node.input[:] = [source(t) if t else t for t in node.input]
    for output in model.graph.output:
        if source(output.name) != output.name:
            kept.append(helper.make_node("Identity", [source(output.name)], [output.name]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {t for node in kept for t in node.input}
    kept_inits = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)
    return cut_channels(model, graph, counts)
