"""Where advgen writes: checks before work starts, whole-folder swaps, leftovers of killed runs.

advgen is meant to be safe to point at any folder:

* ``plain_name`` is applied to every file or split name read from metadata
  (``_stats.json``, manifests), so a crafted folder cannot make a reader or
  writer touch a path outside it;
* ``check_replaceable`` refuses to replace a folder that is not a complete
  advgen folder of the same kind (a folder holding someone's thesis is not
  prepare's to delete), after resolving the path (``a/b/..`` is ``a``);
* ``replace_dir`` swaps a finished staging folder in for the old output
  atomically (Linux ``renameat2(RENAME_EXCHANGE)``), or, where the file system
  cannot exchange, renames the old one aside first; ``recover`` puts an aside
  folder back if a run was killed in between;
* ``clean_stale`` removes staging folders and temporary files whose writing
  process is gone (names carry the writer's pid);
* ``check_writable`` and ``check_file_target`` find an unwritable or misnamed
  output before any compute.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
from pathlib import Path

from advgen.errors import BadParameter, CorruptFile

STATS = "_stats.json"
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]*")
_STAGING = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)")


def plain_name(name: object, *, where: object = "metadata") -> str:
    """``name`` if it is a plain file name (no folder part, no ``..``, nothing hidden); else ``CorruptFile``."""
    if not (isinstance(name, str) and _PLAIN.fullmatch(name) and ".." not in name):
        raise CorruptFile(where, f"lists {name!r}, which is not a plain file name inside the folder")
    return name


def check_stats_names(stats: dict, where: object) -> None:
    """Every split and file name a ``_stats.json`` lists must be a plain name (see ``plain_name``)."""
    shards, sha = stats.get("shards"), stats.get("sha256", {})
    if not isinstance(shards, dict) or not isinstance(sha, dict):
        raise CorruptFile(where, "shards and sha256 must be JSON objects")
    for split, names in shards.items():
        plain_name(split, where=where)
        if not isinstance(names, list):
            raise CorruptFile(where, f"shards of {split!r} must be a list of file names")
        for n in names:
            plain_name(n, where=where)
    for n in sha:
        plain_name(n, where=where)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def staging_path(out: Path, tag: str = "tmp") -> Path:
    """``.NAME.tmp-PID`` beside ``out``: where a new version is built before it is swapped in."""
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}")


def clean_stale(folder: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` entries of ``folder`` whose process is gone; returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _STAGING.fullmatch(p.name)
        if m is None or pid_alive(int(m["pid"])):
            continue
        if p.name.startswith(".") and ".old-" in p.name and not (folder / m["name"]).exists():
            continue  # an aside copy whose replacement never landed: recover() puts it back
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def recover(out: Path) -> bool:
    """If ``out`` is missing but an aside copy of a killed swap exists, put it back; True if it did."""
    if out.exists() or out.is_symlink() or not out.parent.is_dir():
        return False
    for p in sorted(out.parent.glob(f".{out.name}.old-*")):
        m = _STAGING.fullmatch(p.name)
        if m and not pid_alive(int(m["pid"])) and p.is_dir():
            os.rename(p, out)
            return True
    return False


def _is_complete(folder: Path, kind: str) -> bool:
    try:
        return json.loads((folder / STATS).read_text(encoding="utf-8")).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(out: Path, kind: str) -> Path:
    """The resolved ``out`` if writing a new ``kind`` folder there loses nothing; else ``BadParameter``.

    Allowed: a path that does not exist, an empty folder, or a complete advgen
    folder of the same kind (``_stats.json`` says so). Anything else — a file,
    a folder of other things, an advgen folder of another kind — is refused.
    """
    out = Path(os.path.abspath(out))
    out = out.parent.resolve() / out.name if out.name not in ("", ".", "..") else out.resolve()
    if out.is_symlink():
        raise BadParameter(f"--out {out} is a symbolic link; refusing to replace it")
    if out.exists():
        if not out.is_dir():
            raise BadParameter(f"--out {out} is a file, not a folder")
        if any(out.iterdir()) and not _is_complete(out, kind):
            raise BadParameter(f"--out {out} already exists and is not a complete advgen {kind} folder; "
                               "refusing to replace it (remove it yourself or choose another --out)")
    check_writable(out.parent)
    return out


def check_writable(folder: Path) -> None:
    """Prove files can be written in ``folder`` (or, if it does not exist yet, where it would be created).

    Creates nothing: a probe file is written and removed in the deepest folder
    that exists. ``BadParameter`` naming the folder and the reason otherwise.
    """
    here = Path(os.path.abspath(folder))
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise BadParameter(f"cannot write in {folder}: {here} is a file, not a folder")
    probe = here / f".advgen-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BadParameter(f"cannot write in {folder}: {e.strerror or e}") from None


def check_file_target(path: Path, option: str) -> None:
    """An output file path must not be a folder, and its folder must be writable."""
    if path.is_dir():
        raise BadParameter(f"{option} {path} is a folder; give a file path")
    check_writable(path.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staging: Path, out: Path) -> None:
    """Put the finished folder ``staging`` at ``out``; the old ``out`` (if any) is removed afterwards.

    At every instant ``out`` is the old complete folder or the new one; if the
    file system cannot exchange atomically, the old folder is renamed aside
    (``.NAME.old-PID``) first, and ``recover`` restores it after a kill.
    """
    if not out.exists():
        os.rename(staging, out)
        return
    if _exchange(staging, out):
        shutil.rmtree(staging)  # now holds the old folder
        return
    aside = staging_path(out, "old")
    os.rename(out, aside)
    os.rename(staging, out)
    shutil.rmtree(aside)
