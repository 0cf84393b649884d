"""Fixtures: synthetic datasets written in each dataset's native on-disk format.

The images carry a coarse label-dependent pattern on low noise, so a victim
can learn them to high accuracy in seconds, augmentation or not.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from advgen.data.datasets import DATASETS, DatasetSpec

ROOT = Path(__file__).resolve().parent.parent
FASHION_DEB = Path("/usr/share/datasets/fashion-mnist")
VENV_BIN = Path(sys.executable).parent


def pattern_images(n: int, shape: tuple[int, int, int], num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 images: each class lights its own 4x4 grid of coarse cells.

    The templates are fixed (independent of ``seed``) and distinct; cells are
    7-8 px wide, so crops of a few pixels and flips leave the class readable.
    """
    c, h, w = shape
    templates = np.random.default_rng(1234).choice(1 << 16, size=num_classes, replace=False)
    bits = ((templates[:, None] >> np.arange(16)) & 1).reshape(num_classes, 4, 4).astype(np.uint8)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    cells = bits[labels]  # (n, 4, 4)
    ys, xs = np.arange(h) * 4 // h, np.arange(w) * 4 // w
    lit = cells[:, ys][:, :, xs]  # (n, h, w)
    x = rng.integers(0, 40, (n, h, w, c), dtype=np.uint8) + (lit * 160).astype(np.uint8)[..., None]
    return x, labels


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0) if gz else data)


def write_mnist_like(root: Path, spec: DatasetSpec, seed: int = 0, gz: bool = True) -> dict:
    """The four IDX files of ``spec`` in ``root``; returns {split: (x, y)}."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = pattern_images(spec.counts[split], spec.shape, spec.num_classes, seed + (split == "test"))
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", x[..., 0], gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", y, gz)
        out[split] = (x, y)
    return out


def _cifar_batch(x: np.ndarray, y: np.ndarray, label_key: str) -> bytes:
    # Real batches are Python 2 pickles of dicts with str keys; bytes keys are
    # what Python 3 sees of them, so write bytes keys, protocol 2.
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    return pickle.dumps({b"batch_label": b"synthetic", label_key.encode(): [int(v) for v in y],
                         b"data": data, b"filenames": [b"f%d.png" % i for i in range(len(y))]}, protocol=2)


def write_cifar(root: Path, spec: DatasetSpec, seed: int = 0, archive: bool = True) -> dict:
    """CIFAR-10/100 python batches, as the .tar.gz (default) or the extracted folder."""
    root.mkdir(parents=True, exist_ok=True)
    hundred = spec.name == "cifar100"
    folder = "cifar-100-python" if hundred else "cifar-10-batches-py"
    label_key = "fine_labels" if hundred else "labels"
    out, members = {}, {}
    for split in ("train", "test"):
        x, y = pattern_images(spec.counts[split], spec.shape, spec.num_classes, seed + (split == "test"))
        out[split] = (x, y)
        if hundred:
            members[split] = _cifar_batch(x, y, label_key)
        elif split == "test":
            members["test_batch"] = _cifar_batch(x, y, label_key)
        else:
            parts = np.array_split(np.arange(len(y)), 5)
            for i, idx in enumerate(parts, 1):
                members[f"data_batch_{i}"] = _cifar_batch(x[idx], y[idx], label_key)
    if archive:
        name = "cifar-100-python.tar.gz" if hundred else "cifar-10-python.tar.gz"
        # gzip mtime 0: equal content gives equal archive bytes (and md5s in cards)
        with gzip.GzipFile(root / name, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
            for m, blob in members.items():
                info = tarfile.TarInfo(f"{folder}/{m}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (root / folder).mkdir(exist_ok=True)
        for m, blob in members.items():
            (root / folder / m).write_bytes(blob)
    return out


def write_svhn(root: Path, spec: DatasetSpec, seed: int = 0) -> dict:
    """train_32x32.mat / test_32x32.mat with X (32, 32, 3, N) and y in 1..10 (10 = digit 0)."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        x, y = pattern_images(spec.counts[split], spec.shape, spec.num_classes, seed + (split == "test"))
        mat_y = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": mat_y})
        out[split] = (x, y)
    return out


WRITERS = {
    "mnist": write_mnist_like,
    "fashion_mnist": write_mnist_like,
    "cifar10": write_cifar,
    "cifar100": write_cifar,
    "svhn": write_svhn,
}


def small_spec(name: str, train: int = 48, test: int = 24) -> DatasetSpec:
    """The registered spec with small split counts, for fast synthetic fixtures."""
    return replace(DATASETS[name], counts={"train": train, "test": test})


@pytest.fixture(scope="session")
def mnist_mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mirror folder holding full-size synthetic MNIST (60000/10000) in a mnist/ subfolder."""
    root = tmp_path_factory.mktemp("mirror")
    write_mnist_like(root / "mnist", DATASETS["mnist"], seed=7)
    return root


@pytest.fixture()
def cli_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for subprocesses: the venv's scripts first on PATH, no mirror set."""
    monkeypatch.delenv("ADVGEN_MIRROR", raising=False)
    env = {k: v for k, v in os.environ.items() if k != "ADVGEN_MIRROR"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def copy_project(dest: Path) -> None:
    """The code and pipeline definition of this checkout, into ``dest``."""
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):  # DVC parses every dvc.yaml in a repo, so the root needs its params
        shutil.copy(ROOT / name, dest / name)


def tiny_clean(root: Path, *, train: int = 48, test: int = 24, shard_size: int = 8) -> Path:
    """root/raw (synthetic MNIST files) and root/clean (advgen shards of ``shard_size``); returns root/clean."""
    from advgen.data.clean import write_clean
    from advgen.data.datasets import load_source, locate

    spec = small_spec("mnist", train=train, test=test)
    WRITERS["mnist"](root / "raw", spec)
    write_clean(load_source(spec, locate(spec, [root / "raw"]), allow_unverified=True), root / "clean",
                shard_size=shard_size)
    return root / "clean"


def read_split_by_hand(folder: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, images (N, H, W, C) uint8, labels) of every ``split-*.tar`` in ``folder``, via tarfile + Pillow.

    An independent reader: tests compare advgen's results against it, never against advgen's own readers.
    """
    from PIL import Image

    keys, images, labels = [], {}, {}
    for tar_path in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar.getmembers():
                key, ext = info.name.split(".", 1)
                data = tar.extractfile(info).read()
                if key not in images and key not in labels:
                    keys.append(key)
                if ext == "png":
                    arr = np.array(Image.open(io.BytesIO(data)))
                    images[key] = arr[..., None] if arr.ndim == 2 else arr
                elif ext == "cls":
                    labels[key] = int(data.decode())
    return keys, np.stack([images[k] for k in keys]), np.array([labels[k] for k in keys])
