"""Variant folders: the on-disk side of generation.

A variant is one (method, ε) copy of a clean dataset, in ``OUT/<method>/eps=<ε>/``
(``OUT/deepfool/`` has no ε). Each output shard comes from exactly one input
shard and keeps its keys. Per sample: ``KEY.png`` (the stored image, rounded
to nearest uint8), ``KEY.cls`` (true label) and, with ``store_float``,
``KEY.npy`` (the float32 image before rounding; no pickle). Per shard a parquet
manifest whose schema metadata carries the variant's fingerprint and the tar's
sha256: a shard counts as done only when both match, which is what makes
generation resumable without ever reusing stale output.

``write_shard`` runs in worker processes: it takes plain numpy arrays and
returns checksums, so only arrays cross the process boundary.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from advgen.errors import AdvgenError
from advgen.storage.shards import STATS, encode_png, file_digest, write_json, write_parquet, write_tar, write_text

FINGERPRINT_KEY = b"advgen.fingerprint"
TAR_SHA_KEY = b"advgen.tar_sha256"


@dataclass(frozen=True)
class Variant:
    method: str
    eps: float | None  # None for methods without an epsilon (DeepFool)

    @property
    def folder(self) -> str:
        return self.method if self.eps is None else f"{self.method}/eps={format_eps(self.eps)}"


def format_eps(eps: float) -> str:
    """The folder spelling of ε: shortest exact decimal (0.03, 0.1, 0.25)."""
    return repr(float(eps))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _column(values: np.ndarray) -> pa.Array:
    """A manifest column; (N, k) arrays (top-5 classes) become fixed-size lists."""
    if values.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return pa.array(values)


def write_shard(tar_path: Path, *, keys: list[str], labels: np.ndarray, images: np.ndarray,
                floats: np.ndarray | None, columns: dict[str, np.ndarray], fingerprint: str) -> dict[str, str]:
    """Write one output shard and its manifest (manifest last); returns {file name: sha256}.

    ``images``: (N, H, W, C) uint8, the stored images. ``floats``: (N, C, H, W)
    float32 before rounding, or None. ``columns``: per-sample manifest columns.
    """
    def samples():
        for i, key in enumerate(keys):
            sample = {"__key__": key, "png": encode_png(images[i]), "cls": str(int(labels[i])).encode()}
            if floats is not None:
                sample["npy"] = npy_bytes(floats[i])
            yield sample

    write_tar(tar_path, samples())
    tar_sha = file_digest(tar_path)
    table = pa.table({"key": pa.array(keys, pa.string()), **{k: _column(v) for k, v in columns.items()}})
    table = table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode(), TAR_SHA_KEY: tar_sha.encode()})
    manifest = tar_path.with_suffix(".parquet")
    write_parquet(manifest, table)
    return {tar_path.name: tar_sha, manifest.name: file_digest(manifest)}


def invalidate(folder: Path) -> None:
    """Remove a variant's completion marker (``_stats.json``, then its card) before it is rewritten."""
    (folder / STATS).unlink(missing_ok=True)
    (folder / "README.md").unlink(missing_ok=True)


def shard_done(tar_path: Path, fingerprint: str) -> bool:
    """True if the shard and its manifest are complete and were made with ``fingerprint``."""
    manifest = tar_path.with_suffix(".parquet")
    if not (tar_path.is_file() and manifest.is_file()):
        return False
    try:
        meta = pq.read_schema(manifest).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    if meta.get(FINGERPRINT_KEY) != fingerprint.encode():
        return False
    return meta.get(TAR_SHA_KEY) == file_digest(tar_path).encode()


def read_manifests(folder: Path, names: list[str]) -> pa.Table:
    """The manifests of ``names`` (tar file names), concatenated in order, without schema metadata."""
    tables = [pq.read_table(folder / n.replace(".tar", ".parquet")) for n in names]
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def summarize(table: pa.Table) -> dict:
    """Counts and means over a variant's manifests, for its stats and card."""
    n = table.num_rows
    col = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    out = {
        "count": n,
        "clean_accuracy": float(np.mean(col["clean_pred"] == col["label"])) if n else 0.0,
        "accuracy": float(np.mean(col["adv_pred"] == col["label"])) if n else 0.0,
        "success_rate": float(np.mean(col["success"])) if n else 0.0,
        "fooling_rate": float(np.mean(col["adv_pred"] != col["clean_pred"])) if n else 0.0,
        "mean_linf": float(np.mean(col["linf"])) if n else 0.0,
        "max_linf": float(np.max(col["linf"])) if n else 0.0,
        "mean_l2": float(np.mean(col["l2"])) if n else 0.0,
    }
    if "rounding_changed" in col:
        out["rounding_changed"] = int(np.sum(col["rounding_changed"]))
    if "float_pred" in col:  # the float images, before rounding (and before any lattice steps)
        float_ok = col["float_pred"] == col["label"]
        out["float_accuracy"] = float(np.mean(float_ok)) if n else 0.0
        out["float_fooling_rate"] = float(np.mean(col["float_pred"] != col["clean_pred"])) if n else 0.0
        # success as the stored images count it, with the float prediction in place of the stored one
        flipped = col["rounding_changed"] if "rounding_changed" in col else np.zeros(n, bool)
        out["float_success_rate"] = float(np.mean(col["success"] != flipped)) if n else 0.0
    if "lattice_steps" in col:
        out["lattice_images"] = int(np.sum(col["lattice_steps"] > 0))
    if "iterations" in col:
        out["mean_iterations"] = float(np.mean(col["iterations"])) if n else 0.0
        out["converged_rate"] = float(np.mean(col["converged"])) if n else 0.0
    return json.loads(json.dumps(out))  # plain floats, stable spelling


def finalize(folder: Path, *, shards: dict[str, list[str]], fingerprint: str, stats_base: dict,
             render_card, extras: tuple[str, ...] = ()) -> dict:
    """Check every shard of a variant is done, drop stray files, write the card and ``_stats.json`` last.

    ``shards``: {split: [tar names]} this variant must hold. ``stats_base``:
    what generation knows (method, ε, params, victim, ...). ``render_card``
    turns the final stats into the README text.
    """
    names = [n for s in shards for n in shards[s]]
    missing = [n for n in names if not shard_done(folder / n, fingerprint)]
    if missing:
        raise AdvgenError(f"{folder}: {len(missing)} shard(s) missing or stale, e.g. {missing[0]}; rerun generate")
    keep = {STATS, "README.md"} | set(names) | {n.replace(".tar", ".parquet") for n in names} | set(extras)
    for p in folder.iterdir():
        if p.is_file() and p.name not in keep:
            p.unlink()  # shards of an earlier run with other splits or shard sizes
    digests: dict[str, str] = {}
    for n in names:
        meta = pq.read_schema(folder / n.replace(".tar", ".parquet")).metadata
        digests[n] = meta[TAR_SHA_KEY].decode()
        digests[n.replace(".tar", ".parquet")] = file_digest(folder / n.replace(".tar", ".parquet"))
    for n in extras:  # files beside the shards (a universal perturbation): listed and checksummed too
        digests[n] = file_digest(folder / n)
    per_split = {s: summarize(read_manifests(folder, shards[s])) for s in shards}
    stats = {
        **stats_base,
        "kind": "variant",
        "fingerprint": fingerprint,
        "counts": {s: per_split[s]["count"] for s in shards},
        "splits": per_split,
        "shards": shards,
        "sha256": digests,
        **({"extras": list(extras)} if extras else {}),
    }
    write_text(folder / "README.md", render_card(stats))
    write_json(folder / STATS, stats)
    return stats
