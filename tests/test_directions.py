"""Jetley et al.'s directions analysis: closed-form answers on linear and quadratic models, answers computed by
hand, and ``advgen directions`` end to end on a tiny clean folder, victim and generated variants."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_split_by_hand, tiny_clean
from torch import nn
from typer.testing import CliRunner

from advgen.analysis import directions as D
from advgen.attacks import deepfool
from advgen.defenses import Resample
from advgen.report.directions import section
from advgen.victims import load
from advgen.stages.cli import app

runner = CliRunner()


# --- models with known answers ---------------------------------------------------------------------

def _linear(shape=(1, 4, 5), classes: int = 4, seed: int = 0) -> nn.Module:
    """A random linear classifier whose logits all agree at the mid-grey image, so [0, 1] images fall in every class."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), classes)).eval()
    with torch.no_grad():
        net[1].bias.copy_(-0.5 * net[1].weight.sum(1))
    return net


class Quadratic(nn.Module):
    """Two logits: q(x) = xᵀAx/2 + b·x + c and 0, so F_0 − F_1 = q and its Hessian is A."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, c: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("a", a.float())
        self.register_buffer("b", b.float())
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)
        q = 0.5 * ((v @ self.a) * v).sum(1) + v @ self.b + self.c
        return torch.stack([q, torch.zeros_like(q)], dim=1)


def _known_quadratic(p: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, its eigenvalues descending, eigenvectors as columns): distinct eigenvalues of both signs and one near 0."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    lam = torch.tensor([3.0, 2.0, 1.1, 0.4, 0.02, -0.3, -1.2, -2.1, -3.3], dtype=torch.float64)[:p]
    return q @ torch.diag(lam) @ q.T, lam, q


def _same_up_to_sign(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per column: |cos| between the columns of a and b."""
    a, b = a.double(), b.double()
    return ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))).abs()


# --- linear classifier: DeepFool perturbations span the row differences of W ------------------------

def test_deepfool_perturbations_of_a_linear_model_have_rank_c_minus_1_and_keep_the_accuracy():
    classes, shape = 4, (1, 4, 5)
    model = _linear(shape, classes)
    x = torch.rand(200, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    res = deepfool(model, x, y, clip=False)  # clipping would bend δ out of the row space
    assert bool(res.converged.all())
    vec, sv = D.gradient_directions(res.x - x)
    assert float(sv[classes - 1:].max()) < 1e-5 * float(sv[0])  # rank <= C − 1
    assert float(sv[classes - 2]) > 1e-3 * float(sv[0])  # and all C − 1 directions are used
    w = model[1].weight.detach().double()
    diffs = (w[1:] - w[0]).T  # (P, C − 1): the closed-form span
    top = vec[:, : classes - 1]
    assert torch.allclose(top @ (top.T @ diffs), diffs, atol=1e-6)
    acc = D.accuracy_vs_dims(model, x, y, x.mean(0), vec, [classes - 1, classes - 2, 0])
    assert acc[0] == 1.0  # the top C − 1 singular vectors carry all of the classification
    assert acc[1] < 1.0


@pytest.mark.parametrize("rows", [3, 12, 40])
def test_gradient_directions_with_fewer_perturbations_than_pixels_equal_the_full_svd(rows):
    g = torch.Generator().manual_seed(rows)
    deltas = torch.randn(rows, 1, 4, 5, generator=g, dtype=torch.float64)
    deltas[-1] = deltas[0] + deltas[1]  # one dependent row: rank rows − 1
    vec, sv = D.gradient_directions(deltas)
    u, s, vh = torch.linalg.svd(deltas.reshape(rows, -1), full_matrices=True)
    r = min(rows - 1, 20)
    assert vec.shape == (20, 20) and sv.shape == (20,)
    assert torch.allclose(vec.T @ vec, torch.eye(20, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(sv[:r], s[:r], rtol=1e-6) and float(sv[r:].abs().sum()) < 1e-6 * float(s[0])
    assert bool((_same_up_to_sign(vec[:, :r], vh[:r].T) > 1 - 1e-8).all())


def test_deepfool_perturbations_computed_on_the_fly_flip_the_models_own_predictions():
    model = _linear()
    x = torch.rand(30, 1, 4, 5, generator=torch.Generator().manual_seed(11))
    delta = D.deepfool_perturbations(model, x, batch_size=7, max_iter=50)
    assert delta.shape == x.shape  # a linear model: DeepFool moves every image
    with torch.no_grad():
        assert bool((model(x + delta).argmax(1) != model(x).argmax(1)).all())
    assert 0.0 <= float((x + delta).min()) and float((x + delta).max()) <= 1.0  # clipped as a stored copy is
    assert torch.allclose(delta, D.deepfool_perturbations(model, x, batch_size=30, max_iter=50), atol=1e-6)


# --- Hessian estimate: a quadratic form, smooth and ReLU networks -----------------------------------

@pytest.mark.parametrize("h", [0.01, 0.25])
def test_mean_hessian_of_a_quadratic_recovers_its_eigenvectors_and_eigenvalue_signs(h):
    a, lam, q = _known_quadratic()
    model = Quadratic(a, torch.linspace(-1, 1, 9))
    points = torch.rand(5, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    hess = D.mean_hessian(model, points, 0, torch.ones(5, dtype=torch.int64), h=h, batch_size=7)
    assert hess.dtype == torch.float64 and torch.equal(hess, hess.T)
    assert torch.allclose(hess, a, atol=1e-4)  # central differences are exact on a quadratic
    got_lam, got_vec = torch.linalg.eigh(hess)
    assert torch.equal(got_lam.flip(0).sign(), lam.sign())
    assert bool((_same_up_to_sign(got_vec.flip(1), q) > 0.999).all())
    neg = D.mean_hessian(model, points, torch.ones(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), h=h)
    assert torch.allclose(neg, -a, atol=1e-4)  # F_1 − F_0 = −q


def test_mean_hvp_along_any_vectors_is_the_hessian_times_them():
    a, _, _ = _known_quadratic()
    model = Quadratic(a, torch.linspace(-1, 1, 9))
    points = torch.rand(3, 1, 3, 3, generator=torch.Generator().manual_seed(6))
    v = torch.randn(9, 4, generator=torch.Generator().manual_seed(7))
    v /= v.norm(dim=0)
    got = D.mean_hvp(model, points, 0, torch.ones(3, dtype=torch.int64), v, h=0.1, batch_size=5)
    assert torch.allclose(got, a @ v.double(), atol=1e-4)


def test_grouped_hvp_is_each_groups_own_mean_hvp_whatever_the_batches():
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4)).double().eval()
    points = torch.rand(5, 1, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target, source = torch.tensor([0, 0, 2, 3, 3]), torch.tensor([1, 2, 1, 0, 2])
    group = torch.tensor([0, 0, 1, 2, 2])  # three groups of 2, 1 and 2 points, each with probes of its own
    v = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = torch.stack([D.mean_hvp(model, points[group == g], target[group == g], source[group == g], v[g], h=0.05)
                        for g in range(3)])
    for batch_size in (2, 7, 64):  # one perturbed input per pass, an odd split, everything at once
        got = D.grouped_hvp(model, points, target, source, group, v, h=0.05, batch_size=batch_size)
        assert got.shape == (3, 9, 4) and got.dtype == torch.float64
        assert torch.allclose(got, want, atol=1e-10)


def test_sketch_eigh_recovers_a_low_rank_hessian_exactly_and_calls_the_rest_flat():
    g = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    lam = torch.tensor([4.0, 2.5, -1.5, -3.0], dtype=torch.float64)
    a = q[:, :4] @ torch.diag(lam) @ q[:, :4].T  # rank 4 of 30
    calls = []

    def hvp(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.shape[1])
        return a @ v

    sketch = D.sketch_eigh(hvp, 30, 6, torch.Generator().manual_seed(0))
    values, vectors = sketch.values, sketch.columns(torch.arange(30))
    assert calls == [6, 6]  # 2·probes products, never P
    assert torch.allclose(vectors.T @ vectors, torch.eye(30, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(values[:2], lam[:2], atol=1e-9) and torch.allclose(values[-2:], lam[2:], atol=1e-9)
    assert float(values[2:-2].abs().max()) < 1e-9  # everything else flat
    for col, k in ((0, 0), (1, 1), (-2, 2), (-1, 3)):
        assert float(_same_up_to_sign(vectors[:, col:col + 1 if col != -1 else None], q[:, k:k + 1])[0]) > 1 - 1e-9
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, a, atol=1e-9)


def test_curvature_directions_from_a_full_rank_sketch_equal_the_whole_hessians():
    a, lam, q = _known_quadratic()
    b = torch.linspace(-1, 1, 9)
    x = torch.rand(20, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    v = x.flatten(1).double()
    model = Quadratic(a, b, c=-float((0.5 * ((v @ a) * v).sum(1) + v @ b.double()).median()))
    with torch.no_grad():
        pred = model(x).argmax(1)
    whole = D.curvature_directions(model, x, pred, 2, per_class=4, h=0.05, generator=torch.Generator().manual_seed(0))
    sketch = D.curvature_directions(model, x, pred, 2, per_class=4, h=0.05, probes=8,
                                    generator=torch.Generator().manual_seed(0))
    assert whole.points == sketch.points and min(whole.points) >= 1
    # rank 8 of 9: the eight largest |λ| are resolved to within the unresolved tail (|λ| = 0.02), the flattest is
    # called 0; and the directions of the two largest |λ| agree with the whole Hessian's
    for c in range(2):
        assert torch.allclose(sketch.eigenvalues[c].sort().values, whole.eigenvalues[c].where(
            whole.eigenvalues[c].abs() > 0.05, torch.zeros(())).sort().values, atol=0.02)
        for col in (0, -1):
            cos = _same_up_to_sign(sketch.eigenvectors[c][:, col:][:, :1], whole.eigenvectors[c][:, col:][:, :1])
            assert float(cos[0]) > 0.99


def test_curvature_directions_of_a_two_class_quadratic_follow_the_target_class():
    a, lam, q = _known_quadratic()
    b = torch.linspace(-1, 1, 9)
    x = torch.rand(40, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    v = x.flatten(1).double()
    vals = 0.5 * ((v @ a) * v).sum(1) + v @ b.double()
    model = Quadratic(a, b, c=-float(vals.median()))  # half the images on each side of the boundary
    with torch.no_grad():
        pred = model(x).argmax(1)
    curv = D.curvature_directions(model, x, pred, 2, per_class=6, h=0.05, generator=torch.Generator().manual_seed(0))
    assert min(curv.points) >= 4  # targeted DeepFool reached the boundary
    lonely = D.curvature_directions(model, x[pred == 0], pred[pred == 0], 2, per_class=2, h=0.05,
                                    generator=torch.Generator().manual_seed(0))
    assert lonely.points[0] == 0 and lonely.mean_r_l2[0] is None  # no image of another class: a zero Hessian
    assert float(lonely.eigenvalues[0].abs().max()) == 0.0 and lonely.points[1] >= 1
    assert torch.allclose(curv.eigenvalues[0], lam, atol=1e-3)  # class 0: Hessian of q = A
    assert torch.allclose(curv.eigenvalues[1], -lam.flip(0), atol=1e-3)  # class 1: −A
    assert bool((_same_up_to_sign(curv.eigenvectors[0], q) > 0.999).all())
    assert bool((_same_up_to_sign(curv.eigenvectors[1][:, 0], q[:, -1]) > 0.999))  # A's most negative
    assert D.family_order(curv.eigenvalues[0], "flat")[0] == 4  # λ = 0.02 is the flattest


def _net(act: nn.Module) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(9, 16), act, nn.Linear(16, 3)).double().eval()


def test_finite_differences_match_autograd_on_a_smooth_net_and_see_what_it_misses_on_relu():
    x = torch.rand(1, 1, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def exact(model: nn.Module) -> torch.Tensor:
        def g(v: torch.Tensor) -> torch.Tensor:
            out = model(v.view(1, 1, 3, 3))
            return out[0, 2] - out[0, 0]
        return torch.autograd.functional.hessian(g, x.flatten())

    smooth = _net(nn.Tanh())
    est = D.mean_hessian(smooth, x, 2, torch.zeros(1, dtype=torch.int64), h=1e-3)
    assert torch.allclose(est, exact(smooth), atol=1e-5)
    relu = _net(nn.ReLU())
    assert float(exact(relu).abs().max()) == 0.0  # autograd sees no curvature in a ReLU net
    est = D.mean_hessian(relu, x, 2, torch.zeros(1, dtype=torch.int64), h=0.5)
    assert float(est.abs().max()) > 1e-3  # differences at scale h do


# --- projections, fractions, ranks -------------------------------------------------------------------

def test_projection_accuracy_is_clean_accuracy_at_full_dimension_and_the_mean_images_at_zero():
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5)).eval()  # default init: no tie at the mean image
    g = torch.Generator().manual_seed(5)
    x = torch.rand(30, 1, 6, 6, generator=g)
    y = torch.randint(0, 5, (30,), generator=g)
    q, _ = torch.linalg.qr(torch.randn(36, 36, generator=g, dtype=torch.float64))
    mean = x.mean(0)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
        at_mean = float((model(mean[None]).argmax(1) == y).float().mean())
    assert D.accuracy_vs_dims(model, x, y, mean, q, [36, 0], batch_size=7) == pytest.approx([clean, at_mean])


def test_norm_fractions_by_hand():
    deltas = torch.tensor([[3.0, 4, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    got, used = D.norm_fractions(deltas, torch.eye(4, dtype=torch.float64), [0, 1, 2, 4])
    assert used == 2
    assert got == pytest.approx([0.0, (3 / 5 + 1 / 2) / 2, (1 + math.sqrt(2) / 2) / 2, 1.0])
    assert D.projection_norms(torch.tensor([[[[2.0, 0, 0, 1]]]]), torch.zeros(1, 1, 4), torch.eye(4), [1, 4]) == \
        pytest.approx([2.0, math.sqrt(5)])


def test_orthonormal_prefixes_drop_columns_that_add_no_dimension():
    e = torch.eye(4, dtype=torch.float64)
    stack = torch.stack([e[0], 2 * e[0], e[1], e[0] + e[1], e[2]], dim=1)
    q, kept = D.orthonormal_prefixes(stack)
    assert kept.tolist() == [0, 2, 4]
    assert [D.rank_at(kept, k) for k in range(6)] == [0, 1, 1, 2, 2, 3]
    assert torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64))
    assert torch.allclose((q @ q.T) @ stack, stack)


def test_family_stack_interleaves_classes_by_rank():
    vecs = torch.eye(4).expand(2, 4, 4).clone()
    vecs[1] = vecs[1].flip(1)  # class 1's columns in the other order
    curv = D.Curvature(torch.tensor([[3.0, 1, -0.1, -2], [4.0, 0.5, -1, -5]], dtype=torch.float64), vecs, [1, 1],
                       [None, None])
    pos = D.family_stack(curv, "pos", 4)
    assert pos.argmax(0).tolist() == [0, 3, 1, 2]  # class 0's 1st, class 1's 1st, class 0's 2nd, class 1's 2nd
    neg = D.family_stack(curv, "negpos", 4)
    assert neg.argmax(0).tolist() == [0, 3, 3, 0]  # most positive of each, then most negative of each
    flat = D.family_stack(curv, "flat", 2)
    assert flat.argmax(0).tolist() == [2, 2]  # |λ| smallest: class 0 column 2 (−0.1), class 1 column 1 → e2
    assert D.family_columns("negpos", 3, 10) == 60 and D.family_columns("hi", 3, 10) == 3


def test_keeping_only_the_needed_eigenvectors_changes_no_family_and_no_pick():
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).eval()
    x = torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        pred = model(x).argmax(1)
    kw = dict(per_class=3, h=0.05, max_iter=30)
    whole = D.curvature_directions(model, x, pred, 3, generator=torch.Generator().manual_seed(0), **kw)
    small = D.curvature_directions(model, x, pred, 3, generator=torch.Generator().manual_seed(0), keep=2, **kw)
    assert small.eigenvectors.shape == (3, 16, 6) and whole.eigenvectors.shape == (3, 16, 16)
    assert torch.equal(small.eigenvalues, whole.eigenvalues) and sum(n > 0 for n in whole.points) >= 2
    for fam in ("pos", "neg", "negpos", "flat"):
        assert torch.equal(D.family_stack(small, fam, 6), D.family_stack(whole, fam, 6)), fam
    assert torch.equal(D.curvature_picks(small), D.curvature_picks(whole))
    with pytest.raises(ValueError, match="not kept"):
        D.family_stack(small, "pos", 9)  # three per class: more than were kept


# --- class-score profiles and the fooling rate, by hand ----------------------------------------------

class _Sum(nn.Module):
    """Logits (Σx − 2, 0): class 0 iff the pixels sum to more than 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1).sum(1) - 2
        return torch.stack([f, torch.zeros_like(f)], dim=1)


def _images(sums: list[float]) -> torch.Tensor:
    return torch.tensor(sums).view(-1, 1, 1, 1).expand(-1, 1, 2, 2) / 4


def test_fooling_rate_against_a_hand_computed_example():
    x = _images([2.5, 3.0, 2.2, 2.9])  # all class 0
    delta = torch.full_like(x, -0.075)  # each lowers the sum by 0.3
    delta[3] = 0  # not attacked: left out of the rate
    rows = D.resampling_rows(_Sum(), x, torch.tensor([0, 0, 0, 1]), delta, [2], [1, 2, 3, 4])
    # fooled iff sum − 0.3·f < 2: 2.5 from f = 2 on, 3.0 from f = 4, 2.2 from f = 1
    assert rows[0]["fooling_rate"] == pytest.approx({"1": 1 / 3, "2": 2 / 3, "3": 2 / 3, "4": 1.0})
    assert rows[0]["accuracy"] == 0.75 and rows[0]["attacked"] == 3
    assert rows[0]["mean_image_l2"] == pytest.approx(np.mean([2.5, 3.0, 2.2, 2.9]) / 2)
    assert rows[0]["mean_delta_l2"] == pytest.approx(0.15)


def test_no_attacked_image_gives_no_fooling_rate_rather_than_a_crash():
    x = _images([2.5, 3.0])
    rows = D.resampling_rows(_Sum(), x, torch.tensor([0, 0]), torch.zeros_like(x), [2, 1], [1, 2])
    assert [r["fooling_rate"] for r in rows] == [{"1": None, "2": None}] * 2
    assert [r["attacked"] for r in rows] == [0, 0] and rows[0]["mean_delta_l2"] is None


def test_resample_linear_is_the_resampling_defense_where_nothing_is_clamped():
    t = torch.linspace(0, 3, 28)
    x = (0.5 + 0.2 * torch.sin(t)[:, None] * torch.cos(t)[None, :]).view(1, 1, 28, 28)
    for size in (28, 20, 14):
        assert torch.allclose(D.resample_linear(x, size), Resample(size)(x), atol=1e-6)


def test_class_profile_of_a_linear_score_by_hand():
    x = _images([2.5, 0.9, 1.5, 3.0])  # predicted 0, 1, 1, 0
    v = torch.full((4,), 0.5)  # unit: along it the score Σx − 2 grows by 2 per unit of s
    s = [-1.0, 0.0, 0.5, 1.0]
    prof = D.class_profile(_Sum(), x, v, 0, s, curves=2)
    scores = np.array([[a - 2 + 2 * t for t in s] for a in (2.5, 0.9, 1.5, 3.0)])
    assert prof.target[1] == pytest.approx(np.median(scores, axis=0).tolist(), abs=1e-5)
    assert prof.target[0] == pytest.approx(np.quantile(scores, 0.3, axis=0).tolist(), abs=1e-5)
    assert prof.other[1] == pytest.approx([0.0] * 4)
    assert prof.into_target == pytest.approx([0.0, 0.0, 0.5, 1.0])  # 1.5 crosses at s > 0.25, 0.9 at s > 0.55
    assert prof.stay_target == pytest.approx([0.0, 1.0, 1.0, 1.0])  # 2.5 and 3.0 leave at s = −1
    sig = 1 / (1 + np.exp(-scores[1:3]))  # softmax of (f, 0) for the two non-target images
    assert prof.into_softmax == pytest.approx(np.median(sig, axis=0).tolist(), abs=1e-5)
    assert np.allclose(prof.curves, scores[:2], atol=1e-5)


# --- advgen directions end to end ------------------------------------------------------------------

SMALL = ["--curvature-images", "2", "--fd-scale", "0.25", "--dims", "0", "--dims", "1", "--dims", "3",
         "--svd-dims", "0", "--svd-dims", "5", "--svd-dims", "9", "--train-images", "48", "--test-images", "24",
         "--svd-images", "100", "--profile-classes", "2", "--profile-images", "8", "--s-max", "2", "--s-steps", "5",
         "--confined-images", "4", "--resample-size", "14", "--scale", "1", "--scale", "2", "--max-iter", "10",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """root/clean (mnist 48 + 24), root/victim.pt, root/adv (deepfool and fgsm ε=0.1, --store-float, both splits)
    and root/adv_fgsm (fgsm only)."""
    root = tmp_path_factory.mktemp("directions")
    tiny_clean(root)
    result = runner.invoke(app, ["train", "--dataset", "mnist", "--victim", "mlp", "--clean", str(root / "clean"),
                                 "--out", str(root / "victim.pt"), "--metrics", str(root / "train.json"),
                                 "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--seed", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for out, methods in (("adv", ["deepfool", "fgsm"]), ("adv_fgsm", ["fgsm"])):
        result = runner.invoke(app, ["generate", "--victim-ckpt", str(root / "victim.pt"), "--clean", str(root / "clean"),
                                     "--out", str(root / out), *[a for m in methods for a in ("--method", m)],
                                     "--eps", "0.1", "--store-float", "--device", "cpu", "--workers", "0"])
        assert result.exit_code == 0, result.output
    return root


def _directions(root: Path, out: Path, *extra: str, adv: str = "adv"):
    return runner.invoke(app, ["directions", "--victim-ckpt", str(root / "victim.pt"), "--clean", str(root / "clean"),
                               "--adv", str(root / adv), "--metrics", str(out / "directions.json"),
                               "--plots", str(out / "plots"), "--bases", str(out / "bases"), *SMALL, *extra])


@pytest.fixture(scope="module")
def done(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("directions-out")
    result = _directions(setup, out)
    assert result.exit_code == 0, result.output
    return out


def test_the_command_writes_metrics_plot_tables_and_bases(setup, done):
    m = json.loads((done / "directions.json").read_text())
    for key in ("accuracy", "fractions", "profiles", "confined", "resampling", "hessian", "svd", "timings", "params"):
        assert key in m
    assert set(m["fractions"]) == {"deepfool", "fgsm@0.1", "saliency"}
    assert m["hessian"]["fd_scale"] == 0.25 and m["deepfool"]["float"] is True
    assert len(m["profiles"]) == 2 and [r["size"] for r in m["resampling"]["rows"]] == [28, 14]
    for name, columns in D.PLOT_COLUMNS.items():
        with open(done / "plots" / f"{name}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == columns and len(rows) > 1, name
    stats = json.loads((done / "bases" / "_stats.json").read_text())
    shapes = {"curvature_directions.npy": (10, 784, 5), "curvature_eigenvalues.npy": (10, 784),
              "svd_basis.npy": (784, 784), "svd_values.npy": (784,), "mean_image.npy": (1, 28, 28)}
    for name, info in stats["files"].items():
        arr = np.load(done / "bases" / name, allow_pickle=False)
        assert arr.dtype == np.float32 and list(arr.shape) == info["shape"]
        if name in shapes:
            assert arr.shape == shapes[name]
    for name in ("svd_basis.npy", "family_pos.npy", "family_flat.npy"):
        q = np.load(done / "bases" / name, allow_pickle=False).astype(np.float64)
        assert np.allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-4), name


def test_full_dimension_gives_the_clean_accuracy_computed_independently(setup, done):
    m = json.loads((done / "directions.json").read_text())
    _, images, labels = read_split_by_hand(setup / "clean", "test")  # all 24 test images take part
    model = load(setup / "victim.pt")
    with torch.no_grad():
        pred = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    clean = float((pred == labels).mean())
    assert m["clean_accuracy"]["test"] == pytest.approx(clean)
    for fam, a in m["accuracy"].items():
        assert a["rank"][-1] == 784 and a["test"][-1] == pytest.approx(clean), fam
        assert a["d"][0] == 0
    for name, e in m["fractions"].items():
        for fam in ("pos", "flat", "hi", "lo"):
            assert e[fam]["fraction"][-1] == pytest.approx(1.0, abs=1e-6) and e[fam]["fraction"][0] == 0.0


def _refused(result, message: str, out: Path) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advgen directions: error: ") and message in lines[0], lines
    assert not any(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize(("extra", "adv", "message"), [
    ([], "adv_fgsm", "no DeepFool copy of this victim"),
    (["--dims", "785"], "adv", "--dims 785 is larger than the input dimension 784"),
    (["--svd-dims", "1000"], "adv", "--svd-dims 1000 is larger than the input dimension 784"),
    (["--scale", "0"], "adv", "--scale must be > 0, got 0.0"),
    (["--scale", "-2"], "adv", "--scale must be > 0, got -2.0"),
    (["--fd-scale", "0"], "adv", "--fd-scale must be > 0"),
    (["--resample-size", "40"], "adv", "--resample-size 40 is larger than the images (28 px)"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(setup, tmp_path, extra, adv, message):
    _refused(_directions(setup, tmp_path, *extra, adv=adv), message, tmp_path)


def test_report_section_draws_and_links_every_figure(done, tmp_path):
    m = json.loads((done / "directions.json").read_text())
    lines = section(m, figs=tmp_path / "figures", out=tmp_path, title="Directions: mlp")
    text = "\n".join(lines)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "figures").glob("*.png"))
    assert sorted(links) == pngs and len(pngs) == 6 + len(m["profiles"])
    assert "h = 0.25" in text and "finite differences" in text
    assert "| size | accuracy |" in text


def test_findings_quote_the_numbers_and_judge_them_against_the_paper():
    from advgen.report.directions import findings

    p, c = 100, 4
    m = {"num_classes": c, "input_dim": p, "clean_accuracy": {"test": 0.8}, "params": {"curvature_images": 5},
         "accuracy": {"negpos": {"d": [0, 1, 2, 25], "rank": [0, 8, 16, 100], "test": [0.25, 0.5, 0.76, 0.8]},
                      "flat": {"d": [0, 1, 2, 25], "rank": [0, 4, 8, 100], "test": [0.25, 0.25, 0.3, 0.8]}},
         "fractions": {"deepfool": {"negpos": {"d": [0, 1, 2, 25], "fraction": [0.0, 0.9, 0.95, 1.0]},
                                    "flat": {"d": [0, 1, 2, 25], "fraction": [0.0, 0.05, 0.1, 1.0]}},
                       "saliency": {"negpos": {"d": [0, 1, 2, 25], "fraction": [0.0, 0.7, 0.8, 1.0]}}},
         "confined": {"hi": {"d": [4, 100], "mean_r_l2": [1.0, 0.5]}, "lo": {"d": [4, 100], "mean_r_l2": [20.0, 0.5]}},
         "resampling": {"side": 10, "rows": [{"size": 10, "fooling_rate": {"1": 1.0}},
                                             {"size": 5, "fooling_rate": {"1": 0.1, "2": 0.6, "4": 0.9}}],
                        "direct": [{"size": 5, "deepfool_success": 1.0, "deepfool_mean_r_l2": 0.7}]}}
    lines = findings(m)
    assert len(lines) == 4
    # d = 2 is the first with >= 90% of the clean accuracy (0.76 >= 0.72); 16 of 100 dimensions is few
    assert "d = 2 most positively" in lines[0] and "76.0% against 80.0%" in lines[0] and "give 30.0%" in lines[0]
    assert lines[0].endswith("As in the paper.")
    # at d = 1 (8 dimensions): 90% of DeepFool's norm vs sqrt(8/100) = 28.3% for a random direction
    assert "90.0% of DeepFool's" in lines[1] and "28.3% for a random" in lines[1] and "saliency maps: 70.0%" in lines[1]
    assert "(20.0×" in lines[2] and "As in the paper" in lines[2]
    assert "to 5 px the DeepFool copy fools 10.0%" in lines[3] and "scaled by 4, 90.0%" in lines[3]
    assert "fools 100.0% with mean ‖r‖₂ 0.7" in lines[3]

    # the same run where only the whole space classifies: no agreement claimed
    m["accuracy"]["negpos"]["test"] = [0.25, 0.3, 0.4, 0.8]
    first = findings(m)[0]
    assert "Below 90% of the clean accuracy" in first and "As in the paper" not in first


def test_figures_drawn_in_forked_children_are_the_bytes_drawn_here(done, tmp_path):
    from advgen.report import figure_jobs

    m = json.loads((done / "directions.json").read_text())
    here = section(m, figs=tmp_path / "one" / "figures", out=tmp_path / "one", title="Directions: mlp")
    with figure_jobs(3) as jobs:
        forked = section(m, figs=tmp_path / "three" / "figures", out=tmp_path / "three", title="Directions: mlp")
        assert jobs.jobs == 3
    assert here == forked
    a = {p.name: p.read_bytes() for p in (tmp_path / "one" / "figures").iterdir()}
    b = {p.name: p.read_bytes() for p in (tmp_path / "three" / "figures").iterdir()}
    assert len(a) == 6 + len(m["profiles"]) and a == b  # no temporary file left beside them either


def _slow_figure(path: Path, title: str) -> Path:
    """A figure that takes a while to draw (module level: figure workers get the function by name)."""
    import time

    from advgen.report.render import _plt, _save

    time.sleep(0.3)
    fig, ax = _plt().subplots(figsize=(2, 2))
    ax.set_title(title)
    return _save(fig, path)


def test_an_error_in_the_report_drops_the_figures_not_yet_started(tmp_path):
    from advgen.report import draw, figure_jobs

    with pytest.raises(ValueError, match="the report failed"):
        with figure_jobs(2):
            paths = [draw(_slow_figure, tmp_path / f"f{i}.png", f"figure {i}") for i in range(40)]
            raise ValueError("the report failed")
    assert paths == [tmp_path / f"f{i}.png" for i in range(40)]  # draw answers with the path at once
    written = sorted(tmp_path.iterdir())
    assert len(written) < 40 and all(p.suffix == ".png" for p in written)  # whole figures only, no temporaries


def test_a_figure_a_child_cannot_write_is_an_error_naming_it(done, tmp_path):
    from advgen.report import figure_jobs

    m = json.loads((done / "directions.json").read_text())
    section(m, figs=tmp_path / "first" / "figures", out=tmp_path / "first", title="Directions: mlp")
    names = sorted(p.name for p in (tmp_path / "first" / "figures").iterdir())
    figs = tmp_path / "second" / "figures"
    (figs / names[0] / "in-the-way").mkdir(parents=True)  # a folder where a figure goes: nobody can replace it
    with pytest.raises(OSError, match=rf"1 figure\(s\) could not be written: .*{re.escape(names[0])}"):
        with figure_jobs(2):
            section(m, figs=figs, out=tmp_path / "second", title="Directions: mlp")
    assert sorted(p.name for p in figs.iterdir() if p.is_file()) == names[1:]  # the others, and no temporaries
