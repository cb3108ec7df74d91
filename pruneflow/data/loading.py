"""Load a prepared image folder into memory once, then serve normalised (and optionally augmented) batches.

Decoding images every epoch dominates CPU training on small images, so splits live as uint8 tensors.
Super-resolution splits (``pruneflow.data.super_resolution``) hold low-resolution inputs as ``images`` and
high-resolution targets as ``labels``, both uint8 images, served as float pairs in [0, 1] by ``PairLoader``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pruneflow.task import CLASSIFICATION, SUPER_RESOLUTION, Task

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N; super-resolution: uint8 N x C x rH x rW, the high-resolution images

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataSplits:
    """Labelled images (``images`` uint8, ``labels`` class indices), served normalised by ``mean`` and ``std``."""

    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: list[float]
    std: list[float]

    task: ClassVar[str] = CLASSIFICATION.name  # the params task these splits train

    @property
    def num_classes(self) -> int | None:
        """The class count; None for super-resolution, whose models output images."""
        return len(self.classes)

    @property
    def model_kwargs(self) -> dict[str, int]:
        """What the data fixes in a model besides its input channels and class count."""
        return {}

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def loader(self, split: str, batch_size: int, shuffle: bool = False, augment: str = "none",
               seed: int = 0, max_batches: int | None = None) -> TensorLoader:
        return TensorLoader(getattr(self, split), batch_size, self.mean, self.std, shuffle, augment, seed, max_batches)


@dataclass
class PairSplits(DataSplits):
    """Super-resolution splits (``pruneflow.data.super_resolution``): ``images`` are the low-resolution inputs,
    ``labels`` the high-resolution targets, and the model is fixed by the upscale factor instead of classes."""

    scale: int = 1  # the upscale factor r between images and labels
    patch: int = 0  # crop_flip: side of the random high-resolution patches

    task: ClassVar[str] = SUPER_RESOLUTION.name

    @property
    def num_classes(self) -> int | None:
        return None

    @property
    def model_kwargs(self) -> dict[str, int]:
        return {SUPER_RESOLUTION.model_argument: self.scale}

    def loader(self, split: str, batch_size: int, shuffle: bool = False, augment: str = "none",
               seed: int = 0, max_batches: int | None = None) -> PairLoader:
        return PairLoader(getattr(self, split), batch_size, self.scale, self.patch, shuffle, augment, seed, max_batches)


class TensorLoader:
    """Batches of (normalised float images, labels); re-iterable, reshuffled every pass."""

    task: Task = CLASSIFICATION

    def __init__(self, split: Split, batch_size: int, mean: list[float], std: list[float], shuffle: bool = False,
                 augment: str = "none", seed: int = 0, max_batches: int | None = None) -> None:
        self.split = split
        self.batch_size = batch_size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.shuffle = shuffle
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        self.max_batches = max_batches

    def __len__(self) -> int:
        n = -(-len(self.split) // self.batch_size)
        return min(n, self.max_batches) if self.max_batches else n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for batch in range(len(self)):
            yield self.batch(order[batch * self.batch_size : (batch + 1) * self.batch_size])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.split.images[index]
        if self.augment == "crop_flip":
            images = random_crop_flip(images, self.generator)
        return (images.float() / 255.0 - self.mean) / self.std, self.split.labels[index]


class PairLoader(TensorLoader):
    """Super-resolution batches: (low-resolution input, high-resolution target), floats in [0, 1].

    Inputs are not normalised: an SR model maps [0, 1] Y to [0, 1] Y, so a deployment feeds plain pixels.
    ``crop_flip`` cuts one random ``patch``-sized high-resolution patch per image (aligned to the scale, with
    its low-resolution patch) and flips both at random.
    """

    task: Task = SUPER_RESOLUTION

    def __init__(self, split: Split, batch_size: int, scale: int, patch: int, shuffle: bool = False,
                 augment: str = "none", seed: int = 0, max_batches: int | None = None) -> None:
        super().__init__(split, batch_size, [0.0], [1.0], shuffle, augment, seed, max_batches)
        self.scale, self.patch = scale, patch

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.split.images[index], self.split.labels[index]
        if self.augment == "crop_flip":
            low, high = random_patch_pairs(low, high, self.patch, self.scale, self.generator)
        return low.float() / 255.0, high.float() / 255.0


def random_patch_pairs(low: torch.Tensor, high: torch.Tensor, patch: int, scale: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random aligned patch per image: ``patch`` pixels of ``high`` and the ``patch / scale`` of ``low`` that
    cover the same region, both flipped horizontally for a random half of the batch."""
    n, _, height, width = low.shape
    small = patch // scale
    top = torch.randint(0, height - small + 1, (n, 1), generator=generator)
    left = torch.randint(0, width - small + 1, (n, 1), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return window(low, top, left, small, flip), window(high, top * scale, left * scale, patch, flip)


def window(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """A ``size``-square window of each image at its own (top, left), mirrored where ``flip``."""
    n, channels = images.shape[:2]
    rows = (top + torch.arange(size)).view(n, 1, size, 1)
    cols = (left + torch.arange(size)).view(n, 1, 1, size)
    cols = torch.where(flip.view(n, 1, 1, 1), cols.flip(-1), cols)
    return images[torch.arange(n).view(n, 1, 1, 1), torch.arange(channels).view(1, -1, 1, 1), rows, cols]


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation (zero-pad 4, random crop, horizontal flip), vectorised over a batch."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    rows = (dy + torch.arange(h)).view(n, 1, h, 1)
    cols = (dx + torch.arange(w)).view(n, 1, 1, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1, 1, 1), cols.flip(-1), cols)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channel = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    return padded[batch, channel, rows, cols]


def decoded_mode(mode: str) -> str:
    """The PIL mode an image is decoded to: grey modes stay one channel, everything else becomes RGB."""
    return "L" if mode in ("L", "1", "I", "I;16") else "RGB"


def read_split(folder: Path, classes: list[str] | None = None,
               progress: Callable[[str], None] | None = None) -> tuple[Split, list[str]]:
    """Decode ``folder/<class>/*`` into tensors; every image must share one size and colour mode."""
    classes = classes or sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted((folder / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"{folder}: no images found")
    arrays, labels, first_shape = [], [], None
    for count, (path, label) in enumerate(files, 1):
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert(decoded_mode(image.mode)))
        except UnidentifiedImageError:
            raise ValueError(f"{path}: unreadable image (not an image file)") from None
        except OSError as err:  # a valid header over broken pixel data: "image file is truncated"
            raise ValueError(f"{path}: unreadable image ({err})") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if first_shape is None:
            first_shape = array.shape
        elif array.shape != first_shape:
            raise ValueError(f"{path}: shape {array.shape} differs from the first image's {first_shape}")
        arrays.append(array)
        labels.append(label)
        if progress and count % 10000 == 0:
            progress(f"decoded {count}/{len(files)} images of {folder}")
    return Split(torch.from_numpy(np.stack(arrays)), torch.tensor(labels)), classes


def load_splits(data_path: Path, val_fraction: float = 0.2, subset: int | None = None, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> DataSplits:
    """Train/val/test tensors from a prepared folder; val is a seeded hold-out of train for the search."""
    train, classes = read_split(data_path / "train", progress=progress)
    test, _ = read_split(data_path / "test", classes, progress=progress)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    if subset:
        order = order[:subset]
    n_val = max(1, int(round(len(order) * val_fraction)))
    val_index, train_index = order[:n_val], order[n_val:]
    train_images = train.images[train_index].float() / 255.0
    mean = train_images.mean(dim=(0, 2, 3)).tolist()
    std = train_images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return DataSplits(
        train=Split(train.images[train_index], train.labels[train_index]),
        val=Split(train.images[val_index], train.labels[val_index]),
        test=test,
        classes=classes,
        mean=mean,
        std=std,
    )
