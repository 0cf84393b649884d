"""``dvc repro`` of a tiny profile in a temporary git repository, laid out like demo/.

The profile folder holds a params.yaml, and ``advgen profile`` writes its
dvc.yaml from the project's dvc.yaml and makes it a DVC project of its own,
exactly as demo/ is made, so this runs the real pipeline file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, copy_project

TINY = """\
seed: 0
device: cpu
prepare:
  datasets: [mnist]
  shard_size: 0
  limit: 200
  verify: structure
train:
  mnist-mlp: {dataset: mnist, victim: mlp, epochs: EPOCHS, batch_size: 32, lr: 0.05, weight_decay: 5.0e-4, label_smoothing: 0.0, optimizer: sgd}
  mnist-simple_cnn: {dataset: mnist, victim: simple_cnn, epochs: 1, batch_size: 32, lr: 0.05, weight_decay: 5.0e-4, label_smoothing: 0.0, optimizer: sgd}
families:
  fast: &fast
    family: fast
    grid: {method: [fgsm, d_fgsm], eps: [0.05, 0.1], split: [test]}
    steps: 10
    step_size: 0
    label_source: "true"
    target: least_likely
    candidates: 10
    overshoot: 0.02
    max_iter: 50
    restarts: 1
    lattice_steps: 0
    uap: {uap-norm: linf, uap-target: 0.8, uap-passes: 10, uap-images: 2000}
    batch_size: 64
    workers: 0
    flags: {rounding-audit: true, store-float: false, rounding-aware: true}
generate:
  mnist-mlp-fast: {dataset: mnist, victim: mlp, <<: *fast}
  mnist-simple_cnn-fast:
    <<: *fast
    dataset: mnist
    victim: simple_cnn
    grid: {method: [fgsm], eps: [0.1], split: [train, test]}
evaluate:
  mnist-mlp: {dataset: mnist, victim: mlp, buckets: {thresholds: [], bucket-correct-only: false, bucket-sample: 0}, curve_split: test}
  mnist-simple_cnn: {dataset: mnist, victim: simple_cnn, buckets: {thresholds: [0.5, 0.9], bucket-correct-only: true, bucket-sample: 5}, curve_split: test}
transfer:
  mnist: {dataset: mnist, victims: {victim: [mlp, simple_cnn]}, split: test}
retrain:
  mnist-mlp:
    dataset: mnist
    target: mlp
    source: simple_cnn
    variant: fast/fgsm/eps=0.1
    modes: {mode: [finetune, online_fgsm]}
    finetune_epochs: 1
    epochs: 1
    clean_ratio: 1.0
    online_eps: 0.1
    online_steps: 2
    steps: 3
defend:
  mnist-mlp:
    dataset: mnist
    victim: mlp
    grid:
      adv: [data/mnist/adv/mlp/fast/fgsm/eps=0.1]
      sigma: [0, 1]
      resample-factor: [0.5]
      scale: [1, 2]
    adaptive_method: fgsm
    adaptive_eps: 0.1
    steps: 3
report:
  samples: 3
  options: {}
"""


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _json(cmd: list[str], cwd: Path, env: dict) -> dict:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def make_tiny_repo(tmp_path: Path, mirror: Path, cli_env: dict, *, epochs: int) -> tuple[Path, Path, dict]:
    """A git + DVC repository holding this checkout's code and a ``tiny`` profile laid out like demo/.

    Returns (repo, profile folder, environment for subprocesses).
    """
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    profile = repo / "tiny"
    profile.mkdir()
    (profile / "params.yaml").write_text(TINY.replace("EPOCHS", str(epochs)))
    env = {**cli_env, "ADVGEN_MIRROR": str(mirror), "PYTHONPATH": str(repo)}
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # parsing.list/bool, no analytics
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the `series` plot template
    _run(["advgen", "profile", "tiny"], repo, env)  # tiny/dvc.yaml and tiny/.dvc/, as `make profiles` does
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo, env)
    return repo, profile, env


@pytest.mark.slow
def test_dvc_repro_tiny_profile(tmp_path, mnist_mirror, cli_env):
    _, profile, env = make_tiny_repo(tmp_path, mnist_mirror, cli_env, epochs=2)

    out = _run(["dvc", "repro"], profile, env)
    for stage in ("prepare@mnist", "train@mnist-mlp", "generate@mnist-mlp-fast", "evaluate@mnist-mlp",
                  "transfer@mnist", "retrain@mnist-mlp", "defend@mnist-mlp", "report"):
        assert f"Running stage '{stage}'" in out, stage
    assert "--method fgsm --method d_fgsm --eps 0.05 --eps 0.1 --split test" in out
    assert "--rounding-audit --no-store-float --rounding-aware" in out  # booleans from params, both spellings
    assert "--thresholds 0.5 --thresholds 0.9 --bucket-correct-only --bucket-sample 5" in out
    evaluation = json.loads((profile / "metrics/mnist/mlp/evaluate.json").read_text())
    assert set(evaluation["variants"]) == {f"fast/{m}/eps={e}" for m in ("fgsm", "d_fgsm") for e in ("0.05", "0.1")}
    transfer = json.loads((profile / "metrics/mnist/transfer.json").read_text())
    assert {(r["source"], r["target"]) for r in transfer["rows"]} == {("mlp", "simple_cnn"), ("simple_cnn", "mlp")}
    retrain = json.loads((profile / "metrics/mnist/mlp/retrain.json").read_text())
    assert set(retrain["models"]) == {"original", "finetune", "online_fgsm"}
    assert (profile / "data/mnist/retrained/mlp/finetune.pt").is_file()
    defend = json.loads((profile / "metrics/mnist/mlp/defend.json").read_text())
    assert {r["model"] for r in defend["rows"]} == {"original", "finetune", "online_fgsm"}
    report = (profile / "reports/README.md").read_text()
    figures = sorted((profile / "reports/figures").glob("*.png"))
    assert len(figures) >= 8 and all(f.stat().st_size > 5000 for f in figures)
    for f in figures:
        assert f"figures/{f.name}" in report  # every figure is shown in the report
    assert "## Timing" in report and "### Transfer" in report and "### Adversarial retraining: mlp" in report
    shown = subprocess.run(["dvc", "plots", "show", "--json"], cwd=profile, env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert shown.returncode == 0, shown.stderr
    rendered = json.dumps(json.loads(shown.stdout))  # every declared plot rendered, with the series template
    for table in ("accuracy_vs_eps.csv", "cooperative_error_vs_eps.csv", "transfer.csv", "gaussian.csv", "resample.csv"):
        assert table in rendered, table
    variant = profile / "data/mnist/adv/mlp/fast/fgsm/eps=0.1"
    assert json.loads((variant / "_stats.json").read_text())["counts"] == {"test": 200}
    stats = json.loads((profile / "data/mnist/clean/_stats.json").read_text())
    assert stats["counts"] == {"train": 200, "test": 200}
    metrics = json.loads((profile / "metrics/mnist/mlp/train.json").read_text())
    assert metrics["epochs"] == 2 and 0 <= metrics["test_accuracy"] <= 1
    assert (profile / "data/mnist/victims/mlp.pt").is_file()
    lock = (profile / "dvc.lock").read_text()
    assert "prepare@mnist" in lock and "train@mnist-mlp" in lock and "../pipeline/victims/train.py" in lock
    assert "train.mnist-mlp:" in lock and "prepare.limit: 200" in lock  # params tracked, for `dvc params diff`

    assert "up to date" in _run(["dvc", "status"], profile, env)  # the profile sees only its own stages
    assert "didn't change, skipping" in _run(["dvc", "repro"], profile, env)
    shown = _json(["dvc", "metrics", "show", "--json"], profile, env)
    files = {f for rev in shown.values() for f in rev.get("data", {})}
    assert files and all(not f.startswith("..") for f in files) and "metrics/mnist/mlp/train.json" in files
    assert "metrics/mnist/mlp/summary.json" in files  # headline numbers only; full results stay out of it
    assert not any(f.endswith(("evaluate.json", "transfer.json", "defend.json")) for f in files)
    summary = json.loads((profile / "metrics/mnist/mlp/summary.json").read_text())
    assert summary["variants"]["fast/fgsm/eps=0.1"]["accuracy"] == \
        evaluation["variants"]["fast/fgsm/eps=0.1"]["splits"]["test"]["accuracy"]
    root_status = _run(["dvc", "status"], profile.parent, env)
    assert "tiny/" not in root_status and "cifar10" in root_status  # the root study sees its own stages only
    repo = profile.parent
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny run 1"], repo, env)

    # A changed recipe reruns training only; the clean shards stay as they are.
    (profile / "params.yaml").write_text(TINY.replace("EPOCHS", "1"))
    status = _run(["dvc", "status"], profile, env)
    assert "train@mnist-mlp" in status and "prepare@mnist" not in status
    assert "train.mnist-mlp" in status  # reported as a modified param
    # Stale results nobody declares any more must not break (or enter) the report.
    ghost = profile / "metrics" / "mnist" / "ghost"
    ghost.mkdir()
    (ghost / "evaluate.json").write_text("{}")
    # Retraining changes the victim, so generation reruns; persisted shards with the old
    # victim's fingerprint are recomputed, never reused.
    rerun = _run(["dvc", "repro"], profile, env)
    assert "generate: 32 shard(s) computed, 0 already done" in rerun  # 4 variants x 8 test shards
    assert "ghost" not in (profile / "reports" / "README.md").read_text()
    shutil.rmtree(ghost)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny run 2"], repo, env)

    # DVC's experiment views work across revisions in the profile (its dvc.yaml is a real file).
    diff = _json(["dvc", "params", "diff", "HEAD~1", "HEAD", "--json"], profile, env)
    assert diff["params.yaml"]["train.mnist-mlp.epochs"] == {"old": 2, "new": 1, "diff": -1}
    metrics = _json(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"], profile, env)
    assert "metrics/mnist/mlp/train.json" in metrics
    exp = _run(["dvc", "exp", "show", "--no-pager", "-A", "--csv"], profile, env)
    assert "WARNING" not in exp and "failed" not in exp.lower(), exp
    assert exp.count("\n") >= 3  # the workspace and both commits, each with params and metrics


def committed_profiles() -> list[Path]:
    """Every profile folder of this checkout: a params.yaml beside a .dvc/ folder, below the root."""
    return sorted(p.parent for p in ROOT.glob("**/params.yaml")
                  if p.parent != ROOT and (p.parent / ".dvc").is_dir() and ".venv" not in p.parts)


def test_committed_profiles_are_generated_from_the_current_template(monkeypatch):
    from typer.testing import CliRunner

    from advgen.stages.cli import app

    profiles = committed_profiles()
    assert ROOT / "demo" in profiles
    for p in profiles:
        assert not (p / "dvc.yaml").is_symlink(), f"{p}/dvc.yaml must be a real file (DVC cannot read links at revisions)"
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["profile", *(str(p.relative_to(ROOT)) for p in profiles), "--check"])
    assert result.exit_code == 0, f"stale profile files; run `make profiles`:\n{result.stdout}"
