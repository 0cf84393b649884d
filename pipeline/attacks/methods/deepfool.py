"""DeepFool (Moosavi-Dezfooli et al., 2016): the minimal L2 step across the nearest linearized boundary,
batched; targeted and subspace-confined variants for the Jetley et al. analyses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advgen.attacks.base import Attack, Context, Outcome, register
from advgen.attacks.core import fp32_at_least, l2
from advgen.attacks.lattice import finish_minimal


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
        out = fp32_at_least(model(xa))
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
    return DeepFoolResult(x=x_adv, r_l2=l2(x_adv - x).flatten(), iterations=iterations,
                          converged=converged)


def _step(ctx: Context) -> Outcome:
    p = ctx.params
    r = deepfool(ctx.model, ctx.x, ctx.label, candidates=p.candidates, overshoot=p.overshoot, max_iter=p.max_iter)
    return Outcome(r.x, {"iterations": r.iterations, "converged": r.converged})


register(Attack("deepfool", _step, "l2", "the minimal L2 step across the nearest boundary (Moosavi-Dezfooli et al., "
                "2016); no ε", takes_eps=False, uses=("candidates", "overshoot", "max_iter"), finish=finish_minimal,
                finish_budget="max_iter", minimal=True))
