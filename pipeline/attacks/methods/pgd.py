"""PGD (Madry et al., 2018), L∞ and L2: projected steps from a random start inside the ball, with restarts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advgen.attacks.base import Attack, Context, Outcome, register
from advgen.attacks.core import best_of_restarts, default_step_size, iterate
from advgen.attacks.lattice import finish_iterative


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float, start: Tensor) -> Tensor:
    """L∞ PGD (Madry et al., 2018): BIM from a random start inside the ball."""
    return iterate(model, x, y, eps=eps, steps=steps, step_size=step_size, sign=+1, norm="linf", start=start)


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float, start: Tensor) -> Tensor:
    """L2 PGD: normalized-gradient steps, projected onto the L2 ball, from a random start."""
    return iterate(model, x, y, eps=eps, steps=steps, step_size=step_size, sign=+1, norm="l2", start=start)


def _step(fn, norm):
    def step(ctx: Context) -> Outcome:
        runs = [fn(ctx.model, ctx.x, ctx.label, eps=ctx.eps, steps=ctx.params.steps, step_size=ctx.step_size,
                   start=ctx.start(norm, r)) for r in range(ctx.params.restarts)]
        return Outcome(runs[0] if len(runs) == 1 else best_of_restarts(ctx.model, ctx.label, runs))
    return step


def online_pgd(eps: float, steps: int, step_size: float | None):
    """PGD from a fresh uniform start per batch, for online adversarial training (Madry et al., 2018)."""
    size = step_size if step_size else default_step_size(eps, steps)

    def perturb(model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        start = (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * eps
        return pgd(model, x, y, eps=eps, steps=steps, step_size=size, start=start).detach()

    return perturb


register(Attack("pgd", _step(pgd, "linf"), "linf", "L∞ PGD: BIM from a random start in the ball (Madry et al., 2018)",
                uses=("steps", "step_size", "seed", "restarts"), finish=finish_iterative, seeded=True,
                sign_steps=True, online=online_pgd))
register(Attack("pgd_l2", _step(pgd_l2, "l2"), "l2", "L2 PGD: normalized-gradient steps from a random start",
                uses=("steps", "step_size", "seed", "restarts"), finish=finish_iterative, seeded=True,
                sign_steps=False))
