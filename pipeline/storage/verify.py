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

import hashlib
import io
import json
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from advgen.storage.cards import size_category
from advgen.data.datasets import DATASETS, DatasetSpec, spec_for
from advgen.errors import AdvgenError, CorruptFile
from advgen.storage.shards import STATS, decode_png, file_digest, iter_tar
from advgen.storage.variants import FINGERPRINT_KEY, TAR_SHA_KEY, format_eps

CARD = "README.md"
KINDS = ("clean", "variant")
SUMS = "SHA256SUMS"  # beside a root card written by advgen publish, in the format `sha256sum -c` reads
PUBLISHED = "published"  # advgen.kind in the front matter of such a root card
_SUMS_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]*")
_GLOB_PART = re.compile(r"[A-Za-z0-9_*][A-Za-z0-9_.=*-]*")
SAMPLE_PROBLEMS = 5  # per shard; a shard that is wrong everywhere says so once, not 60000 times
# What Pillow raises on damaged PNGs (bad chunks, truncated zlib streams, bomb-sized headers).
_PNG_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, struct.error, Image.DecompressionBombError)
_KEY = re.compile(r"\d{6,}")
_CLS = re.compile(rb"\d+")
_SHARD = re.compile(r"(?P<split>[A-Za-z0-9_]+)-\d{6}\.tar")
_FILE_ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \|$", re.MULTILINE)
# What the card's advgen block repeats from a variant's stats.
_VARIANT_FIELDS = ("method", "direction", "norm", "eps", "label_source", "seed", "device", "params", "victim",
                   "fingerprint")


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


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


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


# --- card ----------------------------------------------------------------------------------------------------------

def _read_card(folder: Path, problems: list[str]) -> tuple[dict, str] | None:
    """(front matter, full text) of the card, or None (problems noted)."""
    path = folder / CARD
    if path.is_symlink():
        problems.append(f"{CARD}: is a symbolic link; verify never follows links")
        return None
    if not path.is_file():
        problems.append(f"{CARD}: missing (every advgen folder carries its card)")
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{CARD}: unreadable ({e})")
        return None
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if not lines or lines[0].strip() != "---" or end is None:
        problems.append(f"{CARD}: no YAML front matter (--- ... ---) at the top")
        return None
    try:
        front = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as e:
        problems.append(f"{CARD}: front matter is not valid YAML ({' '.join(str(e).split())})")
        return None
    if not isinstance(front, dict):
        problems.append(f"{CARD}: front matter is not a mapping")
        return None
    return front, text


def _same(a: object, b: object) -> bool:
    """Equal as data, allowing for YAML 1.1 reading JSON floats such as 1e-05 as strings."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        try:
            x, y = float(a), float(b)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return x == y or (math.isnan(x) and math.isnan(y))
    return a == b


def _short(value: object) -> str:
    s = json.dumps(value, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def _card_problems(card: tuple[dict, str], stats: dict, spec: DatasetSpec, folder: Path) -> list[str]:
    front, text = card
    out = []

    def check(what: str, found: object, expected: object) -> None:
        if not _same(found, expected):
            out.append(f"{CARD}: {what} is {_short(found)}, {STATS} says {_short(expected)}")

    check("source_datasets", front.get("source_datasets"), [stats["dataset"]])
    check("license", front.get("license"), stats.get("license", spec.license))
    total = sum(stats["counts"].values())
    check("size_categories", front.get("size_categories"), [size_category(total)])
    try:
        files = front["configs"][0]["data_files"]
        card_splits = {d["split"]: d["path"] for d in files}
    except (KeyError, IndexError, TypeError):
        card_splits = None
    check("configs data_files", card_splits, {s: f"{s}-*.tar" for s in stats["shards"]})

    out += _dataset_info_problems(front.get("dataset_info"), stats, spec, folder)
    if stats["kind"] == "variant":
        block = front.get("advgen")
        if not isinstance(block, dict):
            out.append(f"{CARD}: no advgen block in the front matter (method, eps, victim, ...)")
        else:
            for key in _VARIANT_FIELDS:
                if key in stats:
                    check(f"advgen.{key}", block.get(key), stats[key])
            card_splits_summary = block.get("splits")
            for split, summary in (stats.get("splits") or {}).items():
                found = card_splits_summary.get(split) if isinstance(card_splits_summary, dict) else None
                if not isinstance(found, dict):
                    out.append(f"{CARD}: advgen.splits has no {split} entry")
                    continue
                check(f"{split} count", found.get("count"), stats["counts"].get(split))
                check(f"{split} results", {k: v for k, v in found.items() if k != "count"},
                      {k: v for k, v in summary.items() if k != "count"})

    table = dict(_FILE_ROW.findall(text))
    for name in sorted(set(stats["sha256"]) | set(table)):
        want, got = stats["sha256"].get(name), table.get(name)
        if got is None:
            out.append(f"{CARD}: the file table lacks {name} (listed in {STATS})")
        elif want is None:
            out.append(f"{CARD}: the file table lists {name}, which {STATS} does not")
        elif got != want:
            out.append(f"{CARD}: sha256 of {name} is {got[:12]}…, {STATS} says {want[:12]}…")
    return out


def _dataset_info_problems(info: object, stats: dict, spec: DatasetSpec, folder: Path) -> list[str]:
    """A card's ``dataset_info`` (what Hugging Face ``datasets`` reads) against the dataset and the folder.

    Features png (image), cls (class_label with the dataset's class names), npy (float32 of the dataset's
    shape, when stored), __key__ (string), in that order; per split num_examples from the stats and
    num_bytes equal to the bytes of the split's tar shards.
    """
    if not isinstance(info, dict):
        return [f"{CARD}: no dataset_info in the front matter (features and splits for Hugging Face datasets; "
                "rerun advgen prepare or generate to rewrite an older card)"]
    out = []
    features = info.get("features") if isinstance(info.get("features"), list) else []
    dtypes = {f["name"]: f.get("dtype") for f in features if isinstance(f, dict) and isinstance(f.get("name"), str)}
    want = ["png", "cls"] + (["npy"] if stats["kind"] == "variant" and stats.get("store_float") else []) + ["__key__"]
    names = [f.get("name") if isinstance(f, dict) else None for f in features]
    if names != want:
        out.append(f"{CARD}: dataset_info features are {_short(names)}, expected {_short(want)}")
    for name, dtype in (("png", "image"), ("__key__", "string"),
                        ("npy", {"array3_d": {"shape": list(spec.shape), "dtype": "float32"}})):
        if name in want and name in dtypes and not _same(dtypes[name], dtype):
            out.append(f"{CARD}: dataset_info feature {name} has dtype {_short(dtypes[name])}, "
                       f"expected {_short(dtype)}")
    try:
        labels = dtypes["cls"]["class_label"]["names"]
        classes = [labels[k] for k in sorted(labels, key=int)]
        if sorted(int(k) for k in labels) != list(range(len(labels))):
            classes = None
    except (KeyError, TypeError, ValueError, AttributeError):
        classes = None
    if classes != list(spec.classes):
        out.append(f"{CARD}: class names in dataset_info are {_short(classes)}, {spec.name} has "
                   f"{_short(list(spec.classes))}")
    try:
        card_splits = {s["name"]: {"num_examples": s["num_examples"], "num_bytes": s["num_bytes"]}
                       for s in info["splits"]}
    except (KeyError, TypeError):
        card_splits = None
    tars = [n for split in stats["shards"].values() for n in split]
    if all(_plain_name(n) and (folder / n).is_file() for n in tars):  # a missing shard is reported elsewhere
        sizes = {s: sum((folder / n).stat().st_size for n in split) for s, split in stats["shards"].items()}
        want_splits = {s: {"num_examples": stats["counts"].get(s), "num_bytes": sizes[s]} for s in stats["shards"]}
        if not _same(card_splits, want_splits):
            out.append(f"{CARD}: dataset_info splits are {_short(card_splits)}, expected {_short(want_splits)} "
                       f"(num_examples from {STATS}, num_bytes of the tar shards)")
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


# --- files ---------------------------------------------------------------------------------------------------------

def _file_problems(folder: Path, stats: dict) -> list[str]:
    """Listed files exist with their sha256; nothing shard-like is unlisted; manifests name their tar's sha."""
    out = []
    sha = stats["sha256"]
    for name, want in sorted(sha.items()):
        if not _plain_name(name):
            continue  # reported by _stats_consistency; never open paths outside the folder
        path = folder / name
        if path.is_symlink():
            out.append(f"{name}: is a symbolic link (to {os.readlink(path)}); a shared folder holds its own files, "
                       "and verify never follows links")
            continue
        if not path.is_file():
            out.append(f"{name}: missing (listed in {STATS})")
            continue
        got = file_digest(path)
        if got != want:
            out.append(f"{name}: sha256 {got[:12]}… differs from the recorded {want[:12]}…")
    for path in sorted(folder.iterdir()):
        name = path.name
        if name in sha or name in (STATS, CARD):
            continue
        if name.startswith(".") and ".tmp-" in name:
            out.append(f"{name}: a partial write left behind by an interrupted run")
        elif path.suffix in (".tar", ".parquet"):
            out.append(f"{name}: not listed in {STATS} (a stray or leftover {path.suffix} file)")
    if stats["kind"] == "variant":
        for tar in (n for names in stats["shards"].values() for n in names):
            manifest = folder / (tar.removesuffix(".tar") + ".parquet")
            if not (_plain_name(tar) and manifest.is_file()) or manifest.is_symlink():
                continue
            try:
                meta = pq.read_schema(manifest).metadata or {}
            except (OSError, pa.ArrowException) as e:
                out.append(f"{manifest.name}: not a readable parquet file ({e})")
                continue
            recorded = meta.get(TAR_SHA_KEY, b"none").decode(errors="replace")
            if tar in sha and recorded != sha[tar]:
                out.append(f"{manifest.name}: records tar sha256 {recorded[:12]}…, {STATS} says {sha[tar][:12]}…")
            if meta.get(FINGERPRINT_KEY, b"").decode(errors="replace") != stats.get("fingerprint"):
                out.append(f"{manifest.name}: made with another fingerprint than {STATS} records")
    return out


# --- content -------------------------------------------------------------------------------------------------------

class _Limited:
    """Sample-level problems of one file, at most ``SAMPLE_PROBLEMS`` spelled out."""

    def __init__(self, name: str) -> None:
        self.name, self.lines, self.more = name, [], 0

    def add(self, message: str) -> None:
        if len(self.lines) < SAMPLE_PROBLEMS:
            self.lines.append(f"{self.name}: {message}")
        else:
            self.more += 1

    def done(self) -> list[str]:
        return self.lines + ([f"{self.name}: … and {self.more} more problems"] if self.more else [])


def _content_problems(folder: Path, stats: dict, spec: DatasetSpec) -> list[str]:
    out = []
    npy = stats["kind"] == "variant" and bool(stats.get("store_float"))
    allowed = {"png", "cls"} | ({"npy"} if npy else set())
    for split, names in stats["shards"].items():
        total, prev = 0, -1
        for name in names:
            path = folder / name
            if not (_plain_name(name) and path.is_file()) or path.is_symlink():
                continue  # a missing or linked shard is reported once, by _file_problems
            p = _Limited(name)
            keys, labels, png_sha = [], [], []
            try:
                for key, members in iter_tar(path):
                    keys.append(key)
                    if not _KEY.fullmatch(key):
                        p.add(f"sample key {key!r} is not a zero-padded index")
                    elif int(key) <= prev:
                        p.add(f"sample {key} is out of order or repeated (follows {prev:06d})")
                    else:
                        prev = int(key)
                    labels.append(_check_sample(key, members, p, allowed=allowed, spec=spec))
                    png_sha.append(hashlib.sha256(members["png"]).hexdigest() if "png" in members else None)
            except CorruptFile as e:
                p.add(f"not a readable tar ({str(e).removeprefix(f'{path}: ')})")
            total += len(keys)
            out += p.done()
            out += _manifest_problems(path.with_suffix(".parquet"), name, keys, labels, png_sha)
        if total != stats["counts"].get(split):
            out.append(f"{split}: {total} samples, the card/stats say {stats['counts'].get(split)}")
    return out


def _check_sample(key: str, members: dict[str, bytes], p: _Limited, *, allowed: set[str],
                  spec: DatasetSpec) -> int | None:
    """Check one sample's members; returns its label, or None if it has no valid one."""
    c, h, w = spec.shape
    for ext in sorted(set(members) - allowed):
        p.add(f"sample {key} has a .{ext} member; expected only {', '.join('.' + a for a in sorted(allowed))}")
    for ext in sorted(allowed - set(members)):
        p.add(f"sample {key} lacks .{ext}")
    if "png" in members:
        try:
            img = decode_png(members["png"])
        except _PNG_ERRORS as e:
            p.add(f"sample {key}: png does not decode ({type(e).__name__})")
        else:
            if img.shape != (h, w, c) or img.dtype != np.uint8:
                found = "×".join(map(str, img.shape))
                p.add(f"sample {key}: png is {found} {img.dtype}, expected {h}×{w}×{c} uint8")
    if "npy" in members and "npy" in allowed:
        try:
            arr = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            p.add(f"sample {key}: npy does not load without pickle ({e})")
        else:
            if not (isinstance(arr, np.ndarray) and arr.shape == (c, h, w) and arr.dtype == np.float32):
                p.add(f"sample {key}: npy is {getattr(arr, 'shape', '?')} {getattr(arr, 'dtype', '?')}, "
                      f"expected ({c}, {h}, {w}) float32")
    if "cls" not in members:
        return None
    raw = members["cls"]
    if not _CLS.fullmatch(raw):
        p.add(f"sample {key}: cls is {raw[:20]!r}, expected ASCII digits")
        return None
    label = int(raw)
    if label >= spec.num_classes:
        p.add(f"sample {key}: cls {label} is outside [0, {spec.num_classes})")
    return label


def _manifest_problems(path: Path, tar: str, keys: list[str], labels: list[int | None],
                       png_sha: list[str | None]) -> list[str]:
    """A shard's parquet manifest against what its tar holds: keys in order, labels, png hashes."""
    if not path.is_file() or path.is_symlink():
        return []  # reported by _file_problems when listed
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        return [f"{path.name}: not a readable parquet file ({e})"]
    if "key" not in table.column_names:
        return [f"{path.name}: no key column"]
    out = []
    columns = [("key", keys, "keys"), ("label", labels, "labels"), ("png_sha256", png_sha, "png sha256")]
    for column, found, what in columns:
        if column not in table.column_names:
            continue
        listed = table[column].to_pylist()
        if listed == found:
            continue
        if len(listed) != len(found):
            out.append(f"{path.name}: {len(listed)} rows, {tar} holds {len(found)} samples")
            break
        i = next(i for i, (a, b) in enumerate(zip(listed, found)) if a != b)
        out.append(f"{path.name}: {what} differ from {tar}'s at row {i} (key {keys[i]}): "
                   f"{_short(listed[i])} in the manifest, {_short(found[i])} in the tar")
    return out
