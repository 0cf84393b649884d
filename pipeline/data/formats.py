"""Readers for the datasets' native distribution formats.

* IDX (MNIST, Fashion-MNIST): big-endian header + raw bytes, optionally gzipped.
  Gzip is detected by its magic bytes, not the file name, because mirrors (and
  Debian's package) recompress or decompress the originals.
* CIFAR python batches: pickled dicts. Pickle can run code, so these are read
  with an unpickler that accepts only the numpy array reconstruction the real
  files use, and read straight out of the ``.tar.gz`` without extracting.
* SVHN: MATLAB v5 ``.mat`` files with ``X`` (32, 32, 3, N) and ``y`` (N, 1),
  where label 10 stands for the digit 0.

Every reader returns images as ``uint8`` arrays shaped (N, H, W, C) and labels
as ``int64`` arrays shaped (N,), and raises ``CorruptFile`` naming the file and
what was wrong with it.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from advgen.errors import CorruptFile

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Decode an IDX file (gzipped or not) into an array of its declared shape."""
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CorruptFile(path, "not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise CorruptFile(path, f"IDX element type 0x{raw[2]:02x} is not unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptFile(path, "truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = 1
    for d in dims:  # Python ints: a crafted header cannot overflow the product
        expected *= d
    if len(raw) - header != expected:
        raise CorruptFile(
            path, f"IDX header declares {dims} = {expected} bytes but {len(raw) - header} follow"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


# The largest original IDX file (MNIST's 60000 training images) is 47 MB decoded; anything that
# decompresses to far more is not a dataset file but a decompression bomb, and is stopped early.
MAX_DECODED_BYTES = 256 << 20


def _read_maybe_gzip(path: Path, limit: int = MAX_DECODED_BYTES) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CorruptFile(path, f"cannot read: {e.strerror or e}") from None
    if data[:2] != b"\x1f\x8b":
        return data
    out, rest = [], data
    size = 0
    try:
        while rest[:2] == b"\x1f\x8b":  # gzip allows several members, one after another
            d = zlib.decompressobj(wbits=31)
            chunk = d.decompress(rest, limit - size + 1)
            while True:
                size += len(chunk)
                if size > limit:
                    raise CorruptFile(path, f"decompresses to more than {limit >> 20} MiB; not a dataset file "
                                            "(a decompression bomb?)")
                out.append(chunk)
                if d.eof or not d.unconsumed_tail:
                    break
                chunk = d.decompress(d.unconsumed_tail, limit - size + 1)
            if not d.eof:
                raise CorruptFile(path, "broken gzip stream (truncated)")
            rest = d.unused_data
    except zlib.error as e:
        raise CorruptFile(path, f"broken gzip stream ({e})") from None
    return b"".join(out)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Allows the globals a numpy array needs and nothing else.

    ``_codecs.encode`` is how protocol-2 pickles written by Python 3 spell
    bytes objects; it only turns a str into bytes.
    """

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle_batch(blob: bytes, where: str) -> dict[str, object]:
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as e:
        raise CorruptFile(where, f"not a CIFAR python batch ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptFile(where, f"expected a dict, found {type(obj).__name__}")
    # Python 2 pickles give str keys under latin1; pickles written by Python 3
    # with bytes keys keep them as bytes. Accept both.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batches(
    source: Path, members: list[str], label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR batches, in order, from a ``.tar.gz`` or an extracted folder.

    ``members`` are paths inside the archive (``cifar-10-batches-py/data_batch_1``)
    or, for a folder, relative to its parent. Returns (N, 32, 32, 3) uint8 images.
    """
    blobs = _cifar_blobs(source, members)
    xs, ys = [], []
    for where, blob in blobs:
        batch = _unpickle_batch(blob, where)
        if "data" not in batch or label_key not in batch:
            raise CorruptFile(where, f"batch lacks 'data' or {label_key!r}")
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise CorruptFile(where, f"expected uint8 data of shape (N, 3072), found {data.dtype} {data.shape}")
        if labels.shape != (data.shape[0],):
            raise CorruptFile(where, f"{data.shape[0]} images but {labels.shape} labels")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _cifar_blobs(source: Path, members: list[str]) -> list[tuple[str, bytes]]:
    if source.is_dir():
        out = []
        for m in members:
            p = source.parent / m
            try:
                out.append((str(p), p.read_bytes()))
            except OSError as e:
                raise CorruptFile(p, f"cannot read: {e.strerror or e}") from None
        return out
    try:
        with tarfile.open(source, "r:*") as tar:
            out = []
            for m in members:
                try:
                    f = tar.extractfile(m)
                except KeyError:
                    f = None
                if f is None:
                    raise CorruptFile(source, f"archive lacks member {m}")
                out.append((f"{source}:{m}", f.read()))
            return out
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CorruptFile(source, f"not a readable tar archive ({e})") from None


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN cropped-digits ``.mat``; maps label 10 to digit 0."""
    import scipy.io  # imported here: only SVHN needs scipy

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:
        raise CorruptFile(path, f"not a readable MATLAB file ({e})") from None
    if "X" not in mat or "y" not in mat:
        raise CorruptFile(path, "lacks the variables 'X' and 'y'")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise CorruptFile(path, f"expected X as uint8 (32, 32, 3, N), found {x.dtype} {x.shape}")
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise CorruptFile(path, f"{x.shape[3]} images but {y.shape[0]} labels")
    y = np.where(y == 10, 0, y)
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), y
