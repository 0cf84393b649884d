"""Universal adversarial perturbations: one δ per (victim, ξ), fitted on training images, added to every image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_split_by_hand, tiny_clean
from typer.testing import CliRunner

from advgen.attacks import fit_uap, fooling_rate, uap
from advgen.stages.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    from advgen.data.clean import load_clean_split, open_clean
    from advgen.victims.train import Recipe, train_victim
    from advgen.victims import save

    root = tmp_path_factory.mktemp("uap")
    clean = tiny_clean(root, train=96, test=48, shard_size=16)
    x, y, _ = load_clean_split(clean, open_clean(clean), "train")
    model, _ = train_victim("mlp", dataset="mnist", num_classes=10, x=x, y=y,
                            recipe=Recipe(epochs=3, batch_size=16, lr=0.05), seed=0, device=torch.device("cpu"),
                            crop_pad=0, flip=False)
    model.meta.test_accuracy = 1.0
    save(model, root / "mlp.pt")
    return root


def _generate(setup: Path, out: Path, *extra: str):
    result = runner.invoke(app, ["generate", "--victim-ckpt", str(setup / "mlp.pt"), "--clean", str(setup / "clean"),
                                 "--out", str(out), "--method", "uap", "--uap-images", "64", "--uap-passes", "2", "--device", "cpu",
                                 "--workers", "0", *extra])
    assert result.exit_code == 0, result.output
    return result


def test_one_delta_for_every_image_inside_the_ball_and_rounded_as_every_copy(setup, tmp_path):
    out = tmp_path / "adv"
    _generate(setup, out, "--eps", "0.2")
    folder = out / "uap" / "eps=0.2"
    delta = np.load(folder / "perturbation.npy", allow_pickle=False)
    assert delta.dtype == np.float32 and delta.shape == (1, 28, 28) and np.abs(delta).max() <= 0.2 + 1e-7
    stats = json.loads((folder / "_stats.json").read_text())
    assert set(stats["extras"]) == {"perturbation.npy", "perturbation.png", "perturbation.json"}
    assert stats["universal"]["fit_images"] == 64 and 0 <= stats["universal"]["fooling_rate_fit"] <= 1
    for split in ("train", "test"):
        keys, stored, _ = read_split_by_hand(folder, split)
        _, clean, _ = read_split_by_hand(setup / "clean", split)
        # The same δ on every image: clean + δ, clipped to [0, 1], rounded to nearest, inside the L∞ ball.
        want = np.clip(clean.astype(np.float64) / 255 + delta.transpose(1, 2, 0), 0, 1)
        want = np.rint(np.float32(want) * np.float32(255)).astype(np.int64)
        k = int(np.floor(0.2 * 255 + 1e-6))
        want = np.clip(want, clean.astype(np.int64) - k, clean.astype(np.int64) + k)
        np.testing.assert_array_equal(stored.astype(np.int64), want)
    card = (folder / "README.md").read_text()
    assert "perturbation.png" in card and "fooling rate" in card
    assert runner.invoke(app, ["verify", str(folder)]).exit_code == 0


def test_deterministic_and_reused_when_nothing_changed(setup, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _generate(setup, a, "--eps", "0.1")
    _generate(setup, b, "--eps", "0.1")
    for name in ("perturbation.npy", "perturbation.json", "_stats.json", "test-000000.tar"):
        assert (a / "uap/eps=0.1" / name).read_bytes() == (b / "uap/eps=0.1" / name).read_bytes(), name
    again = _generate(setup, a, "--eps", "0.1")
    assert "fitting the universal perturbation" not in again.stderr and "0 shard(s) computed" in again.stderr
    other = _generate(setup, a, "--eps", "0.1", "--seed", "1")  # another fitting set: fitted again
    assert "fitting the universal perturbation" in other.stderr


def test_fooling_rate_rises_with_the_radius():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).eval()
    x = torch.rand(300, 1, 6, 6)
    rates = []
    for eps in (0.02, 0.1, 0.3):
        fit = fit_uap(model, x, eps=eps, norm="linf", target_rate=1.0, max_passes=3)
        assert fit.delta.abs().max() <= eps + 1e-6
        rates.append(fooling_rate(model, x, fit.delta))
        assert rates[-1] == pytest.approx(fit.fooling_rate)
    assert rates[0] <= rates[1] <= rates[2] and rates[2] > rates[0]
    fit = fit_uap(model, x, eps=1.0, norm="l2", target_rate=1.0, max_passes=2)
    assert fit.delta.norm() <= 1.0 + 1e-5
    with torch.no_grad():  # the hand-computed fooling rate: labels that changed, whatever the true label
        changed = (model(x).argmax(1) != model(uap(x, delta=fit.delta)).argmax(1)).float().mean().item()
    assert fooling_rate(model, x, fit.delta) == pytest.approx(changed)
