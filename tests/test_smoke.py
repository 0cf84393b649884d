"""The smoke profile: the full study's whole graph under ``dvc repro``, on tiny data in every native format.

``smoke/params.yaml`` has exactly the full study's stages (five datasets x five
victims, every generation family, evaluate, transfer, retrain, defend, report)
at tiny sizes. The datasets are synthetic files written here in each
dataset's original format and at the file layout torchvision downloads
(``MNIST/raw/*.gz``, ``cifar-10-python.tar.gz``, ``train_32x32.mat``, ...), found
through ``ADVGEN_MIRROR`` as a user's mirror would be. Any stage the full study
would break on breaks here first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, WRITERS, copy_project, small_spec

SMOKE = ROOT / "smoke"
FOREACH = ("train", "generate", "evaluate", "transfer", "retrain", "defend", "directions")
DATASETS = ("cifar100", "cifar10", "svhn", "fashion_mnist", "mnist")  # the slowest first
PARALLEL = 3  # dataset repositories at a time


def _params(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_smoke_profile_has_exactly_the_full_studys_stages():
    full, smoke = _params(ROOT / "params.yaml"), _params(SMOKE / "params.yaml")
    assert smoke["prepare"]["datasets"] == full["prepare"]["datasets"]
    for section in FOREACH:
        assert sorted(smoke[section]) == sorted(full[section]), section
    for key, entry in full["generate"].items():  # every family with every method of the full study
        mine = smoke["generate"][key]
        assert (mine["dataset"], mine["victim"], mine["family"]) == (entry["dataset"], entry["victim"], entry["family"])
        assert mine["grid"]["method"] == entry["grid"]["method"] and mine["grid"]["split"] == entry["grid"]["split"]
    for key, entry in full["retrain"].items():
        assert (smoke["retrain"][key]["target"], smoke["retrain"][key]["source"]) == (entry["target"], entry["source"])
    assert smoke["prepare"]["verify"] == "structure" and 0 < smoke["prepare"]["limit"] <= 64


def write_mirror(root: Path, count: int = 40) -> Path:
    """Every registered dataset, ``count`` synthetic images per split, as torchvision lays the originals out."""
    places = {"mnist": root / "MNIST" / "raw", "fashion_mnist": root / "FashionMNIST" / "raw",
              "cifar10": root, "cifar100": root, "svhn": root}
    for name, folder in places.items():
        WRITERS[name](folder, small_spec(name, train=count, test=count), seed=3)
    return root


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 1800) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_smoke_profile_runs_every_stage_of_the_full_study(tmp_path, cli_env):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    shutil.copytree(SMOKE, repo / "smoke", ignore=shutil.ignore_patterns("data", "metrics", "reports", "dvc.lock",
                                                                        "tmp", "cache"))
    mirror = write_mirror(tmp_path / "mirror")
    env = {**cli_env, "ADVGEN_MIRROR": str(mirror)}
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke"], repo, env)

    full = {line.split()[0] for line in _run(["dvc", "stage", "list", "--name-only"], repo, env).splitlines()}
    smoke = {line.split()[0] for line in _run(["dvc", "stage", "list", "--name-only"], repo / "smoke", env).splitlines()}
    assert smoke == full and len(full) > 100, sorted(full ^ smoke)

    # Every stage under `dvc repro`. DVC re-reads and rewrites dvc.lock around every stage it runs, so one
    # process over all 177 stages spends most of its time in YAML (quadratic in the stage count) and holds
    # the repository lock while it does. So: `check` first here; then each dataset's stages (no stage of one
    # dataset depends on another's) in a copy of this repository of its own, PARALLEL at a time; then their outputs,
    # cache objects and lock entries gathered here, where `dvc repro` must find everything up to date but the
    # report, and run it.
    # Each stage's `advgen` runs in a child of one warm `advgen serve` (ADVGEN_SERVER): the same code and bytes
    # as a fresh process (tests/test_warm.py), without ~1.5 s of imports for each of the 177 stages.
    sock = Path(tempfile.mkdtemp(prefix="advgen-")) / "s.sock"  # short: Unix socket paths are limited
    usage = tmp_path / "usage.jsonl"  # a line per command: where the time goes, stage by stage
    server = subprocess.Popen(["advgen", "serve", "--socket", str(sock), "--usage", str(usage)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _smoke_stages(tmp_path, repo, full, {**env, "ADVGEN_SERVER": str(sock)}, server, sock)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(sock.parent, ignore_errors=True)
    commands = [json.loads(line) for line in usage.read_text().splitlines()]
    assert len(commands) == len(full) and {u["exit"] for u in commands} == {0}  # every stage's command, warm

    profile = repo / "smoke"
    for ds in DATASETS:
        stats = json.loads((profile / "data" / ds / "clean" / "_stats.json").read_text())
        assert stats["counts"] == {"train": 4, "test": 4} and stats["source"]["verification"] == "unverified"
        summary = json.loads((profile / "metrics" / ds / "resnet18" / "summary.json").read_text())
        assert {"fast/fgsm/eps=0.1", "iterative/pgd/eps=0.1", "minimal/deepfool", "universal/uap/eps=0.1"} <= \
            set(summary["variants"])
    report = (profile / "reports" / "README.md").read_text()
    for title in ("MNIST", "Fashion-MNIST", "CIFAR-10", "CIFAR-100", "SVHN"):
        assert f"## {title}" in report


def _merge_cache(src: Path, dst: Path) -> None:
    """Move DVC cache objects from ``src`` into ``dst`` (content-addressed: an object already there is the same)."""
    if not src.is_dir():
        return
    for obj in src.rglob("*"):
        if obj.is_file():
            target = dst / obj.relative_to(src)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                obj.rename(target)


def _smoke_stages(tmp_path: Path, repo: Path, full: set[str], env: dict, server: subprocess.Popen,
                  sock: Path) -> None:
    """Every stage under `dvc repro`: ``check``, then each dataset's stages in a copy of the repository (see the
    comment in the test), then the merged lock, where only ``report`` is left to run."""
    deadline = time.monotonic() + 300
    while not sock.exists():
        assert server.poll() is None and time.monotonic() < deadline, "advgen serve did not start"
        time.sleep(0.1)
    ran: list[str] = []

    def stages_of(out: str) -> list[str]:
        assert "no server at" not in out  # every command ran in the warm server
        return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]

    ran += stages_of(_run(["dvc", "repro", "check"], repo / "smoke", env))
    groups = {ds: [n for n in sorted(full) if "@" in n and n.split("@")[1].split("-")[0] == ds] for ds in DATASETS}
    assert sum(map(len, groups.values())) == len(full) - 2  # every stage but check and report has one dataset
    # One torch thread per stage: several processes share the cores, and oversubscribed OpenMP threads spin.
    penv = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    lock = yaml.safe_load((repo / "smoke" / "dvc.lock").read_text())
    waiting, running = list(groups), {}
    while waiting or running:
        while waiting and len(running) < PARALLEL:
            ds = waiting.pop(0)
            shutil.copytree(repo, tmp_path / ds, symlinks=True)
            log = open(tmp_path / f"{ds}.log", "w")
            running[ds] = (subprocess.Popen(["dvc", "repro", *groups[ds]], cwd=tmp_path / ds / "smoke", env=penv,
                                            stdout=log, stderr=subprocess.STDOUT), log)
        done = [ds for ds, (proc, _) in running.items() if proc.poll() is not None]
        if not done:
            time.sleep(0.5)
            continue
        for ds in done:
            proc, log = running.pop(ds)
            log.close()
            out = (tmp_path / f"{ds}.log").read_text()
            assert proc.returncode == 0, f"{ds}:\n{out[-6000:]}"
            assert sorted(stages_of(out)) == groups[ds], ds  # its own stages, each once
            ran += stages_of(out)
            part = tmp_path / ds / "smoke"
            for folder in ("data", "metrics"):  # moved, not copied: the outputs are gigabytes, all told
                (repo / "smoke" / folder).mkdir(exist_ok=True)
                (part / folder / ds).rename(repo / "smoke" / folder / ds)
            _merge_cache(part / ".dvc" / "cache", repo / "smoke" / ".dvc" / "cache")
            entries = yaml.safe_load((part / "dvc.lock").read_text())["stages"]
            shutil.rmtree(tmp_path / ds)
            assert set(entries) == {"check", *groups[ds]}, ds
            lock["stages"].update({n: e for n, e in entries.items() if n != "check"})
    (repo / "smoke" / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    ran += stages_of(_run(["dvc", "repro"], repo / "smoke", env))
    assert sorted(ran) == sorted(full), sorted(set(full) ^ set(ran))  # each stage once, all of them
    assert ran[0] == "check" and ran[-1] == "report"
    assert "up to date" in _run(["dvc", "status"], repo / "smoke", env)

