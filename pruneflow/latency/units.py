"""The small ONNX graphs that time one unit as it runs inside the full model.

Timing a unit as a graph of its own would add what the full model does not pay per unit: the session's fixed
cost per run, and format conversions at the graph's edges. ONNX Runtime's CPU provider runs most convolutions
in a blocked channel layout (NCHWc) and converts to plain NCHW only where a neighbour needs it; a graph whose
input and output are plain NCHW would pay both conversions around every unit. So a unit is measured like this:

1. its nodes are cut out of the model's ONNX graph at the channel counts asked for, and fed by 1×1 *prefix*
   convolutions (a few input channels, so any runtime runs them directly on the graph input), which produce
   ``x`` and the residual operand in whatever layout the runtime would give them inside a model;
2. the runtime optimises that graph (fusing BatchNorm, activation and residual add into the convolution, or
   not, exactly as in the model);
3. the prefixes and the layout conversions at the graph's edges are cut off the optimised graph, which then
   holds exactly the nodes the unit costs inside the model, and its inputs are the tensors in their layout;
4. ``copies`` copies of it in one graph are timed against as many bare copies of its outputs (the session's
   fixed cost and the output copy cancel), giving the time per unit.

The layout each unit reads and writes is recorded, so the model-level prediction can add a conversion where
two neighbouring units disagree (``conversion_model`` times one).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pruneflow.latency.graph import ModelGraph, Unit, cut_channels

NCHWC = "com.microsoft.nchwc"
PREFIX_CHANNELS = 4  # below any NCHWc block, so prefix convolutions read the graph input as it is
REORDERS = ("ReorderInput", "ReorderOutput")


@dataclass(frozen=True)
class Layouts:
    """Whether a unit reads ``x`` (and its residual operand) and writes its output in the blocked layout."""

    x: bool
    skip: bool | None
    out: bool


@dataclass
class TimedGraph:
    """A graph to time, its inputs (per-sample shapes, in order), and the layouts of the unit inside it."""

    model: onnx.ModelProto
    inputs: list[tuple[int, ...]]
    outputs: list[tuple[int, ...]]
    layouts: Layouts | None  # None for a graph that is not one unit (an anchor, a whole model)


def _value_info(name: str, channels: int | str, spatial: tuple[int, ...] | tuple[str, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", channels, *spatial])


def _prefix(name: str, source: str, channels: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    rng = np.random.default_rng(channels)
    weight = numpy_helper.from_array(rng.normal(0, 0.1, (channels, PREFIX_CHANNELS, 1, 1)).astype(np.float32),
                                     f"{name}.weight")
    bias = numpy_helper.from_array(np.zeros(channels, np.float32), f"{name}.bias")
    node = helper.make_node("Conv", [source, weight.name, bias.name], [name], name=f"{name}.conv", kernel_shape=[1, 1])
    return node, [weight, bias]


def unit_model(graph: ModelGraph, unit: Unit, c_in: int, c_out: int, skip_blocked: bool = True) -> onnx.ModelProto:
    """The unit's nodes at ``c_in`` → ``c_out`` channels, fed by prefix convolutions (step 1 above).

    Whether the runtime fuses a residual Add into the convolution depends on the layout the other operand
    arrives in, which its producer decides: ``skip_blocked=False`` feeds it from a plain NCHW node instead."""
    source = graph.model.graph
    nodes = [copy.deepcopy(source.node[i]) for i in unit.nodes]
    used = {name for node in nodes for name in node.input}
    inits = [copy.deepcopy(init) for init in source.initializer if init.name in used]
    constants = [copy.deepcopy(node) for node in source.node if node.op_type == "Constant" and node.output[0] in used]
    spatial_x, spatial_out = graph.shapes[unit.x][1:], graph.shapes[unit.out][1:]
    roles = [("x", unit.x, spatial_x)] + ([("skip", unit.skip, spatial_out)] if unit.skip else [])
    region = helper.make_model(
        helper.make_graph(constants + nodes, unit.name, [_value_info(t, 0, s) for _, t, s in roles],
                          [_value_info(unit.out, 0, spatial_out)], inits),
        opset_imports=list(graph.model.opset_import), ir_version=graph.model.ir_version)
    model = cut_channels(region, graph, {graph.group_of[unit.x]: c_in, graph.group_of[unit.out]: c_out})
    inputs, outputs = [], list(model.graph.output)
    for role, tensor, spatial in roles:
        channels = c_in if role == "x" else c_out
        if role == "skip" and not skip_blocked:
            model.graph.node.insert(0, helper.make_node("Relu", ["skip_source"], [tensor], name="skip.relu"))
            inputs.append(_value_info("skip_source", channels, spatial))
        else:
            node, weights = _prefix(tensor, f"{role}_source", channels)
            model.graph.node.insert(0, node)
            model.graph.initializer.extend(weights)
            inputs.append(_value_info(f"{role}_source", PREFIX_CHANNELS, spatial))
        outputs.append(_value_info(tensor, c_in if role == "x" else c_out, spatial))  # read twice: nothing fuses
    del model.graph.input[:], model.graph.output[:]
    model.graph.input.extend(inputs)
    model.graph.output.extend(outputs)
    return model


def optimized(model: onnx.ModelProto, path: Path, threads: int, provider: str) -> onnx.ModelProto:
    """The graph ONNX Runtime runs for ``model`` on ``provider`` (written to ``path``)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=list(dict.fromkeys([provider,
                                                                                           "CPUExecutionProvider"])))
    return onnx.load(str(path))


def _is_reorder(node: onnx.NodeProto) -> bool:
    return node.domain == NCHWC and node.op_type in REORDERS


def _blocked(node: onnx.NodeProto) -> bool:
    return node.domain == NCHWC


def strip(model: onnx.ModelProto, unit: Unit, graph: ModelGraph, c_in: int, c_out: int) -> TimedGraph:
    """Cut the prefixes and the edge conversions off an optimised unit graph (step 3 above)."""
    source = model.graph
    constants = {init.name for init in source.initializer}
    weights = {init.name: init for init in source.initializer}
    graph_inputs = {info.name for info in source.input}
    out_name = unit.out
    removed: dict[str, str] = {}  # tensor written by a cut node -> the unit input it stands for ("x" or "skip")
    kept = []
    for node in source.node:
        data = [t for t in node.input if t and t not in constants]
        sources = [t.removesuffix("_source") for t in data if t in graph_inputs]
        if sources or (_is_reorder(node) and data and all(t in removed for t in data)):
            role = sources[0] if sources else removed[data[0]]
            removed.update(dict.fromkeys(node.output, role))
        else:
            kept.append(node)
    while kept and _is_reorder(kept[-1]) and kept[-1].output[0] == out_name:
        out_name = kept.pop().input[0]  # the unit's own output, before the conversion back to NCHW
    needed = {t for node in kept for t in node.input if t in removed}

    def fed_channels(tensor: str) -> int:
        producer = next(node for node in source.node if tensor in node.output)
        if producer.op_type == "ReorderOutput":
            return next(a.i for a in producer.attribute if a.name == "channels")
        if "Conv" in producer.op_type:
            return weights[producer.input[1]].dims[0]  # a prefix convolution: its (padded) output channels
        return c_in if removed[tensor] == "x" else c_out

    def spatial(role: str) -> tuple[int, ...]:
        tensor = unit.x if role == "x" else unit.skip
        assert tensor is not None  # a tensor has the role "skip" only in a unit with a fused residual Add
        return graph.shapes[tensor][1:]

    order = sorted(needed, key=lambda t: removed[t] != "x")
    inputs = [(t, (fed_channels(t), *spatial(removed[t]))) for t in order]
    producer = next(node for node in kept if out_name in node.output)
    out_channels = weights[producer.input[1]].dims[0] if _blocked(producer) else c_out

    def reads_blocked(role: str) -> bool:
        """Whether the tensor standing for ``role`` arrives blocked (written by an NCHWc node, not converted back)."""
        fed = [t for t in needed if removed[t] == role]
        producers = [node for node in source.node for t in fed if t in node.output]
        return any(_blocked(node) and node.op_type != "ReorderOutput" for node in producers)

    layouts = Layouts(reads_blocked("x"), reads_blocked("skip") if unit.skip else None, _blocked(producer))
    out_shape = (out_channels, *graph.shapes[unit.out][1:])
    stripped = helper.make_graph(
        kept, unit.name, [_value_info(t, shape[0], shape[1:]) for t, shape in inputs],
        [_value_info(out_name, out_shape[0], out_shape[1:])],
        [init for init in source.initializer if any(init.name in node.input for node in kept)])
    result = helper.make_model(stripped, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return TimedGraph(result, [shape for _, shape in inputs], [out_shape], layouts)


def copies(timed: TimedGraph, count: int) -> TimedGraph:
    """``count`` independent copies of a graph in one (every tensor and weight renamed per copy)."""
    source = timed.model.graph
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    for k in range(count):
        def rename(name: str, k: int = k) -> str:
            return f"{name}__{k}" if name else name

        for node in source.node:
            clone = copy.deepcopy(node)
            clone.name = rename(node.name)
            clone.input[:] = [rename(t) for t in node.input]
            clone.output[:] = [rename(t) for t in node.output]
            nodes.append(clone)
        for init in source.initializer:
            clone = copy.deepcopy(init)
            clone.name = rename(init.name)
            inits.append(clone)
        for group, target in ((source.input, inputs), (source.output, outputs)):
            for info in group:
                clone = copy.deepcopy(info)
                clone.name = rename(info.name)
                target.append(clone)
    model = helper.make_model(helper.make_graph(nodes, source.name, inputs, outputs, inits),
                              opset_imports=list(timed.model.opset_import), ir_version=timed.model.ir_version)
    return TimedGraph(model, timed.inputs * count, timed.outputs * count, timed.layouts)


def null_model(shapes: list[tuple[int, ...]]) -> TimedGraph:
    """Graph inputs passed straight to outputs: the session's fixed cost and the output copies of a timed graph."""
    nodes, inputs, outputs = [], [], []
    for k, shape in enumerate(shapes):
        inputs.append(_value_info(f"in{k}", shape[0], shape[1:]))
        outputs.append(_value_info(f"out{k}", shape[0], shape[1:]))
        nodes.append(helper.make_node("Identity", [f"in{k}"], [f"out{k}"]))
    model = helper.make_model(helper.make_graph(nodes, "null", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18)])
    return TimedGraph(model, list(shapes), list(shapes), Layouts(False, None, False))


def conversion_model(kind: str, shape: tuple[int, ...], block: int) -> TimedGraph:
    """One NCHW → NCHWc (``ReorderInput``) or NCHWc → NCHW (``ReorderOutput``) conversion of a tensor."""
    channels, spatial = shape[0], shape[1:]
    padded = math.ceil(channels / block) * block
    attributes: dict[str, Any] = {"channels": channels} if kind == "ReorderOutput" else {}
    shape_in, shape_out = ((channels, padded) if kind == "ReorderInput" else (padded, channels))
    node = helper.make_node(kind, ["x"], ["y"], domain=NCHWC, **attributes)
    model = helper.make_model(
        helper.make_graph([node], kind, [_value_info("x", shape_in, spatial)], [_value_info("y", shape_out, spatial)]),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(NCHWC, 1)])
    return TimedGraph(model, [(shape_in, *spatial)], [(shape_out, *spatial)], Layouts(False, None, False))


def block_size(workdir: Path, threads: int, provider: str) -> int | None:
    """The runtime's NCHWc channel block (8 with AVX2, 16 with AVX-512), or None if it does not use the layout."""
    probe = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])], "probe",
        [_value_info("x", PREFIX_CHANNELS, (8, 8))], [_value_info("y", 1, (8, 8))],
        [numpy_helper.from_array(np.ones((1, PREFIX_CHANNELS, 1, 1), np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 18)])
    result = optimized(probe, workdir / "block-probe.onnx", threads, provider)
    convs = [node for node in result.graph.node if _blocked(node) and node.op_type == "Conv"]
    if not convs:
        return None
    weights = {init.name: init for init in result.graph.initializer}
    return int(weights[convs[0].input[1]].dims[0])

