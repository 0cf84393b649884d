"""``advgen publish``: a root card Hugging Face ``datasets`` loads, per-sample results joined to the images,
manifests pandas reads, and a SHA256SUMS that coreutils checks; variant cards with ``dataset_info``.

Everything loads locally and offline; images are compared with an independent tarfile + Pillow reader.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import read_split_by_hand, tiny_clean
from typer.testing import CliRunner

from advgen.data.clean import load_clean_split, open_clean
from advgen.data.datasets import DATASETS
from advgen.errors import BadParameter
from advgen.storage.publish import config_names
from advgen.storage.shards import file_digest, iter_tar, write_parquet, write_tar
from advgen.victims.train import Recipe, train_victim
from advgen.storage.variants import TAR_SHA_KEY
from advgen.storage.verify import verify_folder
from advgen.victims import save
from advgen.stages.cli import app

runner = CliRunner()
CLASSES = list(DATASETS["mnist"].classes)
FAST = Path("adv/mlp/fast")  # fgsm ε 0.1 and 0.3, deepfool; train and test
SLOW = Path("adv/mlp/slow")  # fgsm ε 0.1, test only, with the float images (.npy)


def _generate(root: Path, out: Path, *extra: str) -> None:
    result = runner.invoke(app, ["generate", "--victim-ckpt", str(root / "mlp.pt"), "--clean", str(root / "clean"),
                                 "--out", str(root / out), "--max-iter", "5", "--device", "cpu", "--workers", "0",
                                 *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/clean (mnist 48 train + 24 test, shards of 8), root/mlp.pt, root/adv/mlp/{fast,slow}/..."""
    root = tmp_path_factory.mktemp("publish")
    clean = tiny_clean(root)
    x, y, _ = load_clean_split(clean, open_clean(clean), "train")
    model, _ = train_victim("mlp", dataset="mnist", num_classes=10, x=x, y=y,
                            recipe=Recipe(epochs=2, batch_size=8, lr=0.02), seed=0, device=torch.device("cpu"),
                            crop_pad=0, flip=False)
    model.meta.test_accuracy = 1.0
    save(model, root / "mlp.pt")
    _generate(root, FAST, "--method", "fgsm,deepfool", "--eps", "0.1", "--eps", "0.3")
    _generate(root, SLOW, "--method", "fgsm", "--eps", "0.1", "--split", "test", "--store-float")
    return root


def _publish(root: Path, *extra: str):
    result = runner.invoke(app, ["publish", str(root), *extra])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def published(tree, tmp_path_factory) -> Path:
    """A copy of ``tree`` published twice: at adv/mlp/fast alone, and at the top with --clean."""
    root = tmp_path_factory.mktemp("pub") / "data"
    shutil.copytree(tree, root)
    _publish(root / FAST)
    _publish(root, "--clean", str(root / "clean"))
    return root


@pytest.fixture()
def hf(monkeypatch, tmp_path):
    """Hugging Face ``datasets``, offline, caching under ``tmp_path``."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets
    import huggingface_hub.constants

    # The flags are read when the modules are first imported, perhaps before this fixture ran.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    datasets.disable_progress_bars()
    yield datasets
    datasets.enable_progress_bars()


def _front(card: Path) -> dict:
    text = card.read_text(encoding="utf-8")
    return yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))


def _code(card: Path, heading: str) -> str:
    """The first python block under ``## heading`` in ``card``."""
    section = card.read_text(encoding="utf-8").split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def _assert_same_as_tars(ds, folder: Path, split: str) -> None:
    """Rows, keys, images and labels of a loaded split equal the tars read by hand."""
    keys, images, labels = read_split_by_hand(folder, split)
    assert ds.num_rows == len(keys)
    assert ds["__key__"] == keys
    assert ds["cls"] == labels.tolist()
    got = np.stack([np.array(im)[..., None] for im in ds["png"]])
    np.testing.assert_array_equal(got, images)


# --- variant cards -------------------------------------------------------------------------------------------------

def test_a_variant_folder_loads_alone_with_class_names(tree, hf):
    folder = tree / FAST / "fgsm" / "eps=0.1"
    ds = hf.load_dataset(str(folder))
    assert {s: d.num_rows for s, d in ds.items()} == {"train": 48, "test": 24}
    assert isinstance(ds["test"].features["cls"], hf.ClassLabel) and ds["test"].features["cls"].names == CLASSES
    for split in ("train", "test"):
        _assert_same_as_tars(ds[split], folder, split)
    scope: dict = {}
    code = re.search(r"```python\n(from datasets .*?)```", (folder / "README.md").read_text(), re.S)[1]
    exec(code.replace("'path/to/this/folder'", repr(str(folder))), scope)
    assert scope["both"].num_rows == 24 and scope["both"]["key"] == scope["both"]["__key__"]

    floats = tree / SLOW / "fgsm" / "eps=0.1"
    ds = hf.load_dataset(str(floats), split="test")
    assert ds.column_names == ["png", "cls", "npy", "__key__"]
    first = dict(iter_tar(floats / "test-000000.tar"))["000000"]
    want = np.load(__import__("io").BytesIO(first["npy"]), allow_pickle=False)
    np.testing.assert_array_equal(np.asarray(ds[0]["npy"], dtype=np.float32), want)
    assert verify_folder(folder) == [] and verify_folder(floats) == []


def test_verify_checks_the_variant_card_dataset_info(tree, tmp_path):
    folder = shutil.copytree(tree / FAST / "fgsm" / "eps=0.3", tmp_path / "v")
    card = folder / "README.md"
    text = card.read_text()
    card.write_text(text.replace("          '3': \"3\"\n", "          '3': \"three\"\n", 1)
                    .replace("    num_examples: 24\n", "    num_examples: 25\n", 1))
    problems = verify_folder(folder, deep=False)
    assert len(problems) == 2, problems
    assert problems[0].startswith('README.md: class names in dataset_info are ["0", "1", "2", "three", ')
    assert problems[0].endswith(', mnist has ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]')
    assert problems[1].startswith("README.md: dataset_info splits are ") and '"num_examples": 25' in problems[1]

    start, end = text.index("dataset_info:\n"), text.index("advgen:\n")
    card.write_text(text[:start] + text[end:])
    assert verify_folder(folder, deep=False) == [
        "README.md: no dataset_info in the front matter (features and splits for Hugging Face datasets; "
        "rerun advgen prepare or generate to rewrite an older card)"]


# --- publish -------------------------------------------------------------------------------------------------------

def test_config_names_take_folders_above_only_where_names_clash():
    assert config_names([((), "clean"), (("fast",), "fgsm_eps0.1"), (("fast",), "deepfool")]) == [
        "clean", "fgsm_eps0.1", "deepfool"]
    assert config_names([(("mlp", "fast"), "fgsm_eps0.1"), (("mlp", "slow"), "fgsm_eps0.1"),
                         (("mlp", "fast"), "deepfool")]) == ["fast-fgsm_eps0.1", "slow-fgsm_eps0.1", "fast-deepfool"]
    assert config_names([(("a", "fast"), "pgd_eps0.1"), (("b", "fast"), "pgd_eps0.1"), ((), "deepfool")]) == [
        "a-fast-pgd_eps0.1", "b-fast-pgd_eps0.1", "deepfool"]
    with pytest.raises(BadParameter, match="both be published as config 'x-fgsm'"):
        config_names([(("x",), "fgsm"), (("x",), "fgsm")])


def test_root_card_configs_load_with_datasets(published, hf):
    fast = published / FAST
    front = _front(fast / "README.md")
    assert [c["config_name"] for c in front["configs"]] == ["deepfool", "fgsm_eps0.1", "fgsm_eps0.3"]
    assert front["configs"][1]["data_files"] == [{"split": "test", "path": "fgsm/eps=0.1/test-*.tar"},
                                                 {"split": "train", "path": "fgsm/eps=0.1/train-*.tar"}]
    ds = hf.load_dataset(str(fast), "fgsm_eps0.1")
    assert {s: d.num_rows for s, d in ds.items()} == {"train": 48, "test": 24}
    assert isinstance(ds["train"].features["cls"], hf.ClassLabel) and ds["train"].features["cls"].names == CLASSES
    for split in ("train", "test"):
        _assert_same_as_tars(ds[split], fast / "fgsm" / "eps=0.1", split)

    # At the top: the two fgsm ε=0.1 folders clash, so every variant takes its family's name.
    front = _front(published / "README.md")
    assert [c["config_name"] for c in front["configs"]] == [
        "clean", "fast-deepfool", "fast-fgsm_eps0.1", "fast-fgsm_eps0.3", "slow-fgsm_eps0.1"]
    assert [i["config_name"] for i in front["dataset_info"]] == [c["config_name"] for c in front["configs"]]
    assert front["advgen"]["configs"]["slow-fgsm_eps0.1"]["path"] == "adv/mlp/slow/fgsm/eps=0.1"
    slow = hf.load_dataset(str(published), "slow-fgsm_eps0.1")
    assert list(slow) == ["test"] and "npy" in slow["test"].column_names
    _assert_same_as_tars(slow["test"], published / SLOW / "fgsm" / "eps=0.1", "test")
    clean = hf.load_dataset(str(published), "clean", split="train")
    _assert_same_as_tars(clean, published / "clean", "train")
    with pytest.raises(ValueError, match="Config name is missing"):
        hf.load_dataset(str(published))


def test_results_join_the_images_as_the_card_shows(published, hf):
    for root, folder in ((published / FAST, published / FAST / "fgsm" / "eps=0.1"),
                         (published, published / FAST / "fgsm" / "eps=0.1")):
        code = _code(root / "README.md", "Per-sample results with the images")
        assert "concatenate_datasets([images, results], axis=1)" in code
        scope: dict = {}
        exec(code.replace("'path/to/this/folder'", repr(str(root))), scope)
        joined = scope["joined"]
        keys, _, labels = read_split_by_hand(folder, "test")
        assert joined.num_rows == 24 and joined["__key__"] == keys and joined["key"] == keys
        assert joined["label"] == labels.tolist() == joined["cls"]
        manifests = pq.read_table(sorted(folder.glob("test-*.parquet")), partitioning=None)
        assert joined["adv_pred"] == manifests["adv_pred"].to_pylist()
        assert {"png", "cls", "__key__", "success", "linf", "adv_top5"} <= set(joined.column_names)


def test_manifests_read_with_pandas_as_the_card_shows(published, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(published)
    scope: dict = {}
    exec(_code(published / "README.md", "Manifests with pandas"), scope)
    folder = published / FAST / "fgsm" / "eps=0.1"
    schema = pq.read_schema(folder / "test-000000.parquet")
    assert list(scope["one"].columns) == schema.names and len(scope["one"]) == 8
    keys, _, labels = read_split_by_hand(folder, "test")
    assert scope["split"]["key"].tolist() == keys and scope["split"]["label"].tolist() == labels.tolist()
    assert list(scope["split"].columns) == schema.names
    # What the card warns about: the folder is not all parquet, and lists of files grow a hive column.
    with pytest.raises(Exception, match="README.md|Parquet magic bytes"):
        pd.read_parquet(folder)
    assert "eps" in pd.read_parquet(sorted(str(p) for p in folder.glob("test-*.parquet"))).columns


def test_sha256sums_checks_a_copy_with_coreutils(published, tmp_path):
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum (GNU coreutils) on this machine")
    copy = shutil.copytree(published, tmp_path / "copy")
    sums = (copy / "SHA256SUMS").read_text()
    listed = [line.split("  ", 1)[1] for line in sums.splitlines()]
    folders = [copy / "clean", copy / FAST / "deepfool", copy / FAST / "fgsm" / "eps=0.1",
               copy / FAST / "fgsm" / "eps=0.3", copy / SLOW / "fgsm" / "eps=0.1"]
    files = {p.relative_to(copy).as_posix() for f in folders for p in f.iterdir() if p.is_file()}
    assert listed == sorted(files | {"README.md"})  # card, stats, tars and manifests of each; the root card
    ok = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=copy, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count(": OK\n") == len(listed)

    result = runner.invoke(app, ["verify", str(copy), "--no-deep"])
    assert result.exit_code == 0, result.output
    assert f"OK {copy}: published root, 5 config(s), SHA256SUMS" in result.stdout.splitlines()

    tar = copy / FAST / "fgsm" / "eps=0.1" / "test-000001.tar"
    raw = bytearray(tar.read_bytes())
    raw[700] ^= 0x01
    tar.write_bytes(bytes(raw))
    bad = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=copy, capture_output=True, text=True)
    assert bad.returncode == 1
    assert [line for line in bad.stdout.splitlines() if not line.endswith(": OK")] == [
        "adv/mlp/fast/fgsm/eps=0.1/test-000001.tar: FAILED"]
    problems = verify_folder(copy)
    assert len(problems) == 1 and problems[0].startswith("adv/mlp/fast/fgsm/eps=0.1/test-000001.tar: sha256 ")
    card = copy / "README.md"
    card.write_text(card.read_text().replace("# MNIST", "# MNIST, edited", 1))
    assert [p.split(":")[0] for p in verify_folder(copy)] == ["README.md", "adv/mlp/fast/fgsm/eps=0.1/test-000001.tar"]


def test_publish_is_deterministic_and_leaves_the_folders_alone(tree, tmp_path):
    a = shutil.copytree(tree, tmp_path / "a")
    b = shutil.copytree(tree, tmp_path / "elsewhere" / "b")
    before = {p: p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()}
    result = _publish(a, "--clean", str(a / "clean"))
    assert result.stdout.splitlines() == [
        "clean\tclean", "fast-deepfool\tadv/mlp/fast/deepfool", "fast-fgsm_eps0.1\tadv/mlp/fast/fgsm/eps=0.1",
        "fast-fgsm_eps0.3\tadv/mlp/fast/fgsm/eps=0.3", "slow-fgsm_eps0.1\tadv/mlp/slow/fgsm/eps=0.1"]
    after = {p: p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()}
    assert set(after) - set(before) == {a / "README.md", a / "SHA256SUMS"}
    assert all(after[p] == data for p, data in before.items())
    first = {n: (a / n).read_bytes() for n in ("README.md", "SHA256SUMS")}
    _publish(a, "--clean", str(a / "clean"))
    _publish(b, "--clean", str(b / "clean"))
    for n, data in first.items():
        assert (a / n).read_bytes() == data and (b / n).read_bytes() == data
    assert hashlib.sha256(first["README.md"]).hexdigest() in first["SHA256SUMS"].decode()


def _refused(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["publish", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advgen publish: error: "), result.stderr
    assert message in lines[0], lines[0]


def test_bad_roots_are_refused_with_one_line(tree, tmp_path):
    _refused([str(tmp_path / "nope")], "no such folder")
    (tmp_path / "empty").mkdir()
    _refused([str(tmp_path / "empty")], "holds no complete variant folder")
    only_clean = shutil.copytree(tree / "clean", tmp_path / "c" / "clean")
    _refused([str(only_clean.parent), "--clean", str(only_clean)], "holds no complete variant folder")

    variant = tree / FAST / "fgsm" / "eps=0.1"
    _refused([str(variant)], "is itself an advgen folder")
    _refused([str(tree / FAST), "--clean", str(tree / "clean")], "lies outside ROOT")

    damaged = shutil.copytree(tree / FAST, tmp_path / "damaged")
    tar = damaged / "fgsm" / "eps=0.3" / "train-000002.tar"
    raw = bytearray(tar.read_bytes())
    raw[900] ^= 0x01
    tar.write_bytes(bytes(raw))
    _refused([str(damaged)],
             f"{damaged / 'fgsm' / 'eps=0.3'}: fails advgen verify --no-deep: train-000002.tar: sha256 ")
    partial = shutil.copytree(tree / FAST, tmp_path / "partial")
    (partial / "deepfool" / "_stats.json").unlink()  # an interrupted generate: shards without the marker
    _refused([str(partial)], "deepfool: fails advgen verify --no-deep: _stats.json: missing")

    other = tmp_path / "other"
    shutil.copytree(tree / FAST, other / "fast")
    tiny_clean(other, shard_size=12)  # the same images in other shards: not the clean folder the variants came from
    _refused([str(other), "--clean", str(other / "clean")], "fast/deepfool was made from another clean folder")

    theirs = shutil.copytree(tree / FAST, tmp_path / "theirs")
    (theirs / "README.md").write_text("# my notes\n")
    _refused([str(theirs)], "README.md exists and was not written by advgen publish")
    assert (theirs / "README.md").read_text() == "# my notes\n" and not (theirs / "SHA256SUMS").exists()


def test_deep_reads_every_sample_before_publishing(tree, tmp_path):
    root = shutil.copytree(tree / FAST, tmp_path / "fast")
    folder = root / "fgsm" / "eps=0.1"
    tar, manifest = folder / "test-000001.tar", folder / "test-000001.parquet"
    # A shorter shard and manifest whose checksums and sizes were patched everywhere, as a careful forger
    # would (see test_verify): only reading the samples tells.
    write_tar(tar, [{"__key__": k, **m} for k, m in iter_tar(tar)][:5])
    table = pq.read_table(manifest).slice(0, 5)
    write_parquet(manifest, table.replace_schema_metadata({**table.schema.metadata,
                                                           TAR_SHA_KEY: file_digest(tar).encode()}))
    stats = json.loads((folder / "_stats.json").read_text())
    card = (folder / "README.md").read_text()
    for name in (tar.name, manifest.name):
        card = card.replace(stats["sha256"][name], file_digest(folder / name))
        stats["sha256"][name] = file_digest(folder / name)
    size = sum(p.stat().st_size for p in folder.glob("test-*.tar"))
    (folder / "_stats.json").write_text(json.dumps(stats))
    (folder / "README.md").write_text(card.replace("    num_bytes: 92160\n", f"    num_bytes: {size}\n"))
    assert verify_folder(folder, deep=False) == []
    _publish(root)
    _refused([str(root), "--deep"], f"{folder}: fails advgen verify: test: 21 samples, the card/stats say 24")
