"""benchmarks/rounding_aware.py runs: its tiny mode as a subprocess, checked for a complete, consistent report.

It says the script works (synthetic Fashion-MNIST IDX files, prepare, train,
two `advgen generate` runs per victim, the manifests read back), not whether
the targets hold: those are measured on the real data and recorded in
benchmarks/RESULTS.md. foolbox is skipped here (``--no-peer``): it is a
benchmark tool, not something advgen's tests install.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADER = ["script", "device", "device_type", "torch", "python", "advgen", "git", "date", "cpu_cores", "torch_threads"]
FRACTIONS = ["clean_accuracy", "float_success", "stored_success_aware", "stored_success_plain", "converged_fraction"]
SIZES = ["median_l2_float", "median_l2_stored_aware", "median_l2_stored_plain", "ratio_aware", "ratio_plain",
         "median_per_image_ratio_aware", "iterations_mean"]
LATTICE = ["images_needing", "fraction_needing", "steps_mean", "steps_mean_where_needed", "steps_max",
           "stored_success_where_needed"]


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def fraction(value: object) -> bool:
    return isinstance(value, float) and 0 <= value <= 1


@pytest.mark.slow  # about 25-30 s on 2 cores: prepare, two trainings and four `advgen generate` processes
def test_rounding_aware_tiny(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    # One thread per process: the script and the advgen processes it starts take turns on a shared machine.
    env = {**{k: v for k, v in os.environ.items() if k != "ADVGEN_MIRROR"}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rounding_aware.py"), "--tiny", "--no-peer",
                           "--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, f"rounding_aware failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(out.read_text())

    assert [k for k in HEADER if k not in report] == []
    assert report["script"] == "rounding_aware" and report["size"] == "tiny" and report["device_type"] == "cpu"
    assert report["images"] == 200 and report["split"] == "test"
    assert report["deepfool"] == {"max_iter": 50, "candidates": 10, "overshoot": 0.02}
    assert set(report["victims"]) == {"mlp", "simple_cnn"}
    for arch, v in report["victims"].items():
        assert v["trained_here"] and v["recipe"]["epochs"] == 1 and len(v["sha256"]) == 64
        for mode in ("aware", "plain"):
            run = v["generate"][mode]
            assert positive(run["wall_s"]) and run["shards_computed"] + run["shards_reused"] == 8
            # the stored PNGs, read back and classified again, say what the manifests say
            check = run["stored_recheck"]
            assert check["images"] == 200 and check["pred_disagreements"] == 0 and check["l2_max_abs_diff"] < 1e-4
        a = v["advgen"]
        assert a["images"] == 200 and 0 < a["attacked"] <= 200, arch  # the victim learned something
        assert a["attacked"] == round(a["clean_accuracy"] * 200)
        assert all(fraction(a[k]) for k in FRACTIONS), (arch, {k: a[k] for k in FRACTIONS})
        assert all(positive(a[k]) for k in SIZES), (arch, {k: a[k] for k in SIZES})
        assert a["float_runs_agree"], arch  # (a) and (b) differ only after the float attack
        # rounding cannot lose what the lattice steps keep: aware >= plain, and aware reaches the float success
        assert a["stored_success_aware"] >= a["stored_success_plain"]
        assert a["stored_success_aware"] >= a["float_success"] - 1e-9
        assert math.isclose(a["ratio_aware"], a["median_l2_stored_aware"] / a["median_l2_float"])
        lat = a["lattice"]
        assert [k for k in LATTICE if k not in lat] == []
        assert 0 <= lat["images_needing"] <= a["attacked"] and lat["steps_max"] >= 0
        assert math.isclose(lat["fraction_needing"], lat["images_needing"] / a["attacked"])
        if lat["images_needing"]:
            assert lat["steps_mean_where_needed"] >= 1 and fraction(lat["stored_success_where_needed"])
        targets = v["targets"]
        assert set(targets) == {"success_gap_pp", "l2_ratio"}
        assert all(isinstance(t["pass"], bool) and t["limit"] > 0 for t in targets.values())
        assert targets["l2_ratio"]["value"] == a["ratio_aware"]
        assert v["peer"] == {"skipped": "skipped (--no-peer)"}
    assert report["all_pass"] == all(t["pass"] for v in report["victims"].values() for t in v["targets"].values())
    assert "targets" in done.stdout and "\nmlp " in done.stdout and "\nsimple_cnn " in done.stdout
