"""Iterative FGSM / BIM (Kurakin et al., 2017) and its cooperative twin: projected sign steps."""

from __future__ import annotations

from torch import Tensor, nn

from advgen.attacks.base import Attack, Context, Outcome, register
from advgen.attacks.core import iterate
from advgen.attacks.lattice import finish_iterative


def bim(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float) -> Tensor:
    """Iterative FGSM (Kurakin et al., 2017): L∞-projected sign steps up the loss of y."""
    return iterate(model, x, y, eps=eps, steps=steps, step_size=step_size, sign=+1, norm="linf")


def d_bim(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float) -> Tensor:
    """Cooperative BIM: projected sign steps down the loss of y."""
    return iterate(model, x, y, eps=eps, steps=steps, step_size=step_size, sign=-1, norm="linf")


def _step(fn):
    def step(ctx: Context) -> Outcome:
        return Outcome(fn(ctx.model, ctx.x, ctx.label, eps=ctx.eps, steps=ctx.params.steps, step_size=ctx.step_size))
    return step


register(Attack("bim", _step(bim), "linf", "iterative FGSM: --steps projected sign steps (Kurakin et al., 2017)",
                uses=("steps", "step_size"), finish=finish_iterative, sign_steps=True))
register(Attack("d_bim", _step(d_bim), "linf", "cooperative BIM: projected sign steps down the true label's loss",
                direction="cooperative", uses=("steps", "step_size"), finish=finish_iterative))
