"""``advgen transfer``: every victim's variants, evaluated on every other victim of the dataset."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from advgen.data.clean import load_clean_split, open_clean
from advgen.errors import BadParameter
from advgen.evaluation.whitebox import find_variants, open_variant, variant_name
from advgen.storage.shards import file_digest, read_split, write_csv, write_json
from advgen.victims.train import resolve_device
from advgen.evaluation.transfer import classify, transfer_row
from advgen.victims import load
from advgen.storage.outputs import check_file_target, check_writable
from advgen.stages.app import log, stage
from advgen.stages.progress import bar


@stage
def transfer(
    clean: Path = typer.Option(..., help="Clean folder of the dataset."),
    victim: list[str] = typer.Option(..., help="Victim names (repeatable); at least two."),
    victims_dir: Path = typer.Option(..., help="Folder of the checkpoints: VICTIMS_DIR/<name>.pt."),
    adv_root: Path = typer.Option(..., help="Folder of the variants: ADV_ROOT/<name>/... (searched recursively)."),
    split: str = typer.Option("test", help="Split to evaluate."),
    metrics: Path = typer.Option(..., help="Metrics JSON to write."),
    plots: Path = typer.Option(..., help="Folder for transfer.csv."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
) -> None:
    """A source × target accuracy matrix per method and ε, and clean confidence of transferred vs not."""
    started = time.perf_counter()
    dev = resolve_device(device)
    check_file_target(metrics, "--metrics")
    check_writable(plots)
    clean_stats = open_clean(clean)
    ckpts = {n: victims_dir / f"{n}.pt" for n in dict.fromkeys(victim)}
    roots = {n: adv_root / n for n in ckpts if (adv_root / n).is_dir()}
    if len(ckpts) < 2:
        raise BadParameter("transfer needs at least two victims")
    models = {n: load(p, dataset=clean_stats["dataset"]) for n, p in ckpts.items()}
    shas = {n: file_digest(p) for n, p in ckpts.items()}
    xt, yt, _ = load_clean_split(clean, clean_stats, split)
    y = yt.numpy()
    clean_preds = {n: classify(m, xt, device=dev, y=yt) for n, m in models.items()}
    variants = [(src, f, open_variant(f, clean_dir=clean, victim_sha256=shas[src]))
                for src, root in roots.items() for f in find_variants(root)]
    variants = [(s, f, st) for s, f, st in variants if split in st["shards"]]
    if not variants:
        raise BadParameter(f"no variants with a {split!r} split under {', '.join(map(str, roots.values()))}")
    log(f"transfer: {len(variants)} variant(s) x {len(models) - 1} target(s) on {dev}")
    rows = []
    with bar("transfer") as b:
        for i, (src, folder, st) in enumerate(variants):
            x, _, _ = read_split(folder, st, split)
            for tgt, model in models.items():
                if tgt == src:
                    continue
                pred, _, loss = classify(model, x, device=dev, y=yt)
                row = transfer_row(stats=st, folder=folder, split=split, y=y, target_pred=pred,
                                   target_clean_pred=clean_preds[tgt][0], target_clean_conf=clean_preds[tgt][1],
                                   target_loss=loss, target_clean_loss=clean_preds[tgt][2])
                rows.append({"series": f"{row['method']} {src} → {tgt}", "source": src, "target": tgt,
                             **{k: v for k, v in row.items() if k != "source"}})
            b.update(i + 1, len(variants), folder.relative_to(roots[src]).as_posix(), line=True)
    matrix: dict = {}
    for r in rows:
        key = variant_name(r)
        matrix.setdefault(key, {}).setdefault(r["source"], {})[r["target"]] = r["accuracy"]
    write_csv(plots / "transfer.csv", rows)
    write_json(metrics, {
        "dataset": clean_stats["dataset"], "seconds": round(time.perf_counter() - started, 3), "split": split,
        "clean_accuracy": {n: float((p == y).mean()) for n, (p, _, _) in clean_preds.items()},
        "clean_loss": {n: float(loss.mean()) for n, (_, _, loss) in clean_preds.items()},
        "matrix": matrix, "rows": rows,
    })
    for r in rows:
        if r["direction"] == "adversarial":
            print(f"{r['method']} ε={r['eps']} {r['source']} → {r['target']}: accuracy {r['accuracy']:.4f} "
                  f"(drop {r['drop']:.4f}, transfer rate {r['transfer_rate'] or 0:.4f})")
