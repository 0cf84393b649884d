"""FGS until misclassified (Johnson, 2020): sign steps of a fixed weight repeated until the label changes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advgen.attacks.base import Attack, Context, Outcome, register
from advgen.attacks.core import loss_gradient

FGS_UNTIL_STEP = 0.01  # Johnson (2020): "the noise was multiplied by 0.01 before being added"


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


def _step(ctx: Context) -> Outcome:
    x_adv, taken = fgs_until(ctx.model, ctx.x, ctx.label, step_size=ctx.params.step_size or FGS_UNTIL_STEP,
                             max_iter=ctx.params.max_iter)
    with torch.no_grad():
        reached = ctx.model(x_adv).argmax(1) != ctx.label
    return Outcome(x_adv, {"iterations": taken, "converged": reached})


register(Attack("fgs_until", _step, "none", "sign steps of weight --step-size (0.01) until the label changes "
                "(Johnson, 2020); no ε", takes_eps=False, uses=("step_size", "max_iter"),
                unset={"step_size": FGS_UNTIL_STEP}))
