"""What both benchmark scripts share: synthetic CIFAR-10 in its native format, the CLI, the report.

Synthetic data is written as the real ``cifar-10-python.tar.gz`` (Python
pickles of ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``) and
then goes through ``advgen prepare --verify structure``, so the benchmarks
read exactly what a study reads. ``prepare`` insists on CIFAR-10's exact split
counts (50 000 / 10 000), so the archive always holds all 60 000 images;
smaller runs keep the first N of each split with ``prepare --limit``.

The images are the test suite's learnable pattern (each class lights its own
4x4 grid of coarse cells on low noise; see tests/conftest.py), copied here
because benchmarks do not import tests: a victim trained on them for an epoch
is accurate and confident, which is what attacks such as DeepFool need to do
their usual amount of work.
"""

from __future__ import annotations

import datetime
import gzip
import io
import json
import os
import pickle
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CIFAR_COUNTS = {"train": 50000, "test": 10000}
_SYNTHETIC_VERSION = "pattern-v1"  # change when the synthetic images change: cached archives are rewritten


def pattern_images(n: int, num_classes: int, seed: int, *, side: int = 32,
                   channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(N, side, side, channels) uint8 images and labels: each class lights its own 4x4 grid of side/4 px cells
    on low noise (learnable in one epoch)."""
    templates = np.random.default_rng(1234).choice(1 << 16, size=num_classes, replace=False)
    bits = ((templates[:, None] >> np.arange(16)) & 1).reshape(num_classes, 4, 4).astype(np.uint8)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    cells = np.arange(side) * 4 // side
    lit = bits[labels][:, cells][:, :, cells]  # (n, side, side)
    x = rng.integers(0, 40, (n, side, side, channels), dtype=np.uint8) + (lit * 160).astype(np.uint8)[..., None]
    return x, labels


def _cifar_batch(x: np.ndarray, y: np.ndarray) -> bytes:
    # Real batches are Python 2 pickles of dicts; Python 3 sees their keys as bytes. Protocol 2, bytes keys.
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    return pickle.dumps({b"batch_label": b"synthetic", b"labels": [int(v) for v in y], b"data": data,
                         b"filenames": [b"s%05d.png" % i for i in range(len(y))]}, protocol=2)


def write_cifar10(raw: Path, seed: int = 0) -> Path:
    """``raw/cifar-10-python.tar.gz`` holding 50 000 + 10 000 synthetic images; kept if already written.

    gzip level 0 (stored blocks): a valid archive, written in a fraction of a
    second instead of a minute; nothing here times reading it.
    """
    raw.mkdir(parents=True, exist_ok=True)
    archive, marker = raw / "cifar-10-python.tar.gz", raw / ".synthetic"
    if archive.is_file() and marker.is_file() and marker.read_text() == f"{_SYNTHETIC_VERSION} seed={seed}":
        return archive
    members = {}
    for split, n in CIFAR_COUNTS.items():
        x, y = pattern_images(n, 10, seed + (split == "test"))
        if split == "test":
            members["test_batch"] = _cifar_batch(x, y)
        else:
            for i, idx in enumerate(np.array_split(np.arange(n), 5), 1):
                members[f"data_batch_{i}"] = _cifar_batch(x[idx], y[idx])
    tmp = archive.with_name(archive.name + ".tmp")
    with gzip.GzipFile(tmp, "wb", compresslevel=0, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    os.replace(tmp, archive)
    marker.write_text(f"{_SYNTHETIC_VERSION} seed={seed}")
    return archive


def prepare_cifar10(work: Path, limit: int) -> Path:
    """Clean shards of the synthetic archive: the first ``limit`` images per split (0 = all); cached in ``work``."""
    write_cifar10(work / "raw")
    out = work / f"clean-limit{limit}"
    if not (out / "_stats.json").is_file():
        advgen("prepare", "--dataset", "cifar10", "--raw", work / "raw", "--out", out, "--verify", "structure",
               "--limit", limit, "--no-download")
    return out


def advgen(*args: object) -> float:
    """Run the ``advgen`` CLI (``python -m advgen.stages``) in a process of its own; its wall seconds.

    On failure, its output is shown and the benchmark stops.
    """
    cmd = [sys.executable, "-m", "advgen.stages", *(str(a) for a in args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        sys.stderr.write(done.stdout.decode(errors="replace")[-4000:])
        raise SystemExit(f"benchmark: `advgen {' '.join(map(str, args[:1]))}` failed (exit {done.returncode}): "
                         + " ".join(map(str, cmd)))
    return seconds


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def report_header(script: str, dev: torch.device) -> dict:
    """Where and when: device, library versions, date (UTC), commit."""
    from advgen.versions import __version__

    return {
        "script": script, "device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
        "cuda": torch.version.cuda if dev.type == "cuda" else None, "python": platform.python_version(),
        "advgen": __version__, "git": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        # Other work on the machine skews CPU timings (the CI kind's 2 cores are often shared).
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table; floats with 3 significant decimals, missing cells as '-'."""
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)
