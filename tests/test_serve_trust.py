"""The ``advgen`` script hands its environment and terminal only to a server of its own user (issue: a socket
another user created got the client's secrets). Real processes over real Unix sockets; the impostor is a plain
Python listener that records whatever reaches it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ADVGEN = shutil.which("advgen") or str(Path(sys.executable).with_name("advgen"))
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets")

IMPOSTOR = r"""
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(4)
print("ready", flush=True)
conn, _ = s.accept()
data = conn.recv(65536)
open(log, "wb").write(data or b"(connected)")
conn.sendall((0).to_bytes(4, "big"))  # "exit status 0": a client that believed it would report success
"""


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")  # one a second user may run (the venv may be private)


def _impostor(folder: Path, *, user: int | None = None, log: Path | None = None):
    sock, log = folder / "s.sock", log or folder / "got.bin"
    kw = {"preexec_fn": (lambda: os.setuid(user))} if user is not None else {}
    python = SYSTEM_PYTHON if user is not None else sys.executable
    proc = subprocess.Popen([python, "-c", IMPOSTOR, str(sock), str(log)], stdout=subprocess.PIPE, text=True,
                            **kw)
    assert proc.stdout.readline().strip() == "ready"
    return proc, sock, log


def _client(sock: Path, cli_env: dict) -> subprocess.CompletedProcess:
    env = {**cli_env, "ADVGEN_SERVER": str(sock), "SECRET_TOKEN": "do-not-send"}
    return subprocess.run([ADVGEN, "--version"], env=env, capture_output=True, text=True, timeout=120)


def _refused(proc, result, log: Path, reason: str) -> None:
    time.sleep(0.2)
    assert result.returncode == 0 and "advgen" in result.stdout  # the command ran here, in the client
    assert f"not using ADVGEN_SERVER=" in result.stderr and reason in result.stderr, result.stderr
    assert not log.exists()  # nothing reached the impostor: no environment, no descriptors
    proc.kill()
    proc.wait()


def test_a_socket_in_a_folder_others_can_write_to_is_not_used(cli_env):
    folder = Path(tempfile.mkdtemp(prefix="advgen-"))
    os.chmod(folder, 0o777)  # like /tmp: anyone could have put a socket here first
    proc, sock, log = _impostor(folder)
    _refused(proc, _client(sock, cli_env), log, "its folder is not private")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")
def test_a_socket_of_another_user_is_not_used(cli_env):
    folder = Path(tempfile.mkdtemp(prefix="advgen-"))
    proc, sock, log = _impostor(folder)
    os.chown(sock, 65534, 65534)
    _refused(proc, _client(sock, cli_env), log, "the socket belongs to uid 65534")


@pytest.mark.skipif(os.getuid() != 0 or not hasattr(socket, "SO_PEERCRED") or SYSTEM_PYTHON is None,
                    reason="root, Linux, a system python3")
def test_a_server_running_as_another_user_is_not_used_even_behind_our_own_socket(cli_env):
    folder = Path(tempfile.mkdtemp(prefix="advgen-"))
    os.chmod(folder, 0o755)
    os.chown(folder, 65534, 65534)  # so that the second user can bind there and write its log
    logs = Path(tempfile.mkdtemp(prefix="advgen-log-"))
    os.chown(logs, 65534, 65534)  # where the second user records what reached it
    proc, sock, log = _impostor(folder, user=65534, log=logs / "got.bin")
    os.chown(folder, 0, 0)
    os.chmod(folder, 0o700)
    os.chown(sock, 0, 0)  # the file looks like ours; only the peer's credentials tell
    result = _client(sock, cli_env)
    assert "the server runs as uid 65534" in result.stderr, result.stderr
    assert result.returncode == 0 and "advgen" in result.stdout
    proc.wait(timeout=30)  # the client connected (that is how it learnt the uid) and hung up
    assert log.read_bytes() == b"(connected)"  # nothing was sent: no environment, no arguments, no descriptors


def test_serve_refuses_a_folder_others_can_write_to(cli_env):
    folder = Path(tempfile.mkdtemp(prefix="advgen-"))
    os.chmod(folder, 0o777)
    result = subprocess.run([ADVGEN, "serve", "--socket", str(folder / "s.sock")], env=cli_env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "is not private" in result.stderr and "Traceback" not in result.stderr
    assert not (folder / "s.sock").exists()
