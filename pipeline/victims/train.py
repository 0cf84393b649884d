"""Training victims, the way the fast trainers do it.

The whole split lives on the device as uint8; each batch is cropped (and, for
natural images, flipped) on the device, converted to float there, and fed in
channels-last layout (bf16 autocast on CUDA). The loss and accuracy are
accumulated on the device and read back only a few times per epoch, so the
host never waits on the device step by step. The schedule is SGD with Nesterov
momentum, a linear warm-up and a linear decay to zero; label smoothing is off
by default because it flattens the logits attacks work against.

Seeded and reproducible on the CPU: one seed fixes the weight init, the
dropout masks, the batch order and the augmentation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen.errors import AdvgenError, BadParameter
from advgen.victims import Victim, build


@dataclass(frozen=True)
class Recipe:
    """Optimization hyperparameters of one training run."""

    epochs: int
    batch_size: int
    lr: float  # peak learning rate, reached at the end of warm-up
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.15  # fraction of all steps spent ramping up from 0
    label_smoothing: float = 0.0
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adam (for recipes that name it, such as a paper's)

    def check(self) -> None:
        if self.epochs < 1:
            raise BadParameter(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise BadParameter(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadParameter(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise BadParameter(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            raise BadParameter(f"--warmup must lie in [0, 1), got {self.warmup}")
        if not 0 <= self.label_smoothing < 1:
            raise BadParameter(f"--label-smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.optimizer not in ("sgd", "adam"):
            raise BadParameter(f"--optimizer must be sgd or adam, got {self.optimizer!r}")


# Batch size, peak lr and weight decay per victim; epochs per dataset. These are
# the recipes used when no flag overrides them, and the demo's (Fashion-MNIST on
# a 2-core CPU). params.yaml sets the full study's longer schedules explicitly.
_VICTIM_RECIPE = {
    "mlp": dict(batch_size=128, lr=0.05, weight_decay=5e-4),
    "simple_cnn": dict(batch_size=128, lr=0.1, weight_decay=5e-4),
    "alexnet": dict(batch_size=256, lr=0.05, weight_decay=5e-4),
    "alexnet_paper": dict(batch_size=256, lr=0.05, weight_decay=5e-4),
    "resnet18": dict(batch_size=512, lr=0.2, weight_decay=5e-4),
    "efficientnet_b0": dict(batch_size=256, lr=0.1, weight_decay=5e-5),
}
_DATASET_EPOCHS = {"mnist": 5, "fashion_mnist": 8, "cifar10": 30, "cifar100": 40, "svhn": 10}


def default_recipe(victim: str, dataset: str) -> Recipe:
    """The recipe applied when no flag overrides it."""
    # 10 epochs for a dataset its user brought (prepare --from-folder/--from-hf), as for SVHN.
    return Recipe(epochs=_DATASET_EPOCHS.get(dataset, 10), **_VICTIM_RECIPE[victim])


@dataclass
class TrainStats:
    """What a training run measured (host-side numbers, read once per log point)."""

    epochs: int
    steps: int
    train_loss: float
    train_accuracy: float  # on the augmented batches of the last epoch
    seconds: float
    images_per_second: float
    device: str
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


Progress = Callable[[int, int, int, dict], None]  # (epoch, step in epoch, steps per epoch, {loss, accuracy})
Perturb = Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]  # (model, x in [0, 1], y, gen) -> x'



def channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 images (N, C, H, W)."""
    xf = x.to(torch.float64).div(255)
    return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).tolist()


def random_crop(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``pad`` pixels (zero fill), one offset per image."""
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(x: Tensor, gen: torch.Generator) -> Tensor:
    """Mirror half of the images left-right."""
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _lr_factor(step: int, total: int, warmup: float) -> float:
    ramp = max(1, round(warmup * total))
    if step < ramp:
        return (step + 1) / ramp
    return max(0.0, (total - step) / max(1, total - ramp))


def train_victim(
    arch: str,
    *,
    dataset: str,
    num_classes: int,
    x: Tensor,
    y: Tensor,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    crop_pad: int,
    flip: bool,
    on_progress: Progress | None = None,
    perturb: Perturb | None = None,
) -> tuple[Victim, TrainStats]:
    """Build ``arch`` and train it on uint8 images ``x`` (N, C, H, W) with labels ``y``.

    Normalization constants come from ``x``. Returns the model in eval mode on
    ``device`` and the run's statistics. The global torch RNG state is restored
    afterwards. ``perturb``, if given, replaces every (augmented) training
    batch by its output: adversarial training against the model being trained.
    """
    recipe.check()
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    mean, std = channel_stats(x)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        model = build(arch, dataset=dataset, input_shape=x.shape[1:], num_classes=num_classes, mean=mean, std=std)
        stats = fit(model, x, y, recipe=recipe, seed=seed, device=device,
                     crop_pad=crop_pad, flip=flip, on_progress=on_progress, perturb=perturb)
    return model, stats


def fit(model: Victim, x: Tensor, y: Tensor, *, recipe: Recipe, seed: int, device: torch.device,
        crop_pad: int, flip: bool, on_progress: Progress | None = None, perturb: Perturb | None = None) -> TrainStats:
    """Train ``model`` in place on uint8 images ``x`` with ``recipe`` (see ``train_victim``); eval mode after."""
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    model.to(device=device, memory_format=torch.channels_last).train()
    x, y = x.to(device), y.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    n = x.shape[0]
    bs = min(recipe.batch_size, n)
    steps = n // bs  # drop the ragged last batch: BatchNorm needs more than one sample
    total = steps * recipe.epochs
    log_every = max(1, steps // 10)
    if recipe.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr,
                                                      weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                              nesterov=recipe.momentum > 0, weight_decay=recipe.weight_decay)
    history: list[dict] = []
    start = time.perf_counter()
    step = 0
    for epoch in range(recipe.epochs):
        order = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        for i in range(steps):
            idx = order[i * bs:(i + 1) * bs]
            xb = random_crop(x[idx], crop_pad, gen)
            if flip:
                xb = random_flip(xb, gen)
            xb = xb.float().div_(255).contiguous(memory_format=torch.channels_last)
            yb = y[idx]
            if perturb is not None:
                xb = perturb(model, xb, yb, gen).contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = recipe.lr * _lr_factor(step, total, recipe.warmup)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += bs
            loss_sum += loss.detach() * bs
            correct += (logits.detach().argmax(1) == yb).sum()
            if on_progress and ((i + 1) % log_every == 0 or i + 1 == steps):
                on_progress(epoch, i + 1, steps, {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen})
        epoch_loss = loss_sum.item() / seen
        if not math.isfinite(epoch_loss):
            raise AdvgenError(f"training diverged in epoch {epoch + 1} (loss {epoch_loss}); lower --lr")
        history.append({"epoch": epoch + 1, "loss": epoch_loss, "accuracy": correct.item() / seen,
                        "seconds": time.perf_counter() - start})
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    return TrainStats(
        epochs=recipe.epochs, steps=total, train_loss=history[-1]["loss"],
        train_accuracy=history[-1]["accuracy"], seconds=seconds,
        images_per_second=total * bs / seconds if seconds > 0 else float("inf"),
        device=str(device), history=history,
    )


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, *, device: torch.device, batch_size: int = 1024) -> Tensor:
    """Top-1 predictions (on the CPU) for uint8 images ``x`` (N, C, H, W)."""
    if model.training:
        raise ValueError("predict() expects a model in eval mode")
    cuda = device.type == "cuda"
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device).float().div_(255).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            out.append(model(xb).argmax(1))
    return torch.cat(out).cpu()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, device: torch.device, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``x`` with labels ``y``."""
    return (predict(model, x, device=device, batch_size=batch_size) == y.cpu()).float().mean().item()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadParameter("--device cuda was asked for, but no CUDA device is available")
        return torch.device(name)
    raise BadParameter(f"--device must be auto, cpu or cuda[:N], got {name!r}")
