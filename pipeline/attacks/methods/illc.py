"""Least-likely class methods (Kurakin et al., 2017): sign steps down the loss of a target class fixed from the
clean prediction (``--target``: the least likely class, or the fifth-ranked one)."""

from __future__ import annotations

from torch import Tensor, nn

from advgen.attacks.base import Attack, Context, Outcome, register
from advgen.attacks.core import iterate, loss_gradient
from advgen.attacks.lattice import finish_iterative


def illc_fast(model: nn.Module, x: Tensor, target: Tensor, *, eps: float) -> Tensor:
    """One sign step down the loss of the target class (least-likely class method)."""
    grad, _ = loss_gradient(model, x, target)
    return (x - eps * grad.sign()).clamp(0, 1)


def illc_iter(model: nn.Module, x: Tensor, target: Tensor, *, eps: float, steps: int, step_size: float) -> Tensor:
    """Iterative least-likely class: BIM towards a target fixed from the clean prediction."""
    return iterate(model, x, target, eps=eps, steps=steps, step_size=step_size, sign=-1, norm="linf")


def _fast(ctx: Context) -> Outcome:
    target = ctx.target()
    return Outcome(illc_fast(ctx.model, ctx.x, target, eps=ctx.eps), {"target": target})


def _iter(ctx: Context) -> Outcome:
    target = ctx.target()
    x = illc_iter(ctx.model, ctx.x, target, eps=ctx.eps, steps=ctx.params.steps, step_size=ctx.step_size)
    return Outcome(x, {"target": target}, finish_label=target)


register(Attack("illc_fast", _fast, "linf", "one sign step of size ε towards the least likely class",
                uses=("target",), targeted=True, sign_steps=True))
register(Attack("illc_iter", _iter, "linf", "projected sign steps towards the least likely class",
                uses=("steps", "step_size", "target"), finish=finish_iterative, targeted=True, sign_steps=True))
