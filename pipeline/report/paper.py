"""A paper's own numbers beside advgen's: each cell of a study's paper.yaml looked up in this run's results."""

from __future__ import annotations

from advgen.report.render import table


# --- the paper's numbers beside ours ------------------------------------------------------------------------

TRANSFER_FIELDS = {"transfer_accuracy": "accuracy", "transfer_loss": "loss", "transfer_fooling_rate": "fooling_rate",
                   "transfer_clean_accuracy": "target_clean_accuracy", "transfer_clean_loss": "target_clean_loss",
                   "transfer_conf_transferred": "target_clean_conf_transferred",
                   "transfer_conf_not_transferred": "target_clean_conf_not_transferred",
                   "transfer_rate": "transfer_rate"}
RETRAIN_FIELDS = {"retrain_clean_accuracy": "clean_accuracy", "retrain_adversarial_accuracy":
                  "stored_adversarial_accuracy", "retrain_clean_loss": "clean_loss",
                  "retrain_adversarial_loss": "stored_adversarial_loss", "retrain_white_box_accuracy":
                  "white_box_accuracy", "retrain_white_box_rho": "white_box_rho"}
EVALUATE_METRICS = ("accuracy", "error", "success_rate", "fooling_rate", "rho", "top1_error", "top5_error")
PAPER_METRICS = ("clean_accuracy", "clean_error", *EVALUATE_METRICS, *TRANSFER_FIELDS, *RETRAIN_FIELDS,
                 "defend_accuracy")


def paper_value(cell: dict, results: dict) -> float | None:
    """advgen's number for one cell of a paper's table, in the cell's ``unit`` (``percent``: ×100), or None.

    ``results``: {"evaluate": {(dataset, victim): evaluate.json}, "transfer": {dataset: transfer.json},
    "retrain": {(dataset, target): retrain.json}, "defend": {(dataset, victim): defend.json},
    "train": {(dataset, victim): train.json}}.
    """
    metric, ds, victim = cell["metric"], cell["dataset"], cell.get("victim")
    scale = 100.0 if cell.get("unit", "percent") == "percent" else 1.0
    value: float | None = None
    if metric in ("clean_accuracy", "clean_error") and (ds, victim) in results.get("train", {}):
        acc = results["train"][(ds, victim)]["test_accuracy"]
        value = acc if metric == "clean_accuracy" else 1 - acc
    elif metric in EVALUATE_METRICS and (ds, victim) in results.get("evaluate", {}):
        s = evaluated_split(cell, results)
        if s is None:
            return None
        if metric == "error":
            value = 1 - s["accuracy"]
        elif metric == "rho":
            value = (s.get("deepfool") or {}).get("rho")
        elif metric in ("top1_error", "top5_error"):
            b = s["buckets"].get(cell["bucket"], {})
            value = b.get("error" if metric == "top1_error" else "top5_error")
        else:
            value = s.get(metric)
    elif metric in TRANSFER_FIELDS and ds in results.get("transfer", {}):
        for r in results["transfer"][ds]["rows"]:
            if (r["method"], r["source"], r["target"]) == (cell["method"], cell["source"], cell["target"]) and \
                    (cell.get("eps") is None or r["eps"] is not None and abs(r["eps"] - cell["eps"]) < 1e-9):
                value = r.get(TRANSFER_FIELDS[metric])
    elif metric in RETRAIN_FIELDS and (ds, victim) in results.get("retrain", {}):
        m = results["retrain"][(ds, victim)]["models"].get(cell.get("model", "original"))
        value = None if m is None else m.get(RETRAIN_FIELDS[metric])
    elif metric == "defend_accuracy" and (ds, victim) in results.get("defend", {}):
        for r in results["defend"][(ds, victim)]["rows"]:
            # the stored set itself ("<method> (<source>)"), not its scaled-δ rows ("… ×f", which carry a scale)
            if r["model"] == cell.get("model", "original") and r["defense"] == "gaussian" and \
                    r.get("scale") is None and abs(r["value"] - cell["sigma"]) < 1e-9 and \
                    r["data"].split(" (")[0] == cell["data"]:
                value = r["accuracy"]
                break
    return None if value is None else value * scale


def evaluated_split(cell: dict, results: dict) -> dict | None:
    """The evaluate results of the variant a paper cell names (its method and ε, on its victim and split)."""
    ev = results.get("evaluate", {}).get((cell["dataset"], cell.get("victim")))
    for r in (ev or {}).get("variants", {}).values():
        if r["method"] == cell.get("method") and (cell.get("eps") is None or r["eps"] is not None
                                                   and abs(r["eps"] - cell["eps"]) < 1e-9):
            return r["splits"].get(cell.get("split", "test"))
    return None


def bucket_count(cell: dict, results: dict) -> int | None:
    """How many images the confidence bucket of a ``bucket`` cell held in advgen's run (None if no such result):
    a bucket of a few images gives rates that mean little, and the comparison says so."""
    s = evaluated_split(cell, results) if cell.get("bucket") else None
    return None if s is None else ((s.get("buckets") or {}).get(cell["bucket"]) or {}).get("count")


def substituted(cell: dict, substitutes: list[dict]) -> tuple[dict, list[str]]:
    """``cell`` with the profile's stand-ins applied (a dataset or victim a CPU profile cannot run replaced by
    one it does), and the list of replacements made, e.g. ["mnist → fashion_mnist"]."""
    out, made = dict(cell), []
    for sub in substitutes:
        for key in ("dataset", "victim", "source", "target"):
            if key in sub and out.get(key) == sub[key]:
                out[key] = sub["by"]
                made.append(f"{key} {sub[key]} → {sub['by']}")
    return out, made


def paper_tables(paper: dict, results: dict) -> tuple[list[str], int, int]:
    """Markdown: each of the paper's tables with its values beside advgen's and the difference.

    A cell is looked up as the paper states it; where this profile has no such result, the paper file's
    ``substitutes`` (stand-ins a CPU profile runs instead) are tried, and the row says what stood in.
    Returns (lines, cells compared, cells in the paper). Cells advgen has no result for are listed as such.
    """
    lines, compared, total = [], 0, 0
    substitutes = paper.get("substitutes") or []
    for t in paper.get("tables", []):
        rows = []
        for cell in t["cells"]:
            cell = {"unit": t.get("unit", "percent"), **cell}
            total += 1
            ours, made, used = paper_value(cell, results), [], cell
            if ours is None and substitutes:
                swapped, made = substituted(cell, substitutes)
                ours, used = (paper_value(swapped, results), swapped) if made else (None, cell)
            compared += ours is not None
            n = bucket_count(used, results) if ours is not None else None
            if n is not None:
                made = [*made, f"{n} image{'s' if n != 1 else ''} in the bucket"]
            label = ", ".join(f"{k} {cell[k]}" for k in ("dataset", "victim", "source", "target", "model", "method",
                                                          "eps", "bucket", "sigma", "data") if cell.get(k) is not None)
            rows.append([label, cell["metric"], cell["value"], ours,
                         None if ours is None else ours - cell["value"],
                         "; ".join(made) if ours is not None and made else ("–" if ours is not None else "no result here")])
        lines += [f"**{t['caption']}** ({t['cite']}; {t.get('unit', 'percent')})", "",
                  table(["cell (as the paper states it)", "metric", "paper", "advgen", "advgen − paper",
                         "advgen ran instead"], rows)]
        if t.get("note"):
            lines += [t["note"], ""]
    return lines, compared, total
