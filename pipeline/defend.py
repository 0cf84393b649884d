"""Input-defense sweeps: accuracy of defended models on clean and adversarial test images.

Three questions, each a list of flat rows (one accuracy per row):
- ``sweep``: a defense setting (Gaussian σ, resampling size) in front of each
  model, on clean and stored adversarial images — what blur buys on
  adversarial data and what it costs on clean data;
- ``adaptive_attack``: an attacker who knows the defense attacks the composed
  model (defense + victim) directly;
- ``scaled_perturbations``: the stored perturbations multiplied by f before the
  defense, so a defense that merely shrinks δ shows as accuracy falling with f.
All images stay uint8 between steps (rounded to nearest), like stored copies.
Batches are small (256) on purpose: on CPUs, larger ones spend more time in
page faults than in the blur (measured 3x slower at 1000 on a 2-core machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advgen.defenses import Defended, build_defense
from advgen.retrain import white_box


@dataclass(frozen=True)
class Setting:
    defense: str  # "gaussian" | "resample"
    value: float  # σ in pixels | size in pixels

    def build(self) -> nn.Module:
        return build_defense(self.defense, self.value)

    @property
    def label(self) -> str:
        return f"gaussian σ={self.value:g}" if self.defense == "gaussian" else f"resample {int(self.value)}px"


@torch.no_grad()
def defended_accuracy(model: nn.Module, defense: nn.Module, x: Tensor, y: Tensor, *, device: torch.device,
                      batch_size: int = 256) -> float:
    """Top-1 accuracy of model(defense(x)) on uint8 images ``x`` (N, C, H, W)."""
    net = Defended(defense, model).to(device).eval()
    correct = 0
    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size].to(device).float().div_(255)
        correct += int((net(xb).argmax(1).cpu() == y[lo:lo + batch_size]).sum())
    return correct / max(1, len(x))


def scale_perturbation(clean: Tensor, adv: Tensor, factor: float) -> Tensor:
    """uint8 images clean + factor·(adv − clean), clipped to [0, 255] and rounded to nearest."""
    x0 = clean.float()
    return (x0 + factor * (adv.float() - x0)).round_().clamp_(0, 255).to(torch.uint8)


def sweep(models: dict[str, nn.Module], settings: list[Setting], data: dict[str, tuple[Tensor, Tensor]], *,
          device: torch.device) -> list[dict]:
    """Accuracy for every (model, setting, data set)."""
    rows = []
    for mname, model in models.items():
        for s in settings:
            defense = s.build()
            for dname, (x, y) in data.items():
                rows.append({"model": mname, "defense": s.defense, "value": s.value, "data": dname,
                             "accuracy": defended_accuracy(model, defense, x, y, device=device)})
    return rows


def adaptive_attack(models: dict[str, nn.Module], settings: list[Setting], x: Tensor, y: Tensor, *, method: str,
                    eps: float | None, steps: int, device: torch.device, seed: int = 0,
                    batch_size: int = 256) -> list[dict]:
    """Accuracy under ``method`` run against model(defense(·)) itself, for every (model, setting)."""
    rows = []
    for mname, model in models.items():
        for s in settings:
            defense = s.build()
            net = Defended(defense, model).to(device).eval()
            adv = white_box(net, x, y, method=method, eps=eps, steps=steps, device=device, seed=seed,
                            tag="adaptive", batch_size=batch_size)
            rows.append({"model": mname, "defense": s.defense, "value": s.value,
                         "data": f"adaptive {method}" + (f" ε={eps:g}" if eps is not None else ""),
                         "accuracy": defended_accuracy(model, defense, adv, y, device=device, batch_size=batch_size)})
    return rows


def scaled_perturbations(models: dict[str, nn.Module], settings: list[Setting], clean: Tensor, adv: Tensor,
                         y: Tensor, *, name: str, factors: list[float], device: torch.device) -> list[dict]:
    """Accuracy on clean + f·δ (δ the stored perturbation of ``name``) behind every (model, setting)."""
    rows = []
    scaled = {f: scale_perturbation(clean, adv, f) for f in factors}
    for mname, model in models.items():
        for s in settings:
            defense = s.build()
            for f, xs in scaled.items():
                rows.append({"model": mname, "defense": s.defense, "value": s.value, "data": f"{name} ×{f:g}",
                             "scale": f, "accuracy": defended_accuracy(model, defense, xs, y, device=device)})
    return rows
