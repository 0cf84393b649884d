"""White-box tables of the report: stored and float side by side, rounding, confidence buckets, FGM's scale."""

from __future__ import annotations

from pathlib import Path

from advgen.report.render import fmt, rel


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
