"""The report section of ``advgen directions``: the paper's figures (Jetley et al., 2018) drawn from its metrics.

``section`` returns Markdown lines and writes PNGs under ``figs``: accuracy vs subspace dimension (Fig. 3 top,
Fig. 4), the fraction of perturbation norms inside the subspaces (Fig. 3 bottom), class-score profiles with
their 30–70 percentile bands (Figs. 1–2), images of the top directions per class (read from the bases folder
the metrics name), confined DeepFool norms (Fig. 5) and the resampling table (Table 1). matplotlib (Agg) is
imported lazily, as in ``advgen.report``; PNGs carry no timestamps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advgen.analysis.directions import CURVATURE_FAMILIES, SVD_FAMILIES
from advgen.report.render import _plt, _save, draw, fmt, rel, table

COLORS = {"pos": "tab:red", "neg": "tab:blue", "negpos": "tab:purple", "flat": "tab:gray",
          "hi": "tab:green", "lo": "tab:orange"}


def _nums(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _dim_axis(ax, label: str) -> None:
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=-0.3)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def figure_accuracy(m: dict, families: dict[str, str], path: Path, title: str, xlabel: str) -> Path:
    """Train (dashed) and test (solid) accuracy on projected images vs d, one colour per family."""
    fig, ax = _plt().subplots(figsize=(5.6, 3.6))
    for fam, label in families.items():
        a = m["accuracy"][fam]
        ax.plot(a["d"], _nums(a["test"]), marker="o", ms=3, color=COLORS[fam], label=f"{label} test")
        ax.plot(a["d"], _nums(a["train"]), ls="--", color=COLORS[fam], alpha=0.7, label=f"{label} train")
    ax.axhline(m["clean_accuracy"]["test"], color="black", lw=0.8, ls=":", label="clean test")
    _dim_axis(ax, xlabel)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def figure_fractions(m: dict, path: Path, title: str) -> Path:
    """Mean ‖Q_dᵀδ‖/‖δ‖ vs d per subspace family, one line per stored variant and for saliency maps."""
    fams = {**CURVATURE_FAMILIES, **SVD_FAMILIES}
    fig, axes = _plt().subplots(2, 3, figsize=(12, 6.4), squeeze=False)
    for ax, (fam, label) in zip(axes.flat, fams.items()):
        for name, e in sorted(m["fractions"].items(), key=lambda kv: (kv[0] == "saliency", kv[0])):
            ax.plot(e[fam]["d"], _nums(e[fam]["fraction"]), marker="o", ms=2.5, label=name,
                    ls="--" if name == "saliency" else "-", color="black" if name == "saliency" else None)
        _dim_axis(ax, "d per class" if fam in CURVATURE_FAMILIES else "d (directions in all)")
        ax.set_ylim(0, 1.02)
        ax.set_title(label, fontsize=9)
    axes[0, 0].set_ylabel("fraction of ‖δ‖₂")
    axes[1, 0].set_ylabel("fraction of ‖δ‖₂")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def figure_profile(name: str, e: dict, path: Path, title: str) -> Path:
    """Figs. 1–2 for one class: rows (individual target-score curves; median target and best non-target
    score with 30–70 percentile bands; transitions), columns (most positive, most negative, flat direction)."""
    fig, axes = _plt().subplots(3, 3, figsize=(12, 8.4), squeeze=False, sharex=True)
    for j, (kind, label) in enumerate((("pos", "most positively curved"), ("neg", "most negatively curved"),
                                       ("flat", "flattest"))):
        pr = e[kind]
        s = np.array(pr["s"])
        ax = axes[0, j]
        for curve in pr["curves"]:
            ax.plot(s, curve, lw=0.8, alpha=0.7)
        ax.set_title(f"{label} (λ = {pr['eigenvalue']:.3g})", fontsize=9)
        ax = axes[1, j]
        for stat, color, lab in (("target", "tab:red", f"F of {name}"), ("other", "tab:blue", "best other F")):
            band = pr[stat]
            ax.fill_between(s, _nums(band["p30"]), _nums(band["p70"]), color=color, alpha=0.25, lw=0)
            ax.plot(s, _nums(band["median"]), color=color, label=f"{lab} (median, 30–70%)")
        ax = axes[2, j]
        ax.plot(s, _nums(pr["into_target"]), color="tab:red", marker="o", ms=2.5, label="non-target → target")
        ax.plot(s, _nums(pr["into_softmax"]), color="tab:orange", label="their median softmax of target")
        ax.plot(s, _nums(pr["stay_target"]), color="black", ls="--", label="target that stays")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("s (L2, pixel units)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("target score, per image")
    axes[1, 0].set_ylabel("class score")
    axes[2, 0].set_ylabel("fraction / softmax")
    axes[1, 0].legend(fontsize=7)
    axes[2, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _as_image(v: np.ndarray, shape: list[int]) -> np.ndarray:
    """A direction (P,) as an (H, W[, 3]) image in [0, 1], 0.5 = no change, symmetric in sign."""
    img = v.reshape(shape)
    img = 0.5 + img / (2 * max(float(np.abs(img).max()), 1e-12))
    return img[0] if shape[0] == 1 else img.transpose(1, 2, 0)


def figure_top_directions(m: dict, vectors: np.ndarray, values: np.ndarray, shape: list[int], path: Path,
                          title: str) -> Path:
    """Per class (rows): the two most positively curved, two most negatively curved and the flattest direction
    (``vectors`` (C, P, 5) in that order), tiled into one image (each tile scaled symmetrically: 0.5 = no change)."""
    classes = m["classes"]
    cols = [(name, j) for j, name in enumerate(("pos 1", "pos 2", "neg 1", "neg 2", "flat"))]
    c, h, w = shape
    gap = max(1, h // 8)
    mosaic = np.ones((len(classes) * (h + gap) - gap, len(cols) * (w + gap) - gap, 3))
    for i in range(len(classes)):
        for j, (_, k) in enumerate(cols):  # vectors (C, P, 5): the picks directions.curvature_picks stored
            tile = _as_image(np.asarray(vectors[i][:, k]), shape)
            if c == 1:
                tile = _plt().get_cmap("RdBu_r")(tile)[..., :3]
            mosaic[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    fig, ax = _plt().subplots(figsize=(1.0 + 0.9 * len(cols), 0.35 + 0.9 * len(classes)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([j * (w + gap) + w / 2 for j in range(len(cols))], [c[0] for c in cols], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([i * (h + gap) + h / 2 for i in range(len(classes))], [n[:14] for n in classes], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=8)
    return _save(fig, path)


def figure_spectra(m: dict, values: np.ndarray, path: Path, title: str) -> Path:
    """Eigenvalues of every class's mean Hessian, in descending order."""
    fig, ax = _plt().subplots(figsize=(5.6, 3.4))
    for c, cname in enumerate(m["classes"]):
        ax.plot(values[c], lw=1, label=cname)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue of the mean Hessian")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def figure_confined(m: dict, path: Path, title: str) -> Path:
    """Fig. 5: mean ‖r‖₂ of DeepFool confined to S_hi / S_lo (blue, log scale) and mean ‖Q_dᵀ(i − ī)‖₂ (red)."""
    fig, axes = _plt().subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, (fam, label) in zip(axes[0], SVD_FAMILIES.items()):
        c = m["confined"][fam]
        ax.plot(c["d"], _nums(c["mean_r_l2"]), color="tab:blue", marker="o", ms=3, label="confined DeepFool ‖r‖₂")
        ax.set_yscale("log")
        ax.set_ylabel("mean ‖r‖₂", color="tab:blue")
        _dim_axis(ax, "d (directions in all)")
        twin = ax.twinx()
        twin.plot(c["d"], _nums(c["projection_l2"]), color="tab:red", marker="s", ms=3, label="image projection")
        twin.set_ylabel("mean ‖Q_dᵀ(i − ī)‖₂", color="tab:red")
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _bases(m: dict) -> tuple[np.ndarray, np.ndarray] | None:
    folder = Path(m.get("bases", {}).get("dir", ""))
    try:
        vec = np.load(folder / "curvature_directions.npy", mmap_mode="r", allow_pickle=False)
        val = np.load(folder / "curvature_eigenvalues.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return vec, val


def section(metrics: dict, *, figs: Path, out: Path, title: str) -> list[str]:
    """Markdown lines of the directions section for one victim; figures go to ``figs``, links are relative
    to ``out`` (the folder of the report)."""
    m, figs = metrics, Path(figs)
    stem = f"{m['dataset']}-{m['victim']['arch']}-directions"
    prm = m["params"]
    md = [f"### {title}", "",
          "After Jetley, Lord & Torr (2018). Projections use the paper's mean-normalised convention: an image "
          "projected onto span(Q) is ī + Q Qᵀ(i − ī), with ī the mean training image. Projected and perturbed "
          "images are fed to the victim as they are, even outside [0, 1].", ""]
    shape = [int(s) for s in _shape(m)]
    found = findings(m)
    if found:
        md += ["#### What it shows, beside the paper's findings", "", *found, ""]

    fig = draw(figure_accuracy, m, CURVATURE_FAMILIES, figs / f"{stem}-accuracy.png",
                          f"{m['victim']['arch']}: accuracy on images projected onto curvature subspaces",
                          "d (directions per class)")
    md += ["#### Accuracy vs curvature subspace (Fig. 3, top)", "",
           "Train and test accuracy on images projected onto the d most positively curved (S_pos), most "
           "negatively curved (S_neg), both (S_neg∪pos) or flattest (S_flat) directions of every class "
           "(orthonormalised by QR); the last point spans the whole input space.", "",
           f"![accuracy vs curvature subspace]({rel(fig, out)})", ""]
    fig = draw(figure_fractions, m, figs / f"{stem}-fractions.png",
                           f"{m['victim']['arch']}: share of each perturbation's norm inside the subspaces")
    md += ["#### Where adversaries live (Fig. 3, bottom)", "",
           "Mean fraction ‖Q_dᵀδ‖₂/‖δ‖₂ of every stored variant's perturbation and of saliency maps "
           "(∇ of the true class score) inside each subspace.", "",
           f"![fraction of perturbation norms]({rel(fig, out)})", ""]

    loaded = _bases(m)
    if loaded is not None:
        vec, val = loaded
        fig = draw(figure_top_directions, m, vec, val, shape, figs / f"{stem}-top-directions.png",
                                    f"{m['victim']['arch']}: curvature directions per class (red +, blue −)")
        spec = draw(figure_spectra, m, val, figs / f"{stem}-spectra.png", f"{m['victim']['arch']}: mean-Hessian spectra")
        md += ["#### The directions (Alg. 1)", "", f"![top directions per class]({rel(fig, out)})",
               f"![eigenvalue spectra]({rel(spec, out)})", ""]
    else:
        md += ["#### The directions (Alg. 1)", "", f"(bases folder `{m.get('bases', {}).get('dir')}` not found: "
               "no direction images)", ""]

    md += ["#### Class scores along single directions (Figs. 1–2)", "",
           "F(i + s·v) along a class's most positively curved, most negatively curved and flattest direction, "
           f"from {m['images']['profile']} test images: individual target-score curves, the median target and best "
           "non-target scores with their 30–70 percentile bands, and the fraction of images not predicted as the "
           "target at s = 0 that are predicted as it at s (with their median softmax target score), beside the "
           "fraction of target images that stay.", ""]
    for cname, e in m["profiles"].items():
        slug = "".join(ch if ch.isalnum() else "_" for ch in cname)
        fig = draw(figure_profile, cname, e, figs / f"{stem}-profile-{slug}.png",
                             f"{m['victim']['arch']}: target class {cname} ({e['points']} boundary points)")
        md += [f"![profiles of {cname}]({rel(fig, out)})", ""]

    fig = draw(figure_accuracy, m, SVD_FAMILIES, figs / f"{stem}-svd-accuracy.png",
                          f"{m['victim']['arch']}: accuracy on images projected onto DeepFool SVD subspaces",
                          "d (directions in all)")
    md += ["#### Gradient directions (Fig. 4)", "",
           f"Singular vectors of {m['images']['svd']} stacked DeepFool perturbations (from `{m['deepfool']['folder']}`"
           f", {m['deepfool']['svd_split']} split, {'float' if m['deepfool']['float'] else 'stored uint8'} images), "
           "high to low (S_hi) and low to high (S_lo).", "",
           f"![accuracy vs SVD subspace]({rel(fig, out)})", ""]
    fig = draw(figure_confined, m, figs / f"{stem}-confined.png",
                          f"{m['victim']['arch']}: DeepFool confined to the SVD subspaces")
    md += ["#### Confined DeepFool (Fig. 5)", "",
           f"DeepFool with its gradients projected onto S_hi / S_lo before each linearized step, on "
           f"{m['images']['confined']} test images (mean ‖r‖₂ over the images it fooled), beside the mean norm of "
           "the images' projections onto the same subspaces.", "",
           f"![confined DeepFool]({rel(fig, out)})", ""]

    rs = m["resampling"]
    factors = rs["factors"]
    md += ["#### Resampling, re-examined (Table 1, §4.4)", "",
           f"Bicubic down-sampling to each size and back to {rs['side']} px before the victim. Norms are measured "
           "in the up-sampled space; the fooling rate counts the DeepFool-attacked test images whose prediction "
           "changes when their perturbation, scaled by f, passes through the resampling unit.", "",
           table(["size", "accuracy", "mean ‖i‖₂", "mean ‖δi‖₂"] + [f"fooling f={f}" for f in factors],
                 [[r["size"], r["accuracy"], r["mean_image_l2"], r["mean_delta_l2"]]
                  + [r["fooling_rate"].get(f) for f in factors] for r in rs["rows"]]),
           "The direct attacks on the resampled network: DeepFool through the resampling unit, and DeepFool "
           "confined to the span of the up-sampled singular vectors of the down-sampled DeepFool perturbations.", "",
           table(["size", "DeepFool ‖r‖₂", "fooled", "basis rank", "confined ‖r‖₂", "fooled"],
                 [[r["size"], r["deepfool_mean_r_l2"], r["deepfool_success"], r["basis_rank"],
                   r["confined_mean_r_l2"], r["confined_success"]] for r in rs["direct"]])]

    hs = m["hessian"]
    points = [e["points"] for e in hs["per_class"].values()]
    md += ["#### How this was computed", "",
           f"Curvature: the mean Hessian of F_c − F_ĉ at targeted-DeepFool boundary points (overshoot 0) of "
           f"{prm['curvature_images']} training images per class not predicted as c ({min(points)}–{max(points)} "
           f"converged), estimated by {hs['estimator']}, at h = {hs['fd_scale']:g} (pixel units of [0, 1] "
           "images): a ReLU network's exact Hessian is zero almost everywhere, while differences at scale h see "
           "the curvature the piecewise-linear function has at that scale (for a quadratic the estimate is exact). "
           f"Scaled down from the paper for a small machine: {prm['curvature_images']} boundary points per class "
           f"(the paper: every image not of the class), {m['images']['train']} training and {m['images']['test']} "
           f"test images for the accuracies and fractions, {m['images']['profile']} images per profile and "
           f"{len(m['profiles'])} profiled class(es), {m['images']['confined']} images for confined and direct "
           f"DeepFool, at most {prm['svd_images']} perturbations in the SVD, and d grids of "
           f"{len(m['accuracy']['pos']['d'])} (curvature) and {len(m['accuracy']['hi']['d'])} (SVD) points. "
           f"The run took {fmt(m.get('seconds'))} s on {m.get('device')}.", ""]
    return md


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def findings(m: dict) -> list[str]:
    """One sentence per claim of the paper, each with this run's numbers beside it (Markdown bullet lines).

    The paper's claims (Jetley et al., §4): a few strongly curved directions per class carry the classification
    while the far more numerous flat ones carry next to none; adversarial perturbations lie mostly in those same
    directions; DeepFool confined to the directions its perturbations avoid needs far larger norms; and
    resampling only seems to defend, since δ scaled by a small factor, or an attack on the resampled network,
    fools it again.
    """
    out: list[str] = []
    acc, clean, c, p = m["accuracy"], m["clean_accuracy"]["test"], m["num_classes"], m["input_dim"]
    negpos, flat = acc["negpos"], acc["flat"]
    inner = [i for i, d in enumerate(negpos["d"]) if 0 < negpos["rank"][i] < p]
    if inner and clean:
        reach = [i for i in inner if negpos["test"][i] is not None and negpos["test"][i] >= 0.9 * clean]
        i = reach[0] if reach else inner[-1]
        d, rank = negpos["d"][i], negpos["rank"][i]
        j = flat["d"].index(d) if d in flat["d"] else None
        fl = flat["test"][j] if j is not None else None
        out.append(
            f"- **Few curved directions classify, flat ones do not** (Fig. 3 top). With d = {d} most positively and "
            f"{d} most negatively curved directions per class ({rank} of {p} dimensions) the test accuracy is "
            f"{_pct(negpos['test'][i])} against {_pct(clean)} on clean images"
            + (f"; the {d} flattest per class give {_pct(fl)} (chance: {_pct(1 / c)})" if fl is not None else "")
            + (". As in the paper." if reach and rank <= p / 4 and fl is not None and fl < 0.5 * clean else
               (f". The paper needs only a few directions per class; here 90% of the clean accuracy takes "
                f"{_pct(rank / p)} of the input space" if reach else
                ". Below 90% of the clean accuracy at every d short of the whole space, unlike the paper")
               + f" (its mean Hessian averages every image of the other classes, this one "
                 f"{m['params']['curvature_images']} per class)."))
    fr = m["fractions"]
    fool = next((k for k in fr if k.split("@")[0] == "deepfool"), None)
    if fool is not None and inner:
        i = inner[0]
        d, rank = negpos["d"][i], negpos["rank"][i]
        got = fr[fool]["negpos"]["fraction"][i]
        fl = fr[fool]["flat"]["fraction"][fr[fool]["flat"]["d"].index(d)] if d in fr[fool]["flat"]["d"] else None
        random = (rank / p) ** 0.5
        sal = fr.get("saliency", {}).get("negpos", {}).get("fraction", [None] * (i + 1))[i]
        out.append(
            f"- **Adversaries live in the curved directions** (Fig. 3 bottom). {got and _pct(got)} of DeepFool's "
            f"‖δ‖₂ lies in S_neg∪pos at d = {d} per class ({rank} dimensions), against {_pct(random)} for a random "
            f"direction" + (f" and {_pct(fl)} in the same number of flattest directions" if fl is not None else "")
            + (f"; saliency maps: {_pct(sal)}" if sal is not None else "") + "."
            + (" As in the paper." if got is not None and got > 2 * random else " Weaker than the paper's finding."))
    conf = m["confined"]
    both = [k for k, d in enumerate(conf["hi"]["d"])
            if d < p and conf["hi"]["mean_r_l2"][k] and conf["lo"]["mean_r_l2"][k]]
    if both:
        k = both[0]
        hi, lo = conf["hi"]["mean_r_l2"][k], conf["lo"]["mean_r_l2"][k]
        out.append(
            f"- **Confined DeepFool** (Fig. 5). In the top {conf['hi']['d'][k]} singular directions of DeepFool's "
            f"perturbations it needs ‖r‖₂ = {fmt(hi)}, in the bottom {conf['lo']['d'][k]} {fmt(lo)} ({lo / hi:.1f}×; "
            f"unconfined: {fmt(conf['hi']['mean_r_l2'][-1])})."
            + (" As in the paper: the low directions are far from the boundary." if lo > 3 * hi else ""))
    rows = [r for r in m["resampling"]["rows"] if r["size"] != m["resampling"]["side"]]
    if rows:
        r = rows[-1]
        rates = r["fooling_rate"]
        f1 = rates.get("1")
        fmax = max(((float(f), v) for f, v in rates.items() if v is not None), default=None)
        direct = next((x for x in m["resampling"]["direct"] if x["size"] == r["size"]), None)
        line = (f"- **Resampling only seems to defend** (Table 1, §4.4). Behind resampling to {r['size']} px the "
                f"DeepFool copy fools {_pct(f1)} of the images it attacked")
        if fmax is not None:
            line += f"; with δ scaled by {fmax[0]:g}, {_pct(fmax[1])}"
        if direct is not None:
            line += (f"; DeepFool on the resampled network fools {_pct(direct['deepfool_success'])} with mean "
                     f"‖r‖₂ {fmt(direct['deepfool_mean_r_l2'])}")
        out.append(line + ".")
    return out


def _shape(m: dict) -> list[int]:
    """(C, H, W) of the victim's inputs: from the bases' mean image entry, else a square guess from P."""
    files = m.get("bases", {}).get("files", {})
    if "mean_image.npy" in files:
        return files["mean_image.npy"]["shape"]
    p = m["input_dim"]
    for c in (1, 3):
        side = int(round((p / c) ** 0.5))
        if c * side * side == p:
            return [c, side, side]
    return [1, 1, p]
