"""White-box evaluation of generated variants, read as stored.

Predictions come from the variant's manifests (measured on the stored, rounded
images at generation time), so the victim never runs again here; the images
are read back only for what the manifests cannot give: SSIM against the clean
image and ‖x‖₂ for DeepFool's robustness figure. Everything is per split and
per variant; ``evaluate_variant`` returns a summary dict and a per-sample table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from advgen import metrics
from advgen.errors import BadParameter, CorruptFile
from advgen.shards import STATS, file_digest, read_split, read_stats, verify_shards
from advgen.variants import read_manifests


@dataclass(frozen=True)
class CleanSplit:
    """The clean images of one split, decoded once and shared by every variant."""

    x: torch.Tensor  # (N, C, H, W) uint8
    keys: list[str]


def find_variants(root: Path) -> list[Path]:
    """Every complete variant folder under ``root`` (sorted by path)."""
    root = Path(root)
    if not root.is_dir():
        raise CorruptFile(root, "no such folder")
    found = []
    for stats in sorted(root.rglob(STATS)):
        try:
            kind = json.loads(stats.read_text()).get("kind")
        except (OSError, ValueError):
            raise CorruptFile(stats, "unreadable") from None
        if kind == "variant":
            found.append(stats.parent)
    return found


def open_variant(folder: Path, *, clean_dir: Path, victim_sha256: str | None = None, verify: bool = True) -> dict:
    """Stats of a complete variant, checked to come from ``clean_dir`` (and the given victim)."""
    stats = read_stats(Path(folder), kind="variant")
    clean = read_stats(Path(clean_dir), kind="clean")
    if stats["dataset"] != clean["dataset"]:
        raise BadParameter(f"{folder} is a {stats['dataset']} variant, but {clean_dir} holds {clean['dataset']}")
    if stats.get("clean_stats_sha256") != file_digest(Path(clean_dir) / STATS):
        raise BadParameter(f"{folder} was generated from another copy of {stats['dataset']} than {clean_dir}")
    if victim_sha256 is not None and stats["victim"]["sha256"] != victim_sha256:
        raise BadParameter(f"{folder} was generated on another victim (sha256 {stats['victim']['sha256'][:12]}…)")
    if verify:
        verify_shards(Path(folder), stats)
    return stats


def load_clean(clean_dir: Path, clean_stats: dict, split: str) -> CleanSplit:
    x, _, keys = read_split(Path(clean_dir), clean_stats, split)
    return CleanSplit(x=x, keys=keys)


def variant_name(stats: dict) -> str:
    """``method@ε`` (``method`` without ε): how results name a variant, from its stats or a result row."""
    return stats["method"] if stats["eps"] is None else f"{stats['method']}@{stats['eps']!r}"


def _rate(mask: np.ndarray) -> float | None:
    return float(np.mean(mask)) if mask.size else None


def _ssim_and_norms(clean_u8: torch.Tensor, adv_u8: torch.Tensor, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample SSIM(clean, stored) and ‖clean‖₂, converting uint8 to [0, 1] a chunk at a time."""
    ssim, norms = [], []
    for lo in range(0, len(clean_u8), chunk):
        x0 = clean_u8[lo:lo + chunk].float().div_(255)
        ssim.append(metrics.ssim(x0, adv_u8[lo:lo + chunk].float().div_(255)))
        norms.append(x0.flatten(1).double().norm(dim=1))
    return torch.cat(ssim).numpy(), torch.cat(norms).numpy()


def evaluate_split(folder: Path, stats: dict, split: str, clean: CleanSplit, *,
                   thresholds: tuple[float, float] | None = None) -> tuple[dict, pa.Table]:
    """Summary and per-sample table of one split of one variant (see the module docstring)."""
    names = stats["shards"][split]
    man = read_manifests(Path(folder), names)
    col = {n: man[n].to_numpy(zero_copy_only=False) for n in man.column_names if not n.endswith("_top5")}
    x_adv, _, keys = read_split(Path(folder), stats, split)
    if keys != clean.keys or list(col["key"]) != keys:
        raise CorruptFile(folder, f"{split}: keys differ between the variant, its manifests and the clean shards")
    y = col["label"].astype(np.int64)
    clean_ok = col["clean_pred"] == y
    ok = col["adv_pred"] == y
    buckets, used = metrics.confidence_buckets(col["clean_conf"], thresholds)
    ssim, x_l2 = _ssim_and_norms(clean.x, x_adv)
    psnr = metrics.psnr_from_l2(col["l2"].astype(np.float64), int(np.prod(x_adv.shape[1:])))
    has_top5 = "adv_top5" in man.column_names
    if has_top5:
        clean5 = metrics.topk_hit(np.stack(man["clean_top5"].to_numpy(zero_copy_only=False)), y)
        adv5 = metrics.topk_hit(np.stack(man["adv_top5"].to_numpy(zero_copy_only=False)), y)

    n = len(y)
    out: dict = {"count": n, "clean_accuracy": _rate(clean_ok), "accuracy": _rate(ok)}
    if has_top5:
        out |= {"clean_top5_accuracy": _rate(clean5), "top5_accuracy": _rate(adv5)}
    if stats["direction"] == "adversarial":
        out["success_rate"] = _rate(~ok)
        out["success_rate_on_correct"] = _rate(~ok[clean_ok])  # of the images the victim got right
    else:
        clean_err, err = 1 - out["clean_accuracy"], 1 - out["accuracy"]
        negatives = ~clean_ok
        out |= {
            "error": err, "clean_error": clean_err,
            "error_rate_reduction": metrics.error_rate_reduction(clean_err, err),
            "negatives": int(negatives.sum()),
            "negatives_error_before": 1.0 if negatives.any() else None,
            "negatives_error_after": _rate(~ok[negatives]),
            "positives_broken": _rate(~ok[clean_ok]),  # correct images the cooperative step made wrong
        }
    out["buckets"] = {"thresholds": [float(t) for t in used]}
    for b, bname in enumerate(metrics.BUCKETS):
        m = buckets == b
        entry = {"count": int(m.sum()), "clean_error": _rate(~clean_ok[m]), "error": _rate(~ok[m])}
        if has_top5:
            entry |= {"clean_top5_error": _rate(~clean5[m]), "top5_error": _rate(~adv5[m])}
        out["buckets"][bname] = entry
    finite = np.isfinite(psnr)
    out["perturbation"] = {
        "mean_linf": float(col["linf"].mean()), "max_linf": float(col["linf"].max()),
        "mean_l2": float(col["l2"].mean()),
        "mean_psnr": float(psnr[finite].mean()) if finite.any() else None,
        "unchanged": int((~finite).sum()),  # images rounding left identical to the clean one
        "mean_ssim": float(ssim.mean()), "min_ssim": float(ssim.min()),
    }
    if "iterations" in col:  # DeepFool: ρ̂ from the stored δ, over the images it attacked (the paper's ρ̂)
        attacked = clean_ok if stats.get("label_source", "true") == "true" else np.ones(n, bool)
        out["deepfool"] = {
            "rho": metrics.robustness_rho(col["l2"][attacked].astype(np.float64), x_l2[attacked]),
            "attacked": int(attacked.sum()),
            "mean_r_l2": float(col["l2"][attacked].mean()) if attacked.any() else None,
            "mean_iterations": float(col["iterations"].mean()),
            "converged_rate": _rate(col["converged"]),
        }
    if "rounding_changed" in col:
        out["rounding_changed"] = int(col["rounding_changed"].sum())

    table = pa.table({
        "variant": pa.array([variant_name(stats)] * n, pa.string()),
        "split": pa.array([split] * n, pa.string()),
        "key": pa.array(keys, pa.string()),
        "label": pa.array(y.astype(np.int16)),
        "clean_pred": pa.array(col["clean_pred"]), "adv_pred": pa.array(col["adv_pred"]),
        "clean_conf": pa.array(col["clean_conf"]), "adv_conf": pa.array(col["adv_conf"]),
        "bucket": pa.array(buckets),
        "clean_top5_hit": pa.array(clean5 if has_top5 else np.zeros(n, bool)),
        "top5_hit": pa.array(adv5 if has_top5 else np.zeros(n, bool)),
        "linf": pa.array(col["linf"]), "l2": pa.array(col["l2"]),
        "psnr": pa.array(psnr.astype(np.float32)), "ssim": pa.array(ssim.astype(np.float32)),
    })
    return json.loads(json.dumps(out)), table


def evaluate_variant(folder: Path, stats: dict, clean: dict[str, CleanSplit], *,
                     thresholds: tuple[float, float] | None = None) -> tuple[dict, pa.Table]:
    """Every split of a variant: ({"method", "eps", "direction", "splits": {...}}, per-sample table)."""
    summaries, tables = {}, []
    for split in stats["shards"]:
        if split not in clean:
            raise BadParameter(f"{folder} has a {split!r} split the clean folder lacks")
        summaries[split], t = evaluate_split(folder, stats, split, clean[split], thresholds=thresholds)
        tables.append(t)
    head = {k: stats[k] for k in ("method", "eps", "direction", "norm", "label_source")}
    return {**head, "params": stats["params"], "splits": summaries}, pa.concat_tables(tables)


def curve_rows(results: dict[str, dict], split: str) -> tuple[list[dict], list[dict]]:
    """Rows of the two DVC plots: adversarial accuracy vs ε and cooperative error vs ε, one series per method.

    ``results``: {variant name: evaluate_variant summary}. ε = 0 rows carry the
    clean figures, so every curve starts at the victim's clean accuracy.
    """
    adv: dict[tuple[str, float], dict] = {}
    coop: dict[tuple[str, float], dict] = {}
    for r in results.values():
        s = r["splits"].get(split)
        if s is None or r["eps"] is None:
            continue
        if r["direction"] == "adversarial":
            adv[(r["method"], 0.0)] = {"series": r["method"], "method": r["method"], "eps": 0.0,
                                          "accuracy": s["clean_accuracy"]}
            adv[(r["method"], r["eps"])] = {"series": r["method"], "method": r["method"], "eps": r["eps"],
                                               "accuracy": s["accuracy"]}
        else:
            coop[(r["method"], 0.0)] = {"series": r["method"], "method": r["method"], "eps": 0.0, "error": s["clean_error"],
                                        "negatives_error": s["negatives_error_before"]}
            coop[(r["method"], r["eps"])] = {"series": r["method"], "method": r["method"], "eps": r["eps"], "error": s["error"],
                                             "negatives_error": s["negatives_error_after"]}
    return [adv[k] for k in sorted(adv)], [coop[k] for k in sorted(coop)]


def summarize_results(results: dict[str, dict], split: str, *, victim: dict) -> dict:
    """The headline numbers of ``results`` (``evaluate_variant`` summaries by name) on ``split``, for ``dvc metrics``.

    Small on purpose: per variant its accuracy and its success rate (adversarial) or error-rate
    reduction (cooperative); every other figure stays in the full results file.
    """
    variants = {}
    clean = None
    for name, r in results.items():
        s = r["splits"].get(split)
        if s is None:
            continue
        clean = s["clean_accuracy"]
        head = {"accuracy": s["accuracy"]}
        if r["direction"] == "adversarial":
            head["success_rate"] = s["success_rate"]
        else:
            head["error_rate_reduction"] = s["error_rate_reduction"]
        variants[name] = head
    return {"victim": victim["arch"], "split": split, "clean_accuracy": clean, "variants": variants}


def check_thresholds(values: list[float]) -> tuple[float, float] | None:
    """``[]`` (terciles) or two thresholds 0 <= low <= high <= 1."""
    if not values:
        return None
    if len(values) != 2 or not 0 <= values[0] <= values[1] <= 1:
        raise BadParameter(f"confidence thresholds must be two numbers 0 <= low <= high <= 1, got {values}")
    return float(values[0]), float(values[1])
