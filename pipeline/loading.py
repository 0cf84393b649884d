"""Reading shards back: (x, y) batches or a torch ``IterableDataset``.

Works for clean folders and generated variants alike (both hold ``KEY.png`` +
``KEY.cls``). The folder's ``_stats.json`` lists the shards, and checksums are
verified before anything is read. Images come back as float tensors in [0, 1]
(N, C, H, W) — exactly the stored, rounded images the manifests describe.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from advgen.errors import BadParameter, CorruptFile
from advgen.shards import STATS, decode_png, iter_tar, verify_shards


def shard_paths(folder: Path, split: str, *, verify: bool = True) -> list[Path]:
    """The shards of ``split`` listed in a complete folder's stats (checksums verified)."""
    import json

    folder = Path(folder)
    if not (folder / STATS).is_file():
        raise CorruptFile(folder, f"no {STATS}: not a complete advgen folder")
    stats = json.loads((folder / STATS).read_text())
    if split not in stats["shards"]:
        raise BadParameter(f"{folder} has no {split!r} split; it has {', '.join(stats['shards'])}")
    if verify:
        verify_shards(folder, {"sha256": {n: d for n, d in stats["sha256"].items()
                                          if n.replace(".parquet", ".tar") in stats["shards"][split]}})
    return [folder / n for n in stats["shards"][split]]


def _samples(paths: list[Path]) -> Iterator[tuple[Tensor, int]]:
    for path in paths:
        for _, members in iter_tar(path):
            x = torch.from_numpy(decode_png(members["png"])).permute(2, 0, 1).float().div_(255)
            yield x, int(members["cls"])


def iter_batches(folder: Path, split: str, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) batches of a split, in key order: x (B, C, H, W) float in [0, 1], y (B,) int64."""
    xs: list[Tensor] = []
    ys: list[int] = []
    for x, y in _samples(shard_paths(folder, split)):
        xs.append(x)
        ys.append(y)
        if len(xs) == batch_size:
            yield torch.stack(xs), torch.tensor(ys)
            xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.tensor(ys)


class ShardDataset(IterableDataset):
    """Samples (x, y) of one split; DataLoader workers take disjoint shards (shard i to worker i mod n)."""

    def __init__(self, folder: Path, split: str) -> None:
        self.paths = shard_paths(folder, split)

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        info = get_worker_info()
        paths = self.paths if info is None else self.paths[info.id::info.num_workers]
        return _samples(paths)
