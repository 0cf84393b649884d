"""Attacks: one small keyword-only function per method, and a registry.

Conventions (checked by ``run``, the library entry point):

* images are float tensors (N, C, H, W) in [0, 1]; epsilons are in the same
  pixel units; normalization lives inside the model;
* the model arrives in eval mode and outputs logits; nothing here switches
  modes;
* every loss is a per-sample cross-entropy summed over the batch, so each
  image's gradient is its own and results do not depend on the batch size;
* ``sign = +1`` steps up the loss of the given label (adversarial), ``-1``
  steps down (cooperative, or towards a target class).

Single-step methods (``fgsm``, ``fgm``, ``fgm_l2``, ``d_fgsm``, ``d_fgm``) are
functions of the clean image and its loss gradient only: one forward+backward
serves all of them at every epsilon (see ``loss_gradient``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen.errors import BadParameter, unknown

Norm = Literal["linf", "l2", "none"]
Direction = Literal["adversarial", "cooperative"]
Kind = Literal["single", "targeted_single", "iterative", "targeted_iterative", "random_start", "minimal", "until",
               "universal"]


# --- gradients and per-sample helpers -------------------------------------------------------------

def loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(∇ₓ Σᵢ CE(model(xᵢ), yᵢ), logits at x). Gradients in fp32."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(_fp32_at_least(logits), y, reduction="sum"), x)
    return grad, logits.detach()


def _fp32_at_least(t: Tensor) -> Tensor:
    """Upcast bf16/fp16 logits to fp32; leave fp32 and fp64 alone."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _l2(t: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped to broadcast over (N, C, H, W)."""
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _unit_l2(g: Tensor) -> Tensor:
    return g / _l2(g).clamp_min(1e-12)


def sample_seed(seed: int, split: str, index: int) -> int:
    """A per-image seed: random starts depend on the image, not on batch or shard layout."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()[:8], "little") >> 1


def random_start(shape: tuple[int, ...], eps: float, norm: Norm, seeds: list[int]) -> Tensor:
    """Per-image starting perturbations drawn uniformly from the ε-ball (CPU, float32).

    L∞: uniform in the cube. L2: a uniform direction and radius ε·u^(1/d),
    which is uniform in the ball's volume (not on its surface).
    """
    out = torch.empty(len(seeds), *shape)
    d = float(torch.tensor(shape).prod())
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        if norm == "linf":
            out[i] = (torch.rand(shape, generator=g) * 2 - 1) * eps
        else:
            v = torch.randn(shape, generator=g)
            out[i] = v / v.norm().clamp_min(1e-12) * eps * torch.rand((), generator=g) ** (1 / d)
    return out


def least_likely(logits: Tensor, target: Literal["least_likely", "top5_lowest"]) -> Tensor:
    """Target classes: the lowest-scoring class, or the fifth-ranked one (a milder target)."""
    if target == "least_likely":
        return logits.argmin(1)
    if target == "top5_lowest":
        if logits.shape[1] < 5:
            raise BadParameter(f"target top5_lowest needs at least 5 classes, the model has {logits.shape[1]}")
        return logits.topk(5, dim=1).indices[:, 4]
    raise BadParameter(f"--target must be least_likely or top5_lowest, got {target!r}")


# --- single-step methods: functions of the shared gradient ----------------------------------------

def fgsm(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x + ε·sign(∇ₓJ(x, y))  (Goodfellow et al., 2015)."""
    return (x + eps * grad.sign()).clamp(0, 1)


def fgm(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x + ε·∇ₓJ(x, y): the raw, unsigned gradient ("fast gradient magnitude")."""
    return (x + eps * grad).clamp(0, 1)


def fgm_l2(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x + ε·∇ₓJ/‖∇ₓJ‖₂: the L2 fast gradient method."""
    return (x + eps * _unit_l2(grad)).clamp(0, 1)


def d_fgsm(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x − ε·sign(∇ₓJ(x, y)): cooperative, lowers the true label's loss."""
    return (x - eps * grad.sign()).clamp(0, 1)


def d_fgm(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x − ε·∇ₓJ(x, y): cooperative, unsigned."""
    return (x - eps * grad).clamp(0, 1)


# --- iterative methods: one shared loop -----------------------------------------------------------

def _project(x0: Tensor, x: Tensor, eps: float, norm: Norm) -> Tensor:
    delta = x - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x0 + delta).clamp(0, 1)


def _iterate(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float,
             sign: int, norm: Norm, start: Tensor | None = None) -> Tensor:
    """``steps`` projected steps of ``step_size`` along sign(∇) (L∞) or ∇/‖∇‖₂ (L2)."""
    x_adv = x if start is None else _project(x, x + start, eps, norm)
    for _ in range(steps):
        grad, _ = loss_gradient(model, x_adv, y)
        step = grad.sign() if norm == "linf" else _unit_l2(grad)
        x_adv = _project(x, x_adv + sign * step_size * step, eps, norm).detach()
    return x_adv


def bim(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float) -> Tensor:
    """Iterative FGSM (Kurakin et al., 2017): L∞-projected sign steps up the loss of y."""
    return _iterate(model, x, y, eps=eps, steps=steps, step_size=step_size, sign=+1, norm="linf")


def d_bim(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float) -> Tensor:
    """Cooperative BIM: projected sign steps down the loss of y."""
    return _iterate(model, x, y, eps=eps, steps=steps, step_size=step_size, sign=-1, norm="linf")


def illc_fast(model: nn.Module, x: Tensor, target: Tensor, *, eps: float) -> Tensor:
    """One sign step down the loss of the target class (least-likely class method)."""
    grad, _ = loss_gradient(model, x, target)
    return (x - eps * grad.sign()).clamp(0, 1)


def illc_iter(model: nn.Module, x: Tensor, target: Tensor, *, eps: float, steps: int, step_size: float) -> Tensor:
    """Iterative least-likely class: BIM towards a target fixed from the clean prediction."""
    return _iterate(model, x, target, eps=eps, steps=steps, step_size=step_size, sign=-1, norm="linf")


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float, start: Tensor) -> Tensor:
    """L∞ PGD (Madry et al., 2018): BIM from a random start inside the ball."""
    return _iterate(model, x, y, eps=eps, steps=steps, step_size=step_size, sign=+1, norm="linf", start=start)


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float, start: Tensor) -> Tensor:
    """L2 PGD: normalized-gradient steps, projected onto the L2 ball, from a random start."""
    return _iterate(model, x, y, eps=eps, steps=steps, step_size=step_size, sign=+1, norm="l2", start=start)


# --- DeepFool -------------------------------------------------------------------------------------

@dataclass
class DeepFoolResult:
    x: Tensor  # perturbed images (in [0, 1] unless clip=False)
    r_l2: Tensor  # per-sample ‖x_adv − x‖₂ of the applied perturbation (after clamping to [0, 1])
    iterations: Tensor  # int64
    converged: Tensor  # bool: the label changed (or, targeted, the target was reached) within max_iter


def project_onto(w: Tensor, basis: Tensor | None) -> Tensor:
    """``w`` (m, …) projected onto the span of the orthonormal columns of ``basis`` (P, d); unchanged if None."""
    if basis is None:
        return w
    flat = w.flatten(1)
    return ((flat @ basis) @ basis.T).view_as(w)


def deepfool(model: nn.Module, x: Tensor, y: Tensor, *, candidates: int = 10, overshoot: float = 0.02,
             max_iter: int = 50, target: Tensor | None = None, basis: Tensor | None = None,
             clip: bool = True) -> DeepFoolResult:
    """Multi-class L2 DeepFool (Moosavi-Dezfooli et al., 2016), batched; targeted and subspace-confined variants.

    Untargeted (``target`` None): ``y`` is the class to move away from. Images
    not classified as ``y`` to begin with are returned unchanged (0 iterations,
    converged). Each iteration linearizes the logits around the current point,
    picks among the ``candidates`` top-scoring classes the boundary nearest in
    L2, and steps just past it; the total step is scaled by (1 + overshoot).

    Targeted (``target``: (N,) classes): moves each image towards the nearest
    point of the boundary between its target class c and the class ĉ it is
    currently classified as (the c-vs-rest boundary, as Jetley et al.'s Alg. 1
    uses it): each step is (F_ĉ − F_c)/‖∇(F_c − F_ĉ)‖² · ∇(F_c − F_ĉ), one
    backward pass per iteration; images already classified as c stay. With
    ``overshoot`` 0 it stops on the boundary (up to a 1e-4 margin).

    Confined (``basis``: (P, d) orthonormal columns, P = C·H·W): every
    linearized step is solved with the gradients projected onto the span of
    ``basis``, so the whole perturbation lies in that subspace (Jetley et al.,
    Fig. 5). ``clip=False`` lets iterates leave [0, 1] (for analyses on
    projected images that are not images any more). Finished images are
    frozen while the others go on.
    """
    n = x.shape[0]
    with torch.no_grad():
        logits0 = model(x)
    r_tot = torch.zeros_like(x)
    iterations = torch.zeros(n, dtype=torch.int64, device=x.device)
    if target is not None:
        active = logits0.argmax(1) != target
    else:
        k = min(candidates, logits0.shape[1])
        # Candidate classes ranked on the clean image; the original class goes first.
        ranked = logits0.topk(k, dim=1).indices
        pos = torch.arange(k, device=x.device).expand(n, k).masked_fill(ranked == y[:, None], k)  # y sorts last
        others = ranked.gather(1, pos.argsort(dim=1)[:, : k - 1])
        cand = torch.cat([y[:, None], others], dim=1)  # (n, k)
        active = logits0.argmax(1) == y
    converged = ~active
    for _ in range(max_iter):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        xa = x[idx] + (1 + overshoot) * r_tot[idx]
        xa = (xa.clamp(0, 1) if clip else xa).requires_grad_(True)
        out = _fp32_at_least(model(xa))
        pred = out.argmax(1)
        still = pred != target[idx] if target is not None else pred == y[idx]
        done = idx[~still]
        converged[done] = True
        active[done] = False
        if not still.any():
            break
        if target is not None:
            c = target[idx]
            diff = out.gather(1, c[:, None]).squeeze(1) - out.gather(1, pred[:, None]).squeeze(1)  # F_c − F_ĉ < 0
            (w,) = torch.autograd.grad(diff.sum(), xa)
            w = project_onto(w, basis)
            step = (diff.detach().abs() + 1e-4) / w.flatten(1).norm(dim=1).clamp_min(1e-12) ** 2
            r_i = step.view(-1, *([1] * (x.dim() - 1))) * w
        else:
            c = cand[idx]
            f = out.gather(1, c)  # (m, k)
            grads = [torch.autograd.grad(f[:, j].sum(), xa, retain_graph=j < k - 1)[0] for j in range(k)]
            w = project_onto(torch.stack([g - grads[0] for g in grads[1:]], dim=1).flatten(0, 1), basis)
            w = w.view(len(idx), k - 1, *x.shape[1:])  # (m, k-1, C, H, W)
            fd = (f[:, 1:] - f[:, :1]).detach()  # (m, k-1)
            wn = w.flatten(2).norm(dim=2)  # (m, k-1)
            dist = fd.abs() / wn.clamp_min(1e-12)
            best = dist.argmin(1)
            w_best = w[torch.arange(len(idx), device=x.device), best]
            r_i = ((fd.abs().gather(1, best[:, None]).squeeze(1) + 1e-4) / wn.gather(1, best[:, None]).squeeze(1)
                   .clamp_min(1e-12) ** 2).view(-1, *([1] * (x.dim() - 1))) * w_best
        keep = idx[still]
        r_tot[keep] += r_i[still].detach()
        iterations[keep] += 1
    with torch.no_grad():
        x_adv = x + (1 + overshoot) * r_tot
        x_adv = x_adv.clamp(0, 1) if clip else x_adv
    return DeepFoolResult(x=x_adv, r_l2=_l2(x_adv - x).flatten(), iterations=iterations,
                          converged=converged)


def fgs_until(model: nn.Module, x: Tensor, y: Tensor, *, step_size: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Fast gradient sign steps of weight ``step_size`` repeated until each image is misclassified (Johnson, 2020).

    No ε-ball: an image takes steps until the victim no longer predicts ``y``
    (or ``max_iter`` steps); images misclassified to begin with take none.
    Returns (images, steps taken per image).
    """
    x_adv = x.clone()
    steps = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    for _ in range(max_iter):
        with torch.no_grad():
            active = model(x_adv).argmax(1) == y
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        grad, _ = loss_gradient(model, x_adv[idx], y[idx])
        x_adv[idx] = (x_adv[idx] + step_size * grad.sign()).clamp(0, 1)
        steps[idx] += 1
    return x_adv, steps


# --- universal adversarial perturbations -----------------------------------------------------------

@dataclass
class UapFit:
    delta: Tensor  # (C, H, W) float32, inside the ξ-ball
    fooling_rate: float  # on the fitting images when fitting stopped
    passes: int
    history: list[float]  # fooling rate after each pass


def _into_ball(v: Tensor, eps: float, norm: Norm) -> Tensor:
    if norm == "linf":
        return v.clamp(-eps, eps)
    return v * (eps / v.norm().clamp_min(1e-12)).clamp(max=1.0)


def uap(x: Tensor, *, delta: Tensor) -> Tensor:
    """Every image plus the same perturbation ``delta`` (C, H, W), clipped to [0, 1]."""
    return (x + delta).clamp(0, 1)


@torch.no_grad()
def fooling_rate(model: nn.Module, x: Tensor, delta: Tensor, *, batch_size: int = 512) -> float:
    """Fraction of images whose predicted label changes when ``delta`` is added (Moosavi-Dezfooli et al., 2017)."""
    changed = 0
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size]
        changed += int((model(xb).argmax(1) != model(uap(xb, delta=delta)).argmax(1)).sum())
    return changed / max(1, len(x))


def fit_uap(model: nn.Module, x: Tensor, *, eps: float, norm: Norm, target_rate: float = 0.8, max_passes: int = 10,
            batch_size: int = 64, candidates: int = 10, overshoot: float = 0.02, max_iter: int = 50) -> UapFit:
    """A universal perturbation (Moosavi-Dezfooli et al., CVPR 2017, Alg. 1) fitted on images ``x`` in [0, 1].

    Passes over ``x`` (in the order given: shuffle it beforehand with a
    seed) until the fooling rate on ``x`` reaches ``target_rate`` or
    ``max_passes`` passes are done. In each batch, the images the current δ
    does not fool get DeepFool's minimal step from x + δ (away from their clean
    prediction), and δ accumulates those steps one by one, projected back onto
    the ξ-ball (``norm`` linf or l2, radius ``eps``) after each. The paper
    takes one image at a time, recomputing DeepFool after every update;
    batching computes a batch's steps at the same δ, which is what makes it
    fast, and stays deterministic.
    """
    if norm not in ("linf", "l2"):
        raise BadParameter(f"--uap-norm must be linf or l2, got {norm!r}")
    delta = torch.zeros_like(x[0])
    history: list[float] = []
    with torch.no_grad():
        clean_pred = torch.cat([model(x[lo:lo + 512]).argmax(1) for lo in range(0, len(x), 512)])
    rate, passes = 0.0, 0
    for passes in range(1, max_passes + 1):
        for lo in range(0, len(x), batch_size):
            xb, yb = x[lo:lo + batch_size], clean_pred[lo:lo + batch_size]
            xv = uap(xb, delta=delta)
            with torch.no_grad():
                still = model(xv).argmax(1) == yb
            idx = still.nonzero().flatten()
            if idx.numel() == 0:
                continue
            r = deepfool(model, xv[idx], yb[idx], candidates=candidates, overshoot=overshoot, max_iter=max_iter)
            for step, done in zip(r.x - xv[idx], r.converged):
                if done:  # a step that did not cross (max_iter reached) adds nothing universal
                    delta = _into_ball(delta + step, eps, norm)
        rate = fooling_rate(model, x, delta)
        history.append(rate)
        if rate >= target_rate:
            break
    return UapFit(delta=delta.float(), fooling_rate=rate, passes=passes, history=history)


# --- the stored form ------------------------------------------------------------------------------

def ball_steps(eps: float) -> int:
    """The largest whole number of uint8 steps (1/255) inside an ε of ``eps`` pixel units."""
    return math.floor(255 * eps + 1e-6)


def to_uint8(x_adv: Tensor, x: Tensor, *, eps: float | None = None, norm: Norm = "none") -> Tensor:
    """The stored form of ``x_adv``: uint8 images that stay inside the ε-ball around the clean ``x``.

    ``x`` holds clean images that are themselves uint8 / 255. Each pixel is
    rounded to nearest, except where nearest would leave the ball: then it is
    rounded towards the clean pixel. L∞: |stored − clean| ≤ ⌊255ε⌋ steps per
    pixel. L2: if the nearest-rounded δ is longer than 255ε steps, the pixels
    that rounding lengthened most are rounded towards the clean value instead,
    fewest first, until ‖δ‖₂ ≤ ε (rounding every pixel towards the clean one
    never lengthens δ, so this always ends inside). Without ε (``norm`` none or
    DeepFool) it is plain round-to-nearest.
    """
    clean = (x * 255).round_()
    a = (x_adv * 255).clamp_(0, 255)
    r = a.round()
    if eps is not None and norm == "linf":
        k = ball_steps(eps)
        r = torch.minimum(torch.maximum(r, clean - k), clean + k)
    elif eps is not None and norm == "l2":
        r = _into_l2_ball(r, a, clean, 255 * eps)
    return r.clamp_(0, 255).to(torch.uint8)


def _into_l2_ball(r: Tensor, a: Tensor, clean: Tensor, radius: float) -> Tensor:
    """Round towards ``clean`` the fewest pixels of ``r`` that bring every ‖r − clean‖₂ within ``radius``."""
    n = r.shape[0]
    d, exact = (r - clean).flatten(1).double(), (a - clean).flatten(1).double()
    need = d.square().sum(1) - radius**2 * (1 + 1e-9)  # squared length to shed, per image
    if not (need > 0).any():
        return r
    toward = d - d.sign()  # one step towards the clean pixel
    # Only pixels that nearest rounding lengthened are candidates; those it lengthened most go first.
    excess = torch.where(d.abs() > exact.abs(), d.abs() - exact.abs(), torch.full_like(d, -1.0))
    order = excess.argsort(dim=1, descending=True)
    gain = (d.square() - toward.square()).gather(1, order)
    gain = torch.where(excess.gather(1, order) > 0, gain, torch.zeros_like(gain))
    shed = gain.cumsum(1)
    # Flip positions 0..j where j is the first position whose cumulative gain covers the need.
    count = (shed < need[:, None]).sum(1) + 1
    flip_sorted = torch.arange(d.shape[1], device=d.device)[None, :] < count[:, None]
    flip_sorted &= (need > 0)[:, None]
    flip = torch.zeros_like(flip_sorted).scatter_(1, order, flip_sorted)
    out = torch.where(flip, toward, d)
    # Float noise can leave an image a hair outside: round all of its pixels towards the clean value.
    still = out.square().sum(1) > radius**2 * (1 + 1e-9)
    if still.any():
        out[still] = torch.trunc(exact[still])
    return (clean.flatten(1).double() + out).view_as(r).to(r.dtype).reshape(n, *r.shape[1:])


# --- rounding-aware finishing: the last steps on the uint8 lattice ----------------------------------

def lattice_step(w: Tensor, need: Tensor, room_up: Tensor, room_down: Tensor) -> Tensor:
    """A short whole-level move along ``w`` that gains ``need``: integer steps e (m, P).

    ``w`` (m, P): gain per unit of pixel value (a linearized margin's
    gradient); one level (1/255) of pixel j gains |w_j|/255. Seeks the
    smallest ‖e‖₂ subject to Σ w_j e_j / 255 ≥ need, e_j of the sign of w_j
    and within ``room_up``/``room_down`` levels (to 255 and to 0). The k-th
    level of pixel j costs 2k − 1 in squared norm, so levels are taken in
    order of gain/cost: a threshold λ on that ratio (found by bisection) gives
    e_j = ⌊(g_j/λ + 1)/2⌋ levels, which is optimal but for the last level
    taken (‖e‖² ≤ the optimum + 2·max|e_j| − 1); levels the gain does not need
    are then given back, largest first. Where even the whole room cannot gain
    ``need``, every level of room is taken.
    """
    a = w.abs() / 255
    room = torch.where(w > 0, room_up, room_down).clamp_min(0)

    def levels(lam: Tensor) -> Tensor:
        return torch.minimum(torch.floor((a / lam[:, None] + 1) / 2), room)

    top = a.amax(1).clamp_min(1e-30)
    lo, hi = top * 1e-9, top * 1.0001  # gain(hi) = 0; gain(lo) is (nearly) the whole room
    for _ in range(60):
        mid = (lo * hi).sqrt()
        ok = (a * levels(mid)).sum(1) >= need
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    e = levels(lo)
    for _ in range(4):  # give back levels the gain does not need, the costliest first
        slack = (a * e).sum(1) - need
        saving = torch.where((e > 0) & (a <= slack[:, None]), 2 * e - 1, torch.full_like(e, -1.0))
        best = saving.argmax(1)
        drop = saving.gather(1, best[:, None]).squeeze(1) > 0
        e = e - torch.zeros_like(e).scatter_(1, best[:, None], drop[:, None].to(e.dtype))
    short = (a * e).sum(1) < need
    e = torch.where(short[:, None], room, e)
    return e * w.sign()


def deepfool_on_lattice(model: nn.Module, x: Tensor, y: Tensor, x_float: Tensor, *, candidates: int = 10,
                        overshoot: float = 0.02, max_steps: int = 50) -> tuple[Tensor, Tensor]:
    """DeepFool finished on the uint8 lattice: every image its float run moved across the boundary crosses it
    as stored too.

    Starts from ``to_uint8(x_float)``; an attacked image whose stored version
    is still classified as ``y`` takes DeepFool steps from the stored point,
    each rounded onto the lattice as the shortest whole-level move that
    crosses the linearized nearest boundary (``lattice_step``) with
    ``overshoot``, until the stored image crosses it (at most ``max_steps``).
    Returns (images exactly on the lattice, lattice steps taken per image).
    """
    d = to_uint8(x_float, x).float()
    steps = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    with torch.no_grad():
        logits0 = model(x)
        # Only images still classified as y when stored take steps, and each step only moves them: after the one
        # look at the whole batch, forwards and backwards run on those images alone (at most a few of them).
        need = (logits0.argmax(1) == y) & (model(d / 255).argmax(1) == y)
    k = min(candidates, logits0.shape[1])
    idx = need.nonzero().flatten()
    for _ in range(max_steps + 1):
        if idx.numel() == 0:
            break
        xs = (d[idx] / 255).requires_grad_(True)
        out = _fp32_at_least(model(xs))
        still = out.argmax(1) == y[idx]
        idx, xs_rows = idx[still], still.nonzero().flatten()
        if idx.numel() == 0 or _ == max_steps:
            break
        ranked = out.detach()[xs_rows].topk(k, dim=1).indices
        pos = torch.arange(k, device=x.device).expand(len(idx), k).masked_fill(ranked == y[idx, None], k)
        cand = torch.cat([y[idx, None], ranked.gather(1, pos.argsort(dim=1)[:, : k - 1])], dim=1)
        f = out[xs_rows].gather(1, cand)
        grads = [torch.autograd.grad(f[:, j].sum(), xs, retain_graph=j < k - 1)[0][xs_rows].flatten(1)
                 for j in range(k)]
        w = torch.stack([g - grads[0] for g in grads[1:]], dim=1)  # (m, k-1, P)
        fd = (f[:, 1:] - f[:, :1]).detach().abs()
        best = (fd / w.norm(dim=2).clamp_min(1e-12)).argmin(1)
        rows = torch.arange(len(idx), device=x.device)
        here = d[idx].flatten(1)
        e = lattice_step(w[rows, best], fd[rows, best] * (1 + overshoot) + 1e-4, 255 - here, here)
        d[idx] = (here + e).clamp(0, 255).view_as(d[idx])
        steps[idx] += 1
    return d / 255, steps


ROUNDING_AWARE_KINDS = ("minimal", "iterative", "targeted_iterative", "random_start")


def finish_stored(name: str, model: nn.Module, x: Tensor, x_float: Tensor, label: Tensor, y: Tensor, *,
                  eps: float | None, step_size: float, max_steps: int, candidates: int = 10,
                  overshoot: float = 0.02) -> tuple[Tensor, Tensor]:
    """Rounding-aware storing of method ``name``'s float result ``x_float`` (a kind in ``ROUNDING_AWARE_KINDS``):
    DeepFool by ``deepfool_on_lattice`` away from ``label``; iterative methods by ``finish_on_lattice`` along
    ``label``'s loss (the target class for targeted ones), with the sign and goal of the method's direction.
    ``y``: the true labels. Returns (lattice images, lattice steps per image)."""
    m = get_method(name)
    if m.kind == "minimal":
        return deepfool_on_lattice(model, x, label, x_float, candidates=candidates, overshoot=overshoot,
                                   max_steps=max_steps)
    assert eps is not None
    targeted = m.kind == "targeted_iterative"
    return finish_on_lattice(model, x, x_float, label, y, eps=eps, norm=m.norm,
                             sign=-1 if (targeted or m.direction == "cooperative") else 1, direction=m.direction,
                             max_steps=max_steps, step_size=step_size)


def finish_on_lattice(model: nn.Module, x: Tensor, x_float: Tensor, label: Tensor, y: Tensor, *, eps: float,
                      norm: Norm, sign: int, direction: Direction, max_steps: int,
                      step_size: float) -> tuple[Tensor, Tensor]:
    """An iterative attack's last steps taken on the uint8 lattice, inside its ε-ball, checking what is stored.

    Images whose float result reached the goal (``direction`` adversarial:
    not classified as ``y``; cooperative: classified as ``y``) but whose
    stored result does not keep stepping from the stored point along
    ``sign`` · ∇ loss(``label``): L∞, one level on every pixel (the smallest
    sign step on the lattice); L2, the shortest whole-level move with the
    linear gain of a float step of ``step_size`` (``lattice_step``), rounded
    back into the L2 ball. At most ``max_steps``; returns (lattice images,
    lattice steps per image).
    """
    clean = (x * 255).round()
    d = to_uint8(x_float, x, eps=eps, norm=norm).float()

    def goal(logits: Tensor) -> Tensor:
        pred = logits.argmax(1)
        return pred == y if direction == "cooperative" else pred != y

    with torch.no_grad():
        float_ok = goal(model(x_float))
    steps = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    k = ball_steps(eps)
    for _ in range(max_steps):
        with torch.no_grad():
            need = float_ok & ~goal(model(d / 255))
        idx = need.nonzero().flatten()
        if idx.numel() == 0:
            break
        grad, _ = loss_gradient(model, d[idx] / 255, label[idx])
        here, c0 = d[idx], clean[idx]
        if norm == "linf":
            moved = here + sign * grad.sign()
            moved = torch.minimum(torch.maximum(moved, c0 - k), c0 + k).clamp(0, 255)
        else:
            g = (sign * grad).flatten(1)
            gain = step_size * g.norm(dim=1)
            flat = here.flatten(1)
            moved = (flat + lattice_step(g, gain, 255 - flat, flat)).view_as(here)
            delta = moved - c0
            length = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            inside = c0 + delta * (255 * eps / length).clamp(max=1.0)  # back onto the ball, then the lattice
            moved = to_uint8(inside / 255, c0 / 255, eps=eps, norm="l2").float()
        d[idx] = moved
        steps[idx] += 1
    return d / 255, steps


# --- registry -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    fn: Callable[..., Tensor] | Callable[..., DeepFoolResult]
    norm: Norm  # the norm whose ε-ball holds the perturbation ("none": unbounded)
    direction: Direction
    kind: Kind


METHODS: dict[str, Method] = {
    "fgsm": Method(fgsm, "linf", "adversarial", "single"),
    "fgm": Method(fgm, "none", "adversarial", "single"),
    "fgm_l2": Method(fgm_l2, "l2", "adversarial", "single"),
    "d_fgsm": Method(d_fgsm, "linf", "cooperative", "single"),
    "d_fgm": Method(d_fgm, "none", "cooperative", "single"),
    "bim": Method(bim, "linf", "adversarial", "iterative"),
    "d_bim": Method(d_bim, "linf", "cooperative", "iterative"),
    "illc_fast": Method(illc_fast, "linf", "adversarial", "targeted_single"),
    "illc_iter": Method(illc_iter, "linf", "adversarial", "targeted_iterative"),
    "pgd": Method(pgd, "linf", "adversarial", "random_start"),
    "pgd_l2": Method(pgd_l2, "l2", "adversarial", "random_start"),
    "deepfool": Method(deepfool, "l2", "adversarial", "minimal"),
    "fgs_until": Method(fgs_until, "none", "adversarial", "until"),
    # One δ for every image; its norm (linf or l2) is a parameter, ``--uap-norm``.
    "uap": Method(uap, "linf", "adversarial", "universal"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise unknown("method", name, METHODS) from None


def uses_eps(name: str) -> bool:
    """Whether ``name`` takes an ε (DeepFool finds its own size; fgs_until steps until the label changes)."""
    return get_method(name).kind not in ("minimal", "until")


def best_of_restarts(model: nn.Module, y: Tensor, runs: list[Tensor]) -> Tensor:
    """Per image, the first of ``runs`` (results of restarts) that the model does not classify as ``y``,
    else the one with the highest loss of ``y`` (Madry et al.'s restarts keep the strongest)."""
    best, best_loss, found = runs[0].clone(), None, None
    for r in runs:
        with torch.no_grad():
            logits = _fp32_at_least(model(r))
        loss = F.cross_entropy(logits, y, reduction="none")
        fooled = logits.argmax(1) != y
        if best_loss is None:
            best_loss, found = loss, fooled
            continue
        take = (~found & fooled) | (~found & ~fooled & (loss > best_loss))
        best[take] = r[take]
        best_loss = torch.where(take, loss, best_loss)
        found = found | fooled
    return best


def default_step_size(eps: float, steps: int) -> float:
    """2.5·ε/steps: enough to reach the ball's boundary and move along it (Madry et al.)."""
    return 2.5 * eps / steps


def check_params(name: str, *, eps: float | None, steps: int, step_size: float | None,
                 label_source: str, target: str, candidates: int, overshoot: float, max_iter: int,
                 restarts: int = 1) -> None:
    """Raise ``BadParameter`` for anything out of range, before any compute."""
    method = get_method(name)
    if uses_eps(name):
        if method.norm == "none":  # unbounded steps (fgm, d_fgm): any size, as Agarwal et al.'s 0.9 ... 2.0
            if eps is None or not 0 <= eps < math.inf:
                raise BadParameter(f"--eps of {name} must be a number >= 0, got {eps}")
        elif eps is None or not 0 <= eps <= 1:
            raise BadParameter(f"--eps of {name} must lie in [0, 1] (pixel units), got {eps}")
    if steps < 1:
        raise BadParameter(f"--steps must be >= 1, got {steps}")
    if step_size is not None and not step_size > 0:
        raise BadParameter(f"--step-size must be > 0, got {step_size}")
    if label_source not in ("true", "predicted"):
        raise BadParameter(f"--label-source must be true or predicted, got {label_source!r}")
    if target not in ("least_likely", "top5_lowest"):
        raise BadParameter(f"--target must be least_likely or top5_lowest, got {target!r}")
    if candidates < 2:
        raise BadParameter(f"--candidates must be >= 2, got {candidates}")
    if not 0 <= overshoot <= 1:
        raise BadParameter(f"--overshoot must lie in [0, 1], got {overshoot}")
    if max_iter < 1:
        raise BadParameter(f"--max-iter must be >= 1, got {max_iter}")
    if restarts < 1:
        raise BadParameter(f"--restarts must be >= 1, got {restarts}")


def check_model_and_input(model: nn.Module, x: Tensor) -> None:
    """Pre-conditions: eval mode, inputs in [0, 1]."""
    if model.training:
        raise ValueError("attacks expect the model in eval mode (call model.eval() first)")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"inputs must lie in [0, 1], got [{x.min().item():.4f}, {x.max().item():.4f}]")


def check_output(name: str, x: Tensor, x_adv: Tensor, eps: float | None, norm: Norm | None = None) -> None:
    """Post-conditions: range, and the ε-ball for the norm-bounded methods (``norm`` overrides the registry's)."""
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise AssertionError(f"{name} left [0, 1]: [{x_adv.min().item()}, {x_adv.max().item()}]")
    norm = norm or get_method(name).norm
    if eps is None or get_method(name).kind == "minimal":
        return
    if norm == "linf":
        worst = (x_adv - x).abs().max().item() if x.numel() else 0.0
    elif norm == "l2":
        worst = _l2(x_adv - x).max().item() if x.numel() else 0.0
    else:
        return
    if worst > eps * (1 + 1e-5) + 1e-6:
        raise AssertionError(f"{name} left its {norm} ε-ball: {worst} > {eps}")


FGS_UNTIL_STEP = 0.01  # Johnson (2020): "the noise was multiplied by 0.01 before being added"


def restart_seeds(seeds: list[int], restart: int) -> list[int]:
    """Per-image seeds of random restart ``restart`` (0: the seeds themselves), independent of batching."""
    return seeds if restart == 0 else [sample_seed(s, "restart", restart) for s in seeds]


def run(name: str, model: nn.Module, x: Tensor, y: Tensor, *, eps: float | None = None, steps: int = 10,
        step_size: float | None = None, label_source: str = "true", target: str = "least_likely",
        seeds: list[int] | None = None, candidates: int = 10, overshoot: float = 0.02,
        max_iter: int = 50, restarts: int = 1, uap_norm: Norm = "linf", uap_passes: int = 10) -> Tensor:
    """Apply method ``name`` to images ``x`` (N, C, H, W) in [0, 1] with labels ``y``; returns floats in [0, 1].

    ``label_source="predicted"`` uses the model's top-1 prediction as the
    gradient label. ``seeds`` (one int per image) drive random starts; default
    ``sample_seed(0, "run", i)``; ``restarts`` > 1 runs PGD from that many
    starts and keeps, per image, the first that fools the model (else the
    strongest). ``uap`` fits one universal perturbation on ``x`` itself
    (``uap_norm`` ball of radius ``eps``) and adds it to every image. Checks
    pre- and post-conditions. The result is the float attack; ``to_uint8``
    gives what a stored copy holds.
    """
    method = get_method(name)
    check_params(name, eps=eps, steps=steps, step_size=step_size, label_source=label_source, target=target,
                 candidates=candidates, overshoot=overshoot, max_iter=max_iter, restarts=restarts)
    check_model_and_input(model, x)
    with torch.no_grad():
        logits = model(x)
    label = logits.argmax(1) if label_source == "predicted" else y
    if method.kind == "single":
        grad, _ = loss_gradient(model, x, label)
        out = method.fn(x, grad=grad, eps=eps)
    elif method.kind == "minimal":
        out = deepfool(model, x, label, candidates=candidates, overshoot=overshoot, max_iter=max_iter).x
    elif method.kind == "until":
        out, _ = fgs_until(model, x, label, step_size=step_size or FGS_UNTIL_STEP, max_iter=max_iter)
    elif method.kind == "universal":
        assert eps is not None
        fit = fit_uap(model, x, eps=eps, norm=uap_norm, candidates=candidates, overshoot=overshoot, max_iter=max_iter,
                      max_passes=uap_passes)
        out = uap(x, delta=fit.delta)
    else:
        assert eps is not None
        size = step_size if step_size is not None else default_step_size(eps, steps)
        if method.kind == "targeted_single":
            out = illc_fast(model, x, least_likely(logits, target), eps=eps)  # type: ignore[arg-type]
        elif method.kind == "targeted_iterative":
            out = illc_iter(model, x, least_likely(logits, target), eps=eps, steps=steps,  # type: ignore[arg-type]
                            step_size=size)
        elif method.kind == "random_start":
            seeds = seeds if seeds is not None else [sample_seed(0, "run", i) for i in range(x.shape[0])]
            runs = [method.fn(model, x, label, eps=eps, steps=steps, step_size=size,
                              start=random_start(tuple(x.shape[1:]), eps, method.norm,
                                                 restart_seeds(seeds, r)).to(x.device))
                    for r in range(restarts)]
            out = runs[0] if restarts == 1 else best_of_restarts(model, label, runs)
        else:
            out = method.fn(model, x, label, eps=eps, steps=steps, step_size=size)
    check_output(name, x, out, eps, norm=uap_norm if method.kind == "universal" else None)
    return out.detach()
