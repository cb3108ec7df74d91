"""The dataset registry: each source knows how to check its config and write the image-folder layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from pruneflow.registry import Registry

if TYPE_CHECKING:
    from pruneflow.config import DataConfig

STAMP = "prepared.json"
SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


class DatasetSource:
    """A dataset that can be materialised as ``<dest>/{train,test}/<class>/*``."""

    description = ""

    def check_config(self, cfg: "DataConfig") -> None:
        """Raise ValueError naming the key at fault; called during config validation."""

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
    source.write(cfg, tmp)
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
        root = self._root(cfg)
        for split in SPLITS:
            for path in sorted((root / split).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    target = dest / split / path.relative_to(root / split)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(path, target)
                    except OSError:
                        shutil.copy2(path, target)


DATASETS.register("digits")(Digits())
DATASETS.register("imagefolder")(ImageFolderSource())


def check_image_folder(root: Path) -> None:
    """Fail early, naming the folder, for the mistakes users make with image folders."""
    if not root.is_dir():
        raise ValueError(f"data.path: folder not found: {root}")
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise ValueError(f"data.path: {root} has no {split}/ folder (expected {split}/<class>/<image>)")
        classes = sorted(p for p in split_dir.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"data.path: {split_dir} has no class folders")
        for folder in classes:
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
                raise ValueError(f"data.path: class folder {folder} holds no images")
