"""Reading shards back: (x, y) batches or a torch ``IterableDataset``.

Works for clean folders and generated variants alike (both hold ``KEY.png`` +
``KEY.cls``). The folder's ``_stats.json`` lists the shards, and checksums are
verified before anything is read. Images come back as float tensors in [0, 1]
(N, C, H, W) — exactly the stored, rounded images the manifests describe.
``ShardDataset`` adds seeded per-epoch shuffling and the split across DDP
ranks and DataLoader workers; per-shard sample counts come from the manifests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from advgen.errors import BadParameter, CorruptFile
from advgen.storage.shards import STATS, decode_png, iter_tar, verify_shards


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


def shard_sizes(paths: list[Path]) -> list[int]:
    """Samples in each shard, from its manifest's parquet footer (no tar is read)."""
    sizes = []
    for path in paths:
        manifest = Path(path).with_suffix(".parquet")
        try:
            sizes.append(pq.read_metadata(manifest).num_rows)
        except (OSError, ValueError) as e:
            raise CorruptFile(manifest, f"unreadable manifest ({e})") from None
    return sizes


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): the given values, else torch.distributed's when initialized, else (0, 1)."""
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise BadParameter(f"rank must lie in [0, world_size) with world_size >= 1, got rank {rank} of {world_size}")
    return rank, world_size


def _bounds(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part ``i`` of ``parts`` contiguous, balanced parts of ``range(n)``: sizes differ by at most one."""
    return i * n // parts, (i + 1) * n // parts


class ShardDataset(IterableDataset):
    """Samples ``(x, y)`` — or ``(x, y, key)`` with ``return_keys`` — of one split of a folder.

    x is a (C, H, W) float32 tensor in [0, 1], y an int, key the sample's key
    (``"000123"``). Checksums of the split's shards and manifests are verified
    on construction.

    Order. Each epoch defines one sequence of the split's N samples: shards in
    a permuted order, each shard's samples permuted (``shuffle=True``), or key
    order. The permutations are seeded by (``seed``, epoch, shard), so every
    rank and worker computes the same sequence; ``set_epoch(n)`` before each
    epoch gives a new one, as with ``DistributedSampler``. (With
    ``persistent_workers=True`` workers keep the epoch they started with.)

    Splitting. Rank r of W takes the contiguous part [r·N//W, (r+1)·N//W) of
    the sequence, and DataLoader worker w of k the same way takes its part of
    the rank's: every sample is yielded exactly once per epoch across all
    ranks × workers. When the shards divide evenly among the ranks and have
    equal sizes, a rank's part is whole shards (each rank reads only its own);
    otherwise a shard on a boundary is read by both sides, each decoding only
    its own samples. Ranks' lengths then differ by at most one: N mod W ranks
    yield one sample more, which leaves DDP ranks with unequal step counts
    (a hang at the last all-reduce). ``drop_uneven=True`` makes every rank
    yield N // W samples, skipping at most W - 1 per epoch (different ones each
    epoch when shuffled).

    ``rank`` and ``world_size`` default to torch.distributed's when it is
    initialized, else 0 and 1. ``len()`` is the number of samples this rank
    yields per epoch (the same every epoch).
    """

    def __init__(self, folder: Path | str, split: str, *, shuffle: bool = False, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_uneven: bool = False,
                 return_keys: bool = False) -> None:
        if seed < 0:
            raise BadParameter(f"seed must be >= 0, got {seed}")
        self.rank, self.world_size = _world(rank, world_size)
        self.paths = shard_paths(Path(folder), split)
        self.sizes = shard_sizes(self.paths)
        self.shuffle, self.seed, self.return_keys, self.drop_uneven = shuffle, seed, return_keys, drop_uneven
        self.epoch = 0
        total = sum(self.sizes)
        lo, hi = _bounds(total, self.world_size, self.rank)
        self._range = (lo, lo + total // self.world_size) if drop_uneven else (lo, hi)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (only matters with ``shuffle=True``)."""
        if epoch < 0:
            raise BadParameter(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self._range[1] - self._range[0]

    def _order(self, i: int) -> np.ndarray:
        """Shard ``i``'s sample positions in this epoch's order."""
        if not self.shuffle:
            return np.arange(self.sizes[i])
        return np.random.default_rng([self.seed, self.epoch, i]).permutation(self.sizes[i])

    def _pieces(self, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
        """(shard index, positions in it) covering samples [lo, hi) of this epoch's sequence."""
        shards = (np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths)) if self.shuffle
                  else range(len(self.paths)))
        start = 0
        for i in map(int, shards):
            end = start + self.sizes[i]
            if start < hi and lo < end:
                yield i, self._order(i)[max(lo - start, 0):min(hi, end) - start]
            start = end

    def __iter__(self) -> Iterator[tuple[Tensor, int] | tuple[Tensor, int, str]]:
        lo, hi = self._range
        info = get_worker_info()
        if info is not None:
            a, b = _bounds(hi - lo, info.num_workers, info.id)
            lo, hi = lo + a, lo + b
        for i, positions in self._pieces(lo, hi):
            samples = list(iter_tar(self.paths[i]))
            if len(samples) != self.sizes[i]:
                raise CorruptFile(self.paths[i], f"{len(samples)} samples, its manifest lists {self.sizes[i]}")
            for p in positions:
                key, members = samples[p]
                if "png" not in members or "cls" not in members:
                    raise CorruptFile(self.paths[i], f"sample {key} lacks .png or .cls")
                x = torch.from_numpy(decode_png(members["png"])).permute(2, 0, 1).float().div_(255)
                yield (x, int(members["cls"]), key) if self.return_keys else (x, int(members["cls"]))
