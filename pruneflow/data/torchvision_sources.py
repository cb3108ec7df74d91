"""CIFAR-10, CIFAR-100 and SVHN, read through torchvision's dataset classes and written as the image folder.

torchvision checks its files by md5 and downloads only what is missing, so a ``data.path`` that already
holds them never touches the network. Without ``data.path`` the files are downloaded into
``<data_dir>/.cache/torchvision`` (beside the prepared folders, outside what DVC versions). Offline, the
download fails; the error then names the file to fetch and where to put it instead of a urllib traceback.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pruneflow.data.sources import DATASETS, SPLITS, DatasetSource

if TYPE_CHECKING:
    from torchvision.datasets import VisionDataset

    from pruneflow.config import DataConfig

# urllib waits forever by default; a network that drops packets would hang the data stage.
DOWNLOAD_TIMEOUT_S = 60


@contextlib.contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class TorchvisionSource(DatasetSource):
    """A torchvision dataset with ``train=True/False`` splits and a ``classes`` list (the CIFARs)."""

    def __init__(self, class_name: str, description: str) -> None:
        self.class_name = class_name
        self.description = description

    @property
    def dataset_class(self) -> type[VisionDataset]:
        import torchvision.datasets  # imported on demand: most runs never need torchvision

        return getattr(torchvision.datasets, self.class_name)

    def signature(self, cfg: DataConfig) -> str:
        return f"torchvision-{self.class_name}-v1"  # torchvision's files are md5-pinned: the content never varies

    def open(self, root: Path, split: str) -> VisionDataset:
        return self.dataset_class(str(root), train=split == "train", download=True)

    def url(self, split: str) -> str:
        return self.dataset_class.url

    def expected_files(self) -> str:
        cls = self.dataset_class
        return f"{cls.filename} or the {cls.base_folder}/ folder it extracts to"

    def class_names(self, dataset: VisionDataset) -> list[str]:
        return list(dataset.classes)

    def download(self, root: Path, split: str) -> VisionDataset:
        """The split, downloaded into ``root`` if missing; a failed download becomes a ValueError that says what to
        do."""
        try:
            with socket_timeout(DOWNLOAD_TIMEOUT_S):
                return self.open(root, split)
        except (OSError, RuntimeError) as err:  # URLError and timeouts are OSErrors; a bad md5 is a RuntimeError
            raise ValueError(
                f"dataset {self.class_name}: {root} does not hold it and downloading {self.url(split)} failed "
                f"({type(err).__name__}: {err}). Offline? Fetch that file elsewhere and set data.path to a folder "
                f"holding torchvision's {self.class_name} files: {self.expected_files()}"
            ) from None

    def write(self, cfg: DataConfig, dest: Path) -> None:
        root = Path(cfg.path).expanduser() if cfg.path else dest.parent / ".cache" / "torchvision"
        for split in SPLITS:
            dataset = self.download(root, split)
            names = self.class_names(dataset)
            for name in names:
                (dest / split / name).mkdir(parents=True, exist_ok=True)
            for index, (image, label) in enumerate(dataset):
                image.save(dest / split / names[label] / f"{index:05d}.png")


class SVHNSource(TorchvisionSource):
    """SVHN's ``split=`` argument and one file per split; classes are the digits 0-9 (torchvision maps 10 to 0)."""

    def open(self, root: Path, split: str) -> VisionDataset:
        return self.dataset_class(str(root), split=split, download=True)

    def url(self, split: str) -> str:
        return self.dataset_class.split_list[split][0]

    def expected_files(self) -> str:
        return ", ".join(self.dataset_class.split_list[split][1] for split in SPLITS)

    def class_names(self, dataset: VisionDataset) -> list[str]:
        return [str(digit) for digit in range(10)]


DATASETS.register("cifar10")(TorchvisionSource(
    "CIFAR10", "CIFAR-10: 32x32 RGB, 10 classes, 50k/10k (torchvision files in data.path, else downloaded)"))
DATASETS.register("cifar100")(TorchvisionSource(
    "CIFAR100", "CIFAR-100: 32x32 RGB, 100 classes, 50k/10k (torchvision files in data.path, else downloaded)"))
DATASETS.register("svhn")(SVHNSource(
    "SVHN", "SVHN cropped digits: 32x32 RGB, 10 classes, 73k/26k (torchvision files in data.path, else downloaded)"))
