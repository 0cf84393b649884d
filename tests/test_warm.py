"""``advgen serve`` and the ``advgen`` script with ADVGEN_SERVER: real processes over a real Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import VENV_BIN, tiny_clean

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets and fork")
ADVGEN = str(VENV_BIN / "advgen")


@pytest.fixture()
def server(cli_env):
    """A running ``advgen serve``; yields (socket path, its process). The socket lives in a short private
    folder: Unix socket paths are limited to ~100 bytes, and pytest's tmp_path can be longer."""
    folder = Path(tempfile.mkdtemp(prefix="advgen-"))
    sock = folder / "s.sock"
    proc = subprocess.Popen([ADVGEN, "serve", "--socket", str(sock), "--usage", str(folder / "usage.jsonl")],
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not sock.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "advgen serve did not start"
        time.sleep(0.1)
    yield sock, proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    clean = tiny_clean(root, train=32, test=16)
    subprocess.run([ADVGEN, "train", "--dataset", "mnist", "--clean", str(clean), "--victim", "simple_cnn", "--epochs", "1",
                    "--batch-size", "16", "--out", str(root / "cnn.pt"), "--metrics", str(root / "train.json"),
                    "--device", "cpu"], check=True, capture_output=True, env={**os.environ,
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"})
    return root, clean


def _generate(env: dict, root: Path, clean: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([ADVGEN, "generate", "--victim-ckpt", str(root / "cnn.pt"), "--clean", str(clean),
                           "--out", out, "--metrics", f"{out}.json", "--method", "fgsm", "--method", "pgd",
                           "--method", "deepfool", "--eps", "0.1", "--steps", "3", "--split", "train", "--split",
                           "test", "--device", "cpu", *extra],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_command_in_the_server_writes_the_bytes_a_fresh_process_writes(server, trained, cli_env):
    sock, proc = server
    root, clean = trained
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600  # only its user may connect
    fresh = _generate({**cli_env, "OMP_NUM_THREADS": "1"}, root, clean, "fresh")
    warm = _generate({**cli_env, "OMP_NUM_THREADS": "1", "ADVGEN_SERVER": str(sock)}, root, clean, "warm")
    assert fresh.returncode == warm.returncode == 0, warm.stderr
    assert "no server" not in warm.stderr and proc.poll() is None
    a, b = _files(root / "fresh"), _files(root / "warm")
    assert len(a) > 10 and a == b  # every shard, manifest, card and stats file, byte for byte
    assert fresh.stdout.replace("fresh", "warm") == warm.stdout


def test_the_server_accounts_for_every_command_it_ran(server, trained, cli_env, tmp_path):
    sock, _ = server
    env = {**cli_env, "ADVGEN_SERVER": str(sock)}
    ok = subprocess.run([ADVGEN, "generate", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    bad = subprocess.run([ADVGEN, "report", "--metrics-dir", "nowhere", "--out", "r"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert (ok.returncode, bad.returncode) == (0, 2)
    deadline = time.monotonic() + 30  # the server writes a line once it has reaped the child
    usage = sock.parent / "usage.jsonl"
    while len(usage.read_text().splitlines() if usage.exists() else []) < 2:
        assert time.monotonic() < deadline, "no usage lines"
        time.sleep(0.05)
    lines = [json.loads(line) for line in usage.read_text().splitlines()]
    assert [(u["argv"][:2], u["exit"], u["cwd"]) for u in lines] == [
        (["generate", "--help"], 0, str(tmp_path)), (["report", "--metrics-dir"], 2, str(tmp_path))]
    for u in lines:
        assert u["wall_s"] > 0 and u["user_s"] >= 0 and u["sys_s"] >= 0 and u["max_rss_mib"] > 10


def test_bad_input_in_the_server_is_the_same_one_line_error_and_status(server, trained, cli_env):
    sock, _ = server
    root, clean = trained
    bad = ["--method", "no_such_method"]
    fresh = _generate(cli_env, root, clean, "bad1", *bad)
    warm = _generate({**cli_env, "ADVGEN_SERVER": str(sock)}, root, clean, "bad1", *bad)
    assert fresh.returncode == warm.returncode == 2
    assert warm.stderr == fresh.stderr and warm.stderr.count("\n") == 1 and "no_such_method" in warm.stderr
    assert not (root / "bad1").exists()


def test_without_a_server_the_script_says_so_and_runs_the_command_itself(trained, cli_env, tmp_path):
    proc = subprocess.run([ADVGEN, "--version"], env={**cli_env, "ADVGEN_SERVER": str(tmp_path / "none.sock")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("advgen ")
    assert f"no server at ADVGEN_SERVER={tmp_path / 'none.sock'}" in proc.stderr


def test_a_client_that_goes_away_interrupts_its_command_and_leaves_nothing_partial(server, trained, cli_env):
    sock, proc = server
    root, clean = trained
    log = root / "long.log"
    with open(log, "w") as out:
        client = subprocess.Popen([ADVGEN, "generate", "--victim-ckpt", str(root / "cnn.pt"), "--clean", str(clean),
                                   "--out", "long", "--metrics", "long.json", "--method", "pgd", "--eps", "0.1",
                                   "--steps", "100000", "--split", "test", "--device", "cpu"],
                                  cwd=root, env={**cli_env, "ADVGEN_SERVER": str(sock)}, stdout=out,
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "variant(s)" not in log.read_text():  # the child is under way
            assert time.monotonic() < deadline and client.poll() is None, log.read_text()
            time.sleep(0.1)
        client.kill()  # SIGKILL: the client cannot tell anyone; its socket closes
        client.wait()
    deadline = time.monotonic() + 120
    while "interrupted" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    assert "nothing partial was left in place" in log.read_text()
    assert not list((root / "long").rglob("*.tar")) and not (root / "long.json").exists()
    assert proc.poll() is None  # the server lives on


def test_a_second_server_on_a_live_socket_is_refused(server, cli_env):
    sock, _ = server
    proc = subprocess.run([ADVGEN, "serve", "--socket", str(sock)], env=cli_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "already listens" in proc.stderr and sock.exists()
