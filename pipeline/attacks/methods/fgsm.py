"""FGSM (Goodfellow et al., 2015) and its cooperative twin D-FGSM: one signed step of size ε."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advgen.attacks.base import Attack, register, single_step
from advgen.attacks.core import loss_gradient


def fgsm(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x + ε·sign(∇ₓJ(x, y))  (Goodfellow et al., 2015)."""
    return (x + eps * grad.sign()).clamp(0, 1)


def d_fgsm(x: Tensor, *, grad: Tensor, eps: float) -> Tensor:
    """x − ε·sign(∇ₓJ(x, y)): cooperative, lowers the true label's loss."""
    return (x - eps * grad.sign()).clamp(0, 1)


def online_fgsm(eps: float, steps: int, step_size: float | None):
    """FGSM from a random start for online adversarial training (Wong et al., 2020), step 1.25·ε by default."""
    alpha = step_size if step_size else 1.25 * eps

    def fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        start = (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * eps
        x0 = (x + start).clamp(0, 1)
        grad, _ = loss_gradient(model, x0, y)
        return (x + (x0 + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1).detach()

    return fgsm_rs


register(Attack("fgsm", single_step(fgsm), "linf", "one signed gradient step of size ε (Goodfellow et al., 2015)",
                shares_gradient=True, sign_steps=True, online=online_fgsm))
register(Attack("d_fgsm", single_step(d_fgsm), "linf", "one signed step of size ε down the true label's loss",
                direction="cooperative", shares_gradient=True))
