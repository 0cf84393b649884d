"""Code deps of the DVC stages, read off the code: each stage depends on the project files its module imports.

A stage's command is ``advgen <name> ...``; its module is ``stages/<name>.py``
(``advgen.stages.<name>``). Its code deps are the import closure of that
module inside the project: every ``import`` and ``from ... import`` in the
file, at module level or inside a function (imports done late for start-up
time still run), followed into each project module they name, with the
``__init__.py`` of every package on the way (importing ``a.b.c`` runs ``a``
and ``a.b`` first). Two kinds of import are left out, because they never run
when a stage runs:

* those under ``if TYPE_CHECKING:``;
* those inside a package's module-level ``__getattr__`` (lazy re-exports for
  users, such as ``advgen.attack``; project code imports the submodule itself,
  which ``closure`` then follows).

``rewrite`` puts the result into the template ``dvc.yaml`` in place of the
code-dep lines it held, so the deps are never written by hand; ``advgen
profile`` runs it, and ``advgen profile --check`` fails while they are stale.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from advgen.errors import BadParameter

# Installed name -> folder in the repository (pyproject's package-dir), most specific first.
ROOTS = (("advgen.stages", "stages"), ("advgen", "pipeline"))
CODE = "${code}"
_DEP_LINE = re.compile(r"^(\s+)- \$\{code\}/(?:pipeline|stages)/\S+\.py\b.*$")
_STAGE_LINE = re.compile(r"^  ([A-Za-z0-9_-]+):\s*(#.*)?$")
DEFENSE_PLOTS = "# generated: one per registered defense (advgen.defenses)"
_PLOTS_LINE = re.compile(r"^(\s+)plots:\s*" + re.escape(DEFENSE_PLOTS) + r"\s*$")


def defense_plots(indent: str) -> list[str]:
    """The ``plots:`` entries of ``defend``: one series plot per registered defense, ``plots/<name>.csv``."""
    from advgen import defenses

    out = []
    for d in defenses.REGISTRY.values():
        out += [f"{indent}- metrics/${{item.dataset}}/${{item.victim}}/plots/{d.name}.csv:\n",
                f"{indent}    cache: false\n", f"{indent}    template: series\n", f"{indent}    x: value\n",
                f"{indent}    y: accuracy\n", f"{indent}    title: accuracy vs {d.axis}, {d.name} (model, data)\n"]
    return out


def module_path(name: str, root: Path) -> Path | None:
    """The project file of module ``name`` (a module or a package's ``__init__.py``), or None if not ours."""
    for prefix, folder in ROOTS:
        if name == prefix or name.startswith(prefix + "."):
            base = root / folder / Path(*name[len(prefix):].lstrip(".").split(".")) if name != prefix \
                else root / folder
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
            return None
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node that can run when the module is imported or used (see the module docstring for the two cuts)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and node in tree.body:
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def imported_names(path: Path, name: str) -> set[str]:
    """Absolute names of the modules (or module attributes) a file imports; relative imports resolved."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise BadParameter(f"{path}: cannot read its imports ({e.msg}, line {e.lineno})") from None
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # a submodule, if it is one
    return names


def closure(module: str, root: Path) -> list[Path]:
    """Every project file that importing and running ``module`` can execute, sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way run first
            prefix = ".".join(parts[:i])
            if prefix in seen:
                continue
            path = module_path(prefix, root)
            if path is None:
                continue
            seen[prefix] = path
            todo.extend(imported_names(path, prefix))
    return sorted(set(seen.values()))


def stage_module(cmd: str) -> str | None:
    """``advgen.stages.<name>`` for a command ``advgen <name> ...``; None for any other command."""
    words = cmd.split()
    if len(words) >= 2 and words[0] == "advgen" and re.fullmatch(r"[a-z_]+", words[1]):
        return f"advgen.stages.{words[1]}"
    return None


def code_deps(template: dict, root: Path) -> dict[str, list[str]]:
    """For each stage of a parsed ``dvc.yaml`` run by ``advgen``: its code deps, ``${code}/...`` paths."""
    out = {}
    for name, stage in (template.get("stages") or {}).items():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        module = stage_module(str(body.get("cmd", "")))
        if module is None:
            continue
        if module_path(module, root) is None:
            raise BadParameter(f"dvc.yaml stage {name!r} runs `advgen {module.rpartition('.')[2]}`, "
                               f"but there is no stages/{module.rpartition('.')[2]}.py")
        out[name] = [f"{CODE}/{p.relative_to(root).as_posix()}" for p in closure(module, root)]
    return out


def rewrite(template_text: str, root: Path) -> str:
    """The template with each stage's code-dep lines replaced by its computed code deps, and the entries of a
    ``plots:`` key marked ``DEFENSE_PLOTS`` by one per registered defense.

    Everything else (comments, order, other deps) is kept as written. A stage
    must hold at least one ``- ${code}/...py`` line in its ``deps:``: that is
    where its list goes.
    """
    deps = code_deps(yaml.safe_load(template_text) or {}, root)
    lines, out, stage, placed = template_text.splitlines(keepends=True), [], None, set()
    skip_deeper = None  # while replacing a generated block: the indent its own lines are deeper than
    for line in lines:
        if skip_deeper is not None:
            if line.strip() and len(line) - len(line.lstrip()) > skip_deeper:
                continue
            skip_deeper = None
        plots = _PLOTS_LINE.match(line)
        if plots:
            out.append(line)
            out.extend(defense_plots(plots[1] + "  "))
            skip_deeper = len(plots[1])
            continue
        m = _STAGE_LINE.match(line)
        if m:
            stage = m[1]
        dep = _DEP_LINE.match(line)
        if dep and stage in deps:
            if stage not in placed:
                out.extend(f"{dep[1]}- {path}\n" for path in deps[stage])
                placed.add(stage)
            continue
        out.append(line)
    missing = sorted(set(deps) - placed)
    if missing:
        raise BadParameter(f"dvc.yaml stage(s) {', '.join(missing)} hold no `- ${{code}}/...py` dep line "
                           "to put their code deps in")
    return "".join(out)
