"""Generation end to end against its compute floor, and against torchattacks, in one run.

advgen is timed as a real ``advgen generate`` process: start-up, reading and
decoding the clean shards, the attack, rounding, the predictions (and, with
the rounding audit, a second forward on the float image), host<->device
copies, PNG encoding, tar and parquet writing in ``--workers`` processes,
cards and stats.

The floor of a case is its compute, measured in the same run with bare loops
on the same model, device, batches (formed within shards, as advgen forms
them), channels-last layout and precision: advgen generates in fp32 (cuDNN's
default TF32 convolutions on CUDA), so that is the floor; on CUDA the same
loops under bf16 autocast are reported beside it as a what-if. With F = one
forward pass over all images, B = one forward+backward (loss gradient w.r.t.
the input) and J = one forward plus ``candidates`` backward passes:

* fgsm, grid24 (fgsm, fgm, d_fgsm, d_fgm x 6 ε): B + copies x F (one
  gradient shared by every copy, one prediction per stored copy);
* pgd (10 steps): F (clean logits) + 10 B + F (prediction);
* deepfool: F + (mean iterations) x J + (fraction attacked) x F (the check
  that finds each image fooled) + F, the iterations read from advgen's
  manifests of the same run.

``floor_audit`` adds the audit's forward per copy. Where the time goes is
measured separately on the same data: reading+decoding the clean shards,
``.to(device)`` of the images and ``.cpu()`` of each stored copy,
``advgen.shards.encode_png`` and ``advgen.variants.write_shard`` over the
output shards advgen wrote (the first shard of every copy, scaled to all
images; serial times, which advgen spreads over its writer processes while
the next shard computes), and the interpreter start-up.

The peer (``--peer``) is torchattacks doing the same copies: FGSM per
(method, ε) copy (it has no fgm/d_fgsm/d_fgm; one forward+backward per copy
is what any of them costs), PGD, and DeepFool (per image, so on the first
``--peer-deepfool-images`` images, extrapolated). ``--peer-mode loop`` keeps
each copy as uint8 in memory and saves it once; ``save`` uses its documented
``Attack.save`` (float tensors, re-saved after every batch).

Synthetic data (default): CIFAR-10 in its native archive format, prepared by
``advgen prepare``, and a victim trained for ``--victim-epochs`` by ``advgen
train`` (see common.py and README.md). Or bring a clean folder and victim:

    python benchmarks/generate_speed.py --device cuda --out report.json          # GPU: 60 000 images
    python benchmarks/generate_speed.py --tiny --device cpu                      # seconds on a CPU
    python benchmarks/generate_speed.py --clean demo/data/fashion_mnist/clean \\
        --ckpt demo/data/fashion_mnist/victims/simple_cnn.pt --cases fgsm,grid24 --device cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from advgen.data.clean import load_clean_split, open_clean
from advgen.storage.shards import encode_png, read_images
from advgen.victims.train import channel_stats, resolve_device
from advgen.storage.variants import read_manifests, write_shard
from advgen.victims import build, load, save
from common import ROOT, advgen, prepare_cifar10, report_header, sync, table, write_report

GRID_METHODS = ["fgsm", "fgm", "d_fgsm", "d_fgm"]
GRID_EPS = [0.01, 0.02, 0.03, 0.05, 0.1, 0.2]
CASES = {  # name: (methods, eps)
    "fgsm": (["fgsm"], [0.03]),
    "grid24": (GRID_METHODS, GRID_EPS),
    "pgd": (["pgd"], [0.03]),
    "deepfool": (["deepfool"], []),
}
TARGET_H100_S = {"fgsm": 10.0, "grid24": 60.0, "pgd": 30.0, "deepfool": 90.0}  # resnet18, 60 000 CIFAR-10 images
RATIO_TARGET = 1.5
# --size full (the GPU runs) and tiny (every case in seconds on a CPU); explicit flags override either.
PRESETS = {
    "full": {"limit": 0, "victim": "resnet18", "victim_epochs": 2, "batch_size": 1024, "workers": 4,
             "peer_deepfool_images": 500},
    "tiny": {"limit": 32, "victim": "simple_cnn", "victim_epochs": 3, "batch_size": 32, "workers": 1,
             "peer_deepfool_images": 4},
}
SPLITS = ["train", "test"]


def batch_spans(stats: dict, batch: int) -> list[tuple[int, int]]:
    """(start, end) of every batch over the splits in order, formed within shards as ``advgen generate`` does."""
    spans, offset = [], 0
    size = stats.get("shard_size", 0)
    for split in SPLITS:
        count = stats["counts"][split]
        sizes = [min(size, count - i * size) for i in range(len(stats["shards"][split]))] if size else [count]
        for n in sizes:
            spans += [(offset + lo, offset + min(lo + batch, n)) for lo in range(0, n, batch)]
            offset += n
    return spans


def floor_units(model, x: torch.Tensor, y: torch.Tensor, spans, dev: torch.device, *, candidates: int,
                bf16: bool) -> dict:
    """Seconds of the bare loops over all images: F (forward), B (forward+backward), J (forward + k backward)."""
    def batches():
        for lo, hi in spans:
            yield x[lo:hi].float().div_(255).contiguous(memory_format=torch.channels_last), y[lo:hi]

    def autocast():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16)

    def fwd(xb, yb):
        with torch.no_grad(), autocast():
            model(xb).argmax(1)

    def fb(xb, yb):
        xb.requires_grad_(True)
        with autocast():
            logits = model(xb)
        torch.autograd.grad(F.cross_entropy(logits.float(), yb, reduction="sum"), xb)

    def jac(xb, yb):
        xb.requires_grad_(True)
        with autocast():
            out = model(xb).float()
        k = min(candidates, out.shape[1])
        for j in range(k):
            torch.autograd.grad(out[:, j].sum(), xb, retain_graph=j < k - 1)

    def timed(step) -> float:
        for i, (xb, yb) in enumerate(batches()):  # warm-up: kernels chosen, memory pooled
            if i == 2:
                break
            step(xb, yb)
        sync(dev)
        t = time.perf_counter()
        for xb, yb in batches():
            step(xb, yb)
        sync(dev)
        return time.perf_counter() - t

    out = {"forward_s": timed(fwd), "forward_backward_s": timed(fb)}
    if candidates:
        out["jacobian_s"] = timed(jac)
    return out


def case_floor(name: str, u: dict, copies: int, steps: int, deepfool: dict | None) -> tuple[float, float, str]:
    """(floor, floor with the audit's forward per copy, formula) in seconds, from the unit loops."""
    f, b = u["forward_s"], u["forward_backward_s"]
    if name == "pgd":
        floor, formula = 2 * f + steps * b, f"2F + {steps}B"
    elif name == "deepfool":
        it, active = deepfool["iterations_mean"], deepfool["attacked_fraction"]
        floor, formula = (2 + active) * f + it * u["jacobian_s"], f"(2 + {active:.3f})F + {it:.3f}J"
    else:
        floor, formula = b + copies * f, f"B + {copies}F"
    return floor, floor + copies * f, formula


def make_victim(work: Path, clean: Path, arch: str, epochs: int, dev: torch.device) -> tuple[Path, dict]:
    """A CIFAR-10 victim: trained ``epochs`` by ``advgen train`` (cached in ``work``), or, with 0, initialised only."""
    ckpt = work / f"victim-{arch}-{clean.name}-e{epochs}-{dev.type}.pt"
    metrics = ckpt.with_suffix(".json")
    if epochs == 0:
        if not ckpt.is_file():
            x, _, _ = load_clean_split(clean, open_clean(clean), "train")
            mean, std = channel_stats(x)
            torch.manual_seed(0)
            save(build(arch, dataset="cifar10", input_shape=x.shape[1:], num_classes=10, mean=mean, std=std), ckpt)
        return ckpt, {"arch": arch, "epochs": 0, "test_accuracy": None}
    if not (ckpt.is_file() and metrics.is_file()):
        advgen("train", "--dataset", "cifar10", "--victim", arch, "--clean", clean, "--out", ckpt,
               "--metrics", metrics, "--epochs", epochs, "--device", dev)
    m = json.loads(metrics.read_text())
    return ckpt, {"arch": arch, "epochs": epochs, "test_accuracy": m["test_accuracy"],
                  "train_seconds": m["train_seconds"]}


def _numpy_column(col) -> np.ndarray:
    col = col.combine_chunks()
    if hasattr(col.type, "list_size"):  # fixed-size lists (top-5 classes)
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)


def write_breakdown(out: Path, folders: list[str], shard: str, images_total: int, work: Path) -> dict:
    """Serial seconds of ``encode_png`` and ``write_shard`` over the output advgen wrote, scaled to every image.

    Per copy, its first shard is re-encoded and re-written (same images, keys,
    labels and manifest columns); the sum over copies is what a single writer
    process would spend.
    """
    png = write = 0.0
    measured = 0
    scratch = Path(tempfile.mkdtemp(prefix="bench-write-", dir=work))
    for folder in folders:
        tar = out / folder / shard
        x, labels, keys = read_images([tar])
        images = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
        manifest = pq.read_table(tar.with_suffix(".parquet"))
        columns = {c: _numpy_column(manifest[c]) for c in manifest.column_names if c != "key"}
        scale = images_total / len(keys)
        t = time.perf_counter()
        for img in images:
            encode_png(img)
        png += (time.perf_counter() - t) * scale
        t = time.perf_counter()
        write_shard(scratch / shard, keys=keys, labels=labels.numpy(), images=images, floats=None, columns=columns,
                    fingerprint="benchmark")
        write += (time.perf_counter() - t) * scale
        measured += len(keys)
    shutil.rmtree(scratch)
    return {"png_encode_s": png, "tar_parquet_s": max(0.0, write - png), "write_shard_s": write,
            "write_measured_images": measured}


def deepfool_stats(folder: Path, stats: dict) -> dict:
    t = read_manifests(folder, [n for s in SPLITS for n in stats["shards"][s]])
    it = t["iterations"].to_numpy()
    attacked = t["clean_pred"].to_numpy() == t["label"].to_numpy()
    return {"iterations_mean": float(it.mean()), "iterations_max": int(it.max()),
            "attacked_fraction": float(attacked.mean()),
            "converged_fraction": float(t["converged"].to_numpy(zero_copy_only=False).mean())}


def run_peer(name: str, model, x_u8: torch.Tensor, y: torch.Tensor, *, batch: int, mode: str, steps: int,
             max_iter: int, deepfool_images: int, dev: torch.device, work: Path) -> dict:
    """torchattacks doing the copies of case ``name``; seconds, extrapolated to every image for DeepFool."""
    try:
        import torchattacks
    except ImportError:
        return {"skipped": "torchattacks is not installed: pip install --no-deps torchattacks==3.5.1 (on the GPU "
                           "machine, carry its wheel: benchmarks/README.md)"}
    methods, eps = CASES[name]
    if name == "pgd":
        attacks = [torchattacks.PGD(model, eps=e, alpha=2.5 * e / steps, steps=steps, random_start=True) for e in eps]
    elif name == "deepfool":
        attacks = [torchattacks.DeepFool(model, steps=max_iter, overshoot=0.02)]
    else:  # FGSM stands in for fgm, d_fgsm and d_fgm: one forward+backward per copy, as theirs would be
        attacks = [torchattacks.FGSM(model, eps=e) for _ in methods for e in eps]
    n = min(len(y), deepfool_images) if name == "deepfool" else len(y)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_u8[:n].float().div(255), y[:n]),
                                         batch_size=batch, shuffle=False)
    scratch = Path(tempfile.mkdtemp(prefix="bench-peer-", dir=work))
    t = time.perf_counter()
    for i, attack in enumerate(attacks):
        path = scratch / f"copy{i}.pt"
        if mode == "save":
            attack.save(loader, save_path=str(path), verbose=False)
        else:
            torch.save(torch.cat([attack(xb, yb).mul(255).round_().to(torch.uint8).cpu() for xb, yb in loader]), path)
    sync(dev)
    seconds = time.perf_counter() - t
    shutil.rmtree(scratch)
    return {"library": f"torchattacks {torchattacks.__version__}", "mode": mode, "copies": len(attacks),
            "images": n, "measured_s": seconds, "s": seconds * len(y) / n, "extrapolated": n < len(y)}


def run_advgen(clean: Path, ckpt: Path, out: Path, name: str, args, dev: torch.device, audit: bool) -> dict:
    methods, eps = CASES[name]
    metrics = out.with_name(out.name + "-metrics.json")
    wall = advgen("generate", "--victim-ckpt", ckpt, "--clean", clean, "--out", out, "--device", dev,
                  "--batch-size", args.batch_size, "--workers", args.workers, "--steps", args.steps,
                  "--max-iter", args.max_iter, "--candidates", args.candidates,
                  *(a for m in methods for a in ("--method", m)), *(a for e in eps for a in ("--eps", e)),
                  "--rounding-audit" if audit else "--no-rounding-audit", "--metrics", metrics)
    stage = json.loads(metrics.read_text())["seconds"]
    metrics.unlink()
    return {"wall_s": wall, "stage_s": stage}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--size", choices=["auto", "full", "tiny"], default="auto",
                    help="presets: full = 60 000 images, resnet18 (GPU); tiny = 32+32 images, simple_cnn (CPU, "
                         "seconds); auto = full on CUDA, tiny on the CPU")
    ap.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="same as --size tiny")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--audit", default="on", help="rounding audit settings to time: on, off or on,off")
    ap.add_argument("--limit", type=int, help="synthetic data: images per split (0 = all 50 000 + 10 000)")
    ap.add_argument("--victim", help="synthetic data: architecture (resnet18 in the full preset)")
    ap.add_argument("--victim-epochs", type=int,
                    help="synthetic data: epochs of `advgen train` for the victim; 0 = initialised only (then "
                         "DeepFool finds ~90%% of images already misclassified and does almost nothing)")
    ap.add_argument("--clean", type=Path, help="an existing clean folder instead of synthetic data (with --ckpt)")
    ap.add_argument("--ckpt", type=Path, help="the victim for --clean")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", type=int, help="advgen's writer processes (the study uses 4)")
    ap.add_argument("--steps", type=int, default=10, help="pgd iterations")
    ap.add_argument("--max-iter", type=int, default=50, help="DeepFool iteration limit")
    ap.add_argument("--candidates", type=int, default=10, help="DeepFool candidate classes")
    ap.add_argument("--peer", action="store_true", help="also time torchattacks doing the same copies")
    ap.add_argument("--peer-mode", choices=["loop", "save"], default="loop")
    ap.add_argument("--peer-deepfool-images", type=int, help="torchattacks' DeepFool runs per image: time this many")
    ap.add_argument("--work", type=Path, help="scratch folder; synthetic data and victims are kept there for "
                    "later runs (default: a temporary folder, removed)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "generate_speed.json",
                    help="the JSON report")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    size = args.size if args.size != "auto" else ("full" if dev.type == "cuda" else "tiny")
    for k, v in PRESETS[size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    audits = [a.strip() for a in args.audit.split(",") if a.strip()]
    if unknown := [c for c in cases if c not in CASES] + [a for a in audits if a not in ("on", "off")]:
        ap.error(f"unknown case or audit setting {unknown}; cases: {', '.join(CASES)}; audit: on, off")
    if (args.clean is None) != (args.ckpt is None):
        ap.error("--clean and --ckpt go together")
    work = args.work or Path(tempfile.mkdtemp(prefix="advgen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = bench(args, dev, size, cases, audits, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write_report(report, args.out)
    print_tables(report)
    print(f"report: {args.out}")


def bench(args, dev: torch.device, size: str, cases: list[str], audits: list[str], work: Path) -> dict:
    report = report_header("generate_speed", dev)
    if args.clean is None:
        print(f"synthetic CIFAR-10 in {work} (limit {args.limit or 'none'}) ...", flush=True)
        clean = prepare_cifar10(work, args.limit)
        ckpt, victim = make_victim(work, clean, args.victim, args.victim_epochs, dev)
        data = "synthetic CIFAR-10 (native archive -> advgen prepare --verify structure)"
    else:
        clean, ckpt, victim, data = args.clean, args.ckpt, {"checkpoint": str(args.ckpt)}, str(args.clean)
    stats = open_clean(clean)
    t = time.perf_counter()
    parts = [load_clean_split(clean, stats, s)[:2] for s in SPLITS]
    read_decode = time.perf_counter() - t
    x_cpu, y_cpu = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n = len(y_cpu)
    model = load(ckpt, map_location=dev).to(memory_format=torch.channels_last)
    victim = {**victim, "arch": model.meta.arch, "test_accuracy": model.meta.test_accuracy}

    torch.zeros(1, device=dev)  # the CUDA context is not part of a copy
    sync(dev)
    t = time.perf_counter()
    x, y = x_cpu.to(dev), y_cpu.to(dev)
    sync(dev)
    to_device = time.perf_counter() - t
    t = time.perf_counter()
    x.cpu()
    sync(dev)
    to_host_per_copy = time.perf_counter() - t
    startup = advgen("--version")  # interpreter, torch and every stage imported

    spans = batch_spans(stats, args.batch_size)
    k = args.candidates if "deepfool" in cases else 0
    print(f"{n} images, {model.meta.arch} on {dev}; floor loops ...", flush=True)
    units = {"fp32": floor_units(model, x, y, spans, dev, candidates=k, bf16=False)}
    if dev.type == "cuda":
        units["bf16"] = floor_units(model, x, y, spans, dev, candidates=k, bf16=True)
        torch.cuda.empty_cache()  # the advgen processes get the memory the floor loops cached

    report.update({
        "size": size, "data": data, "images": n, "splits": SPLITS, "shard_size": stats.get("shard_size"),
        "victim": victim, "batch_size": args.batch_size, "batches": len(spans), "workers": args.workers,
        "pgd_steps": args.steps, "deepfool": {"max_iter": args.max_iter, "candidates": args.candidates},
        "memory_format": "channels_last", "advgen_precision": "fp32",
        "tf32_convolutions": bool(torch.backends.cudnn.allow_tf32) if dev.type == "cuda" else None,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "ratio_target": RATIO_TARGET, "floor_units": units,
        "common": {"read_decode_s": read_decode, "to_device_s": to_device, "to_host_per_copy_s": to_host_per_copy,
                   "startup_s": startup},
        "cases": {},
    })
    for name in cases:
        methods, eps = CASES[name]
        copies = len(methods) * max(1, len(eps))
        out = work / f"out-{name}"
        case: dict = {"methods": methods, "eps": eps, "copies": copies, "advgen": {}}
        print(f"case {name}: advgen generate ...", flush=True)
        for audit in audits:
            shutil.rmtree(out, ignore_errors=True)
            case["advgen"][f"audit_{audit}"] = run_advgen(clean, ckpt, out, name, args, dev, audit == "on")
            if "breakdown" not in case:
                folders = [m if not e else f"{m}/eps={e!r}" for m in methods for e in (eps or [None])]
                if name == "deepfool":
                    case["deepfool"] = deepfool_stats(out / "deepfool", stats)
                case["breakdown"] = write_breakdown(out, folders, stats["shards"]["train"][0], n, work)
        shutil.rmtree(out, ignore_errors=True)
        for prec, u in units.items():
            floor, floor_audit, formula = case_floor(name, u, copies, args.steps, case.get("deepfool"))
            case.setdefault("floor", {})[prec] = {"s": floor, "with_audit_s": floor_audit, "formula": formula}
        floor = case["floor"]["fp32"]
        for audit, r in case["advgen"].items():
            r["over_floor"] = r["wall_s"] / floor["s"]
            r["stage_over_floor"] = r["stage_s"] / floor["s"]
            if audit == "audit_on":
                r["over_floor_with_audit"] = r["wall_s"] / floor["with_audit_s"]
        case["breakdown"].update({
            "compute_floor_s": floor["with_audit_s"] if "on" in audits else floor["s"],
            "read_decode_s": read_decode, "to_device_s": to_device, "to_host_s": copies * to_host_per_copy,
            "startup_s": startup})
        if dev.type == "cuda" and size == "full" and args.clean is None:
            case["target_s"] = TARGET_H100_S[name]
        if args.peer:
            print(f"case {name}: torchattacks ...", flush=True)
            case["peer"] = run_peer(name, model, x_cpu, y_cpu, batch=args.batch_size, mode=args.peer_mode,
                                    steps=args.steps, max_iter=args.max_iter,
                                    deepfool_images=args.peer_deepfool_images, dev=dev, work=work)
            if "s" in case["peer"]:
                best = min(r["wall_s"] for r in case["advgen"].values())
                case["peer"]["over_advgen"] = case["peer"]["s"] / best
        report["cases"][name] = case
    return report


def print_tables(report: dict) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, {report['date']}; {report['images']} images, "
          f"{report['victim']['arch']}, batch {report['batch_size']}, {report['workers']} writer(s)")
    u = report["floor_units"]
    print("floor units (s over all images): " + "; ".join(
        f"{p}: F {v['forward_s']:.3f}, B {v['forward_backward_s']:.3f}"
        + (f", J {v['jacobian_s']:.3f}" if "jacobian_s" in v else "") for p, v in u.items()))
    rows, parts = [], []
    for name, c in report["cases"].items():
        for audit, r in c["advgen"].items():
            peer = c.get("peer", {})
            rows.append({"case": name, "copies": c["copies"], "audit": audit[6:], "advgen s": r["wall_s"],
                         "stage s": r["stage_s"], "floor s": c["floor"]["fp32"]["s"], "ratio": r["over_floor"],
                         "floor+audit s": c["floor"]["fp32"]["with_audit_s"] if audit == "audit_on" else None,
                         "ratio (audit)": r.get("over_floor_with_audit"),
                         "bf16 floor s": c["floor"].get("bf16", {}).get("s"), "target s": c.get("target_s"),
                         "peer s": peer.get("s"), "peer/advgen": peer.get("over_advgen")})
        parts.append({"case": name, **{k.removesuffix("_s"): v for k, v in c["breakdown"].items()
                                       if k.endswith("_s") and k != "write_shard_s"}})
    print(table(rows, list(rows[0])) if rows else "(no cases)")
    if parts:
        print("\nwhere the time goes (s; writing is serial, advgen overlaps it with compute in its writers):")
        print(table(parts, list(parts[0])))
    for name, c in report["cases"].items():
        if "skipped" in c.get("peer", {}):
            print(f"peer skipped ({name}): {c['peer']['skipped']}")
            break
    if "deepfool" in report["cases"]:
        d = report["cases"]["deepfool"]["deepfool"]
        print(f"deepfool: mean {d['iterations_mean']:.2f} / max {d['iterations_max']} iterations, "
              f"{d['attacked_fraction']:.3f} of images attacked (the rest were misclassified already)")


if __name__ == "__main__":
    sys.exit(main())
