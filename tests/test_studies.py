"""The study profiles: each seed paper's numbers, entered once, beside advgen's results of the same protocol.

The paper-number files parse; every cell a profile's report compares names a result that profile declares
(so a typo cannot drop a comparison silently); the comparison picks the right numbers out of hand-made
results; and a study profile, shrunk to tiny synthetic data, runs under ``dvc repro`` with its paper section.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project

from advgen import report as R
from advgen.attacks import METHODS
from advgen.data.datasets import DATASETS
from advgen.victims import VICTIMS

STUDIES = sorted(p.parent for p in (ROOT / "studies").glob("*/paper.yaml"))
PAPER_ONLY = {"imagenet", "inception_v3"}  # named by a paper, not in advgen: profiles substitute them


def _profiles(study: Path) -> list[Path]:
    return sorted(p.parent for p in study.glob("*/params.yaml"))


def test_every_seed_paper_with_numbers_has_a_study_with_a_cpu_and_a_full_profile():
    names = {s.name.split("-")[0] for s in STUDIES}
    assert names == {"agarwal", "rana", "possas", "johnson"}
    for study in STUDIES:
        assert [p.name for p in _profiles(study)] == ["fashion", "full"], study
        params = yaml.safe_load((study / "fashion" / "params.yaml").read_text())
        assert params["prepare"]["datasets"] == ["fashion_mnist"], study


@pytest.mark.parametrize("study", STUDIES, ids=[s.name for s in STUDIES])
def test_paper_numbers_parse_and_name_known_things(study):
    from advgen.stages.report import _paper

    doc = _paper(study / "paper.yaml")
    assert doc["paper"] and doc["ambiguities"] and doc["tables"]
    for a in doc["ambiguities"]:
        assert a["question"].strip() and a["choice"].strip()
    for t in doc["tables"]:
        for cell in t["cells"]:
            assert cell["metric"] in R.PAPER_METRICS, cell
            assert isinstance(cell["value"], (int, float)), cell
            assert cell["dataset"] in DATASETS or cell["dataset"] in PAPER_ONLY, cell
            for key in ("victim", "source", "target"):
                assert cell.get(key) is None or cell[key] in VICTIMS or cell[key] in PAPER_ONLY, cell
            assert cell.get("method") is None or cell["method"] in METHODS, cell


def _substitutes(params: dict) -> list[dict]:
    from advgen.stages.report import _substitute

    options = (params.get("report") or {}).get("options") or {}
    return [_substitute(s) for s in options.get("substitute", [])]


def _declares(params: dict, cell: dict) -> bool:
    """Whether ``params`` declare the stage and variant the report reads ``cell``'s number from."""
    ds, metric = cell["dataset"], cell["metric"]
    if metric in ("clean_accuracy", "clean_error"):
        return any((e["dataset"], e["victim"]) == (ds, cell["victim"]) for e in params.get("train", {}).values())

    def made(victim: str) -> bool:
        for e in params.get("generate", {}).values():
            grid = e["grid"]
            if (e["dataset"], e["victim"]) == (ds, victim) and cell["method"] in grid["method"] and \
                    (cell.get("eps") is None or any(abs(x - cell["eps"]) < 1e-9 for x in grid.get("eps", [])))\
                    and "test" in grid["split"]:
                return True
        return False

    if metric in R.EVALUATE_METRICS:
        evaluated = any((e["dataset"], e["victim"]) == (ds, cell["victim"]) for e in params.get("evaluate", {}).values())
        return evaluated and made(cell["victim"])
    if metric in R.TRANSFER_FIELDS:
        t = [e for e in params.get("transfer", {}).values() if e["dataset"] == ds]
        return bool(t) and {cell["source"], cell["target"]} <= set(t[0]["victims"]["victim"]) and made(cell["source"])
    if metric in R.RETRAIN_FIELDS:
        r = [e for e in params.get("retrain", {}).values() if (e["dataset"], e["target"]) == (ds, cell["victim"])]
        return bool(r) and (cell.get("model", "original") == "original" or cell["model"] in r[0]["modes"]["mode"])
    if metric == "defend_accuracy":
        d = [e for e in params.get("defend", {}).values() if (e["dataset"], e["victim"]) == (ds, cell["victim"])]
        return bool(d) and any(abs(s - cell["sigma"]) < 1e-9 for s in d[0]["grid"]["sigma"]) and \
            any(cell["data"] in a for a in d[0]["grid"]["adv"])
    raise AssertionError(f"no rule for {metric}")


def _in_profile(params: dict, cell: dict) -> bool:
    datasets = params["prepare"]["datasets"]
    victims = {e["victim"] for e in params.get("train", {}).values()}
    names = [cell.get(k) for k in ("victim", "source", "target") if cell.get(k)]
    return cell["dataset"] in datasets and all(n in victims for n in names)


@pytest.mark.parametrize("profile", [p for s in STUDIES for p in _profiles(s)],
                         ids=[f"{s.name}/{p.name}" for s in STUDIES for p in _profiles(s)])
def test_every_cell_a_profile_compares_names_a_result_it_declares(profile):
    params = yaml.safe_load((profile / "params.yaml").read_text())
    paper = yaml.safe_load((profile.parent / "paper.yaml").read_text())
    assert params["report"]["options"]["paper"] == "../paper.yaml"
    compared = 0
    for t in paper["tables"]:
        for cell in t["cells"]:
            swapped, _ = R.substituted(cell, _substitutes(params))
            if _in_profile(params, swapped):
                compared += 1
                assert _declares(params, swapped), (profile, cell)
    assert compared > 0, f"{profile}: no cell of the paper is compared"


def test_the_comparison_picks_the_right_numbers_from_hand_made_results():
    results = {
        "train": {("fashion_mnist", "mlp"): {"test_accuracy": 0.9}},
        "evaluate": {("fashion_mnist", "mlp"): {"variants": {
            "fast/fgsm/eps=0.1": {"method": "fgsm", "eps": 0.1, "splits": {"test": {
                "accuracy": 0.25, "clean_accuracy": 0.9, "success_rate": 0.75, "fooling_rate": 0.7,
                "buckets": {"high": {"count": 3, "error": 0.5, "top5_error": 0.1}}}}},
            "minimal/deepfool": {"method": "deepfool", "eps": None, "splits": {"test": {
                "accuracy": 0.01, "deepfool": {"rho": 0.123}, "buckets": {}}}}}}},
        "transfer": {"fashion_mnist": {"rows": [
            {"method": "fgs_until", "eps": None, "source": "mlp", "target": "simple_cnn", "accuracy": 0.8,
             "loss": 0.61, "target_clean_accuracy": 0.9, "target_clean_loss": 0.3}]}},
        "retrain": {("fashion_mnist", "simple_cnn"): {"models": {"scratch": {"clean_accuracy": 0.88,
                                                                           "stored_adversarial_loss": 0.5}}}},
        "defend": {("fashion_mnist", "simple_cnn"): {"rows": [
            {"model": "original", "defense": "gaussian", "value": 0.5, "data": "fgs_until (mlp)", "accuracy": 0.7},
            # the scaled-δ rows of the same set and σ come after it and must not be taken for it
            {"model": "original", "defense": "gaussian", "value": 0.5, "data": "fgs_until (mlp) ×2", "scale": 2.0,
             "accuracy": 0.3},
            {"model": "original", "defense": "gaussian", "value": 0.5, "data": "fgs_until_more (mlp)",
             "accuracy": 0.1}]}},
    }
    cells = [
        ({"dataset": "fashion_mnist", "victim": "mlp", "metric": "clean_accuracy"}, 90.0),
        ({"dataset": "fashion_mnist", "victim": "mlp", "metric": "clean_error"}, 10.0),
        ({"dataset": "fashion_mnist", "victim": "mlp", "method": "fgsm", "eps": 0.1, "metric": "error"}, 75.0),
        ({"dataset": "fashion_mnist", "victim": "mlp", "method": "fgsm", "eps": 0.1, "metric": "fooling_rate"}, 70.0),
        ({"dataset": "fashion_mnist", "victim": "mlp", "method": "fgsm", "eps": 0.1, "bucket": "high",
          "metric": "top5_error"}, 10.0),
        ({"dataset": "fashion_mnist", "victim": "mlp", "method": "deepfool", "metric": "rho", "unit": "ratio"}, 0.123),
        ({"dataset": "fashion_mnist", "method": "fgs_until", "source": "mlp", "target": "simple_cnn",
          "metric": "transfer_loss", "unit": "ratio"}, 0.61),
        ({"dataset": "fashion_mnist", "method": "fgs_until", "source": "mlp", "target": "simple_cnn",
          "metric": "transfer_clean_accuracy"}, 90.0),
        ({"dataset": "fashion_mnist", "victim": "simple_cnn", "model": "scratch",
          "metric": "retrain_adversarial_loss", "unit": "ratio"}, 0.5),
        ({"dataset": "fashion_mnist", "victim": "simple_cnn", "model": "original", "data": "fgs_until",
          "sigma": 0.5, "metric": "defend_accuracy"}, 70.0),
        ({"dataset": "fashion_mnist", "victim": "mlp", "method": "fgsm", "eps": 0.3, "metric": "accuracy"}, None),
    ]
    for cell, want in cells:
        got = R.paper_value(cell, results)
        assert got == (pytest.approx(want) if want is not None else None), cell
    paper = {"tables": [{"caption": "c", "cite": "t", "unit": "percent", "cells": [
        {"dataset": "mnist", "victim": "mlp", "method": "fgsm", "eps": 0.1, "metric": "accuracy", "value": 29.0},
        {"dataset": "cifar10", "victim": "mlp", "metric": "clean_accuracy", "value": 80.0},
        {"dataset": "mnist", "victim": "mlp", "method": "fgsm", "eps": 0.1, "bucket": "high", "metric": "top1_error",
         "value": 82.0}]}],
        "substitutes": [{"dataset": "mnist", "by": "fashion_mnist"}]}
    lines, compared, total = R.paper_tables(paper, results)
    text = "\n".join(lines)
    assert (compared, total) == (2, 3)
    # the bucket's size beside its rates: 3 images make a rate that means little
    assert "| top1_error | 82.0 | 50.0 | -32.0 | dataset mnist → fashion_mnist; 3 images in the bucket |" in text
    assert "| dataset mnist, victim mlp, method fgsm, eps 0.1 | accuracy | 29.0 | 25.0 | -4.0000 | dataset mnist → fashion_mnist |" in text
    assert "no result here" in text


@pytest.mark.slow
def test_a_study_profile_runs_under_dvc_with_its_paper_section(tmp_path, mnist_mirror, cli_env):
    """Johnson's Fashion-MNIST profile (fgs_until, transfer, retrain, defend, the paper's numbers), shrunk."""
    import subprocess

    from conftest import WRITERS, small_spec

    study = ROOT / "studies" / "johnson-fgs-cifar10"
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    (repo / "studies" / study.name / "tiny").mkdir(parents=True)
    shutil.copy(study / "paper.yaml", repo / "studies" / study.name / "paper.yaml")
    params = yaml.safe_load((study / "fashion" / "params.yaml").read_text())
    params["prepare"].update(limit=48, verify="structure", shard_size=8)
    for e in params["train"].values():
        e.update(epochs=1, batch_size=16)
    for e in params["generate"].values():
        e.update(batch_size=64, workers=0, max_iter=20)
    params["retrain"]["fashion_mnist-simple_cnn"]["epochs"] = 1
    params["defend"]["fashion_mnist-simple_cnn"]["grid"].update(sigma=[0, 0.5], scale=[1])
    params["report"]["samples"] = 2
    (repo / "studies" / study.name / "tiny" / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    mirror = tmp_path / "mirror"
    WRITERS["fashion_mnist"](mirror / "FashionMNIST" / "raw", small_spec("fashion_mnist", train=64, test=64), seed=5)
    env = {**cli_env, "ADVGEN_MIRROR": str(mirror)}

    def run(cmd, cwd):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout + proc.stderr

    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    run(["advgen", "profile", f"studies/{study.name}/tiny"], repo)
    profile = repo / "studies" / study.name / "tiny"
    run(["dvc", "repro"], profile)
    report = (profile / "reports" / "README.md").read_text()
    assert "## The paper's numbers beside advgen's" in report
    assert "dataset cifar10 → fashion_mnist" in report and "What the paper leaves open" in report
    transfer = json.loads((profile / "metrics" / "fashion_mnist" / "transfer.json").read_text())
    row = next(r for r in transfer["rows"] if r["source"] == "mlp" and r["target"] == "simple_cnn")
    assert row["method"] == "fgs_until" and row["loss"] > 0
    stats = json.loads((profile / "data/fashion_mnist/adv/mlp/until/fgs_until/_stats.json").read_text())
    assert stats["params"]["max_iter"] == 20 and stats["eps"] is None
