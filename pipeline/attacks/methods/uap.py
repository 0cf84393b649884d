"""Universal adversarial perturbations (Moosavi-Dezfooli et al., CVPR 2017): one δ for every image, fitted on
training images with DeepFool steps and stored beside the variant's shards."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advgen.attacks.base import Attack, Context, Outcome, Params, param, register
from advgen.attacks.core import Norm
from advgen.attacks.methods.deepfool import deepfool
from advgen.errors import BadParameter

param("uap_norm", "linf", "uap: the ball the universal perturbation lives in, linf or l2 (radius --eps).",
      lambda v: v in ("linf", "l2"), "must be linf or l2")
param("uap_target", 0.8, "uap: stop fitting once this fooling rate is reached on the fitting images.",
      lambda v: 0 < v <= 1, "must lie in (0, 1]")
param("uap_passes", 10, "uap: at most this many passes over the fitting images.", lambda v: v >= 1, "must be >= 1")
param("uap_images", 2000, "uap: training images the perturbation is fitted on (drawn with --seed).",
      lambda v: v >= 1, "must be >= 1")


@dataclass
class UapFit:
    delta: Tensor  # (C, H, W) float32, inside the ξ-ball
    fooling_rate: float  # on the fitting images when fitting stopped
    passes: int
    history: list[float]  # fooling rate after each pass


def into_ball(v: Tensor, eps: float, norm: Norm) -> Tensor:
    if norm == "linf":
        return v.clamp(-eps, eps)
    return v * (eps / v.norm().clamp_min(1e-12)).clamp(max=1.0)


def uap(x: Tensor, *, delta: Tensor) -> Tensor:
    """Every image plus the same perturbation ``delta`` (C, H, W), clipped to [0, 1]."""
    return (x + delta).clamp(0, 1)


@torch.no_grad()
def fooling_rate(model: nn.Module, x: Tensor, delta: Tensor, *, batch_size: int = 512) -> float:
    """Fraction of images whose predicted label changes when ``delta`` is added (Moosavi-Dezfooli et al., 2017)."""
    changed = 0
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size]
        changed += int((model(xb).argmax(1) != model(uap(xb, delta=delta)).argmax(1)).sum())
    return changed / max(1, len(x))


def fit_uap(model: nn.Module, x: Tensor, *, eps: float, norm: Norm, target_rate: float = 0.8, max_passes: int = 10,
            batch_size: int = 64, candidates: int = 10, overshoot: float = 0.02, max_iter: int = 50) -> UapFit:
    """A universal perturbation (Moosavi-Dezfooli et al., CVPR 2017, Alg. 1) fitted on images ``x`` in [0, 1].

    Passes over ``x`` (in the order given: shuffle it beforehand with a
    seed) until the fooling rate on ``x`` reaches ``target_rate`` or
    ``max_passes`` passes are done. In each batch, the images the current δ
    does not fool get DeepFool's minimal step from x + δ (away from their clean
    prediction), and δ accumulates those steps one by one, projected back onto
    the ξ-ball (``norm`` linf or l2, radius ``eps``) after each. The paper
    takes one image at a time, recomputing DeepFool after every update;
    batching computes a batch's steps at the same δ, which is what makes it
    fast, and stays deterministic.
    """
    if norm not in ("linf", "l2"):
        raise BadParameter(f"--uap-norm must be linf or l2, got {norm!r}")
    delta = torch.zeros_like(x[0])
    history: list[float] = []
    with torch.no_grad():
        clean_pred = torch.cat([model(x[lo:lo + 512]).argmax(1) for lo in range(0, len(x), 512)])
    rate, passes = 0.0, 0
    for passes in range(1, max_passes + 1):
        for lo in range(0, len(x), batch_size):
            xb, yb = x[lo:lo + batch_size], clean_pred[lo:lo + batch_size]
            xv = uap(xb, delta=delta)
            with torch.no_grad():
                still = model(xv).argmax(1) == yb
            idx = still.nonzero().flatten()
            if idx.numel() == 0:
                continue
            r = deepfool(model, xv[idx], yb[idx], candidates=candidates, overshoot=overshoot, max_iter=max_iter)
            for step, done in zip(r.x - xv[idx], r.converged):
                if done:  # a step that did not cross (max_iter reached) adds nothing universal
                    delta = into_ball(delta + step, eps, norm)
        rate = fooling_rate(model, x, delta)
        history.append(rate)
        if rate >= target_rate:
            break
    return UapFit(delta=delta.float(), fooling_rate=rate, passes=passes, history=history)


def _fit(model: nn.Module, x: Tensor, eps: float, p: Params) -> UapFit:
    return fit_uap(model, x, eps=eps, norm=p.uap_norm, target_rate=p.uap_target, max_passes=p.uap_passes,
                   candidates=p.candidates, overshoot=p.overshoot, max_iter=p.max_iter)


def _step(ctx: Context) -> Outcome:
    assert ctx.delta is not None, "uap needs its fitted perturbation"
    return Outcome(uap(ctx.x, delta=ctx.delta.to(ctx.x.device)))


register(Attack("uap", _step, "linf", "one universal perturbation for every image, in an ε-ball of --uap-norm "
                "(Moosavi-Dezfooli et al., 2017)", norm_param="uap_norm", fit=_fit, batch_coupled=True,
                uses=("uap_norm", "uap_target", "uap_passes", "uap_images", "seed", "candidates", "overshoot",
                      "max_iter")))
