"""``advgen train``: train one victim on one dataset's clean shards."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import typer

from advgen.data.clean import load_clean_split, open_clean
from advgen.data.datasets import DATASETS, get_dataset, spec_for
from advgen.errors import unknown
from advgen.storage.outputs import check_file_target
from advgen.storage.shards import STATS, write_json
from advgen.victims.train import accuracy, default_recipe, resolve_device, train_victim
from advgen.versions import versions
from advgen.victims import VICTIMS, count_parameters, save
from advgen.stages.app import log, stage
from advgen.stages.progress import bar


@stage
def train(
    dataset: str = typer.Option(..., help=f"One of: {', '.join(DATASETS)}, or the name of a dataset you prepared "
                                "with --from-folder/--from-hf."),
    victim: str = typer.Option(..., help=f"One of: {', '.join(VICTIMS)}."),
    clean: Path = typer.Option(..., help="Clean shard folder written by `advgen prepare`."),
    out: Path = typer.Option(..., help="Checkpoint to write (.pt)."),
    metrics: Path = typer.Option(..., help="Metrics JSON to write."),
    epochs: Optional[int] = typer.Option(None, help="Default: the victim's recipe for this dataset."),
    batch_size: Optional[int] = typer.Option(None, help="Default: the victim's recipe."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate. Default: the victim's recipe."),
    weight_decay: Optional[float] = typer.Option(None, help="Default: the victim's recipe."),
    label_smoothing: Optional[float] = typer.Option(None, help="Default: 0 (smoothing skews attack results)."),
    optimizer: Optional[str] = typer.Option(None, help="sgd (Nesterov momentum, the default) or adam; both with "
                                            "the warm-up and linear decay of the learning rate."),
    seed: int = typer.Option(0, help="Seeds init, dropout, batch order and augmentation."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
) -> None:
    """Train VICTIM on DATASET; write the checkpoint and a metrics JSON."""
    spec = get_dataset(dataset) if dataset in DATASETS else spec_for(open_clean(clean, dataset=dataset, verify=False))
    if victim not in VICTIMS:
        raise unknown("victim", victim, VICTIMS)
    overrides = {k: v for k, v in dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                       label_smoothing=label_smoothing, optimizer=optimizer).items()
                 if v is not None}
    recipe = replace(default_recipe(victim, dataset), **overrides)
    recipe.check()
    dev = resolve_device(device)
    check_file_target(out, "--out")
    check_file_target(metrics, "--metrics")

    t0 = time.perf_counter()
    stats = open_clean(clean, dataset=dataset)
    x, y, _ = load_clean_split(clean, stats, "train")
    xt, yt, _ = load_clean_split(clean, stats, "test")
    load_seconds = time.perf_counter() - t0
    log(f"{dataset}: {len(y)} train / {len(yt)} test images loaded in {load_seconds:.1f}s; training {victim} on {dev}")

    with bar(f"train {victim} on {dataset}") as b:
        def progress(epoch: int, step: int, steps: int, s: dict) -> None:
            b.update(epoch * steps + step, recipe.epochs * steps,
                     f"epoch {epoch + 1}/{recipe.epochs} loss {s['loss']:.4f} acc {s['accuracy']:.4f}",
                     line=step == steps)

        model, run = train_victim(
            victim, dataset=dataset, num_classes=spec.num_classes, x=x, y=y, recipe=recipe, seed=seed,
            device=dev, crop_pad=spec.crop_pad, flip=spec.flip, on_progress=progress,
        )
    test_acc = accuracy(model, xt, yt, device=dev)

    model.meta.train = {
        **asdict(recipe), "seed": seed, "device": dev.type, "crop_pad": spec.crop_pad, "flip": spec.flip,
        "clean_stats_sha256": hashlib.sha256((clean / STATS).read_bytes()).hexdigest(),
        "train_count": len(y),
    }
    model.meta.test_accuracy = test_acc
    model.meta.versions = versions()
    save(model.cpu(), out)
    write_json(metrics, {
        "dataset": dataset, "victim": victim, "device": dev.type, "seed": seed,
        "epochs": recipe.epochs, "batch_size": recipe.batch_size, "lr": recipe.lr,
        "test_accuracy": round(test_acc, 6), "train_accuracy": round(run.train_accuracy, 6),
        "train_loss": round(run.train_loss, 6), "train_seconds": round(run.seconds, 3),
        "images_per_second": round(run.images_per_second, 1), "load_seconds": round(load_seconds, 3),
        "parameters": count_parameters(model),
    })
    print(f"{out}: {victim} on {dataset}, test accuracy {test_acc:.4f}, {run.seconds:.1f}s training on {dev.type}")
