"""``advgen serve``: a warm interpreter that runs ``advgen`` commands in forked children (``advgen.stages.warm``)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from advgen.errors import BadParameter
from advgen.stages.app import log, stage
from advgen.stages.warm import SERVER_ENV
from advgen.stages.warm import serve as listen


@stage
def serve(socket: Path = typer.Option(..., help=f"Unix socket to listen on; point {SERVER_ENV} at it."),
          usage: Path | None = typer.Option(None, help="Append a JSON line per finished command to this file: "
                                                       "argv, cwd, exit status, wall/user/sys seconds, peak RSS."),
          ) -> None:
    """Import torch and advgen once, then run every `advgen` command whose environment has ADVGEN_SERVER=SOCKET
    in a forked child of this process: for DVC graphs of many short stages on a CPU (each saves ~1.5 s of
    imports). Same outputs, exit status and messages as a fresh process. Stops on Ctrl-C or SIGTERM."""
    if sys.platform == "win32":
        raise BadParameter("advgen serve needs Unix sockets and fork (Linux, macOS)")
    if not socket.parent.is_dir():
        raise BadParameter(f"--socket {socket}: folder {socket.parent} does not exist")
    if usage is not None and not usage.parent.is_dir():
        raise BadParameter(f"--usage {usage}: folder {usage.parent} does not exist")
    if len(str(socket.resolve())) > 100:
        raise BadParameter(f"--socket {socket}: path longer than a Unix socket allows (about 100 bytes)")
    try:
        listen(socket, log=log, usage=usage)
    except FileExistsError as e:
        raise BadParameter(str(e)) from None
    except PermissionError as e:
        raise BadParameter(f"--socket {socket}: {e}") from None
