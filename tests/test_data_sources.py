"""torchvision-backed datasets: an offline download is a clear error, and local files need no network.

The network is cut in every test (name resolution fails, as on this machine), so no test can start a
170 MB download where the internet happens to work. torchvision's md5 checks are bypassed for the tiny
fake files, which are laid out exactly as torchvision's own.
"""

from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torchvision.datasets

from pruneflow.config import DataConfig
from pruneflow.data import DATASETS, load_dataset, prepare_dataset


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)


@pytest.mark.parametrize("dataset, url, files", [
    ("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py/"),
    ("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python/"),
    ("svhn", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat, test_32x32.mat"),
])
def test_offline_download_says_what_to_fetch_and_where(dataset: str, url: str, files: str, tmp_path) -> None:
    with pytest.raises(ValueError) as error:
        prepare_dataset(DataConfig(dataset=dataset), tmp_path / "data", log=lambda _: None)
    message = str(error.value)
    for part in (url, files, "data.path", str(tmp_path / "data" / ".cache" / "torchvision"), "network disabled"):
        assert part in message


def write_fake_cifar10(root, per_batch: int = 3) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
                 "labels": [i % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def write_fake_svhn(root, count: int = 6) -> None:
    from scipy.io import savemat

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        labels = np.arange(1, count + 1).reshape(-1, 1)  # SVHN stores the digit 0 as label 10
        labels[0] = 10
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8),
                                              "y": labels})


def trust_files(monkeypatch) -> None:
    """Accept the fake files' md5s wherever torchvision checks them."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(torchvision.datasets.utils, "check_integrity", lambda *args, **kwargs: True)
    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.SVHN):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)


@pytest.mark.parametrize("dataset, write_fake, first_class, train_images", [
    ("cifar10", write_fake_cifar10, "airplane", 15),
    ("svhn", write_fake_svhn, "0", 6),
])
def test_local_torchvision_files_become_the_image_folder(dataset, write_fake, first_class, train_images,
                                                         tmp_path, monkeypatch) -> None:
    trust_files(monkeypatch)
    write_fake(tmp_path / "raw")
    cfg = DataConfig(dataset=dataset, path=str(tmp_path / "raw"), val_fraction=0.2)
    # loaded as the pipeline loads it, through the source (whose download once shadowed DatasetSource.load)
    splits = load_dataset(cfg, prepare_dataset(cfg, tmp_path / "data", log=lambda _: None))
    assert splits.input_shape == (3, 32, 32)
    assert splits.classes[0] == first_class
    assert len(splits.train) + len(splits.val) == train_images
    assert not (tmp_path / "data" / ".cache").exists()  # data.path was used, nothing downloaded


def test_torchvision_datasets_are_registered_with_descriptions() -> None:
    for name in ("cifar10", "cifar100", "svhn"):
        assert DATASETS.get(name).description
