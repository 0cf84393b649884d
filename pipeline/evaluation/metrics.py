"""Metrics for reports: confidence buckets, top-k hits, PSNR, SSIM, error-rate reduction and DeepFool's ρ.

Everything here is a pure function. The bookkeeping metrics take and return
numpy arrays; the image metrics (``psnr``, ``ssim``) take torch tensors of
images (N, C, H, W) in [0, 1], so they run on whatever device holds the images.
PSNR and SSIM use a data range of 1 (pixel units of [0, 1] images).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from advgen.errors import BadParameter

BUCKETS = ("low", "medium", "high")

# SSIM constants from Wang et al. 2004, "Image quality assessment: from error visibility to structural similarity".
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 1.0) ** 2
_SSIM_C2 = (0.03 * 1.0) ** 2
# Values per SSIM chunk (~170 images of 28x28). Small chunks stay in the allocator's cache: with
# 2**22 values per chunk, page faults made SSIM of 70 000 images 5x slower on a 2-core CPU (measured).
_SSIM_CHUNK_VALUES = 1 << 17


# --- bookkeeping ----------------------------------------------------------------------------------

def confidence_buckets(
    conf: np.ndarray, thresholds: tuple[float, float] | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """(bucket per sample, thresholds used) for clean top-1 probabilities ``conf`` (N,) in [0, 1].

    Buckets are int8 indices into ``BUCKETS``: 0 = low (conf < t1), 1 = medium
    (t1 <= conf < t2), 2 = high (conf >= t2). Without ``thresholds`` they are the
    terciles of ``conf`` (``np.quantile`` at 1/3 and 2/3, linear interpolation),
    so each bucket holds about a third of the samples; given thresholds must
    satisfy 0 <= t1 <= t2 <= 1. An empty ``conf`` gives an empty array and the
    given thresholds, or (0.0, 0.0) when there were none to compute terciles from.
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 1:
        raise BadParameter(f"conf must be one probability per sample (N,), got shape {conf.shape}")
    if thresholds is None:
        t1, t2 = (0.0, 0.0) if conf.size == 0 else (float(np.quantile(conf, 1 / 3)), float(np.quantile(conf, 2 / 3)))
    else:
        t1, t2 = (float(t) for t in thresholds)
        if not 0.0 <= t1 <= t2 <= 1.0:  # also rejects nan
            raise BadParameter(f"confidence thresholds must satisfy 0 <= t1 <= t2 <= 1, got ({t1}, {t2})")
    buckets = (conf >= t1).astype(np.int8) + (conf >= t2).astype(np.int8)
    return buckets, (t1, t2)


def topk_hit(topk: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether label ``y[i]`` (N,) is among the predicted classes ``topk[i]`` (N, k); bool (N,)."""
    topk, y = np.asarray(topk), np.asarray(y)
    if topk.ndim != 2 or y.ndim != 1 or len(topk) != len(y):
        raise BadParameter(f"expected topk (N, k) and y (N,), got shapes {topk.shape} and {y.shape}")
    return (topk == y[:, None]).any(axis=1)


def error_rate_reduction(clean_error: float, new_error: float) -> float:
    """Relative reduction (clean_error - new_error) / clean_error; 0.0 when there was no clean error.

    Errors are rates in [0, 1]; the result is negative when the error grew.
    """
    if clean_error == 0:
        return 0.0
    return (clean_error - new_error) / clean_error


def robustness_rho(r_l2: np.ndarray, x_l2: np.ndarray) -> float:
    """DeepFool's ρ̂ = mean over samples of ‖r(x)‖₂ / ‖x‖₂ (Moosavi-Dezfooli et al. 2016, eq. 15).

    ``r_l2`` (N,) are the L2 norms of the minimal perturbations, ``x_l2`` (N,)
    those of the clean images. The ratio is taken per sample, then averaged,
    as in the paper; samples with ``x_l2 == 0`` (blank images) have no ratio
    and are left out. nan when no sample is left.
    """
    r_l2, x_l2 = np.asarray(r_l2, dtype=np.float64), np.asarray(x_l2, dtype=np.float64)
    if r_l2.shape != x_l2.shape or r_l2.ndim != 1:
        raise BadParameter(f"expected r_l2 and x_l2 of the same shape (N,), got {r_l2.shape} and {x_l2.shape}")
    keep = x_l2 > 0
    if not keep.any():
        return math.nan
    return float(np.mean(r_l2[keep] / x_l2[keep]))


# --- image quality --------------------------------------------------------------------------------

def psnr_from_l2(l2: np.ndarray, num_values: int) -> np.ndarray:
    """PSNR in dB (float64, same shape as ``l2``) of perturbations with L2 norms ``l2`` on [0, 1] images.

    ``num_values`` is the number of entries per image (C * H * W): the mean
    squared error is l2² / num_values and PSNR = 10 log10(1 / mse) for a data
    range of 1. +inf where l2 == 0 (identical images).
    """
    if num_values < 1:
        raise BadParameter(f"num_values must be >= 1 (C * H * W), got {num_values}")
    l2 = np.asarray(l2, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(num_values / np.square(l2))


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR in dB between images ``a`` and ``b`` (N, C, H, W) in [0, 1]: (N,) float64, +inf where equal."""
    _check_pair(a, b)
    mse = (a.to(torch.float64) - b.to(torch.float64)).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM between images ``a`` and ``b`` (N, C, H, W) in [0, 1]: (N,) float64 on their device.

    Wang et al. 2004: an 11x11 Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03,
    data range 1, population (window-weighted) variances and covariance,
    'valid' positions only (no padding, so H and W must be >= 11). The SSIM map
    is averaged over channels and positions. Filtered in float32 (within 1e-6 of float64), in chunks
    of images, so results do not depend on the batch size.
    """
    _check_pair(a, b)
    n, c, h, w = a.shape
    if h < _SSIM_WINDOW or w < _SSIM_WINDOW:
        raise BadParameter(f"SSIM needs images of at least {_SSIM_WINDOW}x{_SSIM_WINDOW}, got {h}x{w}")
    g = _gaussian_window(a.device)
    chunk = max(1, _SSIM_CHUNK_VALUES // (c * h * w))
    out = [_ssim_chunk(a[i:i + chunk], b[i:i + chunk], g) for i in range(0, n, chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=a.device)


def _ssim_chunk(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    # float32 filtering is 3x faster than float64 on CPUs. Moments are taken of the images minus
    # their own means (SSIM's variances do not change with a shift), which keeps the
    # E[x²] - E[x]² cancellation small: within 1e-6 of float64 (measured 2.3e-7 on 60 000 pairs).
    c = a.shape[1]
    ma = a.to(torch.float64).mean(dim=(2, 3), keepdim=True)
    mb = b.to(torch.float64).mean(dim=(2, 3), keepdim=True)
    x, y = (a.to(torch.float64) - ma).to(torch.float32), (b.to(torch.float64) - mb).to(torch.float32)
    mx, my, xx, yy, xy = _filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1),
                                       g.to(torch.float32)).split(c, dim=1)
    var_x, var_y, cov = xx - mx * mx, yy - my * my, xy - mx * my
    mu_x, mu_y = mx + ma.to(torch.float32), my + mb.to(torch.float32)
    num = (2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)
    den = (mu_x * mu_x + mu_y * mu_y + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    return (num / den).flatten(1).to(torch.float64).mean(dim=1)


def _gaussian_window(device: torch.device) -> Tensor:
    """The normalized 1-D factor of Wang's 11x11 window (the 2-D window is its outer product)."""
    r = _SSIM_WINDOW // 2
    t = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(t * t) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter_valid(x: Tensor, g: Tensor) -> Tensor:
    """Separable 'valid' correlation of every plane of ``x`` (N, P, H, W) with the window g ⊗ g."""
    p, k = x.shape[1], len(g)
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(p, 1, k, 1), groups=p)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(p, 1, 1, k), groups=p)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.ndim != 4 or a.shape != b.shape:
        raise BadParameter(f"expected two image batches of the same shape (N, C, H, W), got {a.shape} and {b.shape}")
