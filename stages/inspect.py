"""``advgen inspect``: what a victim checkpoint says about itself, optionally re-scored."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from advgen.data.clean import load_clean_split, open_clean
from advgen.victims.train import accuracy, resolve_device
from advgen.victims import count_parameters, load
from advgen.stages.app import stage


@stage
def inspect(
    ckpt: Path = typer.Option(..., help="Victim checkpoint (.pt) written by `advgen train`."),
    clean: Optional[Path] = typer.Option(None, help="Clean folder of the same dataset: re-measure test accuracy."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
) -> None:
    """Print a checkpoint's metadata as JSON; with --clean, its measured test accuracy too."""
    dev = resolve_device(device)
    dataset = open_clean(clean)["dataset"] if clean is not None else None
    model = load(ckpt, dataset=dataset, map_location=dev)
    info = {**asdict(model.meta), "parameters": count_parameters(model)}
    if clean is not None:
        stats = open_clean(clean, dataset=dataset, verify=False)
        x, y, _ = load_clean_split(clean, stats, "test")
        info["measured_test_accuracy"] = accuracy(model, x, y, device=dev)
    print(json.dumps(info, indent=2, sort_keys=True))
