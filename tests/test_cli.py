"""The ``advgen`` CLI through typer's CliRunner (and once as a real process)."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import metadata

import pytest
from typer.testing import CliRunner

from conftest import WRITERS, small_spec
from advgen.data.clean import write_clean
from advgen.data.datasets import load_source, locate
from advgen.victims import load
from advgen.stages.cli import app

runner = CliRunner()


def _ok(args: list[str], **kw):
    result = runner.invoke(app, args, **kw)
    assert result.exit_code == 0, result.output
    return result


def _fails(args: list[str], message: str, **kw) -> str:
    """Run a command that must fail with exit 2 and one clear line on stderr."""
    result = runner.invoke(app, args, **kw)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("advgen")]
    assert len(lines) == 1 and lines[0].startswith(f"advgen {args[0]}: error: "), err
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def mnist_clean(mnist_mirror, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mnist" / "clean"
    result = _ok(["prepare", "--dataset", "mnist", "--out", str(out), "--mirror", str(mnist_mirror),
                  "--limit", "300", "--verify", "structure", "--no-download"])
    assert "300 train, 300 test images" in result.stdout
    return out


@pytest.fixture(scope="module")
def mnist_mlp(mnist_clean):
    ckpt = mnist_clean.parent / "victims" / "mlp.pt"
    metrics = mnist_clean.parent / "metrics.json"
    _ok(["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(mnist_clean), "--out", str(ckpt),
         "--metrics", str(metrics), "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--seed", "1",
         "--device", "cpu"])
    return ckpt, metrics


def test_prepare_writes_complete_output(mnist_clean):
    stats = json.loads((mnist_clean / "_stats.json").read_text())
    assert stats["counts"] == {"train": 300, "test": 300} and stats["full_counts"] == {"train": 60000, "test": 10000}
    assert stats["limit"] == 300 and stats["source"]["verification"] == "unverified"
    assert len(stats["shards"]["train"]) >= 8 and len(stats["shards"]["test"]) >= 8
    assert (mnist_clean.parent / "raw").exists() is False  # found in the mirror, nothing downloaded


def test_mirror_from_environment(mnist_mirror, tmp_path):
    _ok(["prepare", "--dataset", "mnist", "--out", str(tmp_path / "c"), "--limit", "16", "--verify", "structure",
         "--no-download"], env={"ADVGEN_MIRROR": str(mnist_mirror)})
    assert (tmp_path / "c" / "_stats.json").exists()


def test_train_writes_checkpoint_and_metrics(mnist_mlp):
    ckpt, metrics = mnist_mlp
    m = json.loads(metrics.read_text())
    for key in ("test_accuracy", "train_seconds", "epochs", "device"):
        assert key in m
    assert m["epochs"] == 3 and m["device"] == "cpu" and 0.9 <= m["test_accuracy"] <= 1.0
    model = load(ckpt, dataset="mnist")
    assert model.meta.test_accuracy == pytest.approx(m["test_accuracy"], abs=1e-6)
    assert model.meta.train["epochs"] == 3 and model.meta.train["seed"] == 1
    assert model.meta.train["train_count"] == 300
    assert model.meta.versions["torch"] == metadata.version("torch")


def test_inspect_reports_and_rescores(mnist_mlp, mnist_clean):
    ckpt, metrics = mnist_mlp
    result = _ok(["inspect", "--ckpt", str(ckpt), "--clean", str(mnist_clean)])
    info = json.loads(result.stdout)
    assert info["arch"] == "mlp" and info["dataset"] == "mnist"
    assert info["measured_test_accuracy"] == pytest.approx(json.loads(metrics.read_text())["test_accuracy"], abs=1e-6)


@pytest.fixture(scope="module")
def cifar_clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    spec = small_spec("cifar10")
    WRITERS["cifar10"](root / "raw", spec)
    write_clean(load_source(spec, locate(spec, [root / "raw"]), allow_unverified=True), root / "clean")
    return root / "clean"


def test_wrong_dataset_checkpoint(mnist_mlp, cifar_clean):
    _fails(["inspect", "--ckpt", str(mnist_mlp[0]), "--clean", str(cifar_clean)],
           "trained on mnist, but the data here is cifar10")


def test_train_on_another_datasets_shards(cifar_clean, tmp_path):
    _fails(["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(cifar_clean),
            "--out", str(tmp_path / "v.pt"), "--metrics", str(tmp_path / "m.json")],
           "holds cifar10 shards, but the dataset asked for is mnist")
    assert not (tmp_path / "v.pt").exists()


def test_unknown_names(tmp_path, mnist_clean):
    _fails(["prepare", "--dataset", "imagenet", "--out", str(tmp_path)], "unknown dataset 'imagenet'; known: cifar10")
    _fails(["train", "--dataset", "mnist", "--victim", "vgg", "--clean", str(mnist_clean),
            "--out", str(tmp_path / "v.pt"), "--metrics", str(tmp_path / "m.json")],
           "unknown victim 'vgg'; known: alexnet, alexnet_paper, efficientnet_b0, mlp, resnet18, simple_cnn")


def test_out_of_range_parameters(tmp_path, mnist_clean):
    _fails(["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(mnist_clean), "--epochs", "0",
            "--out", str(tmp_path / "v.pt"), "--metrics", str(tmp_path / "m.json")], "--epochs must be >= 1")
    _fails(["prepare", "--dataset", "mnist", "--out", str(tmp_path / "c"), "--verify", "maybe"],
           "--verify must be checksum or structure")


def test_missing_mirror_and_missing_dataset(tmp_path):
    _fails(["prepare", "--dataset", "mnist", "--out", str(tmp_path / "c"), "--mirror", str(tmp_path / "nope")],
           f"mirror folder {tmp_path / 'nope'} does not exist")
    (tmp_path / "empty").mkdir()
    line = _fails(["prepare", "--dataset", "svhn", "--out", str(tmp_path / "c"), "--mirror", str(tmp_path / "empty"),
                   "--no-download"], "SVHN (cropped digits, without extra) not found")
    assert "train_32x32.mat" in line and "(download disabled)" in line
    assert not (tmp_path / "c").exists()


def test_corrupt_file_names_the_file(mnist_mirror, tmp_path):
    mirror = tmp_path / "m"
    shutil.copytree(mnist_mirror, mirror)
    labels = mirror / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:40])
    _fails(["prepare", "--dataset", "mnist", "--out", str(tmp_path / "c"), "--mirror", str(mirror),
            "--no-download"], f"{labels}: broken gzip stream")
    assert not (tmp_path / "c").exists()


def test_unverified_copy_refused_without_flag(mnist_mirror, tmp_path):
    _fails(["prepare", "--dataset", "mnist", "--out", str(tmp_path / "c"), "--mirror", str(mnist_mirror),
            "--no-download"], "pass --verify structure")


def test_missing_clean_folder(tmp_path):
    _fails(["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(tmp_path / "none"),
            "--out", str(tmp_path / "v.pt"), "--metrics", str(tmp_path / "m.json")], "no such folder")


def test_console_script_error_is_one_line(cli_env, tmp_path):
    proc = subprocess.run(["advgen", "prepare", "--dataset", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=cli_env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["advgen prepare: error: unknown dataset 'nope'; known: "
                                                "cifar10, cifar100, fashion_mnist, mnist, svhn"]
