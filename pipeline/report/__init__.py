"""The study report: Markdown tables and PNG figures from the stages' metrics files.

Pure functions of already-computed results (plus a few stored images for the
sample grids): ``figure_*`` draw one PNG each, ``section_*`` return Markdown.
Figures use matplotlib's Agg backend and carry no timestamps, so an unchanged
study gives unchanged files.
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from advgen import defenses
from advgen.attacks import declares
from advgen.evaluation.whitebox import variant_name
from advgen.storage.outputs import staging_path



def _plt():
    """matplotlib's pyplot on the Agg backend, imported on first use: it costs every advgen process
    half a second at start-up otherwise, and only the report draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _render(fig, path: Path) -> None:
    """Draw ``fig`` into ``path`` as PNG, atomically (a partial file never sits under the final name)."""
    tmp = staging_path(path)  # .NAME.tmp-PID: what clean_stale removes if a child is killed mid-write
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class FigureJobs:
    """Figures built and drawn in ``jobs`` worker processes while the report goes on: matplotlib's layout,
    rasterizing and PNG encoding are most of a report's time. ``draw(fn, ...)`` hands the call of a ``figure_*``
    function to a worker and returns its ``path`` at once; the workers run the same code on the same arguments,
    so the bytes do not depend on ``jobs``. The workers are forked once, when the first figure is handed over
    (not one process per figure: forking a process that holds torch costs tens of milliseconds of page copying).
    ``jobs`` 1, or a system without fork, draws in this process. Use as a context manager (``R.figure_jobs``);
    leaving it waits for every figure and raises ``OSError`` naming those that could not be written."""

    def __init__(self, jobs: int) -> None:
        self.jobs = max(1, jobs) if hasattr(os, "fork") else 1
        self.pool = None
        self.pending: list[tuple[object, Path]] = []

    def draw(self, fn: Callable[..., Path], *args, **kwargs) -> Path:
        if self.jobs == 1:
            return fn(*args, **kwargs)
        path = Path(inspect.signature(fn).bind(*args, **kwargs).arguments["path"])
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_worker_init)
        self.pending.append((self.pool.submit(fn, *args, **kwargs), path))
        return path

    def cancel(self) -> None:
        """Drop the figures no worker has started (an error or Ctrl-C in the report); wait for the others."""
        self.pending = []
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def wait(self) -> None:
        failed = []
        try:
            for future, path in self.pending:
                try:
                    future.result()
                except Exception as e:  # noqa: BLE001 - reported by path, all together
                    print(f"advgen report: {path}: {e}", file=sys.stderr, flush=True)
                    failed.append(path)
        finally:
            self.cancel()  # every figure is done by now: this only stops the workers
        if failed:
            raise OSError(f"{len(failed)} figure(s) could not be written: " + ", ".join(map(str, failed[:5])))


def _worker_init() -> None:
    """A figure worker: draws in this process (never hands figures on) and leaves Ctrl-C to the report."""
    global _JOBS
    _JOBS = FigureJobs(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_JOBS = FigureJobs(1)


def draw(fn: Callable[..., Path], *args, **kwargs) -> Path:
    """``fn(*args, **kwargs)`` (a ``figure_*`` function), in a worker inside ``figure_jobs``: its ``path``."""
    return _JOBS.draw(fn, *args, **kwargs)


@contextmanager
def figure_jobs(jobs: int) -> Iterator[FigureJobs]:
    """``with figure_jobs(n): ...`` draws the figures handed to ``draw`` inside in up to ``n`` worker
    processes; leaving waits for them. An error raised inside the block is the one reported, and the figures
    not yet started are dropped."""
    global _JOBS
    previous, _JOBS = _JOBS, FigureJobs(jobs)
    try:
        yield _JOBS
    except BaseException:
        _JOBS.cancel()
        raise
    finally:
        pending, _JOBS = _JOBS, previous
    pending.wait()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _render(fig, path)
    finally:
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
    return {"train": {}, "generate": {}, "evaluate": {}, "transfer": None, "retrain": {}, "defend": {},
            "directions": {}}


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
    for e in entries("directions"):
        ds(e["dataset"])["directions"][e["victim"]] = metrics_dir / e["dataset"] / e["victim"] / "directions.json"
    return out


def scan_results(metrics_dir: Path) -> dict[str, dict]:
    """Whatever results ``metrics_dir`` holds, in the layout of ``declared_results``."""
    out: dict[str, dict] = {}
    for root in sorted(p for p in Path(metrics_dir).iterdir() if p.is_dir()):
        found = _empty_results()
        for v in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "plots"):
            for kind in ("train", "evaluate", "retrain", "defend", "directions"):
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
             *found["defend"].values(), *found.get("directions", {}).values(),
             *(p for ps in found["generate"].values() for p in ps)]
    return paths + ([found["transfer"]] if found["transfer"] is not None else [])


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


# --- white-box tables: stored and float side by side ------------------------------------------------------

def _pair(s: dict, key: str) -> str:
    """"stored / float" of a figure, or just stored where no float prediction was audited."""
    stored = fmt(s.get(key))
    return stored + (f" / {fmt(s['float_' + key])}" if s.get(f"float_{key}") is not None else "")


def whitebox_rows(evaluation: dict, out: Path, split: str = "test") -> list[list[object]]:
    """One row per variant: accuracy, success (or error reduction) and fooling rate as stored / as float."""
    rows = []
    for name, r in evaluation["variants"].items():
        s = r["splits"].get(split) or next(iter(r["splits"].values()))
        p = s["perturbation"]
        effect = "success_rate" if r["direction"] == "adversarial" else "error_rate_reduction"
        df = s.get("deepfool") or {}
        rho = fmt(df.get("rho")) + (f" / {fmt(df['float_rho'])}" if df.get("float_rho") is not None else "")
        card = Path(evaluation["adv"]) / name / "README.md"
        rows.append([f"[{name}]({rel(card, out)})", r["direction"], s["clean_accuracy"], _pair(s, "accuracy"),
                     _pair(s, effect), _pair(s, "fooling_rate"), s.get("top5_accuracy"), p["mean_linf"],
                     p["mean_l2"], p["mean_psnr"], p["mean_ssim"], rho if df else None])
    return rows


WHITEBOX_HEADER = ["variant (card)", "direction", "clean acc.", "acc. stored / float",
                   "success (error reduction) stored / float", "fooling rate stored / float", "top-5 acc.",
                   "mean ‖δ‖∞", "mean ‖δ‖₂", "PSNR dB", "SSIM", "DeepFool ρ̂ stored / float"]


def rounding_sentences(evaluation: dict, split: str = "test") -> list[str]:
    """One sentence per method whose results rounding to 8 bits changed: what it did, with the numbers."""
    by_method: dict[str, list[tuple[object, dict, dict]]] = {}
    for r in evaluation["variants"].values():
        s = r["splits"].get(split)
        if s is not None and s.get("float_accuracy") is not None:
            by_method.setdefault(r["method"], []).append((r["eps"], s, r))
    lines = []
    for method, entries in sorted(by_method.items()):
        entries.sort(key=lambda e: -1.0 if e[0] is None else e[0])
        gaps = [(e, s["float_accuracy"] - s["accuracy"], s) for e, s, _ in entries]
        unchanged = [(e, s["perturbation"]["unchanged"], s["count"]) for e, s, _ in entries]
        worst = max(gaps, key=lambda g: abs(g[1]))
        lattice = [s.get("lattice", {}).get("images", 0) for _, s, _ in entries]
        if abs(worst[1]) < 0.005 and not any(u for _, u, _ in unchanged) and not any(lattice):
            continue
        eps = "" if worst[0] is None else f" at ε = {worst[0]:g}"
        s = worst[2]
        parts = [f"**{method}**: rounding to 8 bits moved accuracy from {fmt(s['float_accuracy'])} (float) "
                 f"to {fmt(s['accuracy'])} (stored){eps}"]
        if any(lattice):
            parts.append(f"with {max(lattice)} image(s) taking extra steps on the uint8 lattice (rounding-aware "
                         "mode), so the stored copy keeps what the float attack reached")
        most = max(unchanged, key=lambda u: u[1])
        if most[1]:
            where = "" if most[0] is None else f" at ε = {most[0]:g}"
            parts.append(f"{most[1]} of {most[2]} stored images{where} are byte-identical to the clean ones "
                         "(every change rounded away)")
        lines.append("; ".join(parts) + ".")
    return lines


def bucket_rows(evaluation: dict, split: str = "test") -> tuple[list[list[object]], str]:
    """Top-1 and top-5 error per clean-confidence bucket, per variant; and a sentence saying how buckets were made."""
    rows, rule = [], ""
    for name, r in evaluation["variants"].items():
        s = r["splits"].get(split) or next(iter(r["splits"].values()))
        b = s["buckets"]
        t = b["thresholds"]
        rule = (f"top-1 probability < {t[0]:.4g}, {t[0]:.4g}–{t[1]:.4g}, ≥ {t[1]:.4g}"
                + (" (terciles)" if not b.get("correct_only") and t[0] != 0.15 else "")
                + (", among images the victim gets right when clean" if b.get("correct_only") else "")
                + (f", at most {b['per_bucket']} drawn per bucket" if b.get("per_bucket") else ""))
        row: list[object] = [name]
        for k in ("low", "medium", "high"):
            row += [b[k]["count"], b[k]["error"], b[k].get("top5_error")]
        rows.append(row)
    return rows, rule


BUCKET_HEADER = ["variant", "low: n", "top-1 err.", "top-5 err.", "medium: n", "top-1 err.", "top-5 err.",
                 "high: n", "top-1 err.", "top-5 err."]


def fgm_scale_note(evaluation: dict, *, std: list[float], batch: int = 32, split: str = "test") -> str | None:
    """How FGM's step size depends on the gradient's scale, with this victim's numbers (Agarwal et al. do not say)."""
    grads = [(r["eps"], r["splits"][split]["gradient"]) for r in evaluation["variants"].values()
             if r["method"] in ("fgm", "d_fgm") and split in r["splits"] and "gradient" in r["splits"][split]]
    if not grads:
        return None
    g = grads[0][1]
    var = sum(s * s for s in std) / len(std)
    return (f"FGM adds ε·∇ₓJ, so its step is as large as the gradient. advgen takes each image's own loss "
            f"(a per-sample sum, not a batch mean) in pixel space ([0, 1], normalization inside the victim): "
            f"here the mean ‖∇ₓJ‖₂ is {fmt(g['mean_l2'])} and the mean ‖∇ₓJ‖∞ {fmt(g['mean_linf'])}, so ε = 1 "
            f"moves an image by ‖δ‖₂ ≈ {fmt(g['mean_l2'])} before clipping. A batch-mean loss over {batch} images "
            f"(the paper's batch size) divides the gradient by {batch}: its ε = 1 is our ε = {1 / batch:.4g} "
            f"(mean ‖δ‖₂ ≈ {fmt(g['mean_l2'] / batch)}). A gradient taken in the normalized space "
            f"(z = (x − μ)/σ, σ² ≈ {var:.4g} here) and stepped there moves x by ε·σ²·∇ₓJ: its ε = 1 is our "
            f"ε = {var:.4g}. The paper does not say which it used.")


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
