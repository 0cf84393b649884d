"""The attack features the seed papers need, against answers known in closed form or by a reference loop.

Rounding-aware DeepFool and the lattice step (stored copies that stay
adversarial), targeted and subspace-confined DeepFool (Jetley et al.), FGM at
ε above 1 (Agarwal et al.), FGS repeated until misclassified (Johnson), PGD
with restarts (Madry et al., as Rana et al. use it).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from advgen import attacks
from advgen.attacks import deepfool, deepfool_on_lattice, fgs_until, lattice_step, to_uint8


class Linear(nn.Module):
    """logits = W·x + b on flattened images: every DeepFool answer is known in closed form."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        return x.flatten(1).double() @ self.w.T + self.b


def _linear(seed: int = 0, classes: int = 4, shape=(1, 6, 6)) -> tuple[Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = math.prod(shape)
    model = Linear(torch.randn(classes, p, generator=g, dtype=torch.float64),
                   torch.randn(classes, generator=g, dtype=torch.float64) * 0.1).eval()
    x = (torch.randint(40, 216, (24, *shape), generator=g).double() / 255)
    return model, x, model(x).argmax(1)


def test_lattice_step_is_within_one_level_of_the_shortest_whole_level_move():
    # Brute force over every integer vector in a small box: optimal but for the last level taken.
    g = torch.Generator().manual_seed(1)
    exact = 0
    for _ in range(20):
        w = torch.randn(1, 4, generator=g, dtype=torch.float64) * 255
        need = torch.rand(1, generator=g, dtype=torch.float64) * 3
        room = torch.full((1, 4), 3.0, dtype=torch.float64)
        e = lattice_step(w, need, room, room)
        assert (w * e).sum() / 255 >= need - 1e-9 and (e.abs() <= 3).all() and (e == e.round()).all()
        best = min((sum(v * v for v in c) for c in itertools.product(range(-3, 4), repeat=4)
                    if sum(w[0, j].item() * c[j] for j in range(4)) / 255 >= need.item() - 1e-9), default=None)
        cost = (e ** 2).sum().item()
        assert best is not None and best <= cost <= best + 2 * e.abs().max().item() - 1
        exact += cost == best
    assert exact >= 15  # and usually exactly optimal


def test_rounding_aware_deepfool_crosses_as_stored_within_one_step_of_the_float_minimum():
    model, x, y = _linear()
    x = x.float()
    model.w, model.b = model.w.float(), model.b.float()

    class F32(nn.Module):
        def forward(self, z):
            return z.flatten(1) @ model.w.T + model.b

    net = F32().eval()
    r = deepfool(net, x, y, overshoot=0.0, max_iter=50)
    stored, taken = deepfool_on_lattice(net, x, y, r.x, overshoot=0.02, max_steps=20)
    assert torch.equal(stored, to_uint8(stored, x).float() / 255)  # exactly on the lattice
    with torch.no_grad():
        assert (net(stored).argmax(1) != y).all()  # every stored image crosses
        assert (net(to_uint8(r.x, x).float() / 255).argmax(1) == y).any()  # plain rounding undid some
    # The closed-form minimum: the distance to the nearest hyperplane of a linear classifier.
    w, b = model.w, model.b
    with torch.no_grad():
        f = net(x)
    dists = []
    for i in range(len(y)):
        k = [j for j in range(w.shape[0]) if j != y[i]]
        dists.append(min(((f[i, y[i]] - f[i, j]) / (w[j] - w[y[i]]).norm()).item() for j in k))
    minimum = torch.tensor(dists)
    step = math.sqrt(x[0].numel()) / 255  # one quantization step on every pixel
    got = (stored - x).flatten(1).norm(dim=1)
    assert (got <= minimum * 1.02 + step + 1e-6).all(), (got - minimum).max()
    assert (taken > 0).any()


def test_targeted_deepfool_lands_on_the_target_hyperplane():
    model, x, y = _linear(2)
    target = (y + 1) % 4
    r = deepfool(model, x, y, target=target, overshoot=0.0, clip=False, max_iter=50)
    with torch.no_grad():
        f = model(r.x)
    assert r.converged.all()
    # On the boundary between the target and the best other class, up to DeepFool's 1e-4 margin.
    best_other = f.scatter(1, target[:, None], -math.inf).amax(1)
    gap = f.gather(1, target[:, None]).squeeze(1) - best_other
    assert (gap >= 0).all() and (gap < 1e-3).all()


def test_confined_deepfool_equals_the_projected_closed_form():
    model, x, y = _linear(3, classes=2)
    p = x[0].numel()
    basis, _ = torch.linalg.qr(torch.randn(p, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    r = deepfool(model, x, y, overshoot=0.0, clip=False, basis=basis, max_iter=5)
    # Two classes: one step along the projected normal P(w_other − w_y), length |f'| / ‖P w‖.
    w = model.w[1 - y] - model.w[y]
    pw = (w @ basis) @ basis.T
    f = model(x)
    fd = (f.gather(1, (1 - y)[:, None]) - f.gather(1, y[:, None])).squeeze(1)
    want = x.flatten(1) + ((fd.abs() + 1e-4) / pw.norm(dim=1) ** 2)[:, None] * pw
    torch.testing.assert_close(r.x.flatten(1), want, rtol=1e-9, atol=1e-9)
    delta = r.x.flatten(1) - x.flatten(1)
    torch.testing.assert_close(delta, (delta @ basis) @ basis.T)  # the perturbation lies in the subspace


def test_fgm_above_eps_1_is_the_formula():
    model, x, y = _linear(4)
    x = x.float()
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 4)).eval()
    out = attacks.run("fgm", net, x, y, eps=1.5)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(net(xg), y, reduction="sum"), xg)
    torch.testing.assert_close(out, (x + 1.5 * g).clamp(0, 1))
    with pytest.raises(Exception, match="must lie in"):
        attacks.run("fgsm", net, x, y, eps=1.5)


def test_fgs_until_counts_steps_as_a_reference_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).eval()
    x = torch.rand(16, 1, 6, 6)
    y = net(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3  # three images misclassified to begin with: no steps
    got, steps = fgs_until(net, x, y, step_size=0.01, max_iter=60)
    for i in range(len(y)):  # one image at a time, the plain loop of Johnson's description
        xi, n = x[i:i + 1].clone(), 0
        while n < 60 and net(xi).argmax(1).item() == y[i].item():
            xg = xi.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(nn.functional.cross_entropy(net(xg), y[i:i + 1], reduction="sum"), xg)
            xi = (xi + 0.01 * g.sign()).clamp(0, 1)
            n += 1
        assert steps[i].item() == n and torch.equal(got[i:i + 1], xi), i
    assert (steps[:3] == 0).all() and steps.max() > 1


def test_pgd_restarts_keep_the_strongest_and_never_lose_to_one_start():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(32, 1, 6, 6)
    y = net(x).argmax(1)
    one = attacks.run("pgd", net, x, y, eps=0.02, steps=2, restarts=1)
    five = attacks.run("pgd", net, x, y, eps=0.02, steps=2, restarts=5)
    assert torch.equal(five, attacks.run("pgd", net, x, y, eps=0.02, steps=2, restarts=5))  # seeded
    with torch.no_grad():
        fooled1, fooled5 = net(one).argmax(1) != y, net(five).argmax(1) != y
        loss1 = nn.functional.cross_entropy(net(one), y, reduction="none")
        loss5 = nn.functional.cross_entropy(net(five), y, reduction="none")
    assert (fooled5 | ~fooled1).all()  # an image one start fools, five starts fool too
    assert ((loss5 >= loss1 - 1e-6) | fooled5).all()
