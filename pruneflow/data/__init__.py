"""Datasets: every source is prepared into one on-disk layout, an image folder, and loaded through one path.

``data/<dataset>/{train,test}/<class>/<image>.png`` is what DVC versions, what the baseline stage
hashes and what ``dataset: imagefolder`` users already have, so built-in and user data share all code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pruneflow.data import (
    super_resolution,  # noqa: F401  (registers skimage, bsds300, image_dir)
    torchvision_sources,  # noqa: F401  (registers cifar10, cifar100, svhn)
)
from pruneflow.data.loading import DataSplits, TensorLoader, load_splits
from pruneflow.data.sources import DATASETS, DatasetSource, prepare_dataset

if TYPE_CHECKING:
    from pruneflow.config import DataConfig


def load_dataset(cfg: DataConfig, data_path: Path, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> DataSplits:
    """A prepared dataset as in-memory splits, read as its source says (labelled images, or SR pairs)."""
    return DATASETS.get(cfg.dataset).load(data_path, cfg, seed, progress)


__all__ = ["DATASETS", "DataSplits", "DatasetSource", "TensorLoader", "load_dataset", "load_splits",
           "prepare_dataset"]
