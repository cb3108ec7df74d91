"""Model files: weights plus what rebuilds the architecture (the model spec and Torch-Pruning's history).

A pruned net is stored as the baseline's spec + the pruning history + the pruned state dict, so it is
rebuilt from code and plain tensors (no pickled classes) and can be retrained or pruned again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruneflow.files import replacing
from pruneflow.methods.base import rebuild_pruned
from pruneflow.models import MODELS, TORCHVISION_PREFIX, build_model


@dataclass
class ModelSpec:
    name: str
    in_channels: int
    num_classes: int | None  # None: a super-resolution model (its upscale_factor is in kwargs)
    input_shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: list[float] = field(default_factory=list)  # the input normalisation a deployment must apply
    std: list[float] = field(default_factory=list)

    def build(self) -> nn.Module:
        return build_model(self.name, self.in_channels, self.num_classes, self.kwargs)

    def example_inputs(self, batch: int = 2) -> torch.Tensor:
        return torch.zeros(batch, *self.input_shape)


def save_model(path: Path, model: nn.Module, spec: ModelSpec, history: list | None = None,
               removed_blocks: list[str] | None = None) -> Path:
    with replacing(path) as tmp:  # a reader never sees half a checkpoint
        torch.save({"spec": asdict(spec), "history": [list(step) for step in history or []],
                    "removed_blocks": list(removed_blocks or []), "state_dict": model.state_dict()}, tmp)
    return path


@dataclass
class Surgery:
    """How a pruned checkpoint differs from its baseline architecture."""

    history: list = field(default_factory=list)
    removed_blocks: list[str] = field(default_factory=list)


def read_checkpoint(path: Path) -> Any:
    """What ``torch.load`` reads from ``path`` (tensors and plain types only: no code runs).

    The unpickler fails in many ways on foreign bytes (``KeyError: 174812789``); each becomes one ValueError
    naming the file. A whole pickled ``nn.Module`` is refused the same way: unpickling it would run its code.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:
        objects = "Unsupported global" in str(err)  # a valid pickle of objects (a whole model), not of tensors
        hint = "; it holds pickled objects: save model.state_dict() instead" if objects else ""
        raise ValueError(f"{path}: not a model file pruneflow wrote nor a state_dict (torch.load: "
                         f"{type(err).__name__}{hint})") from None


def is_model_file(checkpoint: Any) -> bool:
    """Whether what ``read_checkpoint`` read is a model file of ``save_model``'s (else: a state_dict, maybe)."""
    return (isinstance(checkpoint, dict) and {"spec", "history", "state_dict"} <= checkpoint.keys()
            and isinstance(checkpoint["spec"], dict))


def load_model(path: Path) -> tuple[nn.Module, ModelSpec, Surgery]:
    """Rebuild the model a checkpoint holds; returns it in eval mode with its spec and surgery.

    A file that is no checkpoint of ``save_model``'s (another tool's weights, a truncated download) raises a
    ValueError naming it. For the files a project's own stages wrote; a file a user hands over goes through
    ``load_foreign_model``.
    """
    return rebuild(_model_file(path))


def load_foreign_model(path: Path, model_name: str | None = None) -> tuple[nn.Module, ModelSpec, Surgery]:
    """``load_model`` for a file from elsewhere: its spec names the model factory pruneflow calls, so a
    ``package.module:function`` there (which imports and runs any code) is built only when the user named that
    model (``model_name``); registered models and ``torchvision:<name>`` are always fine."""
    checkpoint = _model_file(path)
    name = checkpoint["spec"].get("name")
    if not isinstance(name, str) or (name not in MODELS and not name.startswith(TORCHVISION_PREFIX)
                                     and name != model_name):
        raise ValueError(f"{path}: its model {name!r} is neither registered nor torchvision:<name>, and building it "
                         f"would import and run that code; if you trust the file, name the model: --model {name}")
    return rebuild(checkpoint)


def _model_file(path: Path) -> dict:
    """The contents of a model file ``save_model`` wrote; a ValueError naming ``path`` for anything else."""
    checkpoint = read_checkpoint(path)
    if not is_model_file(checkpoint):
        raise ValueError(f"{path}: not a model file pruneflow wrote (a dict with spec, history and state_dict, "
                         "as pruneflow's stages save them)")
    return checkpoint


def rebuild(checkpoint: dict) -> tuple[nn.Module, ModelSpec, Surgery]:
    """The model of a model file's contents (``read_checkpoint``'s), in eval mode, with its spec and surgery."""
    spec_fields = checkpoint["spec"]
    spec = ModelSpec(**{**spec_fields, "input_shape": tuple(spec_fields["input_shape"])})
    model = spec.build()
    surgery = Surgery(checkpoint["history"], checkpoint.get("removed_blocks", []))
    rebuild_pruned(model, spec.example_inputs(), surgery.history, surgery.removed_blocks)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), spec, surgery


def load_trained(path: Path, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
    """A trained model to start from: a model file pruneflow wrote, or a plain ``state_dict`` for ``spec``'s model.

    ``spec`` is the model the config and the data describe. A model file must hold that model (same name,
    input channels and classes); its own normalisation comes back in the returned spec. A state_dict must fit
    ``spec.build()`` key for key and shape for shape (keys saved from ``nn.DataParallel``, all prefixed
    ``module.``, are read without it); otherwise one ValueError names the first keys that do not fit.
    """
    checkpoint = read_checkpoint(path)
    if is_model_file(checkpoint):
        saved = checkpoint["spec"]
        found = (saved.get("name"), saved.get("in_channels"), saved.get("num_classes"))
        if found != (spec.name, spec.in_channels, spec.num_classes):  # checked before its factory runs
            raise ValueError(f"{path}: holds model {found[0]} for {found[1]} input channels and {found[2]} classes, "
                             f"not {spec.name} for {spec.in_channels} and {spec.num_classes}")
        model, rebuilt, _ = rebuild(checkpoint)
        return model, rebuilt
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: neither a model file pruneflow wrote nor a state_dict (a dict of tensors)")
    state = checkpoint
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    model = spec.build()
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        hint = ("was it saved from another model?" if state.keys() != model.state_dict().keys() else
                "was it trained with other classes, input channels or model kwargs?")
        raise ValueError(f"{path}: the state_dict does not fit model {spec.name} ({problem}); {hint}")
    model.load_state_dict(state)
    return model.eval(), spec


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], shown: int = 3) -> str:
    """The first keys the file lacks (missing), holds beyond the model's (unexpected) and holds at another shape;
    '' when every key fits."""
    def first(names: list[str]) -> str:
        return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")

    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shapes = [f"{key} {tuple(found[key].shape)} vs the model's {tuple(value.shape)}"
              for key, value in expected.items() if key in found and found[key].shape != value.shape]
    parts = [f"{label}: {first(names)}" for label, names in (("missing keys", missing), ("unexpected keys", unexpected),
                                                             ("shape mismatches", shapes)) if names]
    return "; ".join(parts)
