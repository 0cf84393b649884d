"""``advgen evaluate``: white-box results of one victim's own variants, read as stored."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import typer

from advgen.clean import open_clean
from advgen.errors import BadParameter
from advgen.evaluate import check_thresholds, curve_rows, evaluate_variant, find_variants, load_clean, open_variant
from advgen.shards import file_digest, write_csv, write_json, write_parquet
from advgen.stages.app import log, stage
from advgen.stages.progress import bar


@stage
def evaluate(
    adv: Path = typer.Option(..., help="Folder holding the victim's variants (searched recursively)."),
    clean: Path = typer.Option(..., help="The clean folder the variants were made from."),
    victim_ckpt: Path | None = typer.Option(None, help="If given, every variant must have been made on this victim."),
    metrics: Path = typer.Option(..., help="Metrics JSON to write."),
    plots: Path = typer.Option(..., help="Folder for the plot tables (accuracy_vs_eps.csv, cooperative_error_vs_eps.csv)."),
    samples: Path = typer.Option(..., help="Per-sample parquet table to write."),
    thresholds: list[float] = typer.Option([], help="Two clean-confidence thresholds low/high; none = terciles."),
    curve_split: str = typer.Option("test", help="Split the ε curves are drawn for."),
) -> None:
    """Accuracy, top-5, success, confidence buckets, perceptibility and DeepFool's ρ for every variant."""
    started = time.perf_counter()
    bounds = check_thresholds(thresholds)
    clean_stats = open_clean(clean)
    folders = find_variants(adv)
    if not folders:
        raise BadParameter(f"no generated variants under {adv}; run `advgen generate` first")
    victim_sha = file_digest(victim_ckpt) if victim_ckpt is not None else None
    vstats = [open_variant(f, clean_dir=clean, victim_sha256=victim_sha) for f in folders]
    splits = sorted({s for st in vstats for s in st["shards"]})
    log(f"evaluate: {len(folders)} variant(s) of {clean_stats['dataset']} ({', '.join(splits)})")
    cache = {s: load_clean(clean, clean_stats, s) for s in splits}
    results, tables = {}, []
    with bar("evaluate") as b:
        for i, (folder, st) in enumerate(zip(folders, vstats)):
            name = folder.relative_to(adv).as_posix()
            results[name], table = evaluate_variant(folder, st, {s: cache[s] for s in st["shards"]},
                                                    thresholds=bounds)
            tables.append(table.append_column("folder", pa.array([name] * table.num_rows, pa.string())))
            b.update(i + 1, len(folders), name, line=True)
    victim = vstats[0]["victim"]
    write_parquet(samples, pa.concat_tables(tables))
    adv_rows, coop_rows = curve_rows(results, curve_split)
    write_csv(plots / "accuracy_vs_eps.csv", adv_rows, ["series", "method", "eps", "accuracy"])
    write_csv(plots / "cooperative_error_vs_eps.csv", coop_rows, ["series", "method", "eps", "error", "negatives_error"])
    write_json(metrics, {"dataset": clean_stats["dataset"], "seconds": round(time.perf_counter() - started, 3), "victim": victim, "adv": adv.as_posix(),
                         "clean": clean.as_posix(), "variants": results})
    for name, r in results.items():
        s = r["splits"].get(curve_split) or next(iter(r["splits"].values()))
        print(f"{name}: accuracy {s['accuracy']:.4f} (clean {s['clean_accuracy']:.4f})")
