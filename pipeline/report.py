"""The study report: Markdown tables and PNG figures from the stages' metrics files.

Pure functions of already-computed results (plus a few stored images for the
sample grids): ``figure_*`` draw one PNG each, ``section_*`` return Markdown.
Figures use matplotlib's Agg backend and carry no timestamps, so an unchanged
study gives unchanged files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from advgen.evaluate import variant_name

SIGN_METHODS = ("fgsm", "bim", "pgd", "illc_fast", "illc_iter")  # L∞ sign steps
UNSIGNED_METHODS = ("fgm", "fgm_l2", "pgd_l2")  # raw or L2-normalized gradients


def _plt():
    """matplotlib's pyplot on the Agg backend, imported on first use: it costs every advgen process
    half a second at start-up otherwise, and only the report draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return path


def fmt(v: object, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        if abs(v) >= 100:  # seconds, images/s: whole numbers read better
            return f"{v:.0f}"
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.{digits}f}"
    return str(v)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


# --- which results -----------------------------------------------------------------------------------

def _empty_results() -> dict:
    return {"train": {}, "generate": {}, "evaluate": {}, "transfer": None, "retrain": {}, "defend": {}}


def declared_results(params: dict, metrics_dir: Path) -> dict[str, dict]:
    """The metrics files a pipeline's ``params`` declare, per dataset (the paths dvc.yaml gives the stages).

    {dataset: {"train": {victim: path}, "generate": {victim: [paths]}, "evaluate": {victim: path},
    "transfer": path | None, "retrain": {target: path}, "defend": {victim: path}}}
    """
    out: dict[str, dict] = {}

    def entries(section: str) -> list[dict]:
        return [e for e in (params.get(section) or {}).values() if isinstance(e, dict) and "dataset" in e]

    def ds(name: str) -> dict:
        return out.setdefault(name, _empty_results())

    for e in entries("train"):
        ds(e["dataset"])["train"][e["victim"]] = metrics_dir / e["dataset"] / e["victim"] / "train.json"
    for e in entries("generate"):
        ds(e["dataset"])["generate"].setdefault(e["victim"], []).append(
            metrics_dir / e["dataset"] / e["victim"] / f"generate-{e['family']}.json")
    for e in entries("evaluate"):
        ds(e["dataset"])["evaluate"][e["victim"]] = metrics_dir / e["dataset"] / e["victim"] / "evaluate.json"
    for e in entries("transfer"):
        ds(e["dataset"])["transfer"] = metrics_dir / e["dataset"] / "transfer.json"
    for e in entries("retrain"):
        ds(e["dataset"])["retrain"][e["target"]] = metrics_dir / e["dataset"] / e["target"] / "retrain.json"
    for e in entries("defend"):
        ds(e["dataset"])["defend"][e["victim"]] = metrics_dir / e["dataset"] / e["victim"] / "defend.json"
    return out


def scan_results(metrics_dir: Path) -> dict[str, dict]:
    """Whatever results ``metrics_dir`` holds, in the layout of ``declared_results``."""
    out: dict[str, dict] = {}
    for root in sorted(p for p in Path(metrics_dir).iterdir() if p.is_dir()):
        found = _empty_results()
        for v in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "plots"):
            for kind in ("train", "evaluate", "retrain", "defend"):
                if (v / f"{kind}.json").is_file():
                    found[kind][v.name] = v / f"{kind}.json"
            gens = sorted(v.glob("generate-*.json"))
            if gens:
                found["generate"][v.name] = gens
        if (root / "transfer.json").is_file():
            found["transfer"] = root / "transfer.json"
        if any(found[k] for k in found):
            out[root.name] = found
    return out


def result_files(found: dict) -> list[Path]:
    """Every path in one dataset's entry of ``declared_results`` / ``scan_results``."""
    paths = [*found["train"].values(), *found["evaluate"].values(), *found["retrain"].values(),
             *found["defend"].values(), *(p for ps in found["generate"].values() for p in ps)]
    return paths + ([found["transfer"]] if found["transfer"] is not None else [])


# --- white-box -------------------------------------------------------------------------------------

def curves(evaluation: dict, split: str = "test") -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{"sign"|"unsigned"|"cooperative": {method: [(ε, accuracy or error), ...]}} with the clean point at ε = 0."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {"sign": {}, "unsigned": {}, "cooperative": {}}
    for r in evaluation["variants"].values():
        s = r["splits"].get(split)
        if s is None or r["eps"] is None:
            continue
        if r["direction"] == "cooperative":
            group, value, clean = "cooperative", s["error"], s["clean_error"]
        else:
            group = "sign" if r["method"] in SIGN_METHODS else "unsigned"
            value, clean = s["accuracy"], s["clean_accuracy"]
        pts = out[group].setdefault(r["method"], [(0.0, clean)])
        pts.append((r["eps"], value))
    return {g: {m: sorted(set(p)) for m, p in d.items()} for g, d in out.items()}


def figure_curves(evaluation: dict, path: Path, title: str) -> Path:
    """Accuracy vs ε (sign and unsigned methods side by side) and cooperative error vs ε."""
    c = curves(evaluation)
    fig, axes = _plt().subplots(1, 3, figsize=(13, 3.6), sharex=False)
    for ax, (group, ylabel, name) in zip(axes, [("sign", "accuracy", "sign-gradient methods (L∞)"),
                                               ("unsigned", "accuracy", "unsigned / L2 methods"),
                                               ("cooperative", "error", "cooperative (error)")]):
        for method, pts in sorted(c[group].items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("ε")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if c[group]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "none generated", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(title)
    return _save(fig, path)


def figure_sample_grid(clean: np.ndarray, labels: np.ndarray, clean_pred: np.ndarray,
                       columns: list[tuple[str, np.ndarray, np.ndarray]], classes: list[str], path: Path,
                       title: str, amplify: tuple[str, np.ndarray] | None = None) -> Path:
    """Rows of images: clean, then each (name, images, predictions) column, then an amplified |δ|.

    Images are (N, H, W, C) uint8; captions read "true → predicted".
    """
    n = len(clean)
    ncol = 1 + len(columns) + (amplify is not None)
    fig, axes = _plt().subplots(n, ncol, figsize=(1.45 * ncol, 1.6 * n), squeeze=False)

    def show(ax, img, caption, wrong=False):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(caption, fontsize=6, color="crimson" if wrong else "black")

    short = [c[:9] for c in classes]
    for i in range(n):
        show(axes[i, 0], clean[i], f"{short[labels[i]]} → {short[clean_pred[i]]}", clean_pred[i] != labels[i])
        for j, (_, imgs, preds) in enumerate(columns, start=1):
            show(axes[i, j], imgs[i], f"{short[labels[i]]} → {short[preds[i]]}", preds[i] != labels[i])
        if amplify is not None:
            delta = amplify[1][i].astype(np.float32) - clean[i].astype(np.float32)
            scale = max(1.0, float(np.abs(delta).max()))
            vis = np.clip(127.5 + delta * (127.5 / scale), 0, 255).astype(np.uint8)
            show(axes[i, -1], vis, "δ amplified")
    for j, name in enumerate(["clean"] + [c[0] for c in columns] + ([f"δ of {amplify[0]}"] if amplify else [])):
        axes[0, j].set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


# --- transfer --------------------------------------------------------------------------------------

def figure_transfer(transfer: dict, whitebox: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """One source × target accuracy heatmap per adversarial (method, ε); the diagonal is white-box."""
    keys = sorted({k for k in transfer["matrix"]
                   if any(r["direction"] == "adversarial" and variant_name(r) == k for r in transfer["rows"])})
    victims = sorted(transfer["clean_accuracy"])
    ncol = min(4, max(1, len(keys)))
    nrow = max(1, math.ceil(len(keys) / ncol))
    fig, axes = _plt().subplots(nrow, ncol, figsize=(3.4 * ncol + 1, 3.2 * nrow), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        m = np.full((len(victims), len(victims)), np.nan)
        for i, s in enumerate(victims):
            for j, t in enumerate(victims):
                m[i, j] = whitebox.get(key, {}).get(s, np.nan) if s == t else \
                    transfer["matrix"][key].get(s, {}).get(t, np.nan)
        ax.axis("on")
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(victims)):
            for j in range(len(victims)):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if m[i, j] < 0.5 else "black")
        ax.set_xticks(range(len(victims)), victims, fontsize=7, rotation=30)
        ax.set_yticks(range(len(victims)), victims, fontsize=7)
        ax.set_xlabel("target", fontsize=7)
        ax.set_ylabel("source", fontsize=7)
        ax.set_title(key, fontsize=9)
    if keys:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(title)
    return _save(fig, path)


# --- retraining and defenses -------------------------------------------------------------------------

def figure_retrain(retrain: dict, path: Path, title: str) -> Path:
    models = list(retrain["models"])
    kinds = [("clean_accuracy", "clean"), ("stored_adversarial_accuracy", "stored adversarial"),
             ("white_box_accuracy", "fresh white-box")]
    fig, ax = _plt().subplots(figsize=(1.6 * len(models) + 2, 3.4))
    width = 0.8 / len(kinds)
    for k, (field, label) in enumerate(kinds):
        ax.bar(np.arange(len(models)) + k * width, [retrain["models"][m][field] for m in models], width, label=label)
    ax.set_xticks(np.arange(len(models)) + width, models, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def figure_defense(defend: dict, defense: str, path: Path, title: str) -> Path:
    """Accuracy vs σ (or size) for every model, clean (solid) and adversarial (dashed)."""
    rows = [r for r in defend["rows"] if r["defense"] == defense and "scale" not in r
            and not r["data"].startswith("adaptive")]
    adaptive = [r for r in defend["rows"] if r["defense"] == defense and r["data"].startswith("adaptive")]
    models = list(dict.fromkeys(r["model"] for r in rows))
    datas = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = _plt().subplots(1, len(datas) + bool(adaptive), figsize=(4 * (len(datas) + bool(adaptive)), 3.3),
                             squeeze=False)
    for ax, data in zip(axes[0], datas + (["adaptive"] if adaptive else [])):
        src = adaptive if data == "adaptive" else [r for r in rows if r["data"] == data]
        for m in models:
            pts = sorted((r["value"], r["accuracy"]) for r in src if r["model"] == m)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, label=m, lw=2 if m == "original" else 1)
        ax.set_title(adaptive[0]["data"] + " (knows the defense)" if data == "adaptive" else data, fontsize=9)
        ax.set_xlabel("σ (pixels)" if defense == "gaussian" else "size (pixels)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def figure_scaled(defend: dict, path: Path, title: str) -> Path:
    """Accuracy of the original victim vs the factor f on the stored δ, one line per defense setting."""
    rows = [r for r in defend["rows"] if "scale" in r and r["model"] == "original"]
    fig, ax = _plt().subplots(figsize=(5, 3.4))
    for (d, v) in dict.fromkeys((r["defense"], r["value"]) for r in rows):
        pts = sorted((r["scale"], r["accuracy"]) for r in rows if r["defense"] == d and r["value"] == v)
        xs, ys = zip(*pts)
        label = f"σ={v:g}" if d == "gaussian" else f"resample {int(v)}px"
        ax.plot(xs, ys, marker="o", ms=3, label=label, ls="-" if d == "gaussian" else "--")
    ax.set_xlabel("factor f on the stored perturbation")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
