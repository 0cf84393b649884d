"""The JPEG-compression defense: Pillow's real encoder forward, BPDA (identity) backward, one-line errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from advgen import defenses
from advgen.defenses.base import Defended
from advgen.errors import BadParameter
from advgen.stages.cli import app


def _images(n: int, c: int, side: int = 28, seed: int = 0) -> torch.Tensor:
    """Smooth blobs plus noise: images JPEG compresses visibly, but not to nothing."""
    g = torch.Generator().manual_seed(seed)
    i = torch.linspace(-1, 1, side)
    base = torch.exp(-(i[None, :] ** 2 + i[:, None] ** 2) * 3)
    x = base.expand(n, c, side, side) * torch.rand(n, c, 1, 1, generator=g)
    return (x + 0.2 * torch.rand(n, c, side, side, generator=g)).clamp(0, 1).mul(255).round().div(255)


def _by_hand(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image written as a JPEG file with Pillow and read back: what the defense's forward pass must be."""
    out = []
    for img in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        f = io.BytesIO()
        (Image.fromarray(img[..., 0], "L") if img.shape[2] == 1 else Image.fromarray(img, "RGB")).save(
            f, "JPEG", quality=quality)
        decoded = np.array(Image.open(io.BytesIO(f.getvalue())))
        out.append(decoded.reshape(img.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).double() / 255


@pytest.mark.parametrize("channels", [1, 3])
def test_forward_is_pillows_jpeg_and_quality_orders_the_loss(channels):
    x = _images(4, channels, 32 if channels == 3 else 28).double()
    errors = []
    for q in (10, 50, 90):
        out = defenses.build_defense("jpeg", float(q))(x)
        assert out.dtype == x.dtype and out.shape == x.shape and 0 <= out.min() and out.max() <= 1
        torch.testing.assert_close(out, _by_hand(x, q), rtol=0, atol=0)
        errors.append((out - x).abs().mean().item())
    assert errors[0] > errors[1] > errors[2] > 0  # real compression: lossy at every quality, less so as q rises


def test_backward_is_the_identity_bpda():
    x = _images(3, 1).requires_grad_(True)
    w = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    (defenses.build_defense("jpeg", 30.0)(x) * w).sum().backward()
    assert torch.equal(x.grad, w)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
    x.grad = None
    Defended(defenses.build_defense("jpeg", 30.0), model)(x).sum().backward()
    assert x.grad.abs().sum() > 0
    assert "BPDA" in defenses.get("jpeg").gradient


@pytest.mark.parametrize("quality", [0, 101, 50.5])
def test_bad_quality_is_refused(quality):
    with pytest.raises(BadParameter, match="--jpeg-quality must be a whole number in"):
        defenses.build_defense("jpeg", quality)


def test_defend_refuses_a_bad_quality_before_any_compute(tmp_path):
    result = CliRunner().invoke(app, ["defend", "--victim-ckpt", str(tmp_path / "v.pt"), "--clean", str(tmp_path),
                                      "--adv", str(tmp_path), "--metrics", str(tmp_path / "m.json"),
                                      "--plots", str(tmp_path / "plots"), "--jpeg-quality", "0"])
    assert result.exit_code == 2 and "--jpeg-quality must be a whole number in [1, 100], got 0" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.json").exists()


def test_the_cache_returns_what_pillow_returns_and_stays_within_its_bound(monkeypatch):
    from advgen.defenses import jpeg

    monkeypatch.setattr(jpeg, "_CACHE", type(jpeg._CACHE)())
    monkeypatch.setattr(jpeg, "CACHE_BYTES", 3 * 4 * 28 * 28)  # three batches of four images
    batches = [(_images(4, 1, seed=s) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for s in range(5)]
    for b in batches + batches[:2]:
        assert np.array_equal(jpeg.cached_round_trip(b, 40), jpeg.jpeg_round_trip(b, 40))
    assert len(jpeg._CACHE) == 3 and sum(v.nbytes for v in jpeg._CACHE.values()) <= jpeg.CACHE_BYTES
