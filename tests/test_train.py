"""The trainer: it learns, it is reproducible, its augmentation and schedule do what they say."""

from __future__ import annotations

import pytest
import torch

from conftest import pattern_images
from advgen.errors import BadParameter
from advgen.victims.train import (
    Recipe, _lr_factor, accuracy, channel_stats, default_recipe, predict, random_crop, random_flip,
    resolve_device, train_victim,
)
from advgen.data.datasets import DATASETS
from advgen.victims import VICTIMS

CPU = torch.device("cpu")


def _task(n: int, shape=(1, 28, 28), seed=0):
    x, y = pattern_images(n, shape, 10, seed)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


@pytest.mark.parametrize("arch", ["mlp", "simple_cnn"])
def test_learns_a_separable_task(arch):
    x, y = _task(640)
    xt, yt = _task(200, seed=1)
    model, stats = train_victim(arch, dataset="synthetic", num_classes=10, x=x, y=y,
                                recipe=Recipe(epochs=4, batch_size=32, lr=0.05), seed=0,
                                device=CPU, crop_pad=0, flip=False)
    assert not model.training
    assert accuracy(model, xt, yt, device=CPU) >= 0.95
    assert stats.epochs == 4 and stats.steps == 4 * 20 and len(stats.history) == 4
    assert stats.history[-1]["loss"] < stats.history[0]["loss"]


def test_same_seed_same_weights_other_seed_other_weights():
    x, y = _task(256)
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05)

    def weights(seed):
        m, _ = train_victim("simple_cnn", dataset="s", num_classes=10, x=x, y=y, recipe=recipe, seed=seed,
                            device=CPU, crop_pad=2, flip=True)
        return m.state_dict()

    a, b, c = weights(3), weights(3), weights(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_global_rng_is_left_alone():
    x, y = _task(64)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_victim("mlp", dataset="s", num_classes=10, x=x, y=y, recipe=Recipe(epochs=1, batch_size=32, lr=0.01),
                 seed=0, device=CPU, crop_pad=0, flip=False)
    assert torch.equal(torch.rand(3), expected)


def test_random_crop_matches_a_reference_loop():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 2, torch.Generator().manual_seed(5))
    # Same draws, applied one image at a time.
    g = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 5, (16,), generator=g)
    dx = torch.randint(0, 5, (16,), generator=g)
    padded = torch.zeros(16, 3, 12, 12, dtype=torch.uint8)
    padded[:, :, 2:10, 2:10] = x
    for i in range(16):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])
    assert torch.equal(random_crop(x, 0, g), x)


def test_random_flip_mirrors_about_half():
    x = torch.randint(0, 256, (400, 1, 4, 4), dtype=torch.uint8)
    out = random_flip(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 150 < int(mirrored.sum()) < 250


def test_schedule_warms_up_then_decays_to_zero():
    f = [_lr_factor(s, 100, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:20], f[1:20]))
    assert all(a >= b for a, b in zip(f[19:], f[20:]))
    assert f[-1] == pytest.approx(1 / 80)


def test_channel_stats():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    mean, std = channel_stats(x)
    assert mean == pytest.approx([0.5]) and std == pytest.approx([0.5345], abs=1e-4)


@pytest.mark.parametrize("field, value, flag", [
    ("epochs", 0, "--epochs"), ("batch_size", 0, "--batch-size"), ("lr", -1.0, "--lr"),
    ("lr", float("nan"), "--lr"), ("weight_decay", -1.0, "--weight-decay"), ("warmup", 1.0, "--warmup"),
    ("label_smoothing", 1.0, "--label-smoothing"),
])
def test_recipe_rejects_out_of_range(field, value, flag):
    base = dict(epochs=1, batch_size=8, lr=0.1)
    with pytest.raises(BadParameter, match=flag):
        Recipe(**{**base, field: value}).check()


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("victim", list(VICTIMS))
def test_every_pair_has_a_valid_default_recipe(victim, dataset):
    default_recipe(victim, dataset).check()


def test_device_resolution():
    assert resolve_device("cpu") == CPU
    with pytest.raises(BadParameter, match="auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(BadParameter, match="no CUDA device"):
            resolve_device("cuda")


def test_predict_refuses_training_mode():
    from advgen.victims import build

    model = build("mlp", dataset="s", input_shape=(1, 28, 28), num_classes=10, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="eval mode"):
        predict(model, torch.zeros(1, 1, 28, 28, dtype=torch.uint8), device=CPU)
