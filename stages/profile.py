"""``advgen profile``: make a folder a profile of the template pipeline, or prove it is current.

A profile is a folder with a ``params.yaml`` (the only file a person writes);
this command writes its ``dvc.yaml`` from the template (the root ``dvc.yaml``, whose
code deps it first derives from the code: ``advgen.project.deps``)
and its ``.dvc/`` folder, which makes it a DVC project of its own, isolated
from the root study and from other profiles. ``--check`` writes nothing and
exits 1 naming every file that is stale.
"""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

import typer
import yaml

from advgen.errors import BadParameter, CorruptFile
from advgen.project.deps import rewrite
from advgen.project.profiles import DVC_GITIGNORE, dvc_config, relative, render_dvc_yaml
from advgen.storage.shards import write_text
from advgen.stages.app import log, stage


def _remote_of(template_dir: Path) -> Path | None:
    """The template project's default local remote folder (absolute), if its .dvc/config names one."""
    cfg = configparser.ConfigParser()
    try:
        cfg.read(template_dir / ".dvc" / "config", encoding="utf-8")
        name = cfg.get("core", "remote")
        section = next(s for s in (f'remote "{name}"', f"'remote \"{name}\"'") if cfg.has_section(s))
        url = cfg.get(section, "url")
    except (configparser.Error, OSError, StopIteration):
        return None
    if "://" in url:
        return None
    return (template_dir / ".dvc" / url).resolve()


def _want(profile: Path, template: Path, template_text: str) -> dict[Path, bytes]:
    """Every file the profile should hold, with its content (``template_text``: the template's, deps current)."""
    params_path = profile / "params.yaml"
    if not params_path.is_file():
        raise BadParameter(f"{profile} has no params.yaml; a profile is a folder with its own params.yaml")
    try:
        params = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CorruptFile(params_path, f"not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(params, dict):
        raise CorruptFile(params_path, "expected a mapping of params")
    code = relative(template.parent, profile)
    files = {profile / "dvc.yaml": render_dvc_yaml(template_text, params, code=code,
                                                    template_name=relative(template, profile)).encode()}
    remote = _remote_of(template.parent)
    if remote is not None:
        files[profile / ".dvc" / "config"] = dvc_config(remote=relative(remote, profile / ".dvc")).encode()
    files[profile / ".dvc" / ".gitignore"] = DVC_GITIGNORE.encode()
    plots = template.parent / ".dvc" / "plots"
    if plots.is_dir():
        for p in sorted(plots.glob("*.json")):
            files[profile / ".dvc" / "plots" / p.name] = p.read_bytes()
    return files


@stage
def profile(
    folders: list[Path] = typer.Argument(..., help="Profile folders, each holding its params.yaml."),
    template: Path = typer.Option(Path("dvc.yaml"), help="The template pipeline (the root dvc.yaml)."),
    check: bool = typer.Option(False, help="Write nothing; exit 1 if any generated file is stale."),
) -> None:
    """Write the template's code deps (its stages' import closures), each profile's dvc.yaml (from the template)
    and .dvc/ folder; or --check they are all current."""
    if not template.is_file():
        raise BadParameter(f"--template {template}: no such file")
    stale = []
    text = template.read_text(encoding="utf-8")
    derived = rewrite(text, template.parent.resolve())
    if derived != text:
        stale.append(template)
        if not check:
            write_text(template, derived)
    for folder in folders:
        if not folder.is_dir():
            raise BadParameter(f"{folder}: no such folder")
        if folder.resolve() == template.parent.resolve():
            raise BadParameter(f"{folder} holds the template itself; a profile lives in a subfolder")
        for path, content in _want(folder, template, derived).items():
            current = path.read_bytes() if path.is_file() else None
            if current == content:
                continue
            stale.append(path)
            if not check:
                if path.name.endswith(".json"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(template.parent / ".dvc" / "plots" / path.name, path)
                else:
                    write_text(path, content.decode())
    if check:
        for p in stale:
            print(f"stale: {p}")
        if stale:
            log(f"profile: {len(stale)} generated file(s) differ; run `advgen profile {' '.join(map(str, folders))}`")
            raise typer.Exit(1)
        log(f"profile: {len(folders)} profile(s) current")
    else:
        log(f"profile: wrote {len(stale)} file(s) in {len(folders)} profile(s)")
