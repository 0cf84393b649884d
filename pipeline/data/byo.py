"""Datasets a user brings: an image folder tree or a Hugging Face dataset, decoded into a ``Source``.

Both give what a registered dataset gives (``advgen.datasets.load_source``): train and test splits
as uint8 (N, H, W, C) arrays with int64 labels, and a ``DatasetSpec`` built from the data
(``datasets.user_spec``), which the clean folder's stats record so later stages can rebuild it.
No reference identifies the content, so the verification is always "unverified"; the stats and
card record where the data came from and the license the user stated ("unknown" otherwise).

Every image of both splits must have one size and one mode, L (gray) or RGB, as the shards store
it losslessly: resizing or converting would change pixels behind the user's back, so the first odd
image is named instead.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from advgen.data.datasets import SPLITS, Source, content_sha256, user_spec
from advgen.errors import BadParameter, CorruptFile, DatasetNotFound

# What torchvision's ImageFolder reads; other files (and hidden ones) in class folders are skipped, as there.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, struct.error, Image.DecompressionBombError)


class _OneFormat:
    """Decodes images and holds them to the size and mode of the first one."""

    def __init__(self) -> None:
        self.first: tuple[tuple[int, int], str, str] | None = None  # (W, H), mode, where

    def decode(self, data: bytes | Path, where: str) -> np.ndarray:
        """(H, W, C) uint8 pixels of one image file's content; ``CorruptFile`` naming ``where`` if odd."""
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
                img.load()
                size, mode = img.size, img.mode
                pixels = np.asarray(img) if mode in ("L", "RGB") else None
        except _DECODE_ERRORS as e:
            raise CorruptFile(where, f"not a readable image ({type(e).__name__}: {e})") from None
        if self.first is None:
            if pixels is None:
                raise CorruptFile(where, f"mode {mode}; images must be L (gray) or RGB (convert them first)")
            self.first = (size, mode, where)
        elif (size, mode) != self.first[:2]:
            (w0, h0), mode0, where0 = self.first
            raise CorruptFile(where, f"{size[0]}x{size[1]} {mode}, but {where0} is {w0}x{h0} {mode0}; every "
                                     "image must have one size and one mode (L or RGB); resize or convert them first")
        assert pixels is not None
        return pixels[..., None] if pixels.ndim == 2 else pixels

    @property
    def shape(self) -> tuple[int, int, int]:
        assert self.first is not None
        (w, h), mode, _ = self.first
        return (1 if mode == "L" else 3), h, w


def _source(name: str, splits: dict[str, tuple[list[np.ndarray], list[int]]], classes: list[str], fmt: _OneFormat,
            origin: dict, *, license: str, license_note: str, homepage: str, crop_pad: int, flip: bool) -> Source:
    images = {s: np.stack(splits[s][0]) for s in SPLITS}
    labels = {s: np.asarray(splits[s][1], dtype=np.int64) for s in SPLITS}
    spec = user_spec(name, shape=fmt.shape, classes=classes, counts={s: len(labels[s]) for s in SPLITS},
                     license=license, license_note=license_note, homepage=homepage, crop_pad=crop_pad, flip=flip)
    return Source(spec=spec, images=images, labels=labels, files={},
                  content_sha256={s: content_sha256(images[s], labels[s]) for s in SPLITS},
                  verification="unverified", origin=origin)


def _note(license: str) -> str:
    if license == "unknown":
        return "No license was stated when this copy was prepared (advgen prepare --license); check the source's terms."
    return f"As stated by whoever prepared this copy (advgen prepare --license {license}); advgen did not check it."


def _check(name: str, license: str, crop_pad: int) -> None:
    """The options, before any image is read (``user_spec`` checks the same again with the data's shape)."""
    user_spec(name, shape=(1, 2, 2), classes=["a", "b"], counts={}, license=license, crop_pad=0)
    if crop_pad < 0:
        raise BadParameter(f"--crop-pad must be >= 0, got {crop_pad}")


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth), sorted by their path inside it; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def folder_source(root: Path, *, name: str, license: str = "unknown", crop_pad: int = 2, flip: bool = False) -> Source:
    """The images of ``root/{train,test}/<class>/*`` (torchvision ImageFolder layout) as a ``Source``.

    Classes are the sorted subfolder names of ``root/train``, and ``root/test`` must have the same
    subfolders. Samples are ordered by class, then by path inside the class folder, so keys are
    deterministic. Images are decoded with Pillow and must share one size and one mode (L or RGB).
    """
    _check(name, license, crop_pad)
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFound(f"--from-folder {root}: no such folder")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DatasetNotFound(f"{root / split}: no such folder; --from-folder expects {root}/train/<class>/*.png "
                                  f"and {root}/test/<class>/* (image folder layout)")
    subdirs = {s: sorted(p.name for p in (root / s).iterdir() if p.is_dir() and not p.name.startswith("."))
               for s in SPLITS}
    classes = subdirs["train"]
    for split, other in (("test", "train"), ("train", "test")):
        extra = sorted(set(subdirs[other]) - set(subdirs[split]))
        if extra:
            raise CorruptFile(root / split, f"has no class folder {extra[0]!r}, which {root / other} has; both "
                                            "splits need the same class folders")
    if len(classes) < 2:
        raise CorruptFile(root / "train", f"holds {len(classes)} class folder(s); a classification needs at least 2")
    fmt = _OneFormat()
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for split in SPLITS:
        images, labels = [], []
        for label, cls in enumerate(classes):
            for path in _image_files(root / split / cls):
                images.append(fmt.decode(path, str(path)))
                labels.append(label)
        if not images:
            raise CorruptFile(root / split, "holds no images (" + ", ".join(IMAGE_EXTENSIONS) + ")")
        splits[split] = (images, labels)
    return _source(name, splits, classes, fmt, {"kind": "image_folder", "path": str(root)}, license=license,
                   license_note=_note(license), homepage=f"none; prepared from the image folder {root}",
                   crop_pad=crop_pad, flip=flip)


def hf_source(path: Path, *, name: str, image_column: str = "image", label_column: str = "label",
              license: str = "unknown", crop_pad: int = 2, flip: bool = False) -> Source:
    """The train and test splits of a Hugging Face dataset on disk as a ``Source``.

    ``path`` is a folder written by ``save_to_disk`` (read with ``load_from_disk``) or one
    ``datasets.load_dataset`` reads (parquet, csv, imagefolder, ...). ``image_column`` must be an
    ``Image`` feature and ``label_column`` a ``ClassLabel`` whose names are the classes (the same
    in both splits). Rows keep their order; images are decoded with Pillow and must share one
    size and one mode (L or RGB). Needs the ``datasets`` package, imported only here.
    """
    _check(name, license, crop_pad)
    try:
        import datasets
    except ImportError:
        raise BadParameter("--from-hf needs the Hugging Face datasets package: pip install 'datasets>=2.19'") from None
    path = Path(path)
    if not path.exists():
        raise DatasetNotFound(f"--from-hf {path}: no such folder")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # stderr carries advgen's own progress lines
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptFile(path, f"not a dataset the datasets package reads ({type(e).__name__}: {first})") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if not isinstance(ds, datasets.DatasetDict):
        raise CorruptFile(path, "holds a single split; save a DatasetDict with train and test splits")
    missing = [s for s in SPLITS if s not in ds]
    if missing:
        raise CorruptFile(path, f"has no {missing[0]} split (it has {', '.join(ds) or 'none'}); advgen needs "
                                "train and test")
    fmt = _OneFormat()
    classes: list[str] | None = None
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for split in SPLITS:
        d = ds[split]
        columns = ", ".join(d.column_names)
        for flag, column, kind in (("--label-column", label_column, datasets.ClassLabel),
                                   ("--image-column", image_column, datasets.Image)):
            if column not in d.features:
                raise CorruptFile(path, f"{split} split has no column {column!r} (columns: {columns}); name "
                                        f"the right one with {flag}")
            if not isinstance(d.features[column], kind):
                raise CorruptFile(path, f"{split} column {column!r} is {type(d.features[column]).__name__}, "
                                        f"expected datasets.{kind.__name__}"
                                  + (" (cast it: ds.cast_column(name, ClassLabel(names=[...])))"
                                     if kind is datasets.ClassLabel else ""))
        names = list(d.features[label_column].names)
        if classes is None:
            classes = names
        elif names != classes:
            raise CorruptFile(path, f"the {split} split's class names differ from train's")
        labels = [int(v) for v in d[label_column]]
        bad = next((i for i, v in enumerate(labels) if not 0 <= v < len(names)), None)
        if bad is not None:
            raise CorruptFile(path, f"{split}[{bad}]: label {labels[bad]} is outside [0, {len(names)})")
        raw = d.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        images = []
        for i, row in enumerate(raw):
            item = row[image_column] or {}
            data = item.get("bytes") or (Path(item["path"]) if item.get("path") else None)
            if data is None:
                raise CorruptFile(path, f"{split}[{i}]: no image")
            images.append(fmt.decode(data, f"{path} {split}[{i}]"))
        if not images:
            raise CorruptFile(path, f"the {split} split is empty")
        splits[split] = (images, labels)
    assert classes is not None
    return _source(name, splits, classes, fmt, {"kind": "huggingface", "path": str(path), "image_column": image_column,
                                                "label_column": label_column},
                   license=license, license_note=_note(license),
                   homepage=f"none; prepared from the Hugging Face dataset at {path}", crop_pad=crop_pad, flip=flip)
