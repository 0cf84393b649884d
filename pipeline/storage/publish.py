"""Publishing a tree of variant folders as one Hugging Face style dataset: a root card and ``SHA256SUMS``.

``publication(root)`` finds every variant folder below ``root`` (``advgen generate``'s
``<method>/eps=<ε>`` and ``deepfool`` folders, at any depth) and, if named, one clean
folder; checks each as ``advgen verify --no-deep`` does; and returns the text of two
files for ``root``, never touching the folders themselves:

* ``README.md``, the root card: one ``configs`` entry per folder, named from its path
  (``fgsm_eps0.1``, ``deepfool``, ``clean``; with the folders above it, nearest first,
  where names would clash: ``fast-fgsm_eps0.1``), with ``data_files`` per split pointing
  at its tars and a ``dataset_info`` entry naming the classes; the body lists each config's
  method, ε, victim, direction and results, and how to load images, per-sample results
  and manifests.
* ``SHA256SUMS``: ``<sha256>  <path>`` for the card and every file of every folder, paths
  relative to ``root``, sorted: what ``sha256sum -c`` checks with coreutils alone.

Per-sample results are not configs: ``datasets`` picks one reader per repository from the
first config's files (huggingface/datasets#7101), so parquet configs beside tar configs are
read as tars. The card instead shows ``load_dataset(root, data_files=...)`` on a variant's
manifests (parquet inferred from the files), which follow the tars' key order and join to
the images column-wise. The tars stay as they are.

Deterministic: the same folders give the same bytes (sorted paths, nothing from the clock,
the machine or the absolute path of ``root``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from advgen.storage.cards import dataset_info_lines, size_category, split_bytes
from advgen.data.datasets import DatasetSpec, spec_for
from advgen.errors import BadParameter, CorruptFile
from advgen.storage.outputs import STATS, plain_name
from advgen.storage.shards import file_digest, read_stats
from advgen.storage.variants import format_eps
from advgen.storage.verify import CARD, PUBLISHED, SUMS, find_folders, published_card, relative_path, verify_folder


@dataclass(frozen=True)
class Config:
    """One folder published as a config."""

    name: str  # config name: fgsm_eps0.1, fast-fgsm_eps0.1, deepfool, clean
    path: str  # the folder, relative to the root (POSIX)
    stats: dict  # its _stats.json
    num_bytes: dict[str, int]  # {split: bytes of its tar shards}


@dataclass(frozen=True)
class Publication:
    card: str  # README.md
    sums: str  # SHA256SUMS
    configs: list[Config]
    skipped: list[Path]  # clean folders below the root that --clean did not name


def _check_target(root: Path) -> None:
    """``root`` may receive a root card: a folder, not an advgen folder itself, with no README.md or
    SHA256SUMS of someone else's (one from an earlier ``advgen publish`` is replaced)."""
    if not root.is_dir():
        raise CorruptFile(root, "no such folder")
    if os.path.lexists(root / STATS):
        raise BadParameter(f"{root} is itself an advgen folder (it holds {STATS}); its card is its own: "
                           "publish the folder above it")
    ours = not (root / CARD).is_symlink() and published_card(root) is not None
    for name in (CARD, SUMS):
        if os.path.lexists(root / name) and not ours:
            raise BadParameter(f"{root / name} exists and was not written by advgen publish; move it away first")


def _q(value: object) -> str:
    """A YAML scalar (JSON is valid YAML), as in the folders' cards."""
    return json.dumps(value)


def _verified(folder: Path, deep: bool) -> dict:
    """``folder``'s stats, after the checks of ``advgen verify`` (``--no-deep`` unless ``deep``) pass."""
    problems = verify_folder(folder, deep=deep)
    if problems:
        more = f" (and {len(problems) - 1} more; run advgen verify {folder})" if len(problems) > 1 else ""
        raise CorruptFile(folder, f"fails advgen verify{'' if deep else ' --no-deep'}: {problems[0]}{more}")
    kind = json.loads((folder / STATS).read_text(encoding="utf-8"))["kind"]  # verify checked it is clean or variant
    return read_stats(folder, kind=kind)  # also: every name it lists is a plain file name


def _relative(folder: Path, root: Path, what: str) -> str:
    rel = folder.resolve().relative_to(root.resolve()).as_posix()
    if not relative_path(rel):
        raise BadParameter(f"{what} {folder}: folder names below ROOT must be plain names (letters, digits, "
                           "_ . = -) to be written into SHA256SUMS and the card's data_files")
    return rel


def config_names(entries: list[tuple[tuple[str, ...], str]]) -> list[str]:
    """A unique name per (folders above, base name): the base name, led by the k nearest folders above it
    (joined by ``-``; the same k for all, the smallest that makes every name unique)."""
    depth = max((len(prefix) for prefix, _ in entries), default=0)
    for k in range(depth + 1):
        names = ["-".join([*prefix[max(len(prefix) - k, 0):], base]) for prefix, base in entries]
        if len(set(names)) == len(names):
            return names
    clash = sorted(n for n in names if names.count(n) > 1)[0]
    raise BadParameter(f"two folders would both be published as config {clash!r}; rename one")


def _base_name(stats: dict) -> str:
    method = plain_name(stats["method"], where=f"{STATS} method")
    return method if stats["eps"] is None else f"{method}_eps{format_eps(stats['eps'])}"


def _above(rel: str, stats: dict) -> tuple[str, ...]:
    """The folders above a variant's own (``<method>/eps=<ε>`` or ``<method>``), from the root down."""
    return tuple(rel.split("/")[:-2 if stats["eps"] is not None else -1])


def publication(root: Path, *, clean: Path | None = None, deep: bool = False) -> Publication:
    """The root card and ``SHA256SUMS`` for every variant folder below ``root`` (and ``clean``, if given).

    Refuses (``BadParameter``/``CorruptFile``, one line) a root holding no complete variant, any
    advgen folder that fails ``advgen verify --no-deep`` (``--deep`` with ``deep``), folders of
    several datasets, variants made from another clean folder than ``clean``, a ``clean`` outside
    ``root``, and a README.md or SHA256SUMS in ``root`` that ``advgen publish`` did not write.
    """
    root = Path(root)
    _check_target(root)
    clean_config, clean_at = None, None
    if clean is not None:
        clean_at = Path(clean).resolve()
        if not clean_at.is_relative_to(root.resolve()) or clean_at == root.resolve():
            common = os.path.commonpath([root.resolve(), clean_at])
            raise BadParameter(f"--clean {clean} lies outside ROOT {root}: its files are published relative to "
                               f"ROOT, so publish a folder holding both, such as {common}")
        stats = _verified(Path(clean), deep)
        if stats["kind"] != "clean":
            raise BadParameter(f"--clean {clean} is a {stats['kind']} folder, expected a clean one")
        clean_config = (_relative(Path(clean), root, "--clean"), stats)

    variants, skipped = [], []
    for folder in find_folders(root):
        if not os.path.lexists(folder / STATS) and published_card(folder) is not None:
            continue  # this root's card (or a nested root's): not a folder to publish
        if clean_at is not None and folder.resolve() == clean_at:
            continue
        stats = _verified(folder, deep)
        if stats["kind"] == "clean":
            skipped.append(folder)
        else:
            variants.append((_relative(folder, root, "variant"), stats))
    if not variants:
        raise BadParameter(f"{root} holds no complete variant folder (one with a variant {STATS}, which advgen "
                           "generate writes last)")

    everything = variants + ([clean_config] if clean_config else [])
    datasets = sorted({s["dataset"] for _, s in everything})
    if len(datasets) > 1:
        raise BadParameter(f"{root} holds folders of several datasets ({', '.join(datasets)}); publish one "
                           "dataset per root")
    if clean_config is not None:
        clean_sha = file_digest(Path(clean) / STATS)
        for rel, s in variants:
            if s.get("clean_stats_sha256", clean_sha) != clean_sha:
                raise BadParameter(f"{root / rel} was made from another clean folder than --clean {clean} "
                                   f"(clean_stats_sha256 differs)")

    variants.sort(key=lambda v: (_above(*v), v[1]["method"], -math.inf if v[1]["eps"] is None else v[1]["eps"], v[0]))
    entries = [(_above(rel, s), _base_name(s)) for rel, s in variants]
    if clean_config is not None:
        entries.insert(0, ((), "clean"))
    items = ([clean_config] if clean_config else []) + variants
    configs = [Config(name, rel, s, split_bytes(root / rel, s["shards"]))
               for name, (rel, s) in zip(config_names(entries), items)]
    spec = spec_for(configs[-1].stats)
    card = root_card(spec, configs)
    return Publication(card, sums(root, configs, card), configs, skipped)


def sums(root: Path, configs: list[Config], card: str) -> str:
    """``SHA256SUMS`` for ``card`` (as ``README.md``) and each config's card, stats and listed files.

    Listed files take the digests their stats record, which ``advgen verify`` has just confirmed.
    """
    digests = {CARD: hashlib.sha256(card.encode("utf-8")).hexdigest()}
    for c in configs:
        for name in (CARD, STATS):
            digests[f"{c.path}/{name}"] = file_digest(root / c.path / name)
        for name, digest in c.stats["sha256"].items():
            digests[f"{c.path}/{name}"] = digest
    return "".join(f"{d}  {p}\n" for p, d in sorted(digests.items()))


# --- the root card -------------------------------------------------------------------------------------------------

def _number(stats: dict, split: str, key: str) -> float:
    value = stats.get("splits", {}).get(split, {}).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptFile(STATS, f"splits.{split}.{key} is {value!r}, expected a number")
    return float(value)


def _cell(value: object) -> str:
    """Text from stats, safe in a markdown table cell inside backticks."""
    return " ".join(str(value).replace("|", "/").replace("`", "'").split())


def _row(c: Config, split: str) -> str:
    s, n = c.stats, c.stats["counts"][split]
    if s["kind"] == "clean":
        return f"| `{c.name}` | `{c.path}` | — | — | — | — | — | {split} | {n} | — | — | — | — | — |"
    victim = s.get("victim") if isinstance(s.get("victim"), dict) else {}
    eps = "—" if s["eps"] is None else format_eps(s["eps"])
    nums = " | ".join(f"{_number(s, split, k):.4f}"
                      for k in ("clean_accuracy", "accuracy", "success_rate", "mean_linf", "mean_l2"))
    return (f"| `{c.name}` | `{c.path}` | {_cell(s['method'])} | {eps} | {_cell(s.get('norm'))} | "
            f"{_cell(s.get('direction'))} | `{_cell(victim.get('arch'))}` `{_cell(victim.get('sha256'))[:12]}` | "
            f"{split} | {n} | {nums} |")


def root_card(spec: DatasetSpec, configs: list[Config]) -> str:
    """The root card's text for ``configs`` of ``spec`` (see the module docstring)."""
    variants = [c for c in configs if c.stats["kind"] == "variant"]
    directions = sorted({c.stats.get("direction") for c in variants} & {"adversarial", "cooperative"})
    lines = [
        "---",
        f"pretty_name: {_q(f'{spec.title} (advgen, {len(configs)} configs)')}",
        f"license: {spec.license}",
        "task_categories:",
        "- image-classification",
        "size_categories:",
        f"- {size_category(sum(sum(c.stats['counts'].values()) for c in configs))}",
        "source_datasets:",
        f"- {spec.name}",
        "tags:",
        "- webdataset",
        "- advgen",
        *(f"- {d}-examples" for d in directions),
        "configs:",
    ]
    for c in configs:
        lines += [f"- config_name: {c.name}", "  data_files:"]
        for split in c.stats["shards"]:
            lines += [f"  - split: {split}", f"    path: {_q(f'{c.path}/{split}-*.tar')}"]
    lines += ["dataset_info:"]
    for c in configs:
        store_float = c.stats["kind"] == "variant" and bool(c.stats.get("store_float"))
        lines += dataset_info_lines(list(spec.classes), c.stats["counts"], c.num_bytes, config_name=c.name,
                                    npy_shape=list(spec.shape) if store_float else None)
    lines += ["advgen:", f"  kind: {_q(PUBLISHED)}", f"  dataset: {_q(spec.name)}", f"  checksums: {_q(SUMS)}",
              "  configs:"]
    for c in configs:
        entry = {"path": c.path, "kind": c.stats["kind"]}
        if c.stats["kind"] == "variant":
            entry |= {"method": c.stats["method"], "eps": c.stats["eps"], "fingerprint": c.stats.get("fingerprint"),
                      "results": {s: f"{c.path}/{s}-*.parquet" for s in c.stats["shards"]}}
        lines.append(f"    {c.name}: {_q(entry)}")
    lines += ["---", ""]

    ex = next((c for c in variants if c.stats["eps"] is not None), variants[0])  # the examples' config
    made = " and ".join(directions) or "perturbed"
    split = "test" if "test" in ex.stats["shards"] else next(iter(ex.stats["shards"]))
    manifest = f"{ex.path}/{ex.stats['shards'][split][0].removesuffix('.tar')}.parquet"
    lines += [
        f"# {spec.title} — {made} copies made with advgen",
        "",
        f"{len(configs)} configs of {spec.title} ({spec.homepage}, license `{spec.license}`), each a full copy in "
        "WebDataset shards in its own folder, with its own card (`README.md` in the folder) giving the full "
        "provenance: source, victim checkpoint, method parameters, seed, versions and per-file sha256.",
        "",
        "## Configs",
        "",
        "Results per split, measured on the stored images: the victim's accuracy on the clean and on the stored "
        "images, the attack's success rate, and the mean size of the change.",
        "",
        "| config | folder | method | ε | norm | direction | victim (sha256) | split | images | clean acc. | "
        "acc. | success | mean ‖δ‖∞ | mean ‖δ‖₂ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(c, s) for c in configs for s in c.stats["shards"]),
        "",
        "## Loading",
        "",
        "Each sample is `png` (the stored image), `cls` (the true label, a `ClassLabel` with the class names) and "
        "`__key__` (the zero-padded index in the source split)" + (" and `npy` where a config stores the float "
        "image before rounding" if any(c.stats.get("store_float") for c in variants) else "") + ". Name a config: "
        "`load_dataset` of this folder without one lists them.",
        "",
        "```python",
        "from datasets import load_dataset",
        f"ds = load_dataset('path/to/this/folder', '{ex.name}')  # or the Hub repository id",
        f"ds['{split}'].features['cls'].names",
        "```",
        "",
        "## Per-sample results with the images",
        "",
        "Beside each shard a parquet manifest holds one row per sample, in the shard's order: key, index, label, "
        "clean and adversarial prediction and confidence, success, ‖δ‖∞, ‖δ‖₂ and more (see each config's card). "
        "Load a config's manifests with `data_files` (its folder from the table, or `advgen.configs.<name>.results` "
        "in this card's front matter) and join them to the images row by row:",
        "",
        "```python",
        "from datasets import concatenate_datasets, load_dataset",
        "root = 'path/to/this/folder'  # or the Hub repository id",
        f"images = load_dataset(root, '{ex.name}', split='{split}')",
        f"results = load_dataset(root, data_files={{'{split}': '{ex.path}/{split}-*.parquet'}}, split='{split}')",
        "assert images['__key__'] == results['key']",
        "joined = concatenate_datasets([images, results], axis=1)",
        "```",
        "",
        "The manifests are not configs of their own: `datasets` picks one reader per repository from the first "
        "config's files, and would read them as tars (huggingface/datasets#7101).",
        "",
        "## Manifests with pandas",
        "",
        "```python",
        "import glob",
        "import pandas as pd",
        f"one = pd.read_parquet('{manifest}')",
        f"split = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob('{ex.path}/{split}-*.parquet'))], "
        "ignore_index=True)",
        "```",
        "",
        "Paths are relative to this folder. `pd.read_parquet` of a config's folder fails (it also holds the tars "
        "and the card), and `pd.read_parquet` of a list of files adds a column parsed from an `eps=…` folder name "
        "(pyarrow's hive partitioning); the calls above read exactly the manifests' columns.",
        "",
        "## Checking a copy",
        "",
        f"`{SUMS}` lists the sha256 of this card and of every file of every config folder, paths relative to "
        "this folder, in the format of GNU coreutils:",
        "",
        "```sh",
        f"sha256sum -c {SUMS}  # macOS: shasum -a 256 -c {SUMS}",
        "```",
        "",
        "With advgen installed, `advgen verify .` also checks every folder against its card and reads every sample.",
        "",
    ]
    return "\n".join(lines)
