"""The report's figures: white-box curves and sample grids, transfer, retraining, one sweep per registered
defense and the scaled perturbations, and the table of each defense's best setting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from advgen import defenses
from advgen.attacks import declares
from advgen.evaluation.whitebox import variant_name
from advgen.report.render import _plt, _save, fmt, table


# --- white-box -------------------------------------------------------------------------------------

def curves(evaluation: dict, split: str = "test") -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{"sign"|"unsigned"|"cooperative": {series: [(ε, accuracy or error), ...]}} with the clean point at ε = 0.

    Each method has its stored series (named after it) and, where the float predictions were audited, a
    float series ``<method> (float)``.
    """
    out: dict[str, dict[str, list[tuple[float, float]]]] = {"sign": {}, "unsigned": {}, "cooperative": {}}
    for r in evaluation["variants"].values():
        s = r["splits"].get(split)
        if s is None or r["eps"] is None:
            continue
        if r["direction"] == "cooperative":
            group, clean = "cooperative", s["clean_error"]
            sides = [(r["method"], s["error"])] + ([(f"{r['method']} (float)", 1 - s["float_accuracy"])]
                                                    if s.get("float_accuracy") is not None else [])
        else:
            group = "sign" if declares(r["method"], "sign_steps") else "unsigned"  # the registry's grouping
            clean = s["clean_accuracy"]
            sides = [(r["method"], s["accuracy"])] + ([(f"{r['method']} (float)", s["float_accuracy"])]
                                                       if s.get("float_accuracy") is not None else [])
        for series, value in sides:
            out[group].setdefault(series, [(0.0, clean)]).append((r["eps"], value))
    return {g: {m: sorted(set(p)) for m, p in d.items()} for g, d in out.items()}


def figure_curves(evaluation: dict, path: Path, title: str) -> Path:
    """Accuracy vs ε (sign and unsigned methods side by side) and cooperative error vs ε; float images dashed."""
    c = curves(evaluation)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=False)
    for ax, (group, ylabel, name) in zip(axes, [("sign", "accuracy", "sign-gradient methods (L∞)"),
                                               ("unsigned", "accuracy", "unsigned / L2 methods"),
                                               ("cooperative", "error", "cooperative (error)")]):
        colors: dict[str, object] = {}
        for series, pts in sorted(c[group].items()):
            method = series.removesuffix(" (float)")
            xs, ys = zip(*pts)
            line, = ax.plot(xs, ys, marker="o", ms=3, label=series, color=colors.get(method),
                            ls="--" if series.endswith("(float)") else "-", alpha=0.7 if series.endswith("(float)") else 1)
            colors.setdefault(method, line.get_color())
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("ε")
        ax.set_ylabel(ylabel + " (dashed: float images)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if c[group]:
            ax.legend(fontsize=7)
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
        ax.set_xlabel(defenses.get(defense).axis)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


_LINES = ("-", "--", ":", "-.")  # one per defense, in registry order


def defense_table(defend: dict) -> list[str]:
    """Per registered defense: the original victim's best setting on the scaled (first) stored set, and its clean,
    stored and adaptive accuracy there, with how the adaptive attack differentiated the defense."""
    rows = [r for r in defend["rows"] if r["model"] == "original" and "scale" not in r]
    stored = defend["scaled"]
    out = []
    for d in defenses.REGISTRY.values():
        mine = [r for r in rows if r["defense"] == d.name]
        on_stored = [r for r in mine if r["data"] == stored]
        if not on_stored:
            continue
        best = max(on_stored, key=lambda r: r["accuracy"])
        at = {r["data"]: r["accuracy"] for r in mine if r["value"] == best["value"]}
        adaptive = next((a for k, a in at.items() if k.startswith("adaptive")), None)
        out.append([d.name, d.label(best["value"]), fmt(at.get("clean")), fmt(best["accuracy"]),
                    fmt(adaptive) if adaptive is not None else "– (identity)", d.gradient])
    if not out:
        return []
    return [table(["defense", "best setting", "clean acc.", f"acc. on {stored}", "adaptive acc.",
                   "adaptive gradient"], out), ""]


def figure_scaled(defend: dict, path: Path, title: str) -> Path:
    """Accuracy of the original victim vs the factor f on the stored δ, one line per defense setting."""
    rows = [r for r in defend["rows"] if "scale" in r and r["model"] == "original"]
    fig, ax = _plt().subplots(figsize=(5, 3.4))
    for (d, v) in dict.fromkeys((r["defense"], r["value"]) for r in rows):
        pts = sorted((r["scale"], r["accuracy"]) for r in rows if r["defense"] == d and r["value"] == v)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=defenses.get(d).label(v), ls=_LINES[list(defenses.REGISTRY).index(d) % 4])
    ax.set_xlabel("factor f on the stored perturbation")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
