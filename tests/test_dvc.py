"""``dvc repro`` of a tiny profile in a temporary git repository, laid out like demo/.

The profile folder holds a params.yaml and a dvc.yaml that links to the
project's dvc.yaml, exactly as demo/ does, so this runs the real pipeline file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, copy_project

TINY = """\
code: ..
seed: 0
device: cpu
prepare:
  datasets: [mnist]
  shard_size: 0
  limit: 200
  verify: structure
train:
  mnist-mlp: {dataset: mnist, victim: mlp, epochs: EPOCHS, batch_size: 32, lr: 0.05, weight_decay: 5.0e-4, label_smoothing: 0.0}
generate:
  mnist-mlp-fast:
    dataset: mnist
    victim: mlp
    family: fast
    grid: {method: [fgsm, d_fgsm], eps: [0.05, 0.1], split: [test]}
    steps: 10
    step_size: 0
    label_source: "true"
    target: least_likely
    candidates: 10
    overshoot: 0.02
    max_iter: 50
    batch_size: 64
    workers: 0
"""


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_tiny_profile(tmp_path, mnist_mirror, cli_env):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    profile = repo / "tiny"
    profile.mkdir()
    os.symlink("../dvc.yaml", profile / "dvc.yaml")
    (profile / "params.yaml").write_text(TINY.replace("EPOCHS", "2"))
    env = {**cli_env, "ADVGEN_MIRROR": str(mnist_mirror), "PYTHONPATH": str(repo)}
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # parsing.list = append, no analytics
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo, env)

    out = _run(["dvc", "repro"], profile, env)
    assert "prepare@mnist" in out and "train@mnist-mlp" in out and "generate@mnist-mlp-fast" in out
    assert "--method fgsm --method d_fgsm --eps 0.05 --eps 0.1 --split test" in out
    variant = profile / "data/mnist/adv/mlp/fast/fgsm/eps=0.1"
    assert json.loads((variant / "_stats.json").read_text())["counts"] == {"test": 200}
    stats = json.loads((profile / "data/mnist/clean/_stats.json").read_text())
    assert stats["counts"] == {"train": 200, "test": 200}
    metrics = json.loads((profile / "metrics/mnist/mlp/train.json").read_text())
    assert metrics["epochs"] == 2 and 0 <= metrics["test_accuracy"] <= 1
    assert (profile / "data/mnist/victims/mlp.pt").is_file()
    lock = (profile / "dvc.lock").read_text()
    assert "prepare@mnist" in lock and "train@mnist-mlp" in lock and "../pipeline/train.py" in lock
    assert "train.mnist-mlp:" in lock and "prepare.limit: 200" in lock  # params tracked, for `dvc params diff`

    assert "up to date" in _run(["dvc", "status", "dvc.yaml"], profile, env)
    assert "didn't change, skipping" in _run(["dvc", "repro"], profile, env)
    shown = _run(["dvc", "metrics", "show", "--json"], profile, env)
    assert "test_accuracy" in shown

    # A changed recipe reruns training only; the clean shards stay as they are.
    (profile / "params.yaml").write_text(TINY.replace("EPOCHS", "1"))
    status = _run(["dvc", "status", "dvc.yaml"], profile, env)
    assert "train@mnist-mlp" in status and "prepare@mnist" not in status
    assert "train.mnist-mlp" in status  # reported as a modified param
    # Retraining changes the victim, so generation reruns; persisted shards with the old
    # victim's fingerprint are recomputed, never reused.
    rerun = _run(["dvc", "repro"], profile, env)
    assert "generate: 32 shard(s) computed, 0 already done" in rerun  # 4 variants x 8 test shards
