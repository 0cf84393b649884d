"""Running a registered attack: the library call ``advgen.attack(...)``, and the one path every stored copy takes
(step, check, rounding-aware finish) in ``generate``, ``evaluate``, ``retrain`` and ``defend``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advgen.attacks.base import Attack, Context, Params, get
from advgen.attacks.core import l2, sample_seed
from advgen.attacks.lattice import to_uint8


def check(attack: Attack, eps: float | None, params: Params) -> None:
    """``BadParameter`` for an ε or a parameter out of range, before any compute."""
    attack.check_eps(eps)
    params.check()


def check_model_and_input(model: nn.Module, x: Tensor) -> None:
    """Pre-conditions: eval mode, inputs in [0, 1]."""
    if model.training:
        raise ValueError("attacks expect the model in eval mode (call model.eval() first)")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"inputs must lie in [0, 1], got [{x.min().item():.4f}, {x.max().item():.4f}]")


def check_output(attack: Attack, x: Tensor, x_adv: Tensor, eps: float | None, norm: str) -> None:
    """Post-conditions: range, and the ε-ball of ``norm`` for the attacks that take an ε."""
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise AssertionError(f"{attack.name} left [0, 1]: [{x_adv.min().item()}, {x_adv.max().item()}]")
    if eps is None or not attack.takes_eps:
        return
    if norm == "linf":
        worst = (x_adv - x).abs().max().item() if x.numel() else 0.0
    elif norm == "l2":
        worst = l2(x_adv - x).max().item() if x.numel() else 0.0
    else:
        return
    if worst > eps * (1 + 1e-5) + 1e-6:
        raise AssertionError(f"{attack.name} left its {norm} ε-ball: {worst} > {eps}")


def execute(attack: Attack, ctx: Context) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """One attack on one batch: (float result, the result finished on the uint8 lattice or None, manifest columns).

    The finish runs where the attack declares one and ``--rounding-aware`` is on (see ``advgen.attacks.lattice``).
    """
    out = attack.step(ctx)
    check_output(attack, ctx.x, out.x, ctx.eps, attack.norm_for(ctx.params))
    x_adv = out.x.detach()
    columns = dict(out.columns)
    budget = attack.lattice_budget(ctx.params)
    x_store = None
    if budget:
        label = ctx.label if out.finish_label is None else out.finish_label
        x_store, columns["lattice_steps"] = attack.finish(attack, ctx, x_adv, label, budget)  # type: ignore[misc]
    return x_adv, x_store, columns


def context(model: nn.Module, x: Tensor, y: Tensor, params: Params, *, eps: float | None,
            seeds: list[int] | None = None) -> Context:
    """A batch as the step functions see it: clean logits, the gradient label, per-image seeds."""
    with torch.no_grad():
        logits = model(x)
    label = logits.argmax(1) if params.label_source == "predicted" else y
    seeds = seeds if seeds is not None else [sample_seed(0, "run", i) for i in range(x.shape[0])]
    return Context(model, x, y, label, logits, params, seeds, eps)


def run(name: str, model: nn.Module, x: Tensor, y: Tensor, *, eps: float | None = None,
        seeds: list[int] | None = None, **params) -> Tensor:
    """Apply attack ``name`` to images ``x`` (N, C, H, W) in [0, 1] with labels ``y``; returns floats in [0, 1].

    ``params``: any declared attack parameter (``steps``, ``step_size``,
    ``label_source``, ``restarts``, ...; see ``advgen generate --help``);
    ``label_source="predicted"`` uses the model's top-1 prediction as the
    gradient label. ``seeds`` (one int per image) drive random starts; default
    ``sample_seed(0, "run", i)``. ``uap`` fits one universal perturbation on
    ``x`` itself and adds it to every image. Checks pre- and post-conditions.
    The result is the float attack; ``stored`` gives what a stored copy holds.
    """
    attack = get(name)
    p = Params(**params)
    check(attack, eps, p)
    check_model_and_input(model, x)
    ctx = context(model, x, y, p, eps=eps, seeds=seeds)
    if attack.fit is not None:
        assert eps is not None
        ctx = ctx.at(eps, attack.fit(model, x, eps, p).delta)
    out = attack.step(ctx)
    check_output(attack, x, out.x, eps, attack.norm_for(p))
    return out.x.detach()


def stored(name: str, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, *, eps: float | None = None,
           seeds: list[int] | None = None, **params) -> Tensor:
    """What a stored copy of ``run(name, ...)``'s float result ``x_adv`` holds, as uint8 (N, C, H, W).

    Rounding-aware (the default, as in ``advgen generate``): an attack that declares a finish and whose float
    result reached the goal but whose rounded one does not is finished on the uint8 lattice; every other image,
    and every image of the other attacks, is ``to_uint8(x_adv)``: nearest, inside the ε-ball.
    """
    attack = get(name)
    p = Params(**params)
    if attack.lattice_budget(p):
        ctx = context(model, x, y, p, eps=eps, seeds=seeds)
        label = ctx.target() if attack.targeted else ctx.label
        x_adv, _ = attack.finish(attack, ctx, x_adv, label, attack.lattice_budget(p))  # type: ignore[misc]
    return to_uint8(x_adv, x, eps=eps, norm=attack.norm_for(p))
