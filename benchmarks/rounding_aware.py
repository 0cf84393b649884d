"""Rounding-aware DeepFool on Fashion-MNIST: is the stored copy as adversarial as the float attack, and how big?

A shared adversarial dataset is what is stored: uint8 images. DeepFool stops
just past the decision boundary, so rounding its float result to 8 bits can
undo it. ``advgen generate`` therefore finishes minimal attacks on the uint8
lattice by default (``--rounding-aware``). This script measures the issue's
targets with the real tool, per victim, over the images DeepFool attacks
(clean prediction == label):

* stored success of the rounding-aware copy within 1 percentage point of the
  float attack's success (a stored success above the float one is no shortfall);
* its median stored ‖δ‖₂ at most 1.3 x the median ‖δ‖₂ of the float attack on
  the same images.

Per victim, ``advgen generate --method deepfool --split test`` runs twice as a
process, rounding-aware (a) and ``--no-rounding-aware`` (b), both with the
rounding audit, so the manifests carry the float attack's prediction and size
(``float_pred``, ``float_l2``) beside the stored image's (``adv_pred``,
``l2``) and, for (a), the lattice steps taken. The stored PNGs are read back
and classified again here, as a check on the manifests.

The peer is an independent DeepFool, foolbox's ``L2DeepFoolAttack`` (steps 50,
candidates 10, overshoot 0.02, logits loss: advgen's settings) on the same
model and images: its float success and size say whether the two DeepFools
agree; rounded to nearest uint8 it shows what plain rounding does to a
DeepFool that knows nothing of the lattice. foolbox is a benchmark tool, not a
dependency: it is installed without its dependencies into ``WORK/site``
(``--no-peer`` skips it).

Data: real Fashion-MNIST from Debian's dataset-fashion-mnist package (``advgen
prepare`` finds it in /usr/share/datasets/fashion-mnist), the demo's two
victims trained by ``advgen train`` with the demo's recipes
(demo/params.yaml), everything cached in ``--work``. ``--tiny`` writes
synthetic Fashion-MNIST-shaped IDX files in the real layout instead (a
learnable pattern, a few hundred images, one epoch), for tests.

    python benchmarks/rounding_aware.py                       # all 10 000 test images, both victims
    python benchmarks/rounding_aware.py --images 1000 --victims mlp
    python benchmarks/rounding_aware.py --ckpt-dir demo/data/fashion_mnist/victims
    python benchmarks/rounding_aware.py --tiny --no-peer      # seconds, synthetic data (the test)
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from advgen.data.clean import load_clean_split, open_clean
from advgen.storage.shards import file_digest, read_images
from advgen.victims.train import resolve_device
from advgen.victims import load
from common import ROOT, advgen, pattern_images, report_header, table, write_report

VICTIMS = ["mlp", "simple_cnn"]
DEEPFOOL = {"max_iter": 50, "candidates": 10, "overshoot": 0.02}  # advgen's defaults; foolbox gets the same
SUCCESS_GAP_PP = 1.0  # stored success may fall at most this many percentage points below float success
L2_RATIO = 1.3  # median stored ‖δ‖₂ over median float ‖δ‖₂
FOOLBOX = ["foolbox==3.3.4", "eagerpy==0.30.0"]
TINY = {"train": 1000, "test": 200, "epochs": 1}
MODES = {"aware": "--rounding-aware", "plain": "--no-rounding-aware"}


# --- data and victims ----------------------------------------------------------------------------

def _idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped, as the originals are distributed."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def write_tiny_fashion(raw: Path, seed: int = 0) -> None:
    """Fashion-MNIST-shaped synthetic IDX files (28x28 grey, 10 classes, ``common.pattern_images``) in the real
    file layout: learnable in one epoch, so DeepFool has correctly classified images to attack."""
    raw.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = pattern_images(TINY[split], 10, seed + (split == "test"), side=28, channels=1)
        _idx(raw / f"{prefix}-images-idx3-ubyte.gz", x[..., 0])
        _idx(raw / f"{prefix}-labels-idx1-ubyte.gz", y)


def prepare(root: Path, *, tiny: bool, images: int) -> tuple[Path, Path]:
    """(clean folder for training, clean folder whose test split is the first ``images`` test images)."""
    full = root / "clean"
    if not (full / "_stats.json").is_file():
        if tiny:
            write_tiny_fashion(root / "raw")
            advgen("prepare", "--dataset", "fashion_mnist", "--raw", root / "raw", "--out", full,
                   "--verify", "structure", "--no-download")
        else:  # Debian's copy: advgen searches /usr/share/datasets/fashion-mnist and checks its content
            advgen("prepare", "--dataset", "fashion_mnist", "--out", full, "--no-download")
    count = open_clean(full)["counts"]["test"]
    if images <= 0 or images >= count:
        return full, full
    part = root / f"clean-limit{images}"  # --limit keeps the first N of each split; only its test split is used
    if not (part / "_stats.json").is_file():
        advgen("prepare", "--dataset", "fashion_mnist", "--raw", root / "raw" if tiny else full.parent / "raw",
               "--out", part, "--limit", images, "--no-download", *(["--verify", "structure"] if tiny else []))
    return full, part


def demo_recipes(params: Path) -> dict[str, dict]:
    """The demo's training recipe per victim (demo/params.yaml ``train``), keyed by architecture."""
    train = yaml.safe_load(params.read_text())["train"]
    return {r["victim"]: {k: v for k, v in r.items() if k not in ("dataset", "victim")}
            for r in train.values() if r["dataset"] == "fashion_mnist"}


def train_victim(folder: Path, clean: Path, arch: str, recipe: dict, seed: int, dev: torch.device) -> Path:
    """``advgen train`` with ``recipe``; cached in ``folder`` while the recipe and the data are the same."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, metrics, used = folder / f"{arch}.pt", folder / f"{arch}.json", folder / f"{arch}.recipe.json"
    want = {"recipe": recipe, "seed": seed, "device": dev.type, "clean": file_digest(clean / "_stats.json")}
    if ckpt.is_file() and metrics.is_file() and used.is_file() and json.loads(used.read_text()) == want:
        return ckpt
    print(f"training {arch} ({recipe.get('epochs')} epochs) ...", flush=True)
    flags = [a for k, v in recipe.items() for a in (f"--{k.replace('_', '-')}", v)]
    advgen("train", "--dataset", "fashion_mnist", "--victim", arch, "--clean", clean, "--out", ckpt,
           "--metrics", metrics, *flags, "--seed", seed, "--device", dev)
    used.write_text(json.dumps(want, indent=2, sort_keys=True) + "\n")
    return ckpt


# --- advgen --------------------------------------------------------------------------------------

def run_generate(clean: Path, ckpt: Path, out: Path, mode: str, batch_size: int, dev: torch.device) -> dict:
    """``advgen generate --method deepfool --split test`` in mode ``aware`` or ``plain``; resumes what is done."""
    metrics = out / "generate-metrics.json"
    wall = advgen("generate", "--victim-ckpt", ckpt, "--clean", clean, "--out", out, "--method", "deepfool",
                  "--split", "test", "--max-iter", DEEPFOOL["max_iter"], "--candidates", DEEPFOOL["candidates"],
                  "--overshoot", DEEPFOOL["overshoot"], MODES[mode], "--rounding-audit",
                  "--batch-size", batch_size, "--workers", 1, "--device", dev, "--metrics", metrics)
    m = json.loads(metrics.read_text())
    return {"wall_s": wall, "stage_s": m["seconds"], "shards_computed": m["shards_computed"],
            "shards_reused": m["shards_skipped"]}


def manifest(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The concatenated manifest columns of a variant's test shards, in image order."""
    cols: dict[str, list[np.ndarray]] = {}
    for n in names:
        t = pq.read_table(folder / n.replace(".tar", ".parquet"))
        for c in t.column_names:
            if c not in ("key", "clean_top5", "adv_top5"):
                cols.setdefault(c, []).append(t[c].to_numpy(zero_copy_only=False))
    out = {c: np.concatenate(v) for c, v in cols.items()}
    order = np.argsort(out["index"], kind="stable")
    return {c: v[order] for c, v in out.items()}


def recheck_stored(model, folder: Path, names: list[str], m: dict[str, np.ndarray], x_clean: torch.Tensor,
                   batch: int, dev: torch.device) -> dict:
    """Read the stored PNGs back, classify them here, and measure ‖δ‖₂ again: do the manifests tell the truth?"""
    x, _, keys = read_images([folder / n for n in names])
    order = np.argsort([int(k) for k in keys], kind="stable")
    x = x[torch.from_numpy(order)]
    pred = torch.cat([model(x[i:i + batch].to(dev).float().div(255)).argmax(1).cpu()
                      for i in range(0, len(x), batch)]).numpy()
    l2 = (x.float() - x_clean.float()).div(255).flatten(1).norm(dim=1).numpy()
    return {"images": len(x), "pred_disagreements": int((pred != m["adv_pred"]).sum()),
            "l2_max_abs_diff": float(np.abs(l2 - m["l2"]).max()) if len(x) else 0.0}


def _frac(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def _median(v: np.ndarray) -> float | None:
    return float(np.median(v)) if v.size else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def advgen_numbers(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    """Success and size of the float attack and of both stored copies, over the images DeepFool attacked."""
    if not (np.array_equal(a["index"], b["index"]) and np.array_equal(a["label"], b["label"])):
        raise SystemExit("benchmark: the two runs' manifests cover different images")
    label = a["label"]
    attacked = a["clean_pred"] == label
    n = int(attacked.sum())
    fl2, sl2_a, sl2_b = a["float_l2"][attacked], a["l2"][attacked], b["l2"][attacked]
    float_ok = a["float_pred"][attacked] != label[attacked]
    ok_a, ok_b = a["adv_pred"][attacked] != label[attacked], b["adv_pred"][attacked] != label[attacked]
    steps = a["lattice_steps"][attacked].astype(np.int64) if "lattice_steps" in a else np.zeros(n, np.int64)
    needed = steps > 0
    float_succ = _frac(float_ok)
    med_f, med_a, med_b = _median(fl2), _median(sl2_a), _median(sl2_b)
    both = float_ok & ok_a
    return {
        "images": len(label), "clean_accuracy": _frac(attacked), "attacked": n,
        "float_success": float_succ,
        "stored_success_aware": _frac(ok_a), "stored_success_plain": _frac(ok_b),
        # float runs of (a) and (b) are the same attack: their sizes must agree
        "float_runs_agree": bool(np.array_equal(a["float_pred"], b["float_pred"])
                                 and np.allclose(a["float_l2"], b["float_l2"], rtol=0, atol=1e-6)),
        "median_l2_float": med_f, "median_l2_stored_aware": med_a, "median_l2_stored_plain": med_b,
        "ratio_aware": _ratio(med_a, med_f), "ratio_plain": _ratio(med_b, med_f),
        "median_per_image_ratio_aware": _median(sl2_a[fl2 > 0] / fl2[fl2 > 0]),
        "median_l2_float_where_both_succeed": _median(fl2[both]),
        "median_l2_stored_aware_where_both_succeed": _median(sl2_a[both]),
        "iterations_mean": float(a["iterations"][attacked].mean()) if n else None,
        "converged_fraction": _frac(a["converged"][attacked]),
        "lattice": {
            "images_needing": int(needed.sum()), "fraction_needing": _frac(needed),
            "steps_mean": float(steps.mean()) if n else None,
            "steps_mean_where_needed": float(steps[needed].mean()) if needed.any() else None,
            "steps_max": int(steps.max()) if n else 0,
            "stored_success_where_needed": _frac(ok_a[needed]),
        },
    }


# --- foolbox ---------------------------------------------------------------------------------------

def import_foolbox(site: Path, install: bool):
    """foolbox from the venv or from ``site`` (installed there without dependencies if missing); or a reason."""
    for attempt in range(2):
        if site.is_dir() and str(site) not in sys.path:
            sys.path.append(str(site))  # appended: the venv's numpy and torch always win
        try:
            import foolbox
            return foolbox, None
        except ImportError as e:
            reason = f"foolbox cannot be imported ({e})"
        if attempt or not install:
            return None, reason
        print(f"installing {' '.join(FOOLBOX)} into {site} (not a dependency of advgen) ...", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                               *FOOLBOX], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return None, f"pip install --target {site} {' '.join(FOOLBOX)} failed: {done.stderr.strip()[-500:]}"
    return None, "unreachable"


def foolbox_arrays(fb, model, x_u8: torch.Tensor, y: torch.Tensor, batch: int, dev: torch.device) -> dict:
    """Per image: foolbox's float prediction and ‖δ‖₂, and the same for its result rounded to nearest uint8."""
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=dev)
    attack = fb.attacks.L2DeepFoolAttack(steps=DEEPFOOL["max_iter"], candidates=DEEPFOOL["candidates"],
                                         overshoot=DEEPFOOL["overshoot"], loss="logits")
    parts: dict[str, list[torch.Tensor]] = {"float_pred": [], "stored_pred": [], "float_l2": [], "stored_l2": []}
    t = time.perf_counter()
    for i in range(0, len(y), batch):
        x = x_u8[i:i + batch].float().div(255).to(dev)
        _, adv, _ = attack(fmodel, x, fb.criteria.Misclassification(y[i:i + batch].to(dev)), epsilons=None)
        adv = adv.detach()
        rounded = adv.mul(255).round().div(255)  # what a uint8 copy holds: nearest, never truncation
        with torch.no_grad():
            parts["float_pred"].append(model(adv).argmax(1).cpu())
            parts["stored_pred"].append(model(rounded).argmax(1).cpu())
        parts["float_l2"].append((adv - x).flatten(1).norm(dim=1).cpu())
        parts["stored_l2"].append((rounded - x).flatten(1).norm(dim=1).cpu())
    return {**{k: torch.cat(v).numpy() for k, v in parts.items()}, "seconds": np.float64(time.perf_counter() - t)}


def run_foolbox(fb, model, x_u8: torch.Tensor, y: torch.Tensor, a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                *, images: int, batch: int, dev: torch.device, cache: Path) -> dict:
    """foolbox's L2 DeepFool with advgen's settings on the first ``images`` images (0 = all), beside advgen's
    numbers on the same images; foolbox's per-image results are cached in ``cache`` (an .npz)."""
    n = len(y) if images <= 0 else min(images, len(y))
    if cache.is_file():
        with np.load(cache) as z:
            arr, cached = {k: z[k] for k in z.files}, True
    else:
        arr, cached = foolbox_arrays(fb, model, x_u8[:n], y[:n], batch, dev), False
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache.with_suffix(".tmp.npz"), **arr)
        cache.with_suffix(".tmp.npz").replace(cache)
    attacked = a["clean_pred"][:n] == a["label"][:n]
    label = a["label"][:n][attacked]
    fl2, sl2 = arr["float_l2"][attacked], arr["stored_l2"][attacked]
    mine = a["float_l2"][:n][attacked]
    both = (fl2 > 0) & (mine > 0)
    med_f, med_s = _median(fl2), _median(sl2)
    same = advgen_numbers({k: v[:n] for k, v in a.items()}, {k: v[:n] for k, v in b.items()})
    return {
        "library": f"foolbox {fb.__version__} L2DeepFoolAttack", "settings": {**DEEPFOOL, "loss": "logits"},
        "images": n, "attacked": int(attacked.sum()), "seconds": float(arr["seconds"]), "cached": cached,
        "float_success": _frac(arr["float_pred"][attacked] != label),
        "stored_success_rounded": _frac(arr["stored_pred"][attacked] != label),
        "median_l2_float": med_f, "median_l2_stored_rounded": med_s, "ratio_rounded": _ratio(med_s, med_f),
        "median_l2_float_over_advgen": _ratio(med_f, _median(mine)),
        "median_per_image_l2_over_advgen": _median(fl2[both] / mine[both]),
        "advgen_same_images": {k: same[k] for k in (
            "attacked", "float_success", "stored_success_aware", "stored_success_plain", "median_l2_float",
            "median_l2_stored_aware", "median_l2_stored_plain")},
    }


# --- report ----------------------------------------------------------------------------------------

def targets(r: dict) -> dict:
    """The issue's two targets for the rounding-aware copy, with the measured value and pass/fail."""
    gap = (r["float_success"] - r["stored_success_aware"]) * 100 if r["attacked"] else None
    ratio = r["ratio_aware"]
    return {
        "success_gap_pp": {"value": gap, "limit": SUCCESS_GAP_PP, "short": "success gap, pp (<= 1)",
                           "rule": "float success - stored success (rounding-aware), in percentage points, <= 1",
                           "pass": gap is not None and gap <= SUCCESS_GAP_PP},
        "l2_ratio": {"value": ratio, "limit": L2_RATIO, "short": "median l2 stored/float (<= 1.3)",
                     "rule": "median stored l2 (rounding-aware) / median float l2, same images, <= 1.3",
                     "pass": ratio is not None and ratio <= L2_RATIO},
    }


def print_tables(report: dict) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, {report['date']}; {report['data']}, "
          f"first {report['images']} test images; over the images each victim classifies correctly (attacked)")
    rows, peer_rows, target_rows = [], [], []
    for arch, v in report["victims"].items():
        a = v["advgen"]
        rows.append({"victim": arch, "attacked": a["attacked"], "float succ": a["float_success"],
                     "stored aware": a["stored_success_aware"], "stored plain": a["stored_success_plain"],
                     "med l2 float": a["median_l2_float"], "med l2 aware": a["median_l2_stored_aware"],
                     "ratio aware": a["ratio_aware"], "med l2 plain": a["median_l2_stored_plain"],
                     "ratio plain": a["ratio_plain"], "lattice imgs": a["lattice"]["images_needing"],
                     "steps mean": a["lattice"]["steps_mean"],
                     "steps mean>0": a["lattice"]["steps_mean_where_needed"], "steps max": a["lattice"]["steps_max"]})
        p = v["peer"]
        if "skipped" not in p:
            s = p["advgen_same_images"]
            peer_rows.append({"victim": arch, "images": p["images"], "attacked": p["attacked"],
                              "fb float succ": p["float_success"], "advgen float succ": s["float_success"],
                              "fb rounded succ": p["stored_success_rounded"], "advgen plain": s["stored_success_plain"],
                              "advgen aware": s["stored_success_aware"], "fb med l2 float": p["median_l2_float"],
                              "advgen med l2 float": s["median_l2_float"],
                              "fb/advgen": p["median_l2_float_over_advgen"],
                              "fb med l2 rounded": p["median_l2_stored_rounded"],
                              "advgen med l2 aware": s["median_l2_stored_aware"], "fb s": p["seconds"]})
        for t in v["targets"].values():
            target_rows.append({"victim": arch, "target": t["short"], "value": t["value"],
                                "pass": "PASS" if t["pass"] else "FAIL"})
    print("\nadvgen generate --method deepfool (aware = --rounding-aware, plain = --no-rounding-aware)")
    print(table(rows, list(rows[0])))
    if peer_rows:
        print("\nfoolbox L2DeepFoolAttack (same settings), float and rounded to nearest uint8")
        print(table(peer_rows, list(peer_rows[0])))
    else:
        print("\nfoolbox: " + "; ".join(f"{k}: {v['peer']['skipped']}" for k, v in report["victims"].items()))
    print("\ntargets")
    print(table(target_rows, list(target_rows[0])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "rounding",
                    help="cache: data, victims, generated copies, foolbox (kept for cheap reruns)")
    ap.add_argument("--out", type=Path, help="JSON report (default WORK/rounding_aware.json)")
    ap.add_argument("--images", type=int, default=0, help="the first N test images (0 = all 10 000)")
    ap.add_argument("--victims", default=",".join(VICTIMS), help=f"comma-separated, of: {', '.join(VICTIMS)}")
    ap.add_argument("--ckpt-dir", type=Path, help="existing checkpoints ARCH.pt (e.g. demo/data/fashion_mnist/"
                    "victims) instead of training them here")
    ap.add_argument("--params", type=Path, default=ROOT / "demo" / "params.yaml", help="the victims' recipes")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the demo's)")
    ap.add_argument("--batch-size", type=int, default=500, help="advgen's and foolbox's batch (the demo's 500)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--tiny", action="store_true", help="synthetic Fashion-MNIST-shaped data, "
                    f"{TINY['train']} + {TINY['test']} images, one epoch (for tests)")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip foolbox")
    ap.add_argument("--peer-images", type=int, default=0,
                    help="foolbox on the first N of the images only (0 = all); advgen's numbers on the same N are "
                         "reported beside it")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    archs = [a.strip() for a in args.victims.split(",") if a.strip()]
    if bad := [a for a in archs if a not in VICTIMS]:
        ap.error(f"unknown victim {bad}; of: {', '.join(VICTIMS)}")
    root = args.work / ("tiny" if args.tiny else "fashion_mnist")
    root.mkdir(parents=True, exist_ok=True)
    out_path = args.out or args.work / ("rounding_aware-tiny.json" if args.tiny else "rounding_aware.json")

    print(f"data in {root} ...", flush=True)
    full, clean = prepare(root, tiny=args.tiny, images=args.images)
    stats = open_clean(clean)
    names = stats["shards"]["test"]
    x_u8, y, keys = load_clean_split(clean, stats, "test")
    assert [int(k) for k in keys] == list(range(len(keys))), "test keys are the image indices, in order"
    recipes = demo_recipes(args.params)

    report = report_header("rounding_aware", dev)
    report.update({
        "size": "tiny" if args.tiny else "full",
        "data": ("synthetic Fashion-MNIST-shaped IDX files (advgen prepare --verify structure)" if args.tiny
                 else "Fashion-MNIST, Debian dataset-fashion-mnist (advgen prepare, content sha256 checked)"),
        "images": len(y), "split": "test", "batch_size": args.batch_size, "deepfool": DEEPFOOL,
        "targets": {"success_gap_pp": SUCCESS_GAP_PP, "l2_ratio": L2_RATIO}, "victims": {},
    })
    fb, why = import_foolbox(args.work / "site", install=True) if args.peer else (None, "skipped (--no-peer)")
    for arch in archs:
        recipe = dict(recipes[arch], **({"epochs": TINY["epochs"]} if args.tiny else {}))
        if args.ckpt_dir is not None:
            ckpt, trained = args.ckpt_dir / f"{arch}.pt", False
        else:
            ckpt, trained = train_victim(root / "victims", full, arch, recipe, args.seed, dev), True
        model = load(ckpt, dataset="fashion_mnist", map_location=dev)  # eval mode
        entry: dict = {"checkpoint": str(ckpt), "sha256": file_digest(ckpt),
                       "trained_here": trained, "recipe": recipe if trained else None,
                       "test_accuracy": model.meta.test_accuracy, "generate": {}}
        m = {}
        for mode, flag in MODES.items():
            out = root / "adv" / f"{arch}-n{len(y)}-{mode}"
            print(f"{arch}: advgen generate --method deepfool {flag} ...", flush=True)
            entry["generate"][mode] = run_generate(clean, ckpt, out, mode, args.batch_size, dev)
            m[mode] = manifest(out / "deepfool", names)
            with torch.no_grad():
                entry["generate"][mode]["stored_recheck"] = recheck_stored(model, out / "deepfool", names, m[mode],
                                                                           x_u8, args.batch_size, dev)
        entry["advgen"] = advgen_numbers(m["aware"], m["plain"])
        entry["targets"] = targets(entry["advgen"])
        if fb is None:
            entry["peer"] = {"skipped": why}
        else:
            print(f"{arch}: foolbox L2DeepFoolAttack ...", flush=True)
            cache = root / "peer" / (f"{arch}-{entry['sha256'][:16]}-n{len(y)}-first{args.peer_images}"
                                     f"-b{args.batch_size}-{dev.type}-foolbox{fb.__version__}.npz")
            entry["peer"] = run_foolbox(fb, model, x_u8, y, m["aware"], m["plain"], images=args.peer_images,
                                        batch=args.batch_size, dev=dev, cache=cache)
        report["victims"][arch] = entry
    report["all_pass"] = all(t["pass"] for v in report["victims"].values() for t in v["targets"].values())
    write_report(report, out_path)
    print_tables(report)
    print(f"report: {out_path}")


if __name__ == "__main__":
    main()
