"""DVC code deps follow the code: each stage depends on exactly the project files its module can run.

The deps in dvc.yaml are derived (``advgen.project.deps``, written by ``advgen profile``); these tests check the
derivation on a small made-up project, check it against what Python itself imports, and check that the committed
``dvc.lock`` files were made by the code of this checkout.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from advgen.errors import BadParameter
from advgen.project.deps import closure, code_deps, rewrite

ROOT = Path(__file__).resolve().parents[1]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def mini(tmp_path):
    """A project laid out like this one: pipeline/ (installed as advgen) and stages/ (advgen.stages)."""
    _write(tmp_path, {
        "pipeline/__init__.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from advgen.typing_only import T
            def __getattr__(name):
                from advgen import lazy
                return lazy
        """,
        "pipeline/typing_only.py": "",
        "pipeline/lazy.py": "",
        "pipeline/unused.py": "",
        "pipeline/pkg/__init__.py": "from .inner import f\n",
        "pipeline/pkg/inner.py": "def f():\n    from advgen.late import g\n    return g\n",
        "pipeline/pkg/sub/__init__.py": "",
        "pipeline/pkg/sub/leaf.py": "from ..inner import f\n",
        "pipeline/late.py": "import os\ng = os.sep\n",
        "stages/__init__.py": "",
        "stages/app.py": "import json\n",
        "stages/one.py": "from advgen.stages.app import json\nfrom advgen.pkg.sub import leaf\n",
        "stages/two.py": "from advgen.stages import app\n",
    })
    return tmp_path


def _names(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


def test_closure_follows_function_level_and_relative_imports_and_runs_packages_first(mini):
    assert _names(closure("advgen.stages.one", mini), mini) == [
        "pipeline/__init__.py", "pipeline/late.py", "pipeline/pkg/__init__.py", "pipeline/pkg/inner.py",
        "pipeline/pkg/sub/__init__.py", "pipeline/pkg/sub/leaf.py",
        "stages/__init__.py", "stages/app.py", "stages/one.py"]
    # Neither TYPE_CHECKING imports nor the package's lazy __getattr__ run; a module nobody imports is not a dep.
    assert _names(closure("advgen.stages.two", mini), mini) == [
        "pipeline/__init__.py", "stages/__init__.py", "stages/app.py", "stages/two.py"]


TEMPLATE = """\
stages:
  first:  # a comment that stays
    foreach: ${things}
    do:
      cmd: advgen one --x ${item}
      deps:
        - ${code}/pipeline/old_name.py
        - ${code}/stages/one.py  # hand-written, replaced
        - data/${item}/in
      outs:
        - data/${item}/out
  second:
    cmd: advgen two
    deps:
      - params.yaml
      - ${code}/stages/two.py
  other:
    cmd: python make.py
    deps:
      - make.py
"""


def test_rewrite_puts_each_stages_closure_in_place_of_its_code_deps_and_keeps_the_rest(mini):
    out = rewrite(TEMPLATE, mini)
    doc = yaml.safe_load(out)
    assert doc["stages"]["first"]["do"]["deps"] == [f"${{code}}/{p}" for p in _names(
        closure("advgen.stages.one", mini), mini)] + ["data/${item}/in"]
    assert doc["stages"]["second"]["deps"] == ["params.yaml"] + [f"${{code}}/{p}" for p in _names(
        closure("advgen.stages.two", mini), mini)]
    assert doc["stages"]["other"]["deps"] == ["make.py"]
    assert "# a comment that stays" in out
    assert rewrite(out, mini) == out  # a fixed point: --check on the result finds nothing stale


def test_rewrite_refuses_a_stage_with_no_code_dep_line_or_no_module(mini):
    with pytest.raises(BadParameter, match="second"):
        rewrite(TEMPLATE.replace("      - ${code}/stages/two.py\n", ""), mini)
    with pytest.raises(BadParameter, match="stages/three.py"):
        code_deps(yaml.safe_load(TEMPLATE.replace("advgen two", "advgen three")), mini)


def test_root_dvc_yaml_code_deps_are_the_import_closures():
    template = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    derived = code_deps(template, ROOT)
    assert set(derived) == {"check", "prepare", "train", "generate", "evaluate", "transfer", "retrain", "defend",
                            "directions", "report"}
    for name, want in derived.items():
        stage = template["stages"][name]
        have = [d for d in stage.get("do", stage)["deps"] if d.startswith("${code}/")]
        assert have == want, name
    # What the issue found missing: stages that run attacks depend on the attack code.
    for name in ("generate", "retrain", "defend", "evaluate"):
        assert "${code}/pipeline/attacks/methods/pgd.py" in derived[name], name
    assert not any("/attacks/" in d for d in derived["prepare"] + derived["train"])


_IMPORTED = """
import json, os, sys
import numpy, torch, torchvision, pyarrow, typer, webdataset  # heavy and not ours: once, before the forks
root = os.path.realpath(sys.argv[1])
out = {}
for module in sys.argv[2:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        __import__(module)
        files = sorted({os.path.relpath(os.path.realpath(m.__file__), root) for m in list(sys.modules.values())
                        if getattr(m, "__file__", None) and os.path.realpath(m.__file__).startswith(root + os.sep)})
        os.write(w, json.dumps(files).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out[module] = json.loads(f.read())
    os.waitpid(pid, 0)
print(json.dumps(out))
"""


def test_what_python_imports_for_each_stage_is_in_its_deps():
    """An independent check of the reading: import each stage module in a fresh child and list what loaded."""
    template = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    derived = code_deps(template, ROOT)
    modules = {name: f"advgen.stages.{name}" for name in derived}
    run = subprocess.run([sys.executable, "-c", _IMPORTED, str(ROOT), *modules.values()], capture_output=True,
                         text=True, check=True)
    loaded = json.loads(run.stdout)
    for name, module in modules.items():
        files = [f for f in loaded[module] if f.startswith(("pipeline/", "stages/"))]
        assert files, name
        missing = sorted(set(files) - {d.removeprefix("${code}/") for d in derived[name]})
        assert not missing, f"{name}: imported but not a dep: {missing}"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def committed_locks() -> list[Path]:
    return sorted(p for p in ROOT.glob("**/dvc.lock") if ".venv" not in p.parts and p.parent != ROOT)


@pytest.mark.parametrize("lock", committed_locks(), ids=lambda p: p.parent.relative_to(ROOT).as_posix())
def test_committed_dvc_lock_was_made_by_this_code(lock):
    """What `dvc status` would report as a modified code dep: every code file a stage ran with, unchanged."""
    profile = lock.parent
    entries = yaml.safe_load(lock.read_text())["stages"]
    spec = yaml.safe_load((profile / "dvc.yaml").read_text())["stages"]
    stale = []
    for entry, record in entries.items():
        stage = spec[entry.split("@")[0]]
        want = {(profile / d).resolve() for d in stage.get("do", stage)["deps"]
                if d.startswith("../") and d.endswith(".py")}
        have = {}
        for dep in record.get("deps", []):
            path = (profile / dep["path"]).resolve()
            if path.suffix == ".py" and ROOT in path.parents:
                have[path] = dep["md5"]
        for path in sorted(want | set(have)):
            if path not in have:
                stale.append(f"{entry}: {path.relative_to(ROOT)} is a dep but not in the lock")
            elif path not in want:
                stale.append(f"{entry}: {path.relative_to(ROOT)} is in the lock but no longer a dep")
            elif not path.is_file() or _md5(path) != have[path]:
                stale.append(f"{entry}: {path.relative_to(ROOT)} changed since the stage ran")
    assert not stale, f"{lock.relative_to(ROOT)} is stale ({len(stale)}); rerun `dvc repro` there:\n" + \
        "\n".join(stale[:20])


def _graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (module or function level), for every module of the project."""
    from advgen.project.deps import ROOTS, imported_names, module_path

    files = {}
    for prefix, folder in ROOTS:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            files.setdefault(name, path)
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_names(path, name):
            found = module_path(imported, root)
            if found is not None and found != path:
                targets.add(next(n for n, p in files.items() if p == found))
        graph[name] = targets
    return graph


def test_the_stage_shells_import_each_other_without_a_cycle():
    graph = {k: {t for t in v if t.startswith("advgen.stages.")} for k, v in _graph(ROOT).items()
             if k.startswith("advgen.stages.")}
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for t in sorted(graph.get(node, ())):
            visit(t)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
