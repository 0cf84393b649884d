"""``advgen defend``: every registered input defense (``advgen.defenses``), swept, with adaptive checks."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from advgen import attacks, defenses
from advgen.data.clean import load_clean_split, open_clean
from advgen.evaluation.defend import Memo, Setting, adaptive_attack, scaled_perturbations, sweep
from advgen.errors import BadParameter
from advgen.evaluation.whitebox import open_variant
from advgen.storage.shards import read_split, write_csv, write_json
from advgen.victims.train import resolve_device
from advgen.victims import load
from advgen.storage.outputs import check_file_target, check_writable
from advgen.stages.app import log, stage, with_options

PLOT_FIELDS = ["series", "model", "data", "value", "accuracy", "fooling_rate"]


def _sweep_options() -> list[tuple[str, object, type, str]]:
    """One repeatable flag per registered defense: its sweep, with the declared defaults and help."""
    return [(d.flag, list(d.sweep), list[float], d.help) for d in defenses.REGISTRY.values()]


@stage
@with_options(_sweep_options(), before="scale")
def defend(
    victim_ckpt: Path = typer.Option(..., help="The original victim."),
    retrained: Path | None = typer.Option(None, help="Folder of retrained checkpoints (*.pt) to compare."),
    clean: Path = typer.Option(..., help="Clean folder of the victim's dataset."),
    adv: list[Path] = typer.Option(..., help="Variant folders (test split) to defend against; repeatable."),
    metrics: Path = typer.Option(..., help="Metrics JSON to write."),
    plots: Path = typer.Option(..., help="Folder for the plot tables (<defense>.csv for each defense, scaled.csv)."),
    scale: list[float] = typer.Option([1, 2, 3, 4, 5], help="Factors f applied to the stored perturbations."),
    adaptive_method: str = typer.Option("fgsm", help="Attack run against defense + victim."),
    adaptive_eps: float = typer.Option(0.1, help="ε of the adaptive attack."),
    steps: int = typer.Option(10, help="Steps of the adaptive attack, for iterative methods."),
    seed: int = typer.Option(0, help="Seeds random starts of the adaptive attack."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    **sweeps: list[float],
) -> None:
    """Accuracy of original and retrained victims behind each defense, on clean, stored and adaptive attacks."""
    started = time.perf_counter()
    for d in defenses.REGISTRY.values():  # flag values out of range: an error before anything is read
        for v in sweeps[d.flag] if d.check is not None else ():
            d.check(v)
    dev = resolve_device(device)
    check_file_target(metrics, "--metrics")
    check_writable(plots)
    clean_stats = open_clean(clean)
    model = load(victim_ckpt, dataset=clean_stats["dataset"])
    side = model.meta.input_shape[1]  # images are square in every registered dataset
    settings = [Setting(d.name, d.setting(float(v), side)) for d in defenses.REGISTRY.values() for v in sweeps[d.flag]]
    for s in settings:
        s.build()  # bad σ or size: an error before any compute
    eps_or_none = adaptive_eps if attacks.get(adaptive_method).takes_eps else None
    attacks.check(attacks.get(adaptive_method), eps_or_none, attacks.Params(steps=steps))
    models = {"original": model}
    if retrained is not None:
        ckpts = sorted(Path(retrained).glob("*.pt"))
        if not ckpts:
            raise BadParameter(f"no retrained checkpoints (*.pt) in {retrained}")
        models |= {p.stem: load(p, dataset=clean_stats["dataset"]) for p in ckpts}
    xt, yt, _ = load_clean_split(clean, clean_stats, "test")
    data = {"clean": (xt, yt)}
    names = []
    for folder in adv:
        st = open_variant(folder, clean_dir=clean)
        if "test" not in st["shards"]:
            raise BadParameter(f"{folder} has no test split")
        x, y, _ = read_split(folder, st, "test")
        name = f"{st['method']}" + (f" ε={st['eps']:g}" if st["eps"] is not None else "") + f" ({st['victim']['arch']})"
        data[name] = (x, y)
        names.append(name)
    log(f"defend: {len(models)} model(s) x {len(settings)} setting(s) x {len(data)} data set(s) on {dev}")
    memo = Memo(dev)  # clean and ×1 predictions are shared by the three questions
    rows = sweep(models, settings, data, device=dev, memo=memo)
    log("defend: adaptive attack on defense + victim")
    rows += adaptive_attack(models, [s for s in settings if not defenses.get(s.defense).identity(s.value)], xt, yt,
                            method=adaptive_method, eps=eps_or_none, steps=steps, device=dev, seed=seed, memo=memo)
    log(f"defend: stored perturbations of {names[0]} scaled by {', '.join(f'{f:g}' for f in scale)}")
    rows += scaled_perturbations(models, settings, xt, data[names[0]][0], yt, name=names[0], factors=scale, device=dev,
                                 memo=memo)

    for r in rows:
        r["series"] = f"{r['model']}: {r['data']}"
    for d in defenses.REGISTRY.values():
        write_csv(plots / f"{d.name}.csv", [r for r in rows if r["defense"] == d.name and "scale" not in r],
                  PLOT_FIELDS)
    write_csv(plots / "scaled.csv", [r for r in rows if "scale" in r],
              ["model", "defense", "value", "scale", "accuracy"])
    write_json(metrics, {"dataset": clean_stats["dataset"], "seconds": round(time.perf_counter() - started, 3), "victim": model.meta.arch, "device": dev.type,
                         "adaptive": {"method": adaptive_method, "eps": adaptive_eps}, "scaled": names[0],
                         "rows": rows})
    for d in defenses.REGISTRY.values():
        best = max((r for r in rows if r["defense"] == d.name and "scale" not in r and r["model"] == "original"
                    and r["data"] == names[0]), key=lambda r: r["accuracy"], default=None)
        if best is not None:
            print(f"original on {names[0]}: best {d.name} {d.label(best['value'])} → accuracy {best['accuracy']:.4f}")
