"""Which results a report covers: the ones its params declare (never stale files), or every file found."""

from __future__ import annotations

from pathlib import Path


# --- which results -----------------------------------------------------------------------------------

def _empty_results() -> dict:
    return {"train": {}, "generate": {}, "evaluate": {}, "transfer": None, "retrain": {}, "defend": {},
            "directions": {}}


def declared_results(params: dict, metrics_dir: Path) -> dict[str, dict]:
    """The metrics files a pipeline's ``params`` declare, per dataset (the paths dvc.yaml gives the stages).

    {dataset: {"train": {victim: path}, "generate": {victim: [paths]}, "evaluate": {victim: path},
    "transfer": path | None, "retrain": {target: path}, "defend": {victim: path}}}
    """
    out: dict[str, dict] = {}

    def entries(section: str) -> list[dict]:
        return [e for e in (params.get(section) or {}).values() if isinstance(e, dict) and "dataset" in e]

    def ds(name: str) -> dict:
        return out.setdefault(name, _empty_results())

    for e in entries("train"):
        ds(e["dataset"])["train"][e["victim"]] = metrics_dir / e["dataset"] / e["victim"] / "train.json"
    for e in entries("generate"):
        ds(e["dataset"])["generate"].setdefault(e["victim"], []).append(
            metrics_dir / e["dataset"] / e["victim"] / f"generate-{e['family']}.json")
    for e in entries("evaluate"):
        ds(e["dataset"])["evaluate"][e["victim"]] = metrics_dir / e["dataset"] / e["victim"] / "evaluate.json"
    for e in entries("transfer"):
        ds(e["dataset"])["transfer"] = metrics_dir / e["dataset"] / "transfer.json"
    for e in entries("retrain"):
        ds(e["dataset"])["retrain"][e["target"]] = metrics_dir / e["dataset"] / e["target"] / "retrain.json"
    for e in entries("defend"):
        ds(e["dataset"])["defend"][e["victim"]] = metrics_dir / e["dataset"] / e["victim"] / "defend.json"
    for e in entries("directions"):
        ds(e["dataset"])["directions"][e["victim"]] = metrics_dir / e["dataset"] / e["victim"] / "directions.json"
    return out


def scan_results(metrics_dir: Path) -> dict[str, dict]:
    """Whatever results ``metrics_dir`` holds, in the layout of ``declared_results``."""
    out: dict[str, dict] = {}
    for root in sorted(p for p in Path(metrics_dir).iterdir() if p.is_dir()):
        found = _empty_results()
        for v in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "plots"):
            for kind in ("train", "evaluate", "retrain", "defend", "directions"):
                if (v / f"{kind}.json").is_file():
                    found[kind][v.name] = v / f"{kind}.json"
            gens = sorted(v.glob("generate-*.json"))
            if gens:
                found["generate"][v.name] = gens
        if (root / "transfer.json").is_file():
            found["transfer"] = root / "transfer.json"
        if any(found[k] for k in found):
            out[root.name] = found
    return out


def result_files(found: dict) -> list[Path]:
    """Every path in one dataset's entry of ``declared_results`` / ``scan_results``."""
    paths = [*found["train"].values(), *found["evaluate"].values(), *found["retrain"].values(),
             *found["defend"].values(), *found.get("directions", {}).values(),
             *(p for ps in found["generate"].values() for p in ps)]
    return paths + ([found["transfer"]] if found["transfer"] is not None else [])
