"""MI-FGSM and D-MI-FGSM (Dong et al., 2018): by hand, against BIM at μ = 0, and against torchattacks' ``MIFGSM``
on the real Fashion-MNIST test set (stored copy, without the rounding-aware finish)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from advgen import attacks
from advgen.attacks import to_uint8
from advgen.stages.cli import app
from tests.conftest import FASHION_DEB, read_split_by_hand

runner = CliRunner()


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4)).eval()


def test_two_steps_by_hand():
    model = _linear()
    x = torch.rand(3, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 3])
    eps, alpha, mu = 0.05, 0.03, 0.7
    got = attacks.run("mi_fgsm", model, x, y, eps=eps, steps=2, step_size=alpha, decay=mu)

    x_t, g = x.clone(), torch.zeros_like(x)
    for _ in range(2):
        x_t.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_t), y, reduction="sum"), x_t)
        g = mu * g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)
        x_t = (x + (x_t.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    torch.testing.assert_close(got, x_t, rtol=0, atol=0)
    assert (got - x).abs().max() <= eps + 1e-7


def test_no_momentum_is_bim_and_the_twin_goes_the_other_way():
    model = _linear(2)
    x = torch.rand(8, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    y = torch.arange(8) % 4
    kw = {"eps": 0.1, "steps": 5, "step_size": 0.03}
    assert torch.equal(attacks.run("mi_fgsm", model, x, y, decay=0.0, **kw), attacks.run("bim", model, x, y, **kw))
    loss = {name: F.cross_entropy(model(attacks.run(name, model, x, y, **kw)), y).item()
            for name in ("mi_fgsm", "d_mi_fgsm")}
    clean = F.cross_entropy(model(x), y).item()
    assert loss["d_mi_fgsm"] < clean < loss["mi_fgsm"]
    assert attacks.get("d_mi_fgsm").direction == "cooperative" and attacks.get("mi_fgsm").finish is not None


def test_a_negative_decay_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["generate", "--victim-ckpt", str(tmp_path / "v.pt"), "--clean", str(tmp_path),
                                 "--out", str(tmp_path / "adv"), "--method", "mi_fgsm", "--eps", "0.1",
                                 "--decay", "-1"])
    assert result.exit_code == 2 and "decay" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(not FASHION_DEB.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_stored_copy_equals_torchattacks_mifgsm_on_the_fashion_mnist_test_set(tmp_path):
    torchattacks = pytest.importorskip("torchattacks")  # `make install` installs it (a test dependency)
    from advgen.victims import load

    clean = tmp_path / "clean"
    for args in (["prepare", "--dataset", "fashion_mnist", "--out", str(clean), "--no-download"],
                 ["train", "--dataset", "fashion_mnist", "--victim", "mlp", "--clean", str(clean),
                  "--out", str(tmp_path / "mlp.pt"), "--metrics", str(tmp_path / "train.json"), "--epochs", "1",
                  "--device", "cpu"],
                 ["generate", "--victim-ckpt", str(tmp_path / "mlp.pt"), "--clean", str(clean),
                  "--out", str(tmp_path / "adv"), "--method", "mi_fgsm", "--eps", "0.1", "--steps", "10",
                  "--step-size", "0.01", "--decay", "1.0", "--split", "test", "--no-rounding-aware",
                  "--device", "cpu", "--workers", "0"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    keys, stored, labels = read_split_by_hand(tmp_path / "adv" / "mi_fgsm" / "eps=0.1", "test")
    _, clean_images, clean_labels = read_split_by_hand(clean, "test")
    assert len(keys) == 10000 and np.array_equal(labels, clean_labels)

    model = load(tmp_path / "mlp.pt", dataset="fashion_mnist").eval()
    peer = torchattacks.MIFGSM(model, eps=0.1, alpha=0.01, steps=10, decay=1.0)
    x = torch.from_numpy(clean_images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels).long()
    theirs = torch.cat([to_uint8(peer(x[i:i + 1000], y[i:i + 1000]), x[i:i + 1000], eps=0.1, norm="linf")
                        for i in range(0, len(x), 1000)])
    ours = torch.from_numpy(stored).permute(0, 3, 1, 2)
    same = (ours == theirs).float().mean().item()
    print(f"pixels equal to torchattacks MIFGSM: {same:.6f}")
    assert same >= 0.999, f"only {same:.5f} of the pixels equal torchattacks' MIFGSM"
    fooled = (model(ours.float() / 255).argmax(1) != y).float().mean().item()
    assert fooled > 0.5  # a real attack on a real victim, not two identical no-ops
