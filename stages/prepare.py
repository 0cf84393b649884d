"""``advgen prepare``: find a dataset's original files, check them, write clean shards."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from advgen.clean import write_clean
from advgen.datasets import DATASETS, download, get_dataset, load_source, locate, search_roots
from advgen.errors import BadParameter, DatasetNotFound
from advgen.stages.app import log, stage
from advgen.stages.progress import bar


@stage
def prepare(
    dataset: str = typer.Option(..., help=f"One of: {', '.join(DATASETS)}."),
    out: Path = typer.Option(..., help="Output folder for the clean shards (replaced whole)."),
    raw: Optional[Path] = typer.Option(None, help="Folder for the original files, searched first and "
                                       "downloaded into. Default: OUT/../raw."),
    mirror: Optional[Path] = typer.Option(None, envvar="ADVGEN_MIRROR",
                                          help="Folder holding the original distribution files "
                                          "(directly or in a subfolder named after the dataset)."),
    shard_size: int = typer.Option(0, help="Images per shard; 0 = the largest size giving each split >= 8 shards."),
    limit: int = typer.Option(0, help="Keep only the first N images of each split (0 = all); for tests and demos."),
    verify: str = typer.Option("checksum", help="checksum: files must match a reference md5 or decoded "
                               "sha256; structure: also accept other copies that pass the count, shape "
                               "and label checks (recorded as unverified in the card)."),
    download_missing: bool = typer.Option(True, "--download/--no-download",
                                          help="Download with torchvision when no local copy is found."),
) -> None:
    """Write DATASET's train and test splits as WebDataset shards with manifests and a card."""
    spec = get_dataset(dataset)
    if verify not in ("checksum", "structure"):
        raise BadParameter(f"--verify must be checksum or structure, got {verify!r}")
    if mirror is not None and not mirror.is_dir():
        raise DatasetNotFound(f"mirror folder {mirror} does not exist")
    raw = raw if raw is not None else out.parent / "raw"
    roots = search_roots(spec, raw, mirror)
    paths = locate(spec, roots)
    if paths is None and download_missing:
        log(f"{spec.title}: no local copy in {', '.join(map(str, roots))}; downloading into {raw}")
        download(spec, raw)
        paths = locate(spec, [raw])
    if paths is None:
        wanted = " + ".join("|".join(names) for names in spec.layout.files.values())
        raise DatasetNotFound(
            f"{spec.title} not found: looked for {wanted} in {', '.join(map(str, roots))}"
            + ("" if download_missing else " (download disabled)")
            + f". Put the original files in {raw} or pass --mirror DIR"
            + (" (or: apt-get install dataset-fashion-mnist)" if spec.system_dirs else "")
        )
    log(f"{spec.title}: reading {', '.join(str(p) for p in paths.values())}")
    source = load_source(spec, paths, allow_unverified=verify == "structure")
    with bar(f"prepare {spec.name}") as b:
        stats = write_clean(
            source, out, shard_size=shard_size, limit=limit,
            on_progress=lambda split, done, total: b.update(done, total, f"{split} shard {done}/{total}",
                                                            line=done == total),
        )
    counts = ", ".join(f"{n} {s}" for s, n in stats["counts"].items())
    shards = ", ".join(f"{len(v)} {s}" for s, v in stats["shards"].items())
    print(f"{out}: {spec.title} {counts} images in {shards} shards; checked by {source.verification}")
