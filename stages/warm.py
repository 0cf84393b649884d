"""A warm interpreter for many short commands: ``advgen serve`` and the client in the ``advgen`` script.

Every ``advgen`` command starts a Python process that imports torch, torchvision, pyarrow and webdataset
(about 1.5 s on a CPU core) before it does anything. A DVC graph of a few hundred stages on tiny data (the
smoke profile, a CPU demo) spends more time in those imports than in its work. ``advgen serve --socket
PATH`` imports all of it once and listens on a Unix socket; with ``ADVGEN_SERVER=PATH`` in its environment,
the ``advgen`` script sends its arguments, working directory, environment and its stdin/stdout/stderr
(the descriptors themselves, over SCM_RIGHTS) to the server, which forks a child that runs the command
exactly as a fresh process would and reports its exit status, which the script exits with.

What keeps a child's run the same as a fresh process's: the server imports modules only (no model, no
random draw, no CUDA, no parallel torch work before forking); the child takes the client's working
directory, environment and arguments, resets torch's thread count from its environment and reseeds torch's
default generator with its start-up seed (a client with no OMP_NUM_THREADS gets the thread count the server
started with: start it in the environment its commands run in). Only the script's user may connect (the socket is 0600 and the
server checks the peer's uid), and the script talks only to a server of its own user: the socket must be its own,
in a folder of its own that nobody else can write to, and the peer's uid must be its own (``untrusted``). If the client goes away (Ctrl-C, a killed ``dvc repro``), its child gets
SIGINT, so atomic writers clean up as they would. No server at PATH: the script says so and runs the
command itself.

This module imports only the standard library at the top, so the client stays light.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SERVER_ENV = "ADVGEN_SERVER"
_HEADER = struct.Struct("!I")  # payload length
_STATUS = struct.Struct("!i")  # exit status of the child


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(n - got)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --- the client (the ``advgen`` script when ADVGEN_SERVER is set) --------------------------------------

def untrusted(path: str) -> str | None:
    """Why the socket at ``path`` may belong to someone else, or None: it must be a socket owned by this user, in
    a folder owned by this user that nobody else can write to (else another user could have put it there, and
    would receive this command's environment and terminal)."""
    me = os.getuid()
    try:
        st = os.lstat(path)
        folder = os.lstat(os.path.dirname(os.path.abspath(path)))
    except FileNotFoundError:
        return None  # nothing there: connecting fails and says so
    except OSError as e:
        return f"cannot look at it ({e.strerror or e})"
    if not stat.S_ISSOCK(st.st_mode):
        return "not a socket"
    if st.st_uid != me:
        return f"the socket belongs to uid {st.st_uid}, not to you (uid {me})"
    if folder.st_uid != me or folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return ("its folder is not private (it must be yours and writable by you only, e.g. "
                "`mkdir -m 700 ~/.advgen`)")
    return None


def _peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end (Linux); None where the platform cannot say."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]


def forward(path: str, argv: list[str]) -> int | None:
    """Run ``advgen argv`` in the server at ``path``; its exit status, or None when no trusted server answers
    there (the command then runs in this process; the reason is printed once)."""
    reason = untrusted(path)
    if reason is not None:
        print(f"advgen: not using {SERVER_ENV}={path}: {reason}; running here", file=sys.stderr)
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        peer = _peer_uid(conn)
    except OSError as e:
        conn.close()
        print(f"advgen: no server at {SERVER_ENV}={path} ({e.strerror or e}); running here", file=sys.stderr)
        return None
    if peer is not None and peer != os.getuid():
        conn.close()
        print(f"advgen: not using {SERVER_ENV}={path}: the server runs as uid {peer}, not as you "
              f"(uid {os.getuid()}); running here", file=sys.stderr)
        return None
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    try:
        socket.send_fds(conn, [_HEADER.pack(len(payload))], [0, 1, 2])
        conn.sendall(payload)
        code = _STATUS.unpack(_recv_exact(conn, _STATUS.size))[0]
        return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it
    except KeyboardInterrupt:  # closing the connection makes the server interrupt the child
        return 130
    except (ConnectionError, OSError) as e:
        print(f"advgen: lost the server at {path} ({e}) before the command finished", file=sys.stderr)
        return 1
    finally:
        conn.close()


# --- the server ------------------------------------------------------------------------------------------

def _preload() -> None:
    """Import everything a command may import, so children start with it in memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import torchvision.models  # noqa: F401
    import torchvision.transforms.functional  # noqa: F401
    import webdataset  # noqa: F401

    from advgen.stages.app import app

    # `advgen serve` runs under the CLI, which has registered every stage (and, through them, the library)
    # on `app` before this runs: the children run `app` itself, so this module never imports the CLI back.
    if not app.registered_commands:
        raise RuntimeError("advgen serve runs from the advgen CLI (advgen.stages.cli), which registers the stages")

    for name in ("data.datasets", "analysis.directions", "report.directions", "storage.publish", "report", "evaluation.retrain", "data.byo"):
        __import__(f"advgen.{name}")


def _run_child(fds: list[int], request: dict, threads: int, inherited: list) -> None:
    """In the forked child: become the client's process, run the command, exit with its status.
    ``inherited``: the server's sockets and selector, closed here so that only the server holds them."""
    code = 1
    try:
        for obj in inherited:
            obj.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(SERVER_ENV, None)  # the command's own subprocesses start as usual
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import torch

        wanted = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0 else threads)
        torch.manual_seed(torch.initial_seed())  # the generator as a fresh process has it
        sys.argv = ["advgen", *request["argv"]]
        from advgen.stages.app import app

        try:
            app()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(path: Path, *, log=print, usage: Path | None = None) -> None:
    """Listen on ``path`` until SIGTERM or SIGINT; one forked child per request. ``usage``: append one JSON line
    per finished command to that file (its argv, working directory, exit status, wall, user and system CPU
    seconds): where a DVC graph's time goes, stage by stage."""
    _preload()
    import torch

    threads = torch.get_num_threads()
    path = Path(path)
    folder = path.absolute().parent.stat()
    if folder.st_uid != os.getuid() or folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path.parent} is not private: clients only use a socket in a folder that is yours "
                              "and writable by you only (e.g. `mkdir -m 700 ~/.advgen`)")
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a stale socket of a server that died
        else:
            raise FileExistsError(f"a server already listens on {path}")
        finally:
            probe.close()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    server.listen(64)
    server.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    children: dict[int, _Child] = {}
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"advgen serve: listening on {path} (set {SERVER_ENV}={path}); {threads} torch thread(s) by default")
    sys.stdout.flush()
    sys.stderr.flush()  # nothing buffered here may reach a child's client
    try:
        while not stopping:
            for key, _ in sel.select(timeout=0.05):
                if key.fileobj is server:
                    try:
                        conn, _ = server.accept()
                    except BlockingIOError:
                        continue
                    begun = _start(conn, threads, [server, sel, *(c.conn for c in children.values())])
                    if begun is None:
                        conn.close()
                        continue
                    pid, request = begun
                    children[pid] = _Child(conn, time.monotonic(), [str(a) for a in request.get("argv", [])],
                                           str(request.get("cwd", "")))
                    sel.register(conn, selectors.EVENT_READ, pid)
                else:  # readable while its child runs: the client went away
                    os.kill(key.data, signal.SIGINT)
                    sel.unregister(key.fileobj)
            while children:
                try:
                    pid, status, rusage = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                child = children.pop(pid, None)
                if child is None:
                    continue
                if usage is not None:
                    _account(usage, child, os.waitstatus_to_exitcode(status), rusage)
                conn = child.conn
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                try:
                    conn.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass
                conn.close()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGINT)
        server.close()
        path.unlink(missing_ok=True)


@dataclass
class _Child:
    """A running command: its client's connection, and what ``--usage`` reports of it."""

    conn: socket.socket
    start: float  # time.monotonic() at fork
    argv: list[str]
    cwd: str


def _account(path: Path, child: _Child, code: int, rusage) -> None:
    """Append one command's line to the ``--usage`` file (a write error is reported, never fatal). CPU seconds
    include the processes the command waited for (a report's figure workers)."""
    rss = rusage.ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)  # bytes on macOS, KiB on Linux
    line = {"argv": child.argv, "cwd": child.cwd, "exit": code, "wall_s": round(time.monotonic() - child.start, 3),
            "user_s": round(rusage.ru_utime, 3), "sys_s": round(rusage.ru_stime, 3), "max_rss_mib": round(rss, 1)}
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as e:
        print(f"advgen serve: --usage {path}: {e}", file=sys.stderr, flush=True)


def _start(conn: socket.socket, threads: int, inherited: list) -> tuple[int, dict] | None:
    """Read one request from ``conn`` and fork its child; the child's pid and the request, or None for a refused
    request."""
    conn.setblocking(True)
    try:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.getuid():
            return None
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(header) != _HEADER.size or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            return None
        request = json.loads(_recv_exact(conn, _HEADER.unpack(header)[0]))
    except (OSError, ConnectionError, ValueError):
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_child(fds, request, threads, [*inherited, conn])
    for fd in fds:
        os.close(fd)
    return pid, request
