"""The dataset registry: each source knows how to check its config and write the image-folder layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from pruneflow.data.loading import IMAGE_SUFFIXES, DataSplits, decoded_mode, load_splits
from pruneflow.registry import Registry
from pruneflow.task import CLASSIFICATION

if TYPE_CHECKING:
    from pruneflow.config import DataConfig

STAMP = "prepared.json"
SPLITS = ("train", "test")


def image_files(folder: Path) -> list[Path]:
    """Every image below ``folder``, in a stable order (by path)."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link the user's file into the prepared data (no second copy on disk), or copy it across devices."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class DatasetSource:
    """A dataset that can be materialised as ``<dest>/{train,test}/<class>/*`` (super-resolution sources:
    ``<dest>/{train,test}/*``, the images themselves)."""

    description = ""
    task = CLASSIFICATION.name  # the params task whose models it trains (pruneflow.task)

    def check_config(self, cfg: "DataConfig") -> None:
        """Raise ValueError naming the key at fault; called during config validation."""

    def load(self, data_path: Path, cfg: "DataConfig", seed: int = 0,
             progress: Callable[[str], None] | None = None) -> DataSplits:
        """The prepared folder as in-memory splits: class folders of labelled images."""
        return load_splits(data_path, cfg.val_fraction, cfg.subset, seed, progress)

    def signature(self, cfg: "DataConfig") -> str:
        """Changes whenever the prepared files would change; lets ``prepare`` skip work."""
        raise NotImplementedError

    def write(self, cfg: "DataConfig", dest: Path) -> None:
        raise NotImplementedError


DATASETS: Registry[DatasetSource] = Registry("dataset")


def prepare_dataset(cfg: "DataConfig", data_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Materialise the configured dataset under ``data_dir/<dataset>`` unless it is already current."""
    source = DATASETS.get(cfg.dataset)
    dest = data_dir / cfg.dataset
    signature = source.signature(cfg)
    stamp = dest / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("signature") == signature:
        log(f"data: {dest} is current")
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        source.write(cfg, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # bad input leaves nothing behind that looks like prepared data
        raise
    (tmp / STAMP).write_text(json.dumps({"dataset": cfg.dataset, "signature": signature}, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # the folder appears whole or not at all
    log(f"data: prepared {cfg.dataset} in {dest}")
    return dest


class Digits(DatasetSource):
    """scikit-learn's 8x8 handwritten digits (1,797 real images, ships with the package): the built-in default."""

    description = "sklearn's real 8x8 handwritten digits, 10 classes; built in, no download"
    test_fraction = 0.2

    def signature(self, cfg: "DataConfig") -> str:
        return f"digits-v1-test{self.test_fraction}"

    def write(self, cfg: "DataConfig", dest: Path) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        n_test = int(round(len(order) * self.test_fraction))
        splits = {"test": order[:n_test], "train": order[n_test:]}
        pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        for split, indices in splits.items():
            for index in sorted(indices):
                folder = dest / split / str(digits.target[index])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[index]).save(folder / f"{index:04d}.png")


class ImageFolderSource(DatasetSource):
    """A user's folder with ``train/<class>/*`` and ``test/<class>/*`` images (hard-linked in when possible)."""

    description = "your own images: data.path holds train/<class>/* and test/<class>/*"

    def check_config(self, cfg: "DataConfig") -> None:
        if not cfg.path:
            raise ValueError("dataset imagefolder needs data.path (a folder with train/ and test/)")
        check_image_folder(Path(cfg.path).expanduser())

    def _root(self, cfg: "DataConfig") -> Path:
        root = Path(cfg.path or "").expanduser().resolve()
        check_image_folder(root)
        return root

    def signature(self, cfg: "DataConfig") -> str:
        root = self._root(cfg)
        listing = hashlib.md5()
        for path in sorted(root.rglob("*")):
            if path.is_file():
                listing.update(f"{path.relative_to(root)}:{path.stat().st_size}:{path.stat().st_mtime_ns}\n".encode())
        return f"imagefolder:{root}:{listing.hexdigest()}"

    def write(self, cfg: "DataConfig", dest: Path) -> None:
        """Link every image in, reading its header on the way: a file that is no image, or an image of another size
        or colour mode, is named here, in the user's folder, instead of failing in the copy after training."""
        root = self._root(cfg)
        first: tuple[Path, tuple[int, int, int]] | None = None
        for split in SPLITS:
            for path in image_files(root / split):
                shape = image_shape(path)
                if first is None:
                    first = path, shape
                elif shape != first[1]:
                    raise ValueError(f"data.path: {path} is {describe_shape(shape)} but {first[0]} is "
                                     f"{describe_shape(first[1])}: all images must share one size and colour mode")
                link_or_copy(path, dest / split / path.relative_to(root / split))


DATASETS.register("digits")(Digits())
DATASETS.register("imagefolder")(ImageFolderSource())


def image_shape(path: Path) -> tuple[int, int, int]:
    """``(C, H, W)`` the image will decode to, from its header alone (cheap: no pixels are decoded)."""
    try:
        with Image.open(path) as image:
            return (1 if decoded_mode(image.mode) == "L" else 3), image.height, image.width
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"data.path: {path} is not a readable image ({type(err).__name__})") from None


def describe_shape(shape: tuple[int, int, int]) -> str:
    """``32x32 RGB``: how a user sees an image's size and mode."""
    channels, height, width = shape
    return f"{width}x{height} {'grey' if channels == 1 else 'RGB'}"


def check_image_folder(root: Path) -> None:
    """Fail early, naming the folder, for the mistakes users make with image folders.

    Only directory listings are read (config validation runs this on every command): a stray file that is not
    an image, or a class missing from one split, would otherwise be skipped silently or fail after training.
    Dotfiles (``.DS_Store``) are the file manager's, not the user's, and are ignored.
    """
    if not root.is_dir():
        raise ValueError(f"data.path: folder not found: {root}")
    class_names = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise ValueError(f"data.path: {root} has no {split}/ folder (expected {split}/<class>/<image>)")
        classes = sorted(p for p in split_dir.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"data.path: {split_dir} has no class folders")
        for folder in classes:
            entries = [entry for entry in os.scandir(folder) if not entry.name.startswith(".")]
            for entry in entries:
                try:
                    entry.stat()  # follows a link: one that points to itself or in a circle fails here
                except OSError as err:
                    raise ValueError(f"data.path: {entry.path} cannot be read ({err.strerror}); remove the link or "
                                     "point it at an image") from None
                if not entry.is_file() or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                    raise ValueError(f"data.path: {entry.path} is not an image file; class folders hold only "
                                     f"images ({' '.join(sorted(IMAGE_SUFFIXES))})")
            if not entries:
                raise ValueError(f"data.path: class folder {folder} holds no images")
        class_names[split] = {folder.name for folder in classes}
    train, test = class_names["train"], class_names["test"]
    if train != test:
        only = "; ".join(f"only in {split}/: {', '.join(sorted(names))}"
                         for split, names in (("train", train - test), ("test", test - train)) if names)
        raise ValueError(f"data.path: train/ and test/ must hold the same class folders ({only})")
