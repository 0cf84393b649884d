"""JPEG compression (Dziugaite et al., 2016; Das et al., 2017): each image encoded at quality q and decoded again,
by Pillow's real encoder. It has no gradient, so the adaptive attack uses BPDA with the identity on the backward
pass (Athalye et al., 2018): the forward pass is the real JPEG, the backward pass passes the gradient through."""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from advgen.defenses.base import Defense, check_images, register
from advgen.errors import BadParameter


def jpeg_round_trip(u8: np.ndarray, quality: int) -> np.ndarray:
    """uint8 images (N, H, W, C), C 1 or 3, each encoded as JPEG at ``quality`` and decoded."""
    mode = {1: "L", 3: "RGB"}.get(u8.shape[3])
    if mode is None:
        raise BadParameter(f"JPEG takes 1 or 3 channels, got {u8.shape[3]}")
    out = np.empty_like(u8)
    for i, img in enumerate(u8):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if mode == "L" else img, mode).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert(mode)).reshape(img.shape)
    return out


# Pillow spends ~150 µs per small image, mostly per-call overhead, and defend feeds the same batches to every
# model behind the same setting: results are kept per (quality, batch bytes), least recently used first out.
_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
CACHE_BYTES = 512 * 2**20


def cached_round_trip(u8: np.ndarray, quality: int) -> np.ndarray:
    """``jpeg_round_trip``, remembered: the same images at the same quality are compressed once."""
    key = (quality, u8.shape, hashlib.blake2b(u8.tobytes(), digest_size=16).digest())
    out = _CACHE.get(key)
    if out is not None:
        _CACHE.move_to_end(key)
        return out
    out = jpeg_round_trip(u8, quality)
    out.setflags(write=False)
    _CACHE[key] = out
    while sum(v.nbytes for v in _CACHE.values()) > CACHE_BYTES:
        _CACHE.popitem(last=False)
    return out


class _Bpda(torch.autograd.Function):
    """Forward: the real JPEG round trip of the image rounded to uint8. Backward: the identity."""

    @staticmethod
    def forward(ctx, x: Tensor, quality: int) -> Tensor:  # noqa: ARG004 - ctx is autograd's
        u8 = (x.detach() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        back = torch.from_numpy(cached_round_trip(u8, quality).copy()).permute(0, 3, 1, 2)
        return back.to(device=x.device, dtype=x.dtype) / 255

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ARG004
        return grad, None


class Jpeg(nn.Module):
    """JPEG at ``quality`` (1 to 100) in front of a victim; gradients by BPDA (identity)."""

    def __init__(self, quality: int) -> None:
        super().__init__()
        self.quality = _quality(quality)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        return _Bpda.apply(x, self.quality)

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


def _quality(value: float) -> int:
    if isinstance(value, bool) or not float(value).is_integer() or not 1 <= value <= 100:
        raise BadParameter(f"--jpeg-quality must be a whole number in [1, 100], got {value!r}")
    return int(value)


register(Defense("jpeg", Jpeg, "jpeg_quality", (10.0, 30.0, 50.0, 70.0, 90.0), "JPEG qualities, 1 to 100 (Pillow).",
                 "JPEG compression before the victim", "JPEG quality", lambda v: f"JPEG q={int(v)}",
                 check=_quality, gradient="BPDA: identity on the backward pass (Athalye et al., 2018)"))
