"""Every registered victim: shapes, sizes, gradients, checkpoint round trips and refusals."""

from __future__ import annotations

import zipfile

import pytest
import torch

import advgen
from advgen.errors import CheckpointError
from advgen.victims import VICTIMS, Victim, build, count_parameters, load, save

SHAPES = [(1, 28, 28), (3, 32, 32)]
# Parameter counts, 10 classes, (1x28x28, 3x32x32): computed by hand from the layer sizes.
EXPECTED_PARAMS = {
    "mlp": (784 * 512 + 512 + 512 * 10 + 10, 3072 * 512 + 512 + 512 * 10 + 10),
    # conv 1->32, 32->32, 32->64, 64->64, dense flat->512, 512->10; flat = 64*5*5 or 64*6*6
    "simple_cnn": tuple(
        (9 * c * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64)
        + (flat * 512 + 512) + (512 * 10 + 10)
        for c, flat in ((1, 64 * 5 * 5), (3, 64 * 6 * 6))
    ),
    # five 3x3 convs (64, 192, 384, 256, 256), each followed by a 2x2 pool: 1x1x256 left on 28 and 32 px,
    # then 256->1024, 1024->1024, 1024->10
    "alexnet_paper": tuple(
        (9 * c * 64 + 64) + (9 * 64 * 192 + 192) + (9 * 192 * 384 + 384) + (9 * 384 * 256 + 256)
        + (9 * 256 * 256 + 256) + (256 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10)
        for c in (1, 3)
    ),
}
PARAM_RANGES = {"alexnet": (4e6, 9e6), "resnet18": (11.0e6, 11.3e6), "efficientnet_b0": (3.9e6, 4.2e6)}


def _victim(arch: str, shape: tuple[int, int, int], classes: int = 10) -> Victim:
    torch.manual_seed(0)
    return build(arch, dataset="test", input_shape=shape, num_classes=classes,
                 mean=[0.5] * shape[0], std=[0.25] * shape[0]).eval()


@pytest.mark.parametrize("shape", SHAPES, ids=["28px", "32px"])
@pytest.mark.parametrize("arch", list(VICTIMS))
def test_forward_shapes_and_input_gradient(arch, shape):
    model = _victim(arch, shape, classes=7)
    x = torch.rand(3, *shape, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 7)
    logits[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", list(VICTIMS))
def test_parameter_counts(arch):
    counts = tuple(count_parameters(_victim(arch, s)) for s in SHAPES)
    if arch in EXPECTED_PARAMS:
        assert counts == EXPECTED_PARAMS[arch]
    else:
        lo, hi = PARAM_RANGES[arch]
        assert all(lo <= c <= hi for c in counts), counts


@pytest.mark.parametrize("arch", list(VICTIMS))
def test_checkpoint_round_trip(tmp_path, arch):
    model = _victim(arch, (3, 32, 32))
    model.meta.test_accuracy = 0.5
    save(model, tmp_path / "v.pt")
    loaded = advgen.load(tmp_path / "v.pt", dataset="test")
    assert not loaded.training
    assert loaded.meta == model.meta
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_normalization_lives_in_the_model():
    model = _victim("mlp", (1, 28, 28))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - 0.5) / 0.25))


def test_wrong_dataset_is_refused(tmp_path):
    save(_victim("mlp", (1, 28, 28)), tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="trained on test, but the data here is cifar10"):
        load(tmp_path / "v.pt", dataset="cifar10")


def test_missing_corrupt_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an advgen victim checkpoint"):
        load(tmp_path / "other.pt")


def test_truncated_checkpoint(tmp_path):
    save(_victim("mlp", (1, 28, 28)), tmp_path / "v.pt")
    data = (tmp_path / "v.pt").read_bytes()
    (tmp_path / "v.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load(tmp_path / "v.pt")


class _Payload:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran')",))


def test_checkpoint_with_code_is_not_executed(tmp_path):
    # A pickle that would run code when unpickled without weights_only.
    torch.save({"format": "advgen-victim/1", "meta": _Payload(), "state_dict": {}}, tmp_path / "evil.pt",
               pickle_protocol=2)
    assert zipfile.is_zipfile(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load(tmp_path / "evil.pt")


def test_weights_that_do_not_fit(tmp_path):
    model = _victim("mlp", (1, 28, 28))
    save(model, tmp_path / "v.pt")
    ckpt = torch.load(tmp_path / "v.pt", weights_only=True)
    ckpt["meta"]["num_classes"] = 5
    torch.save(ckpt, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="weights do not fit mlp"):
        load(tmp_path / "v.pt")
