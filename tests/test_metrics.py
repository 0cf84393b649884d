"""Metrics against hand computations and a plain-loop SSIM reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from advgen.evaluation import metrics
from advgen.errors import BadParameter
from advgen.evaluation.metrics import (
    BUCKETS,
    confidence_buckets,
    error_rate_reduction,
    psnr,
    psnr_from_l2,
    robustness_rho,
    ssim,
    topk_hit,
)

C1, C2 = 0.01**2, 0.03**2


# --- confidence buckets ---------------------------------------------------------------------------

def test_buckets_terciles_by_hand() -> None:
    conf = np.array([0.7, 0.1, 0.5, 0.8, 0.2, 0.4])
    # Sorted: .1 .2 .4 .5 .7 .8; linear quantiles at positions 5/3 and 10/3:
    # t1 = .2 + (2/3)(.4 - .2), t2 = .5 + (1/3)(.7 - .5).
    buckets, (t1, t2) = confidence_buckets(conf)
    assert (t1, t2) == pytest.approx((0.2 + 0.4 / 3, 0.5 + 0.2 / 3))
    assert buckets.dtype == np.int8
    assert buckets.tolist() == [2, 0, 1, 2, 0, 1]
    assert BUCKETS == ("low", "medium", "high")


def test_buckets_fixed_thresholds_boundaries() -> None:
    conf = np.array([0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
    buckets, used = confidence_buckets(conf, (0.5, 0.9))
    assert used == (0.5, 0.9)
    # Lower bounds are inclusive: 0.5 is medium, 0.9 is high.
    assert buckets.tolist() == [0, 0, 1, 1, 2, 2]


def test_buckets_equal_thresholds_leave_medium_empty() -> None:
    buckets, _ = confidence_buckets(np.array([0.2, 0.6, 0.7]), (0.6, 0.6))
    assert buckets.tolist() == [0, 2, 2]


@pytest.mark.parametrize("bad", [(0.6, 0.5), (-0.1, 0.5), (0.5, 1.1), (math.nan, 0.5)])
def test_buckets_invalid_thresholds(bad: tuple[float, float]) -> None:
    with pytest.raises(BadParameter, match="t1 <= t2"):
        confidence_buckets(np.array([0.5]), bad)


def test_buckets_empty() -> None:
    buckets, used = confidence_buckets(np.array([]))
    assert buckets.shape == (0,) and used == (0.0, 0.0)
    assert confidence_buckets(np.array([]), (0.3, 0.6))[1] == (0.3, 0.6)


# --- top-k, error-rate reduction, rho -------------------------------------------------------------

def test_topk_hit_by_hand() -> None:
    topk = np.array([[3, 1, 4], [1, 5, 9], [2, 6, 5], [0, 0, 0]])
    y = np.array([4, 2, 2, 0])
    assert topk_hit(topk, y).tolist() == [True, False, True, True]
    assert topk_hit(topk[:, :1], y).tolist() == [False, False, True, True]
    with pytest.raises(BadParameter):
        topk_hit(topk, y[:3])


def test_error_rate_reduction_by_hand() -> None:
    assert error_rate_reduction(0.4, 0.1) == pytest.approx(0.75)
    assert error_rate_reduction(0.2, 0.3) == pytest.approx(-0.5)
    assert error_rate_reduction(0.0, 0.1) == 0.0


def test_robustness_rho_is_mean_of_ratios() -> None:
    r = np.array([1.0, 3.0, 5.0])
    x = np.array([2.0, 4.0, 0.0])
    # Third sample left out (blank image); mean(1/2, 3/4), not sum(r)/sum(x) = 4/6.
    assert robustness_rho(r, x) == pytest.approx(0.625)
    assert math.isnan(robustness_rho(np.array([1.0]), np.array([0.0])))


# --- PSNR -----------------------------------------------------------------------------------------

def test_psnr_from_l2_by_hand() -> None:
    l2 = np.array([math.sqrt(784) / 255, 0.0])  # every one of 784 pixels off by 1/255; and no change
    out = psnr_from_l2(l2, 784)
    assert out.dtype == np.float64
    assert out[0] == pytest.approx(20 * math.log10(255))  # 48.13 dB
    assert out[0] == pytest.approx(48.1308, abs=1e-4)
    assert out[1] == math.inf


def test_psnr_tensors_agree_with_l2_form() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 3, 8, 8, generator=g)
    b = (a + 0.05 * torch.randn(5, 3, 8, 8, generator=g)).clamp(0, 1)
    b[2] = a[2]
    l2 = (a.double() - b.double()).flatten(1).norm(dim=1).numpy()
    got = psnr(a, b)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), psnr_from_l2(l2, 3 * 8 * 8), rtol=1e-12)
    assert got[2] == math.inf


# --- SSIM -----------------------------------------------------------------------------------------

def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM of one (C, H, W) pair, window by window in plain numpy."""
    t = np.arange(-5, 6)
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for x, y in zip(a, b):
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
    return float(np.mean(values))


def test_ssim_identical_is_one() -> None:
    a = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))


def test_ssim_constant_images_closed_form() -> None:
    a, b = 0.3, 0.8
    got = ssim(torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b))
    # No variance anywhere: only the luminance term remains.
    assert got.item() == pytest.approx((2 * a * b + C1) / (a**2 + b**2 + C1), abs=1e-7)


@pytest.mark.parametrize("channels", [1, 2])
def test_ssim_matches_reference(channels: int) -> None:
    g = torch.Generator().manual_seed(channels)
    a = torch.rand(3, channels, 16, 16, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(3, channels, 16, 16, generator=g, dtype=torch.float64)).clamp(0, 1)
    b[1] = torch.rand(channels, 16, 16, generator=g, dtype=torch.float64)  # an unrelated image
    want = [_ssim_reference(a[i].numpy(), b[i].numpy()) for i in range(3)]
    np.testing.assert_allclose(ssim(a, b).numpy(), want, atol=1e-6)


def test_ssim_batch_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.rand(10, 1, 28, 28, generator=g)
    b = (a + 0.1 * torch.randn(10, 1, 28, 28, generator=g)).clamp(0, 1)
    whole = ssim(a, b)
    singles = torch.cat([ssim(a[i:i + 1], b[i:i + 1]) for i in range(10)])
    torch.testing.assert_close(whole, singles, rtol=0, atol=1e-12)
    monkeypatch.setattr(metrics, "_SSIM_CHUNK_VALUES", 3 * 28 * 28)  # force chunks of 3 images
    torch.testing.assert_close(ssim(a, b), whole, rtol=0, atol=1e-12)


def test_ssim_rejects_small_or_mismatched_images() -> None:
    with pytest.raises(BadParameter, match="11x11"):
        ssim(torch.rand(2, 1, 10, 28), torch.rand(2, 1, 10, 28))
    with pytest.raises(BadParameter, match="same shape"):
        ssim(torch.rand(2, 1, 28, 28), torch.rand(3, 1, 28, 28))
