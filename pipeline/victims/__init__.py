"""The victim zoo and its checkpoints.

Every victim takes images in [0, 1], shaped (N, C, H, W) with (C, H, W) either
(1, 28, 28) or (3, 32, 32), and returns logits. Normalization (per-channel mean
and std of the training set) lives inside the model as buffers, so attacks work
in pixel space and epsilons are in pixel units.

``VICTIMS`` maps a name to a builder ``(in_shape, num_classes) -> nn.Module``
(the network without normalization); ``build`` wraps it in ``Victim``.

A checkpoint is a plain dict of tensors and JSON-able metadata, saved with
``torch.save`` and loaded with ``weights_only=True``: no code runs on load.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from advgen.errors import CheckpointError, unknown

CKPT_FORMAT = "advgen-victim/1"


def _mlp(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))


def _flat_features(features: nn.Module, in_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *in_shape)).numel())


def _simple_cnn(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The Keras ``cifar10_cnn`` example: same/valid conv pairs, max-pool, dropout."""
    features = nn.Sequential(
        nn.Conv2d(in_shape[0], 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(),
    )
    return nn.Sequential(
        features,
        nn.Linear(_flat_features(features, in_shape), 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )


def _alexnet(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """AlexNet's five conv layers and three dense layers, sized for 28-32 px inputs.

    3x3 kernels with stride 1 replace the 11x11/stride-4 stem (which would
    leave nothing of a 32x32 image); three 2x2 max-pools leave 4x4 (32 px) or
    3x3 (28 px); the dense head is 1024 wide instead of 4096.
    """
    features = nn.Sequential(
        nn.Conv2d(in_shape[0], 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    return nn.Sequential(
        features,
        nn.Dropout(0.5), nn.Linear(_flat_features(features, in_shape), 1024), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(inplace=True),
        nn.Linear(1024, num_classes),
    )


def _alexnet_paper(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Agarwal et al.'s AlexNet variant: "5 convolutional layers each followed by max-pooling and ReLU".

    The same widths as ``alexnet`` (64, 192, 384, 256, 256; 3x3, stride 1) but
    a 2x2 max-pool after every conv layer; pools round up (ceil mode) so 28 px
    images keep a 1x1 map after five halvings (28, 14, 7, 4, 2, 1), as 32 px do.
    The paper gives no widths or head: ours are AlexNet's, with the same
    dropout → 1024 → 1024 → classes head as ``alexnet``.
    """
    layers: list[nn.Module] = []
    widths = (64, 192, 384, 256, 256)
    prev = in_shape[0]
    for w in widths:
        layers += [nn.Conv2d(prev, w, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(inplace=True)]
        prev = w
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(
        features,
        nn.Dropout(0.5), nn.Linear(_flat_features(features, in_shape), 1024), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(inplace=True),
        nn.Linear(1024, num_classes),
    )


def _resnet18(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 conv, no max-pool."""
    import torchvision  # here, not at the top: importing it costs every advgen process over a second

    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_shape[0], 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _efficientnet_b0(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's EfficientNet-B0 with a stride-1 stem for small inputs.

    On 224 px the network downsamples 32x to 7x7. Keeping that on 32 px leaves
    1x1 after the fourth stage; a stride-1 stem makes it 16x (2x2 final map for
    both 28 and 32 px) while every MBConv block, width and depth stay as in B0.
    The stem also takes ``C`` input channels (1 for the MNIST family).
    """
    import torchvision

    net = torchvision.models.efficientnet_b0(weights=None, num_classes=num_classes)
    stem = net.features[0][0]
    net.features[0][0] = nn.Conv2d(in_shape[0], stem.out_channels, 3, stride=1, padding=1, bias=False)
    return net


VICTIMS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "mlp": _mlp,
    "simple_cnn": _simple_cnn,
    "alexnet": _alexnet,
    "alexnet_paper": _alexnet_paper,
    "resnet18": _resnet18,
    "efficientnet_b0": _efficientnet_b0,
}


@dataclass
class VictimMeta:
    """Everything a checkpoint says about the model besides its weights."""

    arch: str
    dataset: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    train: dict = field(default_factory=dict)  # recipe, seed, device, clean data checksum
    test_accuracy: float | None = None
    versions: dict = field(default_factory=dict)
    # Provenance that varies without changing the model (git commit, dirty tree, file names) is not
    # kept here: it would change the checkpoint's bytes, and with them every fingerprint downstream.


class Victim(nn.Module):
    """``net`` behind a fixed per-channel normalization; inputs in [0, 1]."""

    def __init__(self, net: nn.Module, meta: VictimMeta) -> None:
        super().__init__()
        self.net = net
        self.meta = meta
        self.register_buffer("mean", torch.tensor(meta.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(meta.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def build(arch: str, *, dataset: str, input_shape: Sequence[int], num_classes: int,
          mean: Sequence[float], std: Sequence[float]) -> Victim:
    """A freshly initialized victim (weights from the global torch RNG)."""
    if arch not in VICTIMS:
        raise unknown("victim", arch, VICTIMS)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or len(mean) != shape[0] or len(std) != shape[0]:
        raise ValueError(f"input_shape {shape} needs one mean and std per channel, got {mean}, {std}")
    meta = VictimMeta(arch=arch, dataset=dataset, num_classes=int(num_classes), input_shape=shape,  # type: ignore[arg-type]
                      mean=[float(m) for m in mean], std=[float(s) for s in std])
    return Victim(VICTIMS[arch](shape, int(num_classes)), meta)  # type: ignore[arg-type]


def checkpoint_bytes(model: Victim) -> bytes:
    """The bytes ``save`` writes: a function of the weights and metadata only.

    Serialized to memory, because ``torch.save`` to a path names the archive's
    inner folder after the file, so the same model saved as ``a.pt`` and
    ``b.pt`` would differ.
    """
    meta = asdict(model.meta)
    meta["input_shape"] = list(meta["input_shape"])
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"format": CKPT_FORMAT, "meta": meta, "state_dict": state}, buf)
    return buf.getvalue()


def save(model: Victim, path: Path) -> None:
    """Write weights and metadata to ``path`` atomically (loadable with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(checkpoint_bytes(model))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_META_FIELDS = {"arch": str, "dataset": str, "num_classes": int, "input_shape": list, "mean": list, "std": list}


def _meta(raw: object, path: Path) -> VictimMeta:
    """Checked metadata of a checkpoint; ``CheckpointError`` names the first missing or malformed field."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: metadata is not a mapping")
    for key, kind in _META_FIELDS.items():
        if key not in raw:
            raise CheckpointError(f"{path}: metadata lacks {key!r}; not a checkpoint written by advgen train")
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise CheckpointError(f"{path}: metadata {key!r} is {raw[key]!r}, expected a {kind.__name__}")
    shape = raw["input_shape"]
    if len(shape) != 3 or not all(isinstance(s, int) and 0 < s <= 4096 for s in shape):
        raise CheckpointError(f"{path}: metadata input_shape {shape!r} is not (C, H, W)")
    if not 1 < raw["num_classes"] <= 100_000:
        raise CheckpointError(f"{path}: metadata num_classes {raw['num_classes']!r} is out of range")
    if len(raw["mean"]) != shape[0] or len(raw["std"]) != shape[0]:
        raise CheckpointError(f"{path}: metadata mean/std need one value per channel ({shape[0]})")
    known = {f for f in VictimMeta.__dataclass_fields__}
    try:
        return VictimMeta(**{k: v for k, v in raw.items() if k in known and k != "input_shape"},
                          input_shape=tuple(shape))  # type: ignore[arg-type]
    except TypeError as e:
        raise CheckpointError(f"{path}: metadata does not match this version of advgen ({e})") from None


def load(path: Path | str, *, dataset: str | None = None, map_location: str | torch.device = "cpu") -> Victim:
    """Load a victim in eval mode. ``dataset``, if given, must be the one it was trained on.

    Raises ``CheckpointError`` for a missing or corrupt file, a file that is not
    an advgen checkpoint, or a checkpoint for another dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not an advgen victim checkpoint (expected format {CKPT_FORMAT})")
    if "meta" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: an advgen checkpoint without meta or state_dict")
    meta = _meta(ckpt["meta"], path)
    if dataset is not None and meta.dataset != dataset:
        raise CheckpointError(
            f"{path}: this {meta.arch} was trained on {meta.dataset}, but the data here is {dataset}"
        )
    if meta.arch not in VICTIMS:
        raise CheckpointError(f"{path}: unknown architecture {meta.arch!r}")
    model = build(meta.arch, dataset=meta.dataset, input_shape=meta.input_shape,
                  num_classes=meta.num_classes, mean=meta.mean, std=meta.std)
    model.meta = meta
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {meta.arch} ({str(e).splitlines()[0]})") from None
    return model.to(map_location).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
