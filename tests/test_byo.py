"""Bring your own model: TorchScript, torch.export and ``module:factory`` victims in generate and evaluate.

The model is a tiny linear classifier (tests/byo_factory.py) saved three ways; the tests check what
the variants record against independent computations: sha256 of the files (or of the factory name
and weights, as advgen.models documents), and the model's own predictions on the clean images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_split_by_hand, tiny_clean
from typer.testing import CliRunner

import byo_factory
from advgen.stages.cli import app

runner = CliRunner()
SHAPE = ["--input-shape", "1,28,28", "--num-classes", "10"]


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    tiny_clean(root, train=16, test=16, shard_size=8)
    torch.manual_seed(0)
    net = byo_factory.Net().eval()
    torch.jit.script(net).save(str(root / "model.pt"))
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},)),
                      str(root / "model.pt2"))
    torch.save(net.state_dict(), root / "weights.pt")
    torch.manual_seed(1)
    torch.jit.script(byo_factory.Net().eval()).save(str(root / "other.pt"))
    return root


# How a user runs each saved model, without advgen.
def _run_torchscript(root: Path):
    return torch.jit.load(str(root / "model.pt"))


def _run_export(root: Path):
    return torch.export.load(str(root / "model.pt2")).module()


def _run_factory(root: Path):
    net = byo_factory.make()
    net.load_state_dict(torch.load(root / "weights.pt", weights_only=True))
    return net.eval()


KINDS = {
    "torchscript": (lambda r: ["--model", str(r / "model.pt")], "torchscript:model.pt",
                    lambda r: hashlib.sha256((r / "model.pt").read_bytes()).hexdigest(), _run_torchscript),
    "export": (lambda r: ["--model", str(r / "model.pt2")], "export:model.pt2",
               lambda r: hashlib.sha256((r / "model.pt2").read_bytes()).hexdigest(), _run_export),
    "factory": (lambda r: ["--factory", "byo_factory:make", "--state-dict", str(r / "weights.pt")],
                "factory:byo_factory:make",
                lambda r: hashlib.sha256(b"byo_factory:make\0" + (r / "weights.pt").read_bytes()).hexdigest(),
                _run_factory),
}


def _generate(root: Path, out: Path, *victim: str):
    return runner.invoke(app, ["generate", *victim, "--clean", str(root / "clean"), "--out", str(out),
                               "--method", "fgsm", "--eps", "0.1", "--split", "test", "--device", "cpu",
                               "--batch-size", "5", "--workers", "0"])


def _evaluate(root: Path, adv: Path, out: Path, *victim: str):
    return runner.invoke(app, ["evaluate", "--adv", str(adv), "--clean", str(root / "clean"), *victim,
                               "--metrics", str(out / "metrics.json"), "--plots", str(out / "plots"),
                               "--samples", str(out / "samples.parquet")])


def _refused(result, command: str, message: str) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("advgen")]
    assert len(lines) == 1 and lines[0].startswith(f"advgen {command}: error: "), result.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_and_evaluate_with_your_own_model(byo, tmp_path, kind):
    args, arch, sha, run = KINDS[kind]
    out = tmp_path / "adv"
    result = _generate(byo, out, *args(byo), *SHAPE)
    assert result.exit_code == 0, result.output
    folder = out / "fgsm" / "eps=0.1"
    stats = json.loads((folder / "_stats.json").read_text())
    assert stats["victim"] == {"arch": arch, "dataset": "mnist", "sha256": sha(byo), "test_accuracy": None}
    card = (folder / "README.md").read_text()
    assert f"`{arch}`" in card and sha(byo) in card and "clean test accuracy not recorded." in card

    # The manifest's clean predictions are the model's own, computed here without advgen.
    _, x, _ = read_split_by_hand(byo / "clean", "test")
    with torch.no_grad():
        logits = run(byo)(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    manifests = sorted(folder.glob("test-*.parquet"))
    clean_pred = np.concatenate([pq.read_table(p)["clean_pred"].to_numpy() for p in manifests])
    assert len(clean_pred) == 16 and np.array_equal(clean_pred, logits.argmax(1).numpy())

    ok = _evaluate(byo, out, tmp_path / "ev", *args(byo), *SHAPE)
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["victim"]["sha256"] == sha(byo)
    refused = _evaluate(byo, out, tmp_path / "ev2", "--model", str(byo / "other.pt"), *SHAPE)
    _refused(refused, "evaluate", "was generated on another victim")
    assert not (tmp_path / "ev2").exists()

    verified = runner.invoke(app, ["verify", str(folder)])
    assert verified.exit_code == 0, verified.output


def test_probabilities_are_a_warning_not_an_error(byo, tmp_path):
    result = _generate(byo, tmp_path / "adv", "--factory", "byo_factory:make_probabilities", *SHAPE)
    assert result.exit_code == 0, result.output
    assert "outputs look like probabilities" in result.stderr


def test_export_with_a_fixed_batch_size_is_refused(byo, tmp_path):
    net = byo_factory.Net().eval()
    torch.export.save(torch.export.export(net, (torch.zeros(3, 1, 28, 28),)), str(tmp_path / "fixed.pt2"))
    result = _generate(byo, tmp_path / "adv", "--model", str(tmp_path / "fixed.pt2"), *SHAPE)
    _refused(result, "generate", "needs a dynamic batch dimension")
    assert not (tmp_path / "adv").exists()


def test_export_in_training_mode_is_refused(byo, tmp_path):
    net = torch.nn.Sequential(byo_factory.Net(), torch.nn.Dropout(0.5)).train()  # exported graphs keep their mode
    program = torch.export.export(net, (torch.zeros(2, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "dropout.pt2"))
    result = _generate(byo, tmp_path / "adv", "--model", str(tmp_path / "dropout.pt2"), *SHAPE)
    _refused(result, "generate", "two forward passes on the same images differ")
    assert not (tmp_path / "adv").exists()


BAD = {
    "missing file": (["--model", "{root}/nowhere.pt", *SHAPE], "nowhere.pt: no such file (--model)"),
    "not a model": (["--model", "{root}/weights.pt", *SHAPE], "not a TorchScript file"),
    "factory not importable": (["--factory", "no_such_module_here:make", *SHAPE],
                               "cannot import no_such_module_here (ModuleNotFoundError"),
    "factory attribute": (["--factory", "byo_factory:nope", *SHAPE], "byo_factory has no attribute 'nope'"),
    "factory not a module": (["--factory", "byo_factory:not_a_module", *SHAPE], "returned a int, expected"),
    "wrong input shape": (["--model", "{root}/model.pt", "--input-shape", "3,28,28", "--num-classes", "10"],
                          "--input-shape 3,28,28 differs from the clean mnist images, which are 1,28,28"),
    "malformed input shape": (["--model", "{root}/model.pt", "--input-shape", "28,28", "--num-classes", "10"],
                              "--input-shape takes C,H,W"),
    "wrong class count": (["--model", "{root}/model.pt", "--input-shape", "1,28,28", "--num-classes", "5"],
                          "--num-classes 5, but the clean mnist folder has 10 classes"),
    "outputs of another class count": (["--factory", "byo_factory:make_five", *SHAPE],
                                       "returns outputs of shape (3, 5) for 3 images, expected (3, 10) logits"),
    "weights that do not fit": (["--factory", "byo_factory:make_five", "--state-dict", "{root}/weights.pt", *SHAPE],
                                "weights do not fit byo_factory:make_five()"),
    "checkpoint and model": (["--victim-ckpt", "{root}/model.pt", "--model", "{root}/model.pt", *SHAPE],
                             "give one victim, not --victim-ckpt and --model"),
    "no victim": ([], "give the victim: --victim-ckpt FILE"),
    "shape missing": (["--model", "{root}/model.pt"], "--model needs --input-shape C,H,W and --num-classes N"),
    "state dict without factory": (["--model", "{root}/model.pt", "--state-dict", "{root}/weights.pt", *SHAPE],
                                   "--state-dict goes with --factory"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_victim_options_are_one_line(byo, tmp_path, case):
    args, message = BAD[case]
    result = _generate(byo, tmp_path / "adv", *(a.format(root=byo) for a in args))
    _refused(result, "generate", message)
    assert not (tmp_path / "adv").exists()


def test_evaluate_refuses_two_victims(byo, tmp_path):
    result = _evaluate(byo, tmp_path, tmp_path / "ev", "--victim-ckpt", str(byo / "model.pt"),
                       "--factory", "byo_factory:make")
    _refused(result, "evaluate", "give one victim, not --victim-ckpt and --factory")
    assert not (tmp_path / "ev").exists()
