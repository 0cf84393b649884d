"""Unsigned fast gradient methods: FGM (the raw gradient times ε), its cooperative twin D-FGM, and L2 FGM."""

from __future__ import annotations

from torch import Tensor

from advgen.attacks.base import Attack, register, single_step
from advgen.attacks.core import unit_l2


def fgm(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x + ε·∇ₓJ(x, y): the raw, unsigned gradient ("fast gradient magnitude")."""
    return (x + eps * grad).clamp(0, 1)


def d_fgm(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x − ε·∇ₓJ(x, y): cooperative, unsigned."""
    return (x - eps * grad).clamp(0, 1)


def fgm_l2(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x + ε·∇ₓJ/‖∇ₓJ‖₂: the L2 fast gradient method."""
    return (x + eps * unit_l2(grad)).clamp(0, 1)


register(Attack("fgm", single_step(fgm), "none", "ε times the raw, unsigned gradient (no ε-ball)",
                shares_gradient=True, sign_steps=False))
register(Attack("d_fgm", single_step(d_fgm), "none", "ε times the raw gradient, down the true label's loss",
                direction="cooperative", shares_gradient=True))
register(Attack("fgm_l2", single_step(fgm_l2), "l2", "one step of L2 length ε along the gradient",
                shares_gradient=True, sign_steps=False))
