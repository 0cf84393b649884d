"""The directions study's vocabulary and small tools: subspace families, picks, batched logits and accuracy,
orthonormal prefixes of a stack of vectors, bilinear resampling, the stored float copies."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen.errors import CorruptFile
from advgen.storage.shards import iter_tar


Family = Literal["pos", "neg", "negpos", "flat"]
CURVATURE_FAMILIES: dict[str, str] = {"pos": "S_pos", "neg": "S_neg", "negpos": "S_neg∪pos", "flat": "S_flat"}
SVD_FAMILIES: dict[str, str] = {"hi": "S_hi", "lo": "S_lo"}
RANK_TOL = 1e-7  # a column whose residual after the previous ones is below this (relative) adds no dimension


# --- small helpers ---------------------------------------------------------------------------------

def pick(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``min(k, n)`` distinct indices of range(n), drawn with ``generator``, sorted."""
    return torch.randperm(n, generator=generator)[: min(k, n)].sort().values


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor, *, batch_size: int = 256) -> Tensor:
    """Logits of ``x`` (N, …) in batches, fp32 or wider."""
    outs = [model(x[lo:lo + batch_size]) for lo in range(0, len(x), batch_size)]
    out = torch.cat(outs) if outs else torch.zeros(0)
    return out.to(torch.promote_types(out.dtype, torch.float32))


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256) -> float:
    return float((logits_of(model, x, batch_size=batch_size).argmax(1) == y).double().mean()) if len(x) else 0.0


def orthonormal_prefixes(stack: Tensor, *, tol: float = RANK_TOL, block: int = 64) -> tuple[Tensor, Tensor]:
    """(Q, kept): an orthonormal basis whose first r columns span the first k columns of ``stack`` (P, K).

    Gram–Schmidt in column order (twice, float64), so the span of every prefix is kept exactly; a column whose
    residual is below ``tol`` times its norm adds no dimension and is dropped (QR would put an arbitrary
    direction there). ``kept`` (sorted) holds the indices of the columns that stayed; ``rank_at(kept, k)`` is the
    dimension of span(stack[:, :k]). At most P columns. Blocks of ``block`` columns are projected off the basis
    so far at once (BLAS-3); a column already below ``tol`` then is dropped without further work; the others are
    taken one at a time against the block's own new columns.
    """
    a = stack.double()
    p, k = a.shape
    norms = a.norm(dim=0)
    basis = a.new_zeros(min(p, k), p)  # row i: the i-th basis vector (rows are contiguous)
    r = 0
    kept: list[int] = []
    for b0 in range(0, k, block):
        if r >= p:
            break
        blk = a[:, b0:b0 + block]
        for _ in range(2):
            blk = blk - basis[:r].T @ (basis[:r] @ blk)
        cols = blk.T.contiguous()
        alive = (cols.norm(dim=1) > tol * norms[b0:b0 + len(cols)]).tolist()
        first = r
        for i, v in enumerate(cols):
            if not alive[i] or r >= p:
                continue
            if r > first:
                new = basis[first:r]
                for _ in range(2):
                    v = v - (new @ v) @ new
            n = v.norm()
            if n > tol * norms[b0 + i]:
                basis[r] = v / n
                kept.append(b0 + i)
                r += 1
    return basis[:r].T.contiguous(), torch.tensor(kept, dtype=torch.int64)


def rank_at(kept: Tensor, k: int) -> int:
    """How many of the kept columns lie among the first ``k`` (see ``orthonormal_prefixes``)."""
    return int((kept < k).sum())


def resample_linear(x: Tensor, size: int) -> Tensor:
    """``Resample(size)`` without the final clamp: bicubic down to size x size and back, linear in ``x``
    (so it applies to perturbations, which are signed)."""
    h, w = x.shape[2:]
    if (h, w) == (size, size):
        return x
    small = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=size < h or size < w)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False, antialias=h < size or w < size)


def read_floats(folder: Path, stats: dict, split: str) -> tuple[Tensor, list[str]]:
    """The float images a variant stored as ``KEY.npy`` (``--store-float``): (N, C, H, W) float32 and keys.

    Read with ``allow_pickle=False``; every array must have the variant's shape and dtype float32.
    """
    shape = tuple(stats["shape"])
    arrays, keys = [], []
    for name in stats["shards"][split]:
        for key, members in iter_tar(Path(folder) / name):
            if "npy" not in members:
                raise CorruptFile(Path(folder) / name, f"sample {key} lacks .npy (the variant says store_float)")
            try:
                arr = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
            except ValueError as e:
                raise CorruptFile(Path(folder) / name, f"sample {key}: unreadable .npy ({e})") from None
            if arr.shape != shape or arr.dtype != np.float32:
                raise CorruptFile(Path(folder) / name, f"sample {key}: .npy is {arr.dtype} {arr.shape}, "
                                                       f"expected float32 {shape}")
            arrays.append(arr)
            keys.append(key)
    return torch.from_numpy(np.stack(arrays)), keys
