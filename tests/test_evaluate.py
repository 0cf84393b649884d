"""``advgen evaluate`` end to end, checked against figures computed by hand from the stored files.

The shards are read here with ``tarfile`` and Pillow and the manifests with
pyarrow, never through advgen's own readers; SSIM is recomputed with
``scipy.ndimage``. The victim is trained for one epoch only, so it makes
clean mistakes and the cooperative figures (negatives, error-rate reduction)
are not trivially zero.
"""

from __future__ import annotations

import csv
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import read_split_by_hand as read_split
from conftest import tiny_clean
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from advgen.evaluation.whitebox import curve_rows
from advgen.stages.cli import app

runner = CliRunner()
EPS = ("0.01", "0.1")
VARIANTS = [f"{m}/eps={e}" for m in ("d_fgsm", "fgsm") for e in EPS] + ["deepfool"]


# --- independent readers --------------------------------------------------------------------------

def read_manifest(folder: Path, split: str) -> dict[str, list]:
    """The concatenated ``split-*.parquet`` manifests of ``folder`` as plain Python lists."""
    out: dict[str, list] = {}
    for path in sorted(folder.glob(f"{split}-*.parquet")):
        for k, v in pq.read_table(path).to_pydict().items():
            out.setdefault(k, []).extend(v)
    return out


def ssim_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 SSIM of two (H, W, C) images in [0, 1]: 11x11 Gaussian (σ 1.5), valid positions only."""
    c1, c2 = 0.01**2, 0.03**2

    def g(t):  # truncate 3.5·σ gives radius 5, an 11-tap window; crop the 5-pixel border = 'valid'
        return gaussian_filter(t, 1.5, truncate=3.5, mode="reflect")[5:-5, 5:-5]

    maps = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        mx, my = g(x), g(y)
        vx, vy, cov = g(x * x) - mx**2, g(y * y) - my**2, g(x * y) - mx * my
        maps.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(maps))


def rate(mask: np.ndarray) -> float | None:
    return float(np.mean(mask)) if mask.size else None


# --- fixture --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """root/clean (mnist 48 + 24, shards of 8), root/victim.pt (1 epoch), root/adv (fgsm, d_fgsm × 2 ε, deepfool)."""
    root = tmp_path_factory.mktemp("evaluate")
    tiny_clean(root)
    trained = runner.invoke(app, ["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(root / "clean"),
                                  "--out", str(root / "victim.pt"), "--metrics", str(root / "train.json"),
                                  "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    eps_args = [a for e in EPS for a in ("--eps", e)]
    generated = runner.invoke(app, ["generate", "--victim-ckpt", str(root / "victim.pt"), "--clean", str(root / "clean"),
                                    "--out", str(root / "adv"), "--method", "fgsm,d_fgsm,deepfool", *eps_args,
                                    "--candidates", "4", "--max-iter", "10", "--device", "cpu", "--workers", "0"])
    assert generated.exit_code == 0, generated.output
    return root


def _evaluate(root: Path, out: Path, *extra: str, adv: Path | None = None, clean: Path | None = None):
    return runner.invoke(app, ["evaluate", "--adv", str(adv or root / "adv"), "--clean", str(clean or root / "clean"),
                               "--metrics", str(out / "metrics.json"), "--plots", str(out / "plots"),
                               "--samples", str(out / "samples.parquet"), *extra])


@pytest.fixture(scope="module")
def thresholds(data) -> tuple[float, float]:
    """Confidence thresholds that split the test images into three non-empty buckets.

    The low one is exactly a stored clean_conf (float32, written as its shortest repr), so that
    sample sits on the boundary and must land in "medium": lower bounds are inclusive.
    """
    conf = np.sort(np.array(read_manifest(data / "adv" / "fgsm" / "eps=0.1", "test")["clean_conf"], np.float64))
    n = len(conf)
    assert conf[n // 3 - 1] < conf[n // 3] and conf[2 * n // 3 - 1] < conf[2 * n // 3]
    return float(conf[n // 3]), float((conf[2 * n // 3 - 1] + conf[2 * n // 3]) / 2)


@pytest.fixture(scope="module")
def evaluated(data, thresholds, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluated")
    thresholds = [a for t in thresholds for a in ("--thresholds", repr(t))]
    result = _evaluate(data, out, "--victim-ckpt", str(data / "victim.pt"), *thresholds)
    assert result.exit_code == 0, result.output
    return out


@functools.cache
def _hand(data: Path, variant: str, split: str, thresholds: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Every figure evaluate reports for one split of one variant, from the stored files."""
    keys0, x0, y0 = read_split(data / "clean", split)
    keys, x, y = read_split(data / "adv" / variant, split)
    man = read_manifest(data / "adv" / variant, split)
    assert keys == keys0 == man["key"] and (y == y0).all() and (np.array(man["label"]) == y).all()
    clean_pred, adv_pred = np.array(man["clean_pred"]), np.array(man["adv_pred"])
    conf = np.array(man["clean_conf"], dtype=np.float64)
    ok, clean_ok = adv_pred == y, clean_pred == y
    top5 = np.array([label in row for label, row in zip(y, man["adv_top5"])])
    clean_top5 = np.array([label in row for label, row in zip(y, man["clean_top5"])])
    a, b = x0.astype(np.float64) / 255, x.astype(np.float64) / 255
    mse = ((b - a) ** 2).reshape(len(y), -1).mean(axis=1)
    bucket = np.where(conf < thresholds[0], 0, np.where(conf < thresholds[1], 1, 2))
    out = {
        "count": len(y), "accuracy": rate(ok), "clean_accuracy": rate(clean_ok),
        "top5_accuracy": rate(top5), "clean_top5_accuracy": rate(clean_top5),
        "ok": ok, "clean_ok": clean_ok, "bucket": bucket,
        "buckets": {name: {"count": int((bucket == i).sum()), "error": rate(~ok[bucket == i]),
                           "clean_error": rate(~clean_ok[bucket == i]), "top5_error": rate(~top5[bucket == i])}
                    for i, name in enumerate(("low", "medium", "high"))},
        "mean_psnr": float(np.mean(10 * np.log10(1 / mse[mse > 0]))), "unchanged": int((mse == 0).sum()),
        "mean_linf": float(np.abs(b - a).reshape(len(y), -1).max(axis=1).mean()),
        "mse": mse, "pixels": a[0].size,
        "ssim": np.array([ssim_by_hand(a[i], b[i]) for i in range(len(y))]),
        "x_l2": np.sqrt((a**2).reshape(len(y), -1).sum(axis=1)),
        "man": man,
    }
    return out


# --- end to end -----------------------------------------------------------------------------------

def test_the_fixture_victim_makes_clean_mistakes(data, thresholds):
    """The cooperative and bucket checks below are only meaningful if the victim gets some test images wrong
    and every bucket holds some."""
    h = _hand(data, "d_fgsm/eps=0.1", "test", thresholds)
    assert 0.5 < h["clean_accuracy"] < 1
    assert [h["buckets"][b]["count"] for b in ("low", "medium", "high")] == [8, 8, 8]
    assert _hand(data, "deepfool", "test")["unchanged"] > 0  # DeepFool leaves misclassified images alone


@pytest.mark.parametrize("split", ["train", "test"])
def test_accuracy_top5_and_buckets_match_the_manifests(data, thresholds, evaluated, split):
    report = json.loads((evaluated / "metrics.json").read_text())
    assert report["dataset"] == "mnist" and sorted(report["variants"]) == sorted(VARIANTS)
    for variant in VARIANTS:
        got, h = report["variants"][variant]["splits"][split], _hand(data, variant, split, thresholds)
        assert got["count"] == h["count"] == (48 if split == "train" else 24)
        for k in ("accuracy", "clean_accuracy", "top5_accuracy", "clean_top5_accuracy"):
            assert got[k] == pytest.approx(h[k], abs=1e-12), (variant, k)
        assert got["buckets"]["thresholds"] == list(thresholds)
        for name, want in h["buckets"].items():
            entry = got["buckets"][name]
            assert entry["count"] == want["count"], (variant, name)
            for k in ("error", "clean_error", "top5_error"):
                assert entry[k] == (None if want[k] is None else pytest.approx(want[k], abs=1e-12)), (variant, name, k)


def test_adversarial_success_and_cooperative_error_figures(data, evaluated):
    report = json.loads((evaluated / "metrics.json").read_text())["variants"]
    for e in EPS:
        got, h = report[f"fgsm/eps={e}"]["splits"]["test"], _hand(data, f"fgsm/eps={e}", "test")
        assert report[f"fgsm/eps={e}"]["direction"] == "adversarial" and report[f"fgsm/eps={e}"]["eps"] == float(e)
        assert got["success_rate"] == pytest.approx(1 - h["accuracy"], abs=1e-12)
        assert got["success_rate_on_correct"] == pytest.approx(np.mean(~h["ok"][h["clean_ok"]]), abs=1e-12)

        got, h = report[f"d_fgsm/eps={e}"]["splits"]["test"], _hand(data, f"d_fgsm/eps={e}", "test")
        clean_err, err = 1 - h["clean_accuracy"], 1 - h["accuracy"]
        negatives = ~h["clean_ok"]
        assert got["clean_error"] == pytest.approx(clean_err) and got["error"] == pytest.approx(err)
        assert got["error_rate_reduction"] == pytest.approx((clean_err - err) / clean_err)
        assert got["negatives"] == int(negatives.sum()) > 0
        assert got["negatives_error_before"] == 1.0
        assert got["negatives_error_after"] == pytest.approx(np.mean(~h["ok"][negatives]), abs=1e-12)
        assert got["positives_broken"] == pytest.approx(np.mean(~h["ok"][h["clean_ok"]]), abs=1e-12)
        assert "success_rate" not in got


def test_perceptibility_from_the_images(data, evaluated):
    report = json.loads((evaluated / "metrics.json").read_text())["variants"]
    for variant in VARIANTS:
        for split in ("train", "test"):
            p, h = report[variant]["splits"][split]["perturbation"], _hand(data, variant, split)
            assert p["mean_psnr"] == pytest.approx(h["mean_psnr"], rel=1e-5), variant
            assert p["unchanged"] == h["unchanged"]
            assert p["mean_linf"] == pytest.approx(h["mean_linf"], abs=1e-6)
            assert p["mean_ssim"] == pytest.approx(h["ssim"].mean(), abs=1e-5), variant
            assert p["min_ssim"] == pytest.approx(h["ssim"].min(), abs=1e-5), variant
            assert -1 <= p["min_ssim"] <= p["mean_ssim"] < 1  # every variant here changes some image
    # ε-bounded single steps move every pixel by ε·255 levels (less where clipped): not imperceptible, not noise.
    assert 10 < report["fgsm/eps=0.01"]["splits"]["test"]["perturbation"]["mean_psnr"] < 60


def test_deepfool_rho_by_hand(data, evaluated):
    got = json.loads((evaluated / "metrics.json").read_text())["variants"]["deepfool"]
    assert got["eps"] is None
    for split in ("train", "test"):
        h = _hand(data, "deepfool", split)
        # ρ̂ from the stored δ (not the float step), over the images DeepFool attacked: the clean-correct ones.
        r_l2 = np.sqrt(h["mse"] * h["pixels"])
        attacked = h["clean_ok"]
        df = got["splits"][split]["deepfool"]
        assert 0 < attacked.sum() < len(attacked) and df["attacked"] == attacked.sum()
        assert df["rho"] == pytest.approx(np.mean(r_l2[attacked] / h["x_l2"][attacked]), rel=1e-5)
        assert df["mean_r_l2"] == pytest.approx(r_l2[attacked].mean(), rel=1e-5)
        assert df["mean_iterations"] == pytest.approx(np.mean(h["man"]["iterations"]))
        assert df["converged_rate"] == pytest.approx(np.mean(h["man"]["converged"]))
        assert df["rho"] > 0


def test_plot_tables_start_at_clean_accuracy_with_one_row_per_eps(data, evaluated):
    with open(evaluated / "plots" / "accuracy_vs_eps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"method", "images", "eps", "accuracy"} <= set(rows[0])
    floats = [r for r in rows if r["images"] == "float"]
    rows = [r for r in rows if r["images"] == "stored"]
    assert all(r.get("series", r["method"]) == r["method"] for r in rows)  # one series per method
    h = {e: _hand(data, f"fgsm/eps={e}", "test") for e in EPS}
    want = [("fgsm", 0.0, h["0.1"]["clean_accuracy"])] + [("fgsm", float(e), h[e]["accuracy"]) for e in EPS]
    assert [(r["method"], float(r["eps"])) for r in rows] == [(m, e) for m, e, _ in want]
    assert [float(r["accuracy"]) for r in rows] == pytest.approx([a for _, _, a in want])
    # The float series beside it: the same ε, accuracy of the float images (the audited predictions).
    assert all(r["series"] == "fgsm (float)" for r in floats)
    want = [h["0.1"]["clean_accuracy"]] + [np.mean(np.array(h[e]["man"]["float_pred"]) == np.array(h[e]["man"]["label"]))
                                         for e in EPS]
    assert [float(r["accuracy"]) for r in floats] == pytest.approx(want)

    with open(evaluated / "plots" / "cooperative_error_vs_eps.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["images"] == "stored"]
    assert {"method", "eps", "error", "negatives_error"} <= set(rows[0])
    assert all(r.get("series", r["method"]) == r["method"] for r in rows)
    h = {e: _hand(data, f"d_fgsm/eps={e}", "test") for e in EPS}
    neg = ~h["0.1"]["clean_ok"]
    want = [("d_fgsm", 0.0, 1 - h["0.1"]["clean_accuracy"], 1.0)] + [
        ("d_fgsm", float(e), 1 - h[e]["accuracy"], np.mean(~h[e]["ok"][neg])) for e in EPS]
    assert [(r["method"], float(r["eps"])) for r in rows] == [(m, e) for m, e, _, _ in want]
    assert [float(r["error"]) for r in rows] == pytest.approx([err for _, _, err, _ in want])
    assert [float(r["negatives_error"]) for r in rows] == pytest.approx([n for _, _, _, n in want])


def test_per_sample_table(data, thresholds, evaluated):
    table = pq.read_table(evaluated / "samples.parquet").to_pydict()
    assert len(table["key"]) == len(VARIANTS) * (48 + 24)
    rows = [i for i, (f, s) in enumerate(zip(table["folder"], table["split"])) if f == "fgsm/eps=0.1" and s == "test"]
    h = _hand(data, "fgsm/eps=0.1", "test", thresholds)
    assert [table["key"][i] for i in rows] == h["man"]["key"]
    assert all(table["variant"][i] == "fgsm@0.1" for i in rows)
    assert [table["bucket"][i] for i in rows] == h["bucket"].tolist()
    np.testing.assert_allclose([table["ssim"][i] for i in rows], h["ssim"], atol=1e-5)
    mse = np.array([10 ** (-p / 10) for p in (table["psnr"][i] for i in rows)])
    np.testing.assert_allclose(mse, h["mse"], rtol=1e-4)

    rows = [i for i, (f, s) in enumerate(zip(table["folder"], table["split"])) if f == "deepfool" and s == "test"]
    h = _hand(data, "deepfool", "test", thresholds)
    same = h["mse"] == 0
    assert [table["psnr"][i] == np.inf for i in rows] == same.tolist()  # identical images: infinite PSNR
    assert all(table["ssim"][i] == pytest.approx(1, abs=1e-6) for i, s in zip(rows, same) if s)


# --- curve_rows on its own ------------------------------------------------------------------------

def test_curve_rows_by_hand():
    def adv(method, eps, clean, acc):
        return {"method": method, "eps": eps, "direction": "adversarial",
                "splits": {"test": {"clean_accuracy": clean, "accuracy": acc}}}

    def coop(method, eps, err, neg):
        return {"method": method, "eps": eps, "direction": "cooperative",
                "splits": {"test": {"clean_error": 0.2, "error": err, "negatives_error_before": 1.0,
                                    "negatives_error_after": neg}}}

    results = {
        "fgsm/eps=0.3": adv("fgsm", 0.3, 0.9, 0.1),
        "fgsm/eps=0.1": adv("fgsm", 0.1, 0.9, 0.5),
        "bim/eps=0.1": adv("bim", 0.1, 0.9, 0.2),
        "deepfool": adv("deepfool", None, 0.9, 0.0),  # no ε: not on an ε curve
        "pgd/eps=0.1": {"method": "pgd", "eps": 0.1, "direction": "adversarial",
                        "splits": {"train": {"clean_accuracy": 1.0, "accuracy": 0.0}}},  # no test split
        "d_fgsm/eps=0.1": coop("d_fgsm", 0.1, 0.05, 0.25),
    }
    acc, err = curve_rows(results, "test")
    for row in acc + err:  # an optional series column names the curve: one per method
        assert row.pop("series", row["method"]) == row["method"]
        assert row.pop("images") == "stored"  # no float predictions audited here: no float series
    assert acc == [
        {"method": "bim", "eps": 0.0, "accuracy": 0.9}, {"method": "bim", "eps": 0.1, "accuracy": 0.2},
        {"method": "fgsm", "eps": 0.0, "accuracy": 0.9}, {"method": "fgsm", "eps": 0.1, "accuracy": 0.5},
        {"method": "fgsm", "eps": 0.3, "accuracy": 0.1},
    ]
    assert err == [
        {"method": "d_fgsm", "eps": 0.0, "error": 0.2, "negatives_error": 1.0},
        {"method": "d_fgsm", "eps": 0.1, "error": 0.05, "negatives_error": 0.25},
    ]
    assert curve_rows(results, "validation") == ([], [])


# --- refusals -------------------------------------------------------------------------------------

def _refused(result, message: str, out: Path) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advgen evaluate: error: ") and message in lines[0], lines
    assert not (out / "metrics.json").exists()


def _one_variant(data: Path, dest: Path) -> Path:
    shutil.copytree(data / "adv" / "fgsm" / "eps=0.1", dest / "fgsm" / "eps=0.1")
    return dest


def test_variant_of_another_dataset(data, tmp_path):
    adv = _one_variant(data, tmp_path / "adv")
    stats_path = adv / "fgsm" / "eps=0.1" / "_stats.json"
    stats = json.loads(stats_path.read_text())
    stats["dataset"] = "fashion_mnist"
    stats_path.write_text(json.dumps(stats))
    _refused(_evaluate(data, tmp_path, adv=adv), "is a fashion_mnist variant, but", tmp_path)


def test_variant_of_another_copy_of_the_clean_data(data, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(data / "clean", clean)
    stats = json.loads((clean / "_stats.json").read_text())
    stats["limit"] = 1000  # a different prepare run: its _stats.json differs
    (clean / "_stats.json").write_text(json.dumps(stats))
    _refused(_evaluate(data, tmp_path, clean=clean), "was generated from another copy of mnist", tmp_path)


def test_variant_of_another_victim(data, tmp_path):
    other = tmp_path / "other.pt"
    other.write_bytes((data / "victim.pt").read_bytes() + b"\0")  # any other file has another sha256
    _refused(_evaluate(data, tmp_path, "--victim-ckpt", str(other)), "was generated on another victim", tmp_path)


def test_folder_without_variants(data, tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(_evaluate(data, tmp_path, adv=tmp_path / "empty"), "no generated variants under", tmp_path)


@pytest.mark.parametrize("values", [("0.9", "0.1"), ("0.5",), ("0.2", "1.5")])
def test_bad_thresholds(data, tmp_path, values):
    args = [a for v in values for a in ("--thresholds", v)]
    _refused(_evaluate(data, tmp_path, *args), "confidence thresholds must be two numbers", tmp_path)


def test_damaged_shard(data, tmp_path):
    adv = _one_variant(data, tmp_path / "adv")
    tar = adv / "fgsm" / "eps=0.1" / "test-000001.tar"
    raw = bytearray(tar.read_bytes())
    raw[700] ^= 0xFF
    tar.write_bytes(bytes(raw))
    _refused(_evaluate(data, tmp_path, adv=adv), "test-000001.tar: sha256", tmp_path)


def test_missing_clean_folder(data, tmp_path):
    _refused(_evaluate(data, tmp_path, clean=tmp_path / "nowhere"), "no such folder", tmp_path)
