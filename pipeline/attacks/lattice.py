"""The stored form: uint8 images inside the ε-ball, and the rounding-aware finish.

Rounding a float attack to 8 bits can undo it: a minimal perturbation sits on
the decision boundary, an iterative optimum just past it. ``to_uint8`` rounds
inside the ball; the finishers take an attack's last steps on the uint8 lattice
itself, checking what is stored, so an image whose float result reached the
goal reaches it as stored too. An attack declares which finisher it takes
(``Attack.finish``): ``finish_iterative`` (projected gradient methods) or
``finish_minimal`` (DeepFool).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from advgen.attacks.core import Direction, Norm, fp32_at_least, loss_gradient

if TYPE_CHECKING:
    from advgen.attacks.base import Attack, Context


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
        out = fp32_at_least(model(xs))
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


# --- the finishers an attack declares ---------------------------------------------------------------

def finish_iterative(attack: Attack, ctx: Context, x_float: Tensor, label: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """``finish_on_lattice`` along ``label``'s loss (the target class of a targeted attack), with the sign and goal
    of the attack's direction and the float step size of its iterations."""
    assert ctx.eps is not None
    sign = -1 if (attack.targeted or attack.direction == "cooperative") else 1
    return finish_on_lattice(ctx.model, ctx.x, x_float, label, ctx.y, eps=ctx.eps, norm=attack.norm_for(ctx.params),
                             sign=sign, direction=attack.direction, max_steps=budget, step_size=ctx.step_size)


def finish_minimal(attack: Attack, ctx: Context, x_float: Tensor, label: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """``deepfool_on_lattice`` away from ``label``, with the attack's DeepFool parameters."""
    return deepfool_on_lattice(ctx.model, ctx.x, label, x_float, candidates=ctx.params.candidates,
                               overshoot=ctx.params.overshoot, max_steps=budget)
