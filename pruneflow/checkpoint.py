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


def load_model(path: Path) -> tuple[nn.Module, ModelSpec, Surgery]:
    """Rebuild the model a checkpoint holds; returns it in eval mode with its spec and surgery.

    A file that is no checkpoint of ``save_model``'s (another tool's weights, a truncated download) raises a
    ValueError naming it: the unpickler's own errors (``KeyError: 174812789``) say nothing about the file.
    For the files a project's own stages wrote; a file a user hands over goes through ``load_foreign_model``.
    """
    return _rebuild(_read(path))


def load_foreign_model(path: Path, model_name: str | None = None) -> tuple[nn.Module, ModelSpec, Surgery]:
    """``load_model`` for a file from elsewhere: its spec names the model factory pruneflow calls, so a
    ``package.module:function`` there (which imports and runs any code) is built only when the user named that
    model (``model_name``); registered models and ``torchvision:<name>`` are always fine."""
    checkpoint = _read(path)
    name = checkpoint["spec"].get("name")
    if not isinstance(name, str) or (name not in MODELS and not name.startswith(TORCHVISION_PREFIX)
                                     and name != model_name):
        raise ValueError(f"{path}: its model {name!r} is neither registered nor torchvision:<name>, and building it "
                         f"would import and run that code; if you trust the file, name the model: --model {name}")
    return _rebuild(checkpoint)


def _read(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # the unpickler fails in many ways on foreign bytes; each means the same here
        raise ValueError(f"{path}: not a model file pruneflow wrote (torch.load: {type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"spec", "history", "state_dict"} <= checkpoint.keys() \
            or not isinstance(checkpoint["spec"], dict):
        raise ValueError(f"{path}: not a model file pruneflow wrote (a dict with spec, history and state_dict, "
                         "as pruneflow's stages save them)")
    return checkpoint


def _rebuild(checkpoint: dict[str, Any]) -> tuple[nn.Module, ModelSpec, Surgery]:
    spec_fields = checkpoint["spec"]
    spec = ModelSpec(**{**spec_fields, "input_shape": tuple(spec_fields["input_shape"])})
    model = spec.build()
    surgery = Surgery(checkpoint["history"], checkpoint.get("removed_blocks", []))
    rebuild_pruned(model, spec.example_inputs(), surgery.history, surgery.removed_blocks)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), spec, surgery
