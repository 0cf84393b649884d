"""Factories for tests/test_byo.py: importable callables returning a small classifier (``module:callable``)."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """A tiny MNIST-shaped classifier with its normalization inside: (N, 1, 28, 28) in [0, 1] -> (N, classes) logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.2))
        self.fc = nn.Linear(28 * 28, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x - self.mean).flatten(1) / 0.3)


def make() -> nn.Module:
    return Net()


def make_five() -> nn.Module:
    """Five logits per image, for data with ten classes."""
    return Net(num_classes=5)


def make_probabilities() -> nn.Module:
    """Softmax at the end: outputs look like probabilities, which deserves a warning."""
    return nn.Sequential(Net(), nn.Softmax(dim=1))


def not_a_module() -> object:
    return 42
