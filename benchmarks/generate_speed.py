"""Generation end to end against its compute floor, and against torchattacks, in one run.

The floor of a copy is its compute: one forward+backward per batch for the
loss gradient (shared by every single-step variant) plus one forward per
stored variant for its predictions. It is measured here with bare loops on the
same model, device, batch size and memory layout, over images already in
memory. advgen is timed end to end as a real ``advgen generate`` process:
start-up, reading and decoding shards, the attack, rounding, the predictions,
PNG encoding and tar/parquet writing, cards and stats.

The peer is torchattacks' FGSM with ``Attack.save`` (its documented way to
write a dataset: float tensors, re-concatenated and re-saved after every batch),
one attack object per (method, ε) copy; ``pip install --no-deps torchattacks``.

    python benchmarks/generate_speed.py --clean demo/data/fashion_mnist/clean \\
        --ckpt demo/data/fashion_mnist/victims/simple_cnn.pt [--cases fgsm,grid24] [--peer]

Prints a JSON report; RESULTS.md holds the numbers that were measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advgen.clean import load_clean_split, open_clean  # noqa: E402
from advgen.victims import load  # noqa: E402

GRID_METHODS = ["fgsm", "fgm", "d_fgsm", "d_fgm"]
GRID_EPS = [0.01, 0.02, 0.03, 0.05, 0.1, 0.2]


def floor_seconds(model, x_u8: torch.Tensor, y: torch.Tensor, batch: int, copies: int) -> dict:
    """Bare loops: time of one forward+backward pass and of one forward pass over all images."""
    def batches():
        for lo in range(0, len(y), batch):
            yield x_u8[lo:lo + batch].float().div_(255).contiguous(memory_format=torch.channels_last), y[lo:lo + batch]

    t = time.perf_counter()
    for xb, yb in batches():
        xb.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xb), yb, reduction="sum"), xb)
    fb = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for xb, _ in batches():
            model(xb).argmax(1)
    fwd = time.perf_counter() - t
    return {"forward_backward_s": round(fb, 2), "forward_s": round(fwd, 2),
            "floor_s": round(fb + copies * fwd, 2)}


def run_advgen(clean: Path, ckpt: Path, methods: list[str], eps: list[float], batch: int, audit: bool,
               workers: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="advgen-bench-"))
    cmd = [str(Path(sys.executable).parent / "advgen"), "generate", "--victim-ckpt", str(ckpt), "--clean", str(clean),
           "--out", str(out), "--device", "cpu", "--batch-size", str(batch), "--workers", str(workers),
           *(a for m in methods for a in ("--method", m)), *(a for e in eps for a in ("--eps", str(e))),
           "--rounding-audit" if audit else "--no-rounding-audit"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    shutil.rmtree(out)
    return seconds


def run_torchattacks(model, x_u8: torch.Tensor, y: torch.Tensor, batch: int, eps: list[float]) -> float:
    import torchattacks

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_u8.float().div(255), y), batch_size=batch, shuffle=False)
    out = Path(tempfile.mkdtemp(prefix="ta-bench-"))
    t = time.perf_counter()
    for i, e in enumerate(eps):
        attack = torchattacks.FGSM(model, eps=e)
        attack.save(loader, save_path=str(out / f"copy{i}.pt"), verbose=False)
    seconds = time.perf_counter() - t
    shutil.rmtree(out)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cases", default="fgsm,grid24", help="fgsm (one copy) and/or grid24 (4 methods x 6 eps)")
    ap.add_argument("--audit", default="off,on", help="rounding audit settings to time: off, on, both, or none")
    ap.add_argument("--peer", action="store_true", help="also time torchattacks FGSM + Attack.save")
    args = ap.parse_args()

    stats = open_clean(args.clean)
    xs, ys = zip(*(load_clean_split(args.clean, stats, s)[:2] for s in ("train", "test")))
    x_u8, y = torch.cat(xs), torch.cat(ys)
    model = load(args.ckpt, dataset=stats["dataset"]).to(memory_format=torch.channels_last)
    report = {"device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)",
              "images": len(y), "victim": model.meta.arch, "batch_size": args.batch_size, "workers": args.workers,
              "torch": torch.__version__, "cases": {}}
    cases = {"fgsm": (["fgsm"], [0.1]), "grid24": (GRID_METHODS, GRID_EPS)}
    for name in args.cases.split(","):
        methods, eps = cases[name]
        copies = len(methods) * len(eps)
        audits = [a for a in args.audit.split(",") if a != "none"]
        floor = floor_seconds(model, x_u8, y, args.batch_size, copies) if audits else {}
        case = {"copies": copies, **floor}
        for audit in audits:
            secs = run_advgen(args.clean, args.ckpt, methods, eps, args.batch_size, audit == "on", args.workers)
            case[f"advgen_audit_{audit}_s"] = round(secs, 2)
            case[f"advgen_audit_{audit}_over_floor"] = round(secs / floor["floor_s"], 3)
            # With the audit, the floor has a second forward per variant (the float image).
            audit_floor = floor["forward_backward_s"] + 2 * copies * floor["forward_s"]
            if audit == "on":
                case["advgen_audit_on_over_floor_with_audit_forward"] = round(secs / audit_floor, 3)
        if args.peer:
            secs = run_torchattacks(model, x_u8, y, args.batch_size, [e for _ in methods for e in eps])
            case["torchattacks_s"] = round(secs, 2)
            ours = [v for k, v in case.items() if k.startswith("advgen_") and k.endswith("_s")]
            if ours:
                case["torchattacks_over_advgen"] = round(secs / min(ours), 3)
        report["cases"][name] = case
        print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    main()
