"""The shard readers' fast paths against the reference readers (tarfile, Pillow, webdataset)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from advgen.errors import CorruptFile
from advgen.storage.shards import _decode_plain_png, decode_png, encode_png, iter_tar, write_tar


def _samples(n: int) -> list[dict[str, bytes]]:
    rng = np.random.default_rng(0)
    return [{"__key__": f"{i:06d}", "png": encode_png(rng.integers(0, 256, (5, 4, 1), dtype=np.uint8)),
             "cls": str(i % 10).encode()} for i in range(n)]


def test_fast_tar_reader_matches_tarfile_and_webdataset(tmp_path):
    import webdataset as wds

    path = tmp_path / "s.tar"
    write_tar(path, _samples(7))
    ours = list(iter_tar(path))
    with tarfile.open(path) as tar:
        ref = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert [(f"{k}.{e}", v) for k, members in ours for e, v in members.items()] == ref
    loaded = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in loaded] == [k for k, _ in ours]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tars_from_other_writers_still_read(tmp_path, fmt):
    """Long names (GNU/PAX extension headers) fall back to tarfile; plain ustar takes the fast path."""
    path = tmp_path / "other.tar"
    long_key = "k" * 120 if fmt != tarfile.USTAR_FORMAT else "000001"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in ((f"{long_key}.cls", b"3"), (f"{long_key}.png", b"xyz"), ("000002.cls", b"4")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(iter_tar(path)) == [(long_key, {"cls": b"3", "png": b"xyz"}), ("000002", {"cls": b"4"})]


def test_truncated_tar_is_an_error(tmp_path):
    path = tmp_path / "t.tar"
    write_tar(path, _samples(3))
    data = path.read_bytes()
    path.write_bytes(data[:700])  # inside the second member
    with pytest.raises(CorruptFile):
        list(iter_tar(path))


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (1, 1, 1), (5, 7, 3)])
def test_png_fast_path_and_pillow_agree(shape):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    ours = encode_png(img)
    assert _decode_plain_png(ours) is not None and np.array_equal(decode_png(ours), img)
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if shape[2] == 1 else img).save(buf, "PNG", optimize=True)  # filtered rows
    assert np.array_equal(decode_png(buf.getvalue()), img)
    assert np.array_equal(np.array(Image.open(io.BytesIO(ours))).reshape(shape), img)  # Pillow reads ours
