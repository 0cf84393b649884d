"""Every registered attack through ``generate`` and ``evaluate``, every online form through ``retrain``, and every
defense through ``defend``, on tiny data: an entry is tested end to end the moment it is registered.

The checks hold for any correct attack: a full verified copy of both splits, a card naming the method, an
adversarial copy no more accurate than the clean images and a cooperative one no less, evaluate's figures equal
to the manifests' own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from advgen import attacks
from advgen.evaluation.retrain import ONLINE
from advgen.stages.cli import app
from tests.conftest import tiny_clean
from tests.test_evaluate import read_manifest

runner = CliRunner()
SMALL = ["--steps", "3", "--max-iter", "8", "--candidates", "4", "--uap-images", "16", "--uap-passes", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    tiny_clean(root, train=32, test=16)
    trained = runner.invoke(app, ["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(root / "clean"),
                                  "--out", str(root / "victim.pt"), "--metrics", str(root / "train.json"),
                                  "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    return root


@pytest.mark.parametrize("name", sorted(attacks.METHODS))
def test_every_registered_attack_generates_a_full_copy_that_evaluate_reads(tiny, tmp_path, name):
    attack = attacks.get(name)
    eps = ["--eps", "0.3"] if attack.takes_eps else []
    out = tmp_path / "adv"
    made = runner.invoke(app, ["generate", "--victim-ckpt", str(tiny / "victim.pt"), "--clean", str(tiny / "clean"),
                               "--out", str(out), "--method", name, *eps, *SMALL, "--device", "cpu",
                               "--workers", "0"])
    assert made.exit_code == 0, made.output
    folder = out / name / ("eps=0.3" if attack.takes_eps else "")
    card = (folder / "README.md").read_text()
    assert name in card
    evaluated = runner.invoke(app, ["evaluate", "--adv", str(out), "--clean", str(tiny / "clean"),
                                    "--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "plots"),
                                    "--samples", str(tmp_path / "s.parquet")])
    assert evaluated.exit_code == 0, evaluated.output
    (variant, report), = json.loads((tmp_path / "m.json").read_text())["variants"].items()
    assert report["direction"] == attack.direction
    for split, count in (("train", 32), ("test", 16)):
        got = report["splits"][split]
        manifest = read_manifest(folder, split)
        adv_ok = np.asarray(manifest["adv_pred"]) == np.asarray(manifest["label"])
        clean_ok = np.asarray(manifest["clean_pred"]) == np.asarray(manifest["label"])
        assert got["count"] == len(adv_ok) == count
        assert got["accuracy"] == pytest.approx(adv_ok.mean()) and got["clean_accuracy"] == pytest.approx(
            clean_ok.mean())
        if attack.direction == "adversarial":
            assert adv_ok.sum() <= clean_ok.sum(), (name, split)
        else:
            assert adv_ok.sum() >= clean_ok.sum(), (name, split)
        assert 0 < clean_ok.mean() < 1  # the victim is neither untrained nor perfect: the checks above can fail
    verified = runner.invoke(app, ["verify", str(folder)])
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize("mode", sorted(ONLINE))
def test_every_online_attack_trains_through_retrain(tiny, tmp_path, mode):
    made = runner.invoke(app, ["generate", "--victim-ckpt", str(tiny / "victim.pt"), "--clean", str(tiny / "clean"),
                               "--out", str(tmp_path / "adv"), "--method", "fgsm", "--eps", "0.1", "--device", "cpu",
                               "--workers", "0"])
    assert made.exit_code == 0, made.output
    done = runner.invoke(app, ["retrain", "--victim-ckpt", str(tiny / "victim.pt"), "--clean", str(tiny / "clean"),
                               "--adv", str(tmp_path / "adv" / "fgsm" / "eps=0.1"), "--out", str(tmp_path / "re"),
                               "--metrics", str(tmp_path / "re.json"), "--mode", mode, "--epochs", "1",
                               "--online-steps", "2", "--steps", "2", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "re" / f"{mode}.pt").is_file()
    metrics = json.loads((tmp_path / "re.json").read_text())
    assert mode in json.dumps(metrics)


def test_every_registered_defense_runs_through_defend_and_reaches_its_plot_and_the_report_table(tiny, tmp_path):
    from advgen import defenses
    from advgen.report import defense_table

    made = runner.invoke(app, ["generate", "--victim-ckpt", str(tiny / "victim.pt"), "--clean", str(tiny / "clean"),
                               "--out", str(tmp_path / "adv"), "--method", "fgsm", "--eps", "0.3", "--split", "test",
                               "--device", "cpu", "--workers", "0"])
    assert made.exit_code == 0, made.output
    done = runner.invoke(app, ["defend", "--victim-ckpt", str(tiny / "victim.pt"), "--clean", str(tiny / "clean"),
                               "--adv", str(tmp_path / "adv" / "fgsm" / "eps=0.3"), "--metrics", str(tmp_path / "d.json"),
                               "--plots", str(tmp_path / "plots"), "--scale", "1", "--adaptive-method", "fgsm",
                               "--adaptive-eps", "0.3", "--device", "cpu"])  # every defense at its default sweep
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "d.json").read_text())
    lines = defense_table(result)[0].splitlines()
    for d in defenses.REGISTRY.values():
        rows = [r for r in result["rows"] if r["defense"] == d.name and "scale" not in r]
        settings = {r["value"] for r in rows}
        assert settings == {d.setting(float(v), 28) for v in d.sweep}, d.name
        adaptive = {r["value"] for r in rows if r["data"].startswith("adaptive")}
        assert adaptive == {v for v in settings if not d.identity(v)}, d.name
        assert all(0 <= r["accuracy"] <= 1 for r in rows)
        plot = (tmp_path / "plots" / f"{d.name}.csv").read_text().splitlines()
        assert plot[0] == "series,model,data,value,accuracy,fooling_rate" and len(plot) == 1 + len(rows)
        assert sum(line.startswith(f"| {d.name} |") for line in lines) == 1, d.name
