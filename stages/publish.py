"""``advgen publish``: a root card and SHA256SUMS over a tree of variant folders, for Hugging Face ``datasets``."""

from __future__ import annotations

from pathlib import Path

import typer

from advgen.storage.publish import publication
from advgen.storage.shards import write_text
from advgen.storage.verify import CARD, SUMS
from advgen.stages.app import log, stage


@stage
def publish(
    root: Path = typer.Argument(..., help="Folder holding the variant folders to publish, at any depth."),
    clean: Path | None = typer.Option(None, help="A clean folder inside ROOT to publish as the `clean` config."),
    deep: bool = typer.Option(False, help="Read every sample of every folder first (advgen verify); by default "
                              "stats, cards and checksums only (advgen verify --no-deep)."),
) -> None:
    """Write ROOT/README.md (one config per variant folder) and ROOT/SHA256SUMS; the folders are not changed.

    Then `datasets.load_dataset(ROOT, "fgsm_eps0.1")` loads a variant and `sha256sum -c SHA256SUMS` checks a copy.
    """
    pub = publication(root, clean=clean, deep=deep)
    for folder in pub.skipped:
        log(f"publish: skipped the clean folder {folder} (name it with --clean to publish it)")
    write_text(root / CARD, pub.card)  # the card first: SHA256SUMS lists its digest
    write_text(root / SUMS, pub.sums)
    for c in pub.configs:
        print(f"{c.name}\t{c.path}", flush=True)
    log(f"publish: {len(pub.configs)} config(s); wrote {root / CARD} and {root / SUMS} "
        f"({pub.sums.count(chr(10))} files); check a copy with: sha256sum -c {SUMS}")
