"""Bring your own data: ``advgen prepare --from-folder`` (image folder) and ``--from-hf`` (Hugging Face).

Each test writes tiny synthetic images itself, prepares them, reads the shards back with tarfile and
Pillow (``read_split_by_hand``), and checks keys, labels and pixels against what it wrote; then
train, generate and verify run on the result as on a registered dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import read_split_by_hand
from PIL import Image
from typer.testing import CliRunner

from advgen.stages.cli import app

runner = CliRunner()
CLASSES = ["cat", "dog", "owl"]
COUNTS = {"train": 4, "test": 2}  # images per class


def _images(mode: str, h: int, w: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images (N, H, W, C) uint8, labels)} sorted by class: a bright class band on noise."""
    rng = np.random.default_rng(seed)
    c = 1 if mode == "L" else 3
    out = {}
    for split, n in COUNTS.items():
        labels = np.repeat(np.arange(len(CLASSES)), n)
        x = rng.integers(0, 60, (len(labels), h, w, c), dtype=np.uint8)
        for i, y in enumerate(labels):
            x[i, y * h // 3:(y + 1) * h // 3] += 180
        out[split] = (x, labels)
    return out


def _image_folder(root: Path, data: dict, mode: str) -> Path:
    for split, (x, y) in data.items():
        for i, (img, label) in enumerate(zip(x, y)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[..., 0] if mode == "L" else img, mode).save(folder / f"img{i:03d}.png")
    return root


def _hf_dataset(path: Path, data: dict, mode: str) -> Path:
    import datasets

    splits = {}
    for split, (x, y) in data.items():
        ds = datasets.Dataset.from_dict({"picture": [Image.fromarray(img[..., 0] if mode == "L" else img, mode)
                                                     for img in x], "kind": [int(v) for v in y]})
        ds = ds.cast_column("picture", datasets.Image()).cast_column("kind", datasets.ClassLabel(names=CLASSES))
        splits[split] = ds
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def _ok(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _check_clean(clean: Path, data: dict, *, name: str, mode: str, h: int, w: int, origin: dict,
                 license: str) -> dict:
    stats = json.loads((clean / "_stats.json").read_text())
    assert (stats["dataset"], stats["title"], stats["shape"]) == (name, name, [1 if mode == "L" else 3, h, w])
    assert stats["classes"] == CLASSES and stats["counts"] == {s: len(CLASSES) * n for s, n in COUNTS.items()}
    assert stats["license"] == license and stats["source"]["verification"] == "unverified"
    assert stats["source"]["origin"] == origin
    card = (clean / "README.md").read_text()
    assert f"license: {license}" in card and origin["path"] in card and "Checked by: unverified" in card
    for split, (x, y) in data.items():
        keys, images, labels = read_split_by_hand(clean, split)
        assert keys == [f"{i:06d}" for i in range(len(y))]
        assert np.array_equal(labels, y) and np.array_equal(images, x)
    return stats


def _train_generate_verify(tmp_path: Path, clean: Path, name: str) -> None:
    _ok(["train", "--dataset", name, "--victim", "mlp", "--clean", str(clean), "--out", str(tmp_path / "mlp.pt"),
         "--metrics", str(tmp_path / "train.json"), "--epochs", "1", "--batch-size", "8", "--device", "cpu"])
    _ok(["generate", "--victim-ckpt", str(tmp_path / "mlp.pt"), "--clean", str(clean), "--out", str(tmp_path / "adv"),
         "--method", "fgsm", "--eps", "0.1", "--device", "cpu", "--workers", "0"])
    variant = json.loads((tmp_path / "adv" / "fgsm" / "eps=0.1" / "_stats.json").read_text())
    assert variant["dataset"] == name and variant["victim"]["dataset"] == name
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_image_folder(tmp_path, mode):
    h, w = (20, 24) if mode == "L" else (16, 12)
    data = _images(mode, h, w, seed=1)
    folder = _image_folder(tmp_path / "images", data, mode)
    extra = ["--license", "cc-by-4.0", "--flip", "--crop-pad", "3"] if mode == "RGB" else []
    _ok(["prepare", "--dataset", "my-pets", "--from-folder", str(folder), "--out", str(tmp_path / "clean"),
         "--shard-size", "5", *extra])
    stats = _check_clean(tmp_path / "clean", data, name="my-pets", mode=mode, h=h, w=w,
                         origin={"kind": "image_folder", "path": str(folder)},
                         license="cc-by-4.0" if mode == "RGB" else "unknown")
    assert (stats["crop_pad"], stats["flip"]) == ((3, True) if mode == "RGB" else (2, False))
    _train_generate_verify(tmp_path, tmp_path / "clean", "my-pets")


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_hugging_face_dataset(tmp_path, mode):
    data = _images(mode, 14, 18, seed=2)
    path = _hf_dataset(tmp_path / "hf", data, mode)
    _ok(["prepare", "--dataset", "hf_pets", "--from-hf", str(path), "--image-column", "picture",
         "--label-column", "kind", "--out", str(tmp_path / "clean")])
    _check_clean(tmp_path / "clean", data, name="hf_pets", mode=mode, h=14, w=18, license="unknown",
                 origin={"kind": "huggingface", "path": str(path), "image_column": "picture", "label_column": "kind"})
    _train_generate_verify(tmp_path, tmp_path / "clean", "hf_pets")


def _refused(args: list[str], message: str, out: Path) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("advgen")]
    assert len(lines) == 1 and lines[0].startswith("advgen prepare: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert not out.exists()


def test_mixed_sizes_name_the_first_odd_image(tmp_path):
    folder = _image_folder(tmp_path / "images", _images("RGB", 16, 16, seed=3), "RGB")
    odd = folder / "train" / "dog" / "img005.png"
    Image.new("RGB", (16, 15)).save(odd)
    Image.new("RGB", (17, 16)).save(folder / "train" / "owl" / "img009.png")
    _refused(["prepare", "--dataset", "mixed", "--from-folder", str(folder), "--out", str(tmp_path / "clean")],
             f"{odd}: 16x15 RGB, but {folder / 'train' / 'cat' / 'img000.png'} is 16x16 RGB", tmp_path / "clean")


def test_mixed_modes_are_refused(tmp_path):
    folder = _image_folder(tmp_path / "images", _images("RGB", 16, 16, seed=3), "RGB")
    Image.new("L", (16, 16)).save(folder / "test" / "owl" / "img005.png")
    _refused(["prepare", "--dataset", "mixed", "--from-folder", str(folder), "--out", str(tmp_path / "clean")],
             "img005.png: 16x16 L, but", tmp_path / "clean")


def test_class_folder_missing_from_test(tmp_path):
    folder = _image_folder(tmp_path / "images", _images("L", 16, 16, seed=4), "L")
    for p in (folder / "test" / "owl").iterdir():
        p.unlink()
    (folder / "test" / "owl").rmdir()
    _refused(["prepare", "--dataset", "partial", "--from-folder", str(folder), "--out", str(tmp_path / "clean")],
             f"{folder / 'test'}: has no class folder 'owl', which {folder / 'train'} has", tmp_path / "clean")


def test_registered_name_is_refused(tmp_path):
    folder = _image_folder(tmp_path / "images", _images("L", 28, 28, seed=5), "L")
    _refused(["prepare", "--dataset", "mnist", "--from-folder", str(folder), "--out", str(tmp_path / "clean")],
             "--dataset mnist is a registered dataset", tmp_path / "clean")


def test_bad_name_and_license_are_refused(tmp_path):
    folder = _image_folder(tmp_path / "images", _images("L", 16, 16, seed=5), "L")
    _refused(["prepare", "--dataset", "My Pets", "--from-folder", str(folder), "--out", str(tmp_path / "clean")],
             "dataset name 'My Pets': use lowercase letters", tmp_path / "clean")
    _refused(["prepare", "--dataset", "pets", "--from-folder", str(folder), "--out", str(tmp_path / "clean"),
              "--license", "free: really"], "license 'free: really'", tmp_path / "clean")


def test_missing_label_column(tmp_path):
    path = _hf_dataset(tmp_path / "hf", _images("L", 8, 8, seed=6), "L")
    _refused(["prepare", "--dataset", "hf_pets", "--from-hf", str(path), "--image-column", "picture",
              "--out", str(tmp_path / "clean")],
             "train split has no column 'label' (columns: picture, kind); name the right one with --label-column",
             tmp_path / "clean")


def test_both_sources_are_refused(tmp_path):
    folder = _image_folder(tmp_path / "images", _images("L", 8, 8, seed=7), "L")
    _refused(["prepare", "--dataset", "pets", "--from-folder", str(folder), "--from-hf", str(folder),
              "--out", str(tmp_path / "clean")], "give one source: --from-folder or --from-hf", tmp_path / "clean")
