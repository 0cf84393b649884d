"""Dataset cards: the README.md that travels with every shard folder.

Hugging Face style: YAML front matter a hub can index (license, task, sizes,
splits, data files), then prose a stranger needs to trust and load the data —
where it came from, how it was checked, and the sha256 of every file.
Rendered from the stats dict alone (and, for ``dataset_info``, the shards' sizes),
so the card says exactly what was written.
"""

from __future__ import annotations

import json
from pathlib import Path

from advgen.data.datasets import DatasetSpec


def _q(value: object) -> str:
    """A YAML scalar (JSON strings are valid YAML and need no escaping rules of our own)."""
    return json.dumps(value)


def size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M"


def split_bytes(folder: Path, shards: dict[str, list[str]]) -> dict[str, int]:
    """{split: total bytes of its tar shards in ``folder``}: the ``num_bytes`` of a card's dataset_info."""
    return {split: sum((Path(folder) / n).stat().st_size for n in names) for split, names in shards.items()}


def dataset_info_lines(classes: list[str], counts: dict[str, int], num_bytes: dict[str, int], *,
                       npy_shape: list[int] | None = None, config_name: str | None = None) -> list[str]:
    """The YAML lines of a Hugging Face ``dataset_info`` entry for PNG + class-label shards, as ``datasets`` reads it.

    Features: ``png`` (image), ``cls`` (class_label named by ``classes``), ``npy`` (float32 ``npy_shape``
    array, when stored) and ``__key__`` (string; declared so that ``datasets`` keeps the sample key, which
    matches the manifests' ``key``). Splits: ``num_examples`` from ``counts`` and ``num_bytes`` (the bytes of
    the split's tar shards; ``datasets`` ignores a splits list without it). Lines are indented for the value
    of ``dataset_info:``; with ``config_name`` they form one item of a list (cards with several configs).
    """
    lines = [f"- config_name: {config_name}"] if config_name is not None else []
    lines += ["  features:", "  - name: png", "    dtype: image", "  - name: cls", "    dtype:",
              "      class_label:", "        names:"]
    lines += [f"          '{i}': {_q(c)}" for i, c in enumerate(classes)]
    if npy_shape is not None:
        lines += ["  - name: npy", "    dtype:", "      array3_d:", "        shape:",
                  *(f"        - {int(d)}" for d in npy_shape), "        dtype: float32"]
    lines += ["  - name: __key__", "    dtype: string", "  splits:"]
    for split, n in counts.items():
        lines += [f"  - name: {split}", f"    num_bytes: {int(num_bytes[split])}", f"    num_examples: {n}"]
    return lines


def _loading_and_files(spec: DatasetSpec, stats: dict, split: str) -> list[str]:
    """A webdataset snippet for ``split`` and the sha256 table of every file."""
    last = len(stats["shards"][split]) - 1
    decode = "l8" if spec.shape[0] == 1 else "rgb8"
    return [
        "",
        "```python",
        "import webdataset as wds",
        f"ds = wds.WebDataset('{split}-{{000000..{last:06d}}}.tar').decode('{decode}').to_tuple('png', 'cls')",
        "```",
        "",
        "## Files",
        "",
        "| file | sha256 |",
        "|---|---|",
        *(f"| `{n}` | `{d}` |" for n, d in sorted(stats["sha256"].items())),
    ]


def clean_card(spec: DatasetSpec, stats: dict) -> str:
    """Markdown card for a clean folder described by ``stats``."""
    counts = stats["counts"]
    total = sum(counts.values())
    lines = [
        "---",
        f"pretty_name: {_q(spec.title + ' (advgen clean shards)')}",
        f"license: {spec.license}",
        "task_categories:",
        "- image-classification",
        "size_categories:",
        f"- {size_category(total)}",
        "source_datasets:",
        f"- {spec.name}",
        "tags:",
        "- webdataset",
        "- advgen",
        "configs:",
        "- config_name: default",
        "  data_files:",
    ]
    for split in stats["shards"]:
        lines += [f"  - split: {split}", f"    path: {_q(split + '-*.tar')}"]
    lines += ["dataset_info:", *dataset_info_lines(list(spec.classes), counts, stats["num_bytes"])]
    lines += ["---", ""]

    src = stats["source"]
    subset = (
        f" This is a subset: the first {stats['limit']} images of each split (keys still give source indices)."
        if stats["limit"] else ""
    )
    source_counts = stats.get("source_counts", stats.get("full_counts"))
    if source_counts and source_counts != stats.get("full_counts", source_counts):
        subset += (" The source copy it came from is not the reference: it holds "
                   + ", ".join(f"{n} {s}" for s, n in source_counts.items()) + " images where the reference has "
                   + ", ".join(f"{n} {s}" for s, n in stats["full_counts"].items()) + ".")
    c, h, w = spec.shape
    lines += [
        f"# {spec.title} — clean WebDataset shards",
        "",
        f"Every image of {spec.title} ({', '.join(f'{n} {s}' for s, n in counts.items())}), "
        f"{h}×{w}×{c} uint8, {spec.num_classes} classes, written by advgen {stats['versions']['advgen']}.{subset}",
        "",
        "## Source",
        "",
        f"- Homepage: {spec.homepage}",
        f"- License: `{spec.license}` — {spec.license_note}",
        f"- Citation: {spec.citation}",
        f"- Checked by: {src['verification']}. Every split also passed count, shape and label-range checks.",
        ("- Source files (md5): " + ", ".join(f"`{n}` {m}" for n, m in src["files_md5"].items())
         if src["files_md5"] else f"- Source: {src.get('origin', 'brought by its user')}"),
        "- Decoded content sha256 (images NHWC uint8, then labels uint8): "
        + ", ".join(f"{s} `{d}`" for s, d in src["content_sha256"].items()),
        "",
        "## Format",
        "",
        f"Tar shards `{{split}}-NNNNNN.tar` of {stats['shard_size']} samples (the last may be shorter). "
        "Each sample: `KEY.png` (lossless) and `KEY.cls` (label, ASCII digits); KEY is the zero-padded "
        "index in the original split. Beside each shard a `.parquet` manifest (key, index, label, "
        "label_name, png_sha256). `_stats.json` is written last and marks the folder complete.",
    ]
    lines += _loading_and_files(spec, stats, "train")
    lines += [
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in stats["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def variant_card(spec: DatasetSpec, stats: dict, *, num_bytes: dict[str, int], minimal: bool = False) -> str:
    """Markdown card for one generated variant (method, ε) described by ``stats``.

    ``num_bytes``: {split: bytes of its tar shards} (``split_bytes``), for the card's ``dataset_info``;
    ``minimal``: the attack is a minimal-perturbation one (its manifest has DeepFool's columns).
    """
    counts = stats["counts"]
    eps = stats["eps"]
    title = f"{spec.title} — {stats['method']}" + (f" ε={eps}" if eps is not None else "")
    victim = stats["victim"]
    lines = [
        "---",
        f"pretty_name: {_q(title + ' (advgen)')}",
        f"license: {spec.license}",
        "task_categories:",
        "- image-classification",
        "size_categories:",
        f"- {size_category(sum(counts.values()))}",
        "source_datasets:",
        f"- {spec.name}",
        "tags:",
        "- webdataset",
        "- advgen",
        "- adversarial-examples" if stats["direction"] == "adversarial" else "- cooperative-examples",
        "configs:",
        "- config_name: default",
        "  data_files:",
    ]
    for split in stats["shards"]:
        lines += [f"  - split: {split}", f"    path: {_q(split + '-*.tar')}"]
    lines += ["dataset_info:"]
    lines += dataset_info_lines(stats.get("classes") or list(spec.classes), counts, num_bytes,
                                npy_shape=(stats.get("shape") or list(spec.shape)) if stats["store_float"] else None)
    lines += ["advgen:"]
    for key in ("method", "direction", "norm", "eps", "label_source", "seed", "device"):
        lines.append(f"  {key}: {_q(stats[key])}")
    lines += [f"  params: {_q(stats['params'])}",
              f"  victim: {_q(victim)}",
              f"  fingerprint: {_q(stats['fingerprint'])}",
              "  splits:"]
    for split, summary in stats["splits"].items():
        lines.append(f"    {split}: {_q(summary)}")
    lines += ["---", ""]

    what = "lower" if stats["direction"] == "cooperative" else "raise"
    lines += [
        f"# {title}",
        "",
        f"A full {stats['direction']} copy of {spec.title} ({', '.join(f'{n} {s}' for s, n in counts.items())}): "
        f"every image moved by `{stats['method']}` ({stats['norm']} norm"
        + (f", ε = {eps} in [0, 1] pixel units" if eps is not None else "")
        + f") to {what} the loss of the {'true' if stats['label_source'] == 'true' else 'predicted'} label "
        f"of a `{victim['arch']}` victim trained on {spec.title}.",
        "",
        "## How it was made",
        "",
        f"- Source: {spec.title}, {spec.homepage} — license `{spec.license}`: {spec.license_note}",
        f"- Victim: `{victim['arch']}`, checkpoint sha256 `{victim['sha256']}`, clean test accuracy "
        + (f"{victim['test_accuracy']:.4f}." if victim["test_accuracy"] is not None else "not recorded."),
        f"- Method `{stats['method']}`, parameters {json.dumps(stats['params'], sort_keys=True)}, seed {stats['seed']}"
        + (f", batch size {stats['batch_size']} (part of the fingerprint: float results can depend on it)"
           if "batch_size" in stats else "") + ".",
        f"- Computed on {stats['device']}. Images are stored as PNG rounded to nearest uint8; predictions and "
        "success were measured on the stored images. GPU results are not bit-reproducible across machines; "
        "CPU runs with the same inputs are byte-identical.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in stats['versions'].items())}.",
        "",
    ]
    if "universal" in stats:
        u = stats["universal"]
        lines += [
            "## The universal perturbation",
            "",
            "![the universal perturbation δ, 127 = 0, scaled to the full grey range](perturbation.png)",
            "",
            f"One δ added to every image (then clipped to [0, 1] and rounded): `perturbation.npy`, float32 "
            f"{'×'.join(map(str, spec.shape))}, no pickle (`numpy.load(path, allow_pickle=False)`). ‖δ‖∞ = "
            f"{u['linf']:.4f}, ‖δ‖₂ = {u['l2']:.4f} ({u['norm']} ball of radius {u['eps']}). Fitted on "
            f"{u['fit_images']} {u['fit_split']} images drawn with seed {u['fit_seed']} (Moosavi-Dezfooli et al., "
            f"2017, DeepFool steps accumulated and projected): fooling rate {u['fooling_rate_fit']:.4f} on them "
            f"after {u['passes']} pass(es) (target {u['target_rate']}, at most {u['max_passes']}). The picture "
            f"maps ±{u['picture_scale']:.4f} to black and white.",
            "",
        ]
    lines += [
        "## Results on the stored images (and on the float images before rounding)",
        "",
        "Accuracy, success and fooling rate (the share of images whose predicted label changed, whatever the "
        "true label) as stored, with the float images' figure after the slash where the rounding audit ran."
        + (" Rounding-aware: images whose float result reached the goal but whose rounded one did not took "
           "further steps on the uint8 lattice (inside the ε-ball), so the stored copy keeps what the float attack "
           "achieved." if stats.get("params", {}).get("rounding_aware") else ""),
        "",
        "| split | images | clean acc. | acc. stored / float | success stored / float | fooling stored / float "
        "| mean ‖δ‖∞ | max ‖δ‖∞ | mean ‖δ‖₂ | outcome changed by rounding |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pair(s: dict, key: str) -> str:
        stored = f"{s[key]:.4f}" if key in s else "–"
        return stored + (f" / {s['float_' + key]:.4f}" if f"float_{key}" in s else "")

    for split, s in stats["splits"].items():
        lines.append(
            f"| {split} | {s['count']} | {s['clean_accuracy']:.4f} | {pair(s, 'accuracy')} | "
            f"{pair(s, 'success_rate')} | {pair(s, 'fooling_rate')} | "
            f"{s['mean_linf']:.4f} | {s['max_linf']:.4f} | {s['mean_l2']:.4f} | {s.get('rounding_changed', 'not audited')} |"
        )
    lines += [
        "",
        "## Format",
        "",
        "Each output shard comes from the clean shard of the same name and keeps its keys: `KEY.png` (stored "
        "image), `KEY.cls` (true label)" + (", `KEY.npy` (float32 image before rounding, no pickle)"
                                             if stats["store_float"] else "")
        + ". The `.parquet` manifest beside each shard has per-sample key, index, label, clean and adversarial "
        "prediction and confidence (and top-5 classes with more than 5 classes), success, ‖δ‖∞, ‖δ‖₂"
        + (", DeepFool's ‖r‖₂, iterations and convergence" if minimal else "") + ".",
    ]
    first = "test" if "test" in stats["shards"] else next(iter(stats["shards"]))
    lines += [
        "",
        "With Hugging Face `datasets` (labels as `ClassLabel` with the class names) the images and the "
        "manifests load from this folder; both follow the shards in key order, so they join row by row:",
        "",
        "```python",
        "from datasets import concatenate_datasets, load_dataset",
        "folder = 'path/to/this/folder'  # not '.': datasets names a dataset after its folder",
        f"images = load_dataset(folder, split='{first}')",
        f"results = load_dataset(folder, data_files={{'{first}': '{first}-*.parquet'}}, split='{first}')",
        "assert images['__key__'] == results['key']",
        "both = concatenate_datasets([images, results], axis=1)",
        "```",
        "",
        f"With pandas: `pd.read_parquet('{stats['shards'][first][0].removesuffix('.tar')}.parquet')` for one manifest, "
        f"`pd.concat([pd.read_parquet(p) for p in sorted(glob.glob('{first}-*.parquet'))], ignore_index=True)` "
        "for a split (`pd.read_parquet` of the folder fails: it also holds the tars and this card).",
    ]
    lines += _loading_and_files(spec, stats, first)
    lines.append("")
    return "\n".join(lines)

