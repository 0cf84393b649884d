"""Defenses against scipy.ndimage, and the contracts every registered defense keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from advgen.defenses import DEFENSES, Defended, GaussianBlur, Resample, build_defense, gaussian_kernel1d
from advgen.errors import BadParameter, UnknownName

# One valid parameter per registered defense; the check below keeps this in step with the registry.
# A setting of each registered defense that changes a 28x28 image: the last of its default sweep.
VALUES = {d.name: d.setting(d.sweep[-1], 28) for d in DEFENSES.values()}


def _scipy_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """scipy's Gaussian filter over H and W of each (N, C) plane, default mode='reflect'."""
    return ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=4.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32)])
@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0, 1.75, 2.0])
def test_blur_matches_scipy(sigma: float, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = GaussianBlur(sigma)(x.to(dtype))
    assert got.dtype == dtype and got.shape == x.shape
    assert np.abs(got.double().numpy() - _scipy_blur(x.numpy(), sigma)).max() < 1e-5


@pytest.mark.parametrize("shape,sigma", [((1, 1, 5, 5), 2.0), ((1, 2, 3, 7), 1.75), ((1, 1, 1, 4), 1.0)])
def test_blur_kernel_wider_than_image_matches_scipy(shape: tuple[int, ...], sigma: float) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert int(4.0 * sigma + 0.5) > min(shape[2:])  # the border reflects more than once
    np.testing.assert_allclose(GaussianBlur(sigma)(x).numpy(), _scipy_blur(x.numpy(), sigma), atol=1e-12)


def test_kernel1d_radius_and_sum() -> None:
    # scipy's radius rule: int(4 * sigma + 0.5).
    assert [len(gaussian_kernel1d(s)) for s in (0.25, 0.5, 1.0, 1.75, 2.0)] == [3, 5, 9, 15, 17]
    k = gaussian_kernel1d(1.0)
    assert k.dtype == torch.float64 and k.sum().item() == pytest.approx(1.0)
    assert torch.equal(k, k.flip(0))
    assert gaussian_kernel1d(0.0).tolist() == [1.0]


def test_blur_sigma_zero_is_identity_and_negative_rejected() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(GaussianBlur(0.0)(x), x)
    for bad in (-1.0, float("nan")):
        with pytest.raises(BadParameter, match="sigma must be >= 0"):
            GaussianBlur(bad)


def test_blur_dtype_follows_input_after_module_moves() -> None:
    blur = GaussianBlur(1.0).to(torch.float32)
    assert blur.kernel.dtype == torch.float32
    x = torch.rand(1, 1, 9, 9, dtype=torch.float64)
    assert blur(x).dtype == torch.float64
    blur = blur.to(torch.float64)
    assert blur(x.float()).dtype == torch.float32
    assert "kernel" not in blur.state_dict()


def test_resample_identity_at_native_size() -> None:
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(Resample(28)(x), x)


def test_resample_removes_checkerboard() -> None:
    i = torch.arange(28)
    board = ((i[:, None] + i[None, :]) % 2).float().expand(2, 3, 28, 28)
    out = Resample(14)(board)
    assert out.shape == (2, 3, 28, 28) and out.dtype == board.dtype
    assert out.min() >= 0 and out.max() <= 1
    # The finest pattern the grid holds: antialiased shrinking leaves its mean and little else.
    assert board.std() > 0.49 and out.std() < 0.05
    assert out.mean().item() == pytest.approx(0.5, abs=0.02)


def test_resample_keeps_smooth_images() -> None:
    i = torch.arange(28, dtype=torch.float64)
    ramp = (i[None, :] / 27).expand(1, 1, 28, 28)
    assert (Resample(14)(ramp) - ramp).abs().max() < 0.05


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_defense_keeps_contract_and_passes_gradients(name: str) -> None:
    assert set(VALUES) == set(DEFENSES)
    defense = build_defense(name, VALUES[name])
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 28, 28, generator=g, dtype=torch.float64)
    out = defense(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1

    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 4)).double()
    x.requires_grad_(True)
    Defended(defense, model)(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_build_defense_errors() -> None:
    with pytest.raises(UnknownName, match="unknown defense 'median'; known: gaussian"):
        build_defense("median", 3)
    with pytest.raises(BadParameter, match="whole number"):
        build_defense("resample", 14.5)
    with pytest.raises(BadParameter, match="integer >= 1"):
        build_defense("resample", 0)
    with pytest.raises(BadParameter):
        build_defense("gaussian", -0.5)
    assert isinstance(build_defense("resample", 14.0), Resample)
    assert build_defense("resample", 14.0).size == 14
