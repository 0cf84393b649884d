"""Adversarial retraining: a victim trained again on adversarial data, and how much it helped.

Modes (``MODES``):
- ``finetune``: continue from the trained victim on the adversarial training copy
  (mixed with clean images), at half its learning rate;
- ``scratch``: a fresh model of the same architecture on the same mix;
- ``online_fgsm`` / ``online_pgd``: adversarial training in Madry's sense, from
  scratch: every batch is attacked against the model being trained — FGSM from a
  random start with step 1.25·ε (Wong et al., "Fast is better than free", 2020),
  or L∞ PGD. The attack runs with the model in training mode, as both papers do.

``assess`` measures a model on clean test images, on stored (transferred)
adversarial test images, and under a fresh white-box attack against itself,
rounded to uint8 like a stored copy.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen import attacks
from advgen.errors import BadParameter, unknown
from advgen.victims.train import Perturb, Progress, Recipe, TrainStats, accuracy, fit, predict, train_victim
from advgen.victims import Victim

ONLINE = {f"online_{a.name}": a for a in attacks.METHODS.values() if a.online is not None}
MODES = ("finetune", "scratch", *ONLINE)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise unknown("retrain mode", mode, MODES)


def mix(clean_x: Tensor, clean_y: Tensor, adv_x: Tensor, adv_y: Tensor, *, clean_ratio: float,
        seed: int) -> tuple[Tensor, Tensor]:
    """Every adversarial image plus ``clean_ratio`` × as many clean ones (a seeded random subset, capped at all).

    ``clean_ratio`` 0 trains on adversarial images only; 1 on equal parts.
    """
    if not clean_ratio >= 0:
        raise BadParameter(f"--clean-ratio must be >= 0, got {clean_ratio}")
    if adv_x.shape[1:] != clean_x.shape[1:]:
        raise BadParameter(f"adversarial images {tuple(adv_x.shape[1:])} do not match clean {tuple(clean_x.shape[1:])}")
    n = min(len(clean_x), round(clean_ratio * len(adv_x)))
    pick = torch.randperm(len(clean_x), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.cat([adv_x, clean_x[pick]]), torch.cat([adv_y, clean_y[pick]])


def online_attack(kind: str, *, eps: float, steps: int, step_size: float | None) -> Perturb:
    """The per-batch attack of online adversarial training: ``online_<attack>`` is the attack's declared
    online form (see the module docstring)."""
    if kind not in ONLINE:
        raise unknown("online attack", kind, ONLINE)
    if not 0 < eps <= 1:
        raise BadParameter(f"online adversarial training needs 0 < eps <= 1, got {eps}")
    if steps < 1:
        raise BadParameter(f"--steps must be >= 1, got {steps}")
    return ONLINE[kind].online(eps, steps, step_size)  # type: ignore[misc]


def retrain(mode: str, victim: Victim, *, x: Tensor, y: Tensor, recipe: Recipe, seed: int, device: torch.device,
            crop_pad: int, flip: bool, eps: float = 0.0, steps: int = 10, step_size: float | None = None,
            on_progress: Progress | None = None) -> tuple[Victim, TrainStats]:
    """One retraining run; returns a new model (``victim`` is left untouched) and its statistics.

    ``x``, ``y``: uint8 training images and labels — the adversarial mix for
    ``finetune`` and ``scratch``, the clean training set for the online modes.
    ``recipe``: the schedule (finetune halves its learning rate itself).
    """
    check_mode(mode)
    if mode == "finetune":
        model = copy.deepcopy(victim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stats = fit(model, x, y, recipe=replace(recipe, lr=recipe.lr / 2), seed=seed, device=device,
                        crop_pad=crop_pad, flip=flip, on_progress=on_progress)
        return model, stats
    perturb = None if mode == "scratch" else online_attack(mode, eps=eps, steps=steps, step_size=step_size)
    meta = victim.meta
    return train_victim(meta.arch, dataset=meta.dataset, num_classes=meta.num_classes, x=x, y=y, recipe=recipe,
                        seed=seed, device=device, crop_pad=crop_pad, flip=flip, on_progress=on_progress,
                        perturb=perturb)


def stored_copy(name: str, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, *, eps: float | None = None,
                **params) -> Tensor:
    """What a stored copy of ``attacks.run(name, ...)``'s float result ``x_adv`` holds, as uint8 (N, C, H, W):
    ``attacks.stored``, rounding-aware by default as in ``advgen generate``."""
    return attacks.stored(name, model, x, x_adv, y, eps=eps, **params)


def white_box(model: nn.Module, x: Tensor, y: Tensor, *, method: str, eps: float | None, steps: int,
              device: torch.device, seed: int = 0, tag: str = "white_box", batch_size: int = 500,
              label_source: str = "true", rounding_aware: bool = True) -> Tensor:
    """A fresh attack of ``method`` against ``model`` on uint8 images; returns the uint8 images a stored copy
    would hold (``stored_copy``: nearest, inside the ε-ball; minimal and iterative methods finished on
    the uint8 lattice where rounding undid them, as ``advgen generate`` does by default).

    Random starts are seeded per image by (``seed``, ``tag``, index), independent of ``batch_size``.
    """
    out = []
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size].to(device).float().div_(255)
        yb = y[lo:lo + batch_size].to(device)
        seeds = [attacks.sample_seed(seed, tag, lo + i) for i in range(len(xb))]
        adv = attacks.run(method, model, xb, yb, eps=eps, steps=steps, seeds=seeds, label_source=label_source)
        out.append(stored_copy(method, model, xb, adv, yb, eps=eps, steps=steps, label_source=label_source,
                                       rounding_aware=rounding_aware).cpu())
    return torch.cat(out)


@torch.no_grad()
def _loss(model: nn.Module, x: Tensor, y: Tensor, *, device: torch.device, batch_size: int = 1024) -> float:
    """Mean cross-entropy of ``model`` on uint8 images ``x`` with labels ``y``."""
    total = 0.0
    for lo in range(0, len(x), batch_size):
        logits = model(x[lo:lo + batch_size].to(device).float().div_(255)).float()
        total += float(F.cross_entropy(logits, y[lo:lo + batch_size].to(device), reduction="sum"))
    return total / max(1, len(x))


def assess(model: nn.Module, *, clean_x: Tensor, clean_y: Tensor, adv_x: Tensor, adv_y: Tensor, method: str,
           eps: float | None, steps: int, device: torch.device, seed: int = 0, label_source: str = "true") -> dict:
    """Clean, transferred-adversarial and fresh white-box accuracy and loss of ``model`` (all on test images).

    For DeepFool also ρ̂ = mean ‖δ‖₂/‖x‖₂ of the fresh attack as stored, over the images it attacked
    (those classified as the attack label when clean), re-measured on this model as Rana et al. do.
    """
    model = model.to(device).eval()
    own = white_box(model, clean_x, clean_y, method=method, eps=eps, steps=steps, device=device, seed=seed,
                    label_source=label_source)
    out = {
        "clean_accuracy": accuracy(model, clean_x, clean_y, device=device),
        "stored_adversarial_accuracy": accuracy(model, adv_x, adv_y, device=device),
        "white_box_accuracy": accuracy(model, own, clean_y, device=device),
        "clean_loss": _loss(model, clean_x, clean_y, device=device),
        "stored_adversarial_loss": _loss(model, adv_x, adv_y, device=device),
        "white_box_loss": _loss(model, own, clean_y, device=device),
    }
    if attacks.get(method).minimal:
        pred = predict(model, clean_x, device=device)
        attacked = pred == clean_y.cpu() if label_source == "true" else torch.ones_like(pred, dtype=torch.bool)
        x0 = clean_x.double().div(255).flatten(1)
        delta = own.double().div(255).flatten(1) - x0
        ratio = delta.norm(dim=1) / x0.norm(dim=1).clamp_min(1e-12)
        out["white_box_rho"] = float(ratio[attacked].mean()) if attacked.any() else None
    return out
