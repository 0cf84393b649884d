"""Class-score directions of a victim: Jetley, Lord & Torr (2018), "With friends like these, who needs adversaries?".

The paper's whole analysis on one victim, its clean data and its stored variants:

* curvature directions (Alg. 1): per target class c, the mean Hessian of F_c − F_ĉ at targeted-DeepFool
  boundary points of images not classified as c, and its eigenvectors (``curvature_directions``);
* gradient directions (Fig. 4): the SVD of stacked DeepFool perturbations (``gradient_directions``);
* accuracy on images projected onto subspaces of growing dimension (Fig. 3 top, Fig. 4; ``accuracy_vs_dims``);
* the fraction of a perturbation's norm inside those subspaces (Fig. 3 bottom; ``norm_fractions``);
* class scores along single directions (Figs. 1–2; ``class_profile``);
* DeepFool confined to a subspace (Fig. 5; ``confined_norms``);
* resampling before the victim, transferred and direct attacks (Table 1, §4.4; ``resampling_rows``,
  ``direct_attack_rows``).

Conventions. Images are float tensors (N, C, H, W) in pixel units ([0, 1] for natural images); P = C·H·W.
A basis is a (P, k) matrix with orthonormal columns; "d" in a family's grid counts directions per class
(curvature families) or in all (SVD families). Projections follow the paper's mean-normalised convention:
with ī the mean training image, the projection of i onto span(Q) is ī + Q Qᵀ (i − ī). Projected and
perturbed images may leave [0, 1]; they are fed to the model as they are (no clipping), since they are
probes of the function the network computes, not images to store.

Hessians. A ReLU network's logits are piecewise linear, so autograd's exact Hessian is zero almost
everywhere. ``mean_hessian`` instead uses central finite differences of input gradients at a chosen scale
h (pixel units): H v ≈ (∇g(x + h v) − ∇g(x − h v)) / 2h, for every pixel-basis vector v, batched over
(points × probes), averaged over the points and symmetrized; exact for a quadratic, the smoothed curvature
at scale h for a piecewise-linear net. Eigen-decompositions run in float64.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen.attacks import deepfool
from advgen.defenses import Defended, Resample
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


# --- curvature directions (Alg. 1) -----------------------------------------------------------------

def boundary_points(model: nn.Module, x: Tensor, target: int, *, max_iter: int = 50,
                    batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Targeted DeepFool (overshoot 0, unclipped) of ``x`` (N, C, H, W) to the ``target``-vs-rest boundary.

    Returns (points, source class ĉ = the clean prediction, converged mask, ‖r‖₂). Points of converged
    images lie just on the target side of the boundary (DeepFool's 1e-4 margin).
    """
    pts, src, ok, r = [], [], [], []
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size]
        pred = logits_of(model, xb).argmax(1)
        res = deepfool(model, xb, pred, target=torch.full_like(pred, target), overshoot=0.0, max_iter=max_iter,
                       clip=False)
        pts.append(res.x)
        src.append(pred)
        ok.append(res.converged & (pred != target))
        r.append(res.r_l2)
    if not pts:  # no image of another class: nothing to move
        return (x.new_zeros(0, *x.shape[1:]), torch.zeros(0, dtype=torch.int64, device=x.device),
                torch.zeros(0, dtype=torch.bool, device=x.device), x.new_zeros(0))
    return torch.cat(pts), torch.cat(src), torch.cat(ok), torch.cat(r)


def mean_hvp(model: nn.Module, points: Tensor, target: int | Tensor, source: Tensor, vectors: Tensor, *, h: float,
             batch_size: int = 256) -> Tensor:
    """Mean over ``points`` (N, C, H, W) of H_n v for every column v of ``vectors`` (P, K): (P, K) float64.

    H_n is the Hessian of g = F_target − F_source at point n, seen by central finite differences of input
    gradients at scale ``h`` (pixel units) along each v: H v ≈ (∇g(x + h v) − ∇g(x − h v)) / 2h, exact for a
    quadratic. Each batch holds up to ``batch_size`` perturbed points (points × probes × ±); one backward pass
    gives every per-sample gradient (samples are independent in eval mode). No P x P matrix per sample is
    ever formed; the sum over points is the only accumulator.
    """
    n, shape = points.shape[0], points.shape[1:]
    p = math.prod(shape)
    dev = points.device
    flat = points.reshape(n, p)
    vec = vectors.to(dev, flat.dtype)
    kk = vec.shape[1]
    tgt = target.to(dev) if isinstance(target, Tensor) else torch.full((n,), int(target), device=dev)
    total = torch.zeros(p, kk, dtype=torch.float64, device=dev)
    nb = max(1, min(n, batch_size // 2))
    for a in range(0, n, nb):
        pts, t, s = flat[a:a + nb], tgt[a:a + nb], source[a:a + nb].to(dev)
        m = len(pts)
        k = max(1, batch_size // (2 * m))
        for j0 in range(0, kk, k):
            probe = h * vec[:, j0:j0 + k].T  # (k, P)
            xb = torch.cat([pts[:, None] + probe[None], pts[:, None] - probe[None]]).reshape(-1, *shape)
            xb.requires_grad_(True)
            out = model(xb)
            rows = torch.arange(m, device=dev).repeat_interleave(len(probe)).repeat(2)
            g = out.gather(1, t[rows, None]) - out.gather(1, s[rows, None])
            (grad,) = torch.autograd.grad(g.sum(), xb)
            grad = grad.reshape(2, m, len(probe), p).double()
            total[:, j0:j0 + len(probe)] += (grad[0] - grad[1]).sum(0).T
    return total / (2 * h * n)


def mean_hessian(model: nn.Module, points: Tensor, target: int | Tensor, source: Tensor, *, h: float,
                 batch_size: int = 256) -> Tensor:
    """Mean over ``points`` (N, C, H, W) of the Hessian of g = F_target − F_source, (P, P) float64, symmetric.

    ``mean_hvp`` along every pixel-basis vector e_j (column j is the mean of (∇gₙ(xₙ + h e_j) −
    ∇gₙ(xₙ − h e_j)) / 2h), symmetrized.
    """
    p = math.prod(points.shape[1:])
    total = mean_hvp(model, points, target, source, torch.eye(p, dtype=points.dtype, device=points.device), h=h,
                     batch_size=batch_size)
    return (total + total.T) / 2


def grouped_hvp(model: nn.Module, points: Tensor, target: Tensor, source: Tensor, group: Tensor, vectors: Tensor, *,
                h: float, batch_size: int = 256) -> Tensor:
    """``mean_hvp`` for G groups at once: group g's mean over its points (``group`` == g) of H_n v for every
    column v of ``vectors[g]`` (G, P, K), as (G, P, K) float64; H_n is the Hessian of F_target − F_source at
    point n. The perturbed points of every group share the batches (``batch_size`` inputs each), so many
    small groups (one class's boundary points each) cost a few large passes instead of many small ones."""
    n, shape = points.shape[0], points.shape[1:]
    p = math.prod(shape)
    dev = points.device
    flat = points.reshape(n, p)
    vec = vectors.to(dev, flat.dtype).transpose(1, 2)  # (G, K, P)
    num, kk = vec.shape[0], vec.shape[1]
    group, target, source = group.to(dev), target.to(dev), source.to(dev)
    total = torch.zeros(num, kk, p, dtype=torch.float64, device=dev)
    point = torch.arange(n, device=dev).repeat_interleave(kk)  # one row per (point, probe)
    probe = torch.arange(kk, device=dev).repeat(n)
    step = max(1, batch_size // 2)
    for a in range(0, len(point), step):
        i, j = point[a:a + step], probe[a:a + step]
        d = h * vec[group[i], j]  # (m, P)
        xb = torch.cat([flat[i] + d, flat[i] - d]).reshape(-1, *shape)
        xb.requires_grad_(True)
        out = model(xb)
        t, s = target[i].repeat(2), source[i].repeat(2)
        g = out.gather(1, t[:, None]) - out.gather(1, s[:, None])
        (grad,) = torch.autograd.grad(g.sum(), xb)
        grad = grad.reshape(2, len(i), p).double()
        total.index_put_((group[i], j), grad[0] - grad[1], accumulate=True)
    count = torch.bincount(group, minlength=num).clamp_min(1).to(torch.float64)
    return (total / (2 * h * count[:, None, None])).transpose(1, 2)


@dataclass
class Sketch:
    """A sketched spectrum (see ``sketch_eigh``): ``values`` (P,) float64 descending; the eigenvector of any rank
    on demand (``columns``), so a caller keeping a few of P columns never builds the P x P matrix."""

    values: Tensor
    ritz: Tensor  # (P, k) the Ritz vectors, in the order of ``values``' first k (unsorted) entries
    reflectors: Tensor  # geqrf of ``ritz``: its Householder reflectors and their scales
    tau: Tensor
    order: Tensor  # (P,) rank -> index into [ritz | completion]

    def columns(self, ranks: Tensor) -> Tensor:
        """Eigenvectors of eigenvalue ranks ``ranks`` (n,) as (P, n) float64 columns."""
        ranks = torch.as_tensor(ranks, dtype=torch.int64).reshape(-1)
        p, k = self.ritz.shape
        idx = self.order[ranks]
        out = self.ritz.new_empty(p, len(idx))
        ritz = idx < k
        out[:, ritz] = self.ritz[:, idx[ritz]]
        rest = (~ritz).nonzero().flatten()
        if len(rest):  # column j of the complete Q = Q·e_j, applied as k reflectors: O(P·k) per column
            unit = self.ritz.new_zeros(p, len(rest))
            unit[idx[rest], torch.arange(len(rest))] = 1.0
            out[:, rest] = torch.ormqr(self.reflectors, self.tau, unit)
        return out


def sketch_eigh(hvp: Callable[[Tensor], Tensor], p: int, probes: int, generator: torch.Generator) -> Sketch:
    """Eigenpairs of a symmetric P x P operator seen only through ``hvp`` (P, K) -> (P, K), from 2·``probes``
    products instead of P: Halko, Martinsson & Tropp's randomized range finder (Gaussian probes Ω drawn with
    ``generator``, Q = orth(HΩ)), then the Rayleigh–Ritz step eigh(Qᵀ H Q). The spectrum: the ``probes`` Ritz
    pairs, and an orthonormal completion of span(Q) (the last P − k columns of a complete QR of the Ritz
    vectors) with eigenvalue 0 — curvature the sketch did not resolve, ranked as flat. Exact when H has rank
    at most ``probes``.
    """
    return sketch_eighs(lambda v: hvp(v[0])[None], 1, p, probes, generator)[0]


def sketch_eighs(hvp: Callable[[Tensor], Tensor], count: int, p: int, probes: int,
                 generator: torch.Generator) -> list[Sketch]:
    """``sketch_eigh`` of ``count`` operators at once, seen through ``hvp`` (count, P, K) -> (count, P, K) (so
    their products can share batches: ``grouped_hvp``); operator g's probes are the g-th drawn."""
    omega = torch.randn(count, p, probes, generator=generator, dtype=torch.float64)
    omega /= omega.norm(dim=1, keepdim=True)  # unit probes: the finite-difference step is h along each, as on a pixel
    q = torch.linalg.qr(hvp(omega).cpu())[0]
    return [rayleigh_ritz(qg, zg) for qg, zg in zip(q, hvp(q).cpu())]


def rayleigh_ritz(q: Tensor, z: Tensor) -> Sketch:
    """The ``Sketch`` from the range basis Q (P, k) and Z = HQ: eigh(QᵀZ) (symmetrized), Ritz vectors QU."""
    p, probes = q.shape
    b = q.T @ z
    lam, u = torch.linalg.eigh((b + b.T) / 2)
    ritz = q @ u
    reflectors, tau = torch.geqrf(ritz)
    values = torch.cat([lam, lam.new_zeros(p - probes)])
    order = values.argsort(descending=True, stable=True)
    return Sketch(values[order], ritz, reflectors, tau, order)


@dataclass
class Curvature:
    """Per class c: eigenvalues (C, P) float64, descending (the whole spectrum); eigenvectors (C, P, K) float32;
    columns (C, K) int64, sorted: the eigenvalue rank of each stored eigenvector column (None: K = P, column k
    belongs to eigenvalue k); points (C,) boundary points averaged; mean targeted-DeepFool ‖r‖₂ per class."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    points: list[int]
    mean_r_l2: list[float | None]
    columns: Tensor | None = None

    def vectors(self, c: int, ranks: Tensor) -> Tensor:
        """Class ``c``'s eigenvectors of eigenvalue ranks ``ranks`` (n,) as (P, n) columns."""
        ranks = torch.as_tensor(ranks, dtype=torch.int64).reshape(-1)
        if self.columns is None:
            return self.eigenvectors[c][:, ranks]
        held = self.columns[c]
        at = torch.searchsorted(held, ranks).clamp(max=len(held) - 1)
        if not torch.equal(held[at], ranks):
            missing = sorted(set(ranks.tolist()) - set(held.tolist()))
            raise ValueError(f"class {c}: eigenvectors of rank {missing[:5]} were not kept")
        return self.eigenvectors[c][:, at]


def held_ranks(eigenvalues: Tensor, keep: int, size: int) -> Tensor:
    """The eigenvalue ranks a class keeps (sorted, ``size`` of them): the ``keep`` most positive, the ``keep``
    most negative and the ``keep`` flattest, topped up with the lowest other ranks to exactly ``size``."""
    p = eigenvalues.shape[0]
    want = torch.cat([torch.arange(keep), torch.arange(p - keep, p), family_order(eigenvalues, "flat")[:keep]]).unique()
    free = torch.ones(p, dtype=torch.bool)
    free[want] = False
    return torch.cat([want, free.nonzero().flatten()[: size - len(want)]]).sort().values


def curvature_directions(model: nn.Module, x: Tensor, pred: Tensor, num_classes: int, *, per_class: int, h: float,
                         generator: torch.Generator, probes: int = 0, keep: int | None = None, max_iter: int = 50,
                         batch_size: int = 256, on_class: Callable[[int], None] | None = None) -> Curvature:
    """Alg. 1 for every class c: ``per_class`` images of ``x`` not predicted as c (drawn with ``generator``),
    targeted DeepFool to the c boundary, the mean Hessian of F_c − F_ĉ there (ĉ the clean prediction), eigh.
    The sketches of all classes share their batches of Hessian-vector products (``grouped_hvp``).

    ``probes`` 0 (or ≥ P): the whole finite-difference Hessian (``mean_hessian``, P products per point).
    Otherwise ``sketch_eigh`` with that many Gaussian probes (2·probes products per point): the dominant
    curvature directions of both signs, the rest flat. ``keep``: store per class only the eigenvectors of the
    ``keep`` most positive, most negative and flattest eigenvalues (``held_ranks``; None keeps all P: C·P²
    floats, 3.8 GB for CIFAR-100). A class with no converged point gets a zero Hessian (pixel-basis
    eigenvectors, zero eigenvalues) and 0 points.
    """
    p = math.prod(x.shape[1:])
    size = p if keep is None or 3 * keep >= p else 3 * keep
    values = torch.zeros(num_classes, p, dtype=torch.float64)
    vectors = torch.zeros(num_classes, p, size, dtype=torch.float32)
    columns = torch.zeros(num_classes, size, dtype=torch.int64)
    points: list[tuple[Tensor, Tensor]] = []  # per class: its converged boundary points and their classes ĉ
    counts, norms = [], []
    for c in range(num_classes):
        pool = (pred != c).nonzero().flatten()
        idx = pool[pick(len(pool), per_class, generator)]
        pts, src, ok, r = boundary_points(model, x[idx], c, max_iter=max_iter, batch_size=batch_size)
        points.append((pts[ok], src[ok]))
        counts.append(int(ok.sum()))
        norms.append(float(r[ok].double().mean()) if ok.any() else None)
    sketches: dict[int, Sketch] = {}
    found = [c for c in range(num_classes) if counts[c]]
    if 0 < probes < p and found:  # every class's sketch in the same batches: two grouped passes
        pts = torch.cat([points[c][0] for c in found])
        src = torch.cat([points[c][1] for c in found])
        group = torch.cat([torch.full((counts[c],), g, dtype=torch.int64) for g, c in enumerate(found)])
        tgt = torch.tensor(found, dtype=torch.int64)[group]

        sketches = dict(zip(found, sketch_eighs(
            lambda v: grouped_hvp(model, pts, tgt, src, group, v, h=h, batch_size=batch_size), len(found), p, probes,
            generator)))
    for c in range(num_classes):
        sketch = sketches.get(c)
        if sketch is not None:
            lam, vec = sketch.values, None
        elif counts[c]:
            hess = mean_hessian(model, points[c][0], c, points[c][1], h=h, batch_size=batch_size).cpu()
            lam, vec = torch.linalg.eigh(hess)
            lam, vec = lam.flip(0), vec.flip(1)
        else:  # no boundary point: a zero Hessian, whose eigenvectors may as well be the pixel basis
            lam, vec = torch.zeros(p, dtype=torch.float64), None
        cols = torch.arange(p) if size == p else held_ranks(lam, keep, size)  # type: ignore[arg-type]
        values[c], columns[c] = lam, cols
        if sketch is not None:
            vectors[c] = sketch.columns(cols).float()
        elif vec is None:
            vectors[c][cols, torch.arange(size)] = 1.0
        else:
            vectors[c] = vec[:, cols].float()
        if on_class is not None:
            on_class(c)
    return Curvature(values, vectors, counts, norms, None if size == p else columns)


PICKS = ("pos 1", "pos 2", "neg 1", "neg 2", "flat")


def pick_ranks(eigenvalues: Tensor) -> list[int]:
    """The eigenvalue ranks of ``PICKS`` for one class's spectrum (descending)."""
    p = eigenvalues.shape[0]
    return [0, min(1, p - 1), p - 1, max(p - 2, 0), int(eigenvalues.abs().argmin())]


def curvature_picks(curv: Curvature) -> Tensor:
    """(C, P, 5) float32: per class the eigenvectors named in ``PICKS``."""
    return torch.stack([curv.vectors(c, torch.tensor(pick_ranks(curv.eigenvalues[c])))
                        for c in range(curv.eigenvalues.shape[0])]).float()


def family_order(eigenvalues: Tensor, family: Literal["pos", "neg", "flat"]) -> Tensor:
    """Eigenvalue ranks of one class (spectrum stored descending) in a family's order: most positive first,
    most negative first, or flattest (smallest |λ|) first. (P,) int64."""
    p = eigenvalues.shape[0]
    if family == "pos":
        return torch.arange(p)
    if family == "neg":
        return torch.arange(p).flip(0)
    return eigenvalues.abs().argsort(stable=True)


def family_stack(curv: Curvature, family: Family, columns: int) -> Tensor:
    """The first ``columns`` directions of a curvature family, (P, columns) float64, interleaved by rank
    (class 0's 1st, class 1's 1st, …, class 0's 2nd, …) so the first C·d columns are d per class;
    ``negpos`` interleaves the r-th most positive of every class, then the r-th most negative."""
    num_classes, p = curv.eigenvalues.shape
    parts = ("pos", "neg") if family == "negpos" else (family,)
    ranks = min(p, -(-columns // (num_classes * len(parts))))
    picked = torch.stack([torch.stack([curv.vectors(c, family_order(curv.eigenvalues[c], part)[:ranks]).T
                                       for c in range(num_classes)], dim=1) for part in parts], dim=1)
    return picked.reshape(-1, p).T[:, :columns].double()  # (ranks, parts, classes, P) -> columns in that order


def family_columns(family: str, d: int, num_classes: int) -> int:
    """Directions a family takes at grid point d: d per class (twice for S_neg∪pos), or d for S_hi/S_lo."""
    if family in SVD_FAMILIES:
        return d
    return d * num_classes * (2 if family == "negpos" else 1)


# --- gradient directions (Fig. 4) -------------------------------------------------------------------

def gradient_directions(deltas: Tensor) -> tuple[Tensor, Tensor]:
    """SVD of stacked perturbations ``deltas`` (M, …): (V (P, P) float64, singular values (P,) float64).

    V's columns are the right singular vectors ordered high to low (S_hi; reversed, S_lo); directions
    beyond the rank (singular value 0) complete the basis. Computed in float64 as eigh(δᵀδ) (P x P) when
    M ≥ P; with fewer perturbations than pixels, as eigh(δδᵀ) (M x M), Vᵣ = δᵀUᵣ/σᵣ for the singular
    values above 1e-6 of the largest, and a complete QR of Vᵣ for the rest (O(M²P + P²M), not O(P³)).
    """
    a = deltas.reshape(len(deltas), -1).double()
    m, p = a.shape
    if m >= p:
        lam, vec = torch.linalg.eigh(a.T @ a)
        return vec.flip(1), lam.flip(0).clamp_min(0).sqrt()
    lam, u = torch.linalg.eigh(a @ a.T)
    sv, u = lam.flip(0).clamp_min(0).sqrt(), u.flip(1)
    # σ from the Gram matrix is good to about sqrt(machine ε)·σ_max: below 1e-6 of the largest, call it 0
    r = int((sv > 1e-6 * sv[0]).sum()) if m and sv[0] > 0 else 0
    if not r:
        return torch.eye(p, dtype=a.dtype, device=a.device), sv.new_zeros(p)
    q, rr = torch.linalg.qr(a.T @ u[:, :r] / sv[:r])  # re-orthonormalized in order (each column keeps its sign)
    v = q * rr.diagonal().sign()
    rest = torch.linalg.qr(v, mode="complete")[0][:, r:]
    return torch.cat([v, rest], dim=1), torch.cat([sv[:r], sv.new_zeros(p - r)])


def deepfool_perturbations(model: nn.Module, x: Tensor, *, candidates: int = 10, overshoot: float = 0.02,
                           max_iter: int = 50, batch_size: int = 256) -> Tensor:
    """DeepFool's perturbations of ``x`` (N, C, H, W) in [0, 1], away from the model's own predictions and
    clipped to [0, 1] as a stored copy's are: the nonzero ones, (M, C, H, W), M ≤ N."""
    out = []
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size]
        res = deepfool(model, xb, logits_of(model, xb).argmax(1), candidates=candidates, overshoot=overshoot,
                       max_iter=max_iter)
        out.append((res.x - xb).detach())
    delta = torch.cat(out) if out else x.new_zeros(0, *x.shape[1:])
    return delta[delta.flatten(1).norm(dim=1) > 0]


# --- projections ----------------------------------------------------------------------------------

def accuracy_vs_dims(model: nn.Module, x: Tensor, y: Tensor, mean: Tensor, basis: Tensor, ranks: Sequence[int], *,
                     batch_size: int = 256) -> list[float]:
    """Accuracy on ī + Q_r Q_rᵀ (x − ī) for every r in ``ranks`` (Q_r: the first r columns of ``basis``).

    ``x`` (N, C, H, W), ``mean`` (C, H, W), ``basis`` (P, K). Coordinates come from one matmul; each
    rank costs one more (float64, so r = P gives back x to float32 precision). Unclipped.
    """
    shape, dev = x.shape[1:], x.device
    q = basis.to(dev, torch.float64)
    centred = (x - mean).reshape(len(x), -1).double()
    z = centred @ q
    out = []
    for r in ranks:
        proj = (mean.reshape(1, -1).double() + z[:, :r] @ q[:, :r].T).to(x.dtype).reshape(len(x), *shape)
        out.append(accuracy(model, proj, y, batch_size=batch_size))
    return out


def norm_fractions(deltas: Tensor, basis: Tensor, ranks: Sequence[int]) -> tuple[list[float | None], int]:
    """Mean over the nonzero rows of ``deltas`` (M, …) of ‖Q_rᵀ δ‖ / ‖δ‖, for every r in ``ranks``;
    and how many rows took part. One matmul (float64) and a cumulative sum."""
    a = deltas.reshape(len(deltas), -1).double()
    a = a[a.norm(dim=1) > 0]
    if not len(a):
        return [None] * len(ranks), 0
    z2 = (a @ basis.to(a.device, torch.float64)).square().cumsum(1)
    z2 = torch.cat([torch.zeros(len(a), 1, dtype=z2.dtype, device=z2.device), z2], dim=1)
    total = a.square().sum(1)
    return [float((z2[:, r].clamp(max=total) / total).sqrt().mean()) for r in ranks], len(a)


def projection_norms(x: Tensor, mean: Tensor, basis: Tensor, ranks: Sequence[int]) -> list[float]:
    """Mean ‖Q_rᵀ (x − ī)‖₂ of images ``x`` (N, C, H, W) for every r in ``ranks`` (Fig. 5, red)."""
    z2 = (((x - mean).reshape(len(x), -1).double()) @ basis.to(x.device, torch.float64)).square().cumsum(1)
    z2 = torch.cat([torch.zeros(len(x), 1, dtype=z2.dtype, device=z2.device), z2], dim=1)
    return [float(z2[:, r].sqrt().mean()) for r in ranks]


def saliency(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256) -> Tensor:
    """Simonyan et al.'s saliency maps: ∇ₓ F_y(x), the gradient of the true class score, (N, C, H, W)."""
    grads = []
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size].detach().requires_grad_(True)
        score = model(xb).gather(1, y[lo:lo + batch_size, None]).sum()
        grads.append(torch.autograd.grad(score, xb)[0])
    return torch.cat(grads)


# --- class-score profiles (Figs. 1–2) ----------------------------------------------------------------

@dataclass
class Profile:
    """Class scores along i + s·v for a target class, per s (lists of len(s)).

    target / other: (p30, median, p70) of F_c and of max_{k≠c} F_k over all images; into_target: the
    fraction of images not predicted c when clean (s = 0) that are predicted c at s; into_softmax: their
    median softmax score of c; stay_target: the fraction of images predicted c when clean still predicted c;
    curves: F_c(i + s·v) of the first few images (Fig. 1).
    """

    s: list[float]
    target: tuple[list[float], list[float], list[float]]
    other: tuple[list[float], list[float], list[float]]
    into_target: list[float | None]
    into_softmax: list[float | None]
    stay_target: list[float | None]
    curves: list[list[float]]


def class_profile(model: nn.Module, x: Tensor, direction: Tensor, target: int, s: Sequence[float], *,
                  curves: int = 12, batch_size: int = 256) -> Profile:
    """``Profile`` of class ``target`` along the unit vector ``direction`` (P,) from images ``x`` (N, C, H, W).

    All (image, s) pairs go through the model in batches; images are not clipped.
    """
    n, shape = len(x), x.shape[1:]
    v = direction.to(x.device, x.dtype).reshape(1, 1, -1)
    sv = torch.tensor(list(s), dtype=x.dtype, device=x.device).reshape(1, -1, 1)
    probes = (x.reshape(n, 1, -1) + sv * v).reshape(-1, *shape)
    logits = logits_of(model, probes, batch_size=batch_size).reshape(n, len(s), -1).double()
    tgt = logits[:, :, target]
    others = logits.clone()
    others[:, :, target] = -math.inf
    best = others.amax(2)
    pred = logits.argmax(2)
    soft = logits.softmax(2)[:, :, target]
    was = logits_of(model, x, batch_size=batch_size).argmax(1) == target  # the clean prediction (s = 0)

    def bands(t: Tensor) -> tuple[list[float], list[float], list[float]]:
        qs = torch.quantile(t, torch.tensor([0.3, 0.5, 0.7], dtype=t.dtype, device=t.device), dim=0)
        return qs[0].tolist(), qs[1].tolist(), qs[2].tolist()

    def frac(mask: Tensor, rows: Tensor) -> list[float | None]:
        return [float(mask[rows, i].double().mean()) if rows.any() else None for i in range(len(s))]

    into = pred == target
    med = [float(torch.quantile(soft[~was, i], 0.5)) if (~was).any() else None for i in range(len(s))]
    return Profile(s=[float(v) for v in s], target=bands(tgt), other=bands(best), into_target=frac(into, ~was),
                   into_softmax=med, stay_target=frac(into, was), curves=tgt[:curves].tolist())


# --- confined DeepFool (Fig. 5) -----------------------------------------------------------------------

def deepfool_norms(model: nn.Module, x: Tensor, *, basis: Tensor | None = None, candidates: int = 10,
                   overshoot: float = 0.02, max_iter: int = 50,
                   batch_size: int = 256) -> tuple[float | None, float | None]:
    """DeepFool of ``x`` away from ``model``'s own predictions, unclipped, confined to span(``basis``) if given:
    (mean ‖r‖₂ over the images it fooled, the fraction it fooled); None where there is nothing to average."""
    norms, ok = [], []
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size]
        res = deepfool(model, xb, logits_of(model, xb).argmax(1), candidates=candidates, overshoot=overshoot,
                       max_iter=max_iter, basis=basis, clip=False)
        norms.append(res.r_l2)
        ok.append(res.converged)
    if not ok:
        return None, None
    nrm, conv = torch.cat(norms).double(), torch.cat(ok)
    return (float(nrm[conv].mean()) if conv.any() else None), float(conv.double().mean())


def confined_norms(model: nn.Module, x: Tensor, basis: Tensor, ranks: Sequence[int], *, candidates: int = 10,
                   overshoot: float = 0.02, max_iter: int = 50,
                   batch_size: int = 256) -> tuple[list[float | None], list[float | None]]:
    """DeepFool confined to span(Q_r) (gradients projected before each linearized step; unclipped) on ``x``
    against its own predictions, for every r in ``ranks``: (mean ‖r‖₂ over the converged images, converged
    fraction). r = 0 gives (None, 0)."""
    means, rates = [], []
    for r in ranks:
        if r == 0:
            means.append(None)
            rates.append(0.0)
            continue
        mean, rate = deepfool_norms(model, x, basis=basis[:, :r].to(x.device, x.dtype).contiguous(),
                                    candidates=candidates, overshoot=overshoot, max_iter=max_iter,
                                    batch_size=batch_size)
        means.append(mean)
        rates.append(rate)
    return means, rates


# --- resampling (Table 1, §4.4) -----------------------------------------------------------------------

def resampling_rows(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, sizes: Sequence[int],
                    factors: Sequence[float], *, batch_size: int = 256) -> list[dict]:
    """Table 1: per resampling size, the defended network's accuracy on ``x`` (N, C, H, W) with labels ``y``,
    mean ‖R(i)‖₂ of the resampled images, mean ‖R_lin(δ)‖₂ of the resampled perturbations, and the fooling
    rate of i + f·δ for every f: the fraction of images with δ ≠ 0 whose defended prediction differs from
    that on i. Perturbed images are not clipped before the resampling unit (which clamps its output)."""
    hit = delta.reshape(len(delta), -1).norm(dim=1) > 0
    rows = []
    for size in sizes:
        net = Defended(Resample(int(size)), model)
        clean_pred = logits_of(net, x, batch_size=batch_size).argmax(1)
        with torch.no_grad():
            r_img = torch.cat([Resample(int(size))(x[lo:lo + batch_size]) for lo in range(0, len(x), batch_size)])
            r_delta = resample_linear(delta[hit], int(size))
        row = {"size": int(size), "accuracy": float((clean_pred == y).double().mean()),
               "mean_image_l2": float(r_img.reshape(len(x), -1).double().norm(dim=1).mean()),
               "mean_delta_l2": float(r_delta.reshape(len(r_delta), -1).double().norm(dim=1).mean())
               if hit.any() else None,
               "attacked": int(hit.sum()), "fooling_rate": {}}
        for f in factors:
            if not hit.any():  # the copy changed none of these images: no rate to measure
                row["fooling_rate"][f"{f:g}"] = None
                continue
            pred = logits_of(net, x[hit] + f * delta[hit], batch_size=batch_size).argmax(1)
            row["fooling_rate"][f"{f:g}"] = float((pred != clean_pred[hit]).double().mean())
        rows.append(row)
    return rows


def downsampled_basis(deltas: Tensor, size: int, *, tol: float = 1e-6) -> Tensor:
    """(P, r) orthonormal basis of the span of the up-sampled right singular vectors of ``deltas`` (M, C, H, W)
    down-sampled to size x size (bicubic, as ``Resample`` does): the directions the resampled network keeps
    that the perturbations use. Singular values below ``tol`` times the largest are dropped."""
    h, w = deltas.shape[2:]
    small = deltas if (h, w) == (size, size) else F.interpolate(
        deltas, size=(size, size), mode="bicubic", align_corners=False, antialias=size < h or size < w)
    vec, sv = gradient_directions(small)
    keep = vec[:, sv > tol * sv[0].clamp_min(1e-300)].T.reshape(-1, *small.shape[1:]).to(deltas.dtype)
    up = keep if (h, w) == (size, size) else F.interpolate(
        keep, size=(h, w), mode="bicubic", align_corners=False, antialias=h < size or w < size)
    q, _ = orthonormal_prefixes(up.reshape(len(up), -1).T)
    return q.to(deltas.dtype)


def direct_attack_rows(model: nn.Module, x: Tensor, deltas: Tensor, sizes: Sequence[int], *, candidates: int = 10,
                       overshoot: float = 0.02, max_iter: int = 50, batch_size: int = 256) -> list[dict]:
    """§4.4's direct attacks on the resampled network, per size: DeepFool through the resampling unit, and
    DeepFool confined to ``downsampled_basis(deltas, size)``; each against the defended network's own
    predictions on ``x``, unclipped: mean ‖r‖₂ over the images it fooled and the fraction it fooled."""
    rows = []
    for size in sizes:
        net = Defended(Resample(int(size)), model)
        basis = downsampled_basis(deltas, int(size))
        row: dict = {"size": int(size), "basis_rank": int(basis.shape[1])}
        for name, b in (("deepfool", None), ("confined", basis)):
            row[f"{name}_mean_r_l2"], row[f"{name}_success"] = deepfool_norms(
                net, x, basis=b, candidates=candidates, overshoot=overshoot, max_iter=max_iter, batch_size=batch_size)
        rows.append(row)
    return rows


# --- the whole analysis ------------------------------------------------------------------------------

HESSIAN_ESTIMATOR = ("central finite differences of input gradients, H·e_j ≈ (∇g(x + h·e_j) − ∇g(x − h·e_j)) / 2h "
                     "for every pixel-basis vector e_j, averaged over the boundary points and symmetrized")
SKETCH_ESTIMATOR = ("central finite differences of input gradients along unit probes, H·v ≈ (∇g(x + h·v) − "
                    "∇g(x − h·v)) / 2h, averaged over the boundary points; a randomized range finder on {k} Gaussian "
                    "probes and a Rayleigh–Ritz step on {k} more (Halko et al., 2011), the rest of the space flat")


@dataclass(frozen=True)
class Settings:
    """What ``analyze`` computes and how much of it (the stage's options; see ``advgen directions --help``)."""

    per_class: int = 4  # boundary points per target class (Alg. 1 averages over every image not of the class)
    fd_scale: float = 0.25  # h of the finite-difference Hessian, pixel units
    probes: int = 0  # 0: the whole Hessian (P products per point); k: a rank-k sketch (2k products per point)
    dims: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)  # per class, curvature families; the full space is added
    svd_dims: tuple[int, ...] = (0, 4, 9, 16, 32, 64, 128, 256)  # in all, S_hi / S_lo; the full space is added
    profile_classes: int = 3
    profile_images: int = 200
    s_values: tuple[float, ...] = tuple(float(v) for v in np.linspace(-10, 10, 21))
    curves: int = 12  # individual curves kept per profile (Fig. 1)
    confined_images: int = 50
    resample_sizes: tuple[int, ...] = (24, 20, 16, 12)  # the identity (full size) row is added
    factors: tuple[float, ...] = (1, 2, 3, 4, 5, 10)
    candidates: int = 10
    overshoot: float = 0.02
    max_iter: int = 50
    batch_size: int = 256
    seed: int = 0


@dataclass
class Inputs:
    """Everything ``analyze`` looks at, already on the device, float images (N, C, H, W).

    train / test: (images, labels) subsets; mean: ī (C, H, W) over the whole training split; perturbations:
    {name: δ (M, C, H, W)} of the stored variants (any images); svd_deltas: DeepFool perturbations stacked
    for the gradient basis (nonzero rows); table: (images, labels, DeepFool δ of those images) for Table 1.
    """

    model: nn.Module
    classes: list[str]
    mean: Tensor
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    perturbations: dict[str, Tensor]
    svd_deltas: Tensor
    table: tuple[Tensor, Tensor, Tensor]


@dataclass
class Analysis:
    metrics: dict  # JSON-able results (layout: ``analyze``)
    bases: dict[str, np.ndarray]  # file stem -> float32 array
    tables: dict[str, tuple[list[str], list[dict]]]  # plot table name -> (columns, rows)


def _grid(values: Sequence[int], full: int) -> list[int]:
    return sorted({int(v) for v in values} | {full})


def analyze(inp: Inputs, st: Settings, *, log: Callable[[str], None] = lambda m: None,
            clock: Callable[[], float] | None = None) -> Analysis:
    """Run the paper's analysis (module docstring) on ``inp`` with ``st``; ``clock`` times the parts.

    Grids: ``st.dims`` (per class) and ``st.svd_dims`` (in all), each with the full space added. Metrics
    (lists run along the grid ``d`` beside them)::

        input_dim, num_classes, classes, images {train, test, profile, confined, table, svd},
        clean_accuracy {train, test}, mean_image_l2,
        hessian {estimator, fd_scale, probes, points_requested, precision,
                 per_class {class: {points, mean_r_l2, top (3 largest λ), bottom (3 smallest)}}},
        svd {singular_values (the first 4C), rank},
        accuracy {pos|neg|negpos|flat|hi|lo: {d, rank, train, test}},
        fractions {variant name | saliency: {kind, images, pos|…|lo: {d, fraction}}},
        profiles {class: {class, points, pos|neg|flat: {eigenvalue, rank, s, target {p30, median, p70},
                  other {p30, median, p70}, into_target, into_softmax, stay_target, curves}}},
        confined {images, hi|lo: {d, mean_r_l2, converged, projection_l2}},
        resampling {side, factors, rows [{size, accuracy, mean_image_l2, mean_delta_l2, attacked,
                    fooling_rate {f: rate}}], direct [{size, basis_rank, deepfool_mean_r_l2, deepfool_success,
                    confined_mean_r_l2, confined_success}]},
        timings {curvature, svd, accuracy, fractions, profiles, confined, resampling}  (seconds)
    """
    clock = clock or time.perf_counter
    model, classes = inp.model, inp.classes
    xtr, ytr = inp.train
    xte, yte = inp.test
    num_classes, p = len(classes), math.prod(xtr.shape[1:])
    bs = st.batch_size
    timings: dict[str, float] = {}
    gen = torch.Generator().manual_seed(st.seed)

    def timed(name: str, t0: float) -> None:
        timings[name] = round(clock() - t0, 3)

    full_c = -(-p // num_classes)
    dims, svd_dims = _grid(st.dims, full_c), _grid(st.svd_dims, p)

    t0 = clock()
    pred_tr = logits_of(model, xtr, batch_size=bs).argmax(1)
    sketch = 0 < st.probes < p
    log(f"curvature: {st.per_class} boundary point(s) per class, finite-difference Hessians at h = {st.fd_scale:g}"
        + (f", rank-{st.probes} sketches" if sketch else ""))
    curv = curvature_directions(model, xtr, pred_tr, num_classes, per_class=st.per_class, h=st.fd_scale,
                                generator=gen, probes=st.probes, keep=min(p, max(2, max(dims))), max_iter=st.max_iter,
                                batch_size=bs,
                                on_class=lambda c: log(f"curvature: class {c + 1}/{num_classes} done"))
    timed("curvature", t0)

    t0 = clock()
    svd_vec, svd_val = gradient_directions(inp.svd_deltas)
    timed("svd", t0)

    # Bases per family, as prefixes of one orthonormal matrix each; ranks per grid point.
    bases: dict[str, tuple[Tensor, list[int], list[int]]] = {}
    for fam in CURVATURE_FAMILIES:
        cols = min(family_columns(fam, max(dims), num_classes), p * num_classes * (2 if fam == "negpos" else 1))
        q, kept = orthonormal_prefixes(family_stack(curv, fam, cols))  # type: ignore[arg-type]
        bases[fam] = (q, dims, [rank_at(kept, family_columns(fam, d, num_classes)) for d in dims])
    bases["hi"] = (svd_vec, svd_dims, svd_dims)
    bases["lo"] = (svd_vec.flip(1), svd_dims, svd_dims)

    t0 = clock()
    acc: dict[str, dict] = {}
    for fam, (q, grid, ranks) in bases.items():
        log(f"accuracy: {fam} ({len(grid)} dimensions)")
        acc[fam] = {"d": grid, "rank": ranks,
                    "train": accuracy_vs_dims(model, xtr, ytr, inp.mean, q, ranks, batch_size=bs),
                    "test": accuracy_vs_dims(model, xte, yte, inp.mean, q, ranks, batch_size=bs)}
    timed("accuracy", t0)

    t0 = clock()
    deltas = dict(inp.perturbations)
    deltas["saliency"] = saliency(model, xte, yte, batch_size=bs)
    fractions: dict[str, dict] = {}
    for name, delta in deltas.items():
        entry: dict = {"kind": "saliency" if name == "saliency" else "variant"}
        for fam, (q, grid, ranks) in bases.items():
            values, used = norm_fractions(delta, q, ranks)
            entry[fam] = {"d": grid, "fraction": values}
            entry["images"] = used
        fractions[name] = entry
    timed("fractions", t0)

    t0 = clock()
    chosen = sorted(pick(num_classes, st.profile_classes, gen).tolist())
    xp = xte[: st.profile_images]
    profiles: dict[str, dict] = {}
    for c in chosen:
        lam = curv.eigenvalues[c]
        picks = {"pos": 0, "neg": p - 1, "flat": int(lam.abs().argmin())}
        entry = {"class": c, "points": curv.points[c]}
        for kind, k in picks.items():
            prof = class_profile(model, xp, curv.vectors(c, torch.tensor([k]))[:, 0], c, st.s_values, curves=st.curves,
                                 batch_size=bs)
            entry[kind] = {"eigenvalue": float(lam[k]), "rank": k, "s": prof.s,
                           "target": dict(zip(("p30", "median", "p70"), prof.target)),
                           "other": dict(zip(("p30", "median", "p70"), prof.other)),
                           "into_target": prof.into_target, "into_softmax": prof.into_softmax,
                           "stay_target": prof.stay_target, "curves": prof.curves}
        profiles[classes[c]] = entry
        log(f"profiles: {classes[c]} done")
    timed("profiles", t0)

    t0 = clock()
    xc = xte[: st.confined_images]
    conf_dims = [d for d in svd_dims if d > 0]
    confined: dict[str, dict] = {"images": len(xc)}
    for fam in SVD_FAMILIES:
        q = bases[fam][0]
        means, rates = confined_norms(model, xc, q, conf_dims, candidates=st.candidates, overshoot=st.overshoot,
                                      max_iter=st.max_iter, batch_size=bs)
        confined[fam] = {"d": conf_dims, "mean_r_l2": means, "converged": rates,
                         "projection_l2": projection_norms(xc, inp.mean, q, conf_dims)}
        log(f"confined DeepFool: {fam} done")
    timed("confined", t0)

    t0 = clock()
    side = xtr.shape[2]
    sizes = [side] + [s for s in dict.fromkeys(st.resample_sizes) if s != side]
    tx, ty, tdelta = inp.table
    rows = resampling_rows(model, tx, ty, tdelta, sizes, st.factors, batch_size=bs)
    direct = direct_attack_rows(model, xc, inp.svd_deltas, sizes, candidates=st.candidates, overshoot=st.overshoot,
                                max_iter=st.max_iter, batch_size=bs)
    timed("resampling", t0)

    with torch.no_grad():
        clean = {"train": accuracy(model, xtr, ytr, batch_size=bs), "test": accuracy(model, xte, yte, batch_size=bs)}
    metrics = {
        "input_dim": p, "num_classes": num_classes, "classes": list(classes),
        "images": {"train": len(xtr), "test": len(xte), "profile": len(xp), "confined": len(xc),
                   "table": len(tx), "svd": len(inp.svd_deltas)},
        "clean_accuracy": clean,
        "mean_image_l2": float(inp.mean.double().norm()),
        "hessian": {"estimator": SKETCH_ESTIMATOR.format(k=st.probes) if sketch else HESSIAN_ESTIMATOR,
                    "fd_scale": st.fd_scale, "probes": 2 * st.probes if sketch else p,
                    "rank": st.probes if sketch else p,
                    "points_requested": st.per_class, "precision": "float32 gradients, float64 sums and eigh",
                    "per_class": {classes[c]: {"points": curv.points[c], "mean_r_l2": curv.mean_r_l2[c],
                                               "top": curv.eigenvalues[c][:3].tolist(),
                                               "bottom": curv.eigenvalues[c][-3:].tolist()}
                                  for c in range(num_classes)}},
        "svd": {"singular_values": svd_val[: min(p, 4 * num_classes)].tolist(),
                "rank": int((svd_val > 1e-6 * svd_val[0].clamp_min(1e-300)).sum())},
        "accuracy": acc, "fractions": fractions, "profiles": profiles, "confined": confined,
        "resampling": {"side": side, "factors": [f"{f:g}" for f in st.factors], "rows": rows, "direct": direct},
        "timings": timings,
    }
    arrays = {"mean_image": inp.mean.cpu().float().numpy(),
              "curvature_eigenvalues": curv.eigenvalues.float().numpy(),
              # Per class only the five directions the report draws (the two most positively and most negatively
              # curved, and the flattest): every eigenvector of every class would be classes·P² floats (3.8 GB
              # for CIFAR-100); the family bases below hold every direction the subspaces use.
              "curvature_directions": curvature_picks(curv).numpy(),
              "svd_basis": svd_vec.cpu().float().numpy(), "svd_values": svd_val.cpu().float().numpy()}
    for fam in CURVATURE_FAMILIES:
        arrays[f"family_{fam}"] = bases[fam][0].cpu().float().numpy()
    return Analysis(metrics=json_ready(metrics), bases=arrays, tables=plot_tables(metrics, curv.eigenvalues))


def json_ready(obj: object) -> object:
    """``obj`` with nan/inf floats as None (JSON has no nan), tuples as lists."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


PLOT_COLUMNS = {
    "directions_accuracy": ["series", "family", "split", "d", "rank", "accuracy"],
    "directions_svd_accuracy": ["series", "family", "split", "d", "accuracy"],
    "directions_fraction": ["series", "perturbation", "family", "d", "fraction"],
    "directions_svd_fraction": ["series", "perturbation", "family", "d", "fraction"],
    "directions_profiles": ["series", "class", "direction", "statistic", "s", "score"],
    "directions_transition": ["series", "class", "direction", "statistic", "s", "fraction"],
    "directions_confined": ["series", "family", "quantity", "d", "l2"],
    "directions_resampling": ["series", "size", "f", "fooling_rate"],
    "directions_direct": ["series", "attack", "size", "mean_r_l2", "success"],
    "directions_eigenvalues": ["series", "class", "rank", "eigenvalue"],
}


def plot_tables(m: dict, eigenvalues: Tensor | None = None) -> dict[str, tuple[list[str], list[dict]]]:
    """Rows of the DVC plot tables (``series`` + x + y columns) from the metrics ``analyze`` builds, and the
    curvature spectra (C, P) when given."""
    t: dict[str, list[dict]] = {k: [] for k in PLOT_COLUMNS}
    if eigenvalues is not None:
        for c, lam in enumerate(eigenvalues.tolist()):
            t["directions_eigenvalues"] += [{"series": m["classes"][c], "class": m["classes"][c], "rank": k,
                                             "eigenvalue": v} for k, v in enumerate(lam)]
    for fam, a in m["accuracy"].items():
        svd = fam in SVD_FAMILIES
        label = SVD_FAMILIES.get(fam) or CURVATURE_FAMILIES[fam]
        for split in ("train", "test"):
            for d, r, v in zip(a["d"], a["rank"], a[split]):
                t["directions_svd_accuracy" if svd else "directions_accuracy"].append(
                    {"series": f"{label} {split}", "family": label, "split": split, "d": d, "rank": r, "accuracy": v})
    for name, e in m["fractions"].items():
        for fam in (*CURVATURE_FAMILIES, *SVD_FAMILIES):
            label = SVD_FAMILIES.get(fam) or CURVATURE_FAMILIES[fam]
            table = "directions_svd_fraction" if fam in SVD_FAMILIES else "directions_fraction"
            for d, v in zip(e[fam]["d"], e[fam]["fraction"]):
                t[table].append({"series": f"{name}: {label}", "perturbation": name, "family": label, "d": d,
                                 "fraction": v})
    for cname, e in m["profiles"].items():
        for kind in ("pos", "neg", "flat"):
            pr = e[kind]
            for stat in ("target", "other"):
                for q in ("p30", "median", "p70"):
                    for s, v in zip(pr["s"], pr[stat][q]):
                        t["directions_profiles"].append({"series": f"{cname} {kind}: {stat} {q}", "class": cname,
                                                         "direction": kind, "statistic": f"{stat} {q}", "s": s,
                                                         "score": v})
            for stat in ("into_target", "into_softmax", "stay_target"):
                for s, v in zip(pr["s"], pr[stat]):
                    t["directions_transition"].append({"series": f"{cname} {kind}: {stat}", "class": cname,
                                                       "direction": kind, "statistic": stat, "s": s, "fraction": v})
    for fam in SVD_FAMILIES:
        c = m["confined"][fam]
        for qty, key in (("confined DeepFool", "mean_r_l2"), ("image projection", "projection_l2")):
            for d, v in zip(c["d"], c[key]):
                t["directions_confined"].append({"series": f"{SVD_FAMILIES[fam]}: {qty}", "family": SVD_FAMILIES[fam],
                                                 "quantity": qty, "d": d, "l2": v})
    for row in m["resampling"]["rows"]:
        for f, v in row["fooling_rate"].items():
            t["directions_resampling"].append({"series": f"size {row['size']}", "size": row["size"], "f": float(f),
                                               "fooling_rate": v})
    for row in m["resampling"]["direct"]:
        for attack, label in (("deepfool", "DeepFool through the resampling"),
                              ("confined", "DeepFool confined to the down-sampled SVD basis")):
            t["directions_direct"].append({"series": label, "attack": attack, "size": row["size"],
                                           "mean_r_l2": row[f"{attack}_mean_r_l2"],
                                           "success": row[f"{attack}_success"]})
    return {k: (PLOT_COLUMNS[k], rows) for k, rows in t.items()}
