"""Gaussian filter (Johnson; Agarwal et al.): a per-channel blur of σ pixels, as scipy.ndimage computes it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen.defenses.base import Defense, check_images, register
from advgen.errors import BadParameter


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """The normalized 1-D Gaussian of standard deviation ``sigma`` pixels, float64, length 2r + 1.

    The radius r = int(truncate * sigma + 0.5), as ``scipy.ndimage.gaussian_filter``
    computes it. sigma == 0 gives the identity kernel [1.0].
    """
    _check_sigma(sigma)
    if not truncate > 0:
        raise BadParameter(f"truncate must be > 0, got {truncate}")
    if sigma == 0:
        return torch.ones(1, dtype=torch.float64)
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


class GaussianBlur(nn.Module):
    """Per-channel Gaussian blur over H and W, matching ``scipy.ndimage.gaussian_filter(mode='reflect')``.

    Borders are extended half-sample symmetrically (d c b a | a b c d), the
    scipy default, repeatedly when the kernel is wider than the image.
    sigma == 0 is the identity.
    """

    kernel: Tensor

    def __init__(self, sigma: float) -> None:
        super().__init__()
        _check_sigma(sigma)
        self.sigma = float(sigma)
        # Not persistent: it follows from sigma, and a Defended model's state_dict should stay the victim's.
        self.register_buffer("kernel", gaussian_kernel1d(self.sigma), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        if self.sigma == 0:
            return x
        k = self.kernel.to(dtype=x.dtype, device=x.device)
        c, r = x.shape[1], len(k) // 2
        x = x.index_select(2, _symmetric_index(x.shape[2], r, x.device))
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        x = x.index_select(3, _symmetric_index(x.shape[3], r, x.device))
        return F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


def _symmetric_index(n: int, r: int, device: torch.device) -> Tensor:
    """Source indices of a length-n axis padded by r on each side, half-sample symmetric.

    The symmetric extension is periodic with period 2n, so any padding width
    works, unlike ``F.pad(mode='reflect')`` (which is scipy's 'mirror' and
    needs r < n).
    """
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def _check_sigma(sigma: float) -> None:
    if not (sigma >= 0 and math.isfinite(sigma)):  # also rejects nan
        raise BadParameter(f"sigma must be >= 0 and finite (pixels), got {sigma}")


register(Defense("gaussian", lambda v: GaussianBlur(float(v)), "sigma", (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2),
                 "Gaussian σ values (pixels).", "Gaussian filter before the victim", "σ (pixels)",
                 lambda v: f"σ={v:g}", check=_check_sigma, identity=lambda v: v == 0))
