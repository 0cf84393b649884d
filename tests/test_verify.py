"""``advgen verify``: good folders pass; each kind of damage is found and named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import WRITERS, small_spec
from typer.testing import CliRunner

from advgen.data.clean import write_clean
from advgen.data.datasets import load_source, locate
from advgen.storage.shards import encode_png, file_digest, iter_tar, write_json, write_parquet, write_tar
from advgen.storage.verify import find_folders, verify_folder
from advgen.victims import build, save
from advgen.stages.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """root/clean (mnist, 40 train + 24 test, shards of 8) and root/adv/fgsm/eps={0.1,0.3} (test split)."""
    root = tmp_path_factory.mktemp("verify")
    spec = small_spec("mnist", train=40, test=24)
    WRITERS["mnist"](root / "raw", spec)
    write_clean(load_source(spec, locate(spec, [root / "raw"]), allow_unverified=True), root / "clean", shard_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # an untrained victim will do: verify never looks at attack quality
        model = build("mlp", dataset="mnist", input_shape=(1, 28, 28), num_classes=10, mean=[0.5], std=[0.5])
    model.meta.test_accuracy = 0.1
    save(model, root / "mlp.pt")
    result = runner.invoke(app, ["generate", "--victim-ckpt", str(root / "mlp.pt"), "--clean", str(root / "clean"),
                                 "--out", str(root / "adv"), "--method", "fgsm", "--eps", "0.1", "--eps", "0.3",
                                 "--split", "test", "--device", "cpu", "--workers", "0", "--store-float"])
    assert result.exit_code == 0, result.output
    return root


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _verify(folder: Path, *extra: str):
    return runner.invoke(app, ["verify", str(folder), *extra])


def _refresh_digest(folder: Path, name: str) -> None:
    """Record ``name``'s current sha256 in _stats.json and the card, as a careful forger would."""
    stats = json.loads((folder / "_stats.json").read_text())
    old, new = stats["sha256"][name], file_digest(folder / name)
    stats["sha256"][name] = new
    write_json(folder / "_stats.json", stats)
    card = folder / "README.md"
    card.write_text(card.read_text().replace(old, new))


def test_good_clean_and_variants_pass(data):
    assert verify_folder(data / "clean") == []
    result = _verify(data / "clean")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"OK {data / 'clean'}: clean mnist, ")
    assert "test 24" in result.stdout and "train 40" in result.stdout

    variants = [data / "adv" / "fgsm" / "eps=0.1", data / "adv" / "fgsm" / "eps=0.3"]
    assert find_folders(data / "adv") == variants
    result = _verify(data / "adv")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"OK {v}: variant mnist fgsm {v.name}, test 24" for v in variants]


def test_root_search_finds_clean_and_variants_but_not_plain_readmes(data, tmp_path):
    root = tmp_path / "data"
    _copy(data / "clean", root / "mnist" / "clean")
    _copy(data / "adv", root / "mnist" / "adv")
    (root / "README.md").write_text("# data/\n\nNot a card.\n")
    (root / "mnist" / ".clean.tmp-123").mkdir()  # an interrupted run's staging folder is not searched
    (root / "mnist" / ".clean.tmp-123" / "train-000000.tar").write_bytes(b"")
    assert find_folders(root) == [root / "mnist" / "adv" / "fgsm" / "eps=0.1",
                                  root / "mnist" / "adv" / "fgsm" / "eps=0.3", root / "mnist" / "clean"]
    assert _verify(root).exit_code == 0


def test_flipped_byte_names_the_shard_and_both_digests(data, tmp_path):
    folder = _copy(data / "adv" / "fgsm" / "eps=0.1", tmp_path / "v")
    tar = folder / "test-000001.tar"
    want = file_digest(tar)
    raw = bytearray(tar.read_bytes())
    raw[700] ^= 0xFF  # inside the first sample's PNG
    tar.write_bytes(bytes(raw))
    got = file_digest(tar)
    problems = verify_folder(folder)
    assert f"test-000001.tar: sha256 {got[:12]}… differs from the recorded {want[:12]}…" in problems
    assert all(p.startswith(("test-000001.tar", "test-000001.parquet")) for p in problems), problems
    result = _verify(folder)
    assert result.exit_code == 1
    assert result.stdout.startswith(f"FAIL {folder}\n") and "    test-000001.tar: sha256 " in result.stdout


def test_deleted_shard_is_missing_and_short(data, tmp_path):
    folder = _copy(data / "clean", tmp_path / "c")
    (folder / "test-000002.tar").unlink()
    problems = verify_folder(folder)
    assert "test-000002.tar: missing (listed in _stats.json)" in problems
    assert "test: 16 samples, the card/stats say 24" in problems
    assert _verify(folder).exit_code == 1


def test_stray_tar_and_partial_write_are_named(data, tmp_path):
    folder = _copy(data / "adv" / "fgsm" / "eps=0.3", tmp_path / "v")
    shutil.copy(folder / "test-000000.tar", folder / "test-000003.tar")
    (folder / ".test-000001.tar.tmp-4242").write_bytes(b"partial")
    assert verify_folder(folder) == [
        ".test-000001.tar.tmp-4242: a partial write left behind by an interrupted run",
        "test-000003.tar: not listed in _stats.json (a stray or leftover .tar file)",
    ]


def test_card_that_disagrees_with_the_stats(data, tmp_path):
    variant = _copy(data / "adv" / "fgsm" / "eps=0.1", tmp_path / "v")
    card = variant / "README.md"
    card.write_text(card.read_text().replace("  eps: 0.1\n", "  eps: 0.3\n", 1))
    assert verify_folder(variant) == ["README.md: advgen.eps is 0.3, _stats.json says 0.1"]

    clean = _copy(data / "clean", tmp_path / "c")
    card = clean / "README.md"
    text = card.read_text()
    digest = json.loads((clean / "_stats.json").read_text())["sha256"]["train-000000.tar"]
    card.write_text(text.replace("    num_examples: 24\n", "    num_examples: 25\n")
                    .replace("- mnist\n", "- fashion_mnist\n").replace(digest, "0" * 64))
    problems = verify_folder(clean)
    assert 'README.md: source_datasets is ["fashion_mnist"], _stats.json says ["mnist"]' in problems
    assert any(p.startswith("README.md: dataset_info splits are ") and '"num_examples": 25' in p
               for p in problems), problems
    assert f"README.md: sha256 of train-000000.tar is {'0' * 12}…, _stats.json says {digest[:12]}…" in problems
    assert len(problems) == 3, problems

    card.unlink()
    assert verify_folder(clean) == ["README.md: missing (every advgen folder carries its card)"]


def test_shorter_valid_tar_with_patched_checksums_is_caught_by_the_count(data, tmp_path):
    folder = _copy(data / "clean", tmp_path / "c")
    tar, manifest = folder / "test-000001.tar", folder / "test-000001.parquet"
    samples = [{"__key__": k, **m} for k, m in iter_tar(tar)][:5]
    old_bytes = sum(p.stat().st_size for p in folder.glob("test-*.tar"))
    write_tar(tar, samples)
    write_parquet(manifest, pq.read_table(manifest).slice(0, 5))
    _refresh_digest(folder, tar.name)
    _refresh_digest(folder, manifest.name)
    assert verify_folder(folder, deep=False) == [  # the card's byte count of the split gives it away ...
        next(p for p in verify_folder(folder, deep=False) if "num_bytes" in p and "dataset_info splits" in p)]
    card = folder / "README.md"  # ... so a careful forger patches that too
    new_bytes = sum(p.stat().st_size for p in folder.glob("test-*.tar"))
    card.write_text(card.read_text().replace(f"num_bytes: {old_bytes}\n", f"num_bytes: {new_bytes}\n"))
    assert verify_folder(folder) == ["test: 21 samples, the card/stats say 24"]
    assert verify_folder(folder, deep=False) == []  # only reading the samples can tell
    result = _verify(folder)
    assert result.exit_code == 1 and "    test: 21 samples, the card/stats say 24" in result.stdout
    assert _verify(folder, "--no-deep").exit_code == 0


def test_bad_samples_are_named_by_key(data, tmp_path):
    folder = _copy(data / "adv" / "fgsm" / "eps=0.1", tmp_path / "v")
    tar = folder / "test-000000.tar"
    samples = [{"__key__": k, **m} for k, m in iter_tar(tar)]
    samples[1]["pyd"] = b"\x80\x04N."  # a pickle: a shared dataset must not carry one
    samples[2]["png"] = encode_png(torch.zeros(27, 28, 1, dtype=torch.uint8).numpy())
    samples[3]["cls"] = b"10"
    del samples[4]["npy"]
    write_tar(tar, samples)
    _refresh_digest(folder, tar.name)
    problems = verify_folder(folder)
    assert [p for p in problems if p.startswith("test-000000.tar")] == [
        "test-000000.tar: sample 000001 has a .pyd member; expected only .cls, .npy, .png",
        "test-000000.tar: sample 000002: png is 27×28×1 uint8, expected 28×28×1 uint8",
        "test-000000.tar: sample 000003: cls 10 is outside [0, 10)",
        "test-000000.tar: sample 000004 lacks .npy",
    ]
    # The manifest still records the old tar's sha256, and its labels now disagree at sample 000003.
    assert any(p.startswith("test-000000.parquet: records tar sha256 ") for p in problems)
    assert any(p.startswith("test-000000.parquet: labels differ from test-000000.tar's at row 3 (key 000003)")
               for p in problems), problems


def test_manifest_keys_must_follow_the_tar(data, tmp_path):
    folder = _copy(data / "adv" / "fgsm" / "eps=0.3", tmp_path / "v")
    manifest = folder / "test-000002.parquet"
    table = pq.read_table(manifest)  # keeps the schema metadata (fingerprint, tar sha256)
    keys = table["key"].to_pylist()
    table = table.set_column(0, "key", pa.array(keys[::-1], pa.string()))
    write_parquet(manifest, table)
    _refresh_digest(folder, manifest.name)
    assert verify_folder(folder) == [
        (f"test-000002.parquet: keys differ from test-000002.tar's at row 0 (key {keys[0]}): "
         f'"{keys[-1]}" in the manifest, "{keys[0]}" in the tar'),
    ]


def test_broken_or_missing_stats(data, tmp_path):
    folder = _copy(data / "clean", tmp_path / "c")
    (folder / "_stats.json").write_text("{not json")
    assert verify_folder(folder)[0].startswith("_stats.json: not readable JSON")
    (folder / "_stats.json").write_text(json.dumps({"kind": "model", "dataset": "mnist"}))
    assert "_stats.json: kind is 'model', expected one of clean, variant" in verify_folder(folder)
    (folder / "_stats.json").unlink()
    assert verify_folder(folder) == [
        "_stats.json: missing (written last by advgen: the folder is incomplete or not advgen's)"]


def test_root_with_one_bad_variant(data, tmp_path):
    root = _copy(data / "adv", tmp_path / "adv")
    good, bad = root / "fgsm" / "eps=0.1", root / "fgsm" / "eps=0.3"
    (bad / "test-000000.tar").unlink()
    result = _verify(root)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == f"OK {good}: variant mnist fgsm eps=0.1, test 24"
    assert lines[1] == f"FAIL {bad}"
    assert "    test-000000.tar: missing (listed in _stats.json)" in lines[2:]
    assert "1 of 2 folder(s) OK" in result.stderr


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nowhere", "no such folder"),
    (lambda p: p, "holds no advgen folder"),
])
def test_nothing_to_verify_exits_2_with_one_line(tmp_path, make, message):
    result = _verify(make(tmp_path))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advgen verify: error: ") and message in lines[0], lines
