"""The attack declaration and its registry: everything outside ``advgen.attacks`` reads an attack from here.

An attack is one ``Attack(...)`` passed to ``register`` in one file of
``advgen/attacks/methods/``: its name, the norm of its ball, whether it takes
ε, the parameters that shape its output, its direction, how its stored copy
is finished on the uint8 lattice, and its step function. ``generate``,
``evaluate``, ``retrain``'s online attacks, ``defend``'s adaptive attacks, the
CLI's flags and help, ``advgen check``, the cards and the report all read the
declaration; nothing outside this subpackage asks what kind an attack is.

Parameters are declared once (``param``), here for the ones several attacks
share and in an attack's own file for its own; each becomes a flag of
``advgen generate`` (``--name-with-dashes``) with its default, help and check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from advgen.attacks.core import Direction, Norm, default_step_size, least_likely, loss_gradient, random_start, \
    restart_seeds
from advgen.errors import BadParameter, unknown


# --- parameters -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One parameter of one or more attacks; ``advgen generate --<name>`` sets it."""

    name: str
    default: Any
    help: str
    valid: Callable[[Any], bool] | None = None
    rule: str = ""  # what ``valid`` asks, for the error: "must be >= 1"
    unset_when: Any = None  # a flag value that means "not set" (None in the params), e.g. 0 for a step size

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        if self.valid is not None and value is not None and not self.valid(value):
            raise BadParameter(f"{self.flag} {self.rule}, got {value!r}")


PARAMS: dict[str, Param] = {}


def param(name: str, default: Any, help: str, valid: Callable[[Any], bool] | None = None, rule: str = "",
          unset_when: Any = None) -> Param:
    """Declare a parameter (once; an attack file declares its own beside its ``Attack``)."""
    if name in PARAMS:
        raise ValueError(f"parameter {name!r} is declared twice")
    PARAMS[name] = p = Param(name, default, help, valid, rule, unset_when)
    return p


# Shared by several attacks (each attack lists those it uses in ``Attack.uses``).
param("steps", 10, "Iterations of {users}.", lambda v: v >= 1, "must be >= 1")
param("step_size", None, "Step of the iterative methods; 0 = 2.5·ε/steps (fgs_until: the weight of each sign step; "
      "0 = 0.01).", lambda v: v > 0, "must be > 0", unset_when=0.0)
param("label_source", "true", "Gradient label: true, or predicted (the model's top-1).",
      lambda v: v in ("true", "predicted"), "must be true or predicted")
param("target", "least_likely", "{users}: least_likely or top5_lowest.",
      lambda v: v in ("least_likely", "top5_lowest"), "must be least_likely or top5_lowest")
param("candidates", 10, "{users}: classes considered (top-k).", lambda v: v >= 2, "must be >= 2")
param("overshoot", 0.02, "{users}: overshoot past the boundary.", lambda v: 0 <= v <= 1, "must lie in [0, 1]")
param("max_iter", 50, "Iteration limit of {users}.", lambda v: v >= 1, "must be >= 1")
param("seed", 0, "Seeds the random parts of {users} (per image).")
param("restarts", 1, "{users}: random restarts; per image the first that fools the victim (else the strongest) is "
      "kept.", lambda v: v >= 1, "must be >= 1")
param("rounding_aware", True, "{users} finish on the uint8 lattice, so an image whose float result reached the goal "
      "reaches it as stored too.")
param("lattice_steps", 0, "Rounding-aware mode: lattice steps per image at most; 0 = the attack's own budget "
      "(--steps for iterative methods, --max-iter for DeepFool).", lambda v: v >= 0, "must be >= 0")


class Params:
    """The values of every declared parameter: those given, and the defaults of the others. Immutable."""

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        extra = set(values) - set(PARAMS)
        if extra:
            raise unknown("attack parameter", sorted(extra)[0], PARAMS)
        full = {}
        for name, p in PARAMS.items():
            v = values.get(name, p.default)
            full[name] = None if (p.unset_when is not None and v == p.unset_when) else v
        object.__setattr__(self, "_values", full)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Params are immutable; use replace()")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and other._values == self._values

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        return f"Params({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def replace(self, **changes: Any) -> Params:
        return Params(**{**self._values, **changes})

    def check(self) -> None:
        """``BadParameter`` for any value out of its declared range, before any compute."""
        for name, value in self._values.items():
            PARAMS[name].check(value)


# --- what a step function sees and returns --------------------------------------------------------

@dataclass
class Context:
    """One batch, as an attack's step function sees it.

    ``x`` float images in [0, 1] on the device, ``y`` true labels, ``label``
    the gradient label (true or predicted), ``clean_logits`` the victim's
    logits at ``x``, ``seeds`` per-image seeds, ``eps`` the ε of this variant
    (None for an attack without one), ``delta`` a fitted universal
    perturbation. The loss gradient at ``x`` is computed once per batch and
    shared by every single-step attack at every ε.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    label: Tensor
    clean_logits: Tensor
    params: Params
    seeds: list[int]
    eps: float | None = None
    delta: Tensor | None = None
    shared: dict = field(default_factory=dict)  # per-batch values every ε reuses (the gradient)

    def at(self, eps: float | None, delta: Tensor | None = None) -> Context:
        return Context(self.model, self.x, self.y, self.label, self.clean_logits, self.params, self.seeds, eps,
                       delta, self.shared)

    def gradient(self) -> Tensor:
        if "grad" not in self.shared:
            self.shared["grad"], _ = loss_gradient(self.model, self.x, self.label)
        return self.shared["grad"]

    @property
    def step_size(self) -> float:
        """The iterations' step: ``--step-size``, else 2.5·ε/steps (0 without an ε)."""
        if self.params.step_size is not None:
            return self.params.step_size
        return default_step_size(self.eps, self.params.steps) if self.eps is not None else 0.0

    def target(self) -> Tensor:
        """Target classes from the clean prediction (``--target``)."""
        return least_likely(self.clean_logits, self.params.target)

    def start(self, norm: Norm, restart: int = 0) -> Tensor:
        """Per-image random starts in the ε-ball, seeded per image (restart 0: the image seeds), laid out as ``x``."""
        assert self.eps is not None
        start = random_start(tuple(self.x.shape[1:]), self.eps, norm, restart_seeds(self.seeds, restart))
        return torch.empty_like(self.x).copy_(start)


@dataclass
class Outcome:
    """A step function's result: float images in [0, 1], per-image manifest columns, and the label the
    rounding-aware finish steps along (None: the gradient label; a targeted attack gives its target)."""

    x: Tensor
    columns: dict[str, Tensor] = field(default_factory=dict)
    finish_label: Tensor | None = None


Step = Callable[[Context], Outcome]
Finisher = Callable[["Attack", Context, Tensor, Tensor, int], tuple[Tensor, Tensor]]
Fit = Callable[[nn.Module, Tensor, float, Params], Any]  # (model, images, ε, params) -> fit with ``.delta``
Online = Callable[[float, int, "float | None"], Callable]  # (ε, steps, step size) -> per-batch perturbation


# --- the declaration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attack:
    name: str
    step: Step
    norm: Norm  # the norm whose ε-ball holds the perturbation ("none": unbounded steps)
    summary: str  # one line: what it does, and whose it is
    direction: Direction = "adversarial"
    takes_eps: bool = True  # False: it finds its own size (DeepFool) or steps until the label changes
    uses: tuple[str, ...] = ()  # parameters (besides label_source) that shape its output, in card order
    unset: Mapping[str, Any] = field(default_factory=dict)  # its value of a parameter left unset
    finish: Finisher | None = None  # the rounding-aware finish of its stored copy (see ``advgen.attacks.lattice``)
    finish_budget: str = "steps"  # the parameter that bounds the lattice steps when --lattice-steps is 0
    shares_gradient: bool = False  # a function of the clean image's loss gradient alone (one backward serves all)
    seeded: bool = False  # draws per-image random numbers from the seeds
    targeted: bool = False  # steps down the loss of a target class chosen from the clean prediction
    minimal: bool = False  # a minimal perturbation: evaluation reports its size ρ̂ = ‖δ‖₂/‖x‖₂
    sign_steps: bool | None = None  # report: plotted with the sign-step (True) or unsigned (False) methods
    norm_param: str | None = None  # a parameter that names the ball's norm instead of ``norm`` (uap)
    fit: Fit | None = None  # one perturbation fitted on training images before any shard (universal)
    online: Online | None = None  # its form for online adversarial training (``advgen retrain --mode online_<name>``)
    batch_coupled: bool = False  # an image's result depends on the others of its batch (a universal δ)

    def norm_for(self, params: Params) -> Norm:
        return getattr(params, self.norm_param) if self.norm_param else self.norm

    def value(self, params: Params, name: str) -> Any:
        v = getattr(params, name)
        return self.unset.get(name, v) if v is None else v

    def lattice_budget(self, params: Params) -> int:
        """Lattice steps per image of the rounding-aware finish; 0 when it does not run."""
        if self.finish is None or not params.rounding_aware:
            return 0
        return params.lattice_steps or getattr(params, self.finish_budget)

    def relevant(self, params: Params) -> dict:
        """The parameters that shape this attack's output (its card and fingerprint name them, in this order)."""
        out: dict = {"label_source": params.label_source}
        out.update({n: self.value(params, n) for n in self.uses})
        if self.finish is not None:
            out.update(rounding_aware=params.rounding_aware, lattice_steps=self.lattice_budget(params))
        return out

    def check_eps(self, eps: float | None) -> None:
        if not self.takes_eps:
            return
        if self.norm == "none":  # unbounded steps (fgm, d_fgm): any size, as Agarwal et al.'s 0.9 ... 2.0
            if eps is None or not 0 <= eps < math.inf:
                raise BadParameter(f"--eps of {self.name} must be a number >= 0, got {eps}")
        elif eps is None or not 0 <= eps <= 1:
            raise BadParameter(f"--eps of {self.name} must lie in [0, 1] (pixel units), got {eps}")


REGISTRY: dict[str, Attack] = {}


def register(attack: Attack) -> Attack:
    """Add ``attack`` to the registry (its file calls this once at import)."""
    if attack.name in REGISTRY:
        raise ValueError(f"attack {attack.name!r} is registered twice")
    for n in (*attack.uses, attack.finish_budget, *(attack.unset or {})):
        if n not in PARAMS:
            raise ValueError(f"attack {attack.name!r} uses the undeclared parameter {n!r}")
    REGISTRY[attack.name] = attack
    return attack


def get(name: str) -> Attack:
    try:
        return REGISTRY[name]
    except KeyError:
        raise unknown("method", name, REGISTRY) from None


def declares(name: str, what: str) -> bool:
    """Whether the registered attack ``name`` declares ``what`` (e.g. ``minimal``); False for a name the registry
    does not hold (a copy made by another version)."""
    return name in REGISTRY and bool(getattr(REGISTRY[name], what))


def users(param_name: str) -> list[str]:
    """The attacks whose output ``param_name`` shapes (for help texts)."""
    return [a.name for a in REGISTRY.values() if param_name in a.uses
            or (a.finish is not None and param_name in ("rounding_aware", "lattice_steps", a.finish_budget))]


def help_of(p: Param) -> str:
    """A parameter's help with ``{users}`` filled in from the registry."""
    return p.help.replace("{users}", ", ".join(users(p.name)) or "no registered attack")


# --- small helpers the declarations share ---------------------------------------------------------

def gradient_columns(grad: Tensor) -> dict[str, Tensor]:
    """The gradient's own size: what an unsigned step (fgm, d_fgm) is ε times (see the report's FGM note)."""
    return {"grad_l2": grad.flatten(1).norm(dim=1), "grad_linf": grad.flatten(1).abs().amax(1)}


def single_step(fn: Callable[..., Tensor]) -> Step:
    """The step of a single-step method ``fn(x, *, grad, eps)`` of the shared gradient."""
    def step(ctx: Context) -> Outcome:
        grad = ctx.gradient()
        return Outcome(fn(ctx.x, grad=grad, eps=ctx.eps), gradient_columns(grad))
    return step
