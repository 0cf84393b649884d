"""Trainer throughput against a bare loop on the same model and device, in one run.

The floor is a plain PyTorch loop over pre-made float batches already on the
device in the layout the model wants (channels-last), in the precision advgen
trains in (bf16 autocast on CUDA, fp32 on the CPU; on CUDA the fp32 loop is
reported beside it): forward, loss, backward, SGD step (Nesterov, weight
decay), nothing else. Two cases measure advgen against it:

* ``loop``: ``advgen.train.fit`` in this process on the same number of steps
  and batch size; it adds on-device uint8 -> float conversion, crop and flip
  augmentation, the per-step schedule and loss/accuracy accumulation.
* ``recipe``: ``advgen train`` end to end (a process of its own, reading the
  clean shards) with a full-study recipe from params.yaml (default
  ``cifar10-resnet18``: 18 epochs, batch 512, lr 0.2, weight decay 5e-4) on
  synthetic CIFAR-10 written in its native archive format and prepared by
  ``advgen prepare`` (see common.py). Its training seconds are compared with
  the floor's time for the same number of steps; the target is 60 s on an H100.

    python benchmarks/train_speed.py --device cuda --out report.json   # GPU: full recipe, 50 000 images
    python benchmarks/train_speed.py --tiny --device cpu                # seconds on a CPU
    python benchmarks/train_speed.py --accuracy --device cpu            # also the demo recipe on Fashion-MNIST

Accuracy on synthetic data means nothing beyond "it learned": the pattern is easy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from advgen.data.clean import load_clean_split, open_clean
from advgen.victims.train import Recipe, accuracy, default_recipe, fit, resolve_device, train_victim
from advgen.victims import build
from common import ROOT, advgen, prepare_cifar10, report_header, sync, table, write_report

TARGET_H100_S = 60.0  # cifar10-resnet18, 18 epochs
# --size full (the GPU run) and tiny (seconds on a CPU); explicit flags override either.
PRESETS = {
    "full": {"limit": 0, "steps": 97},  # 97 steps = one epoch of 50 000 images at batch 512
    "tiny": {"limit": 32, "steps": 2, "victim": "simple_cnn", "epochs": 1, "batch_size": 16},
}


def load_recipe(name: str) -> dict:
    """One entry of params.yaml's ``train`` section ({dataset, victim, epochs, batch_size, lr, ...})."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if name not in params["train"]:
        raise SystemExit(f"--recipe {name!r} is not in params.yaml's train section")
    return params["train"][name]


def bare_loop(victim: str, shape, batch: int, steps: int, dev: torch.device, *, lr: float, weight_decay: float,
              bf16: bool) -> float:
    """Images per second of the plainest training loop for this model."""
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fit() sets it
    model = build(victim, dataset="bench", input_shape=shape, num_classes=10,
                  mean=[0.5] * shape[0], std=[0.25] * shape[0]).to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    xs = [torch.rand(batch, *shape, device=dev).contiguous(memory_format=torch.channels_last) for _ in range(8)]
    ys = [torch.randint(0, 10, (batch,), device=dev) for _ in range(8)]

    def step(i: int) -> None:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(xs[i % 8])
        loss = F.cross_entropy(logits.float(), ys[i % 8])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(5):
        step(i)
    sync(dev)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(dev)
    return steps * batch / (time.perf_counter() - t)


def fit_loop(victim: str, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, dev: torch.device, *,
             lr: float, weight_decay: float) -> float:
    """Images per second of ``advgen.train.fit`` over ``steps`` batches (one epoch) of CIFAR-10 uint8 images."""
    torch.manual_seed(0)
    model = build(victim, dataset="bench", input_shape=x.shape[1:], num_classes=10, mean=[0.5] * x.shape[1],
                  std=[0.25] * x.shape[1])
    recipe = Recipe(epochs=1, batch_size=batch, lr=lr, weight_decay=weight_decay)
    warm = min(5, steps) * batch  # a short warm-up epoch first, as the bare loop gets
    fit(model, x[:warm], y[:warm], recipe=recipe, seed=0, device=dev, crop_pad=4, flip=True)
    stats = fit(model, x[:steps * batch], y[:steps * batch], recipe=recipe, seed=0, device=dev, crop_pad=4, flip=True)
    return stats.images_per_second


def fashion_accuracy(victim: str, dev: torch.device) -> dict:
    """The demo's default recipe on Debian's real Fashion-MNIST: test accuracy and wall time."""
    from advgen.data.datasets import DATASETS, load_source, locate

    spec = DATASETS["fashion_mnist"]
    paths = locate(spec, [Path(d) for d in spec.system_dirs])
    if paths is None:
        return {"skipped": "dataset-fashion-mnist not installed"}
    src = load_source(spec, paths)
    x = torch.from_numpy(src.images["train"].copy()).permute(0, 3, 1, 2).contiguous()
    xt = torch.from_numpy(src.images["test"].copy()).permute(0, 3, 1, 2).contiguous()
    recipe = default_recipe(victim, "fashion_mnist")
    t = time.perf_counter()
    model, stats = train_victim(victim, dataset="fashion_mnist", num_classes=10, x=x,
                                y=torch.from_numpy(src.labels["train"]), recipe=recipe, seed=0, device=dev,
                                crop_pad=spec.crop_pad, flip=spec.flip)
    acc = accuracy(model, xt, torch.from_numpy(src.labels["test"]), device=dev)
    return {"recipe": recipe.__dict__, "test_accuracy": acc, "train_seconds": stats.seconds,
            "wall_seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--size", choices=["auto", "full", "tiny"], default="auto",
                    help="presets: full = 50 000 training images and the whole recipe (GPU); tiny = 32 images, "
                         "simple_cnn, 1 epoch (CPU, seconds); auto = full on CUDA, tiny on the CPU")
    ap.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="same as --size tiny")
    ap.add_argument("--cases", default="loop,recipe", help="loop (fit vs bare, in process), recipe (advgen train)")
    ap.add_argument("--recipe", default="cifar10-resnet18", help="a params.yaml train entry on cifar10")
    ap.add_argument("--victim", help="override the recipe's victim")
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs")
    ap.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    ap.add_argument("--lr", type=float, help="override the recipe's peak learning rate")
    ap.add_argument("--weight-decay", type=float, help="override the recipe's weight decay")
    ap.add_argument("--limit", type=int, help="images per split of the synthetic data (0 = all 50 000 + 10 000)")
    ap.add_argument("--steps", type=int, help="timed steps of the bare loop and of fit (loop case)")
    ap.add_argument("--accuracy", action="store_true", help="also train the demo recipe on Fashion-MNIST")
    ap.add_argument("--work", type=Path, help="scratch folder; synthetic data is kept there for later runs "
                    "(default: a temporary folder, removed)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "train_speed.json",
                    help="the JSON report")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    size = args.size if args.size != "auto" else ("full" if dev.type == "cuda" else "tiny")
    recipe = load_recipe(args.recipe)
    if recipe["dataset"] != "cifar10":
        ap.error(f"--recipe {args.recipe} trains on {recipe['dataset']}; the synthetic data here is cifar10")
    preset = {**{k: recipe[k] for k in ("victim", "epochs", "batch_size", "lr", "weight_decay")}, **PRESETS[size]}
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in cases if c not in ("loop", "recipe")]:
        ap.error(f"unknown case(s) {unknown}; cases: loop, recipe")

    work = args.work or Path(tempfile.mkdtemp(prefix="advgen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = bench(args, dev, size, cases, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write_report(report, args.out)
    print_tables(report)
    print(f"report: {args.out}")


def bench(args, dev: torch.device, size: str, cases: list[str], work: Path) -> dict:
    report = report_header("train_speed", dev)
    print(f"synthetic CIFAR-10 in {work} (limit {args.limit or 'none'}) ...", flush=True)
    clean = prepare_cifar10(work, args.limit)
    stats = open_clean(clean)
    x, y, _ = load_clean_split(clean, stats, "train")
    batch = min(args.batch_size, len(y))
    steps_per_epoch = len(y) // batch
    steps = max(1, min(args.steps, steps_per_epoch))
    bf16 = dev.type == "cuda"  # what fit() trains in
    print(f"bare loop: {args.victim}, batch {batch}, {steps} steps on {dev} ...", flush=True)
    kw = {"lr": args.lr, "weight_decay": args.weight_decay}
    floor = {"precision": "bf16 autocast" if bf16 else "fp32",
             "images_per_second": bare_loop(args.victim, tuple(x.shape[1:]), batch, steps, dev, bf16=bf16, **kw)}
    if bf16:
        floor["fp32_images_per_second"] = bare_loop(args.victim, tuple(x.shape[1:]), batch, steps, dev, bf16=False,
                                                    **kw)
    report.update({
        "size": size, "data": "synthetic CIFAR-10 (native archive -> advgen prepare --verify structure)",
        "train_images": len(y), "victim": args.victim, "batch_size": batch, "steps": steps,
        "memory_format": "channels_last", "recipe": {"name": args.recipe, "epochs": args.epochs,
                                                     "batch_size": batch, "lr": args.lr,
                                                     "weight_decay": args.weight_decay},
        "floor": floor, "cases": {},
    })
    if "loop" in cases:
        print("fit ...", flush=True)
        ips = fit_loop(args.victim, x, y, batch, steps, dev, **kw)
        report["cases"]["loop"] = {"images_per_second": ips, "time_over_floor": floor["images_per_second"] / ips}
    if "recipe" in cases:
        print(f"advgen train: {args.epochs} epochs ...", flush=True)
        metrics = work / "train-metrics.json"
        wall = advgen("train", "--dataset", "cifar10", "--victim", args.victim, "--clean", clean,
                      "--out", work / "train-victim.pt", "--metrics", metrics, "--epochs", args.epochs,
                      "--batch-size", batch, "--lr", args.lr, "--weight-decay", args.weight_decay, "--device", dev)
        m = json.loads(metrics.read_text())
        floor_s = args.epochs * steps_per_epoch * batch / floor["images_per_second"]
        r = {"wall_s": wall, "train_s": m["train_seconds"], "load_s": m["load_seconds"],
             "images_per_second": m["images_per_second"], "test_accuracy": m["test_accuracy"],
             "floor_s": floor_s, "train_over_floor": m["train_seconds"] / floor_s, "wall_over_floor": wall / floor_s}
        if dev.type == "cuda" and size == "full":
            r["target_s"] = TARGET_H100_S
        report["cases"]["recipe"] = r
    if args.accuracy:
        report["fashion_mnist"] = fashion_accuracy("simple_cnn", dev)
    return report


def print_tables(report: dict) -> None:
    r = report["recipe"]
    print(f"\n{report['device']}, torch {report['torch']}, {report['date']}; {report['victim']}, "
          f"{report['train_images']} training images, batch {report['batch_size']}")
    f = report["floor"]
    rows = [{"what": f"bare loop ({f['precision']})", "img/s": f["images_per_second"]}]
    if "fp32_images_per_second" in f:
        rows.append({"what": "bare loop (fp32)", "img/s": f["fp32_images_per_second"]})
    if "loop" in report["cases"]:
        c = report["cases"]["loop"]
        rows.append({"what": f"advgen fit, {report['steps']} steps", "img/s": c["images_per_second"],
                     "time / floor": c["time_over_floor"]})
    if "recipe" in report["cases"]:
        c = report["cases"]["recipe"]
        rows.append({"what": f"advgen train, {r['epochs']} epochs (lr {r['lr']}, wd {r['weight_decay']})",
                     "img/s": c["images_per_second"], "time / floor": c["train_over_floor"],
                     "train s": c["train_s"], "floor s": c["floor_s"], "wall s": c["wall_s"],
                     "target s": c.get("target_s")})
    print(table(rows, ["what", "img/s", "time / floor", "train s", "floor s", "wall s", "target s"]))
    if "fashion_mnist" in report:
        print(f"fashion_mnist: {report['fashion_mnist']}")


if __name__ == "__main__":
    sys.exit(main())
