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

from advgen.attacks import declares
from advgen.evaluation import metrics
from advgen.errors import BadParameter, CorruptFile
from advgen.storage.shards import STATS, file_digest, read_split, read_stats, verify_shards
from advgen.storage.variants import read_manifests


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


@dataclass(frozen=True)
class BucketRule:
    """How images are put in clean-confidence buckets.

    ``thresholds`` None: terciles of the clean top-1 probability; else (low,
    high). ``correct_only``: only images the victim classifies correctly when
    clean take part (Possas's protocol); ``per_bucket`` > 0: that many images
    are drawn from each bucket with ``seed`` (all of a bucket if it has fewer).
    """

    thresholds: tuple[float, float] | None = None
    correct_only: bool = False
    per_bucket: int = 0
    seed: int = 0


def assign_buckets(conf: np.ndarray, clean_ok: np.ndarray, rule: BucketRule) -> tuple[np.ndarray, tuple[float, float]]:
    """(bucket per image, -1 where it takes no part; thresholds used) under ``rule`` (see ``BucketRule``)."""
    pool = clean_ok if rule.correct_only else np.ones(len(conf), bool)
    buckets, used = metrics.confidence_buckets(conf[pool] if rule.thresholds is None else conf, rule.thresholds)
    full = np.full(len(conf), -1, np.int8)
    if rule.thresholds is None:
        full[pool] = buckets
    else:
        full[pool] = buckets[pool]
    if rule.per_bucket:
        rng = np.random.default_rng(rule.seed)
        for b in range(len(metrics.BUCKETS)):
            members = np.flatnonzero(full == b)
            if len(members) > rule.per_bucket:
                dropped = np.setdiff1d(members, rng.choice(members, size=rule.per_bucket, replace=False))
                full[dropped] = -1
    return full, used


def evaluate_split(folder: Path, stats: dict, split: str, clean: CleanSplit, *,
                   thresholds: tuple[float, float] | None = None,
                   rule: BucketRule | None = None) -> tuple[dict, pa.Table]:
    """Summary and per-sample table of one split of one variant (see the module docstring).

    Everything is measured on the stored images (what the shards hold) and,
    where the manifests carry the float prediction (the rounding audit), on
    the float images too, side by side (``float_*`` keys). The fooling rate is
    the fraction of images whose predicted label changed, whatever the true label.
    """
    rule = rule or BucketRule(thresholds=thresholds)
    names = stats["shards"][split]
    man = read_manifests(Path(folder), names)
    col = {n: man[n].to_numpy(zero_copy_only=False) for n in man.column_names if not n.endswith("_top5")}
    x_adv, _, keys = read_split(Path(folder), stats, split)
    if keys != clean.keys or list(col["key"]) != keys:
        raise CorruptFile(folder, f"{split}: keys differ between the variant, its manifests and the clean shards")
    y = col["label"].astype(np.int64)
    clean_ok = col["clean_pred"] == y
    ok = col["adv_pred"] == y
    buckets, used = assign_buckets(col["clean_conf"].astype(np.float64), clean_ok, rule)
    ssim, x_l2 = _ssim_and_norms(clean.x, x_adv)
    psnr = metrics.psnr_from_l2(col["l2"].astype(np.float64), int(np.prod(x_adv.shape[1:])))
    has_top5 = "adv_top5" in man.column_names
    if has_top5:
        clean5 = metrics.topk_hit(np.stack(man["clean_top5"].to_numpy(zero_copy_only=False)), y)
        adv5 = metrics.topk_hit(np.stack(man["adv_top5"].to_numpy(zero_copy_only=False)), y)

    n = len(y)
    out: dict = {"count": n, "clean_accuracy": _rate(clean_ok), "accuracy": _rate(ok),
                 "fooling_rate": _rate(col["adv_pred"] != col["clean_pred"])}
    if has_top5:
        out |= {"clean_top5_accuracy": _rate(clean5), "top5_accuracy": _rate(adv5)}
    if "float_pred" in col:  # the same figures for the float images the attack made, before rounding
        fok = col["float_pred"] == y
        out |= {"float_accuracy": _rate(fok), "float_fooling_rate": _rate(col["float_pred"] != col["clean_pred"])}
        if stats["direction"] == "adversarial":
            out["float_success_rate"] = _rate(~fok)
        else:
            out["float_error_rate_reduction"] = metrics.error_rate_reduction(1 - out["clean_accuracy"],
                                                                            1 - out["float_accuracy"])
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
    out["buckets"] = {"thresholds": [float(t) for t in used], "correct_only": rule.correct_only,
                      "per_bucket": rule.per_bucket}
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
    if declares(stats["method"], "minimal"):  # ρ̂ from the stored δ, over the images it attacked (the paper's ρ̂)
        attacked = clean_ok if stats.get("label_source", "true") == "true" else np.ones(n, bool)
        out["deepfool"] = {
            "rho": metrics.robustness_rho(col["l2"][attacked].astype(np.float64), x_l2[attacked]),
            "attacked": int(attacked.sum()),
            "mean_r_l2": float(col["l2"][attacked].mean()) if attacked.any() else None,
            "median_r_l2": float(np.median(col["l2"][attacked])) if attacked.any() else None,
            "mean_iterations": float(col["iterations"].mean()),
            "converged_rate": _rate(col["converged"]),
        }
        if "float_l2" in col:  # the float perturbation DeepFool found, before rounding (and lattice steps)
            out["deepfool"] |= {
                "float_rho": metrics.robustness_rho(col["float_l2"][attacked].astype(np.float64), x_l2[attacked]),
                "float_median_r_l2": float(np.median(col["float_l2"][attacked])) if attacked.any() else None,
            }
    elif "iterations" in col:  # fgs_until: steps taken until the label changed
        out["iterations"] = {"mean": float(col["iterations"].mean()), "max": int(col["iterations"].max()),
                             "converged_rate": _rate(col["converged"])}
    if "grad_l2" in col:  # single-step methods: the loss gradient's size (per-sample loss, pixel space)
        out["gradient"] = {"mean_l2": float(col["grad_l2"].mean()), "mean_linf": float(col["grad_linf"].mean()),
                           "median_l2": float(np.median(col["grad_l2"]))}
    if "lattice_steps" in col:  # rounding-aware: images that needed steps on the lattice, and how many
        steps = col["lattice_steps"]
        out["lattice"] = {"images": int((steps > 0).sum()), "mean_steps": float(steps[steps > 0].mean())
                          if (steps > 0).any() else 0.0}
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
                     thresholds: tuple[float, float] | None = None,
                     rule: BucketRule | None = None) -> tuple[dict, pa.Table]:
    """Every split of a variant: ({"method", "eps", "direction", "splits": {...}}, per-sample table)."""
    summaries, tables = {}, []
    for split in stats["shards"]:
        if split not in clean:
            raise BadParameter(f"{folder} has a {split!r} split the clean folder lacks")
        summaries[split], t = evaluate_split(folder, stats, split, clean[split], thresholds=thresholds, rule=rule)
        tables.append(t)
    head = {k: stats[k] for k in ("method", "eps", "direction", "norm", "label_source")}
    return {**head, "params": stats["params"], "splits": summaries}, pa.concat_tables(tables)


def curve_rows(results: dict[str, dict], split: str) -> tuple[list[dict], list[dict]]:
    """Rows of the two DVC plots: adversarial accuracy vs ε and cooperative error vs ε, one series per method.

    ``results``: {variant name: evaluate_variant summary}. ε = 0 rows carry the
    clean figures, so every curve starts at the victim's clean accuracy. Where
    the float predictions were audited, a second series per method
    (``<method> (float)``) gives the same figure on the float images.
    """
    adv: dict[tuple[str, str, float], dict] = {}
    coop: dict[tuple[str, str, float], dict] = {}
    for r in results.values():
        s = r["splits"].get(split)
        if s is None or r["eps"] is None:
            continue
        m = r["method"]
        sides = [("stored", m, s.get("accuracy", 1 - s.get("error", 0.0)))]
        if "float_accuracy" in s:
            sides.append(("float", f"{m} (float)", s["float_accuracy"]))
        for images, series, acc in sides:
            if r["direction"] == "adversarial":
                adv[(series, images, 0.0)] = {"series": series, "method": m, "images": images, "eps": 0.0,
                                              "accuracy": s["clean_accuracy"]}
                adv[(series, images, r["eps"])] = {"series": series, "method": m, "images": images,
                                                   "eps": r["eps"], "accuracy": acc}
            else:
                coop[(series, images, 0.0)] = {"series": series, "method": m, "images": images, "eps": 0.0,
                                               "error": s["clean_error"],
                                               "negatives_error": s["negatives_error_before"]}
                coop[(series, images, r["eps"])] = {"series": series, "method": m, "images": images,
                                                    "eps": r["eps"],
                                                    "error": s["error"] if images == "stored" else 1 - acc,
                                                    "negatives_error": s["negatives_error_after"]
                                                    if images == "stored" else None}
    return [adv[k] for k in sorted(adv)], [coop[k] for k in sorted(coop)]


def summarize_results(results: dict[str, dict], split: str, *, victim: dict) -> dict:
    """The headline numbers of ``results`` (``evaluate_variant`` summaries by name) on ``split``, for ``dvc metrics``.

    Small on purpose: per variant its accuracy (stored, and float where audited), fooling rate, and its
    success rate (adversarial) or error-rate reduction (cooperative); every other figure stays in the
    full results file.
    """
    variants = {}
    clean = None
    for name, r in results.items():
        s = r["splits"].get(split)
        if s is None:
            continue
        clean = s["clean_accuracy"]
        head = {"accuracy": s["accuracy"], "fooling_rate": s["fooling_rate"]}
        if r["direction"] == "adversarial":
            head["success_rate"] = s["success_rate"]
        else:
            head["error_rate_reduction"] = s["error_rate_reduction"]
        if "float_accuracy" in s:
            head["float_accuracy"] = s["float_accuracy"]
        variants[name] = head
    return {"victim": victim["arch"], "split": split, "clean_accuracy": clean, "variants": variants}


def check_thresholds(values: list[float]) -> tuple[float, float] | None:
    """``[]`` (terciles) or two thresholds 0 <= low <= high <= 1."""
    if not values:
        return None
    if len(values) != 2 or not 0 <= values[0] <= values[1] <= 1:
        raise BadParameter(f"confidence thresholds must be two numbers 0 <= low <= high <= 1, got {values}")
    return float(values[0]), float(values[1])
