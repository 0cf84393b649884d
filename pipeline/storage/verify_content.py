"""verify, the content: every file listed and hashed, every sample decoded and checked, every manifest row."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from advgen.data.datasets import DatasetSpec
from advgen.errors import CorruptFile
from advgen.storage.shards import STATS, decode_png, file_digest, iter_tar
from advgen.storage.variants import FINGERPRINT_KEY, TAR_SHA_KEY
from advgen.storage.verify_card import _short
from advgen.storage.verify_rules import CARD, SAMPLE_PROBLEMS, _CLS, _KEY, _PNG_ERRORS, _plain_name


# --- files ---------------------------------------------------------------------------------------------------------

def _file_problems(folder: Path, stats: dict) -> list[str]:
    """Listed files exist with their sha256; nothing shard-like is unlisted; manifests name their tar's sha."""
    out = []
    sha = stats["sha256"]
    for name, want in sorted(sha.items()):
        if not _plain_name(name):
            continue  # reported by _stats_consistency; never open paths outside the folder
        path = folder / name
        if path.is_symlink():
            out.append(f"{name}: is a symbolic link (to {os.readlink(path)}); a shared folder holds its own files, "
                       "and verify never follows links")
            continue
        if not path.is_file():
            out.append(f"{name}: missing (listed in {STATS})")
            continue
        got = file_digest(path)
        if got != want:
            out.append(f"{name}: sha256 {got[:12]}… differs from the recorded {want[:12]}…")
    for path in sorted(folder.iterdir()):
        name = path.name
        if name in sha or name in (STATS, CARD):
            continue
        if name.startswith(".") and ".tmp-" in name:
            out.append(f"{name}: a partial write left behind by an interrupted run")
        elif path.suffix in (".tar", ".parquet"):
            out.append(f"{name}: not listed in {STATS} (a stray or leftover {path.suffix} file)")
    if stats["kind"] == "variant":
        for tar in (n for names in stats["shards"].values() for n in names):
            manifest = folder / (tar.removesuffix(".tar") + ".parquet")
            if not (_plain_name(tar) and manifest.is_file()) or manifest.is_symlink():
                continue
            try:
                meta = pq.read_schema(manifest).metadata or {}
            except (OSError, pa.ArrowException) as e:
                out.append(f"{manifest.name}: not a readable parquet file ({e})")
                continue
            recorded = meta.get(TAR_SHA_KEY, b"none").decode(errors="replace")
            if tar in sha and recorded != sha[tar]:
                out.append(f"{manifest.name}: records tar sha256 {recorded[:12]}…, {STATS} says {sha[tar][:12]}…")
            if meta.get(FINGERPRINT_KEY, b"").decode(errors="replace") != stats.get("fingerprint"):
                out.append(f"{manifest.name}: made with another fingerprint than {STATS} records")
    return out


# --- content -------------------------------------------------------------------------------------------------------

class _Limited:
    """Sample-level problems of one file, at most ``SAMPLE_PROBLEMS`` spelled out."""

    def __init__(self, name: str) -> None:
        self.name, self.lines, self.more = name, [], 0

    def add(self, message: str) -> None:
        if len(self.lines) < SAMPLE_PROBLEMS:
            self.lines.append(f"{self.name}: {message}")
        else:
            self.more += 1

    def done(self) -> list[str]:
        return self.lines + ([f"{self.name}: … and {self.more} more problems"] if self.more else [])


def _content_problems(folder: Path, stats: dict, spec: DatasetSpec) -> list[str]:
    out = []
    npy = stats["kind"] == "variant" and bool(stats.get("store_float"))
    allowed = {"png", "cls"} | ({"npy"} if npy else set())
    for split, names in stats["shards"].items():
        total, prev = 0, -1
        for name in names:
            path = folder / name
            if not (_plain_name(name) and path.is_file()) or path.is_symlink():
                continue  # a missing or linked shard is reported once, by _file_problems
            p = _Limited(name)
            keys, labels, png_sha = [], [], []
            try:
                for key, members in iter_tar(path):
                    keys.append(key)
                    if not _KEY.fullmatch(key):
                        p.add(f"sample key {key!r} is not a zero-padded index")
                    elif int(key) <= prev:
                        p.add(f"sample {key} is out of order or repeated (follows {prev:06d})")
                    else:
                        prev = int(key)
                    labels.append(_check_sample(key, members, p, allowed=allowed, spec=spec))
                    png_sha.append(hashlib.sha256(members["png"]).hexdigest() if "png" in members else None)
            except CorruptFile as e:
                p.add(f"not a readable tar ({str(e).removeprefix(f'{path}: ')})")
            total += len(keys)
            out += p.done()
            out += _manifest_problems(path.with_suffix(".parquet"), name, keys, labels, png_sha)
        if total != stats["counts"].get(split):
            out.append(f"{split}: {total} samples, the card/stats say {stats['counts'].get(split)}")
    return out


def _check_sample(key: str, members: dict[str, bytes], p: _Limited, *, allowed: set[str],
                  spec: DatasetSpec) -> int | None:
    """Check one sample's members; returns its label, or None if it has no valid one."""
    c, h, w = spec.shape
    for ext in sorted(set(members) - allowed):
        p.add(f"sample {key} has a .{ext} member; expected only {', '.join('.' + a for a in sorted(allowed))}")
    for ext in sorted(allowed - set(members)):
        p.add(f"sample {key} lacks .{ext}")
    if "png" in members:
        try:
            img = decode_png(members["png"])
        except _PNG_ERRORS as e:
            p.add(f"sample {key}: png does not decode ({type(e).__name__})")
        else:
            if img.shape != (h, w, c) or img.dtype != np.uint8:
                found = "×".join(map(str, img.shape))
                p.add(f"sample {key}: png is {found} {img.dtype}, expected {h}×{w}×{c} uint8")
    if "npy" in members and "npy" in allowed:
        try:
            arr = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            p.add(f"sample {key}: npy does not load without pickle ({e})")
        else:
            if not (isinstance(arr, np.ndarray) and arr.shape == (c, h, w) and arr.dtype == np.float32):
                p.add(f"sample {key}: npy is {getattr(arr, 'shape', '?')} {getattr(arr, 'dtype', '?')}, "
                      f"expected ({c}, {h}, {w}) float32")
    if "cls" not in members:
        return None
    raw = members["cls"]
    if not _CLS.fullmatch(raw):
        p.add(f"sample {key}: cls is {raw[:20]!r}, expected ASCII digits")
        return None
    label = int(raw)
    if label >= spec.num_classes:
        p.add(f"sample {key}: cls {label} is outside [0, {spec.num_classes})")
    return label


def _manifest_problems(path: Path, tar: str, keys: list[str], labels: list[int | None],
                       png_sha: list[str | None]) -> list[str]:
    """A shard's parquet manifest against what its tar holds: keys in order, labels, png hashes."""
    if not path.is_file() or path.is_symlink():
        return []  # reported by _file_problems when listed
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        return [f"{path.name}: not a readable parquet file ({e})"]
    if "key" not in table.column_names:
        return [f"{path.name}: no key column"]
    out = []
    columns = [("key", keys, "keys"), ("label", labels, "labels"), ("png_sha256", png_sha, "png sha256")]
    for column, found, what in columns:
        if column not in table.column_names:
            continue
        listed = table[column].to_pylist()
        if listed == found:
            continue
        if len(listed) != len(found):
            out.append(f"{path.name}: {len(listed)} rows, {tar} holds {len(found)} samples")
            break
        i = next(i for i, (a, b) in enumerate(zip(listed, found)) if a != b)
        out.append(f"{path.name}: {what} differ from {tar}'s at row {i} (key {keys[i]}): "
                   f"{_short(listed[i])} in the manifest, {_short(found[i])} in the tar")
    return out
