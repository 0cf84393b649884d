"""MI-FGSM (Dong et al., CVPR 2018) and its cooperative twin: sign steps along a momentum of L1-normalized gradients.

    g₀ = 0,  g_{t+1} = μ·g_t + ∇ₓJ(x_t, y) / mean|∇ₓJ(x_t, y)|,  x_{t+1} = Clip_{x,ε}(x_t ± α·sign(g_{t+1}))

The paper divides by the L1 norm; the mean absolute value differs from it by a constant per image, which the
sign step does not see (torchattacks' ``MIFGSM`` divides by the mean too). μ = 0 is BIM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advgen.attacks.base import Attack, Context, Outcome, param, register
from advgen.attacks.core import loss_gradient, project
from advgen.attacks.lattice import finish_iterative

param("decay", 1.0, "{users}: momentum decay μ of the accumulated gradient (Dong et al., 2018); 0 = BIM.",
      lambda v: v >= 0, "must be >= 0")


def momentum_steps(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float,
                   decay: float, sign: int) -> Tensor:
    """``steps`` L∞-projected sign steps of ``step_size`` along the momentum ``g`` (up the loss of y for sign +1)."""
    x_adv, g = x, torch.zeros_like(x)
    for _ in range(steps):
        grad, _ = loss_gradient(model, x_adv, y)
        mean = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True)
        g = grad / mean.clamp_min(torch.finfo(grad.dtype).tiny) + decay * g  # a zero gradient adds nothing
        x_adv = project(x, x_adv + sign * step_size * g.sign(), eps, "linf").detach()
    return x_adv


def _step(sign: int):
    def step(ctx: Context) -> Outcome:
        return Outcome(momentum_steps(ctx.model, ctx.x, ctx.label, eps=ctx.eps, steps=ctx.params.steps,
                                      step_size=ctx.step_size, decay=ctx.params.decay, sign=sign))
    return step


register(Attack("mi_fgsm", _step(+1), "linf", "momentum iterative FGSM: --steps sign steps along a decayed sum of "
                "L1-normalized gradients (Dong et al., 2018)", uses=("steps", "step_size", "decay"),
                finish=finish_iterative, sign_steps=True))
register(Attack("d_mi_fgsm", _step(-1), "linf", "cooperative MI-FGSM: momentum sign steps down the true label's loss",
                direction="cooperative", uses=("steps", "step_size", "decay"), finish=finish_iterative))
