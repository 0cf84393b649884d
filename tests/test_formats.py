"""Native-format readers against files written independently in the tests."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile

import numpy as np
import pytest

from conftest import small_spec, write_cifar, write_idx, write_svhn
from advgen.errors import CorruptFile
from advgen.data.formats import read_cifar_batches, read_idx, read_svhn_mat


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", arr, gz=gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), arr)


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    (tmp_path / "labels").write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + arr.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), arr)


@pytest.mark.parametrize(
    "blob, problem",
    [
        (b"\x00\x01\x08\x01\x00\x00\x00\x02ab", "bad magic"),
        (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]), "element type"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 2]), "truncated IDX header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "declares"),
        (b"\x1f\x8b\x08\x00garbage", "broken gzip"),
    ],
)
def test_idx_corrupt(tmp_path, blob, problem):
    (tmp_path / "f.gz").write_bytes(blob)
    with pytest.raises(CorruptFile, match=problem) as err:
        read_idx(tmp_path / "f.gz")
    assert "f.gz" in str(err.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [True, False])
def test_cifar_archive_and_folder(tmp_path, name, archive):
    spec = small_spec(name, train=25, test=10)
    truth = write_cifar(tmp_path, spec, archive=archive)
    source = tmp_path / (spec.layout.files["archive"][0 if archive else 1])
    folder = spec.layout.files["archive"][1]
    train_members = [f"{folder}/data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else [f"{folder}/train"]
    key = "labels" if name == "cifar10" else "fine_labels"
    x, y = read_cifar_batches(source, train_members, key)
    np.testing.assert_array_equal(x, truth["train"][0])
    np.testing.assert_array_equal(y, truth["train"][1])


def test_cifar_refuses_code_in_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    blob = pickle.dumps({"data": Evil(), "labels": []}, protocol=2)
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("d/test_batch")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(CorruptFile, match="refusing to load .*exec"):
        read_cifar_batches(tmp_path / "c.tar.gz", ["d/test_batch"], "labels")
    assert not marker.exists()


def test_cifar_missing_member_and_bad_archive(tmp_path):
    spec = small_spec("cifar10", train=10, test=5)
    write_cifar(tmp_path, spec)
    with pytest.raises(CorruptFile, match="lacks member"):
        read_cifar_batches(tmp_path / "cifar-10-python.tar.gz", ["cifar-10-batches-py/nope"], "labels")
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(CorruptFile, match="not a readable tar"):
        read_cifar_batches(tmp_path / "bad.tar.gz", ["x"], "labels")


def test_svhn_maps_label_10_to_0(tmp_path):
    spec = small_spec("svhn", train=30, test=12)
    truth = write_svhn(tmp_path, spec)
    x, y = read_svhn_mat(tmp_path / "train_32x32.mat")
    np.testing.assert_array_equal(x, truth["train"][0])
    np.testing.assert_array_equal(y, truth["train"][1])
    assert 0 in y and y.max() <= 9


def test_svhn_corrupt(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, but not really")
    with pytest.raises(CorruptFile, match="train_32x32.mat"):
        read_svhn_mat(tmp_path / "train_32x32.mat")
