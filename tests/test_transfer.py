"""``advgen transfer`` on two toy victims, checked against a hand computation from the stored files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_split_by_hand as read_split
from conftest import tiny_clean
from test_evaluate import read_manifest
from typer.testing import CliRunner

from advgen.victims import load
from advgen.stages.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """root/clean, root/victims/{mlp,simple_cnn}.pt (1 epoch each), root/adv/<victim>/fgsm/eps=0.1 (test split)."""
    root = tmp_path_factory.mktemp("transfer")
    tiny_clean(root)
    for victim in ("mlp", "simple_cnn"):
        r = runner.invoke(app, ["train", "--dataset", "mnist", "--victim", victim, "--clean", str(root / "clean"),
                                "--out", str(root / "victims" / f"{victim}.pt"), "--metrics", str(root / f"{victim}.json"),
                                "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--device", "cpu"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["generate", "--victim-ckpt", str(root / "victims" / f"{victim}.pt"),
                                "--clean", str(root / "clean"), "--out", str(root / "adv" / victim),
                                "--method", "fgsm,d_fgsm", "--eps", "0.1", "--split", "test", "--device", "cpu",
                                "--workers", "0"])
        assert r.exit_code == 0, r.output
    return root


def _transfer(root: Path, out: Path, *victims: str):
    return runner.invoke(app, ["transfer", "--clean", str(root / "clean"), "--victims-dir", str(root / "victims"),
                               "--adv-root", str(root / "adv"), *[a for v in victims for a in ("--victim", v)],
                               "--metrics", str(out / "transfer.json"), "--plots", str(out / "plots"),
                               "--device", "cpu"])


def _predict(ckpt: Path, images: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    model = load(ckpt)
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        p = torch.softmax(logits, dim=1)
    out = p.argmax(1).numpy(), p.max(1).values.numpy()
    if y is None:
        return out
    nll = -torch.log_softmax(logits.double(), dim=1)[torch.arange(len(y)), torch.from_numpy(y)]
    return (*out, nll.numpy())


def test_matrix_and_confidence_split_by_hand(study, tmp_path):
    result = _transfer(study, tmp_path, "mlp", "simple_cnn")
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "transfer.json").read_text())
    _, clean, y = read_split(study / "clean", "test")
    rows = {(r["method"], r["source"], r["target"]): r for r in got["rows"]}
    assert set(rows) == {(m, s, t) for m in ("fgsm", "d_fgsm") for s, t in (("mlp", "simple_cnn"), ("simple_cnn", "mlp"))}
    for (method, src, tgt), row in rows.items():
        folder = study / "adv" / src / method / "eps=0.1"
        _, adv, y_adv = read_split(folder, "test")
        assert np.array_equal(y_adv, y)
        pred, _, loss = _predict(study / "victims" / f"{tgt}.pt", adv, y)
        clean_pred, clean_conf, clean_loss = _predict(study / "victims" / f"{tgt}.pt", clean, y)
        acc, clean_acc = float(np.mean(pred == y)), float(np.mean(clean_pred == y))
        assert row["accuracy"] == pytest.approx(acc) and row["target_clean_accuracy"] == pytest.approx(clean_acc)
        assert row["fooling_rate"] == pytest.approx(float(np.mean(pred != clean_pred)))
        assert row["loss"] == pytest.approx(loss.mean(), rel=1e-5)  # loss beside accuracy (Johnson's tables)
        assert row["target_clean_loss"] == pytest.approx(clean_loss.mean(), rel=1e-5)
        assert row["drop"] == pytest.approx(clean_acc - acc)
        assert got["matrix"][f"{method}@0.1"][src][tgt] == pytest.approx(acc)
        man = read_manifest(folder, "test")
        src_fooled = np.array(man["adv_pred"]) != y
        assert row["source_accuracy"] == pytest.approx(float(np.mean(~src_fooled)))
        if method == "fgsm":
            eligible = src_fooled & (np.array(man["clean_pred"]) == y) & (clean_pred == y)
            moved, kept = eligible & (pred != y), eligible & (pred == y)
            assert row["eligible"] == int(eligible.sum())
            if eligible.any():
                assert row["transfer_rate"] == pytest.approx(moved.sum() / eligible.sum())
            for mask, key in ((moved, "transferred"), (kept, "not_transferred")):
                want = float(clean_conf[mask].mean()) if mask.any() else None
                assert row[f"target_clean_conf_{key}"] == (pytest.approx(want, abs=1e-6) if want is not None else None)
        else:
            assert "transfer_rate" not in row  # the confidence question is about adversarial copies
    assert (tmp_path / "plots" / "transfer.csv").read_text().startswith("series,")


def test_needs_two_victims_and_their_checkpoints(study, tmp_path):
    one = _transfer(study, tmp_path, "mlp")
    assert one.exit_code == 2 and "at least two" in one.output and "Traceback" not in one.output
    missing = _transfer(study, tmp_path, "mlp", "resnet18")
    assert missing.exit_code == 2 and "resnet18" in missing.output and "Traceback" not in missing.output
