"""advgen pointed at the wrong folders and fed bad input, as a hostile or careless user would.

Each test here failed before the fix it guards: data outside the output was
deleted or overwritten, a killed run left a complete-looking folder, a writer
process outlived its parent, or the user saw a traceback instead of one line.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import VENV_BIN, WRITERS, small_spec, tiny_clean
from typer.testing import CliRunner

from advgen.storage.outputs import clean_stale, recover, replace_dir
from advgen.storage.shards import encode_png, file_digest, write_json
from advgen.stages.cli import app
from advgen.victims.train import Recipe, train_victim
from advgen.victims import CKPT_FORMAT, build, checkpoint_bytes, save

runner = CliRunner()


def _fails(args: list[str], message: str) -> str:
    """The command fails with exit 2 and exactly one ``advgen <cmd>: error:`` line holding ``message``."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("advgen ")]
    assert len(lines) == 1 and lines[0].startswith(f"advgen {args[0]}: error: "), result.stderr
    assert message in lines[0], lines[0]
    return lines[0]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """root/clean (mnist 48 + 24, shards of 8), root/raw (its IDX files) and root/mlp.pt (a trained mlp)."""
    root = tmp_path_factory.mktemp("hostile")
    clean = tiny_clean(root, train=48, test=24, shard_size=8)
    from advgen.data.clean import load_clean_split, open_clean

    x, y, _ = load_clean_split(clean, open_clean(clean), "train")
    model, _ = train_victim("mlp", dataset="mnist", num_classes=10, x=x, y=y,
                            recipe=Recipe(epochs=3, batch_size=8, lr=0.02), seed=0, device=torch.device("cpu"),
                            crop_pad=0, flip=False)
    model.meta.test_accuracy = 1.0
    save(model, root / "mlp.pt")
    return root


def _generate(setup: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--victim-ckpt", str(setup / "mlp.pt"), "--clean", str(setup / "clean"), "--out", str(out),
            "--device", "cpu", "--workers", "0", *extra]


# --- data loss and writes outside the output -------------------------------------------------------------------

def test_prepare_refuses_a_folder_it_did_not_write(setup, tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")
    _fails(["prepare", "--dataset", "mnist", "--out", str(out), "--raw", str(setup / "raw"), "--verify", "structure",
            "--no-download"], "is not a complete advgen clean folder")
    assert (out / "thesis.txt").read_text() == "four years of work"


def test_prepare_resolves_dotdot_before_deciding(setup, tmp_path):
    parent = tmp_path / "a"
    (parent / "b").mkdir(parents=True)
    (parent / "keep.txt").write_text("mine")
    _fails(["prepare", "--dataset", "mnist", "--out", str(parent / "b" / ".."), "--raw", str(setup / "raw"),
            "--verify", "structure", "--no-download"], f"{parent} already exists")
    assert (parent / "keep.txt").read_text() == "mine" and (parent / "b").is_dir()


def test_prepare_replaces_its_own_folder_and_an_empty_one(mnist_mirror, tmp_path):
    out = tmp_path / "clean"
    out.mkdir()  # empty: nothing to lose
    args = ["prepare", "--dataset", "mnist", "--out", str(out), "--mirror", str(mnist_mirror), "--raw",
            str(tmp_path / "raw"), "--verify", "structure", "--no-download", "--limit", "16"]
    for _ in range(2):  # the second run replaces a complete clean folder
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert json.loads((out / "_stats.json").read_text())["kind"] == "clean"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]  # no staging or aside folders left


def test_prepare_out_that_is_a_file_fails_before_reading(setup, tmp_path):
    out = tmp_path / "file"
    out.write_text("not a folder")
    _fails(["prepare", "--dataset", "mnist", "--out", str(out), "--raw", str(setup / "raw"), "--verify", "structure",
            "--no-download"], "is a file")
    assert out.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_swap_is_whole_and_an_aside_copy_of_a_killed_swap_comes_back(tmp_path):
    out, new = tmp_path / "clean", tmp_path / ".clean.tmp-1"
    out.mkdir()
    (out / "old").write_text("old")
    new.mkdir()
    (new / "new").write_text("new")
    replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["new"] and not new.exists()
    # A run killed between renaming the old folder aside and renaming the new one in:
    aside = tmp_path / f".clean.old-{_dead_pid()}"
    os.rename(out, aside)
    assert recover(out) and (out / "new").read_text() == "new" and not aside.exists()
    # Staging folders of dead writers go; a live writer's stays.
    dead, live = tmp_path / f".clean.tmp-{_dead_pid()}", tmp_path / f".clean.tmp-{os.getpid()}"
    dead.mkdir()
    live.mkdir()
    assert clean_stale(tmp_path) == [dead] and live.exists()


def test_prepare_cleans_staging_left_by_a_killed_run(mnist_mirror, tmp_path):
    stale = tmp_path / f".clean.tmp-{_dead_pid()}"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"partial")
    result = runner.invoke(app, ["prepare", "--dataset", "mnist", "--out", str(tmp_path / "clean"), "--mirror",
                                 str(mnist_mirror), "--raw", str(tmp_path / "raw"), "--verify", "structure",
                                 "--no-download", "--limit", "16"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]


@pytest.mark.parametrize("name", ["../../escaped.tar", "/tmp/advgen-escaped.tar", ".hidden.tar"])
def test_crafted_stats_cannot_make_generate_write_outside(setup, tmp_path, name):
    clean = tmp_path / "deep" / "er" / "clean"
    shutil.copytree(setup / "clean", clean)
    stats = json.loads((clean / "_stats.json").read_text())
    first = stats["shards"]["test"][0]
    stats["shards"]["test"][0] = name
    stats["sha256"][name] = stats["sha256"].pop(first)
    write_json(clean / "_stats.json", stats)
    out = tmp_path / "deep" / "er" / "out"
    args = _generate(setup, out, "--method", "fgsm", "--eps", "0.1", "--split", "test")
    args[args.index("--clean") + 1] = str(clean)
    _fails(args, "is not a plain file name")
    assert not (tmp_path / "escaped.tar").exists() and not Path("/tmp/advgen-escaped.tar").exists()
    assert not out.exists() or not list(out.rglob("*.tar"))  # refused before any shard was written


def test_a_changed_variant_loses_its_completion_marker_before_its_first_new_shard(setup, tmp_path):
    from advgen.data.clean import open_clean
    from advgen.generation.driver import AttackParams, generate
    from advgen.storage.variants import Variant
    from advgen.victims import load

    out = tmp_path / "out"
    assert runner.invoke(app, _generate(setup, out, "--method", "pgd", "--eps", "0.1", "--steps", "2")).exit_code == 0
    folder = out / "pgd" / "eps=0.1"
    assert (folder / "_stats.json").is_file()

    def killed(done: int, total: int, what: str) -> None:
        raise KeyboardInterrupt  # as if the process died right after its first new shard

    with pytest.raises(KeyboardInterrupt):
        generate(load(setup / "mlp.pt"), clean=setup / "clean", clean_stats=open_clean(setup / "clean"), out=out,
                 variants=[Variant("pgd", 0.1)], splits=["train", "test"], params=AttackParams(steps=3),
                 victim_sha256=file_digest(setup / "mlp.pt"), device=torch.device("cpu"), batch_size=256,
                 workers=0, on_progress=killed)
    assert not (folder / "_stats.json").exists() and not (folder / "README.md").exists()
    assert runner.invoke(app, ["verify", str(folder)]).exit_code == 1


def test_batch_size_is_part_of_the_fingerprint(setup, tmp_path):
    out = tmp_path / "out"
    base = _generate(setup, out, "--method", "deepfool", "--max-iter", "5")
    first = runner.invoke(app, [*base, "--batch-size", "5"])
    assert first.exit_code == 0 and "0 already done" in first.stderr
    other = runner.invoke(app, [*base, "--batch-size", "7"])
    assert other.exit_code == 0 and "9 shard(s) computed, 0 already done" in other.stderr  # never mixed
    again = runner.invoke(app, [*base, "--batch-size", "7"])
    assert again.exit_code == 0 and "0 shard(s) computed, 9 already done" in again.stderr
    stats = json.loads((out / "deepfool" / "_stats.json").read_text())
    assert stats["batch_size"] == 7 and "batch size 7" in (out / "deepfool" / "README.md").read_text()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_writer_processes_die_with_a_killed_generate(setup, tmp_path, cli_env):
    out = tmp_path / "out"
    cmd = [str(VENV_BIN / "advgen"), *_generate(setup, out, "--method", "pgd", "--eps", "0.1", "--steps", "3000",
                                                "--batch-size", "8")]
    cmd[cmd.index("--workers") + 1] = "1"
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, kids = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None and not kids:
        kids = _children(proc.pid)
        time.sleep(0.05)
    assert kids, "the writer process never started (or the run ended first)"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(Path(f"/proc/{k}").exists() for k in kids):
        time.sleep(0.1)
    alive = [k for k in kids if Path(f"/proc/{k}").exists()]
    for k in alive:
        os.kill(k, signal.SIGKILL)
    assert not alive, "writer processes outlived their parent"


def _repack_first_test_shard(folder: Path, extra) -> str:
    """Rewrite test-000000.tar through ``extra(tar, members)``, then record its new sha256 as a forger would."""
    stats = json.loads((folder / "_stats.json").read_text())
    name = stats["shards"]["test"][0]
    with tarfile.open(folder / name) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data))
        extra(t, members)
    old, new = stats["sha256"][name], file_digest(folder / name)
    stats["sha256"][name] = new
    write_json(folder / "_stats.json", stats)
    card = folder / "README.md"
    card.write_text(card.read_text().replace(old, new))
    return name


def _link(kind: bytes, target: str):
    def add(t: tarfile.TarFile, members) -> None:
        info = tarfile.TarInfo("009999.png")
        info.type, info.linkname = kind, target
        t.addfile(info)
    return add


@pytest.mark.parametrize("kind, word", [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link")])
def test_verify_fails_shards_with_link_members(setup, tmp_path, kind, word):
    folder = tmp_path / "clean"
    shutil.copytree(setup / "clean", folder)
    name = _repack_first_test_shard(folder, _link(kind, "/etc/passwd" if kind == tarfile.SYMTYPE else "000000.png"))
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1 and "FAIL" in result.stdout and word in result.stdout and name in result.stdout


def test_verify_fails_listed_files_that_are_symlinks_and_never_follows_them(setup, tmp_path):
    folder = tmp_path / "clean"
    shutil.copytree(setup / "clean", folder)
    stats = json.loads((folder / "_stats.json").read_text())
    name = stats["shards"]["test"][0]
    outside = tmp_path / "outside.tar"
    shutil.move(folder / name, outside)  # the same bytes, now outside the folder
    (folder / name).symlink_to(outside)
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1 and f"{name}: is a symbolic link" in result.stdout


# --- one line, exit 2, instead of a traceback ------------------------------------------------------------------

def test_checkpoint_with_missing_metadata(tmp_path):
    torch.save({"format": CKPT_FORMAT, "meta": {"dataset": "mnist"}, "state_dict": {}}, tmp_path / "bad.pt")
    _fails(["inspect", "--ckpt", str(tmp_path / "bad.pt")], "metadata lacks 'arch'")


def _one_bad_sample(setup: Path, tmp_path: Path, png: bytes | None = None, label: bytes = b"3") -> Path:
    folder = tmp_path / "clean"
    shutil.copytree(setup / "clean", folder)

    def add(t: tarfile.TarFile, members) -> None:
        good = next(data for info, data in members if info.name.endswith(".png"))
        for ext, data in (("png", png if png is not None else good), ("cls", label)):
            info = tarfile.TarInfo(f"009999.{ext}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

    stats = json.loads((folder / "_stats.json").read_text())
    _repack_first_test_shard(folder, add)
    stats = json.loads((folder / "_stats.json").read_text())
    stats["counts"]["test"] += 1
    write_json(folder / "_stats.json", stats)
    return folder


@pytest.mark.parametrize("png, label, message", [
    (b"\x89PNG\r\n\x1a\nnot really", b"3", "sample 009999: not a decodable PNG"),
    (encode_png(np.zeros((20, 20, 1), np.uint8)), b"3", "sample 009999: image is 20x20x1 uint8, expected 28x28x1"),
    (None, b"99", "sample 009999: label 99 is outside [0, 10)"),
    (None, b"-1", "sample 009999: label '-1' is not a class index"),
])
def test_train_refuses_bad_content_behind_valid_checksums(setup, tmp_path, png, label, message):
    folder = _one_bad_sample(setup, tmp_path, png, label)
    _fails(["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(folder), "--out", str(tmp_path / "m.pt"),
            "--metrics", str(tmp_path / "m.json"), "--epochs", "1", "--device", "cpu"], message)
    assert not (tmp_path / "m.pt").exists()


def test_idx_dimensions_that_overflow(tmp_path):
    raw = tmp_path / "raw"
    WRITERS["mnist"](raw, small_spec("mnist", train=8, test=8))
    header = bytes([0, 0, 8, 3]) + b"".join((2**32 - 1).to_bytes(4, "big") for _ in range(3))
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + b"\0" * 64))
    _fails(["prepare", "--dataset", "mnist", "--out", str(tmp_path / "c"), "--raw", str(raw), "--verify", "structure",
            "--no-download"], "IDX header declares")


def test_gzip_bomb_is_stopped(tmp_path):
    raw = tmp_path / "raw"
    WRITERS["mnist"](raw, small_spec("mnist", train=8, test=8))
    bomb = gzip.compress(bytes([0, 0, 8, 1]) + (2**31).to_bytes(4, "big") + b"\0" * (300 << 20), compresslevel=1)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(bomb)
    _fails(["prepare", "--dataset", "mnist", "--out", str(tmp_path / "c"), "--raw", str(raw), "--verify", "structure",
            "--no-download"], "decompression bomb")


def test_evaluate_with_a_missing_checkpoint(setup, tmp_path):
    out = tmp_path / "adv"
    assert runner.invoke(app, _generate(setup, out, "--method", "fgsm", "--eps", "0.1", "--split", "test")).exit_code == 0
    base = ["evaluate", "--adv", str(out), "--clean", str(setup / "clean"), "--metrics", str(tmp_path / "e.json"),
            "--plots", str(tmp_path / "plots"), "--samples", str(tmp_path / "s.parquet")]
    _fails([*base, "--victim-ckpt", str(tmp_path / "nowhere.pt")], "no such checkpoint")
    _fails([*base, "--curve-split", "validation"], "--curve-split 'validation'")
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("args, message", [
    (["report", "--metrics-dir", "m", "--out", "r", "--seed", "-1"], "--seed must lie in [0, 2^63)"),
    (["report", "--metrics-dir", "m", "--out", "r", "--jobs", "-1"], "--jobs must be >= 0"),
    (["train", "--dataset", "mnist", "--victim", "mlp", "--clean", "c", "--out", "m.pt", "--metrics", "m.json",
      "--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["defend", "--victim-ckpt", "v.pt", "--clean", "c", "--adv", "a", "--metrics", "m.json", "--plots", "p",
      "--scale", "nan"], "--scale must be a finite number, got nan"),
    (["retrain", "--victim-ckpt", "v.pt", "--clean", "c", "--adv", "a", "--out", "o", "--metrics", "m.json",
      "--clean-ratio", "inf"], "--clean-ratio must be a finite number, got inf"),
])
def test_values_no_command_accepts(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    _fails(args, message)
    assert list(tmp_path.iterdir()) == []


def test_train_out_that_is_a_folder_fails_before_training(setup, tmp_path):
    (tmp_path / "m.pt").mkdir()
    _fails(["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(setup / "clean"), "--out",
            str(tmp_path / "m.pt"), "--metrics", str(tmp_path / "m.json"), "--device", "cpu"], "is a folder")
    assert not (tmp_path / "m.json").exists()


def test_non_utf8_path(setup, tmp_path):
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    _fails(["prepare", "--dataset", "mnist", "--out", out, "--raw", str(setup / "raw"), "--verify", "structure",
            "--no-download"], "is not valid UTF-8")
    assert list(tmp_path.iterdir()) == []


def _in_small_mount(script: str, tmp_path: Path, cli_env: dict, options: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a private tmpfs mounted at tmp_path/mnt, in a user + mount namespace."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here to mount a small file system: {probe.stderr.decode().strip()}")
    sh = f"mount -t tmpfs -o {options} tmpfs {mnt} && {script}"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", sh], env=cli_env,
                          capture_output=True, text=True, timeout=300)


def test_disk_full_is_one_line_and_leaves_nothing_partial(mnist_mirror, tmp_path, cli_env):
    out = tmp_path / "mnt" / "clean"
    proc = _in_small_mount(f"{VENV_BIN / 'advgen'} prepare --dataset mnist --out {out} --mirror {mnist_mirror} "
                           f"--raw {tmp_path / 'raw'} --verify structure --no-download --limit 16; echo rc=$?; "
                           f"ls -A {out.parent}", tmp_path, cli_env, "size=48k")
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("advgen prepare: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in proc.stderr
    assert proc.stdout.split("rc=2")[1].strip() == ""  # the staging folder was removed: the mount is empty


def test_read_only_output_fails_before_the_work(setup, tmp_path, cli_env):
    out = tmp_path / "mnt" / "clean"
    proc = _in_small_mount(f"{VENV_BIN / 'advgen'} prepare --dataset mnist --out {out} --raw {setup / 'raw'} "
                           "--verify structure --no-download; echo rc=$?", tmp_path, cli_env, "size=1m,ro")
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("advgen prepare: error:")]
    assert len(errors) == 1 and "Read-only file system" in errors[0], proc.stderr
    assert "reading" not in proc.stderr  # refused before the dataset was read


# --- stored copies and what they claim -------------------------------------------------------------------------

def test_stored_copies_hold_their_eps_and_eps_may_be_a_fraction(setup, tmp_path):
    out = tmp_path / "adv"
    result = runner.invoke(app, _generate(setup, out, "--method", "fgsm,fgm_l2", "--eps", "0.1", "--eps", "8/255",
                                          "--eps", "0.5", "--split", "train,test"))
    assert result.exit_code == 0, result.output
    for method, eps in (("fgsm", 0.1), ("fgsm", 8 / 255), ("fgm_l2", 0.5), ("fgm_l2", 0.1)):
        folder = out / method / f"eps={eps!r}"
        stats = json.loads((folder / "_stats.json").read_text())
        assert set(stats["counts"]) == {"train", "test"}
        for split in ("train", "test"):
            table = pq.read_table(folder / stats["shards"][split][0].replace(".tar", ".parquet"))
            from conftest import read_split_by_hand

            keys, adv, _ = read_split_by_hand(folder, split)
            _, x0, _ = read_split_by_hand(setup / "clean", split)
            delta = adv.astype(np.int64) - x0.astype(np.int64)
            if method == "fgsm":  # every pixel within ⌊255ε⌋ steps, as stored
                assert np.abs(delta).max() == int(np.floor(255 * eps + 1e-6))
            else:
                assert (np.sqrt((delta.reshape(len(keys), -1) ** 2).sum(1)) / 255).max() <= eps + 1e-9
            assert table["linf"].to_numpy().max() <= eps + 1e-6 if method == "fgsm" else True


def test_eps_is_ignored_by_deepfool_with_a_warning(setup, tmp_path):
    result = runner.invoke(app, _generate(setup, tmp_path / "adv", "--method", "deepfool", "--eps", "0.1",
                                          "--max-iter", "3", "--split", "test"))
    assert result.exit_code == 0, result.output
    assert "warning: --eps does not apply to deepfool" in result.stderr
    assert (tmp_path / "adv" / "deepfool" / "_stats.json").is_file()


def test_checkpoint_bytes_depend_on_the_model_only(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build("mlp", dataset="mnist", input_shape=(1, 28, 28), num_classes=10, mean=[0.5], std=[0.5])
    save(model, tmp_path / "a.pt")
    save(model, tmp_path / "renamed.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "renamed.pt").read_bytes() == checkpoint_bytes(model)
    assert b"git" not in (tmp_path / "a.pt").read_bytes()  # no commit or dirty flag inside


def test_version(cli_env):
    from importlib import metadata

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"advgen {metadata.version('advgen')}"
