"""What the directions explain (Jetley et al., Figs. 1–5, Table 1): SVD directions of DeepFool perturbations,
accuracy and norm inside subspaces, class-score profiles, confined DeepFool, resampling."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen.analysis.linalg import accuracy, logits_of, orthonormal_prefixes, resample_linear
from advgen.attacks import deepfool
from advgen.defenses import Defended, Resample


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
