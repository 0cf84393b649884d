"""Transfer: variants made on one victim, classified by the other victims of the same dataset.

For each (source variant, target victim ≠ source) on one split: the target's
accuracy on the stored images, its clean accuracy and the drop. For adversarial
variants, also the seed-style question — among images that fooled the source and
that the target classifies correctly when clean, which ones fool the target too
("transferred"), and how confident the target (and the source) was on the clean
image for those that transferred versus those that did not.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen.storage.variants import read_manifests


@torch.no_grad()
def classify(model: nn.Module, x: Tensor, *, device: torch.device, batch_size: int = 256,
             y: Tensor | None = None) -> tuple[np.ndarray, ...]:
    """(top-1 prediction, top-1 probability) of ``model`` on uint8 images ``x`` (N, C, H, W);
    with labels ``y`` also each image's cross-entropy loss."""
    model = model.to(device).eval()
    preds, confs, losses = [], [], []
    for lo in range(0, len(x), batch_size):
        logits = model(x[lo:lo + batch_size].to(device).float().div_(255)).float()
        c, k = F.softmax(logits, dim=1).max(1)
        preds.append(k.cpu())
        confs.append(c.cpu())
        if y is not None:
            losses.append(F.cross_entropy(logits, y[lo:lo + batch_size].to(device), reduction="none").cpu())
    out = (torch.cat(preds).numpy(), torch.cat(confs).numpy())
    return out + (torch.cat(losses).numpy(),) if y is not None else out


def _mean(a: np.ndarray) -> float | None:
    return float(a.mean()) if a.size else None


def transfer_row(*, stats: dict, folder, split: str, y: np.ndarray, target_pred: np.ndarray,
                 target_clean_pred: np.ndarray, target_clean_conf: np.ndarray,
                 target_loss: np.ndarray | None = None, target_clean_loss: np.ndarray | None = None) -> dict:
    """One cell of the transfer matrix (see the module docstring); with losses, the mean loss beside accuracy."""
    man = read_manifests(folder, stats["shards"][split])
    src_ok_clean = man["clean_pred"].to_numpy() == y
    src_fooled = man["adv_pred"].to_numpy() != y
    src_conf = man["clean_conf"].to_numpy()
    clean_ok = target_clean_pred == y
    ok = target_pred == y
    acc, clean_acc = float(ok.mean()), float(clean_ok.mean())
    row = {
        "method": stats["method"], "eps": stats["eps"], "direction": stats["direction"],
        "source": stats["victim"]["arch"], "split": split, "count": len(y),
        "accuracy": acc, "target_clean_accuracy": clean_acc, "drop": clean_acc - acc,
        "fooling_rate": float((target_pred != target_clean_pred).mean()),
        **({"loss": float(target_loss.mean()), "target_clean_loss": float(target_clean_loss.mean())}
           if target_loss is not None and target_clean_loss is not None else {}),
        "source_accuracy": float((~src_fooled).mean()), "source_clean_accuracy": float(src_ok_clean.mean()),
    }
    if stats["direction"] == "adversarial":
        eligible = src_fooled & src_ok_clean & clean_ok  # fooled the source, target right when clean
        moved = eligible & ~ok
        kept = eligible & ok
        row |= {
            "eligible": int(eligible.sum()),
            "transfer_rate": float(moved.sum() / eligible.sum()) if eligible.any() else None,
            "target_clean_conf_transferred": _mean(target_clean_conf[moved]),
            "target_clean_conf_not_transferred": _mean(target_clean_conf[kept]),
            "source_clean_conf_transferred": _mean(src_conf[moved]),
            "source_clean_conf_not_transferred": _mean(src_conf[kept]),
        }
    return row
