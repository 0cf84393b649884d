"""Class-score directions of a victim: Jetley, Lord & Torr (2018), "With friends like these, who needs adversaries?".

The paper's whole analysis on one victim, its clean data and its stored variants:

* curvature directions (Alg. 1): per target class c, the mean Hessian of F_c − F_ĉ at targeted-DeepFool
  boundary points of images not classified as c, and its eigenvectors (``curvature_directions``);
* gradient directions (Fig. 4): the SVD of stacked DeepFool perturbations (``gradient_directions``);
* accuracy on images projected onto subspaces of growing dimension (Fig. 3 top, Fig. 4; ``accuracy_vs_dims``);
* the fraction of a perturbation's norm inside those subspaces (Fig. 3 bottom; ``norm_fractions``);
* class scores along single directions (Figs. 1–2; ``class_profile``);
* DeepFool confined to a subspace (Fig. 5; ``confined_norms``);
* resampling before the victim, transferred and direct attacks (Table 1, §4.4; ``resampling_rows``,
  ``direct_attack_rows``).

Conventions. Images are float tensors (N, C, H, W) in pixel units ([0, 1] for natural images); P = C·H·W.
A basis is a (P, k) matrix with orthonormal columns; "d" in a family's grid counts directions per class
(curvature families) or in all (SVD families). Projections follow the paper's mean-normalised convention:
with ī the mean training image, the projection of i onto span(Q) is ī + Q Qᵀ (i − ī). Projected and
perturbed images may leave [0, 1]; they are fed to the model as they are (no clipping), since they are
probes of the function the network computes, not images to store.

Hessians. A ReLU network's logits are piecewise linear, so autograd's exact Hessian is zero almost
everywhere. ``mean_hessian`` instead uses central finite differences of input gradients at a chosen scale
h (pixel units): H v ≈ (∇g(x + h v) − ∇g(x − h v)) / 2h, for every pixel-basis vector v, batched over
(points × probes), averaged over the points and symmetrized; exact for a quadratic, the smoothed curvature
at scale h for a piecewise-linear net. Eigen-decompositions run in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from advgen.analysis.curvature import (  # noqa: F401 - re-exported: advgen.analysis.directions.NAME as before
    Curvature, PICKS, Sketch, boundary_points, curvature_directions, curvature_picks, family_columns, family_order,
    family_stack, grouped_hvp, held_ranks, mean_hessian, mean_hvp, pick_ranks, rayleigh_ritz, sketch_eigh,
    sketch_eighs,
)
from advgen.analysis.linalg import (  # noqa: F401 - re-exported: advgen.analysis.directions.NAME as before
    CURVATURE_FAMILIES, Family, RANK_TOL, SVD_FAMILIES, accuracy, logits_of, orthonormal_prefixes, pick, rank_at,
    read_floats, resample_linear,
)
from advgen.analysis.subspaces import (  # noqa: F401 - re-exported: advgen.analysis.directions.NAME as before
    Profile, accuracy_vs_dims, class_profile, confined_norms, deepfool_norms, deepfool_perturbations,
    direct_attack_rows, downsampled_basis, gradient_directions, norm_fractions, projection_norms, resampling_rows,
    saliency,
)


# --- the whole analysis ------------------------------------------------------------------------------

HESSIAN_ESTIMATOR = ("central finite differences of input gradients, H·e_j ≈ (∇g(x + h·e_j) − ∇g(x − h·e_j)) / 2h "
                     "for every pixel-basis vector e_j, averaged over the boundary points and symmetrized")
SKETCH_ESTIMATOR = ("central finite differences of input gradients along unit probes, H·v ≈ (∇g(x + h·v) − "
                    "∇g(x − h·v)) / 2h, averaged over the boundary points; a randomized range finder on {k} Gaussian "
                    "probes and a Rayleigh–Ritz step on {k} more (Halko et al., 2011), the rest of the space flat")


@dataclass(frozen=True)
class Settings:
    """What ``analyze`` computes and how much of it (the stage's options; see ``advgen directions --help``)."""

    per_class: int = 4  # boundary points per target class (Alg. 1 averages over every image not of the class)
    fd_scale: float = 0.25  # h of the finite-difference Hessian, pixel units
    probes: int = 0  # 0: the whole Hessian (P products per point); k: a rank-k sketch (2k products per point)
    dims: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)  # per class, curvature families; the full space is added
    svd_dims: tuple[int, ...] = (0, 4, 9, 16, 32, 64, 128, 256)  # in all, S_hi / S_lo; the full space is added
    profile_classes: int = 3
    profile_images: int = 200
    s_values: tuple[float, ...] = tuple(float(v) for v in np.linspace(-10, 10, 21))
    curves: int = 12  # individual curves kept per profile (Fig. 1)
    confined_images: int = 50
    resample_sizes: tuple[int, ...] = (24, 20, 16, 12)  # the identity (full size) row is added
    factors: tuple[float, ...] = (1, 2, 3, 4, 5, 10)
    candidates: int = 10
    overshoot: float = 0.02
    max_iter: int = 50
    batch_size: int = 256
    seed: int = 0


@dataclass
class Inputs:
    """Everything ``analyze`` looks at, already on the device, float images (N, C, H, W).

    train / test: (images, labels) subsets; mean: ī (C, H, W) over the whole training split; perturbations:
    {name: δ (M, C, H, W)} of the stored variants (any images); svd_deltas: DeepFool perturbations stacked
    for the gradient basis (nonzero rows); table: (images, labels, DeepFool δ of those images) for Table 1.
    """

    model: nn.Module
    classes: list[str]
    mean: Tensor
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    perturbations: dict[str, Tensor]
    svd_deltas: Tensor
    table: tuple[Tensor, Tensor, Tensor]


@dataclass
class Analysis:
    metrics: dict  # JSON-able results (layout: ``analyze``)
    bases: dict[str, np.ndarray]  # file stem -> float32 array
    tables: dict[str, tuple[list[str], list[dict]]]  # plot table name -> (columns, rows)


def _grid(values: Sequence[int], full: int) -> list[int]:
    return sorted({int(v) for v in values} | {full})


def analyze(inp: Inputs, st: Settings, *, log: Callable[[str], None] = lambda m: None,
            clock: Callable[[], float] | None = None) -> Analysis:
    """Run the paper's analysis (module docstring) on ``inp`` with ``st``; ``clock`` times the parts.

    Grids: ``st.dims`` (per class) and ``st.svd_dims`` (in all), each with the full space added. Metrics
    (lists run along the grid ``d`` beside them)::

        input_dim, num_classes, classes, images {train, test, profile, confined, table, svd},
        clean_accuracy {train, test}, mean_image_l2,
        hessian {estimator, fd_scale, probes, points_requested, precision,
                 per_class {class: {points, mean_r_l2, top (3 largest λ), bottom (3 smallest)}}},
        svd {singular_values (the first 4C), rank},
        accuracy {pos|neg|negpos|flat|hi|lo: {d, rank, train, test}},
        fractions {variant name | saliency: {kind, images, pos|…|lo: {d, fraction}}},
        profiles {class: {class, points, pos|neg|flat: {eigenvalue, rank, s, target {p30, median, p70},
                  other {p30, median, p70}, into_target, into_softmax, stay_target, curves}}},
        confined {images, hi|lo: {d, mean_r_l2, converged, projection_l2}},
        resampling {side, factors, rows [{size, accuracy, mean_image_l2, mean_delta_l2, attacked,
                    fooling_rate {f: rate}}], direct [{size, basis_rank, deepfool_mean_r_l2, deepfool_success,
                    confined_mean_r_l2, confined_success}]},
        timings {curvature, svd, accuracy, fractions, profiles, confined, resampling}  (seconds)
    """
    clock = clock or time.perf_counter
    model, classes = inp.model, inp.classes
    xtr, ytr = inp.train
    xte, yte = inp.test
    num_classes, p = len(classes), math.prod(xtr.shape[1:])
    bs = st.batch_size
    timings: dict[str, float] = {}
    gen = torch.Generator().manual_seed(st.seed)

    def timed(name: str, t0: float) -> None:
        timings[name] = round(clock() - t0, 3)

    full_c = -(-p // num_classes)
    dims, svd_dims = _grid(st.dims, full_c), _grid(st.svd_dims, p)

    t0 = clock()
    pred_tr = logits_of(model, xtr, batch_size=bs).argmax(1)
    sketch = 0 < st.probes < p
    log(f"curvature: {st.per_class} boundary point(s) per class, finite-difference Hessians at h = {st.fd_scale:g}"
        + (f", rank-{st.probes} sketches" if sketch else ""))
    curv = curvature_directions(model, xtr, pred_tr, num_classes, per_class=st.per_class, h=st.fd_scale,
                                generator=gen, probes=st.probes, keep=min(p, max(2, max(dims))), max_iter=st.max_iter,
                                batch_size=bs,
                                on_class=lambda c: log(f"curvature: class {c + 1}/{num_classes} done"))
    timed("curvature", t0)

    t0 = clock()
    svd_vec, svd_val = gradient_directions(inp.svd_deltas)
    timed("svd", t0)

    # Bases per family, as prefixes of one orthonormal matrix each; ranks per grid point.
    bases: dict[str, tuple[Tensor, list[int], list[int]]] = {}
    for fam in CURVATURE_FAMILIES:
        cols = min(family_columns(fam, max(dims), num_classes), p * num_classes * (2 if fam == "negpos" else 1))
        q, kept = orthonormal_prefixes(family_stack(curv, fam, cols))  # type: ignore[arg-type]
        bases[fam] = (q, dims, [rank_at(kept, family_columns(fam, d, num_classes)) for d in dims])
    bases["hi"] = (svd_vec, svd_dims, svd_dims)
    bases["lo"] = (svd_vec.flip(1), svd_dims, svd_dims)

    t0 = clock()
    acc: dict[str, dict] = {}
    for fam, (q, grid, ranks) in bases.items():
        log(f"accuracy: {fam} ({len(grid)} dimensions)")
        acc[fam] = {"d": grid, "rank": ranks,
                    "train": accuracy_vs_dims(model, xtr, ytr, inp.mean, q, ranks, batch_size=bs),
                    "test": accuracy_vs_dims(model, xte, yte, inp.mean, q, ranks, batch_size=bs)}
    timed("accuracy", t0)

    t0 = clock()
    deltas = dict(inp.perturbations)
    deltas["saliency"] = saliency(model, xte, yte, batch_size=bs)
    fractions: dict[str, dict] = {}
    for name, delta in deltas.items():
        entry: dict = {"kind": "saliency" if name == "saliency" else "variant"}
        for fam, (q, grid, ranks) in bases.items():
            values, used = norm_fractions(delta, q, ranks)
            entry[fam] = {"d": grid, "fraction": values}
            entry["images"] = used
        fractions[name] = entry
    timed("fractions", t0)

    t0 = clock()
    chosen = sorted(pick(num_classes, st.profile_classes, gen).tolist())
    xp = xte[: st.profile_images]
    profiles: dict[str, dict] = {}
    for c in chosen:
        lam = curv.eigenvalues[c]
        picks = {"pos": 0, "neg": p - 1, "flat": int(lam.abs().argmin())}
        entry = {"class": c, "points": curv.points[c]}
        for kind, k in picks.items():
            prof = class_profile(model, xp, curv.vectors(c, torch.tensor([k]))[:, 0], c, st.s_values, curves=st.curves,
                                 batch_size=bs)
            entry[kind] = {"eigenvalue": float(lam[k]), "rank": k, "s": prof.s,
                           "target": dict(zip(("p30", "median", "p70"), prof.target)),
                           "other": dict(zip(("p30", "median", "p70"), prof.other)),
                           "into_target": prof.into_target, "into_softmax": prof.into_softmax,
                           "stay_target": prof.stay_target, "curves": prof.curves}
        profiles[classes[c]] = entry
        log(f"profiles: {classes[c]} done")
    timed("profiles", t0)

    t0 = clock()
    xc = xte[: st.confined_images]
    conf_dims = [d for d in svd_dims if d > 0]
    confined: dict[str, dict] = {"images": len(xc)}
    for fam in SVD_FAMILIES:
        q = bases[fam][0]
        means, rates = confined_norms(model, xc, q, conf_dims, candidates=st.candidates, overshoot=st.overshoot,
                                      max_iter=st.max_iter, batch_size=bs)
        confined[fam] = {"d": conf_dims, "mean_r_l2": means, "converged": rates,
                         "projection_l2": projection_norms(xc, inp.mean, q, conf_dims)}
        log(f"confined DeepFool: {fam} done")
    timed("confined", t0)

    t0 = clock()
    side = xtr.shape[2]
    sizes = [side] + [s for s in dict.fromkeys(st.resample_sizes) if s != side]
    tx, ty, tdelta = inp.table
    rows = resampling_rows(model, tx, ty, tdelta, sizes, st.factors, batch_size=bs)
    direct = direct_attack_rows(model, xc, inp.svd_deltas, sizes, candidates=st.candidates, overshoot=st.overshoot,
                                max_iter=st.max_iter, batch_size=bs)
    timed("resampling", t0)

    with torch.no_grad():
        clean = {"train": accuracy(model, xtr, ytr, batch_size=bs), "test": accuracy(model, xte, yte, batch_size=bs)}
    metrics = {
        "input_dim": p, "num_classes": num_classes, "classes": list(classes),
        "images": {"train": len(xtr), "test": len(xte), "profile": len(xp), "confined": len(xc),
                   "table": len(tx), "svd": len(inp.svd_deltas)},
        "clean_accuracy": clean,
        "mean_image_l2": float(inp.mean.double().norm()),
        "hessian": {"estimator": SKETCH_ESTIMATOR.format(k=st.probes) if sketch else HESSIAN_ESTIMATOR,
                    "fd_scale": st.fd_scale, "probes": 2 * st.probes if sketch else p,
                    "rank": st.probes if sketch else p,
                    "points_requested": st.per_class, "precision": "float32 gradients, float64 sums and eigh",
                    "per_class": {classes[c]: {"points": curv.points[c], "mean_r_l2": curv.mean_r_l2[c],
                                               "top": curv.eigenvalues[c][:3].tolist(),
                                               "bottom": curv.eigenvalues[c][-3:].tolist()}
                                  for c in range(num_classes)}},
        "svd": {"singular_values": svd_val[: min(p, 4 * num_classes)].tolist(),
                "rank": int((svd_val > 1e-6 * svd_val[0].clamp_min(1e-300)).sum())},
        "accuracy": acc, "fractions": fractions, "profiles": profiles, "confined": confined,
        "resampling": {"side": side, "factors": [f"{f:g}" for f in st.factors], "rows": rows, "direct": direct},
        "timings": timings,
    }
    arrays = {"mean_image": inp.mean.cpu().float().numpy(),
              "curvature_eigenvalues": curv.eigenvalues.float().numpy(),
              # Per class only the five directions the report draws (the two most positively and most negatively
              # curved, and the flattest): every eigenvector of every class would be classes·P² floats (3.8 GB
              # for CIFAR-100); the family bases below hold every direction the subspaces use.
              "curvature_directions": curvature_picks(curv).numpy(),
              "svd_basis": svd_vec.cpu().float().numpy(), "svd_values": svd_val.cpu().float().numpy()}
    for fam in CURVATURE_FAMILIES:
        arrays[f"family_{fam}"] = bases[fam][0].cpu().float().numpy()
    return Analysis(metrics=json_ready(metrics), bases=arrays, tables=plot_tables(metrics, curv.eigenvalues))


def json_ready(obj: object) -> object:
    """``obj`` with nan/inf floats as None (JSON has no nan), tuples as lists."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


PLOT_COLUMNS = {
    "directions_accuracy": ["series", "family", "split", "d", "rank", "accuracy"],
    "directions_svd_accuracy": ["series", "family", "split", "d", "accuracy"],
    "directions_fraction": ["series", "perturbation", "family", "d", "fraction"],
    "directions_svd_fraction": ["series", "perturbation", "family", "d", "fraction"],
    "directions_profiles": ["series", "class", "direction", "statistic", "s", "score"],
    "directions_transition": ["series", "class", "direction", "statistic", "s", "fraction"],
    "directions_confined": ["series", "family", "quantity", "d", "l2"],
    "directions_resampling": ["series", "size", "f", "fooling_rate"],
    "directions_direct": ["series", "attack", "size", "mean_r_l2", "success"],
    "directions_eigenvalues": ["series", "class", "rank", "eigenvalue"],
}


def plot_tables(m: dict, eigenvalues: Tensor | None = None) -> dict[str, tuple[list[str], list[dict]]]:
    """Rows of the DVC plot tables (``series`` + x + y columns) from the metrics ``analyze`` builds, and the
    curvature spectra (C, P) when given."""
    t: dict[str, list[dict]] = {k: [] for k in PLOT_COLUMNS}
    if eigenvalues is not None:
        for c, lam in enumerate(eigenvalues.tolist()):
            t["directions_eigenvalues"] += [{"series": m["classes"][c], "class": m["classes"][c], "rank": k,
                                             "eigenvalue": v} for k, v in enumerate(lam)]
    for fam, a in m["accuracy"].items():
        svd = fam in SVD_FAMILIES
        label = SVD_FAMILIES.get(fam) or CURVATURE_FAMILIES[fam]
        for split in ("train", "test"):
            for d, r, v in zip(a["d"], a["rank"], a[split]):
                t["directions_svd_accuracy" if svd else "directions_accuracy"].append(
                    {"series": f"{label} {split}", "family": label, "split": split, "d": d, "rank": r, "accuracy": v})
    for name, e in m["fractions"].items():
        for fam in (*CURVATURE_FAMILIES, *SVD_FAMILIES):
            label = SVD_FAMILIES.get(fam) or CURVATURE_FAMILIES[fam]
            table = "directions_svd_fraction" if fam in SVD_FAMILIES else "directions_fraction"
            for d, v in zip(e[fam]["d"], e[fam]["fraction"]):
                t[table].append({"series": f"{name}: {label}", "perturbation": name, "family": label, "d": d,
                                 "fraction": v})
    for cname, e in m["profiles"].items():
        for kind in ("pos", "neg", "flat"):
            pr = e[kind]
            for stat in ("target", "other"):
                for q in ("p30", "median", "p70"):
                    for s, v in zip(pr["s"], pr[stat][q]):
                        t["directions_profiles"].append({"series": f"{cname} {kind}: {stat} {q}", "class": cname,
                                                         "direction": kind, "statistic": f"{stat} {q}", "s": s,
                                                         "score": v})
            for stat in ("into_target", "into_softmax", "stay_target"):
                for s, v in zip(pr["s"], pr[stat]):
                    t["directions_transition"].append({"series": f"{cname} {kind}: {stat}", "class": cname,
                                                       "direction": kind, "statistic": stat, "s": s, "fraction": v})
    for fam in SVD_FAMILIES:
        c = m["confined"][fam]
        for qty, key in (("confined DeepFool", "mean_r_l2"), ("image projection", "projection_l2")):
            for d, v in zip(c["d"], c[key]):
                t["directions_confined"].append({"series": f"{SVD_FAMILIES[fam]}: {qty}", "family": SVD_FAMILIES[fam],
                                                 "quantity": qty, "d": d, "l2": v})
    for row in m["resampling"]["rows"]:
        for f, v in row["fooling_rate"].items():
            t["directions_resampling"].append({"series": f"size {row['size']}", "size": row["size"], "f": float(f),
                                               "fooling_rate": v})
    for row in m["resampling"]["direct"]:
        for attack, label in (("deepfool", "DeepFool through the resampling"),
                              ("confined", "DeepFool confined to the down-sampled SVD basis")):
            t["directions_direct"].append({"series": label, "attack": attack, "size": row["size"],
                                           "mean_r_l2": row[f"{attack}_mean_r_l2"],
                                           "success": row[f"{attack}_success"]})
    return {k: (PLOT_COLUMNS[k], rows) for k, rows in t.items()}
