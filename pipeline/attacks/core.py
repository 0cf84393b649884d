"""What every attack is built from: the loss gradient, per-image norms, projection, the shared iterative
loop, seeded random starts, target classes and restarts.

Conventions:

* images are float tensors (N, C, H, W) in [0, 1]; epsilons are in the same
  pixel units; normalization lives inside the model;
* the model arrives in eval mode and outputs logits; nothing here switches
  modes;
* every loss is a per-sample cross-entropy summed over the batch, so each
  image's gradient is its own and results do not depend on the batch size;
* ``sign = +1`` steps up the loss of the given label (adversarial), ``-1``
  steps down (cooperative, or towards a target class).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen.errors import BadParameter

Norm = Literal["linf", "l2", "none"]
Direction = Literal["adversarial", "cooperative"]


def loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(∇ₓ Σᵢ CE(model(xᵢ), yᵢ), logits at x). Gradients in fp32."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(fp32_at_least(logits), y, reduction="sum"), x)
    return grad, logits.detach()


def fp32_at_least(t: Tensor) -> Tensor:
    """Upcast bf16/fp16 logits to fp32; leave fp32 and fp64 alone."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def l2(t: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped to broadcast over (N, C, H, W)."""
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def unit_l2(g: Tensor) -> Tensor:
    return g / l2(g).clamp_min(1e-12)


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


# --- the projected iterative loop ----------------------------------------------------------------

def project(x0: Tensor, x: Tensor, eps: float, norm: Norm) -> Tensor:
    delta = x - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x0 + delta).clamp(0, 1)


def iterate(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, step_size: float,
            sign: int, norm: Norm, start: Tensor | None = None) -> Tensor:
    """``steps`` projected steps of ``step_size`` along sign(∇) (L∞) or ∇/‖∇‖₂ (L2)."""
    x_adv = x if start is None else project(x, x + start, eps, norm)
    for _ in range(steps):
        grad, _ = loss_gradient(model, x_adv, y)
        step = grad.sign() if norm == "linf" else unit_l2(grad)
        x_adv = project(x, x_adv + sign * step_size * step, eps, norm).detach()
    return x_adv


# --- restarts and step sizes ------------------------------------------------------------------

def best_of_restarts(model: nn.Module, y: Tensor, runs: list[Tensor]) -> Tensor:
    """Per image, the first of ``runs`` (results of restarts) that the model does not classify as ``y``,
    else the one with the highest loss of ``y`` (Madry et al.'s restarts keep the strongest)."""
    best, best_loss, found = runs[0].clone(), None, None
    for r in runs:
        with torch.no_grad():
            logits = fp32_at_least(model(r))
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


def restart_seeds(seeds: list[int], restart: int) -> list[int]:
    """Per-image seeds of random restart ``restart`` (0: the seeds themselves), independent of batching."""
    return seeds if restart == 0 else [sample_seed(s, "restart", restart) for s in seeds]
