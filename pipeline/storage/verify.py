"""Checking a received folder against its own card and stats.

A clean folder (``advgen prepare``) or a variant folder (``advgen generate``)
carries three descriptions of itself: ``_stats.json`` (counts, shard lists,
sha256 of every file), the ``README.md`` card (YAML front matter plus a
sha256 table) and the shards themselves. ``verify_folder`` checks that the
three agree and returns every disagreement as a sentence naming the file (and
sample key) and what was expected against what was found. A root written by
``advgen publish`` (a root card and ``SHA256SUMS``, no stats) is checked
against its ``SHA256SUMS``; the folders below it are checked on their own.

Read-only and safe on untrusted data: nothing is unpickled (``.npy`` members
load with ``allow_pickle=False``, the card's YAML with ``safe_load``) and
nothing in the folder is written or removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from advgen.data.datasets import DATASETS, spec_for
from advgen.errors import AdvgenError
from advgen.storage.shards import STATS, file_digest
from advgen.storage.variants import format_eps
from advgen.storage.verify_card import (  # noqa: F401 - re-exported: advgen.storage.verify.NAME as before
    _card_problems, _read_card, _short,
)
from advgen.storage.verify_content import (  # noqa: F401 - re-exported: advgen.storage.verify.NAME as before
    _content_problems, _file_problems,
)
from advgen.storage.verify_rules import (  # noqa: F401 - re-exported: advgen.storage.verify.NAME as before
    CARD, KINDS, PUBLISHED, SAMPLE_PROBLEMS, SUMS, _GLOB_PART, _PART, _SHARD, _SUMS_LINE, _plain_name,
)


def _is_card(path: Path) -> bool:
    """A README.md with YAML front matter (a plain README, such as data/README.md, is not a card)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"---\n", b"---\r")
    except OSError:
        return False


def find_folders(root: Path) -> list[Path]:
    """``root`` and every folder below it holding a ``_stats.json``, a README.md card or ``.tar`` files, sorted.

    Hidden folders (``.git``, ``.dvc``, staging folders of an interrupted run) are not searched.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if (STATS in filenames or any(f.endswith(".tar") for f in filenames)
                or (CARD in filenames and _is_card(here / CARD))):
            found.append(here)
    return sorted(found)


def describe(folder: Path) -> str:
    """One line saying what a folder holds, from its stats: "variant mnist fgsm eps=0.1, test 200"."""
    front = None if os.path.lexists(Path(folder) / STATS) else published_card(folder)
    if front is not None:
        configs = front.get("configs")
        return f"published root, {len(configs) if isinstance(configs, list) else 0} config(s), {SUMS}"
    try:
        stats = json.loads((Path(folder) / STATS).read_text())
        what = f"{stats['kind']} {stats['dataset']}"
        if stats["kind"] == "variant":
            what += f" {stats['method']}" + (f" eps={format_eps(stats['eps'])}" if stats["eps"] is not None else "")
        return what + ", " + ", ".join(f"{s} {n}" for s, n in stats["counts"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "unreadable _stats.json"


def verify_folder(folder: Path, *, deep: bool = True) -> list[str]:
    """Every problem found in ``folder``, as human-readable sentences; empty if it is fine.

    Always: ``_stats.json`` parses and describes a clean or variant folder of a
    registered dataset; the card exists and its front matter and sha256 table
    agree with the stats; every listed file exists with its recorded sha256;
    no unlisted shard, manifest or partial write lies in the folder. With
    ``deep``: every shard reads as a tar; every sample has a ``.png`` of the
    dataset's shape and a ``.cls`` in [0, classes), and nothing but
    ``.png``/``.cls``/``.npy``; keys ascend; per-split counts match the stats;
    each manifest's keys (and labels, png hashes where recorded) match its tar.
    A variant card's ``dataset_info`` must name the dataset's classes and give each split's count and bytes.
    A published root (``advgen publish``): see ``_published_problems``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    problems: list[str] = []
    card = _read_card(folder, problems)
    if card is not None and _is_published(card[0]) and not os.path.lexists(folder / STATS):
        return problems + _published_problems(folder, card[0])
    stats = _read_stats(folder, problems)
    if stats is None:
        return problems
    spec = spec_for(stats)
    problems += _stats_consistency(folder, stats)
    if card is not None:
        problems += _card_problems(card, stats, spec, folder)
    problems += _file_problems(folder, stats)
    if deep:
        problems += _content_problems(folder, stats, spec)
    return problems


# --- stats ---------------------------------------------------------------------------------------------------------

def _read_stats(folder: Path, problems: list[str]) -> dict | None:
    """The stats if they parse and have the shape every later check relies on; else None (problems noted)."""
    path = folder / STATS
    if path.is_symlink():
        problems.append(f"{STATS}: is a symbolic link; verify never follows links")
        return None
    if not path.is_file():
        problems.append(f"{STATS}: missing (written last by advgen: the folder is incomplete or not advgen's)")
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{STATS}: not readable JSON ({e})")
        return None
    if not isinstance(stats, dict):
        problems.append(f"{STATS}: expected a JSON object, found {type(stats).__name__}")
        return None
    bad = []
    if stats.get("kind") not in KINDS:
        bad.append(f"kind is {stats.get('kind')!r}, expected one of {', '.join(KINDS)}")
    if stats.get("dataset") not in DATASETS:
        try:  # a dataset its user brought: the stats describe it (shape, classes, ...)
            spec_for(stats)
        except AdvgenError as e:
            bad.append(f"dataset is {stats.get('dataset')!r}, not one of {', '.join(sorted(DATASETS))}, and the "
                       f"stats do not describe it ({e})")
    counts, shards, sha = stats.get("counts"), stats.get("shards"), stats.get("sha256")
    if not (isinstance(counts, dict) and counts and all(isinstance(n, int) and n >= 0 for n in counts.values())):
        bad.append("counts is not a {split: count} object")
    if not (isinstance(shards, dict) and shards
            and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in shards.values())):
        bad.append("shards is not a {split: [tar names]} object")
    if not (isinstance(sha, dict) and all(isinstance(d, str) for d in sha.values())):
        bad.append("sha256 is not a {file: digest} object")
    if stats.get("kind") == "variant":
        if not isinstance(stats.get("method"), str):
            bad.append("a variant without a method")
        if not (stats.get("eps") is None or isinstance(stats.get("eps"), (int, float))):
            bad.append(f"eps is {stats.get('eps')!r}, expected a number or null")
    if bad:
        problems += [f"{STATS}: {b}" for b in bad]
        return None
    return stats


def _stats_consistency(folder: Path, stats: dict) -> list[str]:
    """The stats against themselves (splits, shard names, listed files) and against the folder's name."""
    out = []
    shards, counts, sha = stats["shards"], stats["counts"], stats["sha256"]
    if set(shards) != set(counts):
        out.append(f"{STATS}: splits with shards ({', '.join(shards)}) differ from splits with counts "
                   f"({', '.join(counts)})")
    listed = set()
    for split, names in shards.items():
        for name in names:
            m = _SHARD.fullmatch(name)
            if m is None or m["split"] != split:
                out.append(f"{STATS}: {split} lists {name!r}, expected names like {split}-000000.tar")
            for n in (name, name.removesuffix(".tar") + ".parquet"):
                listed.add(n)
                if n not in sha:
                    out.append(f"{STATS}: {n} belongs to the {split} split but has no recorded sha256")
    extras = stats.get("extras") or []
    allowed_extras = {"perturbation.npy", "perturbation.png", "perturbation.json"}  # a universal perturbation
    if not isinstance(extras, list) or not set(extras) <= allowed_extras or stats["kind"] != "variant" and extras:
        out.append(f"{STATS}: extras {_short(extras)} are not files a variant may carry "
                   f"({', '.join(sorted(allowed_extras))})")
        extras = []
    for name in extras:
        listed.add(name)
        if name not in sha:
            out.append(f"{STATS}: {name} is listed as an extra file but has no recorded sha256")
    for name in sorted(set(sha) - listed):
        why = "is not a plain file name" if not _plain_name(name) else "belongs to no split"
        out.append(f"{STATS}: sha256 lists {name!r}, which {why}")
    if stats["kind"] == "variant":
        splits = stats.get("splits")
        if not isinstance(splits, dict):
            out.append(f"{STATS}: a variant without per-split results (splits)")
        else:
            for split, n in counts.items():
                got = splits.get(split, {}).get("count") if isinstance(splits.get(split), dict) else None
                if got != n:
                    out.append(f"{STATS}: {split} results count {got} samples, counts say {n}")
        if folder.name.startswith("eps="):
            want = "eps=" + format_eps(stats["eps"]) if stats["eps"] is not None else "(no ε)"
            if folder.name != want or folder.parent.name != stats["method"]:
                out.append(f"folder name {folder.parent.name}/{folder.name} does not match the recorded "
                           f"{stats['method']}/{want}")
    return out


# --- published roots -----------------------------------------------------------------------------------------------

def _is_published(front: dict) -> bool:
    block = front.get("advgen")
    return isinstance(block, dict) and block.get("kind") == PUBLISHED


def published_card(folder: Path) -> dict | None:
    """The front matter of the root card ``advgen publish`` wrote in ``folder``, or None if there is none."""
    card = _read_card(Path(folder), [])
    return card[0] if card is not None and _is_published(card[0]) else None


def relative_path(path: object, *, glob: bool = False) -> bool:
    """A relative POSIX path of plain names (as ``advgen.outputs.plain_name``; with ``glob``, ``*`` too)."""
    part = _GLOB_PART if glob else _PART
    return isinstance(path, str) and all(part.fullmatch(p) and ".." not in p for p in path.split("/"))


def _published_problems(root: Path, front: dict) -> list[str]:
    """A root written by ``advgen publish``: every file ``SHA256SUMS`` lists has its sha256, the card is
    among them, and every config's data files exist and are listed. The folders below are checked on their own."""
    path = root / SUMS
    if path.is_symlink() or not path.is_file():
        return [f"{SUMS}: missing (advgen publish writes it beside the root card)"]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return [f"{SUMS}: unreadable ({e})"]
    out, listed = [], {}
    for i, line in enumerate(lines, 1):
        m = _SUMS_LINE.fullmatch(line)
        if m is None or not relative_path(m[2]):
            out.append(f"{SUMS}: line {i} is not '<sha256>  <relative path>': {_short(line)}")
        elif m[2] in listed:
            out.append(f"{SUMS}: lists {m[2]} twice")
        else:
            listed[m[2]] = m[1]
    if CARD not in listed:
        out.append(f"{SUMS}: does not list {CARD}, the root card")
    for name, want in sorted(listed.items()):
        file = root / name
        if file.is_symlink():
            out.append(f"{name}: is a symbolic link; verify never follows links")
        elif not file.is_file():
            out.append(f"{name}: missing (listed in {SUMS})")
        elif (got := file_digest(file)) != want:
            out.append(f"{name}: sha256 {got[:12]}… differs from the {want[:12]}… {SUMS} lists")
    configs = front.get("configs")
    if not (isinstance(configs, list) and configs):
        out.append(f"{CARD}: no configs in the front matter")
    for config in configs if isinstance(configs, list) else []:
        try:
            name, files = config["config_name"], [(d["split"], d["path"]) for d in config["data_files"]]
        except (KeyError, TypeError):
            out.append(f"{CARD}: a config without config_name and data_files (split, path): {_short(config)}")
            continue
        for split, pattern in files:
            if not relative_path(pattern, glob=True):
                out.append(f"{CARD}: config {name} {split} reads {_short(pattern)}, not a relative path of plain names")
                continue
            matched = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
            if not matched:
                out.append(f"{CARD}: config {name} {split} reads {pattern}, which matches no file")
            for m in (m for m in matched if m not in listed):
                out.append(f"{CARD}: config {name} {split} reads {m}, which {SUMS} does not list")
    return out
