"""``advgen evaluate``: white-box results of one victim's own variants, read as stored."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import typer

from advgen.data.clean import open_clean
from advgen.errors import BadParameter
from advgen.evaluation.whitebox import (
    BucketRule,
    check_thresholds,
    curve_rows,
    evaluate_variant,
    find_variants,
    load_clean,
    open_variant,
    summarize_results,
)
from advgen.victims.byo import check_victim_options, victim_sha256
from advgen.storage.shards import write_csv, write_json, write_parquet
from advgen.victims import load
from advgen.storage.outputs import check_file_target, check_writable
from advgen.stages.app import log, stage
from advgen.stages.progress import bar


@stage
def evaluate(
    adv: Path = typer.Option(..., help="Folder holding the victim's variants (searched recursively)."),
    clean: Path = typer.Option(..., help="The clean folder the variants were made from."),
    victim_ckpt: Path | None = typer.Option(None, help="If given, every variant must have been made on this victim."),
    model_file: Path | None = typer.Option(None, "--model", help="Or: every variant must have been made on this "
                                           "TorchScript or torch.export (*.pt2) model (as given to generate)."),
    factory: str | None = typer.Option(None, help="Or: every variant must have been made on this module:callable "
                                       "model (with --state-dict, as given to generate)."),
    state_dict: Path | None = typer.Option(None, help="Weights for --factory, as given to generate."),
    input_shape: str | None = typer.Option(None, help="C,H,W the --model/--factory takes, as given to generate."),
    num_classes: int | None = typer.Option(None, help="Logits the --model/--factory returns, as given to generate."),
    metrics: Path = typer.Option(..., help="Full results JSON to write (every figure, every variant and split)."),
    summary: Path | None = typer.Option(None, help="Headline metrics JSON to write (small, for `dvc metrics`): "
                                        "per variant its accuracy and success or error reduction on --curve-split."),
    plots: Path = typer.Option(..., help="Folder for the plot tables (accuracy_vs_eps.csv, cooperative_error_vs_eps.csv)."),
    samples: Path = typer.Option(..., help="Per-sample parquet table to write."),
    thresholds: list[float] = typer.Option([], help="Two clean-confidence thresholds low/high; none = terciles."),
    bucket_correct_only: bool = typer.Option(False, help="Buckets hold only images the victim gets right when "
                                             "clean (Possas's protocol)."),
    bucket_sample: int = typer.Option(0, help="Draw this many images per bucket (with --seed); 0 = all."),
    seed: int = typer.Option(0, help="Seeds the images drawn per bucket."),
    curve_split: str = typer.Option("test", help="Split the ε curves are drawn for."),
) -> None:
    """Accuracy, top-5, success, confidence buckets, perceptibility and DeepFool's ρ for every variant."""
    started = time.perf_counter()
    for path, flag in ((metrics, "--metrics"), (samples, "--samples"), (summary, "--summary")):
        if path is not None:
            check_file_target(path, flag)
    check_writable(plots)
    bounds = check_thresholds(thresholds)
    if bucket_sample < 0:
        raise BadParameter(f"--bucket-sample must be >= 0, got {bucket_sample}")
    rule = BucketRule(thresholds=bounds, correct_only=bucket_correct_only, per_bucket=bucket_sample, seed=seed)
    victim_options = dict(victim_ckpt=victim_ckpt, model=model_file, factory=factory, state_dict=state_dict,
                          input_shape=input_shape, num_classes=num_classes)
    check_victim_options(**victim_options, required=False)
    clean_stats = open_clean(clean)
    folders = find_variants(adv)
    if not folders:
        raise BadParameter(f"no generated variants under {adv}; run `advgen generate` first")
    victim_sha = victim_sha256(**victim_options, clean_stats=clean_stats,
                               on_warning=lambda m: log(f"evaluate: warning: {m}"))
    vstats = [open_variant(f, clean_dir=clean, victim_sha256=victim_sha) for f in folders]
    splits = sorted({s for st in vstats for s in st["shards"]})
    if curve_split not in splits:
        raise BadParameter(f"--curve-split {curve_split!r} is not a split of these variants ({', '.join(splits)})")
    log(f"evaluate: {len(folders)} variant(s) of {clean_stats['dataset']} ({', '.join(splits)})")
    cache = {s: load_clean(clean, clean_stats, s) for s in splits}
    results, tables = {}, []
    with bar("evaluate") as b:
        for i, (folder, st) in enumerate(zip(folders, vstats)):
            name = folder.relative_to(adv).as_posix()
            results[name], table = evaluate_variant(folder, st, {s: cache[s] for s in st["shards"]}, rule=rule)
            tables.append(table.append_column("folder", pa.array([name] * table.num_rows, pa.string())))
            b.update(i + 1, len(folders), name, line=True)
    victim = vstats[0]["victim"]
    write_parquet(samples, pa.concat_tables(tables))
    adv_rows, coop_rows = curve_rows(results, curve_split)
    write_csv(plots / "accuracy_vs_eps.csv", adv_rows, ["series", "method", "images", "eps", "accuracy"])
    write_csv(plots / "cooperative_error_vs_eps.csv", coop_rows,
              ["series", "method", "images", "eps", "error", "negatives_error"])
    std = None
    if victim_ckpt is not None:  # the victim's input normalization, for the report's note on FGM's scale
        std = load(victim_ckpt, dataset=clean_stats["dataset"]).meta.std
    write_json(metrics, {"dataset": clean_stats["dataset"], "seconds": round(time.perf_counter() - started, 3),
                         "victim": victim, "victim_std": std, "adv": adv.as_posix(),
                         "clean": clean.as_posix(), "variants": results})
    if summary is not None:
        write_json(summary, summarize_results(results, curve_split, victim=victim))
    for name, r in results.items():
        s = r["splits"].get(curve_split) or next(iter(r["splits"].values()))
        print(f"{name}: accuracy {s['accuracy']:.4f} (clean {s['clean_accuracy']:.4f})")
