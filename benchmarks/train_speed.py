"""Trainer throughput against a bare loop on the same model and device, in one run.

The floor is a plain PyTorch loop over pre-made float batches already in the
layout the model wants: forward, loss, backward, SGD step, nothing else. advgen's
trainer adds on-device uint8 -> float conversion, crop (and flip) augmentation,
a per-step schedule and loss/accuracy accumulation. The ratio says what those
cost. With --accuracy it also trains the default recipe on real Fashion-MNIST
(Debian's package) and reports test accuracy and wall time.

    python benchmarks/train_speed.py [--victim simple_cnn] [--steps 60] [--device auto] [--accuracy]
    python benchmarks/train_speed.py --victim resnet18 --cifar --batch-size 512 --synthetic-run cifar10  # GPU

Synthetic data has the real shape (28x28x1 or, with --cifar, 32x32x3).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advgen.train import Recipe, _fit, accuracy, default_recipe, resolve_device, train_victim  # noqa: E402
from advgen.victims import build  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_loop(victim: str, shape, batch: int, steps: int, dev: torch.device) -> float:
    """Images per second of the plainest training loop for this model."""
    torch.manual_seed(0)
    model = build(victim, dataset="bench", input_shape=shape, num_classes=10,
                  mean=[0.5] * shape[0], std=[0.25] * shape[0]).to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    xs = [torch.rand(batch, *shape, device=dev).contiguous(memory_format=torch.channels_last) for _ in range(8)]
    ys = [torch.randint(0, 10, (batch,), device=dev) for _ in range(8)]
    cuda = dev.type == "cuda"

    def step(i: int) -> None:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(xs[i % 8]).float(), ys[i % 8])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(5):
        step(i)
    _sync(dev)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(dev)
    return steps * batch / (time.perf_counter() - t)


def advgen_loop(victim: str, shape, batch: int, steps: int, dev: torch.device, pad: int, flip: bool) -> float:
    """Images per second of advgen's trainer on ``steps`` batches (one epoch)."""
    x = torch.randint(0, 256, ((steps + 5) * batch, *shape), dtype=torch.uint8)
    y = torch.randint(0, 10, (x.shape[0],))
    torch.manual_seed(0)
    model = build(victim, dataset="bench", input_shape=shape, num_classes=10, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    # A 5-step warm-up epoch first, as the bare loop gets.
    _fit(model, x[: 5 * batch], y[: 5 * batch], recipe=Recipe(epochs=1, batch_size=batch, lr=0.01), seed=0,
         device=dev, crop_pad=pad, flip=flip, on_progress=None)
    stats = _fit(model, x[5 * batch:], y[5 * batch:], recipe=Recipe(epochs=1, batch_size=batch, lr=0.01), seed=0,
                 device=dev, crop_pad=pad, flip=flip, on_progress=None)
    return stats.images_per_second


def fashion_accuracy(victim: str, dev: torch.device) -> dict:
    from advgen.datasets import DATASETS, load_source, locate

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


def synthetic_run(victim: str, dataset: str, n: int, dev: torch.device) -> dict:
    """Wall time of the default recipe for (victim, dataset) on ``n`` random images of that shape.

    Accuracy is meaningless on random data; this times the full schedule (e.g.
    the "CIFAR-10 resnet18 in under 60 s on an H100" target) where the real
    dataset is not at hand.
    """
    from advgen.datasets import DATASETS

    spec = DATASETS[dataset]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *spec.shape), dtype=torch.uint8, generator=g)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    recipe = default_recipe(victim, dataset)
    _, stats = train_victim(victim, dataset=dataset, num_classes=spec.num_classes, x=x, y=y, recipe=recipe,
                            seed=0, device=dev, crop_pad=spec.crop_pad, flip=spec.flip)
    return {"dataset_shape": dataset, "images": n, "recipe": recipe.__dict__, "train_seconds": round(stats.seconds, 2),
            "images_per_second": round(stats.images_per_second, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--victim", default="simple_cnn")
    ap.add_argument("--cifar", action="store_true", help="3x32x32 inputs with flips (default 1x28x28, crop only)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--accuracy", action="store_true", help="also train the default recipe on Fashion-MNIST")
    ap.add_argument("--synthetic-run", metavar="DATASET", help="also time the default recipe on random images "
                    "shaped like DATASET (e.g. cifar10 with --victim resnet18 on a GPU)")
    ap.add_argument("--synthetic-n", type=int, default=50000)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    shape, pad, flip = ((3, 32, 32), 4, True) if args.cifar else ((1, 28, 28), 2, False)
    floor = bare_loop(args.victim, shape, args.batch_size, args.steps, dev)
    ours = advgen_loop(args.victim, shape, args.batch_size, args.steps, dev, pad, flip)
    result = {
        "victim": args.victim, "shape": shape, "batch_size": args.batch_size, "steps": args.steps,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "bare_images_per_second": round(floor, 1), "advgen_images_per_second": round(ours, 1),
        "advgen_time_over_bare": round(floor / ours, 3), "torch": torch.__version__,
    }
    if args.accuracy:
        result["fashion_mnist"] = fashion_accuracy(args.victim, dev)
    if args.synthetic_run:
        result["synthetic_run"] = synthetic_run(args.victim, args.synthetic_run, args.synthetic_n, dev)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
