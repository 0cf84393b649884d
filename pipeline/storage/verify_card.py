"""verify, the card: a folder's README.md front matter and dataset_info against its stats and its files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from advgen.data.datasets import DatasetSpec
from advgen.storage.cards import size_category
from advgen.storage.shards import STATS
from advgen.storage.verify_rules import CARD, _FILE_ROW, _VARIANT_FIELDS, _plain_name


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
