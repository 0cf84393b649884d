"""Attacks against independent computations, and the contracts every registered method keeps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import pattern_images
from advgen import attacks
from advgen.attacks import METHODS, deepfool, run
from advgen.victims.train import Recipe, train_victim

EPS = 0.1


class Linear(nn.Module):
    """logits = W·flatten(x) + b, with W, b known to the test."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T + self.b


def _linear(d: int = 12, k: int = 4, seed: int = 0, scale: float = 1.0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    return Linear(torch.randn(k, d, generator=g, dtype=torch.float64) * scale,
                  torch.randn(k, generator=g, dtype=torch.float64)).eval()


def _numpy_ce_grad(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∇ₓ CE(Wx + b, y) = Wᵀ(softmax(Wx + b) − onehot(y)), per sample, by hand."""
    z = x.reshape(len(x), -1) @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return (p @ w).reshape(x.shape)


@pytest.mark.parametrize("name, formula", [
    ("fgsm", lambda x, g, e: x + e * np.sign(g)),
    ("fgm", lambda x, g, e: x + e * g),
    ("fgm_l2", lambda x, g, e: x + e * g / np.linalg.norm(g.reshape(len(g), -1), axis=1).reshape(-1, 1, 1, 1)),
    ("d_fgsm", lambda x, g, e: x - e * np.sign(g)),
    ("d_fgm", lambda x, g, e: x - e * g),
])
def test_single_step_methods_match_the_formula(name, formula):
    model = _linear()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 3, 4, generator=g, dtype=torch.float64) * 0.6 + 0.2
    y = torch.randint(0, 4, (6,), generator=g)
    grad = _numpy_ce_grad(model.w.detach().numpy(), model.b.detach().numpy(), x.numpy(), y.numpy())
    expected = np.clip(formula(x.numpy(), grad, EPS), 0, 1)
    np.testing.assert_allclose(run(name, model, x, y, eps=EPS).numpy(), expected, rtol=0, atol=1e-12)


def test_pgd_without_random_start_matches_a_reference_loop():
    model = _linear(seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 1, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=g)
    ours = attacks.pgd(model, x, y, eps=0.05, steps=7, step_size=0.02, start=torch.zeros_like(x))
    # Reference: the textbook loop, gradient by hand, one image at a time.
    w, b = model.w.detach().numpy(), model.b.detach().numpy()
    ref = x.numpy().copy()
    for _ in range(7):
        ref = ref + 0.02 * np.sign(_numpy_ce_grad(w, b, ref, y.numpy()))
        ref = np.clip(np.clip(ref, x.numpy() - 0.05, x.numpy() + 0.05), 0, 1)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)


def test_deepfool_finds_the_closed_form_minimum_on_a_linear_classifier():
    model = _linear(d=12, k=5, seed=4, scale=3.0)
    g = torch.Generator().manual_seed(5)
    # Biases that put the boundaries near x = 0.5, so no step reaches the [0, 1] box.
    model.b.data = -(model.w.data @ torch.full((12,), 0.5, dtype=torch.float64)) + torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.full((8, 1, 3, 4), 0.5, dtype=torch.float64) + torch.randn(8, 1, 3, 4, dtype=torch.float64, generator=g) * 0.01
    with torch.no_grad():
        logits = model(x)
    k0 = logits.argmax(1)
    overshoot = 0.02
    r = deepfool(model, x, k0, candidates=5, overshoot=overshoot, max_iter=50)
    w, f = model.w.detach(), logits
    for i in range(8):
        dists = [(f[i, k0[i]] - f[i, k]).abs() / (w[k] - w[k0[i]]).norm() for k in range(5) if k != k0[i]]
        r_star = min(dists).item()  # the minimal L2 distance to the decision boundary
        assert r.iterations[i] == 1 and bool(r.converged[i])  # one step is exact for a linear model
        assert ((r.x[i] - x[i]).abs().max() < 0.45).item()
        assert r_star * (1 + overshoot) <= r.r_l2[i].item() <= r_star * (1 + overshoot) + 1e-3
        with torch.no_grad():
            assert model(r.x[i:i + 1]).argmax(1).item() != k0[i].item()


def test_deepfool_leaves_already_misclassified_inputs_alone():
    model = _linear(seed=6)
    x = torch.rand(10, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pred = model(x).argmax(1)
    wrong = (pred + 1) % 4
    r = deepfool(model, x, wrong)
    assert torch.equal(r.x, x)
    assert r.iterations.eq(0).all() and r.converged.all() and r.r_l2.eq(0).all()
    # With the predicted label (label_source=predicted) the same images do move.
    moved = run("deepfool", model, x, wrong, label_source="predicted")
    assert not torch.equal(moved, x)


@pytest.fixture(scope="module")
def victim():
    x, y = pattern_images(400, (1, 28, 28), 10, 0)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    model, _ = train_victim("simple_cnn", dataset="s", num_classes=10, x=x, y=torch.from_numpy(y),
                            recipe=Recipe(epochs=1, batch_size=32, lr=0.02), seed=0, device=torch.device("cpu"),
                            crop_pad=0, flip=False)
    return model


@pytest.fixture(scope="module")
def batch():
    x, y = pattern_images(32, (1, 28, 28), 10, 9)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255), torch.from_numpy(y)


@pytest.mark.parametrize("name", list(METHODS))
def test_contract_range_ball_and_direction(name, victim, batch):
    x, y = batch
    out = run(name, victim, x, y, eps=0.05, steps=5, max_iter=20, uap_passes=1)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    method = METHODS[name]
    if method.norm == "linf":
        assert (out - x).abs().max() <= 0.05 + 1e-6
    if method.norm == "l2" and not method.minimal:
        assert (out - x).flatten(1).norm(dim=1).max() <= 0.05 + 1e-6
    if method.batch_coupled:
        # Its objective is a label change on most images, not each image's loss (tests/test_uap.py checks
        # the fooling rate): here, one δ for every image wherever clipping to [0, 1] left it whole.
        delta = out - x
        whole = (out > 0) & (out < 1) & (out[:1] > 0) & (out[:1] < 1)  # neither image clipped there
        assert torch.allclose(torch.where(whole, delta, 0.0), torch.where(whole, delta[:1].expand_as(delta), 0.0),
                              atol=1e-6)
        return
    with torch.no_grad():
        before = F.cross_entropy(victim(x), y).item()
        after = F.cross_entropy(victim(out), y).item()
    if method.direction == "adversarial":
        assert after > before
    else:
        assert after < before


# A universal perturbation is fitted on the whole batch by definition, so it is the one method whose
# result for an image depends on the others (tests/test_uap.py checks its determinism instead).
@pytest.mark.parametrize("name", [m for m in METHODS if not METHODS[m].batch_coupled])
def test_contract_batch_size_invariance_and_determinism(name, victim, batch):
    # In float64, so that what is compared is the algorithm (no coupling between the images of a batch,
    # e.g. through a mean-reduced loss), not float32 rounding that differs between conv kernels chosen
    # for different batch sizes and can flip the sign of a near-zero gradient component.
    victim = copy.deepcopy(victim).double()
    x, y = batch[0].double(), batch[1]
    seeds = [attacks.sample_seed(0, "test", i) for i in range(len(y))]
    whole = run(name, victim, x, y, eps=0.05, steps=3, max_iter=10, seeds=seeds)
    one_by_one = torch.cat([run(name, victim, x[i:i + 1], y[i:i + 1], eps=0.05, steps=3, max_iter=10,
                                seeds=seeds[i:i + 1]) for i in range(len(y))])
    torch.testing.assert_close(one_by_one, whole, rtol=0, atol=1e-9)
    assert torch.equal(run(name, victim, x, y, eps=0.05, steps=3, max_iter=10, seeds=seeds), whole)


def test_random_starts_fill_the_ball():
    seeds = list(range(2000))
    linf = attacks.random_start((3, 2, 2), 0.1, "linf", seeds)
    assert linf.abs().max() <= 0.1 and linf.abs().max() > 0.099
    assert abs(linf.mean().item()) < 0.002
    l2 = attacks.random_start((3, 2, 2), 0.1, "l2", seeds).flatten(1).norm(dim=1)
    assert l2.max() <= 0.1 + 1e-6
    # Uniform in a 12-dimensional ball: P(r < 0.1·0.9) = 0.9^12 ≈ 0.28.
    assert 0.24 < (l2 < 0.09).float().mean().item() < 0.32
    assert torch.equal(attacks.random_start((3, 2, 2), 0.1, "l2", seeds[:5]),
                       attacks.random_start((3, 2, 2), 0.1, "l2", seeds[:5]))


def test_least_likely_targets():
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0, 2.0, 4.0]])
    assert attacks.least_likely(logits, "least_likely").item() == 3
    assert attacks.least_likely(logits, "top5_lowest").item() == 1  # ranks: 0, 5, 2, 4, 1


def test_run_checks_its_inputs():
    model = _linear()
    x = torch.rand(2, 1, 3, 4, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run("fgsm", model, x * 3, y, eps=0.1)
    with pytest.raises(ValueError, match="eval mode"):
        run("fgsm", model.train(), x, y, eps=0.1)
