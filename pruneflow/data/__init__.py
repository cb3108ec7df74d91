"""Datasets: every source is prepared into one on-disk layout, an image folder, and loaded through one path.

``data/<dataset>/{train,test}/<class>/<image>.png`` is what DVC versions, what the baseline stage
hashes and what ``dataset: imagefolder`` users already have, so built-in and user data share all code.
"""

from __future__ import annotations

from pruneflow.data.loading import DataSplits, TensorLoader, load_splits
from pruneflow.data.sources import DATASETS, DatasetSource, prepare_dataset
from pruneflow.data import torchvision_sources  # noqa: F401  (registers cifar10, cifar100, svhn)

__all__ = ["DATASETS", "DataSplits", "DatasetSource", "TensorLoader", "load_splits", "prepare_dataset"]
