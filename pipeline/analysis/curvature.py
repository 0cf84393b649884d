"""Curvature directions (Jetley et al., Alg. 1): per target class, the mean Hessian of F_c − F_ĉ at targeted
DeepFool boundary points, by finite differences (whole, or sketched with probes), and its eigenvectors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from advgen.analysis.linalg import Family, SVD_FAMILIES, logits_of, pick
from advgen.attacks import deepfool


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
