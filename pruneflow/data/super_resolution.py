"""Super-resolution data: three sources of natural images, and the classic protocol that makes training pairs.

Sources (``data.dataset``), each prepared as ``data/<dataset>/{train,test}/<image>``, the images themselves
(what DVC versions), so that the protocol's settings can change without preparing again:

- ``skimage``: the natural photographs that ship inside scikit-image (``skimage.data``); built in, no
  download, 11 train / 4 test. The default for ``task: super_resolution``.
- ``bsds300``: Berkeley's BSDS300 (200 train / 100 test), downloaded and extracted like the PyTorch
  super-resolution example does, into ``data.path`` or ``<data_dir>/.cache/bsds300``.
- ``image_dir``: any folder of images, ``data.path`` with ``data.train_dir`` and ``data.test_dir`` below it,
  e.g. ``../shared/data/sr-sunhays80-set5-set14.tar.gz`` extracted (train_dir ``sr/CSun_Hays80``, test_dir
  ``sr/CSet14``).

The protocol (``load_sr_splits``), as in the PyTorch sub-pixel example and Zhong 2022: the Y channel (PIL's
YCbCr), a centre crop of ``data.crop`` = 256 − 256 mod r, and as input its bilinear downscale by r (PIL, so
8-bit like a real low-resolution image). Images smaller than the crop are left out, and said so. Optionally
(``augment: crop_flip``) training uses random aligned patches instead of whole crops.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pruneflow.data.loading import PairSplits, Split
from pruneflow.data.sources import DATASETS, DatasetSource, image_files, link_or_copy
from pruneflow.data.torchvision_sources import DOWNLOAD_TIMEOUT_S, socket_timeout
from pruneflow.task import SUPER_RESOLUTION

if TYPE_CHECKING:
    from pruneflow.config import DataConfig


def crop_size(cfg: DataConfig) -> int:
    """The side of the centre crop: ``data.crop`` or 256 − 256 mod r, rounded down to a multiple of r."""
    crop = cfg.crop or 256
    return crop - crop % cfg.scale


def patch_size(cfg: DataConfig) -> int:
    """The side of crop_flip's random patches: ``data.patch`` or half the crop, rounded down to a multiple of r."""
    patch = cfg.patch or crop_size(cfg) // 2
    return patch - patch % cfg.scale


class SRSource(DatasetSource):
    task = SUPER_RESOLUTION.name

    def load(self, data_path: Path, cfg: DataConfig, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> PairSplits:
        return load_sr_splits(data_path, cfg, seed, progress)

    def check_config(self, cfg: DataConfig) -> None:
        crop, patch = crop_size(cfg), patch_size(cfg)
        if crop < cfg.scale:
            raise ValueError(f"data.crop: {cfg.crop} is smaller than the scale {cfg.scale}")
        if cfg.augment == "crop_flip" and not cfg.scale <= patch <= crop:
            raise ValueError(f"data.patch: {patch} must lie between the scale {cfg.scale} and the crop {crop}")


class SkimageImages(SRSource):
    """Natural photographs shipped with scikit-image (no download); textures and microscopy train, the four
    classic test photographs test."""

    description = "super-resolution: scikit-image's built-in natural images, 11 train / 4 test; no download"
    TRAIN = ("brick", "clock", "coins", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon",
             "retina", "rocket", "stereo_motorcycle")
    TEST = ("astronaut", "camera", "chelsea", "coffee")

    def signature(self, cfg: DataConfig) -> str:
        return "skimage-v1-" + hashlib.md5(repr((self.TRAIN, self.TEST)).encode()).hexdigest()[:8]

    def write(self, cfg: DataConfig, dest: Path) -> None:
        import skimage.data  # imported on demand: only SR runs need it

        for split, names in (("train", self.TRAIN), ("test", self.TEST)):
            (dest / split).mkdir(parents=True, exist_ok=True)
            for name in names:
                loaded = getattr(skimage.data, name)()
                image = loaded[0] if isinstance(loaded, tuple) else loaded  # stereo_motorcycle: the left view
                Image.fromarray(np.asarray(image)).save(dest / split / f"{name}.png")


class BSDS300(SRSource):
    """Berkeley Segmentation Dataset images: 200 train, 100 test (the PyTorch SR example's data)."""

    description = "super-resolution: BSDS300, 200 train / 100 test (data.path holds it, else downloaded)"
    URL = "http://www2.eecs.berkeley.edu/Research/Projects/CS/vision/bsds/BSDS300-images.tgz"
    ARCHIVE = "BSDS300-images.tgz"
    COUNTS = {"train": 200, "test": 100}

    def signature(self, cfg: DataConfig) -> str:
        return "bsds300-v1"  # a fixed public archive

    def images_dir(self, root: Path) -> Path:
        """``root/BSDS300/images``, extracted from ``root/BSDS300-images.tgz``, downloaded first if missing."""
        images = root / "BSDS300" / "images"
        if images.is_dir():
            return images
        archive = root / self.ARCHIVE
        if not archive.is_file():
            self.download(archive)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        if not images.is_dir():
            raise ValueError(f"dataset bsds300: {archive} holds no BSDS300/images folder")
        return images

    def download(self, archive: Path) -> None:
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_name(archive.name + ".partial")
        try:
            with socket_timeout(DOWNLOAD_TIMEOUT_S), urllib.request.urlopen(self.URL) as response, \
                    open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:  # URLError, timeouts and refused connections are OSErrors
            with contextlib.suppress(OSError):
                partial.unlink()
            raise ValueError(
                f"dataset bsds300: {archive.parent} does not hold it and downloading {self.URL} failed "
                f"({type(err).__name__}: {err}). Offline? Fetch that file elsewhere and set data.path (the root) to "
                f"a folder holding {self.ARCHIVE} or the BSDS300/ folder it extracts to"
            ) from None
        partial.replace(archive)

    def write(self, cfg: DataConfig, dest: Path) -> None:
        root = Path(cfg.path).expanduser() if cfg.path else dest.parent / ".cache" / "bsds300"
        images = self.images_dir(root)
        for split, expected in self.COUNTS.items():
            files = image_files(images / split)
            if len(files) != expected:
                raise ValueError(f"dataset bsds300: {images / split} holds {len(files)} images, expected {expected}")
            for path in files:
                link_or_copy(path, dest / split / path.name)


class ImageDir(SRSource):
    """Any folder of images: ``data.path/<train_dir>`` trains, ``data.path/<test_dir>`` tests (hard-linked in)."""

    description = "super-resolution: your images, data.path with data.train_dir and data.test_dir below it"

    def folders(self, cfg: DataConfig) -> dict[str, Path]:
        if not cfg.path:
            raise ValueError("dataset image_dir needs data.path (a folder with data.train_dir and data.test_dir)")
        root = Path(cfg.path).expanduser().resolve()
        folders = {"train": root / cfg.train_dir, "test": root / cfg.test_dir}
        for split, folder in folders.items():
            if not folder.is_dir():
                raise ValueError(f"data.{split}_dir: folder not found: {folder}")
            if not image_files(folder):
                raise ValueError(f"data.{split}_dir: {folder} holds no images")
        return folders

    def check_config(self, cfg: DataConfig) -> None:
        super().check_config(cfg)
        self.folders(cfg)

    def signature(self, cfg: DataConfig) -> str:
        listing = hashlib.md5()
        for split, folder in self.folders(cfg).items():
            for path in image_files(folder):
                stat = path.stat()
                listing.update(f"{split}:{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return f"image_dir:{listing.hexdigest()}"

    def write(self, cfg: DataConfig, dest: Path) -> None:
        for split, folder in self.folders(cfg).items():
            for path in image_files(folder):
                link_or_copy(path, dest / split / "_".join(path.relative_to(folder).parts))


DATASETS.register("skimage")(SkimageImages())
DATASETS.register("bsds300")(BSDS300())
DATASETS.register("image_dir")(ImageDir())


def read_crops(folder: Path, crop: int, scale: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Y-channel centre crops (uint8 N×1×crop×crop), their bilinear downscales by ``scale``, and the names
    of the images left out for being smaller than the crop."""
    highs, lows, skipped = [], [], []
    for path in image_files(folder):
        try:
            with Image.open(path) as image:
                luma = image.convert("RGB").convert("YCbCr").getchannel("Y")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path}: unreadable image ({err.__class__.__name__})") from None
        width, height = luma.size
        if min(width, height) < crop:
            skipped.append(f"{path.name} ({width}x{height})")
            continue
        left, top = int(round((width - crop) / 2)), int(round((height - crop) / 2))  # as torchvision's CenterCrop
        high = luma.crop((left, top, left + crop, top + crop))
        low = high.resize((crop // scale, crop // scale), Image.Resampling.BILINEAR)
        highs.append(np.asarray(high))
        lows.append(np.asarray(low))
    if not highs:
        raise ValueError(f"{folder}: no image is at least {crop}x{crop} (data.crop)")
    return (torch.from_numpy(np.stack(highs))[:, None], torch.from_numpy(np.stack(lows))[:, None], skipped)


def load_sr_splits(data_path: Path, cfg: DataConfig, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> PairSplits:
    """Train/val/test pairs from a prepared SR folder; val is a seeded hold-out of the training images."""
    crop = crop_size(cfg)
    train_high, train_low, skipped = read_crops(data_path / "train", crop, cfg.scale)
    test_high, test_low, skipped_test = read_crops(data_path / "test", crop, cfg.scale)
    if progress and (skipped or skipped_test):
        progress(f"data: left out {len(skipped) + len(skipped_test)} images smaller than the {crop}px crop: "
                 f"{', '.join(skipped + skipped_test)}")
    order = torch.randperm(len(train_high), generator=torch.Generator().manual_seed(seed))
    if cfg.subset:
        order = order[:cfg.subset]
    if len(order) < 2:
        raise ValueError(f"{data_path / 'train'}: at least two training images are needed (one is held out)")
    n_val = min(len(order) - 1, max(1, int(round(len(order) * cfg.val_fraction))))
    val, train = order[:n_val], order[n_val:]
    return PairSplits(
        train=Split(train_low[train], train_high[train]),
        val=Split(train_low[val], train_high[val]),
        test=Split(test_low, test_high),
        classes=[], mean=[0.0], std=[1.0], scale=cfg.scale, patch=patch_size(cfg),
    )
