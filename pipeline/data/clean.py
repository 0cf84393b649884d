"""Clean shards: a checked ``Source`` written as WebDataset shards plus a card.

Layout of an output folder::

    train-000000.tar  train-000000.parquet  ...  test-000000.tar  ...
    README.md      dataset card (YAML front matter + sha256 of every shard)
    _stats.json    written last: counts, shard list, checksums, provenance

The folder is built under a temporary name beside ``out`` and swapped into
place at the end (``outputs.replace_dir``), so ``out`` is either the previous
complete output or the new complete one, never a mixture and never nothing.
Only an empty folder or a complete clean folder is ever replaced.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from advgen.storage.cards import clean_card, split_bytes
from advgen.data.datasets import SPLITS, DatasetSpec, Source, spec_record
from advgen.errors import BadParameter, CorruptFile
from advgen.storage.outputs import check_replaceable, clean_stale, recover, replace_dir, staging_path
from advgen.storage.shards import (
    STATS,
    encode_png,
    file_digest,
    key_of,
    read_split,
    read_stats,
    shard_name,
    verify_shards,
    write_json,
    write_parquet,
    write_tar,
    write_text,
)
from advgen.versions import versions

MIN_SHARDS = 8  # later stages split work by shard: world_size x workers needs enough of them
FORMAT_VERSION = 2

Progress = Callable[[str, int, int], None]  # (split, shards done, shards total)


def default_shard_size(counts: dict[str, int], min_shards: int = MIN_SHARDS) -> int:
    """Largest shard size that still gives every split at least ``min_shards`` shards."""
    return max(1, min(counts.values()) // min_shards)


def write_clean(
    source: Source,
    out: Path,
    *,
    shard_size: int = 0,
    limit: int = 0,
    on_progress: Progress | None = None,
) -> dict:
    """Write ``source`` as clean shards into ``out``; returns the stats written.

    ``shard_size`` 0 picks ``default_shard_size``; ``limit`` > 0 keeps only the
    first ``limit`` images of each split (keys still give source indices).
    """
    spec = source.spec
    if shard_size < 0:
        raise BadParameter(f"--shard-size must be >= 0 (0 = automatic), got {shard_size}")
    if limit < 0:
        raise BadParameter(f"--limit must be >= 0 (0 = every image), got {limit}")
    counts = {s: min(len(source.labels[s]), limit) if limit else len(source.labels[s]) for s in SPLITS}
    size = shard_size or default_shard_size(counts)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)  # an earlier run killed mid-swap left the old folder aside
    out = check_replaceable(out, "clean")
    clean_stale(out.parent)
    staging = staging_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shards: dict[str, list[str]] = {}
        for split in SPLITS:
            shards[split] = _write_split(
                spec, source.images[split][: counts[split]], source.labels[split][: counts[split]],
                staging, split, size, on_progress,
            )
        names = [n for s in SPLITS for n in shards[s]]
        digests = {}
        for n in names:
            digests[n] = file_digest(staging / n)
            manifest = n.replace(".tar", ".parquet")
            digests[manifest] = file_digest(staging / manifest)
        stats = {
            "kind": "clean",
            "format_version": FORMAT_VERSION,
            "dataset": spec.name,
            "title": spec.title,
            "shape": list(spec.shape),
            "classes": list(spec.classes),
            "counts": counts,
            "full_counts": dict(spec.counts),
            "source_counts": {s: int(len(source.labels[s])) for s in SPLITS},
            "limit": limit,
            "shard_size": size,
            "shards": shards,
            "sha256": digests,
            "source": {
                "verification": source.verification,
                "content_sha256": source.content_sha256,
                "files_md5": {Path(p).name: m for p, m in sorted(source.files.items())},
                **({"origin": source.origin} if source.origin else {}),
            },
            "license": spec.license,
            "versions": versions(),
            **spec_record(spec),  # a dataset its user brought: what later stages rebuild its spec from
        }
        stats["num_bytes"] = split_bytes(staging, shards)
        write_text(staging / "README.md", clean_card(spec, stats))
        write_json(staging / STATS, stats)  # last: marks the folder complete
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def _write_split(
    spec: DatasetSpec, images: np.ndarray, labels: np.ndarray, out: Path,
    split: str, size: int, on_progress: Progress | None,
) -> list[str]:
    n = len(labels)
    total = math.ceil(n / size)
    names = []
    for i in range(total):
        lo, hi = i * size, min(n, (i + 1) * size)
        keys = [key_of(j) for j in range(lo, hi)]
        pngs = [encode_png(images[j]) for j in range(lo, hi)]
        name = shard_name(split, i)
        write_tar(out / name, (
            {"__key__": k, "png": p, "cls": str(int(labels[j])).encode()}
            for k, p, j in zip(keys, pngs, range(lo, hi))
        ))
        write_parquet(out / name.replace(".tar", ".parquet"), pa.table({
            "key": pa.array(keys, pa.string()),
            "index": pa.array(np.arange(lo, hi), pa.int32()),
            "label": pa.array(labels[lo:hi], pa.int16()),
            "label_name": pa.array([spec.classes[int(c)] for c in labels[lo:hi]], pa.string()),
            "png_sha256": pa.array([hashlib.sha256(p).hexdigest() for p in pngs], pa.string()),
        }))
        names.append(name)
        if on_progress:
            on_progress(split, i + 1, total)
    return names


def open_clean(directory: Path, *, dataset: str | None = None, verify: bool = True) -> dict:
    """Stats of a complete clean folder, checked for ``dataset`` and, if ``verify``, checksums."""
    stats = read_stats(Path(directory), kind="clean")
    if dataset is not None and stats["dataset"] != dataset:
        raise CorruptFile(directory, f"holds {stats['dataset']} shards, but the dataset asked for is {dataset}")
    if verify:
        verify_shards(Path(directory), stats)
    return stats


def load_clean_split(directory: Path, stats: dict, split: str):
    """(images N×C×H×W uint8, labels int64, keys) of one split of a clean folder."""
    if split not in stats["shards"]:
        raise BadParameter(f"unknown split {split!r}; this folder has {', '.join(stats['shards'])}")
    return read_split(Path(directory), stats, split)
