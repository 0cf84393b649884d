"""``advgen generate``: full adversarial and cooperative copies of a clean folder, per method and ε.

Several processes: ``torchrun --nproc_per_node N -m stages generate ...``
splits the input shards across ranks (shard i to rank i mod N); rank 0 writes
the cards and stats once every rank is done. The bytes are the same as with
one process.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from pathlib import Path

import torch
import typer

from advgen import attacks
from advgen.storage.cards import split_bytes, variant_card
from advgen.data.clean import load_clean_split, open_clean
from advgen.data.datasets import spec_for, spec_record
from advgen.errors import AdvgenError, BadParameter
from advgen.generation.driver import (
    FORMAT_VERSION,
    UAP_FILES,
    AttackParams,
    fingerprint,
    fit_universal,
    plan,
    read_universal,
    uap_fitting_images,
    write_universal,
)
from advgen.generation.driver import generate as run_generate
from advgen.victims.byo import check_victim_options, open_victim
from advgen.storage.outputs import STATS, check_file_target, check_writable
from advgen.storage.shards import file_digest, write_json
from advgen.victims.train import resolve_device
from advgen.storage.variants import Variant, finalize, invalidate
from advgen.versions import versions
from advgen.stages.app import log, parse_number, stage, with_options
from advgen.stages.progress import bar


def _split_commas(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _attack_options() -> list[tuple[str, object, type, str]]:
    """One flag per declared attack parameter (``advgen.attacks.PARAMS``), with its default and help."""
    out = []
    for p in attacks.PARAMS.values():
        default = p.unset_when if p.default is None else p.default
        out.append((p.name, default, type(default), attacks.help_of(p)))
    return out


@stage
@with_options(_attack_options(), before="batch_size")
def generate(
    victim_ckpt: Path | None = typer.Option(None, help="Victim checkpoint (.pt) from `advgen train`; or bring "
                                            "your own model with --model or --factory."),
    model_file: Path | None = typer.Option(None, "--model", help="Your own victim: a TorchScript file, or a "
                                           "torch.export program (*.pt2, dynamic batch dimension). It takes images "
                                           "in [0, 1] (normalization inside the model) and returns logits."),
    factory: str | None = typer.Option(None, help="Your own victim built by module:callable (importable, e.g. "
                                       "from the working folder), returning an nn.Module; see --state-dict."),
    state_dict: Path | None = typer.Option(None, help="Weights for --factory, loaded with "
                                           "torch.load(weights_only=True)."),
    input_shape: str | None = typer.Option(None, help="C,H,W the --model/--factory takes, e.g. 3,32,32; must "
                                           "be the clean images' shape."),
    num_classes: int | None = typer.Option(None, help="Logits the --model/--factory returns per image; must be "
                                           "the clean folder's class count."),
    clean: Path = typer.Option(..., help="Clean folder from `advgen prepare` (same dataset as the victim)."),
    out: Path = typer.Option(..., help="Output root: OUT/<method>/eps=<ε>/{split}-NNNNNN.tar."),
    method: list[str] = typer.Option(..., help="Repeatable (or comma-separated). One of: "
                              f"{', '.join(attacks.METHODS)}."),
    eps: list[str] = typer.Option([], help="Repeatable (or comma-separated) ε in pixel units of [0, 1] images; "
                                  "fractions such as 8/255 work. Not used by deepfool."),
    split: list[str] = typer.Option(["train", "test"], help="Splits to copy (repeatable, or comma-separated)."),
    batch_size: int = typer.Option(256, help="Images per forward/backward."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N] (torchrun: cuda:LOCAL_RANK mod GPUs)."),
    workers: int = typer.Option(1, help="Processes encoding PNGs and writing shards while compute goes on; 0 = inline."),
    store_float: bool = typer.Option(False, help="Also store each float image before rounding as KEY.npy."),
    rounding_audit: bool = typer.Option(True, help="Classify the float image too, to count outcomes changed by rounding."),
    prune: bool = typer.Option(False, help="Delete variant folders under OUT that this run did not ask for."),
    metrics: Path | None = typer.Option(None, help="Write timing (seconds, images/s, device) to this JSON file."),
    **attack_params: object,
) -> None:
    """Write a full copy of every requested split per (method, ε), with manifests and cards."""
    methods = _split_commas(method)
    eps_values = [parse_number(e, "--eps") for e in _split_commas(eps)]
    splits = list(dict.fromkeys(_split_commas(split)))
    used = [attacks.get(m) for m in methods]
    without_eps = [a.name for a in used if not a.takes_eps]
    if len(without_eps) < len(methods) and not eps_values:
        raise BadParameter("--eps is required for every method but "
                           + ", ".join(n for n, a in attacks.METHODS.items() if not a.takes_eps))
    if eps_values and without_eps:
        log(f"generate: warning: --eps does not apply to {', '.join(without_eps)} (no ε-ball)"
            + ("; it applies to the other methods" if len(without_eps) < len(methods) else ""))
    params = attacks.Params(**attack_params)
    for a in used:
        for e in (eps_values if a.takes_eps else [None]):
            attacks.check(a, e, params)
    if batch_size < 1 or workers < 0:
        raise BadParameter("--batch-size must be >= 1 and --workers >= 0")
    check_victim_options(victim_ckpt=victim_ckpt, model=model_file, factory=factory, state_dict=state_dict,
                         input_shape=input_shape, num_classes=num_classes)
    if out.exists() and not out.is_dir():
        raise BadParameter(f"--out {out} is a file, not a folder")
    check_writable(out)
    if metrics is not None:
        check_file_target(metrics, "--metrics")
    stats = open_clean(clean)
    for s in splits:
        if s not in stats["shards"]:
            raise BadParameter(f"unknown split {s!r}; {clean} has {', '.join(stats['shards'])}")
    spec = spec_for(stats)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        # More processes than GPUs share them round-robin (several per GPU keep it busy while others encode).
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    # Channels-last: faster convolutions on GPUs and (measured in training) on the CPU too.
    model, victim_sha = open_victim(victim_ckpt=victim_ckpt, model=model_file, factory=factory, state_dict=state_dict,
                                    input_shape=input_shape, num_classes=num_classes, clean_stats=stats,
                                    map_location=dev, on_warning=lambda m: log(f"generate: warning: {m}"))
    model = model.to(memory_format=torch.channels_last)
    variants = plan(methods, eps_values)
    if world > 1:
        # Ranks only wait for each other (barriers) and never exchange tensors, so gloo serves every device
        # and allows several ranks per GPU, which NCCL refuses.
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=12))

    log(f"generate: {len(variants)} variant(s) of {stats['dataset']} ({', '.join(splits)}) with "
        f"{model.meta.arch} on {dev}" + (f", rank {rank}/{world}" if world > 1 else ""))
    started = time.perf_counter()
    clean_sha = file_digest(clean / "_stats.json")

    def fp_of(v: Variant) -> str:
        return fingerprint(v, params, victim_sha256=victim_sha, clean_sha256=clean_sha, store_float=store_float,
                           rounding_audit=rounding_audit, batch_size=batch_size, device=dev.type)

    deltas = _universal(model, clean, stats, [v for v in variants if attacks.get(v.method).fit is not None],
                        params, out, dev, fp_of, rank=rank, world=world)
    with bar("generate") as b:
        made = [0]  # copies written in this run (images x variants), for the images/s on the progress line

        def on_progress(done: int, total: int, what: str) -> None:
            split, name = what.split(" ", 1)
            i, size = stats["shards"][split].index(name), stats.get("shard_size", 0)
            made[0] += min(size, stats["counts"][split] - i * size) * len(variants)
            b.update(done, total, what, line=done == total, images=made[0] if size else None)

        counts = run_generate(
            model, clean=clean, clean_stats=stats, out=out, variants=variants, splits=splits, params=params,
            victim_sha256=victim_sha, device=dev, batch_size=batch_size, workers=workers, store_float=store_float,
            rounding_audit=rounding_audit, rank=rank, world_size=world,
            on_progress=on_progress, deltas=deltas,
        )
    if world > 1:
        torch.distributed.barrier()
    seconds = time.perf_counter() - started
    if rank == 0:
        for v in variants:
            m = attacks.get(v.method)
            universal = m.fit is not None
            base = {
                "format_version": FORMAT_VERSION, "dataset": stats["dataset"], "method": v.method, "eps": v.eps,
                "norm": m.norm_for(params), "direction": m.direction, "label_source": params.label_source,
                "seed": params.seed, "params": m.relevant(params), "store_float": store_float,
                "rounding_audit": rounding_audit,
                "device": dev.type, "batch_size": batch_size, "versions": versions(), "clean_stats_sha256": clean_sha,
                "shape": stats.get("shape"), "classes": stats.get("classes"),
                "victim": {"arch": model.meta.arch, "dataset": model.meta.dataset, "sha256": victim_sha,
                           "test_accuracy": model.meta.test_accuracy},
                **spec_record(spec),  # a dataset its user brought: what verify rebuilds its spec from
                **({"universal": json.loads((out / v.folder / "perturbation.json").read_text())}
                   if universal else {}),
            }
            fp = fp_of(v)
            vstats = finalize(out / v.folder, shards={s: stats["shards"][s] for s in splits}, fingerprint=fp,
                              stats_base=base, extras=UAP_FILES if universal else (),
                              render_card=lambda st: variant_card(  # finalize calls it at once: v is this loop's
                                  spec, st, num_bytes=split_bytes(out / v.folder, st["shards"]), minimal=m.minimal))
            summary = ", ".join(f"{s} acc {d['accuracy']:.4f} success {d['success_rate']:.4f}"
                                for s, d in vstats["splits"].items())
            print(f"{out / v.folder}: {summary}")
        if prune:
            _prune(out, {v.folder for v in variants})
        if metrics is not None:
            images = sum(stats["counts"][s] for s in splits)
            write_json(metrics, {
                "stage": "generate", "dataset": stats["dataset"], "victim": model.meta.arch,
                "methods": methods, "variants": len(variants), "images_per_variant": images,
                "shards_computed": counts["computed"], "shards_skipped": counts["skipped"],
                "seconds": round(seconds, 3), "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                "processes": world,
                "images_per_s": round(images * len(variants) / seconds, 1) if counts["computed"] else None,
            })
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    log(f"generate: {counts['computed']} shard(s) computed, {counts['skipped']} already done")


def _universal(model, clean: Path, stats: dict, variants: list[Variant], params: AttackParams, out: Path,
               dev: torch.device, fp_of, *, rank: int, world: int) -> dict[Variant, torch.Tensor]:
    """Each universal variant's δ: fitted on training images by rank 0 (or reused when its fingerprint matches)
    and stored in the variant folder before any shard, then read by every rank."""
    if variants and rank == 0:
        x_train = None
        for v in variants:
            folder = out / v.folder
            if read_universal(folder, fp_of(v)) is not None:
                continue
            if x_train is None:
                x_train, _, _ = load_clean_split(clean, stats, "train")
                x_fit = uap_fitting_images(x_train, params.uap_images, params.seed)
            invalidate(folder)  # the variant changes: not complete until its shards follow
            log(f"generate: fitting the universal perturbation {v.folder} on {len(x_fit)} training images")
            delta, info = fit_universal(model, x_fit, v, params, dev)
            write_universal(folder, delta, info, fp_of(v))
            log(f"generate: {v.folder}: fooling rate {info['fooling_rate_fit']:.4f} on the fitting images after "
                f"{info['passes']} pass(es); ‖δ‖∞ {info['linf']:.4f}, ‖δ‖₂ {info['l2']:.4f}")
    if variants and world > 1:
        torch.distributed.barrier()
    deltas = {}
    for v in variants:
        delta = read_universal(out / v.folder, fp_of(v))
        if delta is None:
            raise AdvgenError(f"{out / v.folder}: the universal perturbation is missing or stale")
        deltas[v] = torch.from_numpy(delta).to(dev)
    return deltas


def _is_variant(folder: Path) -> bool:
    """A folder generate wrote: its stats say variant, or it holds only variant files (an unfinished one)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        return json.loads((folder / STATS).read_text()).get("kind") == "variant"
    except (OSError, ValueError, AttributeError):
        pass
    files = [p for p in folder.iterdir()]
    return bool(files) and all(p.is_file() and (p.suffix in (".tar", ".parquet") or p.name == "README.md"
                                                or p.name.startswith(".")) for p in files)


def _prune(out: Path, keep: set[str]) -> None:
    """Remove variant folders under ``out`` that are not in ``keep`` (method or method/eps=… paths).

    Only folders generate wrote are removed; anything else is left alone and named.
    """
    for method_dir in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = method_dir.name
        if name in keep:
            continue
        wanted = any(k.startswith(name + "/") for k in keep)
        if not wanted and _is_variant(method_dir):
            shutil.rmtree(method_dir)
            continue
        for eps_dir in sorted(p for p in method_dir.iterdir() if p.is_dir()):
            if f"{name}/{eps_dir.name}" in keep:
                continue
            if eps_dir.name.startswith("eps=") and _is_variant(eps_dir):
                shutil.rmtree(eps_dir)
            else:
                log(f"generate: --prune left {eps_dir} alone: not a variant folder generate wrote")
        if not wanted and method_dir.exists() and not any(method_dir.iterdir()):
            method_dir.rmdir()
        elif not wanted and method_dir.exists():
            log(f"generate: --prune left {method_dir} alone: it holds files generate did not write")
