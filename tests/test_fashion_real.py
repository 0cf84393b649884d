"""Real Fashion-MNIST from Debian's dataset-fashion-mnist package, when installed (CI installs it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FASHION_DEB
from advgen.data.clean import load_clean_split, open_clean
from advgen.data.datasets import DATASETS, load_source, locate
from advgen.stages.cli import app

pytestmark = pytest.mark.skipif(not FASHION_DEB.is_dir(), reason="dataset-fashion-mnist is not installed")


def test_prepare_real_fashion_mnist(tmp_path):
    out = tmp_path / "fashion_mnist" / "clean"
    result = CliRunner().invoke(app, ["prepare", "--dataset", "fashion_mnist", "--out", str(out), "--no-download"])
    assert result.exit_code == 0, result.output
    stats = open_clean(out, dataset="fashion_mnist")  # also re-checks every shard's sha256
    assert stats["counts"] == {"train": 60000, "test": 10000}
    assert stats["source"]["verification"] == "decoded content (sha256)"
    assert {s: len(v) for s, v in stats["shards"].items()} == {"train": 48, "test": 8}

    spec = DATASETS["fashion_mnist"]
    source = load_source(spec, locate(spec, [FASHION_DEB]))
    for split in ("train", "test"):
        x, y, keys = load_clean_split(out, stats, split)
        assert keys[0] == "000000" and keys[-1] == f"{stats['counts'][split] - 1:06d}"
        np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), source.images[split])
        np.testing.assert_array_equal(y.numpy(), source.labels[split])
    assert np.bincount(source.labels["test"]).tolist() == [1000] * 10
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "60000 train, 10000 test" in card
    assert json.loads((out / "_stats.json").read_text())["source"]["content_sha256"] == spec.content_sha256
