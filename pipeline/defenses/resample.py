"""Resampling (Jetley et al.): bicubic down-sampling to a smaller size and back, before the victim."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from advgen.defenses.base import Defense, check_images, register
from advgen.errors import BadParameter


class Resample(nn.Module):
    """Bicubic down-sampling to size x size pixels and back to H x W, clamped to [0, 1].

    A step that shrinks an axis antialiases (so the detail it removes is
    averaged away, not aliased into the result); a step that only enlarges
    does not. size equal to both H and W is the identity.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise BadParameter(f"resample size must be an integer >= 1 (pixels), got {size!r}")
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        h, w = x.shape[2:]
        s = self.size
        if (h, w) == (s, s):
            return x
        small = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=s < h or s < w)
        back = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False, antialias=h < s or w < s)
        return back.clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _whole_pixels(value: float) -> int:
    """``value`` as an int when it is a whole number (14.0 from a YAML float is fine; 14.5 is not)."""
    if isinstance(value, bool) or not float(value).is_integer():
        raise BadParameter(f"resample size must be a whole number of pixels, got {value!r}")
    return int(value)


def _check_factor(f: float) -> None:
    if not 0 < f <= 1:
        raise BadParameter(f"--resample-factor must lie in (0, 1], got {f}")


register(Defense("resample", lambda v: Resample(_whole_pixels(v)), "resample_factor", (0.5, 0.75),
                 "Resampling sizes as fractions of the image side.", "bicubic down- and up-sampling before the victim",
                 "size (pixels)", lambda v: f"resample {int(v)}px",
                 setting=lambda f, side: float(max(1, round(f * side))), check=_check_factor))
