"""Adversarial retraining: the training mix, the online attacks, that retraining helps, and ``advgen retrain``.

Accuracies are recomputed here from ``model(x).argmax`` on images decoded
independently; white-box figures from an FGSM written out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import pattern_images, read_split_by_hand, tiny_clean
from torch import nn
from typer.testing import CliRunner

from advgen import attacks
from advgen.errors import AdvgenError, BadParameter
from advgen.evaluation.retrain import MODES, mix, online_attack, retrain
from advgen.victims.train import Recipe, train_victim
from advgen.victims import load
from advgen.stages.cli import app

runner = CliRunner()
CPU = torch.device("cpu")


# --- mix ------------------------------------------------------------------------------------------

def _pools():
    """10 clean images whose pixels all equal their label, and 4 adversarial ones valued 100 + index."""
    clean_x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    clean_y = torch.arange(10)
    adv_x = (100 + torch.arange(4, dtype=torch.uint8)).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    adv_y = torch.tensor([3, 1, 4, 1])
    return clean_x, clean_y, adv_x, adv_y


def test_mix_takes_every_adversarial_image_and_ratio_times_as_many_clean_ones():
    clean_x, clean_y, adv_x, adv_y = _pools()
    x, y = mix(clean_x, clean_y, adv_x, adv_y, clean_ratio=0.5, seed=0)
    assert len(x) == len(y) == 4 + 2  # 0.5 × 4 adversarial images
    assert torch.equal(x[:4], adv_x) and torch.equal(y[:4], adv_y)
    picked = x[4:, 0, 0, 0].tolist()
    assert len(set(picked)) == 2 and set(picked) <= set(range(10))  # distinct clean images
    assert y[4:].tolist() == picked  # each with its own label
    assert (x[4:] == x[4:, :, :1, :1]).all()  # whole images, not mixed pixels

    x, y = mix(clean_x, clean_y, adv_x, adv_y, clean_ratio=1.0, seed=0)
    assert len(x) == 8 and len(set(x[4:, 0, 0, 0].tolist())) == 4


def test_mix_ratio_zero_is_adversarial_only_and_large_ratios_use_every_clean_image_once():
    clean_x, clean_y, adv_x, adv_y = _pools()
    x, y = mix(clean_x, clean_y, adv_x, adv_y, clean_ratio=0.0, seed=0)
    assert torch.equal(x, adv_x) and torch.equal(y, adv_y)
    x, y = mix(clean_x, clean_y, adv_x, adv_y, clean_ratio=3.0, seed=0)  # 12 wanted, 10 exist
    assert len(x) == 14
    assert sorted(x[4:, 0, 0, 0].tolist()) == list(range(10)) and y[4:].tolist() == x[4:, 0, 0, 0].tolist()


def test_mix_is_deterministic_in_its_seed():
    clean_x, clean_y, adv_x, adv_y = _pools()
    runs = [mix(clean_x, clean_y, adv_x, adv_y, clean_ratio=0.75, seed=s) for s in (0, 0, 1, 2, 3, 4)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert len({tuple(x[4:, 0, 0, 0].tolist()) for x, _ in runs}) > 1  # other seeds, other subsets


@pytest.mark.parametrize("ratio", [-0.5, float("nan")])
def test_mix_rejects_a_negative_ratio(ratio):
    clean_x, clean_y, adv_x, adv_y = _pools()
    with pytest.raises(BadParameter, match="--clean-ratio must be >= 0"):
        mix(clean_x, clean_y, adv_x, adv_y, clean_ratio=ratio, seed=0)


def test_mix_rejects_images_of_another_shape():
    clean_x, clean_y, adv_x, adv_y = _pools()
    with pytest.raises(BadParameter, match="do not match clean"):
        mix(clean_x, clean_y, adv_x[:, :, :1], adv_y, clean_ratio=1.0, seed=0)


# --- online attacks -------------------------------------------------------------------------------

class _Mean(nn.Module):
    """Logits (s, -s) with s the centred mean pixel: the loss gradient of label 0 is negative at every
    pixel, that of label 1 positive, so the sign of every step is known in advance."""

    def forward(self, x):
        s = x.flatten(1).mean(1) - 0.5
        return torch.stack([s, -s], dim=1)


def _inputs():
    x = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0  # pixels on the box's edges
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    return x, y


@pytest.mark.parametrize("kind", ["online_fgsm", "online_pgd"])
@pytest.mark.parametrize("eps", [0.03, 0.25])
def test_online_attacks_stay_in_the_ball_and_the_box(kind, eps):
    x, y = _inputs()
    model = _Mean().train()  # called while training, as in fit()
    attack = online_attack(kind, eps=eps, steps=5, step_size=None)
    out = attack(model, x, y, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and not out.requires_grad
    assert (out - x).abs().max() <= eps + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    again = attack(model, x, y, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # the generator is the only source of randomness


def test_online_fgsm_steps_1_25_eps_from_a_random_start():
    """FGSM-RS (Wong et al. 2020): x0 = x + U(-ε, ε), then 1.25ε along the gradient sign, projected.

    From anywhere in the ball, a 1.25ε step down leaves x0 - x ≤ -0.25ε, so every pixel moves
    down (label 0) by between 0.25ε and ε, less only where 0 clips it; label 1 mirrors this.
    """
    x, y = _inputs()
    eps = 0.2
    out = online_attack("online_fgsm", eps=eps, steps=1, step_size=None)(_Mean().train(), x, y,
                                                                         torch.Generator().manual_seed(3))
    down = (x - out)[y == 0]
    room = x[y == 0]  # how far a pixel can go down before 0
    assert (down <= eps + 1e-6).all()
    assert (down >= torch.minimum(room, torch.tensor(0.25 * eps)) - 1e-6).all()
    up, room = (out - x)[y == 1], 1 - x[y == 1]
    assert (up <= eps + 1e-6).all() and (up >= torch.minimum(room, torch.tensor(0.25 * eps)) - 1e-6).all()
    assert (down > 0.25 * eps + 1e-3).any()  # the random start shows: not every pixel moved the same


def test_online_pgd_reaches_the_corner_of_the_ball():
    """2.5ε of steps (Madry's default step size) from any start inside the ball ends at x ∓ ε, clipped."""
    x, y = _inputs()
    eps = 0.1
    out = online_attack("online_pgd", eps=eps, steps=7, step_size=None)(_Mean().train(), x, y,
                                                                       torch.Generator().manual_seed(0))
    sign = torch.where(y == 0, -1.0, 1.0).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, (x + sign * eps).clamp(0, 1), atol=1e-6, rtol=0)


def test_online_attack_refusals():
    with pytest.raises(AdvgenError, match="unknown online attack 'online_cw'"):
        online_attack("online_cw", eps=0.1, steps=1, step_size=None)
    for eps in (0.0, 1.5):
        with pytest.raises(BadParameter, match="0 < eps <= 1"):
            online_attack("online_fgsm", eps=eps, steps=1, step_size=None)
    with pytest.raises(BadParameter, match="--steps must be >= 1"):
        online_attack("online_pgd", eps=0.1, steps=0, step_size=None)
    with pytest.raises(AdvgenError, match="unknown retrain mode 'bogus'"):
        retrain("bogus", None, x=None, y=None, recipe=None, seed=0, device=CPU, crop_pad=0, flip=False)


# --- retraining helps -----------------------------------------------------------------------------

def _task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = pattern_images(n, (1, 28, 28), 10, seed)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x.float() / 255).argmax(1) == y).float().mean().item()


def _fgsm_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """x + ε·sign(∇ₓ CE) clipped to [0, 1] and rounded to uint8, written out without the library."""
    xf = (x.float() / 255).requires_grad_(True)
    F.cross_entropy(model(xf), y, reduction="sum").backward()
    return ((xf + eps * xf.grad.sign()).clamp(0, 1) * 255).round().to(torch.uint8).detach()


@pytest.fixture(scope="module")
def task():
    x, y = _task(320, 0)
    xt, yt = _task(200, 1)
    victim, _ = train_victim("mlp", dataset="synthetic", num_classes=10, x=x, y=y,
                             recipe=Recipe(epochs=3, batch_size=32, lr=0.05), seed=0, device=CPU, crop_pad=0,
                             flip=False)
    eps = 0.3

    def adv(xx, yy):
        out = attacks.run("fgsm", victim, xx.float() / 255, yy, eps=eps)
        return (out * 255).round().to(torch.uint8)

    return {"x": x, "y": y, "xt": xt, "yt": yt, "victim": victim, "eps": eps, "ax": adv(x, y), "axt": adv(xt, yt)}


def test_the_task_victim_is_accurate_on_clean_and_fooled_by_fgsm(task):
    assert _accuracy(task["victim"], task["xt"], task["yt"]) >= 0.95
    assert _accuracy(task["victim"], task["axt"], task["yt"]) <= 0.4


@pytest.mark.parametrize("mode", ["finetune", "scratch"])
def test_training_on_the_adversarial_mix_restores_accuracy_on_adversarial_test_images(task, mode):
    before = {k: v.clone() for k, v in task["victim"].state_dict().items()}
    x, y = mix(task["x"], task["y"], task["ax"], task["y"], clean_ratio=1.0, seed=0)
    model, stats = retrain(mode, task["victim"], x=x, y=y, recipe=Recipe(epochs=3, batch_size=32, lr=0.05),
                           seed=0, device=CPU, crop_pad=0, flip=False)
    assert model is not task["victim"] and not model.training
    assert all(torch.equal(v, before[k]) for k, v in task["victim"].state_dict().items())  # victim untouched
    original = _accuracy(task["victim"], task["axt"], task["yt"])
    assert _accuracy(model, task["axt"], task["yt"]) >= original + 0.4
    assert _accuracy(model, task["xt"], task["yt"]) >= 0.9  # without forgetting clean images
    assert stats.epochs == 3


@pytest.mark.parametrize("mode", ["online_fgsm", "online_pgd"])
def test_online_adversarial_training_resists_transferred_and_white_box_fgsm(task, mode):
    eps = task["eps"]
    model, _ = retrain(mode, task["victim"], x=task["x"], y=task["y"], recipe=Recipe(epochs=3, batch_size=32, lr=0.05),
                       seed=0, device=CPU, crop_pad=0, flip=False, eps=eps, steps=3)
    original = _accuracy(task["victim"], task["axt"], task["yt"])
    assert _accuracy(model, task["axt"], task["yt"]) >= original + 0.3
    own_original = _accuracy(task["victim"], _fgsm_by_hand(task["victim"], task["xt"], task["yt"], eps), task["yt"])
    own = _accuracy(model, _fgsm_by_hand(model, task["xt"], task["yt"], eps), task["yt"])
    assert own >= own_original + 0.3


# --- advgen retrain -------------------------------------------------------------------------------

def _read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N×C×H×W, labels) of ``split-*.tar`` in ``folder``, via tarfile and Pillow."""
    _, images, labels = read_split_by_hand(folder, split)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """root/clean (mnist 48 + 24), root/victim.pt (by `advgen train`), root/adv (fgsm ε=0.1, both splits),
    root/adv_test (the same, test split only)."""
    root = tmp_path_factory.mktemp("retrain")
    tiny_clean(root)
    trained = runner.invoke(app, ["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(root / "clean"),
                                  "--out", str(root / "victim.pt"), "--metrics", str(root / "train.json"),
                                  "--epochs", "2", "--batch-size", "8", "--lr", "0.02", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    for out, splits in (("adv", ["train", "test"]), ("adv_test", ["test"])):
        result = runner.invoke(app, ["generate", "--victim-ckpt", str(root / "victim.pt"), "--clean", str(root / "clean"),
                                     "--out", str(root / out), "--method", "fgsm", "--eps", "0.1",
                                     *[a for s in splits for a in ("--split", s)], "--device", "cpu", "--workers", "0"])
        assert result.exit_code == 0, result.output
    return root


def _retrain(root: Path, out: Path, *extra: str, adv: str = "adv/fgsm/eps=0.1"):
    return runner.invoke(app, ["retrain", "--victim-ckpt", str(root / "victim.pt"), "--clean", str(root / "clean"),
                               "--adv", str(root / adv), "--out", str(out / "models"),
                               "--metrics", str(out / "metrics.json"), "--finetune-epochs", "1", "--epochs", "1",
                               "--online-eps", "0.1", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def retrained(folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("retrained")
    result = _retrain(folders, out, "--mode", "finetune", "--mode", "online_fgsm")
    assert result.exit_code == 0, result.output
    return out


def _assess_by_hand(model: nn.Module, folders: Path) -> dict:
    xt, yt = _read_split(folders / "clean", "test")
    axt, ayt = _read_split(folders / "adv" / "fgsm" / "eps=0.1", "test")
    assert torch.equal(ayt, yt)
    return {"clean_accuracy": _accuracy(model, xt, yt), "stored_adversarial_accuracy": _accuracy(model, axt, yt),
            "white_box_accuracy": _accuracy(model, _fgsm_by_hand(model, xt, yt, 0.1), yt)}


def test_cli_writes_loadable_checkpoints(folders, retrained):
    for mode in ("finetune", "online_fgsm"):
        path = retrained / "models" / f"{mode}.pt"
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert raw["meta"]["train"]["mode"] == mode
        model = load(path, dataset="mnist")
        assert model.meta.arch == "mlp" and model.meta.train["adversarial"]["method"] == "fgsm"
    assert sorted(p.name for p in (retrained / "models").iterdir()) == ["finetune.pt", "online_fgsm.pt"]


def test_cli_metrics_agree_with_an_independent_assessment(folders, retrained):
    report = json.loads((retrained / "metrics.json").read_text())
    assert report["dataset"] == "mnist" and report["adversarial"]["method"] == "fgsm"
    assert report["adversarial"]["eps"] == 0.1
    models = report["models"]
    assert sorted(models) == ["finetune", "online_fgsm", "original"]

    victim = load(folders / "victim.pt", dataset="mnist")
    want = _assess_by_hand(victim, folders)
    # The original victim made this variant: its stored accuracy is the manifests' own.
    manifest = [pq.read_table(p).to_pydict() for p in sorted((folders / "adv/fgsm/eps=0.1").glob("test-*.parquet"))]
    stored = np.mean([p == lab for m in manifest for p, lab in zip(m["adv_pred"], m["label"])])
    assert want["stored_adversarial_accuracy"] == pytest.approx(stored)
    for mode, model in (("original", victim), ("finetune", load(retrained / "models" / "finetune.pt")),
                        ("online_fgsm", load(retrained / "models" / "online_fgsm.pt"))):
        got, want = models[mode], _assess_by_hand(model, folders)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-9), (mode, k)
        assert got["stored_adversarial_drop"] == pytest.approx(want["clean_accuracy"] - want["stored_adversarial_accuracy"])
        assert got["white_box_drop"] == pytest.approx(want["clean_accuracy"] - want["white_box_accuracy"])
        if mode != "original":
            assert got["train_seconds"] > 0 and got["epochs"] == 1
            assert model.meta.test_accuracy == pytest.approx(got["clean_accuracy"])
    victim_lr = victim.meta.train["lr"]
    assert models["finetune"]["lr"] == pytest.approx(victim_lr / 2)
    assert models["online_fgsm"]["lr"] == pytest.approx(victim_lr)


def _refused(result, message: str, out: Path) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("advgen retrain: error: ") and message in lines[-1], lines
    assert not (out / "metrics.json").exists() and not (out / "models").exists()


def test_cli_unknown_mode(folders, tmp_path):
    result = _retrain(folders, tmp_path, "--mode", "finetune", "--mode", "bogus")
    _refused(result, "unknown retrain mode 'bogus'", tmp_path)
    assert len(result.stderr.strip().splitlines()) == 1  # refused before reading anything
    assert set(MODES) == {"finetune", "scratch", "online_fgsm", "online_pgd"}


def test_cli_variant_without_a_train_split(folders, tmp_path):
    _refused(_retrain(folders, tmp_path, "--mode", "finetune", adv="adv_test/fgsm/eps=0.1"),
             "has no 'train' split", tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--finetune-epochs", "0"], "--finetune-epochs must be >= 1"),
    (["--epochs", "-1"], "--epochs >= 0"),
    (["--clean-ratio", "-1"], "--clean-ratio must be >= 0"),
])
def test_cli_bad_parameters(folders, tmp_path, extra, message):
    _refused(_retrain(folders, tmp_path, "--mode", "finetune", *extra), message, tmp_path)


def test_finetune_checkpoint_records_the_learning_rate_it_was_trained_with(folders, retrained):
    report = json.loads((retrained / "metrics.json").read_text())
    meta = load(retrained / "models" / "finetune.pt").meta.train
    assert meta["lr"] == pytest.approx(report["models"]["finetune"]["lr"])


def test_cli_bad_online_eps_is_refused_before_compute(folders, tmp_path):
    result = _retrain(folders, tmp_path, "--mode", "finetune", "--mode", "online_fgsm", "--online-eps", "0")
    _refused(result, "eps", tmp_path)


def test_assess_gives_losses_and_remeasures_deepfool_rho_on_the_model():
    from advgen.evaluation.retrain import assess, white_box

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randint(0, 256, (24, 1, 6, 6), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    y[:5] = (y[:5] + 1) % 4  # five images wrong when clean: DeepFool leaves them, ρ̂ leaves them out
    got = assess(model, clean_x=x, clean_y=y, adv_x=x, adv_y=y, method="deepfool", eps=None, steps=1, device=CPU)
    with torch.no_grad():
        loss = F.cross_entropy(model(x.float() / 255), y).item()
    assert got["clean_loss"] == pytest.approx(loss, rel=1e-5) and got["stored_adversarial_loss"] == pytest.approx(loss, rel=1e-5)
    own = white_box(model, x, y, method="deepfool", eps=None, steps=1, device=CPU)
    x0, xa = x.double().flatten(1) / 255, own.double().flatten(1) / 255
    rho = ((xa - x0).norm(dim=1) / x0.norm(dim=1))[5:].mean().item()
    assert got["white_box_rho"] == pytest.approx(rho) and rho > 0
    with torch.no_grad():
        assert got["white_box_loss"] == pytest.approx(F.cross_entropy(model(own.float() / 255), y).item(), rel=1e-5)


@pytest.mark.parametrize("method,eps", [("deepfool", None), ("bim", 0.03)])
def test_fresh_white_box_copies_stay_adversarial_as_stored_like_generated_ones(method, eps):
    """The fresh attack in retrain/defend stores what `advgen generate` would: finished on the uint8 lattice
    where rounding undid the float attack (the default), so its accuracy is not inflated by rounding."""
    from advgen import attacks
    from advgen.evaluation.retrain import white_box

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.randint(0, 256, (200, 1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    xf = x.float() / 255
    with torch.no_grad():
        y = model(xf).argmax(1)  # every image right when clean: every one is attacked
    floats = attacks.run(method, model, xf, y, eps=eps, steps=5)
    with torch.no_grad():
        reached = model(floats).argmax(1) != y
    aware = white_box(model, x, y, method=method, eps=eps, steps=5, device=CPU)
    plain = white_box(model, x, y, method=method, eps=eps, steps=5, device=CPU, rounding_aware=False)
    assert aware.dtype == plain.dtype == torch.uint8
    with torch.no_grad():
        fooled_aware = model(aware.float() / 255).argmax(1) != y
        fooled_plain = model(plain.float() / 255).argmax(1) != y
    assert torch.equal(plain, attacks.to_uint8(floats, xf, eps=eps, norm=attacks.get(method).norm))
    assert (fooled_plain < reached).any()  # plain rounding undoes some of the float attack here ...
    assert bool(fooled_aware[fooled_plain].all()) and fooled_aware.sum() > fooled_plain.sum()  # ... finishing wins
    if eps is None:  # DeepFool has no ball: every image the float attack fooled stays fooled as stored
        assert bool(fooled_aware[reached].all())
    else:  # inside the ball of ⌊255ε⌋ levels (the float attack had 255ε, so a few may not make it)
        assert (aware.int() - x.int()).abs().max() <= int(255 * eps)
        assert fooled_aware[reached].float().mean() > 0.9
