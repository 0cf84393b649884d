"""``advgen check``: before any work, does this machine have what the params will need?

The first stage of every pipeline (DVC runs it before the others, and again
whenever the params change): the device named in the params must exist; the
disk under the data folder must hold every output the params make (plus DVC's
cache copy); the largest step must fit in memory (and, on a GPU, training's
data must fit on the device). Missing dataset files are named with the mirror
option (prepare downloads them if it can). It writes the estimates — a pure
function of the params, so DVC reruns nothing downstream — and exits 2 with
one line naming every unmet precondition.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
import yaml

from advgen.data.datasets import DATASETS, locate, search_roots
from advgen.errors import BadParameter, CorruptFile
from advgen.project.plan import estimate, human
from advgen.storage.shards import write_json
from advgen.stages.app import log, stage
from advgen.victims.train import resolve_device


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bytes_under(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _existing(folder: Path) -> Path:
    here = folder.resolve()
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


@stage
def check(
    params: Path = typer.Option(Path("params.yaml"), help="The pipeline's params (the profile's params.yaml)."),
    data: Path = typer.Option(Path("data"), help="The folder the pipeline writes its data to."),
    mirror: Path | None = typer.Option(None, envvar="ADVGEN_MIRROR", help="Folder of original dataset files "
                                       "(as prepare's --mirror / ADVGEN_MIRROR)."),
    cache_factor: float = typer.Option(2.0, help="Disk needed per byte of output: 2 counts DVC's cache copy "
                                       "(1 when the cache links files: cache.type symlink/hardlink/reflink)."),
    out: Path | None = typer.Option(None, help="Write the estimates (per stage disk and memory) to this JSON."),
) -> None:
    """Check the device, disk and memory the params need, and find the datasets, before any work starts."""
    try:
        doc = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise BadParameter(f"--params {params}: no such file") from None
    except yaml.YAMLError as e:
        raise CorruptFile(params, f"not valid YAML ({' '.join(str(e).split())})") from None
    if not cache_factor >= 1:
        raise BadParameter(f"--cache-factor must be >= 1, got {cache_factor}")
    plan = estimate(doc)
    problems: list[str] = []

    device = str(doc.get("device", "auto"))
    try:
        dev = resolve_device(device)
    except BadParameter as e:
        raise BadParameter(f"params device: {device}: {e}") from None

    for ds in (doc.get("prepare") or {}).get("datasets") or []:
        if (data / ds / "clean" / "_stats.json").is_file():
            continue
        spec = DATASETS[ds]
        roots = search_roots(spec, data / ds / "raw", mirror)
        if locate(spec, roots) is None:
            wanted = " + ".join("|".join(names) for names in spec.layout.files.values())
            log(f"check: {spec.title}: {wanted} not found in {', '.join(map(str, roots))}; prepare will try to "
                "download it (set ADVGEN_MIRROR to a folder holding the original files where there is no network)")

    have = _bytes_under(data)
    need = max(0, plan.disk - have) * cache_factor
    where = _existing(data)
    free = shutil.disk_usage(where).free
    if need > free:
        big = ", ".join(f"{s.stage} {human(s.disk)}" for s in plan.largest(3))
        problems.append(f"disk: the outputs need about {human(need)} on {where} ({human(plan.disk)} of data"
                        f"{f' x{cache_factor:g} for the DVC cache' if cache_factor > 1 else ''}, "
                        f"{human(have)} already there); {human(free)} is free. Largest: {big}")
    mem = _mem_available()
    peak = max(plan.stages, key=lambda s: s.memory, default=None)
    if mem is not None and peak is not None and peak.memory > mem:
        problems.append(f"memory: {peak.stage} holds about {human(peak.memory)} ({peak.detail}); "
                        f"{human(mem)} is available")
    if dev.type == "cuda":
        import torch

        free_dev, _ = torch.cuda.mem_get_info(dev)
        trains = [s for s in plan.stages if s.stage.startswith("train@")]
        worst = max(trains, key=lambda s: s.memory, default=None)
        if worst is not None and worst.memory > free_dev:
            problems.append(f"device memory: {worst.stage} holds about {human(worst.memory)} on {dev} "
                            f"({worst.detail}); {human(free_dev)} is free")

    if out is not None:
        write_json(out, {"disk_bytes": plan.disk, "peak_memory_bytes": plan.memory,
                         "stages": [{"stage": s.stage, "disk_bytes": s.disk, "memory_bytes": s.memory}
                                    for s in plan.stages]})
    log(f"check: {len(plan.stages)} stage(s); outputs about {human(plan.disk)}, largest step about "
        f"{human(plan.memory)}; {human(free)} free on {where}" + (f", {human(mem)} memory available" if mem else "")
        + f"; device {dev}")
    if problems:
        raise BadParameter("; ".join(problems))
