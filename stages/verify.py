"""``advgen verify``: check received clean or variant folders against their cards and stats."""

from __future__ import annotations

from pathlib import Path

import typer

from advgen.errors import CorruptFile
from advgen.storage.verify import describe, find_folders, verify_folder
from advgen.stages.app import log, stage


@stage
def verify(
    folder: Path = typer.Argument(..., help="A clean or variant folder, or a root holding many."),
    deep: bool = typer.Option(True, help="Also read every sample (decode, shape, label, counts, manifests); "
                              "--no-deep checks stats, card and checksums only."),
) -> None:
    """Check each advgen folder at or below FOLDER; print OK or FAIL with its problems. Exit 1 if any failed."""
    if not folder.exists():
        raise CorruptFile(folder, "no such folder")
    folders = find_folders(folder)
    if not folders:
        raise CorruptFile(folder, "holds no advgen folder (no _stats.json, README.md card or .tar shards)")
    failed = 0
    for f in folders:
        problems = verify_folder(f, deep=deep)
        if problems:
            failed += 1
            print(f"FAIL {f}", flush=True)
            for p in problems:
                print(f"    {p}", flush=True)
        else:
            print(f"OK {f}: {describe(f)}", flush=True)
    log(f"verify: {len(folders) - failed} of {len(folders)} folder(s) OK" + (" (--no-deep)" if not deep else ""))
    if failed:
        raise typer.Exit(1)
