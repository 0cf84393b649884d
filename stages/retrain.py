"""``advgen retrain``: adversarial retraining of one victim, in several modes, and what it bought."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import typer

from advgen.data.clean import load_clean_split, open_clean
from advgen.data.datasets import spec_for
from advgen.errors import BadParameter
from advgen.evaluation.whitebox import open_variant
from advgen.evaluation.retrain import MODES, assess, check_mode, mix, online_attack
from advgen.evaluation.retrain import retrain as run_retrain
from advgen.storage.shards import read_split, write_json
from advgen.victims.train import Recipe, resolve_device
from advgen.versions import versions
from advgen.victims import load, save
from advgen.storage.outputs import check_file_target, check_writable
from advgen.stages.app import log, stage
from advgen.stages.progress import bar


def _drops(r: dict) -> dict:
    return {**r, "stored_adversarial_drop": r["clean_accuracy"] - r["stored_adversarial_accuracy"],
            "white_box_drop": r["clean_accuracy"] - r["white_box_accuracy"]}


@stage
def retrain(
    victim_ckpt: Path = typer.Option(..., help="The trained victim to retrain (the target)."),
    clean: Path = typer.Option(..., help="Clean folder of the victim's dataset."),
    adv: Path = typer.Option(..., help="Variant folder with train and test splits (any source victim)."),
    out: Path = typer.Option(..., help="Folder for the retrained checkpoints (<mode>.pt)."),
    metrics: Path = typer.Option(..., help="Metrics JSON to write."),
    mode: list[str] = typer.Option(list(MODES), help=f"Repeatable: {', '.join(MODES)}."),
    finetune_epochs: int = typer.Option(5, help="Epochs of finetune (at half the victim's learning rate)."),
    epochs: int = typer.Option(0, help="Epochs of scratch and online training; 0 = the victim's own schedule."),
    clean_ratio: float = typer.Option(1.0, help="Clean images per adversarial image in the training mix."),
    online_eps: float = typer.Option(0.1, help="ε of the online attacks (FGSM with random start, PGD)."),
    online_steps: int = typer.Option(7, help="PGD steps of online_pgd."),
    steps: int = typer.Option(10, help="Steps of the fresh white-box attack, for iterative methods."),
    seed: int = typer.Option(0, help="Seeds the mix, the training runs and the random starts."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
) -> None:
    """Retrain VICTIM on adversarial training shards; evaluate clean, transferred and fresh white-box."""
    for m in mode:
        check_mode(m)
        if m.startswith("online_"):
            online_attack(m, eps=online_eps, steps=online_steps, step_size=None)  # bad values: error before compute
    if finetune_epochs < 1 or epochs < 0:
        raise BadParameter("--finetune-epochs must be >= 1 and --epochs >= 0")
    dev = resolve_device(device)
    check_file_target(metrics, "--metrics")
    if out.exists() and not out.is_dir():
        raise BadParameter(f"--out {out} is a file, not a folder")
    check_writable(out)
    clean_stats = open_clean(clean)
    victim = load(victim_ckpt, dataset=clean_stats["dataset"])
    vstats = open_variant(adv, clean_dir=clean)
    for split in ("train", "test"):
        if split not in vstats["shards"]:
            raise BadParameter(f"{adv} has no {split!r} split; retraining needs both (generate with --split train --split test)")
    spec = spec_for(clean_stats)
    t = victim.meta.train
    recipe = Recipe(epochs=epochs or t["epochs"], batch_size=t["batch_size"], lr=t["lr"],
                    weight_decay=t.get("weight_decay", 5e-4), label_smoothing=t.get("label_smoothing", 0.0),
                    optimizer=t.get("optimizer", "sgd"))

    x, y, _ = load_clean_split(clean, clean_stats, "train")
    xt, yt, _ = load_clean_split(clean, clean_stats, "test")
    ax, ay, _ = read_split(adv, vstats, "train")
    axt, ayt, _ = read_split(adv, vstats, "test")
    method, eps = vstats["method"], vstats["eps"]
    mixed_x, mixed_y = mix(x, y, ax, ay, clean_ratio=clean_ratio, seed=seed)
    log(f"retrain {victim.meta.arch} on {spec.name}: {method} ε={eps} from a {vstats['victim']['arch']} victim, "
        f"{len(ax)} adversarial + {len(mixed_x) - len(ax)} clean images; modes {', '.join(mode)} on {dev}")

    def measure(model):
        return _drops(assess(model, clean_x=xt, clean_y=yt, adv_x=axt, adv_y=ayt, method=method, eps=eps,
                             steps=steps, device=dev, seed=seed, label_source=vstats.get("label_source", "true")))

    t0 = time.perf_counter()
    original = measure(victim)
    results = {"original": {**original, "seconds": round(time.perf_counter() - t0, 3)}}
    for m in mode:
        started = time.perf_counter()
        r = recipe if m != "finetune" else Recipe(**{**asdict(recipe), "epochs": finetune_epochs})
        with bar(f"retrain {m}") as b:
            def progress(epoch: int, step: int, n: int, s: dict, r=r, b=b) -> None:
                b.update(epoch * n + step, r.epochs * n, f"epoch {epoch + 1}/{r.epochs} loss {s['loss']:.4f}",
                         line=step == n)
            data = (mixed_x, mixed_y) if m in ("finetune", "scratch") else (x, y)
            model, run = run_retrain(m, victim, x=data[0], y=data[1], recipe=r, seed=seed, device=dev,
                                     crop_pad=spec.crop_pad, flip=spec.flip, eps=online_eps, steps=online_steps,
                                     on_progress=progress)
        train_seconds = time.perf_counter() - started
        res = measure(model)
        lr = r.lr / 2 if m == "finetune" else r.lr  # finetune runs at half the victim's rate
        model.meta.train = {**asdict(r), "lr": lr, "seed": seed, "device": dev.type, "mode": m, "retrained_from": victim.meta.train,
                            "adversarial": {"method": method, "eps": eps, "source": vstats["victim"]},
                            "clean_ratio": clean_ratio, "online_eps": online_eps, "online_steps": online_steps}
        model.meta.test_accuracy = res["clean_accuracy"]
        model.meta.versions = versions()
        save(model.cpu(), out / f"{m}.pt")
        results[m] = {**res, "epochs": r.epochs, "lr": lr,
                      "train_seconds": round(train_seconds, 3), "images_per_second": round(run.images_per_second, 1)}
        log(f"{m}: clean {res['clean_accuracy']:.4f}, stored adversarial {res['stored_adversarial_accuracy']:.4f}, "
            f"white-box {res['white_box_accuracy']:.4f} ({train_seconds:.1f}s)")
    write_json(metrics, {
        "dataset": spec.name, "target": victim.meta.arch, "device": dev.type,
        "adversarial": {"method": method, "eps": eps, "source": vstats["victim"]["arch"], "folder": str(adv)},
        "clean_ratio": clean_ratio, "models": results,
    })
    o = results["original"]
    print(f"original {victim.meta.arch}: clean {o['clean_accuracy']:.4f}, stored adversarial "
          f"{o['stored_adversarial_accuracy']:.4f}, white-box {o['white_box_accuracy']:.4f}")
