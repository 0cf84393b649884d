"""``advgen check``, the first stage of every pipeline: real processes against this machine's real device, memory
and disk, on params written here (the smoke profile's, changed one field at a time). Every unmet precondition is
one line and exit 2 before any work; data that cannot be found is named with the mirror option."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, VENV_BIN

SMOKE = yaml.safe_load((ROOT / "smoke" / "params.yaml").read_text())


def _check(tmp_path: Path, env: dict, *extra: str, **changes) -> subprocess.CompletedProcess:
    doc = yaml.safe_load(yaml.safe_dump(SMOKE))  # a deep copy
    for key, value in changes.items():
        doc[key] = value
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(doc))
    return subprocess.run([str(VENV_BIN / "advgen"), "check", "--params", str(params), "--data",
                           str(tmp_path / "data"), *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("advgen check: error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_an_impossible_device_is_one_line(tmp_path, cli_env):
    import torch

    line = _one_error(_check(tmp_path, cli_env, device="tpu"))
    assert "params device: tpu" in line and "auto, cpu or cuda" in line
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: cuda is possible here")
    line = _one_error(_check(tmp_path, cli_env, device="cuda"))
    assert "params device: cuda" in line and "no CUDA device is available" in line
    assert not (tmp_path / "data").exists()  # nothing made


def test_missing_datasets_are_named_with_the_mirror_option(tmp_path, cli_env):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    proc = _check(tmp_path, {**cli_env, "ADVGEN_MIRROR": str(mirror)}, "--out", str(tmp_path / "plan.json"))
    assert proc.returncode == 0, proc.stderr  # prepare may still download them: a notice, not a failure
    notes = {line.split(":")[1].strip(): line for line in proc.stderr.splitlines() if " not found in " in line}
    for title, name in (("MNIST", "train-images-idx3-ubyte.gz"), ("CIFAR-10", "cifar-10-python.tar.gz"),
                        ("CIFAR-100", "cifar-100-python.tar.gz"), ("SVHN (cropped digits, without extra)",
                                                                    "train_32x32.mat")):
        assert name in notes[title] and str(mirror) in notes[title] and "set ADVGEN_MIRROR" in notes[title]
    plan = json.loads((tmp_path / "plan.json").read_text())
    stages = {s["stage"] for s in plan["stages"]}
    assert {"prepare@cifar100", "train@svhn-resnet18", "generate@mnist-mlp-fast"} <= stages
    assert plan["disk_bytes"] == sum(s["disk_bytes"] for s in plan["stages"]) > 0


def test_memory_and_disk_the_params_need_are_checked_up_front(tmp_path, cli_env):
    train = yaml.safe_load(yaml.safe_dump(SMOKE["train"]))
    train["cifar10-resnet18"]["batch_size"] = 10 ** 7  # ten million CIFAR images in one float batch
    line = _one_error(_check(tmp_path, cli_env, train=train))
    assert "memory: train@cifar10-resnet18 holds about" in line and "is available" in line
    # the disk: the same outputs counted a billion times over (as if DVC's cache held a billion copies)
    line = _one_error(_check(tmp_path, cli_env, "--cache-factor", "1e9"))
    assert line.startswith("advgen check: error: disk: the outputs need about") and "is free. Largest: " in line
