"""Results before and after rounding, side by side; the papers' confidence buckets; hand-made answers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_clean

from advgen.evaluation.whitebox import BucketRule, assign_buckets, evaluate_variant, load_clean, open_variant
from advgen.storage.shards import file_digest, read_stats
from advgen.storage.variants import finalize, write_shard


def _variant(root, clean, direction: str, columns: dict[str, np.ndarray]):
    """A variant written by hand: the clean test images stored as they are, with manifests saying ``columns``."""
    from advgen.storage.shards import read_split

    stats = read_stats(clean, kind="clean")
    x, y, keys = read_split(clean, stats, "test")
    folder = root / "adv" / "hand" / "eps=0.1"
    folder.mkdir(parents=True)
    lo = 0
    for name in stats["shards"]["test"]:
        n = 8
        sl = slice(lo, lo + n)
        cols = {"index": np.array([int(k) for k in keys[sl]], np.int32), "label": y[sl].numpy().astype(np.int16),
                **{k: v[sl] for k, v in columns.items()}}
        write_shard(folder / name, keys=keys[sl], labels=y[sl].numpy(), images=x[sl].permute(0, 2, 3, 1).numpy(),
                    floats=None, columns=cols, fingerprint="hand")
        lo += n
    base = {"format_version": 2, "dataset": "mnist", "method": "hand", "eps": 0.1, "norm": "linf",
            "direction": direction, "label_source": "true", "seed": 0, "params": {}, "store_float": False,
            "rounding_audit": True, "device": "cpu", "versions": {}, "shape": stats["shape"],
            "classes": stats["classes"], "clean_stats_sha256": file_digest(clean / "_stats.json"),
            "victim": {"arch": "mlp", "dataset": "mnist", "sha256": "0" * 64, "test_accuracy": 1.0}}
    finalize(folder, shards={"test": stats["shards"]["test"]}, fingerprint="hand", stats_base=base,
             render_card=lambda st: "---\n---\n")
    return folder, y.numpy()


@pytest.mark.parametrize("direction", ["adversarial", "cooperative"])
def test_rounding_that_flips_outcomes_is_counted_on_both_sides(tmp_path, direction):
    clean = tiny_clean(tmp_path, train=16, test=24, shard_size=8)
    stats = read_stats(clean, kind="clean")
    from advgen.storage.shards import read_split

    _, labels, _ = read_split(clean, stats, "test")
    y = labels.numpy()
    n = len(y)
    other = (y + 1) % 10
    clean_pred = y.copy()
    clean_pred[:4] = other[:4]  # 4 images wrong when clean
    # Float predictions: images 4..15 fooled (or, cooperative: fixed); stored: rounding undid 6 of them
    # (images 4..9) and, the other way round, made image 20 (wrong as float) succeed.
    float_pred = clean_pred.copy()
    stored = clean_pred.copy()
    if direction == "adversarial":
        float_pred[4:16] = other[4:16]
        stored[10:16] = other[10:16]
        stored[20] = other[20]
    else:
        float_pred[:4] = y[:4]
        stored[2:4] = y[2:4]
    success = (stored != y) if direction == "adversarial" else (stored == y)
    fsuccess = (float_pred != y) if direction == "adversarial" else (float_pred == y)
    columns = {
        "clean_pred": clean_pred.astype(np.int16), "clean_conf": np.full(n, 0.9, np.float32),
        "adv_pred": stored.astype(np.int16), "adv_conf": np.full(n, 0.8, np.float32), "success": success,
        "linf": np.zeros(n, np.float32), "l2": np.zeros(n, np.float32),
        "float_pred": float_pred.astype(np.int16), "rounding_changed": success != fsuccess,
    }
    folder, _ = _variant(tmp_path, clean, direction, columns)
    st = open_variant(folder, clean_dir=clean)
    result, _ = evaluate_variant(folder, st, {"test": load_clean(clean, stats, "test")})
    s = result["splits"]["test"]
    assert s["accuracy"] == pytest.approx(np.mean(stored == y))
    assert s["float_accuracy"] == pytest.approx(np.mean(float_pred == y))
    assert s["fooling_rate"] == pytest.approx(np.mean(stored != clean_pred))
    assert s["float_fooling_rate"] == pytest.approx(np.mean(float_pred != clean_pred))
    assert s["rounding_changed"] == int((success != fsuccess).sum())
    if direction == "adversarial":
        # misclassified: the 4 wrong when clean, plus 12 as float / 6 + 1 as stored
        assert s["success_rate"] == pytest.approx(11 / 24) and s["float_success_rate"] == pytest.approx(16 / 24)
        assert s["rounding_changed"] == 7  # six undone, one made
    else:
        # clean error 4/24; float fixes all 4 (error 0), stored fixes 2 (error 2/24)
        assert s["error_rate_reduction"] == pytest.approx(0.5) and s["float_error_rate_reduction"] == pytest.approx(1.0)


def test_possas_buckets_with_fixed_thresholds_correct_only_and_a_seeded_sample():
    conf = np.array([0.10, 0.14, 0.15, 0.20, 0.29, 0.30, 0.31, 0.90, 0.12, 0.50, 0.05, 0.25])
    ok = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1], bool)
    b, used = assign_buckets(conf, ok, BucketRule(thresholds=(0.15, 0.30)))
    assert used == (0.15, 0.30)
    assert b.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 0, 2, 0, 1]  # < 0.15, [0.15, 0.30), >= 0.30
    b, _ = assign_buckets(conf, ok, BucketRule(thresholds=(0.15, 0.30), correct_only=True))
    assert b.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, -1, -1, 0, 1]  # the two wrong images take no part
    b1, _ = assign_buckets(conf, ok, BucketRule(thresholds=(0.15, 0.30), correct_only=True, per_bucket=2, seed=3))
    b2, _ = assign_buckets(conf, ok, BucketRule(thresholds=(0.15, 0.30), correct_only=True, per_bucket=2, seed=3))
    assert b1.tolist() == b2.tolist()  # seeded
    for k in range(3):
        chosen = np.flatnonzero(b1 == k)
        assert len(chosen) == 2 and set(chosen) <= set(np.flatnonzero(b == k))
