"""Native files -> checked Source -> clean shards, for every registered dataset."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from conftest import WRITERS, small_spec
from advgen.data.clean import MIN_SHARDS, default_shard_size, load_clean_split, open_clean, write_clean
from advgen.data.datasets import DATASETS, load_source, locate
from advgen.errors import CorruptFile
from advgen.storage.shards import STATS, decode_png


def _prepared(tmp_path: Path, name: str, **kw) -> tuple[dict, dict, Path]:
    spec = small_spec(name)
    truth = WRITERS[name](tmp_path / "raw", spec)
    paths = locate(spec, [tmp_path / "raw"])
    assert paths is not None
    source = load_source(spec, paths, allow_unverified=True)
    out = tmp_path / "clean"
    stats = write_clean(source, out, **kw)
    return truth, stats, out


@pytest.mark.parametrize("name", list(DATASETS))
def test_prepare_counts_keys_labels_pixels(tmp_path, name):
    truth, stats, out = _prepared(tmp_path, name)
    spec = DATASETS[name]
    assert stats["counts"] == {"train": 48, "test": 24}
    assert stats["source"]["verification"] == "unverified"  # synthetic data matches no reference
    for split in ("train", "test"):
        x_true, y_true = truth[split]
        assert len(stats["shards"][split]) >= MIN_SHARDS
        x, y, keys = load_clean_split(out, stats, split)
        assert keys == [f"{i:06d}" for i in range(len(y_true))]
        np.testing.assert_array_equal(y.numpy(), y_true)
        np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), x_true)
        assert x.shape[1:] == spec.shape
        manifest = pq.read_table([out / n.replace(".tar", ".parquet") for n in stats["shards"][split]][0])
        assert manifest.column_names == ["key", "index", "label", "label_name", "png_sha256"]
        assert manifest["label_name"][0].as_py() == spec.classes[int(y_true[0])]


@pytest.mark.parametrize("name", list(DATASETS))
def test_prepare_is_byte_identical_on_rerun(tmp_path, name):
    spec = small_spec(name)
    WRITERS[name](tmp_path / "raw", spec)
    outs = []
    for out in ("a", "b"):  # each run decodes the same files afresh
        write_clean(load_source(spec, locate(spec, [tmp_path / "raw"]), allow_unverified=True), tmp_path / out)
        outs.append(tmp_path / out)
    first, second = outs
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_shards_read_by_webdataset(tmp_path):
    truth, stats, out = _prepared(tmp_path, "cifar10")
    names = stats["shards"]["test"]
    url = str(out / f"test-{{000000..{len(names) - 1:06d}}}.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False).decode("rgb8").to_tuple("__key__", "png", "cls"))
    assert [k for k, _, _ in samples] == [f"{i:06d}" for i in range(24)]
    np.testing.assert_array_equal(np.stack([x for _, x, _ in samples]), truth["test"][0])
    assert [c for _, _, c in samples] == truth["test"][1].tolist()


def test_stats_and_card_describe_every_file(tmp_path):
    _, stats, out = _prepared(tmp_path, "svhn", shard_size=10)
    on_disk = {p.name for p in out.iterdir()} - {STATS, "README.md"}
    assert set(stats["sha256"]) == on_disk
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    for name, digest in stats["sha256"].items():
        assert f"| `{name}` | `{digest}` |" in card
    assert "license: other" in card and "unverified" in card
    assert json.loads((out / STATS).read_text())["shard_size"] == 10
    assert len(stats["shards"]["train"]) == 5  # 48 images / 10 per shard


def test_limit_keeps_first_images(tmp_path):
    truth, stats, out = _prepared(tmp_path, "mnist", limit=20)
    x, y, keys = load_clean_split(out, stats, "train")
    assert keys == [f"{i:06d}" for i in range(20)]
    np.testing.assert_array_equal(y.numpy(), truth["train"][1][:20])


def test_default_shard_size_gives_eight_shards():
    assert default_shard_size({"train": 60000, "test": 10000}) == 1250
    assert default_shard_size({"train": 73257, "test": 26032}) == 3254
    assert default_shard_size({"train": 5, "test": 3}) == 1


def test_rewrite_replaces_whole_output(tmp_path):
    spec = small_spec("mnist")
    WRITERS["mnist"](tmp_path / "raw", spec)
    source = load_source(spec, locate(spec, [tmp_path / "raw"]), allow_unverified=True)
    write_clean(source, tmp_path / "clean", shard_size=5)
    stale = tmp_path / "clean" / "train-000009.tar"
    assert stale.exists()
    write_clean(source, tmp_path / "clean", shard_size=24)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "raw"]  # no staging folder left


def test_open_clean_detects_tampering(tmp_path):
    _, stats, out = _prepared(tmp_path, "mnist")
    open_clean(out, dataset="mnist")
    with pytest.raises(CorruptFile, match="holds mnist shards"):
        open_clean(out, dataset="cifar10")
    shard = out / stats["shards"]["test"][0]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CorruptFile, match="sha256"):
        open_clean(out, dataset="mnist")
    (out / STATS).unlink()
    with pytest.raises(CorruptFile, match="incomplete"):
        open_clean(out)


def test_unverified_content_is_refused_by_default(tmp_path):
    spec = small_spec("fashion_mnist")
    WRITERS["fashion_mnist"](tmp_path, spec)
    with pytest.raises(CorruptFile, match="--verify structure") as err:
        load_source(spec, locate(spec, [tmp_path]))
    assert "train-images-idx3-ubyte.gz" in str(err.value)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "svhn"])
def test_wrong_count_is_refused(tmp_path, name):
    spec = small_spec(name)
    WRITERS[name](tmp_path, spec)
    wrong = replace(spec, counts={"train": 50, "test": 24})
    with pytest.raises(CorruptFile, match="should have 50 images, found 48"):
        load_source(wrong, locate(wrong, [tmp_path]))
    # --verify structure prepares a copy of another size (a trimmed mirror, tiny synthetic files), as unverified.
    source = load_source(wrong, locate(wrong, [tmp_path]), allow_unverified=True)
    assert source.verification == "unverified" and len(source.labels["train"]) == 48


def test_labels_out_of_range_are_refused(tmp_path):
    spec = small_spec("cifar10")
    WRITERS["cifar10"](tmp_path, spec)
    fewer = replace(spec, classes=spec.classes[:3])
    with pytest.raises(CorruptFile, match="labels should lie in 0..2"):
        load_source(fewer, locate(fewer, [tmp_path]), allow_unverified=True)


def test_locate_prefers_earlier_roots_and_subfolders(tmp_path):
    spec = small_spec("mnist")
    WRITERS["mnist"](tmp_path / "first", spec)
    WRITERS["mnist"](tmp_path / "mirror" / "MNIST" / "raw", spec)
    assert locate(spec, [tmp_path / "nope", tmp_path / "first", tmp_path / "mirror"])["train_images"].parent == tmp_path / "first"
    assert locate(spec, [tmp_path / "mirror"])["train_images"].parent == tmp_path / "mirror" / "MNIST" / "raw"
    assert locate(spec, [tmp_path / "nope"]) is None


def test_png_is_lossless():
    rng = np.random.default_rng(0)
    from advgen.storage.shards import encode_png

    for shape in [(28, 28, 1), (32, 32, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(decode_png(encode_png(img)), img)


def test_tar_members_are_plain_deterministic_ustar(tmp_path):
    import tarfile

    from advgen.storage.shards import write_tar

    write_tar(tmp_path / "s.tar", [{"__key__": "000001", "png": b"\x89PNG", "cls": b"3"},
                                   {"__key__": "000002", "cls": b"4", "png": b"\x89PNG!"}])
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["000001.cls", "000001.png", "000002.cls", "000002.png"]
        assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0o444, 0, 0, "advgen", "advgen")}
        assert tar.extractfile(members[3]).read() == b"\x89PNG!"
    assert (tmp_path / "s.tar").stat().st_size % 10240 == 0
    with pytest.raises(ValueError, match="contains a dot"):
        write_tar(tmp_path / "bad.tar", [{"__key__": "1.5", "cls": b"1"}])
    assert not (tmp_path / "bad.tar").exists() and not list(tmp_path.glob(".*tmp*"))
