"""The benchmark scripts run: their tiny CPU modes as subprocesses, checked for a complete report.

These say the scripts work (synthetic CIFAR-10 in its native format, prepare,
the floors, advgen end to end, the report), not how fast anything is: timings
and targets live in benchmarks/RESULTS.md, never in tests.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADER = ["script", "device", "device_type", "torch", "python", "advgen", "git", "date", "cpu_cores", "torch_threads"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scratch shared by both scripts: the synthetic archive and its clean shards are written once."""
    return tmp_path_factory.mktemp("bench")


def run_script(name: str, work: Path, *args: str) -> tuple[dict, str]:
    out = work / f"{name}.json"
    # One thread per process: the scripts and the advgen processes they start take turns, and on a shared
    # 2-core machine several spinning OpenMP threads per process slow everything down many times over.
    env = {**{k: v for k, v in os.environ.items() if k != "ADVGEN_MIRROR"}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--tiny", "--device", "cpu",
                           "--work", str(work), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text()), done.stdout


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_header(report: dict, script: str) -> None:
    assert [k for k in HEADER if k not in report] == []
    assert report["script"] == script and report["device_type"] == "cpu" and report["device"].startswith("cpu")
    assert report["size"] == "tiny"


def test_train_speed_cpu(work: Path) -> None:
    report, stdout = run_script("train_speed", work)
    check_header(report, "train_speed")
    assert report["recipe"]["name"] == "cifar10-resnet18" and report["train_images"] == 32
    assert positive(report["floor"]["images_per_second"])
    loop = report["cases"]["loop"]
    assert positive(loop["images_per_second"]) and positive(loop["time_over_floor"])
    recipe = report["cases"]["recipe"]
    for key in ("wall_s", "train_s", "load_s", "images_per_second", "floor_s", "train_over_floor", "wall_over_floor"):
        assert positive(recipe[key]), key
    assert 0 <= recipe["test_accuracy"] <= 1
    assert "bare loop" in stdout and "advgen train" in stdout


@pytest.mark.slow  # about 30 s on 2 cores: an `advgen generate` process per case, a victim trained by `advgen train`
def test_generate_speed_cpu(work: Path) -> None:
    report, stdout = run_script("generate_speed", work, "--peer")
    check_header(report, "generate_speed")
    assert report["images"] == 64 and report["advgen_precision"] == "fp32"
    units = report["floor_units"]["fp32"]
    assert all(positive(units[k]) for k in ("forward_s", "forward_backward_s", "jacobian_s"))
    assert set(report["cases"]) == {"fgsm", "grid24", "pgd", "deepfool"}
    for name, case in report["cases"].items():
        assert case["copies"] == (24 if name == "grid24" else 1)
        run = case["advgen"]["audit_on"]
        for key in ("wall_s", "stage_s", "over_floor", "stage_over_floor", "over_floor_with_audit"):
            assert positive(run[key]), (name, key)
        floor = case["floor"]["fp32"]
        assert positive(floor["s"]) and floor["with_audit_s"] > floor["s"] and floor["formula"]
        parts = case["breakdown"]
        for key in ("png_encode_s", "tar_parquet_s", "compute_floor_s", "read_decode_s", "to_device_s", "to_host_s",
                    "startup_s"):
            assert parts[key] >= 0, (name, key)
        assert positive(parts["png_encode_s"]) and positive(parts["compute_floor_s"])
        if importlib.util.find_spec("torchattacks") is None:
            assert "torchattacks is not installed" in case["peer"]["skipped"]
        else:
            assert positive(case["peer"]["s"]) and positive(case["peer"]["over_advgen"])
    deepfool = report["cases"]["deepfool"]["deepfool"]
    assert 0 <= deepfool["attacked_fraction"] <= 1 and deepfool["iterations_max"] >= 0
    for name in report["cases"]:
        assert f"\n{name} " in stdout  # a row of the printed table
