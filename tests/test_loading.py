"""``ShardDataset``: length, exact coverage across DDP ranks x DataLoader workers, seeded per-epoch
shuffling, keys that match the stored images (checked against an independent tarfile + Pillow reader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import read_split_by_hand, tiny_clean
from advgen.errors import BadParameter
from advgen.storage.loading import ShardDataset


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """48 train images in 6 shards of 8, 24 test images in 3 (keys are indices, so shard = int(key) // 8)."""
    return tiny_clean(tmp_path_factory.mktemp("loading"), train=48, test=24, shard_size=8)


@pytest.fixture(scope="module")
def by_hand(clean):
    return {split: read_split_by_hand(clean, split) for split in ("train", "test")}


def _through_loader(ds: ShardDataset) -> list[tuple[np.ndarray, int, str]]:
    """Every sample a real DataLoader with two worker processes yields: (uint8 HWC image, label, key)."""
    out = []
    for x, y, keys in DataLoader(ds, batch_size=5, num_workers=2):
        images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out += zip(images, y.tolist(), keys)
    return out


def test_len_counts_the_split(clean):
    assert len(ShardDataset(clean, "train")) == 48
    assert len(ShardDataset(clean, "test")) == 24
    assert [len(ShardDataset(clean, "train", rank=r, world_size=2)) for r in range(2)] == [24, 24]


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_yield_every_sample_once_with_its_key(clean, by_hand, shuffle):
    keys, images, labels = by_hand["train"]
    row = {k: i for i, k in enumerate(keys)}
    seen: list[str] = []
    shards_of_rank = []
    for rank in range(2):
        ds = ShardDataset(clean, "train", shuffle=shuffle, seed=3, rank=rank, world_size=2, return_keys=True)
        ds.set_epoch(1)
        samples = _through_loader(ds)
        assert len(samples) == len(ds) == 24
        for image, label, key in samples:
            assert np.array_equal(image, images[row[key]]) and label == labels[row[key]], key
        seen += [k for _, _, k in samples]
        shards_of_rank.append({int(k) // 8 for _, _, k in samples})
    assert sorted(seen) == sorted(keys) and len(set(seen)) == 48
    # 6 shards of 8 over 2 ranks: each rank reads 3 whole shards of its own
    assert [len(s) for s in shards_of_rank] == [3, 3] and not shards_of_rank[0] & shards_of_rank[1]


def test_unshuffled_order_is_key_order(clean, by_hand):
    keys = [k for _, _, k in ShardDataset(clean, "test", return_keys=True)]
    assert keys == by_hand["test"][0] == sorted(keys)


def test_shuffle_is_seeded_and_changes_every_epoch(clean):
    def order(seed: int, epoch: int) -> list[str]:
        ds = ShardDataset(clean, "train", shuffle=True, seed=seed, return_keys=True)
        ds.set_epoch(epoch)
        return [k for _, _, k in ds]

    first = order(0, 0)
    assert order(0, 0) == first  # reproducible for (seed, epoch)
    assert sorted(first) == sorted(order(0, 1)) == [f"{i:06d}" for i in range(48)]
    assert order(0, 1) != first and order(1, 0) != first
    # shard order changes too, not only the order inside shards
    assert [int(k) // 8 for k in first[::8]] != [int(k) // 8 for k in order(0, 1)[::8]]


def test_uneven_split_covers_once_and_drop_uneven_equalizes(clean, by_hand):
    keys = by_hand["test"][0]  # 24 samples in 3 shards, over 5 ranks
    parts = [[k for _, _, k in ShardDataset(clean, "test", shuffle=True, rank=r, world_size=5, return_keys=True)]
             for r in range(5)]
    assert [len(p) for p in parts] == [4, 5, 5, 5, 5]
    assert sorted(k for p in parts for k in p) == sorted(keys)
    equal = [ShardDataset(clean, "test", shuffle=True, rank=r, world_size=5, drop_uneven=True, return_keys=True)
             for r in range(5)]
    assert [len(ds) for ds in equal] == [24 // 5] * 5
    got = [k for ds in equal for _, _, k in ds]
    assert len(got) == 20 and len(set(got)) == 20 and set(got) <= set(keys)
    # Equal lengths give every rank the same number of batches through two workers (DDP stays in step).
    assert len({len(list(DataLoader(ds, batch_size=2, num_workers=2))) for ds in equal}) == 1


def test_rank_and_world_size_come_from_torch_distributed(clean, monkeypatch):
    assert (ShardDataset(clean, "train").rank, ShardDataset(clean, "train").world_size) == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    ds = ShardDataset(clean, "train")
    assert (ds.rank, ds.world_size, len(ds)) == (2, 3, 16)
    with pytest.raises(BadParameter, match="rank"):
        ShardDataset(clean, "train", rank=3, world_size=3)


def test_plain_samples_are_float_images_and_int_labels(clean, by_hand):
    x, y = next(iter(ShardDataset(clean, "test")))
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal((x * 255).round().to(torch.uint8)[0], torch.from_numpy(by_hand["test"][1][0, ..., 0]))
