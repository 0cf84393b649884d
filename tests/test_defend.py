"""Input-defense sweeps: scaled perturbations and defended accuracy by hand, and ``advgen defend`` end to end.

Images are decoded here with ``tarfile`` and Pillow, blurs recomputed with
``scipy.ndimage.gaussian_filter`` and accuracies with ``model(x).argmax``.
"""

from __future__ import annotations

import csv
import json
from itertools import product
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_split_by_hand, tiny_clean
from scipy.ndimage import gaussian_filter
from torch import nn
from typer.testing import CliRunner

from advgen.evaluation.defend import defended_accuracy, scale_perturbation
from advgen.defenses import GaussianBlur, Resample
from advgen.victims import build, load
from advgen.stages.cli import app

runner = CliRunner()
CPU = torch.device("cpu")


# --- scale_perturbation ---------------------------------------------------------------------------

def _u8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(1, 1, 1, -1)


def test_scale_one_is_the_adversarial_image_and_zero_the_clean_one():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (3, 1, 4, 4), generator=g, dtype=torch.uint8)
    adv = torch.randint(0, 256, (3, 1, 4, 4), generator=g, dtype=torch.uint8)
    assert torch.equal(scale_perturbation(clean, adv, 1.0), adv)
    assert torch.equal(scale_perturbation(clean, adv, 0.0), clean)
    assert scale_perturbation(clean, adv, 2.5).dtype == torch.uint8


def test_scale_by_hand_clips_and_rounds_to_nearest():
    clean = _u8([100, 100, 100, 250, 5, 0, 255, 128])
    adv = _u8([101, 99, 110, 255, 0, 0, 255, 131])
    # δ:          1   -1   10    5  -5   0    0    3
    assert scale_perturbation(clean, adv, 2.0).flatten().tolist() == [102, 98, 120, 255, 0, 0, 255, 134]
    # 0.4·δ: .4 → 0, -.4 → 0, 4, 2, -2, 0, 0, 1.2 → 1
    assert scale_perturbation(clean, adv, 0.4).flatten().tolist() == [100, 100, 104, 252, 3, 0, 255, 129]
    # 0.6·δ: .6 → 1 (to nearest, never truncated), -.6 → -1, 6, 3, -3, 0, 0, 1.8 → 2
    assert scale_perturbation(clean, adv, 0.6).flatten().tolist() == [101, 99, 106, 253, 2, 0, 255, 130]
    # A negative factor reverses δ, clipped at both ends.
    assert scale_perturbation(clean, adv, -30.0).flatten().tolist() == [70, 130, 0, 100, 155, 0, 255, 38]


# --- defended_accuracy ----------------------------------------------------------------------------

def _tiny_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build("mlp", dataset="synthetic", input_shape=(1, 12, 12), num_classes=10, mean=[0.5], std=[0.5]).eval()


def _half_right(pred: torch.Tensor) -> torch.Tensor:
    """Labels that agree with ``pred`` at odd indices only: accuracy exactly (N // 2) / N."""
    y = pred.clone()
    y[::2] = (pred[::2] + 1) % 10
    return y


def test_defended_accuracy_with_an_identity_defense_is_plain_accuracy():
    model = _tiny_model()
    x = torch.randint(0, 256, (13, 1, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        pred = model(x.float() / 255).argmax(1)
    y = _half_right(pred)
    for defense in (GaussianBlur(0), nn.Identity(), Resample(12)):
        for batch_size in (5, 256):  # a ragged last batch, and one batch
            assert defended_accuracy(model, defense, x, y, device=CPU, batch_size=batch_size) == 6 / 13


def test_defended_accuracy_behind_a_blur_is_accuracy_on_scipy_blurred_images():
    model = _tiny_model()
    x = torch.randint(0, 256, (13, 1, 12, 12), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    blurred = np.stack([gaussian_filter(im.astype(np.float64) / 255, 1.0, mode="reflect") for im in x[:, 0].numpy()])
    with torch.no_grad():
        pred = model(torch.from_numpy(blurred).float()[:, None]).argmax(1)
        plain = model(x.float() / 255).argmax(1)
    assert not torch.equal(pred, plain)  # the blur changes some decisions
    y = _half_right(pred)
    assert defended_accuracy(model, GaussianBlur(1.0), x, y, device=CPU, batch_size=4) == 6 / 13


# --- advgen defend --------------------------------------------------------------------------------

def _read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N×C×H×W, labels) of ``split-*.tar`` in ``folder``, via tarfile and Pillow."""
    _, images, labels = read_split_by_hand(folder, split)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x.float() / 255).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """root/clean (mnist 48 + 24), root/victim.pt, root/retrained/finetune.pt (another seed),
    root/adv/fgsm/eps=0.1 (test split) and root/adv_train/fgsm/eps=0.1 (train split only)."""
    root = tmp_path_factory.mktemp("defend")
    tiny_clean(root)
    for seed, out in ((0, root / "victim.pt"), (1, root / "retrained" / "finetune.pt")):
        result = runner.invoke(app, ["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(root / "clean"),
                                     "--out", str(out), "--metrics", str(root / f"train{seed}.json"), "--epochs", "1",
                                     "--batch-size", "8", "--lr", "0.01", "--seed", str(seed), "--device", "cpu"])
        assert result.exit_code == 0, result.output
    for out, split in (("adv", "test"), ("adv_train", "train")):
        result = runner.invoke(app, ["generate", "--victim-ckpt", str(root / "victim.pt"), "--clean", str(root / "clean"),
                                     "--out", str(root / out), "--method", "fgsm", "--eps", "0.1", "--split", split,
                                     "--device", "cpu", "--workers", "0"])
        assert result.exit_code == 0, result.output
    return root


def _defend(root: Path, out: Path, *extra: str, adv: str = "adv/fgsm/eps=0.1", retrained: str = "retrained",
            sigma=("0", "1"), factor=("0.5",)):
    return runner.invoke(app, [
        "defend", "--victim-ckpt", str(root / "victim.pt"), "--retrained", str(root / retrained),
        "--clean", str(root / "clean"), "--adv", str(root / adv), "--metrics", str(out / "metrics.json"),
        "--plots", str(out / "plots"), *[a for s in sigma for a in ("--sigma", s)],
        *[a for f in factor for a in ("--resample-factor", f)], "--scale", "1", "--scale", "2",
        "--adaptive-method", "fgsm", "--adaptive-eps", "0.1", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def defended(folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("defended")
    result = _defend(folders, out)
    assert result.exit_code == 0, result.output
    return out


ADV = "fgsm ε=0.1 (mlp)"
SETTINGS = [("gaussian", 0.0), ("gaussian", 1.0), ("resample", 14.0)]  # 0.5 × 28 px
MODELS = ["finetune", "original"]


def _rows(defended: Path) -> list[dict]:
    """The rows of the two defenses this file sweeps (any other registered defense runs its default sweep too;
    tests/test_registry.py covers those)."""
    return [r for r in json.loads((defended / "metrics.json").read_text())["rows"]
            if r["defense"] in ("gaussian", "resample")]


def test_rows_cover_every_model_setting_and_data_set_once(defended):
    rows = _rows(defended)
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    sweep = sorted((r["model"], r["defense"], r["value"], r["data"]) for r in rows
                   if "scale" not in r and not r["data"].startswith("adaptive"))
    assert sweep == sorted((m, d, v, data) for m, (d, v), data in product(MODELS, SETTINGS, ["clean", ADV]))
    adaptive = sorted((r["model"], r["defense"], r["value"], r["data"]) for r in rows if r["data"].startswith("adaptive"))
    assert adaptive == sorted((m, d, v, "adaptive fgsm ε=0.1") for m, (d, v) in product(MODELS, SETTINGS[1:]))
    scaled = sorted((r["model"], r["defense"], r["value"], r["scale"], r["data"]) for r in rows if "scale" in r)
    assert scaled == sorted((m, d, v, f, f"{ADV} ×{f:g}") for m, (d, v), f in product(MODELS, SETTINGS, [1.0, 2.0]))
    assert len(rows) == len(sweep) + len(adaptive) + len(scaled)


def test_accuracies_agree_with_an_independent_look(folders, defended):
    rows = json.loads((defended / "metrics.json").read_text())["rows"]

    def row(model, defense, value, data):
        (hit,) = [r["accuracy"] for r in rows if (r["model"], r["defense"], r["value"], r["data"]) == (model, defense, value, data)]
        return hit

    xt, yt = _read_split(folders / "clean", "test")
    ax, ay = _read_split(folders / "adv" / "fgsm" / "eps=0.1", "test")
    assert torch.equal(ay, yt)
    models = {"original": load(folders / "victim.pt"), "finetune": load(folders / "retrained" / "finetune.pt")}
    blurred = torch.from_numpy(np.stack([gaussian_filter(im.astype(np.float64) / 255, 1.0, mode="reflect")
                                         for im in xt[:, 0].numpy()])).float()[:, None]
    twice = (2 * ax.double() - xt.double()).round().clamp(0, 255).to(torch.uint8)  # clean + 2δ
    for name, model in models.items():
        clean = _accuracy(model, xt, yt)
        assert row(name, "gaussian", 0.0, "clean") == pytest.approx(clean)
        assert row(name, "gaussian", 0.0, ADV) == pytest.approx(_accuracy(model, ax, yt))
        assert row(name, "gaussian", 0.0, f"{ADV} ×1") == pytest.approx(_accuracy(model, ax, yt))
        assert row(name, "gaussian", 0.0, f"{ADV} ×2") == pytest.approx(_accuracy(model, twice, yt))
        with torch.no_grad():
            assert row(name, "gaussian", 1.0, "clean") == pytest.approx((model(blurred).argmax(1) == yt).float().mean().item())
    # The original victim made the variant: its undefended accuracy there is the manifests' own.
    manifest = [pq.read_table(p).to_pydict() for p in sorted((folders / "adv/fgsm/eps=0.1").glob("test-*.parquet"))]
    stored = np.mean([p == lab for m in manifest for p, lab in zip(m["adv_pred"], m["label"])])
    assert row("original", "gaussian", 0.0, ADV) == pytest.approx(stored)
    assert 0 < stored < _accuracy(models["original"], xt, yt)  # the attack worked, not completely


def test_plot_tables(defended):
    rows = _rows(defended)
    expected = {
        "gaussian.csv": (["series", "model", "data", "value", "accuracy", "fooling_rate"],
                         [r for r in rows if r["defense"] == "gaussian" and "scale" not in r]),
        "resample.csv": (["series", "model", "data", "value", "accuracy", "fooling_rate"],
                         [r for r in rows if r["defense"] == "resample" and "scale" not in r]),
        "scaled.csv": (["model", "defense", "value", "scale", "accuracy"], [r for r in rows if "scale" in r]),
    }
    counts = {"gaussian.csv": 2 * 2 * 2 + 2, "resample.csv": 2 * 2 + 2, "scaled.csv": 2 * 3 * 2}
    for name, (header, want) in expected.items():
        with open(defended / "plots" / name, newline="") as f:
            got = list(csv.reader(f))
        if name == "scaled.csv":
            got = got[:1] + [g for g in got[1:] if g[1] in ("gaussian", "resample")]
        assert got[0] == header
        assert len(got) - 1 == len(want) == counts[name], name
        assert [["" if r[c] is None else str(r[c]) for c in header] for r in want] == got[1:]
    with open(defended / "plots" / "gaussian.csv", newline="") as f:
        assert all(r["series"] == f"{r['model']}: {r['data']}" for r in csv.DictReader(f))


def _refused(result, message: str, out: Path) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advgen defend: error: ") and message in lines[0], lines
    assert not (out / "metrics.json").exists() and not (out / "plots").exists()


@pytest.mark.parametrize(("sigma", "message"), [("-1", "sigma must be >= 0"), ("nan", "--sigma must be a finite number")])
def test_negative_sigma_is_refused_before_compute(folders, tmp_path, sigma, message):
    _refused(_defend(folders, tmp_path, sigma=("0", sigma)), message, tmp_path)


@pytest.mark.parametrize("factor", ["0", "1.5", "-0.5"])
def test_resample_factor_outside_0_1_is_refused(folders, tmp_path, factor):
    _refused(_defend(folders, tmp_path, factor=(factor,)), "--resample-factor must lie in (0, 1]", tmp_path)


def test_retrained_folder_without_checkpoints(folders, tmp_path):
    (folders / "empty").mkdir(exist_ok=True)
    _refused(_defend(folders, tmp_path, retrained="empty"), "no retrained checkpoints (*.pt) in", tmp_path)


def test_variant_without_a_test_split(folders, tmp_path):
    _refused(_defend(folders, tmp_path, adv="adv_train/fgsm/eps=0.1"), "has no test split", tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--adaptive-method", "cw"], "unknown method 'cw'"),
    (["--adaptive-eps", "1.5"], "must lie in [0, 1]"),
])
def test_bad_adaptive_attack_is_refused_before_compute(folders, tmp_path, extra, message):
    _refused(_defend(folders, tmp_path, *extra), message, tmp_path)


def test_fooling_rate_is_the_share_of_changed_predictions_behind_the_same_defense():
    from advgen.evaluation.defend import Setting, sweep

    model = _tiny_model()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (20, 1, 12, 12), generator=g, dtype=torch.uint8)
    adv = (x.int() + torch.randint(-60, 61, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    y = torch.zeros(20, dtype=torch.int64)
    rows = sweep({"m": model}, [Setting("gaussian", 0.0), Setting("gaussian", 1.0)],
                 {"clean": (x, y), "adv": (adv, y)}, device=CPU)
    blur = GaussianBlur(1.0)
    with torch.no_grad():
        for value, defense in ((0.0, nn.Identity()), (1.0, blur)):
            want = (model(defense(adv.float() / 255)).argmax(1) != model(defense(x.float() / 255)).argmax(1))
            row = next(r for r in rows if r["value"] == value and r["data"] == "adv")
            assert row["fooling_rate"] == pytest.approx(want.float().mean().item())
            assert next(r for r in rows if r["value"] == value and r["data"] == "clean")["fooling_rate"] is None
