"""The measured latency table of one machine and runtime, and whole-model latency predicted from it.

An entry is the time of one unit (a convolution with what the runtime fuses into it) at given input and output
channel counts, kernel, stride, groups, spatial size and batch, as it runs inside a full model (see ``units``);
or the time of one layout conversion between two units. Entries are measured on first use, interleaved in
chunks by ``pruneflow.export.measure_latency`` (the project's one timer), and kept in a JSON file named by the
machine and runtime (CPU model, cores, threads, onnxruntime version, provider). A file lock makes concurrent
processes wait for one another, so a table is measured once per machine and shared by every run, trial and
worker (the lock also keeps two processes from timing at once).

A whole model's latency is predicted from the sum of its units at their channel counts, plus a conversion where
two neighbouring units use different layouts, placed on two measured forms of the model (``calibrate``): the
unpruned net and a half-width one, through whose points the prediction runs (``_on_calibration``). What the
units do not account for (the residual: the rest of the graph, and what a unit costs inside the whole model
beyond its own graph) is thus fitted: as a constant it made thinned MobileNetV2 nets look up to twice as slow as
they ran, and in proportion to the units it missed MobileNetV2 at batch 32 by 25 % (docs/latency-model.md).

Wall times are the 10th percentile of the interleaved runs (on a shared machine others' load only ever adds
time), beside the median CPU time of the process. What one ``ensure`` needs is timed in one interleaved chunk
(up to ``CHUNK`` entries), and a few unit graphs of the first chunk (the *anchors*, kept beside the table) are
timed again beside every later chunk: its times are scaled by the anchors' first times over their times in
the chunk, so chunks measured minutes apart under different load stay comparable; ``time_models`` puts whole
models timed later on the same scale.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from pruneflow.concurrency import file_lock
from pruneflow.export import CPU, Latency, ProviderUnavailable, measure_latency
from pruneflow.latency.graph import ModelGraph, Unit, sliced_model, sources
from pruneflow.latency.units import (
    TimedGraph,
    block_size,
    conversion_model,
    copies,
    null_model,
    optimized,
    strip,
    unit_model,
)

CHUNK = 192  # entries timed together, interleaved (a predict or sweep usually needs fewer: one chunk)
ANCHORS = 6  # unit graphs of a batch's first chunk, timed again beside every later chunk


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return cpu


def fingerprint(threads: int, provider: str = CPU) -> dict[str, str | int]:
    """What a measurement depends on besides the graph: a table is valid only where all of it is the same."""
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "threads": threads, "onnxruntime": ort.__version__,
            "provider": provider}


@dataclass(frozen=True)
class UnitRequest:
    graph: ModelGraph
    unit: Unit
    c_in: int
    c_out: int
    batch: int
    skip_blocked: bool | None = None  # residual units: the layout their other operand arrives in


@dataclass(frozen=True)
class ConversionRequest:
    kind: str  # "ReorderInput" (NCHW -> NCHWc) or "ReorderOutput"
    shape: tuple[int, ...]  # channels, height, width
    batch: int


Request = UnitRequest | ConversionRequest


def graph_hash(model: onnx.ModelProto, inputs: list[tuple[int, ...]]) -> str:
    """Names the work a graph does: its nodes, attributes, weight shapes and input shapes (not weight values)."""
    parts = [str(inputs)]
    for node in model.graph.node:
        attributes = sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in node.attribute)
        parts.append(f"{node.domain}.{node.op_type}{attributes}")
    parts += sorted(str(list(init.dims)) for init in model.graph.initializer)
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def layer_key(graph: ModelGraph, unit: Unit) -> str:
    """Names a unit's kind of layer: its nodes and their attributes, depthwise or not, its input size."""
    if unit.name not in graph.layer_keys:
        text = json.dumps([unit.signature, unit.depthwise, graph.shapes[unit.x][1:]])
        graph.layer_keys[unit.name] = hashlib.sha1(text.encode()).hexdigest()[:12]
    return graph.layer_keys[unit.name]


def request_key(request: Request) -> str:
    if isinstance(request, UnitRequest):
        skip = {None: "", True: "|skip-blocked", False: "|skip-plain"}[request.skip_blocked]
        return f"{layer_key(request.graph, request.unit)}|b{request.batch}|{request.c_in}x{request.c_out}{skip}"
    return f"{request.kind}|b{request.batch}|{'x'.join(map(str, request.shape))}"


@dataclass(frozen=True)
class Variant:
    """A pruned form of a model: channel counts per group (others whole) and the units removed with blocks."""

    counts: dict[int, int]
    removed: frozenset[str] = frozenset()


@dataclass
class Prediction:
    ms: float  # wall time: the 10th percentile of interleaved runs, on the table's scale
    cpu_ms: float  # CPU time of the process per run (median), which others' load barely changes
    units_ms: dict[str, float]  # per unit (its convolution's module name), wall
    conversions_ms: float
    fixed_ms: float | None  # the residual (what the units do not account for); None until ``calibrate``


@dataclass(frozen=True)
class Scale:
    """Factors that put times measured now on the table's scale: the anchors' first times over their times now."""

    wall: float
    cpu: float


@dataclass
class LatencyTable:
    """The entries measured on this machine for one thread count and provider, read from and added to ``folder``."""

    folder: Path
    threads: int = 2
    provider: str = CPU
    warmup: int = 5
    repeats: int = 30
    progress: bool = True
    measured: int = field(default=0, init=False)  # entries this object measured (the rest came from the file)
    data: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.provider not in ort.get_available_providers():
            raise ProviderUnavailable(f"{self.provider} is not in this onnxruntime build "
                                      f"(it has {', '.join(ort.get_available_providers())})")
        self.fingerprint = fingerprint(self.threads, self.provider)
        name = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(self.folder) / f"{name}.json"
        self.anchor_folder = Path(self.folder) / f"{name}-anchors"
        self._load()

    def _load(self) -> None:
        stored = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data = {"fingerprint": self.fingerprint, "entries": {}, "effective": {}, "layers": {}, "fixed": {},
                     "anchors": {}, **stored}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)

    @property
    def entries(self) -> dict[str, dict]:
        return self.data["entries"]

    def __len__(self) -> int:
        return len(self.entries)

    def channel_block(self) -> int | None:
        """The runtime's NCHWc channel block on this machine (``units.block_size``), or None without that layout;
        read once from the optimised graph of a probe and kept in the table."""
        if "block" not in self.data:
            with tempfile.TemporaryDirectory(prefix="pruneflow-latency-") as scratch:
                block = block_size(Path(scratch), self.threads, self.provider)
            with file_lock(self.path.with_name(self.path.name + ".lock")):
                self._load()
                self.data["block"] = block
                self._save()
        return self.data["block"]

    def ensure(self, requests: Iterable[Request]) -> None:
        """Measure the requests that are not in the table yet (under the table's lock, with a progress bar)."""
        wanted = {request_key(r): r for r in requests}
        if all(key in self.entries for key in wanted):
            return
        block = self.channel_block()
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self._load()  # another process may have measured them while this one waited
            missing = [(key, r) for key, r in wanted.items() if key not in self.entries]
            if not missing:
                return
            with tempfile.TemporaryDirectory(prefix="pruneflow-latency-") as scratch, \
                    tqdm(total=len(missing), desc=f"latency table ({self.provider}, {self.threads} threads)",
                         unit="layer", disable=not self.progress) as bar:
                for batch in sorted({r.batch for _, r in missing}):
                    of_batch = [(key, r) for key, r in missing if r.batch == batch]
                    for start in range(0, len(of_batch), CHUNK):
                        chunk = of_batch[start:start + CHUNK]
                        self.entries.update(self._measure(chunk, batch, block, Path(scratch)))
                        self.measured += len(chunk)
                        self._save()
                        bar.update(len(chunk))

    def _timed(self, request: Request, block: int | None, scratch: Path) -> tuple[TimedGraph, dict]:
        if isinstance(request, ConversionRequest):
            if block is None:
                raise ValueError(f"{self.provider} runs no NCHWc layout, so it has no layout conversions to time")
            return conversion_model(request.kind, request.shape, block), {}
        unit = request.unit
        self.data["layers"].setdefault(layer_key(request.graph, unit), {
            "example": unit.name, "kernel": list(unit.kernel), "stride": list(unit.stride),
            "depthwise": unit.depthwise, "residual": unit.residual, "size": list(request.graph.shapes[unit.x][1:]),
            "nodes": unit.signature.count(">") + 1})
        model = unit_model(request.graph, unit, request.c_in, request.c_out, request.skip_blocked is not False)
        timed = strip(optimized(model, scratch / "optimized.onnx", self.threads, self.provider), unit,
                      request.graph, request.c_in, request.c_out)
        layouts = timed.layouts
        assert layouts is not None  # strip() reads them off the unit
        return timed, {"layouts": [layouts.x, layouts.skip, layouts.out]}

    def _time(self, graphs: dict[str, TimedGraph], batch: int, scratch: Path, repeats: int,
              anchor: bool = False) -> tuple[dict[str, Latency], Scale]:
        """``graphs`` timed interleaved with the table's anchors, and the factors that put them on its scale.

        The anchors are a few unit graphs of the first chunk measured at this batch (``anchor``: let these
        graphs become them if there are none yet); their first times over their times now are the factors."""
        rng = np.random.default_rng(0)
        anchors = self._anchors(batch)
        targets: dict[str, Path] = {}
        inputs: dict[str, tuple[np.ndarray, ...]] = {}
        for name, timed in {**graphs, **{f"anchor|{a['file']}": graph for a, graph in anchors}}.items():
            targets[name] = scratch / f"timed-{len(targets)}.onnx"
            onnx.save(timed.model, str(targets[name]))
            inputs[name] = tuple(rng.standard_normal((batch, *shape), dtype=np.float32) for shape in timed.inputs)
        timing = measure_latency(targets, inputs, self.warmup, repeats, self.threads, self.provider)
        if not anchors:
            if anchor:
                self._keep_anchors(graphs, timing, batch)
            return timing, Scale(1.0, 1.0)
        now = [(a, timing.pop(f"anchor|{a['file']}")) for a, _ in anchors]
        return timing, Scale(float(np.median([a["ms"] / t.p10_ms for a, t in now])),
                             float(np.median([a["cpu_ms"] / t.cpu_ms for a, t in now])))

    def _anchors(self, batch: int) -> list[tuple[dict, TimedGraph]]:
        return [(a, TimedGraph(onnx.load(str(self.anchor_folder / a["file"])), [tuple(s) for s in a["inputs"]],
                               [], None))
                for a in self.data["anchors"].get(f"b{batch}", [])]

    def _keep_anchors(self, graphs: dict[str, TimedGraph], timing: dict[str, Latency], batch: int) -> None:
        """Keep graphs spread over the chunk's range of times as the anchors of this batch."""
        names = sorted((n for n in graphs if not n.startswith("null|")), key=lambda n: timing[n].p10_ms)
        picks = sorted({names[round(k * (len(names) - 1) / max(1, ANCHORS - 1))] for k in range(ANCHORS)})
        self.anchor_folder.mkdir(parents=True, exist_ok=True)
        kept = []
        for k, name in enumerate(picks):
            file = f"b{batch}-{k}.onnx"
            onnx.save(graphs[name].model, str(self.anchor_folder / file))
            kept.append({"file": file, "inputs": [list(s) for s in graphs[name].inputs],
                         "ms": timing[name].p10_ms, "cpu_ms": timing[name].cpu_ms})
        self.data["anchors"][f"b{batch}"] = kept

    def _measure(self, chunk: list[tuple[str, Request]], batch: int, block: int | None,
                 scratch: Path) -> dict[str, dict]:
        """Time one chunk of requests interleaved, each against bare copies of its outputs.

        Requests whose optimised graphs are the same (channel counts the runtime pads to one block) share a
        timing, kept under the graph's own hash: a step of the staircase is then exactly flat."""
        count = max(1, 8 // batch)  # enough copies at batch 1 that the session's own cost is small
        graphs: dict[str, TimedGraph] = {}
        found: dict[str, tuple[str, dict]] = {}
        for key, request in chunk:
            timed, extra = self._timed(request, block, scratch)
            effective = f"{graph_hash(timed.model, timed.inputs)}|b{batch}"
            found[key] = (effective, extra)
            if effective not in self.data["effective"] and effective not in graphs:
                graphs[effective] = copies(timed, count)
                graphs.setdefault(f"null|{graphs[effective].outputs}", null_model(graphs[effective].outputs))
        if graphs:
            timing, scale = self._time(graphs, batch, scratch, self.repeats, anchor=True)
            for effective, timed in graphs.items():
                if effective.startswith("null|"):
                    continue
                own, null = timing[effective], timing[f"null|{timed.outputs}"]
                self.data["effective"][effective] = {
                    "ms": max(0.0, own.p10_ms - null.p10_ms) * scale.wall / count,
                    "cpu_ms": max(0.0, own.cpu_ms - null.cpu_ms) * scale.cpu / count,
                    "timed_ms": own.p10_ms, "null_ms": null.p10_ms, "scale": scale.wall, "copies": count}
        return {key: {"ms": self.data["effective"][effective]["ms"],
                      "cpu_ms": self.data["effective"][effective]["cpu_ms"], "effective": effective, **extra}
                for key, (effective, extra) in found.items()}

    def ensure_grid(self, graph: ModelGraph, candidates: dict[int, list[int]], batch: int) -> None:
        """Measure every unit at every combination of its input and output groups' candidate counts, at once
        (a search over those counts then finds its entries in the table)."""
        requests = []
        for unit in graph.units:
            group_in, group_out = graph.group_of[unit.x], graph.group_of[unit.out]
            ins = candidates.get(group_in, [graph.sizes[group_in]])
            outs = candidates.get(group_out, [graph.sizes[group_out]])
            pairs = [(c, c) for c in ins] if group_in == group_out else [(a, b) for a in ins for b in outs]
            requests += [UnitRequest(graph, unit, a, b, batch, True if unit.skip else None) for a, b in pairs]
        self.ensure(requests)

    def time_models(self, paths: dict[str, Path], batch: int, repeats: int = 100) -> tuple[dict[str, Latency], Scale]:
        """Time whole ONNX models interleaved (with the anchors), as they run now, and the factors that put
        them on the table's scale, for comparing them with predictions."""
        with file_lock(self.path.with_name(self.path.name + ".lock")), \
                tempfile.TemporaryDirectory(prefix="pruneflow-latency-") as scratch:
            graphs = {}
            for name, path in paths.items():
                model = onnx.load(str(path))
                shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
                graphs[name] = TimedGraph(model, [shape], [], None)
            self._load()
            timing, scale = self._time(graphs, batch, Path(scratch), repeats)
            self._save()
        return timing, scale

    # -- prediction --------------------------------------------------------------------------------------------

    def requests(self, graph: ModelGraph, variants: list[Variant],
                 batch: int) -> list[tuple[list[UnitRequest], list[ConversionRequest]]]:
        """The entries each variant of the model needs, measured.

        A residual unit's entry depends on the layout its producer writes the other operand in, so the entries
        are resolved in rounds until the layouts settle; then the conversions between units are added."""
        kept = [[unit for unit in graph.units if unit.name not in variant.removed] for variant in variants]
        skips = [{unit.name: True for unit in units if unit.skip} for units in kept]
        while True:
            found = [[UnitRequest(graph, unit, *graph.unit_channels(unit, variant.counts), batch, skip.get(unit.name))
                      for unit in units] for variant, units, skip in zip(variants, kept, skips, strict=True)]
            self.ensure(request for requests in found for request in requests)
            settled = []
            for requests, variant in zip(found, variants, strict=True):
                source = sources(graph, variant.removed)
                writes = {source(r.unit.out): bool(self.entries[request_key(r)]["layouts"][2]) for r in requests}
                settled.append({r.unit.name: writes.get(source(r.unit.skip), False) for r in requests if r.unit.skip})
            if settled == skips:
                break
            skips = settled
        conversions = [self._conversions(graph, variant, requests)
                       for variant, requests in zip(variants, found, strict=True)]
        self.ensure(request for requests in conversions for request in requests)
        return list(zip(found, conversions, strict=True))

    def _conversions(self, graph: ModelGraph, variant: Variant, units: list[UnitRequest]) -> list[ConversionRequest]:
        """The layout conversions the runtime inserts between units that read and write different layouts."""
        written: dict[str, bool] = {}
        read: dict[str, list[bool]] = {}
        source = sources(graph, variant.removed)
        for request in units:
            x, skip, out = self.entries[request_key(request)]["layouts"]
            written[request.unit.out] = bool(out)
            read.setdefault(source(request.unit.x), []).append(bool(x))
            if request.unit.skip:
                read.setdefault(source(request.unit.skip), []).append(bool(skip))
        unit_nodes = {i for unit in graph.units for i in unit.nodes}
        others = [t for i, node in enumerate(graph.model.graph.node) if i not in unit_nodes for t in node.input]
        for tensor in [*others, *(output.name for output in graph.model.graph.output)]:
            if source(tensor) in written:
                read.setdefault(source(tensor), []).append(False)  # other nodes read NCHW
        found = []
        for tensor, readers in read.items():
            blocked = written.get(tensor, False)
            if (blocked and not all(readers)) or (not blocked and any(readers)):
                shape = (graph.channels(variant.counts, tensor), *graph.shapes[tensor][1:])
                found.append(ConversionRequest("ReorderOutput" if blocked else "ReorderInput", shape, units[0].batch))
        return found

    def predict_variants(self, graph: ModelGraph, variants: list[Variant], batch: int = 1) -> list[Prediction]:
        """Latency (ms) of each variant of ``graph``'s model, measuring the entries the table lacks."""
        fixed = self.data["fixed"].get(f"{graph.structure_hash()}|b{batch}")
        if fixed is not None and "units_ms" not in fixed:
            fixed = None  # calibrated by an older version (one point, no units kept): as if not calibrated
        predictions = []
        for summed in self._sums(graph, variants, batch):
            wall = _on_calibration(fixed, summed.ms, "units_ms", "model_ms") if fixed else summed.ms
            cpu = _on_calibration(fixed, summed.cpu_ms, "units_cpu_ms", "model_cpu_ms") if fixed else summed.cpu_ms
            predictions.append(Prediction(wall, cpu, summed.units_ms, summed.conversions_ms,
                                          wall - summed.ms if fixed else None))
        return predictions

    def _sums(self, graph: ModelGraph, variants: list[Variant], batch: int) -> list[Prediction]:
        """Each variant's units and conversions summed from the entries (wall and CPU, on the table's scale),
        before they are placed on the calibrated models."""
        sums = []
        for units, conversions in self.requests(graph, variants, batch):
            units_ms = {r.unit.name: self.entries[request_key(r)]["ms"] for r in units}
            conversions_ms = sum(self.entries[request_key(r)]["ms"] for r in conversions)
            measured: list[Request] = [*units, *conversions]
            cpu = sum(self.entries[request_key(r)]["cpu_ms"] for r in measured)
            sums.append(Prediction(sum(units_ms.values()) + conversions_ms, cpu, units_ms, conversions_ms, None))
        return sums

    def predict_many(self, graph: ModelGraph, configs: list[dict[int, int]], batch: int = 1,
                     removed: Iterable[str] = ()) -> list[Prediction]:
        """Latency (ms) of ``graph``'s model for each configuration of channel counts (groups not named keep
        theirs), with the units of ``removed`` modules gone."""
        return self.predict_variants(graph, [Variant(counts, frozenset(removed)) for counts in configs], batch)

    def predict(self, graph: ModelGraph, counts: dict[int, int] | None = None, batch: int = 1,
                removed: Iterable[str] = ()) -> Prediction:
        return self.predict_many(graph, [counts or {}], batch, removed)[0]

    def calibrate(self, graph: ModelGraph, batch: int = 1, repeats: int = 100, force: bool = False,
                  prunable: Iterable[int] = ()) -> float:
        """Measure the unpruned model, and with ``prunable`` groups a half-width form of it (each group at half
        its channels, raised to the runtime's channel block) timed interleaved with it; keep both beside their
        units' sums, on which every prediction of the model is placed (``_on_calibration``). Returns the unpruned
        model's residual: what its units do not account for."""
        key = f"{graph.structure_hash()}|b{batch}"
        block = self.channel_block() or 1
        half = {group: -(-(graph.sizes[group] // 2) // block) * block for group in prunable}
        half = {group: count for group, count in half.items() if 0 < count < graph.sizes[group]}
        stored = self.data["fixed"].get(key, {})
        if "units_ms" in stored and ("half" in stored or not half) and not force:
            return stored["ms"]
        variants = {"model": Variant({}), **({"half": Variant(half)} if half else {})}
        sums = dict(zip(variants, self._sums(graph, list(variants.values()), batch), strict=True))
        with tempfile.TemporaryDirectory(prefix="pruneflow-latency-") as scratch:
            paths = {}
            for name, variant in variants.items():
                paths[name] = Path(scratch) / f"{name}.onnx"
                onnx.save(sliced_model(graph, variant.counts) if variant.counts else graph.model, str(paths[name]))
            timing, scale = self.time_models(paths, batch, repeats)
        points = {name: {"model_ms": timing[name].p10_ms * scale.wall, "model_cpu_ms": timing[name].cpu_ms * scale.cpu,
                         "units_ms": sums[name].ms, "units_cpu_ms": sums[name].cpu_ms} for name in variants}
        whole = points["model"]
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self._load()
            self.data["fixed"][key] = {**whole, "ms": whole["model_ms"] - whole["units_ms"],
                                       "cpu_ms": whole["model_cpu_ms"] - whole["units_cpu_ms"],
                                       **({"half": points["half"]} if "half" in points else {})}
            self._save()
        return self.data["fixed"][key]["ms"]


def _on_calibration(fixed: dict, summed: float, units: str, model: str) -> float:
    """The time of a variant whose units and conversions sum to ``summed``, placed on the calibrated models
    (``fixed``: the unpruned model's measured time under ``model`` beside its sum under ``units``, and its
    half-width form's under ``half``).

    Between the half-width model and the unpruned one, on the line through their two measured points: what the
    units do not account for (layout and elementwise work between them, the session's cost) neither stays
    constant nor shrinks in proportion, and two points fit both the share that shrinks and the share that does
    not (MobileNetV2 at batch 32, where the units miss half the time: random nets' error 25 % → 13–14 %). Below
    the half-width model, in proportion through its point, so time falls to zero with the units; with one point
    (no prunable group, or a half-width model not faster), in proportion through the unpruned model's."""
    whole_ms, whole_units = fixed[model], fixed[units]
    half = fixed.get("half")
    if half is None or not (half[model] < whole_ms and half[units] < whole_units):
        return summed * whole_ms / whole_units
    if summed < half[units]:
        return summed * half[model] / half[units]
    return half[model] + (summed - half[units]) * (whole_ms - half[model]) / (whole_units - half[units])
