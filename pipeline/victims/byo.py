"""Victims a user brings: a TorchScript file, a ``torch.export`` program, or ``module:factory`` plus a state_dict.

advgen's own victims are ``advgen train`` checkpoints (``advgen.victims``). Any other classifier can be
attacked the same way if it keeps the same contract, which ``load_model`` checks on a probe batch before any
compute:

* inputs are images in [0, 1] (raw pixels / 255), shaped (N, C, H, W) with the (C, H, W) the user states and
  the clean folder holds. Normalization (mean/std) must live *inside* the model: attacks and ε work in pixel
  space, so a model that expects normalized inputs would be attacked in the wrong units;
* outputs are logits (N, num_classes), not probabilities: gradients of a softmax saturate, so attacks on
  probabilities are weak (a warning says when outputs look like probabilities);
* any batch size works (a ``torch.export`` program needs a dynamic batch dimension);
* the forward pass is differentiable with respect to the input, deterministic, and treats images
  independently: eval mode, no active dropout, batch norm on running statistics (export a model after
  ``model.eval()``; TorchScript and factory models are switched to eval mode here).

Identity: every generated variant records its victim's sha256. For a ``--model`` file it is the sha256 of
the file's bytes; for a factory it is the sha256 of the UTF-8 factory name (``module:callable``), one NUL
byte, then the state_dict file's bytes (nothing after the NUL without a state_dict). The factory's code is
not hashed: changing the code behind the same name and weights keeps the identity.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from advgen.errors import BadParameter, CheckpointError
from advgen.storage.shards import file_digest
from advgen.victims import load

ModelKind = Literal["torchscript", "export", "factory"]
Warn = Callable[[str], None]


@dataclass
class ModelMeta:
    """What generate and evaluate need to know about a user's model (the fields ``VictimMeta`` shares)."""

    arch: str  # readable origin: torchscript:FILE, export:FILE or factory:module:callable
    dataset: str
    num_classes: int
    input_shape: tuple[int, int, int]
    sha256: str
    kind: ModelKind
    test_accuracy: float | None = None  # nothing measured it


class UserModel(nn.Module):
    """A user's network as a victim: images in [0, 1] in, logits out; ``meta`` says what it is."""

    def __init__(self, net: nn.Module, meta: ModelMeta) -> None:
        super().__init__()
        self.net = net
        self.meta = meta

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> UserModel:
        self.training = mode
        _set_mode(self.net, mode)
        return self


def _set_mode(net: nn.Module, training: bool) -> None:
    """``net.train(training)``; an exported program refuses that call, and its mode was fixed at export."""
    try:
        net.train(training)
    except NotImplementedError:
        for m in net.modules():
            m.training = training


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def parse_shape(text: str | Sequence[int], flag: str = "--input-shape") -> tuple[int, int, int]:
    """``"3,32,32"`` (or a sequence) as (C, H, W); C is 1 or 3 (images are stored as gray or RGB PNG)."""
    try:
        parts = [int(p) for p in (text.replace("x", ",").split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 3 or parts[0] not in (1, 3) or not all(0 < p <= 4096 for p in parts[1:]):
        raise BadParameter(f"{flag} takes C,H,W with C 1 or 3, such as 1,28,28 or 3,32,32; got {text!r}")
    return parts[0], parts[1], parts[2]


def model_sha256(*, model: Path | None = None, factory: str | None = None, state_dict: Path | None = None) -> str:
    """The identity a variant records (see the module docstring): file bytes, or factory name + state_dict bytes."""
    if model is not None:
        return file_digest(Path(model))
    if factory is None:
        raise BadParameter("model_sha256 needs a model file or a factory name")
    h = hashlib.sha256(factory.encode("utf-8") + b"\0")
    if state_dict is not None:
        with open(state_dict, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_victim_options(*, victim_ckpt: Path | None, model: Path | None, factory: str | None,
                         state_dict: Path | None, input_shape: str | Sequence[int] | None,
                         num_classes: int | None, required: bool = True) -> None:
    """The victim options of generate/evaluate make sense together and name existing files; no loading.

    Exactly one of ``victim_ckpt``, ``model``, ``factory`` (at most one unless ``required``);
    ``state_dict`` only with ``factory``; ``input_shape`` and ``num_classes`` with, and only with,
    ``model`` or ``factory``.
    """
    options = (("--victim-ckpt", victim_ckpt), ("--model", model), ("--factory", factory))
    given = [flag for flag, value in options if value is not None]
    if len(given) > 1:
        raise BadParameter(f"give one victim, not {' and '.join(given)}")
    if not given and required:
        raise BadParameter("give the victim: --victim-ckpt FILE (from advgen train), --model FILE (TorchScript, "
                           "or torch.export .pt2) or --factory module:callable")
    if state_dict is not None and factory is None:
        raise BadParameter("--state-dict goes with --factory (a --model file carries its own weights)")
    if victim_ckpt is not None or not given:
        if input_shape is not None or num_classes is not None:
            raise BadParameter("--input-shape and --num-classes describe a --model or --factory"
                               + ("; a --victim-ckpt records its own" if victim_ckpt is not None else ""))
        if victim_ckpt is not None and not Path(victim_ckpt).is_file():
            raise CheckpointError(f"{victim_ckpt}: no such checkpoint")
        return
    if input_shape is None or num_classes is None:
        raise BadParameter(f"{given[0]} needs --input-shape C,H,W and --num-classes N (what the model takes and gives)")
    parse_shape(input_shape)
    if not 2 <= num_classes <= 100_000:
        raise BadParameter(f"--num-classes must lie in [2, 100000], got {num_classes}")
    if factory is not None and ":" not in factory.strip(":"):
        raise BadParameter(f"--factory takes module:callable, such as mypkg.models:build; got {factory!r}")
    for flag, path in (("--model", model), ("--state-dict", state_dict)):
        if path is not None and not Path(path).is_file():
            raise CheckpointError(f"{path}: no such file ({flag})")


def _check_fits(shape: tuple[int, int, int], num_classes: int, clean_stats: dict) -> None:
    """The stated input shape and class count are the clean folder's."""
    data_shape = tuple(clean_stats["shape"])
    if shape != data_shape:
        raise BadParameter(f"--input-shape {','.join(map(str, shape))} differs from the clean {clean_stats['dataset']} "
                           f"images, which are {','.join(map(str, data_shape))} (C,H,W)")
    classes = len(clean_stats["classes"])
    if num_classes != classes:
        raise BadParameter(f"--num-classes {num_classes}, but the clean {clean_stats['dataset']} folder has "
                           f"{classes} classes")


def _quiet_load(fn: Callable[[], nn.Module]) -> nn.Module:
    """Run a torch loader without its deprecation warnings and logged tracebacks (errors are reported by us)."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return fn()
    finally:
        logger.setLevel(level)


def _load_file(path: Path, device: torch.device) -> tuple[nn.Module, ModelKind]:
    """A TorchScript file (any name) or a ``torch.export`` program (``.pt2``), on ``device``."""
    if path.suffix == ".pt2":
        try:
            net = _quiet_load(lambda: torch.export.load(str(path)).module())
        except Exception as e:
            raise CheckpointError(f"{path}: not a torch.export program torch.export.load reads "
                                  f"({_first_line(e)})") from None
        return net.to(device), "export"
    try:
        net = _quiet_load(lambda: torch.jit.load(str(path), map_location=device))
    except Exception as e:
        raise CheckpointError(f"{path}: not a TorchScript file torch.jit.load reads ({_first_line(e)}); "
                              "torch.export programs must be named *.pt2") from None
    return net, "torchscript"


def _import_factory(factory: str) -> Callable[[], object]:
    """The callable named ``module:attr`` (``attr`` may be dotted).

    The working folder is importable, as with ``python -m``, so ``--factory mymodels:build`` finds ./mymodels.py.
    """
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise BadParameter(f"--factory takes module:callable, such as mypkg.models:build; got {factory!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:
        raise BadParameter(f"--factory {factory}: cannot import {module_name} "
                           f"({type(e).__name__}: {_first_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadParameter(f"--factory {factory}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadParameter(f"--factory {factory}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


def _build(factory: str, state_dict: Path | None, device: torch.device) -> nn.Module:
    """``factory()`` with the weights of ``state_dict`` (loaded with ``weights_only=True``: no code runs)."""
    make = _import_factory(factory)
    try:
        net = make()
    except Exception as e:
        raise BadParameter(f"--factory {factory}: calling it failed ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(net, nn.Module):
        raise BadParameter(f"--factory {factory} returned a {type(net).__name__}, expected a torch.nn.Module")
    if state_dict is not None:
        try:
            sd = torch.load(state_dict, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{state_dict}: not loadable with torch.load(weights_only=True) "
                                  f"({_first_line(e)})") from None
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{state_dict}: holds a {type(sd).__name__}, expected a state_dict "
                                  "(what torch.save(model.state_dict(), path) writes)")
        try:
            net.load_state_dict(sd)
        except Exception as e:
            raise CheckpointError(f"{state_dict}: weights do not fit {factory}() ({_first_line(e)})") from None
    return net.to(device)


def _probe(net: nn.Module, *, name: str, kind: ModelKind, shape: tuple[int, int, int], num_classes: int,
           device: torch.device, on_warning: Warn | None) -> None:
    """Check the contract of the module docstring on three fixed random images (and the first one alone)."""
    x = torch.rand((3, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    hint = ("; a torch.export program needs a dynamic batch dimension (export with "
            "dynamic_shapes={'x': {0: torch.export.Dim('batch')}})") if kind == "export" else ""

    def forward(inp: Tensor) -> Tensor:
        try:
            out = net(inp)
        except Exception as e:
            raise BadParameter(f"{name}: a forward pass on a batch of shape {tuple(inp.shape)} in [0, 1] failed "
                               f"({type(e).__name__}: {_first_line(e)}); check --input-shape{hint}") from None
        if not isinstance(out, Tensor):
            raise BadParameter(f"{name}: returns a {type(out).__name__}, expected one tensor of logits")
        if tuple(out.shape) != (len(inp), num_classes):
            raise BadParameter(f"{name}: returns outputs of shape {tuple(out.shape)} for {len(inp)} images, expected "
                               f"({len(inp)}, {num_classes}) logits; check --num-classes")
        if not out.is_floating_point() or not bool(torch.isfinite(out).all()):
            raise BadParameter(f"{name}: returns {'non-finite' if out.is_floating_point() else out.dtype} outputs "
                               "on images in [0, 1]; expected finite float logits")
        return out

    xg = x.clone().requires_grad_(True)
    out = forward(xg)
    try:
        torch.autograd.grad(out.float().sum(), xg)
    except RuntimeError:
        raise BadParameter(f"{name}: its outputs have no gradient with respect to the input images, which "
                           "attacks need (is the forward run under torch.no_grad or detached?)") from None
    with torch.no_grad():
        again, one = forward(x), forward(x[:1])
    out = out.detach().float()
    again, one = again.float(), one.float()
    tol = 1e-4 * (1 + float(again.abs().max()))
    if not torch.allclose(out, again, rtol=1e-4, atol=tol):
        raise BadParameter(f"{name}: two forward passes on the same images differ; the model must be "
                           "deterministic, in eval mode (dropout off; export it after model.eval())")
    if not torch.allclose(one, again[:1], rtol=1e-3, atol=10 * tol):
        raise BadParameter(f"{name}: an image's outputs depend on the other images in its batch (batch norm in "
                           "training mode?); the model must be in eval mode (export it after model.eval())")
    if on_warning is not None and bool((again >= 0).all()) and torch.allclose(
            again.sum(1), torch.ones(len(again), device=again.device), atol=1e-3):
        on_warning(f"{name}: outputs look like probabilities (non-negative, rows sum to 1); attacks need "
                   "logits, so drop the final softmax for meaningful results")


def load_model(*, model: Path | None = None, factory: str | None = None, state_dict: Path | None = None,
               input_shape: str | Sequence[int], num_classes: int, dataset: str,
               map_location: str | torch.device = "cpu", on_warning: Warn | None = None) -> UserModel:
    """A user's classifier as an eval-mode victim on ``map_location``, checked on a probe batch.

    From exactly one of: ``model``, a TorchScript file (``torch.jit.load``) or a ``torch.export``
    program named ``*.pt2`` (``torch.export.load(...).module()``); or ``factory``, ``module:callable``
    returning an ``nn.Module``, with the weights of ``state_dict`` if given (``torch.load(...,
    weights_only=True)``, strict ``load_state_dict``). Takes (N, *input_shape) images in [0, 1] and
    must return (N, num_classes) logits (see the module docstring for the whole contract).
    ``meta.sha256`` is ``model_sha256``; ``meta.dataset`` is ``dataset`` (the clean folder's).
    ``CheckpointError`` for files that are missing or do not load, ``BadParameter`` for a factory
    that does not import or build and for a model that breaks the contract; ``on_warning`` gets
    a sentence when the outputs look like probabilities.
    """
    if (model is None) == (factory is None):
        raise BadParameter("give either a model file or a factory")
    if model is not None and state_dict is not None:
        raise BadParameter("--state-dict goes with --factory (a --model file carries its own weights)")
    shape = parse_shape(input_shape)
    device = torch.device(map_location)
    if model is not None:
        model = Path(model)
        if not model.is_file():
            raise CheckpointError(f"{model}: no such model file")
        net, kind = _load_file(model, device)
        arch = f"{kind}:{model.name}"
    else:
        if state_dict is not None and not Path(state_dict).is_file():
            raise CheckpointError(f"{state_dict}: no such state_dict file")
        net, kind, arch = _build(str(factory), state_dict, device), "factory", f"factory:{factory}"
    _set_mode(net, False)
    _probe(net, name=arch, kind=kind, shape=shape, num_classes=int(num_classes), device=device, on_warning=on_warning)
    meta = ModelMeta(arch=arch, dataset=dataset, num_classes=int(num_classes), input_shape=shape,
                     sha256=model_sha256(model=model, factory=factory, state_dict=state_dict), kind=kind)
    return UserModel(net, meta).eval()


def open_victim(*, victim_ckpt: Path | None = None, model: Path | None = None, factory: str | None = None,
                state_dict: Path | None = None, input_shape: str | Sequence[int] | None = None,
                num_classes: int | None = None, clean_stats: dict, map_location: str | torch.device = "cpu",
                on_warning: Warn | None = None) -> tuple[nn.Module, str]:
    """(eval-mode victim, sha256) from an advgen checkpoint or a user's model, checked against ``clean_stats``.

    A checkpoint must be for the clean folder's dataset; a user's model must take the clean images' shape
    and give its number of classes. The sha256 is what variants record as ``victim.sha256``.
    """
    check_victim_options(victim_ckpt=victim_ckpt, model=model, factory=factory, state_dict=state_dict,
                         input_shape=input_shape, num_classes=num_classes)
    if victim_ckpt is not None:
        return load(victim_ckpt, dataset=clean_stats["dataset"], map_location=map_location), file_digest(victim_ckpt)
    assert input_shape is not None and num_classes is not None  # checked above
    _check_fits(parse_shape(input_shape), num_classes, clean_stats)
    net = load_model(model=model, factory=factory, state_dict=state_dict, input_shape=input_shape,
                     num_classes=num_classes, dataset=clean_stats["dataset"], map_location=map_location,
                     on_warning=on_warning)
    return net, net.meta.sha256


def victim_sha256(*, victim_ckpt: Path | None = None, model: Path | None = None, factory: str | None = None,
                  state_dict: Path | None = None, input_shape: str | Sequence[int] | None = None,
                  num_classes: int | None = None, clean_stats: dict, on_warning: Warn | None = None) -> str | None:
    """The sha256 variants must record, or None when no victim is given (at most one may be).

    A checkpoint is identified by its bytes without loading it; a user's model is loaded and checked
    on the CPU as ``open_victim`` does, so a mistyped option fails the same way in generate and evaluate.
    """
    check_victim_options(victim_ckpt=victim_ckpt, model=model, factory=factory, state_dict=state_dict,
                         input_shape=input_shape, num_classes=num_classes, required=False)
    if victim_ckpt is not None:
        if not Path(victim_ckpt).is_file():
            raise CheckpointError(f"{victim_ckpt}: no such checkpoint")
        return file_digest(victim_ckpt)
    if model is None and factory is None:
        return None
    return open_victim(model=model, factory=factory, state_dict=state_dict, input_shape=input_shape,
                       num_classes=num_classes, clean_stats=clean_stats, on_warning=on_warning)[1]
