"""``advgen prepare``: find a dataset's original files, check them, write clean shards."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from advgen.data.clean import write_clean
from advgen.data.datasets import DATASETS, Source, download, get_dataset, load_source, locate, search_roots
from advgen.errors import BadParameter, DatasetNotFound
from advgen.storage.outputs import check_replaceable, recover
from advgen.data.byo import folder_source, hf_source
from advgen.stages.app import log, stage
from advgen.stages.progress import bar


@stage
def prepare(
    dataset: str = typer.Option(..., help=f"One of: {', '.join(DATASETS)}; with --from-folder or --from-hf, a "
                                "new name for your dataset (lowercase letters, digits, _ and -)."),
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
    from_folder: Optional[Path] = typer.Option(None, help="Your own images instead of a registered dataset: "
                                               "DIR/train/<class>/*.png|jpg and DIR/test/<class>/* (image folder "
                                               "layout), all of one size and mode (L or RGB)."),
    from_hf: Optional[Path] = typer.Option(None, help="A Hugging Face dataset instead of a registered one: a folder "
                                           "written by save_to_disk (or one datasets.load_dataset reads) with "
                                           "train and test splits, an Image column and a ClassLabel column."),
    image_column: str = typer.Option("image", help="--from-hf: the column holding the images."),
    label_column: str = typer.Option("label", help="--from-hf: the ClassLabel column holding the labels."),
    license: Optional[str] = typer.Option(None, help="--from-folder/--from-hf: the data's license as an "
                                          "SPDX-style id (mit, cc-by-4.0, ...), recorded in the card; "
                                          "default: unknown."),
    crop_pad: int = typer.Option(2, help="--from-folder/--from-hf: random translation, in pixels, that "
                                 "`advgen train` applies to this dataset (recorded in its stats)."),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="--from-folder/--from-hf: horizontal flips keep "
                              "labels (natural images), so `advgen train` applies them (recorded in its stats)."),
) -> None:
    """Write DATASET's train and test splits as WebDataset shards with manifests and a card."""
    if from_folder is not None or from_hf is not None:
        return _prepare_own(dataset, out, from_folder=from_folder, from_hf=from_hf, image_column=image_column,
                            label_column=label_column, license=license or "unknown", crop_pad=crop_pad, flip=flip,
                            shard_size=shard_size, limit=limit)
    spec = get_dataset(dataset)
    if verify not in ("checksum", "structure"):
        raise BadParameter(f"--verify must be checksum or structure, got {verify!r}")
    if shard_size < 0 or limit < 0:
        raise BadParameter("--shard-size and --limit must be >= 0 (0 = automatic / every image)")
    recover(out)  # a run killed mid-swap left the old folder aside: put it back before deciding
    check_replaceable(out, "clean")  # before the (possibly long) read: nothing is lost, and it can be written
    if mirror is not None and not mirror.is_dir():
        raise DatasetNotFound(f"mirror folder {mirror} does not exist")
    raw = raw if raw is not None else out.parent / "raw"
    roots = search_roots(spec, raw, mirror)
    paths = locate(spec, roots)
    failed = None
    if paths is None and download_missing:
        log(f"{spec.title}: no local copy in {', '.join(map(str, roots))}; downloading into {raw}")
        created = not raw.exists()
        try:
            download(spec, raw)
        except DatasetNotFound as e:
            failed = str(e).split(": ", 1)[-1]
            if created and raw.is_dir() and not any(raw.iterdir()):
                raw.rmdir()  # leave nothing behind for a download that never started
        paths = locate(spec, [raw]) if failed is None else None
    if paths is None:
        wanted = " + ".join("|".join(names) for names in spec.layout.files.values())
        raise DatasetNotFound(
            f"{spec.title} not found: looked for {wanted} in {', '.join(map(str, roots))}"
            + ("" if mirror is not None else " (no --mirror or ADVGEN_MIRROR set)")
            + (f"; the download failed ({failed})" if failed else "" if download_missing else " (download disabled)")
            + f". Put the original files in {raw}, or set ADVGEN_MIRROR (or --mirror) to a folder that holds them"
            + (" (or: apt-get install dataset-fashion-mnist)" if spec.system_dirs else "")
        )
    log(f"{spec.title}: reading {', '.join(str(p) for p in paths.values())}")
    source = load_source(spec, paths, allow_unverified=verify == "structure")
    _write(source, out, shard_size=shard_size, limit=limit)


def _write(source: Source, out: Path, *, shard_size: int, limit: int) -> None:
    spec = source.spec
    with bar(f"prepare {spec.name}") as b:
        stats = write_clean(
            source, out, shard_size=shard_size, limit=limit,
            on_progress=lambda split, done, total: b.update(done, total, f"{split} shard {done}/{total}",
                                                            line=done == total),
        )
    counts = ", ".join(f"{n} {s}" for s, n in stats["counts"].items())
    shards = ", ".join(f"{len(v)} {s}" for s, v in stats["shards"].items())
    print(f"{out}: {spec.title} {counts} images in {shards} shards; checked by {source.verification}")


def _prepare_own(dataset: str, out: Path, *, from_folder: Path | None, from_hf: Path | None, image_column: str,
                 label_column: str, license: str, crop_pad: int, flip: bool, shard_size: int, limit: int) -> None:
    """``prepare`` for a dataset its user brings: read it whole, then write it like a registered one."""
    if from_folder is not None and from_hf is not None:
        raise BadParameter("give one source: --from-folder or --from-hf, not both")
    if shard_size < 0 or limit < 0:
        raise BadParameter("--shard-size and --limit must be >= 0 (0 = automatic / every image)")
    recover(out)
    check_replaceable(out, "clean")
    if from_folder is not None:
        log(f"{dataset}: reading the image folder {from_folder}")
        source = folder_source(from_folder, name=dataset, license=license, crop_pad=crop_pad, flip=flip)
    else:
        assert from_hf is not None
        log(f"{dataset}: reading the Hugging Face dataset {from_hf}")
        source = hf_source(from_hf, name=dataset, image_column=image_column, label_column=label_column,
                           license=license, crop_pad=crop_pad, flip=flip)
    _write(source, out, shard_size=shard_size, limit=limit)
