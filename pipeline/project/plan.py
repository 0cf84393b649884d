"""What a pipeline's params will need before it runs: disk for every output, memory, a device.

``estimate(params)`` turns a profile's params (the sections dvc.yaml reads)
into per-stage estimates of the bytes each stage writes and the memory its
largest step holds. The estimates are deliberately on the high side (PNG
sizes as if incompressible, tar headers and padding counted, parquet and
cards rounded up) so that "enough disk" means enough. They are pure
functions of the params and the dataset registry; ``advgen check`` compares
them with what the machine has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from advgen.attacks import METHODS
from advgen.data.datasets import DATASETS, DatasetSpec
from advgen.errors import BadParameter

_BLOCK = 512
MANIFEST_BYTES = 160  # per sample, parquet manifest columns (zstd), rounded up
CARD_BYTES = 64 << 10  # per folder: card + stats + the file table
# Parameters (millions) of each victim at 10 classes, 32 px; 4 bytes each in a checkpoint.
_VICTIM_MPARAMS = {"mlp": 1.6, "simple_cnn": 1.3, "alexnet": 7.5, "alexnet_paper": 3.6, "resnet18": 11.2,
                   "efficientnet_b0": 4.1}


def _member(size: int) -> int:
    """Bytes a tar member of ``size`` bytes takes: header plus data padded to 512."""
    return _BLOCK + math.ceil(size / _BLOCK) * _BLOCK


def sample_bytes(spec: DatasetSpec, *, store_float: bool = False) -> int:
    """Upper estimate of one sample in a shard (png, cls, optional npy) plus its manifest row."""
    c, h, w = spec.shape
    png = c * h * w + h + 64  # an incompressible PNG: raw rows, filter bytes, chunks
    total = _member(png) + _member(3) + MANIFEST_BYTES
    if store_float:
        total += _member(c * h * w * 4 + 128)
    return total


@dataclass
class StageNeed:
    stage: str  # dvc stage name, e.g. generate@cifar10-resnet18-fast
    disk: int  # bytes written
    memory: int  # bytes held at the largest step (host; on the device too where the data goes there)
    detail: str = ""


@dataclass
class Plan:
    stages: list[StageNeed] = field(default_factory=list)

    @property
    def disk(self) -> int:
        return sum(s.disk for s in self.stages)

    @property
    def memory(self) -> int:
        return max((s.memory for s in self.stages), default=0)

    def largest(self, n: int = 5) -> list[StageNeed]:
        return sorted(self.stages, key=lambda s: -s.disk)[:n]


def _spec(name: object) -> DatasetSpec:
    if name not in DATASETS:
        raise BadParameter(f"params name dataset {name!r}, which is not registered (known: {', '.join(DATASETS)})")
    return DATASETS[name]  # type: ignore[index]


def _count(spec: DatasetSpec, limit: int, split: str) -> int:
    n = spec.counts[split]
    return min(n, limit) if limit else n


def _variants(grid: dict) -> int:
    methods = grid.get("method") or []
    eps = grid.get("eps") or []
    n = 0
    for m in methods:
        if m not in METHODS:
            raise BadParameter(f"params name method {m!r}, which is not registered")
        n += len(eps) if METHODS[m].takes_eps else 1
    return n


def estimate(params: dict) -> Plan:
    """Per-stage disk and memory estimates for a pipeline's ``params`` (see the module docstring)."""
    prep = params.get("prepare") or {}
    limit = int(prep.get("limit") or 0)
    plan = Plan()
    for ds in prep.get("datasets") or []:
        spec = _spec(ds)
        n = sum(_count(spec, limit, s) for s in spec.counts)
        image = spec.shape[0] * spec.shape[1] * spec.shape[2]
        # prepare decodes every original image (uint8) before writing shards
        plan.stages.append(StageNeed(f"prepare@{ds}", n * sample_bytes(spec) + CARD_BYTES,
                                     sum(spec.counts.values()) * image * 2, f"{n} images"))
    for key, e in (params.get("train") or {}).items():
        spec = _spec(e["dataset"])
        mparams = _VICTIM_MPARAMS.get(e["victim"], 12.0) * max(1.0, spec.num_classes / 10) ** 0.1
        image = spec.shape[0] * spec.shape[1] * spec.shape[2]
        n = _count(spec, limit, "train") + _count(spec, limit, "test")
        # the whole split as uint8 on the device, a float batch, weights + grads + momentum
        memory = n * image + int(e.get("batch_size", 512)) * image * 4 * 8 + int(mparams * 1e6 * 4 * 3)
        plan.stages.append(StageNeed(f"train@{key}", int(mparams * 1e6 * 4) + (1 << 20), memory,
                                     f"{e['victim']}, {n} images on the device"))
    for key, e in (params.get("generate") or {}).items():
        spec = _spec(e["dataset"])
        grid = e.get("grid") or {}
        splits = grid.get("split") or ["train", "test"]
        images = sum(_count(spec, limit, s) for s in splits)
        store_float = bool((e.get("flags") or {}).get("store-float"))
        variants = _variants(grid)
        disk = variants * (images * sample_bytes(spec, store_float=store_float) + CARD_BYTES)
        image = spec.shape[0] * spec.shape[1] * spec.shape[2]
        shard = max(1, max(_count(spec, limit, s) for s in splits) // 8)
        # one input shard's results for every variant (uint8 stored + float when kept) wait for the writers
        memory = shard * image * variants * (1 + 4 * store_float) * 3
        plan.stages.append(StageNeed(f"generate@{key}", disk, memory, f"{variants} copies x {images} images"))
    for key, e in (params.get("evaluate") or {}).items():
        spec = _spec(e["dataset"])
        n = sum(_count(spec, limit, s) for s in spec.counts)
        image = spec.shape[0] * spec.shape[1] * spec.shape[2]
        plan.stages.append(StageNeed(f"evaluate@{key}", n * 64 * 8 + (1 << 20), n * image * 2, "per-sample table"))
    for key, e in (params.get("retrain") or {}).items():
        spec = _spec(e["dataset"])
        modes = (e.get("modes") or {}).get("mode") or []
        mparams = _VICTIM_MPARAMS.get(e["target"], 12.0)
        n = _count(spec, limit, "train") * 2 + _count(spec, limit, "test") * 2
        image = spec.shape[0] * spec.shape[1] * spec.shape[2]
        plan.stages.append(StageNeed(f"retrain@{key}", len(modes) * int(mparams * 1e6 * 4), n * image * 2,
                                     f"{len(modes)} models"))
    for key, e in (params.get("transfer") or {}).items():
        plan.stages.append(StageNeed(f"transfer@{key}", 4 << 20, 0, ""))
    for key, e in (params.get("defend") or {}).items():
        spec = _spec(e["dataset"])
        n = _count(spec, limit, "test")
        image = spec.shape[0] * spec.shape[1] * spec.shape[2]
        sets = len((e.get("grid") or {}).get("adv") or []) + 1 + len((e.get("grid") or {}).get("scale") or [])
        plan.stages.append(StageNeed(f"defend@{key}", 4 << 20, n * image * sets, f"{sets} test sets in memory"))
    for key, e in (params.get("directions") or {}).items():
        spec = _spec(e["dataset"])
        pix = spec.shape[0] * spec.shape[1] * spec.shape[2]
        # bases: the SVD basis and four family bases (P x P at most) and the drawn picks; the Hessian-vector
        # products hold (points x probes x 2) perturbed images at a time; every class's eigenvectors (float32)
        # and the mean Hessian and its eigh (float64); both clean splits as float32
        disk = (5 * pix * pix + spec.num_classes * pix * 6) * 4 + (1 << 20)
        memory = (int(e.get("batch_size", 256)) * pix * 4 * 8 + 3 * pix * pix * 8
                  + spec.num_classes * pix * pix * 4 + sum(spec.counts.get(s, 0) for s in ("train", "test")) * pix * 4)
        plan.stages.append(StageNeed(f"directions@{key}", disk, memory, f"bases of {pix} pixels"))
    if params.get("report") is not None:
        plan.stages.append(StageNeed("report", 32 << 20, 0, "figures"))
    return plan


def human(n: float) -> str:
    """Bytes as a short human string: 1.5 GB, 320 MB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
