"""Input-defense sweeps: accuracy of defended models on clean and adversarial test images.

Three questions, each a list of flat rows (one accuracy per row):
- ``sweep``: a defense setting (Gaussian σ, resampling size, ...) in front of each
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

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from advgen.defenses import Defended, build_defense
from advgen.evaluation.retrain import white_box


@dataclass(frozen=True)
class Setting:
    defense: str  # a name in advgen.defenses.REGISTRY
    value: float  # the defense's setting (σ in pixels, a size in pixels, a JPEG quality)

    def build(self) -> nn.Module:
        return build_defense(self.defense, self.value)


@torch.no_grad()
def defended_predictions(model: nn.Module, defense: nn.Module, x: Tensor, *, device: torch.device,
                         batch_size: int = 256) -> Tensor:
    """Top-1 predictions (CPU) of model(defense(x)) on uint8 images ``x`` (N, C, H, W)."""
    net = Defended(defense, model).to(device).eval()
    return torch.cat([net(x[lo:lo + batch_size].to(device).float().div_(255)).argmax(1).cpu()
                      for lo in range(0, len(x), batch_size)])


def defended_accuracy(model: nn.Module, defense: nn.Module, x: Tensor, y: Tensor, *, device: torch.device,
                      batch_size: int = 256) -> float:
    """Top-1 accuracy of model(defense(x)) on uint8 images ``x`` (N, C, H, W)."""
    pred = defended_predictions(model, defense, x, device=device, batch_size=batch_size)
    return int((pred == y.cpu()).sum()) / len(x) if len(x) else 0.0


@dataclass
class Memo:
    """Predictions of model(defense(x)) already made, keyed by model name, setting and the bytes of ``x``: the
    sweep, the adaptive rows and the scaled rows all need the clean predictions behind every (model, setting),
    and the ×1 scaled copy is the stored copy itself, so each is computed once."""

    device: torch.device
    batch_size: int = 256
    _seen: dict = field(default_factory=dict)

    def __call__(self, mname: str, model: nn.Module, setting: Setting, x: Tensor) -> Tensor:
        data = x.detach().cpu().contiguous()
        key = (mname, setting, tuple(data.shape), str(data.dtype),
               hashlib.blake2b(data.numpy().tobytes(), digest_size=16).digest())
        if key not in self._seen:
            self._seen[key] = defended_predictions(model, setting.build(), x, device=self.device,
                                                   batch_size=self.batch_size)
        return self._seen[key]


def _fooling(pred: Tensor, clean_pred: Tensor) -> float | None:
    """Fraction of images whose (defended) prediction differs from that of their clean counterpart."""
    return int((pred != clean_pred).sum()) / len(pred) if len(pred) == len(clean_pred) and len(pred) else None


def scale_perturbation(clean: Tensor, adv: Tensor, factor: float) -> Tensor:
    """uint8 images clean + factor·(adv − clean), clipped to [0, 255] and rounded to nearest."""
    x0 = clean.float()
    return (x0 + factor * (adv.float() - x0)).round_().clamp_(0, 255).to(torch.uint8)


def sweep(models: dict[str, nn.Module], settings: list[Setting], data: dict[str, tuple[Tensor, Tensor]], *,
          device: torch.device, clean: str = "clean", memo: Memo | None = None) -> list[dict]:
    """Accuracy for every (model, setting, data set), and the fooling rate against the ``clean`` data set
    behind the same model and setting (the stored copies keep the clean images' order)."""
    memo = memo or Memo(device)
    rows = []
    for mname, model in models.items():
        for s in settings:
            preds = {d: memo(mname, model, s, x) for d, (x, _) in data.items()}
            for dname, (_, y) in data.items():
                rows.append({"model": mname, "defense": s.defense, "value": s.value, "data": dname,
                             "accuracy": int((preds[dname] == y.cpu()).sum()) / max(1, len(y)),
                             "fooling_rate": _fooling(preds[dname], preds[clean]) if dname != clean else None})
    return rows


def adaptive_attack(models: dict[str, nn.Module], settings: list[Setting], x: Tensor, y: Tensor, *, method: str,
                    eps: float | None, steps: int, device: torch.device, seed: int = 0,
                    batch_size: int = 256, memo: Memo | None = None) -> list[dict]:
    """Accuracy under ``method`` run against model(defense(·)) itself, for every (model, setting)."""
    memo = memo or Memo(device, batch_size)
    rows = []
    for mname, model in models.items():
        for s in settings:
            defense = s.build()
            net = Defended(defense, model).to(device).eval()
            adv = white_box(net, x, y, method=method, eps=eps, steps=steps, device=device, seed=seed,
                            tag="adaptive", batch_size=batch_size)
            pred = defended_predictions(model, defense, adv, device=device, batch_size=batch_size)
            rows.append({"model": mname, "defense": s.defense, "value": s.value,
                         "data": f"adaptive {method}" + (f" ε={eps:g}" if eps is not None else ""),
                         "accuracy": int((pred == y.cpu()).sum()) / max(1, len(y)),
                         "fooling_rate": _fooling(pred, memo(mname, model, s, x))})
    return rows


def scaled_perturbations(models: dict[str, nn.Module], settings: list[Setting], clean: Tensor, adv: Tensor,
                         y: Tensor, *, name: str, factors: list[float], device: torch.device,
                         memo: Memo | None = None) -> list[dict]:
    """Accuracy on clean + f·δ (δ the stored perturbation of ``name``) behind every (model, setting)."""
    memo = memo or Memo(device)
    rows = []
    scaled = {f: scale_perturbation(clean, adv, f) for f in factors}
    for mname, model in models.items():
        for s in settings:
            base = memo(mname, model, s, clean)
            for f, xs in scaled.items():
                pred = memo(mname, model, s, xs)
                rows.append({"model": mname, "defense": s.defense, "value": s.value, "data": f"{name} ×{f:g}",
                             "scale": f, "accuracy": int((pred == y.cpu()).sum()) / max(1, len(y)),
                             "fooling_rate": _fooling(pred, base)})
    return rows
