"""``advgen report``: every metric of the study in one Markdown report with PNG figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import typer
import yaml

from advgen import defenses
from advgen import report as R
from advgen.report.directions import section
from advgen.data.datasets import DATASETS, DatasetSpec, spec_for
from advgen.errors import BadParameter, CorruptFile
from advgen.evaluation.whitebox import find_variants, variant_name
from advgen.storage.shards import read_split, read_stats, write_text
from advgen.storage.variants import read_manifests
from advgen.storage.outputs import check_writable
from advgen.stages.app import log, stage


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFile(path, f"unreadable metrics ({e})") from None


def _grids(ev: dict, spec, out: Path, figs: Path, *, samples: int, seed: int) -> list[str]:
    """Sample grids per method: seeded random test images (not cherry-picked), clean and every ε."""
    adv, clean = Path(ev["adv"]), Path(ev["clean"])
    cstats = read_stats(clean, kind="clean")
    if "test" not in cstats["shards"]:
        return []
    x0, y, _ = read_split(clean, cstats, "test")
    pick = np.sort(np.random.default_rng(seed).choice(len(y), size=min(samples, len(y)), replace=False))
    clean_img = x0[pick].permute(0, 2, 3, 1).numpy()
    by_method: dict[str, list] = {}
    for folder in find_variants(adv):
        st = read_stats(folder, kind="variant")
        if "test" in st["shards"]:
            by_method.setdefault(st["method"], []).append((st["eps"], folder, st))
    lines, clean_pred = [], None
    for method, entries in sorted(by_method.items()):
        entries.sort(key=lambda e: -1.0 if e[0] is None else e[0])
        cols = []
        for eps, folder, st in entries:
            xa, _, _ = read_split(folder, st, "test")
            man = read_manifests(folder, st["shards"]["test"])
            clean_pred = man["clean_pred"].to_numpy()[pick]
            name = method if eps is None else f"ε={eps:g}"
            cols.append((name, xa[pick].permute(0, 2, 3, 1).numpy(), man["adv_pred"].to_numpy()[pick]))
        path = figs / f"{spec.name}-{ev['victim']['arch']}-samples-{method}.png"
        R.draw(R.figure_sample_grid, clean_img, y.numpy()[pick], clean_pred, cols, list(spec.classes), path,
               f"{spec.title}, {ev['victim']['arch']}: {method} (test images drawn with seed {seed})",
               amplify=(cols[-1][0], cols[-1][1]))
        lines.append(f"![{method} samples]({R.rel(path, out)})\n")
    return lines


def _spec(ds: str, found: dict) -> DatasetSpec:
    """The dataset's spec: registered, or rebuilt from the clean folder one of its evaluations names."""
    if ds not in DATASETS:
        for path in found["evaluate"].values():
            clean = Path(_load(path)["clean"])
            if (clean / "_stats.json").is_file():
                return spec_for(read_stats(clean, kind="clean"))
    return spec_for({"dataset": ds})


def _inputs(metrics_dir: Path, params: Path | None) -> dict[str, dict]:
    """The metrics files to report, per dataset: those the pipeline's params declare, or (without
    ``--params``) whatever ``metrics_dir`` holds. A declared file that is missing is an error."""
    if params is None:
        found = R.scan_results(metrics_dir)
    else:
        try:
            doc = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise CorruptFile(params, f"unreadable params ({' '.join(str(e).split())})") from None
        found = R.declared_results(doc, metrics_dir)
        missing = [p for d in found.values() for p in R.result_files(d) if not p.is_file()]
        if missing:
            raise BadParameter(f"{missing[0]} is declared by {params} but missing ({len(missing)} file(s) in all); "
                               "run the stages first (dvc repro)")
    if not found:
        raise BadParameter(f"{metrics_dir} holds no results" + (f" declared by {params}" if params else ""))
    return found


def _paper(path: Path) -> dict:
    """A paper-numbers file, checked for the fields the comparison reads."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadParameter(f"--paper {path}: no such file") from None
    except yaml.YAMLError as e:
        raise CorruptFile(path, f"not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), list):
        raise CorruptFile(path, "expected a mapping with a list of tables")
    for t in doc["tables"]:
        if not {"caption", "cite", "cells"} <= set(t) or not all({"metric", "dataset", "value"} <= set(c)
                                                                  for c in t["cells"]):
            raise CorruptFile(path, f"table {t.get('caption', '?')!r} lacks caption/cite/cells or a cell lacks "
                                    "metric/dataset/value")
    return doc


def _substitute(text: str) -> dict:
    key, _, rest = text.partition(":")
    old, _, new = rest.partition("=")
    if key not in ("dataset", "victim", "source", "target") or not old or not new:
        raise BadParameter(f"--substitute takes KEY:PAPER=OURS with KEY dataset, victim, source or target; got {text!r}")
    return {key: old, "by": new}


def _paper_section(doc: dict, results: dict) -> list[str]:
    lines, compared, total = R.paper_tables(doc, results)
    md = ["## The paper's numbers beside advgen's", "", f"{doc['paper']}. Values from the paper's own tables, "
          f"entered once in `{doc.get('file', 'paper.yaml')}`; {compared} of {total} cells have an advgen result "
          "here (the others need a dataset, victim or setting this profile does not run).", ""]
    if doc.get("setup"):
        md += [doc["setup"], ""]
    md += lines
    if doc.get("ambiguities"):
        md += ["What the paper leaves open, and what advgen chose:", ""]
        md += [f"- {a['question']} **advgen:** {a['choice']}" for a in doc["ambiguities"]]
        md += [""]
    return md


@stage
def report(
    metrics_dir: Path = typer.Option(..., help="Root of the stages' metrics (metrics/<dataset>/...)."),
    out: Path = typer.Option(..., help="Folder for README.md and figures/."),
    params: Path | None = typer.Option(None, help="The pipeline's params.yaml: report exactly the results it "
                                       "declares (dvc.yaml passes it); without it, whatever METRICS_DIR holds."),
    samples: int = typer.Option(6, help="Test images per sample grid."),
    seed: int = typer.Option(0, help="Seeds the choice of sample images."),
    paper: Path | None = typer.Option(None, help="A paper's own numbers (YAML: tables of cells, ambiguities): "
                                      "shown beside advgen's with the difference."),
    substitute: list[str] = typer.Option([], help="KEY:PAPER=OURS (repeatable): where the paper's cell names a "
                                         "dataset, victim, source or target this profile does not run, compare "
                                         "with this one instead (said beside every such cell)."),
    jobs: int = typer.Option(0, help="Figures drawn at once, in forked processes (0: one per available core). "
                             "The files do not depend on it."),
) -> None:
    """Gather training, white-box, transfer, retraining and defense results into OUT/README.md."""
    if out.exists() and not out.is_dir():
        raise BadParameter(f"--out {out} is a file, not a folder")
    check_writable(out)
    if samples < 1:
        raise BadParameter(f"--samples must be >= 1, got {samples}")
    if jobs < 0:
        raise BadParameter(f"--jobs must be >= 0 (0: one per available core), got {jobs}")
    if not metrics_dir.is_dir():
        raise BadParameter(f"{metrics_dir}: no such metrics folder; run the pipeline first")
    figs = out / "figures"
    paper_doc = _paper(paper) if paper is not None else None
    subs = [_substitute(t) for t in substitute]
    if subs and paper_doc is None:
        raise BadParameter("--substitute needs --paper")
    if paper_doc is not None:
        paper_doc["substitutes"] = [*(paper_doc.get("substitutes") or []), *subs]
        paper_doc.setdefault("file", paper.as_posix())
    with R.figure_jobs(jobs or available_cores()):  # figures drawn in parallel; all written on leaving
        inputs = _inputs(metrics_dir, params)
        datasets = sorted(inputs)
        md = ["# advgen study report", "",
              "Generated by `advgen report` from the metrics of every stage. All adversarial results are measured "
              "on the stored (uint8-rounded) images that the shards hold.", ""]
        timing: list[list[object]] = []
        results: dict = {"evaluate": {}, "transfer": {}, "retrain": {}, "defend": {}, "train": {}}
        for ds in datasets:
            spec = _spec(ds, inputs[ds])
            found = inputs[ds]
            md += [f"## {spec.title}", ""]
            trains = {v: _load(p) for v, p in found["train"].items()}
            results["train"].update({(ds, v): t for v, t in trains.items()})
            if trains:
                md += ["### Victims", "", R.table(
                    ["victim", "clean test accuracy", "epochs", "parameters", "train seconds", "device"],
                    [[v, t["test_accuracy"], t["epochs"], t.get("parameters"), t["train_seconds"], t["device"]]
                     for v, t in trains.items()])]
                timing += [[ds, f"train {v}", t["device"], t["train_seconds"], t.get("images_per_second")]
                           for v, t in trains.items()]
            for v, paths in found["generate"].items():
                for g in paths:
                    t = _load(g)
                    timing.append([ds, f"generate {v} {g.stem.removeprefix('generate-')} ({t['variants']} "
                                   f"variant{'s' if t['variants'] != 1 else ''})",
                                   t["device"], t["seconds"], t.get("images_per_s")])
            whitebox: dict[str, dict[str, float]] = {}
            for v, path in found["evaluate"].items():
                ev = _load(path)
                timing.append([ds, f"evaluate {v}", "cpu", ev.get("seconds"), None])
                md += [f"### White-box: {v}", ""]
                fig = R.draw(R.figure_curves, ev, figs / f"{ds}-{v}-curves.png", f"{spec.title}, {v} (test split)")
                md += [f"![accuracy and error vs ε]({R.rel(fig, out)})", ""]
                results["evaluate"][(ds, v)] = ev
                for r in ev["variants"].values():
                    s = r["splits"].get("test") or next(iter(r["splits"].values()))
                    whitebox.setdefault(variant_name(r), {})[v] = s["accuracy"]
                md += ["Every figure as stored (the uint8 images the shards hold) and, after the slash, on the float "
                       "images the attack made before rounding (where the rounding audit ran). The fooling rate is the "
                       "share of images whose predicted label changed, whatever the true label.", "",
                       R.table(R.WHITEBOX_HEADER, R.whitebox_rows(ev, out))]
                sentences = R.rounding_sentences(ev)
                if sentences:
                    md += ["What rounding to 8 bits did:", "", *[f"- {line}" for line in sentences], ""]
                note = R.fgm_scale_note(ev, std=ev.get("victim_std") or [1.0])
                if note:
                    md += [note, ""]
                buckets, rule = R.bucket_rows(ev)
                md += [f"Top-1 and top-5 error by the clean image's confidence ({rule}):", "",
                       R.table(R.BUCKET_HEADER, buckets)]
                md += _grids(ev, spec, out, figs, samples=samples, seed=seed)
            if found["transfer"] is not None:
                tr = _load(found["transfer"])
                results["transfer"][ds] = tr
                timing.append([ds, "transfer", "cpu", tr.get("seconds"), None])
                fig = R.draw(R.figure_transfer, tr, whitebox, figs / f"{ds}-transfer.png",
                                        f"{spec.title}: accuracy of target on source's images (diagonal: white-box)")
                md += ["### Transfer", "", f"![transfer heatmaps]({R.rel(fig, out)})", "",
                       R.table(["method", "ε", "source", "target", "acc.", "drop", "loss (clean)", "fooling rate",
                                "transfer rate", "target clean conf. (transferred / not)",
                                "source clean conf. (transferred / not)"],
                               [[r["method"], r["eps"], r["source"], r["target"], r["accuracy"], r["drop"],
                                 f"{R.fmt(r.get('loss'))} ({R.fmt(r.get('target_clean_loss'))})", r.get("fooling_rate"),
                                 r.get("transfer_rate"),
                                 f"{R.fmt(r.get('target_clean_conf_transferred'))} / "
                                 f"{R.fmt(r.get('target_clean_conf_not_transferred'))}",
                                 f"{R.fmt(r.get('source_clean_conf_transferred'))} / "
                                 f"{R.fmt(r.get('source_clean_conf_not_transferred'))}"]
                                for r in tr["rows"] if r["direction"] == "adversarial"])]
            for v, rpath in found["retrain"].items():
                rt = _load(rpath)
                results["retrain"][(ds, v)] = rt
                a = rt["adversarial"]
                fig = R.draw(R.figure_retrain, rt, figs / f"{ds}-{v}-retrain.png",
                                       f"{v} retrained on {a['method']} ε={a['eps']} from {a['source']}")
                md += [f"### Adversarial retraining: {v}", "",
                       f"Training data: `{a['folder']}` ({a['method']}, ε = {a['eps']}, made on {a['source']}), "
                       f"{rt['clean_ratio']} clean image(s) per adversarial image. The fresh white-box attack is "
                       f"{a['method']} at the same ε against each model itself.", "",
                       f"![retraining]({R.rel(fig, out)})", "",
                       R.table(["model", "clean acc. (loss)", "stored adv. acc. (loss)", "drop",
                                "fresh white-box acc. (loss)", "drop", "white-box ρ̂", "epochs", "train seconds"],
                               [[m, f"{R.fmt(r['clean_accuracy'])} ({R.fmt(r.get('clean_loss'))})",
                                 f"{R.fmt(r['stored_adversarial_accuracy'])} ({R.fmt(r.get('stored_adversarial_loss'))})",
                                 r["stored_adversarial_drop"],
                                 f"{R.fmt(r['white_box_accuracy'])} ({R.fmt(r.get('white_box_loss'))})",
                                 r["white_box_drop"], r.get("white_box_rho"), r.get("epochs"), r.get("train_seconds")]
                                for m, r in rt["models"].items()])]
                timing += [[ds, f"retrain {v} {m}", rt["device"], r.get("train_seconds"), r.get("images_per_second")]
                           for m, r in rt["models"].items() if m != "original"]
            for v, dpath in found["defend"].items():
                df = _load(dpath)
                results["defend"][(ds, v)] = df
                timing.append([ds, f"defend {v}", df["device"], df.get("seconds"), None])
                swept = [d for d in defenses.REGISTRY.values() if any(r["defense"] == d.name for r in df["rows"])]
                drawn = [(d.name, R.draw(R.figure_defense, df, d.name, figs / f"{ds}-{v}-{d.name}.png",
                                         f"{v}: {d.title}")) for d in swept]
                f = R.draw(R.figure_scaled, df, figs / f"{ds}-{v}-scaled.png",
                                    f"{v}: stored δ of {df['scaled']} scaled by f, then the defense")
                md += [f"### Input defenses: {v}", "",
                       "Solid comparisons: clean vs stored adversarial test images, for the original and retrained "
                       f"models; the last panel attacks defense + victim directly ({df['adaptive']['method']} "
                       f"ε={df['adaptive']['eps']}).", "",
                       *[line for name, g in drawn for line in (f"![{name}]({R.rel(g, out)})", "")],
                       f"![scaled perturbations]({R.rel(f, out)})", "", *R.defense_table(df)]
            for v, dpath in found.get("directions", {}).items():
                dm = _load(dpath)
                timing.append([ds, f"directions {v}", dm.get("device"), dm.get("seconds"), None])
                md += section(dm, figs=figs, out=out, title=f"Class-score directions: {v} (Jetley et al.)")
        if paper_doc is not None:
            md += _paper_section(paper_doc, results)
        md += ["## Timing", "", R.table(["dataset", "stage", "device", "seconds", "images/s"], timing)]
    text = "\n".join(md)
    write_text(out / "README.md", text)
    for stale in sorted(figs.glob("*.png")):  # figures of results this pipeline no longer declares
        if f"figures/{stale.name})" not in text:
            stale.unlink()
    log(f"report: {out / 'README.md'} with {len(list(figs.glob('*.png')))} figure(s)")
    print(out / "README.md")
