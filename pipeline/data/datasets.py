"""The dataset registry and the search for a dataset's original files.

``DATASETS`` maps a name to a ``DatasetSpec``: shape, classes, exact split
counts, license, the original distribution's file names and md5 sums, and —
where known — the sha256 of the decoded content (for copies that were
recompressed, such as Debian's Fashion-MNIST, whose gzip md5s differ from the
originals while every decoded byte is the same).

``load_source`` finds the files in a list of folders, decodes them, checks
shape, count and label range, then checks identity: every file's md5 matches
the original distribution, or every split's decoded sha256 matches the
reference. Data that passes the structural checks but not the identity check
is refused unless the caller allows unverified content, and the result says
which check it passed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from advgen.errors import BadParameter, CorruptFile, DatasetNotFound, unknown
from advgen.data.formats import read_cifar_batches, read_idx, read_svhn_mat
from advgen.storage.shards import file_digest

SPLITS: tuple[str, ...] = ("train", "test")
Verification = Literal["original files (md5)", "decoded content (sha256)", "unverified"]


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is and where its original files come from."""

    name: str
    title: str
    shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...]
    counts: dict[str, int]  # split -> exact number of images
    license: str  # SPDX-style id or "unknown"/"other", as dataset hubs list it
    license_note: str
    homepage: str
    citation: str
    layout: "Layout"
    torchvision_class: str  # used only to download when no local copy exists
    file_md5: dict[str, str]  # file name -> md5 of the original distribution file
    content_sha256: dict[str, str] = field(default_factory=dict)  # split -> sha256
    system_dirs: tuple[str, ...] = ()  # OS packages that ship the data
    flip: bool = False  # horizontal flips are label-preserving (natural images only)
    crop_pad: int = 4  # random-translation augmentation, in pixels


    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Layout:
    """How to find a dataset's files in a folder, and how to decode them.

    ``files`` maps a role to the accepted file names (first existing wins);
    ``read`` turns the found paths into {split: (images NHWC uint8, labels)}.
    """

    files: dict[str, tuple[str, ...]]
    read: Callable[[dict[str, Path]], dict[str, tuple[np.ndarray, np.ndarray]]]
    subdirs: tuple[str, ...] = ()  # extra places under a root to look

    def locate(self, root: Path) -> dict[str, Path] | None:
        for base in (root, *(root / s for s in self.subdirs)):
            found = {}
            for role, names in self.files.items():
                hit = next((base / n for n in names if (base / n).exists()), None)
                if hit is None:
                    break
                found[role] = hit
            else:
                return found
        return None


def _idx_layout(*subdirs: str) -> Layout:
    names = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }

    def read(paths: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for split in SPLITS:
            x = read_idx(paths[f"{split}_images"])
            y = read_idx(paths[f"{split}_labels"])
            if x.ndim != 3:
                raise CorruptFile(paths[f"{split}_images"], f"expected (N, H, W) images, found {x.shape}")
            if y.ndim != 1:
                raise CorruptFile(paths[f"{split}_labels"], f"expected (N,) labels, found {y.shape}")
            out[split] = (x[..., None], y.astype(np.int64))
        return out

    return Layout({k: (v + ".gz", v) for k, v in names.items()}, read, subdirs)


def _cifar_layout(archive: str, folder: str, train: list[str], test: list[str], label_key: str) -> Layout:
    def read(paths: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        src = paths["archive"]
        return {
            "train": read_cifar_batches(src, [f"{folder}/{m}" for m in train], label_key),
            "test": read_cifar_batches(src, [f"{folder}/{m}" for m in test], label_key),
        }

    # An extracted folder is accepted as well as the archive.
    return Layout({"archive": (archive, folder)}, read)


def _svhn_layout() -> Layout:
    def read(paths: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {s: read_svhn_mat(paths[s]) for s in SPLITS}

    return Layout({"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)}, read)


_DIGITS = tuple(str(i) for i in range(10))
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_CLASSES = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
    "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
    "willow_tree wolf woman worm".split()
)
_CIFAR_CITE = "Krizhevsky, A. (2009). Learning Multiple Layers of Features from Tiny Images. Tech. report, University of Toronto."

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST",
        shape=(1, 28, 28),
        classes=_DIGITS,
        counts={"train": 60000, "test": 10000},
        license="cc-by-sa-3.0",
        license_note="Yann LeCun and Corinna Cortes hold the copyright; distributed under CC BY-SA 3.0.",
        homepage="http://yann.lecun.com/exdb/mnist/",
        citation="LeCun, Y., Bottou, L., Bengio, Y., Haffner, P. (1998). Gradient-based learning applied to document recognition. Proc. IEEE 86(11).",
        layout=_idx_layout("mnist", "MNIST/raw"),
        crop_pad=2,
        torchvision_class="MNIST",
        file_md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        title="Fashion-MNIST",
        shape=(1, 28, 28),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        counts={"train": 60000, "test": 10000},
        license="mit",
        license_note="Copyright (c) 2017 Zalando SE, MIT License.",
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation="Xiao, H., Rasul, K., Vollgraf, R. (2017). Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms. arXiv:1708.07747.",
        layout=_idx_layout("fashion_mnist", "FashionMNIST/raw"),
        crop_pad=2,
        torchvision_class="FashionMNIST",
        file_md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        # Computed from Debian's dataset-fashion-mnist (0.0~git20200523.55506a9-1),
        # whose files are recompressed copies of the originals.
        content_sha256={
            "train": "16d82e2b505296aa2b78bd5ea0992634f30419a4c97def7c907d154a35ac6157",
            "test": "9f1ec356a747bfe4ebab3cfb722d3694c9ca737e2570f6f90cf31d7b6fd689d4",
        },
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        title="CIFAR-10",
        shape=(3, 32, 32),
        classes=_CIFAR10_CLASSES,
        counts={"train": 50000, "test": 10000},
        license="unknown",
        license_note="No license is stated by the authors; dataset hubs list it as unknown. Cite the tech report.",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        citation=_CIFAR_CITE,
        layout=_cifar_layout(
            "cifar-10-python.tar.gz", "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
        ),
        torchvision_class="CIFAR10",
        file_md5={"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        flip=True,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        title="CIFAR-100",
        shape=(3, 32, 32),
        classes=_CIFAR100_CLASSES,
        counts={"train": 50000, "test": 10000},
        license="unknown",
        license_note="No license is stated by the authors; dataset hubs list it as unknown. Cite the tech report.",
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        citation=_CIFAR_CITE,
        layout=_cifar_layout("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"], "fine_labels"),
        torchvision_class="CIFAR100",
        file_md5={"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        flip=True,
    ),
    "svhn": DatasetSpec(
        name="svhn",
        title="SVHN (cropped digits, without extra)",
        shape=(3, 32, 32),
        classes=_DIGITS,
        counts={"train": 73257, "test": 26032},
        license="other",
        license_note="For non-commercial use only, per the dataset's homepage.",
        homepage="http://ufldl.stanford.edu/housenumbers/",
        citation="Netzer, Y., Wang, T., Coates, A., Bissacco, A., Wu, B., Ng, A. Y. (2011). Reading Digits in Natural Images with Unsupervised Feature Learning. NIPS Workshop.",
        layout=_svhn_layout(),
        torchvision_class="SVHN",
        file_md5={
            "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        },
    ),
}
# The extracted CIFAR batch files, for mirrors that hold the folder instead of the archive.
for _spec, _batches in (
    ("cifar10", {
        "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
    }),
    ("cifar100", {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}),
):
    DATASETS[_spec].file_md5.update(_batches)


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered under ``name``; ``UnknownName`` lists the choices."""
    try:
        return DATASETS[name]
    except KeyError:
        raise unknown("dataset", name, DATASETS) from None


# Datasets a user brings (``advgen prepare --from-folder/--from-hf``) are not registered: their clean
# folder's stats record these spec fields, and later stages rebuild the spec from the stats (``spec_for``).
SPEC_FIELDS: tuple[str, ...] = ("title", "license", "license_note", "homepage", "citation", "crop_pad", "flip")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # a folder name and an unquoted YAML scalar in cards
_LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,63}")  # SPDX-style ids: mit, cc-by-4.0, other, unknown


def _no_files(paths: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raise DatasetNotFound("a dataset its user brought has no original distribution files to read")


NO_LAYOUT = Layout(files={}, read=_no_files)


def user_spec(name: str, *, shape: tuple[int, int, int] | list[int], classes: tuple[str, ...] | list[str],
              counts: dict[str, int], title: str | None = None, license: str = "unknown", license_note: str = "",
              homepage: str = "", citation: str = "", crop_pad: int = 2, flip: bool = False) -> DatasetSpec:
    """The spec of a dataset that is not registered, described by its data; ``BadParameter`` if malformed.

    ``name`` is lowercase letters, digits, ``_`` and ``-`` and not a registered name; ``shape`` is
    (C, H, W) with C 1 or 3; at least two distinct class names; ``crop_pad``/``flip`` are the
    augmentation ``advgen train`` applies.
    """
    if name in DATASETS:
        raise BadParameter(f"--dataset {name} is a registered dataset; give your own dataset a name of its own")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadParameter(f"dataset name {name!r}: use lowercase letters, digits, _ and - (at most 64)")
    if not isinstance(license, str) or not _LICENSE.fullmatch(license):
        raise BadParameter(f"license {license!r}: give an SPDX-style id such as mit, cc-by-4.0, other or unknown")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(type(s) is int for s in shape)
            and shape[0] in (1, 3) and all(0 < s <= 4096 for s in shape)):
        raise BadParameter(f"dataset {name}: shape {shape!r} is not (C, H, W) with C 1 or 3")
    if not (isinstance(classes, (list, tuple)) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes)):
        raise BadParameter(f"dataset {name}: classes must be at least two distinct names, got {classes!r}")
    if not (isinstance(counts, dict) and all(isinstance(n, int) and n >= 0 for n in counts.values())):
        raise BadParameter(f"dataset {name}: counts {counts!r} is not a {{split: count}} object")
    if type(crop_pad) is not int or not 0 <= crop_pad < min(shape[1:]) or type(flip) is not bool:
        raise BadParameter(f"dataset {name}: crop_pad must be an integer in [0, {min(shape[1:])}) and flip a "
                           f"boolean, got {crop_pad!r} and {flip!r}")
    if not all(isinstance(v, str) for v in (title or name, license_note, homepage, citation)):
        raise BadParameter(f"dataset {name}: title, license_note, homepage and citation must be text")
    return DatasetSpec(
        name=name, title=title or name, shape=(shape[0], shape[1], shape[2]), classes=tuple(classes),
        counts=dict(counts), license=license,
        license_note=license_note or "No license was stated when this copy was prepared; check the source's terms.",
        homepage=homepage or "none given", citation=citation or "none given", layout=NO_LAYOUT,
        torchvision_class="", file_md5={}, crop_pad=crop_pad, flip=flip,
    )


def spec_record(spec: DatasetSpec) -> dict:
    """What stats record so ``spec_for`` can rebuild ``spec``: nothing for a registered dataset."""
    return {} if spec.name in DATASETS else {k: getattr(spec, k) for k in SPEC_FIELDS}


def spec_for(stats: dict) -> DatasetSpec:
    """The spec of the dataset a clean or variant folder's stats name: registered, or rebuilt from the stats.

    For a dataset that is not registered the stats must carry shape and classes (and, written by
    advgen, ``SPEC_FIELDS``); ``UnknownName`` when they do not, ``BadParameter`` when malformed.
    """
    name = stats.get("dataset")
    if name in DATASETS:
        return DATASETS[name]
    if not isinstance(name, str) or "shape" not in stats or "classes" not in stats:
        raise unknown("dataset", str(name), DATASETS)
    counts = stats.get("full_counts", stats.get("counts"))
    return user_spec(name, shape=stats["shape"], classes=stats["classes"], counts=counts,
                     **{k: stats[k] for k in SPEC_FIELDS if k in stats})


@dataclass
class Source:
    """A decoded, checked dataset: both splits in memory plus where they came from."""

    spec: DatasetSpec
    images: dict[str, np.ndarray]  # split -> (N, H, W, C) uint8
    labels: dict[str, np.ndarray]  # split -> (N,) int64
    files: dict[str, str]  # path -> md5
    content_sha256: dict[str, str]  # split -> sha256 of decoded images then labels
    verification: Verification
    origin: dict = field(default_factory=dict)  # a dataset its user brought: where it came from


def content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of a split's decoded images (NHWC uint8) followed by its labels (uint8)."""
    h = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.asarray(labels, dtype=np.uint8).tobytes())
    return h.hexdigest()


def _source_md5s(spec: DatasetSpec, paths: dict[str, Path]) -> dict[str, str]:
    """md5 of every file read; for an extracted folder, of the members it was read from."""
    out = {}
    for p in paths.values():
        if p.is_dir():
            members = sorted(q for q in p.iterdir() if q.name in spec.file_md5 and q.is_file())
            out.update({str(q): file_digest(q, "md5") for q in members})
        else:
            out[str(p)] = file_digest(p, "md5")
    return out


def locate(spec: DatasetSpec, roots: list[Path]) -> dict[str, Path] | None:
    """The first root (in order) that holds every file of ``spec``, as {role: path}."""
    for root in roots:
        if root.is_dir():
            found = spec.layout.locate(root)
            if found is not None:
                return found
    return None


def load_source(spec: DatasetSpec, paths: dict[str, Path], *, allow_unverified: bool = False) -> Source:
    """Decode the located files and check them against ``spec``.

    Structural checks (shape, label range, and the exact count unless
    ``allow_unverified``: a copy of another size is accepted then, as unverified) always apply. Identity: every
    file's md5 is the original's, or else every split's decoded sha256 is the
    reference's; otherwise ``CorruptFile`` unless ``allow_unverified``.
    """
    splits = spec.layout.read(paths)
    h, w, c = spec.shape[1], spec.shape[2], spec.shape[0]
    by_split = {s: [p for role, p in paths.items() if role.startswith(s)] or list(paths.values()) for s in SPLITS}
    for split, (x, y) in splits.items():
        where = by_split[split][0]
        if x.shape[1:] != (h, w, c):
            raise CorruptFile(where, f"{spec.name} {split} images should be {h}x{w}x{c}, found {x.shape[1:]}")
        if x.shape[0] != spec.counts[split] and not allow_unverified:
            # A copy of another size is never the reference; with --verify structure it may still be
            # prepared (a trimmed mirror, or the smoke profile's tiny synthetic files), as unverified.
            raise CorruptFile(where, f"{spec.name} {split} should have {spec.counts[split]} images, found {x.shape[0]}"
                                     " (--verify structure accepts copies of other sizes)")
        if x.shape[0] == 0:
            raise CorruptFile(where, f"{spec.name} {split} holds no images")
        if y.shape[0] != x.shape[0]:
            raise CorruptFile(by_split[split][-1], f"{x.shape[0]} images but {y.shape[0]} labels")
        if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
            raise CorruptFile(
                by_split[split][-1],
                f"labels should lie in 0..{spec.num_classes - 1}, found {y.min()}..{y.max()}",
            )
    md5s = _source_md5s(spec, paths)
    sha = {s: content_sha256(*splits[s]) for s in SPLITS}
    known = spec.file_md5
    if all(known.get(Path(p).name) == m for p, m in md5s.items()):
        verification: Verification = "original files (md5)"
    elif spec.content_sha256 and all(spec.content_sha256.get(s) == sha[s] for s in SPLITS):
        verification = "decoded content (sha256)"
    elif allow_unverified:
        verification = "unverified"
    else:
        raise CorruptFile(_identity_problem(spec, paths, md5s, sha), _identity_hint(spec))
    return Source(
        spec=spec,
        images={s: splits[s][0] for s in SPLITS},
        labels={s: splits[s][1] for s in SPLITS},
        files=md5s,
        content_sha256=sha,
        verification=verification,
    )


def _identity_problem(spec: DatasetSpec, paths: dict[str, Path], md5s: dict[str, str], sha: dict[str, str]) -> str:
    for p, m in md5s.items():
        want = spec.file_md5.get(Path(p).name)
        if want != m:
            detail = f"md5 {m} differs from the original's {want}" if want else "no reference md5 for this file name"
            split = next((s for s in SPLITS if spec.content_sha256.get(s) not in (None, sha[s])), None)
            if split:
                detail += f"; decoded {split} split sha256 {sha[split][:16]}… differs from {spec.content_sha256[split][:16]}…"
            return f"{p} ({detail})"
    return str(next(iter(paths.values())))


def _identity_hint(spec: DatasetSpec) -> str:
    ref = "" if spec.content_sha256 else f" (no reference sha256 of decoded {spec.name} content is known)"
    return (
        f"content is not the reference {spec.title}{ref}; "
        "use the original files, or pass --verify structure to prepare this copy anyway"
    )


def search_roots(spec: DatasetSpec, raw: Path, mirror: Path | None) -> list[Path]:
    """Where to look, in order: the raw folder, the mirror, OS packages."""
    roots = [raw]
    if mirror is not None:
        roots.append(mirror)
    roots.extend(Path(d) for d in spec.system_dirs)
    return roots


def download(spec: DatasetSpec, raw: Path) -> None:
    """Fetch the original files into ``raw`` with torchvision (checks md5 on arrival)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision_class)
    raw.mkdir(parents=True, exist_ok=True)
    try:
        if spec.name == "svhn":
            for split in SPLITS:
                cls(root=str(raw), split=split, download=True)
        else:
            cls(root=str(raw), train=True, download=True)
    except Exception as e:
        raise DatasetNotFound(f"could not download {spec.title} into {raw}: {e}") from None
