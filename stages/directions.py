"""``advgen directions``: the class-score directions of one victim (Jetley, Lord & Torr, 2018), end to end.

Reads the victim, its clean folder and the variants generated against it (a DeepFool copy is required: its
perturbations give the gradient basis and the resampling table), runs ``advgen.directions.analyze`` and writes

* ``--metrics``: one JSON with every result (layout: ``advgen.directions.analyze`` plus the run's provenance);
* ``--plots``: ``directions_*.csv`` tables for the ``series`` template (a ``series`` column, x and y columns);
* ``--bases``: a folder, replaced whole, of float32 ``.npy`` arrays (``mean_image``, ``curvature_eigenvalues``
  (C, P), ``curvature_directions`` (C, P, 5: per class the two most positively and negatively curved and the
  flattest direction), ``svd_basis`` (P, P, columns high to low), ``svd_values``, ``family_{pos,neg,negpos,flat}``
  (P, ≤P) orthonormal prefixes) and a ``_stats.json`` listing them with their sha256.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import typer

from advgen.analysis import directions as D
from advgen.data.clean import load_clean_split, open_clean
from advgen.errors import BadParameter, CorruptFile
from advgen.evaluation.whitebox import find_variants, open_variant, variant_name
from advgen.storage.outputs import (
    STATS,
    check_file_target,
    check_replaceable,
    check_writable,
    clean_stale,
    recover,
    replace_dir,
    staging_path,
)
from advgen.storage.shards import file_digest, read_split, write_csv, write_json
from advgen.victims.train import resolve_device
from advgen.storage.variants import npy_bytes
from advgen.versions import versions
from advgen.victims import load
from advgen.stages.app import log, stage


def _check(options: dict, *, at_least: dict[str, int], positive: tuple[str, ...]) -> None:
    for name, low in at_least.items():
        values = options[name] if isinstance(options[name], list) else [options[name]]
        for v in values:
            if v < low:
                raise BadParameter(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    for name in positive:
        values = options[name] if isinstance(options[name], list) else [options[name]]
        for v in values:
            if not v > 0:
                raise BadParameter(f"--{name.replace('_', '-')} must be > 0, got {v}")


def _images(folder: Path, stats: dict, split: str, clean_keys: list[str]) -> tuple[torch.Tensor, bool]:
    """A variant's images of ``split`` as floats: its ``KEY.npy`` if stored, else the PNGs / 255."""
    if stats.get("store_float"):
        x, keys = D.read_floats(folder, stats, split)
        is_float = True
    else:
        u8, _, keys = read_split(folder, stats, split)
        x, is_float = u8.float() / 255, False
    if keys != clean_keys:
        raise CorruptFile(folder, f"{split}: its keys differ from the clean folder's")
    return x, is_float


@stage
def directions(
    victim_ckpt: Path = typer.Option(..., help="The victim checkpoint (.pt) from `advgen train`."),
    clean: Path = typer.Option(..., help="Clean folder of the victim's dataset."),
    adv: Path = typer.Option(..., help="The victim's variants root (searched recursively); every variant there "
                             "must come from this victim, and one must be a DeepFool copy (--store-float preferred)."),
    metrics: Path = typer.Option(..., help="Metrics JSON to write."),
    plots: Path = typer.Option(..., help="Folder for the plot tables (directions_*.csv)."),
    bases: Path = typer.Option(..., help="Folder for the bases as float32 .npy files (replaced whole)."),
    curvature_images: int = typer.Option(4, help="Alg. 1's N: training images per target class moved to its "
                                         "boundary by targeted DeepFool; their mean Hessian gives the curvature "
                                         "directions (the paper: every image not of the class)."),
    fd_scale: float = typer.Option(0.25, help="h of the finite-difference Hessian (pixel units of [0, 1] images): "
                                   "H·e ≈ (∇g(x + h·e) − ∇g(x − h·e)) / 2h along every pixel e. A ReLU net's exact "
                                   "Hessian is 0 almost everywhere; at 0.25 (a step of ~1/8 of the distance to the "
                                   "boundary) the estimate sees enough ReLU switches to be stable across point sets."),
    hessian_probes: int = typer.Option(0, help="0: the whole finite-difference Hessian (P = C·H·W gradient pairs "
                                       "per boundary point). K > 0: a rank-K randomized sketch of it (2K pairs per "
                                       "point; the dominant curvature of both signs, the rest counted as flat), for "
                                       "large inputs or quick runs."),
    dims: list[int] = typer.Option([0, 1, 2, 4, 8, 16, 32], help="Directions per class of the curvature subspaces "
                                   "(repeatable); the full space is always added."),
    svd_dims: list[int] = typer.Option([0, 4, 9, 16, 32, 64, 128, 256], help="Directions of the SVD subspaces "
                                       "S_hi/S_lo (repeatable); the full space is always added."),
    train_images: int = typer.Option(500, help="Training images (drawn with --seed) for the train accuracies and "
                                     "the curvature points."),
    test_images: int = typer.Option(500, help="Test images (drawn with --seed) for the test accuracies, the norm "
                                    "fractions and the resampling table."),
    svd_images: int = typer.Option(2000, help="DeepFool perturbations stacked for the SVD, at most."),
    profile_classes: int = typer.Option(3, help="Classes (drawn with --seed) whose score profiles are traced."),
    profile_images: int = typer.Option(200, help="Test images per class-score profile."),
    s_max: float = typer.Option(10.0, help="Profiles run over s in [-S_MAX, S_MAX] (L2, pixel units)."),
    s_steps: int = typer.Option(21, help="Values of s in the profiles."),
    confined_images: int = typer.Option(50, help="Test images attacked by confined DeepFool and by the direct "
                                        "attacks on the resampled networks."),
    resample_size: list[int] = typer.Option([24, 20, 16, 12], help="Bicubic resampling sizes (pixels, repeatable); "
                                            "the full size is always added."),
    scale: list[float] = typer.Option([1, 2, 3, 4, 5, 10],
                                      help="Factors f on the DeepFool perturbations (repeatable)."),
    candidates: int = typer.Option(10, help="DeepFool: classes considered (top-k)."),
    overshoot: float = typer.Option(0.02, help="DeepFool overshoot (confined and direct attacks)."),
    max_iter: int = typer.Option(50, help="DeepFool iteration limit."),
    batch_size: int = typer.Option(256, help="Images (or perturbed points) per forward/backward."),
    seed: int = typer.Option(0, help="Seeds which images, which per class, which classes are profiled."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
) -> None:
    """Curvature and gradient directions, accuracy vs subspace, where adversaries live, class-score profiles,
    confined DeepFool and resampling (Jetley et al., 2018)."""
    started = time.perf_counter()
    _check(dict(locals()), at_least={"curvature_images": 1, "hessian_probes": 0, "dims": 0, "svd_dims": 0,
                                     "train_images": 1,
                                     "test_images": 1, "svd_images": 1, "profile_classes": 0, "profile_images": 1,
                                     "s_steps": 2, "confined_images": 1, "resample_size": 1, "candidates": 2,
                                     "max_iter": 1, "batch_size": 1},
           positive=("fd_scale", "s_max", "scale"))
    if not 0 <= overshoot <= 1:
        raise BadParameter(f"--overshoot must lie in [0, 1], got {overshoot}")
    dev = resolve_device(device)
    check_file_target(metrics, "--metrics")
    check_writable(plots)
    bases_as_given = str(bases)  # recorded as given (relative in DVC runs), not resolved
    bases = check_replaceable(bases, "directions")
    clean_stats = open_clean(clean)
    shape = [int(s) for s in clean_stats["shape"]]
    p, side, classes = math.prod(shape), shape[1], list(clean_stats["classes"])
    for flag, values in (("--dims", dims), ("--svd-dims", svd_dims)):
        if max(values, default=0) > p:
            raise BadParameter(f"{flag} {max(values)} is larger than the input dimension {p} (C·H·W)")
    if max(resample_size, default=1) > side:
        raise BadParameter(f"--resample-size {max(resample_size)} is larger than the images ({side} px)")
    if profile_classes > len(classes):
        raise BadParameter(f"--profile-classes {profile_classes} is more than the {len(classes)} classes")
    for split in ("train", "test"):
        if split not in clean_stats["shards"]:
            raise BadParameter(f"{clean} has no {split} split; directions needs both")
    # Channels-last: CPU convolutions ran ~30% faster in the Hessian's batched gradients (simple_cnn, 2 cores).
    model = load(victim_ckpt, dataset=clean_stats["dataset"], map_location=dev).to(memory_format=torch.channels_last)
    sha = file_digest(victim_ckpt)
    folders = find_variants(adv)
    vstats = {f: open_variant(f, clean_dir=clean, victim_sha256=sha) for f in folders}
    fools = [f for f, st in vstats.items() if st["method"] == "deepfool"]
    if not fools:
        raise BadParameter(f"no DeepFool copy of this victim under {adv}: the gradient directions and the "
                           "resampling table need its perturbations (advgen generate --method deepfool --store-float)")

    log(f"directions: {model.meta.arch} on {clean_stats['dataset']}, {len(folders)} variant(s), device {dev}")
    data = {s: load_clean_split(clean, clean_stats, s) for s in ("train", "test")}
    x = {s: data[s][0].float().div_(255) for s in data}
    y = {s: data[s][1] for s in data}
    gen = torch.Generator().manual_seed(seed)
    idx = {"train": D.pick(len(y["train"]), train_images, gen), "test": D.pick(len(y["test"]), test_images, gen)}
    mean = x["train"].double().mean(0).float()

    perturbations, provenance = {}, {}
    for folder, st in vstats.items():
        split = "test" if "test" in st["shards"] else "train"
        xa, is_float = _images(folder, st, split, data[split][2])
        name = variant_name(st)
        if name in perturbations:
            name = f"{name} ({folder.relative_to(adv).as_posix()})"
        perturbations[name] = (xa[idx[split]] - x[split][idx[split]]).to(dev)
        provenance[name] = {"folder": str(folder), "split": split, "float": is_float}
    fool, fst = fools[0], vstats[fools[0]]
    svd_split = "train" if "train" in fst["shards"] else "test"
    table_split = "test" if "test" in fst["shards"] else "train"
    fooled = {s: _images(fool, fst, s, data[s][2]) for s in dict.fromkeys((svd_split, table_split))}
    fool_float = fooled[svd_split][1]
    delta = fooled[svd_split][0] - x[svd_split]
    delta = delta[delta.flatten(1).norm(dim=1) > 0]
    svd_source = "copy"
    if len(delta):
        delta = delta[D.pick(len(delta), svd_images, gen)]
    else:  # e.g. a victim that gets no image right, with a copy attacking the true label: ask its predictions
        log(f"directions: {fool} changed no image of its {svd_split} split; the SVD takes DeepFool perturbations "
            "computed here, away from the victim's own predictions")
        xs = x[svd_split][D.pick(len(x[svd_split]), svd_images, gen)].to(dev)
        delta = D.deepfool_perturbations(model, xs, candidates=candidates, overshoot=overshoot, max_iter=max_iter,
                                         batch_size=batch_size).cpu()
        svd_source = "computed"
        if not len(delta):
            raise BadParameter(f"DeepFool moved none of {len(xs)} {svd_split} images of {clean}: no gradient "
                               "directions to take (try a larger --max-iter)")
    ti = idx[table_split]
    table = (x[table_split][ti].to(dev), y[table_split][ti].to(dev),
             (fooled[table_split][0][ti] - x[table_split][ti]).to(dev))

    settings = D.Settings(
        per_class=curvature_images, fd_scale=fd_scale, probes=hessian_probes, dims=tuple(dims),
        svd_dims=tuple(svd_dims),
        profile_classes=profile_classes, profile_images=profile_images,
        s_values=tuple(float(v) for v in np.linspace(-s_max, s_max, s_steps)), confined_images=confined_images,
        resample_sizes=tuple(resample_size), factors=tuple(scale), candidates=candidates, overshoot=overshoot,
        max_iter=max_iter, batch_size=batch_size, seed=seed)
    inputs = D.Inputs(model=model, classes=classes, mean=mean.to(dev),
                      train=(x["train"][idx["train"]].to(dev), y["train"][idx["train"]].to(dev)),
                      test=(x["test"][idx["test"]].to(dev), y["test"][idx["test"]].to(dev)),
                      perturbations=perturbations, svd_deltas=delta.to(dev), table=table)
    result = D.analyze(inputs, settings, log=lambda m: log(f"directions: {m}"))

    # Bases first (a folder swapped in whole), then the plot tables, then the metrics (last: marks the run done).
    bases.parent.mkdir(parents=True, exist_ok=True)
    recover(bases)
    clean_stale(bases.parent)
    staging = staging_path(bases)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        files = {}
        for stem, arr in sorted(result.bases.items()):
            (staging / f"{stem}.npy").write_bytes(npy_bytes(np.ascontiguousarray(arr, dtype=np.float32)))
            files[f"{stem}.npy"] = {"shape": list(arr.shape), "sha256": file_digest(staging / f"{stem}.npy")}
        write_json(staging / STATS, {"kind": "directions", "dataset": clean_stats["dataset"],
                                     "victim": {"arch": model.meta.arch, "sha256": sha}, "files": files})
        replace_dir(staging, bases)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name, (columns, rows) in result.tables.items():
        write_csv(plots / f"{name}.csv", rows, columns)
    out = {
        "stage": "directions", "dataset": clean_stats["dataset"],
        "victim": {"arch": model.meta.arch, "sha256": sha, "checkpoint": str(victim_ckpt)},
        "clean": str(clean), "adv": str(adv), "device": dev.type,
        "deepfool": {"folder": str(fool), "float": fool_float and svd_source == "copy", "svd_split": svd_split,
                     "svd_source": svd_source, "table_split": table_split},
        "variants": provenance, "bases": {"dir": bases_as_given, "files": files},
        "params": {"curvature_images": curvature_images, "fd_scale": fd_scale, "hessian_probes": hessian_probes,
                   "dims": sorted(set(dims)),
                   "svd_dims": sorted(set(svd_dims)), "train_images": train_images, "test_images": test_images,
                   "svd_images": svd_images, "profile_classes": profile_classes, "profile_images": profile_images,
                   "s_max": s_max, "s_steps": s_steps, "confined_images": confined_images,
                   "resample_sizes": list(resample_size), "scales": list(scale), "candidates": candidates,
                   "overshoot": overshoot, "max_iter": max_iter, "batch_size": batch_size, "seed": seed},
        "versions": versions(),
        **result.metrics,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(metrics, out)
    acc = result.metrics["accuracy"]
    print(f"{model.meta.arch} on {clean_stats['dataset']}: "
          f"clean test accuracy {result.metrics['clean_accuracy']['test']:.4f}; "
          f"S_pos d={acc['pos']['d'][1]} per class → {acc['pos']['test'][1]:.4f}, "
          f"S_flat → {acc['flat']['test'][1]:.4f}; {time.perf_counter() - started:.0f}s")
