"""Generation: a clean folder and a victim in, one full copy per (method, ε) out.

Work is organized by input shard. For each shard (this process's share:
shard i goes to rank i mod world_size), every requested variant whose output
shard is not already done is computed batch by batch:

* one forward+backward gives the loss gradient that every single-step method
  (fgsm, fgm, fgm_l2, d_fgsm, d_fgm) uses at every ε;
* each variant is rounded to uint8 — what is stored: nearest, except where
  that would leave the ε-ball, then towards the clean pixel (``attacks.to_uint8``)
  — and the victim classifies the stored image (one forward per variant); with
  the rounding audit on, it also classifies the float image, so the manifest
  can say which samples changed outcome through rounding;
* finished shards go to worker processes that encode PNGs and write tars and
  manifests while the next shard computes.

Batches are formed within a shard, and random starts are seeded per image,
so the bytes written do not depend on the number of processes. They can
depend on the batch size (float reductions are blocked differently for
different batch shapes), so the batch size is part of the fingerprint, as is
the device type.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advgen import attacks
from advgen.attacks import METHODS, get_method
from advgen.storage.shards import read_images
from advgen.storage.outputs import clean_stale
from advgen.storage.variants import Variant, invalidate, shard_done, write_shard
from advgen.versions import versions

FORMAT_VERSION = 2
_CODE_FILES = ("attacks/__init__.py", "generation/driver.py", "storage/variants.py", "storage/shards.py")


@dataclass(frozen=True)
class AttackParams:
    """Everything besides method and ε that shapes the output."""

    steps: int = 10
    step_size: float | None = None  # None: 2.5·ε/steps
    label_source: str = "true"  # true | predicted
    target: str = "least_likely"  # least_likely | top5_lowest (illc_*)
    candidates: int = 10  # DeepFool
    overshoot: float = 0.02  # DeepFool
    max_iter: int = 50  # DeepFool; fgs_until's step limit
    seed: int = 0  # random starts
    restarts: int = 1  # PGD random restarts (the strongest per image is kept)
    rounding_aware: bool = True  # minimal and iterative methods finish on the uint8 lattice
    lattice_steps: int = 0  # at most this many lattice steps per image; 0 = steps (iterative) or max_iter (DeepFool)
    uap_norm: str = "linf"  # uap: the ball δ lives in (linf | l2)
    uap_target: float = 0.8  # uap: stop fitting once this fooling rate is reached on the fitting images
    uap_passes: int = 10  # uap: at most this many passes over the fitting images
    uap_images: int = 2000  # uap: training images δ is fitted on (drawn with the seed)

    def relevant(self, method: str) -> dict:
        """The parameters that affect ``method``'s output (others do not enter its fingerprint)."""
        kind = get_method(method).kind
        out: dict = {"label_source": self.label_source}
        if kind in ("iterative", "targeted_iterative", "random_start"):
            out.update(steps=self.steps, step_size=self.step_size)
        if kind in ("targeted_single", "targeted_iterative"):
            out["target"] = self.target
        if kind == "random_start":
            out.update(seed=self.seed, restarts=self.restarts)
        if kind == "minimal":
            out.update(candidates=self.candidates, overshoot=self.overshoot, max_iter=self.max_iter)
        if kind == "until":
            out.update(step_size=self.step_size or attacks.FGS_UNTIL_STEP, max_iter=self.max_iter)
        if kind in ROUNDING_AWARE_KINDS:
            out.update(rounding_aware=self.rounding_aware, lattice_steps=self.lattice_steps_for(method))
        if kind == "universal":
            out.update(uap_norm=self.uap_norm, uap_target=self.uap_target, uap_passes=self.uap_passes,
                       uap_images=self.uap_images, seed=self.seed, candidates=self.candidates,
                       overshoot=self.overshoot, max_iter=self.max_iter)
        return out

    def norm_of(self, method: str) -> str:
        """The norm of ``method``'s ball: the registry's, or ``uap_norm`` for the universal perturbation."""
        return self.uap_norm if get_method(method).kind == "universal" else get_method(method).norm

    def lattice_steps_for(self, method: str) -> int:
        if not self.rounding_aware:
            return 0
        default = self.max_iter if get_method(method).kind == "minimal" else self.steps
        return self.lattice_steps or default


# The methods whose stored copies finish on the uint8 lattice (rounding-aware mode): a minimal
# perturbation or an iterative optimum is exactly what rounding to 8 bits can undo.
ROUNDING_AWARE_KINDS = attacks.ROUNDING_AWARE_KINDS


def plan(methods: list[str], eps: list[float]) -> list[Variant]:
    """Every (method, ε) pair, in the order given; DeepFool once, without ε."""
    out: list[Variant] = []
    for m in methods:
        get_method(m)
        for v in ([Variant(m, None)] if not attacks.uses_eps(m) else [Variant(m, float(e)) for e in eps]):
            if v not in out:
                out.append(v)
    return out


@functools.cache
def code_version() -> str:
    """sha256 of the source of the modules that shape generated bytes."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent.parent
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def fingerprint(variant: Variant, params: AttackParams, *, victim_sha256: str, clean_sha256: str,
                store_float: bool, rounding_audit: bool, batch_size: int, device: str) -> str:
    """What a finished output shard must have been made with to be reused.

    ``device`` is the device type (cpu, cuda): GPU kernels do not give the CPU's bits.
    """
    doc = {
        "format_version": FORMAT_VERSION, "method": variant.method, "eps": variant.eps,
        "params": params.relevant(variant.method), "victim_sha256": victim_sha256, "clean_sha256": clean_sha256,
        "store_float": store_float, "rounding_audit": rounding_audit, "code": code_version(),
        "torch": versions()["torch"], "batch_size": batch_size, "device": device,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# --- universal perturbations: fitted once per variant, stored beside its shards ------------------

UAP_FILES = ("perturbation.npy", "perturbation.png", "perturbation.json")


def uap_fitting_images(x_train: Tensor, n: int, seed: int) -> Tensor:
    """The ``n`` training images δ is fitted on, in a seeded random order (uint8 (n, C, H, W))."""
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:n]
    return x_train[order]


def fit_universal(model: nn.Module, x_fit: Tensor, v: Variant, params: AttackParams,
                  device: torch.device) -> tuple[np.ndarray, dict]:
    """Fit ``v``'s universal perturbation on uint8 images ``x_fit``; returns (δ as float32 (C, H, W), fit facts)."""
    x = x_fit.to(device).float().div_(255).contiguous(memory_format=torch.channels_last)
    fit = attacks.fit_uap(model, x, eps=v.eps, norm=params.uap_norm, target_rate=params.uap_target,  # type: ignore[arg-type]
                          max_passes=params.uap_passes, candidates=params.candidates, overshoot=params.overshoot,
                          max_iter=params.max_iter)
    delta = fit.delta.cpu().numpy().astype(np.float32)
    info = {"norm": params.uap_norm, "eps": v.eps, "fit_split": "train", "fit_images": int(len(x_fit)),
            "fit_seed": params.seed, "fooling_rate_fit": fit.fooling_rate, "passes": fit.passes,
            "history": fit.history, "target_rate": params.uap_target, "max_passes": params.uap_passes,
            "linf": float(np.abs(delta).max()), "l2": float(np.linalg.norm(delta))}
    return delta, json.loads(json.dumps(info))


def write_universal(folder: Path, delta: np.ndarray, info: dict, fingerprint: str) -> None:
    """``perturbation.npy`` (float32, no pickle), a picture of δ and the fit facts, atomically, before the shards."""
    from advgen.storage.shards import encode_png, write_json
    from advgen.storage.variants import npy_bytes

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".perturbation.npy.tmp-{os.getpid()}"
    tmp.write_bytes(npy_bytes(delta))
    os.replace(tmp, folder / "perturbation.npy")
    scale = max(float(np.abs(delta).max()), 1e-12)
    picture = np.clip(np.rint(127.5 + delta.transpose(1, 2, 0) * (127.5 / scale)), 0, 255).astype(np.uint8)
    tmp = folder / f".perturbation.png.tmp-{os.getpid()}"
    tmp.write_bytes(encode_png(picture))
    os.replace(tmp, folder / "perturbation.png")
    write_json(folder / "perturbation.json", {**info, "fingerprint": fingerprint, "picture_scale": scale})


def read_universal(folder: Path, fingerprint: str) -> np.ndarray | None:
    """The stored δ of a variant if it was fitted with ``fingerprint``; else None (it must be fitted again)."""
    try:
        info = json.loads((folder / "perturbation.json").read_text())
        if info.get("fingerprint") != fingerprint:
            return None
        delta = np.load(folder / "perturbation.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return delta.astype(np.float32) if delta.dtype == np.float32 else None


# --- compute ------------------------------------------------------------------------------------

@dataclass
class Batch:
    x: Tensor  # float images in [0, 1], on the device
    y: Tensor  # true labels
    label: Tensor  # gradient label (true or predicted)
    clean_logits: Tensor
    seeds: list[int]  # per-image seeds for random starts
    grad: Tensor | None = None  # loss gradient at x for ``label``, shared by the single-step methods


def _finish(model: nn.Module, b: Batch, x_adv: Tensor, v: Variant, audit: bool,
            extra: dict[str, Tensor] | None = None, keep_float: bool = False,
            x_store: Tensor | None = None, norm: str | None = None) -> dict[str, Tensor]:
    """Round to uint8 inside the ε-ball, classify what is stored, and measure δ; per sample, on the device.

    ``x_adv`` is the float attack; ``x_store`` (rounding-aware methods) the
    same attack finished on the lattice, which is what gets stored.
    """
    m = METHODS[v.method]
    direction = m.direction
    norm = norm or m.norm
    stored = attacks.to_uint8(x_adv if x_store is None else x_store, b.x, eps=v.eps, norm=norm)
    xs = stored.float().div_(255)
    attacks.check_output(v.method, b.x, xs, v.eps, norm=norm)  # the stored image holds its ε
    with torch.no_grad():
        probs = F.softmax(model(xs).float(), dim=1)
        clean_probs = F.softmax(b.clean_logits.float(), dim=1)
    conf, pred = probs.max(1)
    clean_conf, clean_pred = clean_probs.max(1)
    ok = (pred == b.y) if direction == "cooperative" else (pred != b.y)
    delta = (xs - b.x).flatten(1)
    cols = {
        "clean_pred": clean_pred, "clean_conf": clean_conf, "adv_pred": pred, "adv_conf": conf,
        "success": ok, "linf": delta.abs().amax(1), "l2": delta.norm(dim=1),
    }
    if probs.shape[1] > 5:  # top-5 accuracy is meaningful only with more than 5 classes
        cols["clean_top5"] = clean_probs.topk(5, dim=1).indices
        cols["adv_top5"] = probs.topk(5, dim=1).indices
    if audit:
        with torch.no_grad():
            fpred = model(x_adv).argmax(1)
        fok = (fpred == b.y) if direction == "cooperative" else (fpred != b.y)
        cols["float_pred"] = fpred
        cols["float_l2"] = (x_adv - b.x).flatten(1).norm(dim=1)
        cols["rounding_changed"] = fok != ok
    cols.update(extra or {})
    cols["stored"] = stored
    if keep_float:
        cols["float"] = x_adv
    return cols


def attack_batch(model: nn.Module, b: Batch, variants: list[Variant], params: AttackParams,
                 audit: bool, keep_float: bool = False,
                 deltas: dict[Variant, Tensor] | None = None) -> dict[Variant, dict[str, Tensor]]:
    """Every requested variant of one batch; single-step methods share one gradient; a universal
    perturbation comes fitted, in ``deltas``."""
    out: dict[Variant, dict[str, Tensor]] = {}
    grad = b.grad
    for v in variants:
        m = METHODS[v.method]
        size = params.step_size if params.step_size is not None else (
            attacks.default_step_size(v.eps, params.steps) if v.eps is not None else 0.0)
        extra = None
        if m.kind == "single":
            if grad is None:
                grad, _ = attacks.loss_gradient(model, b.x, b.label)
            x_adv = m.fn(b.x, grad=grad, eps=v.eps)
            # The gradient's own size: what an unsigned step (fgm, d_fgm) is ε times (see the report's FGM note).
            extra = {"grad_l2": grad.flatten(1).norm(dim=1), "grad_linf": grad.flatten(1).abs().amax(1)}
        elif m.kind == "targeted_single":
            target = attacks.least_likely(b.clean_logits, params.target)  # type: ignore[arg-type]
            x_adv = attacks.illc_fast(model, b.x, target, eps=v.eps)
            extra = {"target": target}
        elif m.kind == "targeted_iterative":
            target = attacks.least_likely(b.clean_logits, params.target)  # type: ignore[arg-type]
            x_adv = attacks.illc_iter(model, b.x, target, eps=v.eps, steps=params.steps, step_size=size)
            extra = {"target": target}
        elif m.kind == "random_start":
            runs = []
            for r in range(params.restarts):
                start = attacks.random_start(tuple(b.x.shape[1:]), v.eps, m.norm,
                                             attacks.restart_seeds(b.seeds, r)).to(b.x.device)
                runs.append(m.fn(model, b.x, b.label, eps=v.eps, steps=params.steps, step_size=size,
                                 start=start.contiguous(memory_format=torch.channels_last)))
            x_adv = runs[0] if len(runs) == 1 else attacks.best_of_restarts(model, b.label, runs)
        elif m.kind == "minimal":
            r = attacks.deepfool(model, b.x, b.label, candidates=params.candidates, overshoot=params.overshoot,
                                 max_iter=params.max_iter)
            x_adv = r.x
            extra = {"iterations": r.iterations, "converged": r.converged}
        elif m.kind == "until":
            x_adv, taken = attacks.fgs_until(model, b.x, b.label, step_size=params.step_size or
                                             attacks.FGS_UNTIL_STEP, max_iter=params.max_iter)
            with torch.no_grad():
                reached = model(x_adv).argmax(1) != b.label
            extra = {"iterations": taken, "converged": reached}
        elif m.kind == "universal":
            x_adv = attacks.uap(b.x, delta=(deltas or {})[v].to(b.x.device))
        else:
            x_adv = m.fn(model, b.x, b.label, eps=v.eps, steps=params.steps, step_size=size)
        attacks.check_output(v.method, b.x, x_adv, v.eps, norm=params.norm_of(v.method))
        x_adv = x_adv.detach()
        x_store = None
        budget = params.lattice_steps_for(v.method) if m.kind in ROUNDING_AWARE_KINDS else 0
        if budget:
            x_store, taken = attacks.finish_stored(
                v.method, model, b.x, x_adv, extra["target"] if m.kind == "targeted_iterative" else b.label, b.y,
                eps=v.eps, step_size=size, max_steps=budget, candidates=params.candidates, overshoot=params.overshoot)
            extra = {**(extra or {}), "lattice_steps": taken}
        out[v] = _finish(model, b, x_adv, v, audit, extra, keep_float, x_store=x_store,
                         norm=params.norm_of(v.method))
    return out


_NUMPY_TYPES = {"clean_pred": np.int16, "adv_pred": np.int16, "float_pred": np.int16, "target": np.int16,
                "clean_top5": np.int16, "adv_top5": np.int16,
                "clean_conf": np.float32, "adv_conf": np.float32, "linf": np.float32, "l2": np.float32,
                "iterations": np.int16, "lattice_steps": np.int16, "float_l2": np.float32,
                "grad_l2": np.float32, "grad_linf": np.float32}


def _gather(parts: list[dict[str, Tensor]]) -> dict[str, np.ndarray]:
    cat = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
    return {k: (v.numpy().astype(_NUMPY_TYPES[k]) if k in _NUMPY_TYPES else v.numpy()) for k, v in cat.items()}


# --- the driver ---------------------------------------------------------------------------------

@dataclass
class ShardTask:
    split: str
    name: str  # input (and output) shard file name


Progress = Callable[[int, int, str], None]  # (shards done, shards total, what)


def generate(
    model: nn.Module, *, clean: Path, clean_stats: dict, out: Path, variants: list[Variant],
    splits: list[str], params: AttackParams, victim_sha256: str, device: torch.device, batch_size: int = 256,
    workers: int = 1, store_float: bool = False, rounding_audit: bool = True, rank: int = 0, world_size: int = 1,
    on_progress: Progress | None = None, deltas: dict[Variant, Tensor] | None = None,
) -> dict[str, int]:
    """Write this rank's share of every variant's shards; returns {"computed": n, "skipped": n} shards.

    Does not write stats or cards (see ``finalize``): with several processes,
    rank 0 does that once all ranks are done.
    """
    clean_sha = hashlib.sha256((clean / "_stats.json").read_bytes()).hexdigest()
    prints = {v: fingerprint(v, params, victim_sha256=victim_sha256, clean_sha256=clean_sha,
                             store_float=store_float, rounding_audit=rounding_audit, batch_size=batch_size,
                             device=device.type) for v in variants}
    tasks = [ShardTask(s, n) for s in splits for n in clean_stats["shards"][s]]
    mine = tasks[rank::world_size]
    for v in variants:
        (out / v.folder).mkdir(parents=True, exist_ok=True)
        clean_stale(out / v.folder)  # temporary files of killed runs
    # Which variants each of this rank's shards still needs (a resumed run skips the rest).
    work = [(task, [v for v in variants if not shard_done(out / v.folder / task.name, prints[v])]) for task in mine]
    # A variant about to change is no longer complete: its marker goes before the first new shard lands.
    for v in {v for _, todo in work for v in todo}:
        invalidate(out / v.folder)
    counts = {"computed": sum(len(todo) for _, todo in work),
              "skipped": sum(len(variants) - len(todo) for _, todo in work)}
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),)) \
        if workers > 0 else None
    # One thread reads and decodes the next input shard while this one computes
    # (torch releases the GIL in its kernels).
    reader = ThreadPoolExecutor(max_workers=1)
    queue = [(task, todo) for task, todo in work if todo]
    skipped_shards = len(work) - len(queue)
    reads: dict[int, Future] = {}

    def prefetch(j: int) -> None:
        if j < len(queue):
            reads[j] = reader.submit(read_images, [clean / queue[j][0].name], shape=clean_stats.get("shape"),
                                     num_classes=len(clean_stats["classes"]) if "classes" in clean_stats else None)

    pending: list[Future] = []
    try:
        prefetch(0)
        for j, (task, todo) in enumerate(queue):
            prefetch(j + 1)
            results, keys, labels = _attack_shard(model, reads.pop(j).result(), task.split, todo, params, deltas,
                                                  device, batch_size, rounding_audit, store_float)
            for v in todo:
                cols = results[v]
                stored = cols.pop("stored").transpose(0, 2, 3, 1)
                floats = cols.pop("float").astype(np.float32) if store_float else None
                kwargs = dict(keys=keys, labels=labels, images=np.ascontiguousarray(stored), floats=floats,
                              columns=_manifest_columns(keys, labels, cols), fingerprint=prints[v])
                if pool is None:
                    write_shard(out / v.folder / task.name, **kwargs)
                else:
                    pending.append(pool.submit(write_shard, out / v.folder / task.name, **kwargs))
            # Bound memory: wait for older writes while the next shard computes.
            while len(pending) > 2 * max(1, workers) * len(variants):
                pending.pop(0).result()
            if on_progress:
                on_progress(skipped_shards + j + 1, len(work), f"{task.split} {task.name}")
        for f in pending:
            f.result()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return counts


def _die_with_parent(parent: int) -> None:
    """Writer processes exit when the process that started them is gone, even after a SIGKILL.

    Linux delivers SIGTERM on the parent's death (``PR_SET_PDEATHSIG``); a
    watchdog thread covers other systems and the race before the call.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="advgen-parent-watch").start()


def _manifest_columns(keys: list[str], labels: np.ndarray, cols: dict[str, np.ndarray]) -> dict:
    return {"index": np.array([int(k) for k in keys], dtype=np.int32), "label": labels.astype(np.int16), **cols}


def _attack_shard(model: nn.Module, images: tuple[Tensor, Tensor, list[str]], split: str, variants: list[Variant],
                  params: AttackParams, deltas: dict[Variant, Tensor] | None, device: torch.device, batch_size: int,
                  audit: bool, keep_float: bool):
    x_u8, y_all, keys = images
    needs_seeds = any(METHODS[v.method].kind == "random_start" for v in variants)
    seeds_all = [attacks.sample_seed(params.seed, split, int(k)) for k in keys] if needs_seeds else [0] * len(keys)
    x_u8, y_all = x_u8.to(device), y_all.to(device)
    parts: dict[Variant, list[dict[str, Tensor]]] = {v: [] for v in variants}
    single_step = any(METHODS[v.method].kind == "single" for v in variants)
    for lo in range(0, len(keys), batch_size):
        x = x_u8[lo:lo + batch_size].float().div_(255).contiguous(memory_format=torch.channels_last)
        y = y_all[lo:lo + batch_size]
        grad = None
        if params.label_source == "true" and single_step:
            grad, clean_logits = attacks.loss_gradient(model, x, y)  # its forward gives the clean logits too
        else:
            with torch.no_grad():
                clean_logits = model(x)
        label = clean_logits.argmax(1) if params.label_source == "predicted" else y
        b = Batch(x=x, y=y, label=label, clean_logits=clean_logits, seeds=seeds_all[lo:lo + batch_size], grad=grad)
        for v, cols in attack_batch(model, b, variants, params, audit, keep_float, deltas).items():
            parts[v].append(cols)
    return {v: _gather(p) for v, p in parts.items()}, keys, y_all.cpu().numpy()
