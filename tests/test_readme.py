"""The README against the code: every command's synopsis shows exactly its real flags, the
"Sharing and loading shards" snippets run as written, and ``advgen --version`` tells the truth."""

from __future__ import annotations

import re
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import ROOT, VENV_BIN, WRITERS, small_spec
from advgen.stages.cli import app

README = ROOT / "README.md"
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def section(title: str) -> str:
    """The text of README's ``## title`` section, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def synopses() -> dict[str, str]:
    """{command: synopsis} of every ```text block under "## Command line" that starts with ``advgen <command>``."""
    out = {}
    for block in blocks(section("Command line"), "text"):
        m = re.match(r"advgen ([a-z][a-z-]*)\b", block)
        if m:
            out[m[1]] = block
    return out


def parse_synopsis(text: str) -> tuple[dict[str, tuple[bool, bool]], int]:
    """({flag: (shown with a value, shown as required)}, number of positional placeholders) of a synopsis.

    ``--a/--no-a`` gives both names; ``--flag VALUE`` shows a value; a flag outside every
    ``[...]`` is shown as required; an upper-case word that follows no flag
    (``advgen verify DIR``) is a positional argument.
    """
    tokens = re.findall(r"\[|\]|[^\s\[\]]+", text)[2:]  # past "advgen <command>"
    flags: dict[str, tuple[bool, bool]] = {}
    positional = depth = 0
    for i, token in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else "]"
        depth += (token == "[") - (token == "]")
        if token.startswith("--"):
            value = nxt not in "[]" and not nxt.startswith("--")
            for name in token.split("/"):
                old = flags.get(name, (False, False))
                flags[name] = (old[0] or value, old[1] or depth == 0)
        elif re.fullmatch(r"[A-Z][A-Z0-9_]*(\.\.\.)?", token) and not (i and tokens[i - 1].startswith("--")):
            positional += 1
    return flags, positional


def test_every_command_has_a_synopsis_and_every_synopsis_a_command():
    shown = synopses()
    missing = sorted(set(COMMANDS) - set(shown))
    stale = sorted(set(shown) - set(COMMANDS))
    assert not missing, ("README.md has no ```text synopsis block under '## Command line' for: "
                         + ", ".join(f"advgen {c}" for c in missing))
    assert not stale, "README.md shows synopses of commands that do not exist: " + ", ".join(stale)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_synopsis_shows_exactly_the_real_flags(command):
    shown = synopses()
    if command not in shown:
        pytest.fail(f"README.md has no ```text synopsis block for advgen {command} under '## Command line'")
    flags, positional = parse_synopsis(shown[command])
    cmd = COMMANDS[command]
    # typer may bring its own copy of click, so tell options from arguments by click's own label
    options = [p for p in cmd.params if p.param_type_name == "option" and not p.hidden]
    arguments = [p for p in cmd.params if p.param_type_name == "argument"]
    names = {n for p in options for n in (*p.opts, *p.secondary_opts)}
    problems = []
    absent = [p.opts[0] for p in options if not set(p.opts + p.secondary_opts) & set(flags)]
    if absent:
        problems.append(f"lacks {', '.join(absent)}")
    unknown = sorted(set(flags) - names)
    if unknown:
        problems.append(f"shows flags that do not exist: {', '.join(unknown)}")
    for p in options:
        shown = [n for n in (*p.opts, *p.secondary_opts) if n in flags]
        for n in shown:
            if flags[n][0] == p.is_flag:
                problems.append(f"shows {n} " + ("with a value, but it is an on/off flag" if p.is_flag
                                                 else "without a value, but it takes one"))
        if shown and any(flags[n][1] for n in shown) != p.required:
            problems.append(f"shows {shown[0]} as " + ("optional, but it is required" if p.required
                                                       else "required, but it is optional: put it in [...]"))
    if positional != len(arguments):
        problems.append(f"shows {positional} positional argument(s), the command takes "
                        f"{len(arguments)} ({', '.join(a.name.upper() for a in arguments) or 'none'})")
    assert not problems, f"README synopsis of advgen {command}: " + "; ".join(problems)


def test_version_matches_the_installed_package():
    result = subprocess.run([str(VENV_BIN / "advgen"), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"advgen {metadata.version('advgen')}\n"


@pytest.fixture(scope="module")
def readme_data(tmp_path_factory) -> Path:
    """A folder laid out as the README's snippets expect: data/fashion_mnist/{clean,victims,adv/...}.

    Tiny synthetic Fashion-MNIST (16 + 16 images in 8 + 8 shards, as the real test split has 8),
    two victims trained for an epoch, and their FGSM ε = 0.1 copies written by ``advgen generate``.
    """
    from advgen.data.clean import load_clean_split, open_clean, write_clean
    from advgen.data.datasets import load_source, locate
    from advgen.victims.train import Recipe, train_victim
    from advgen.victims import save

    root = tmp_path_factory.mktemp("readme")
    data = root / "data" / "fashion_mnist"
    spec = small_spec("fashion_mnist", train=16, test=16)
    WRITERS["fashion_mnist"](data / "raw", spec)
    write_clean(load_source(spec, locate(spec, [data / "raw"]), allow_unverified=True), data / "clean", shard_size=2)
    x, y, _ = load_clean_split(data / "clean", open_clean(data / "clean"), "train")
    for victim in ("mlp", "simple_cnn"):
        model, _ = train_victim(victim, dataset="fashion_mnist", num_classes=10, x=x, y=y,
                                recipe=Recipe(epochs=1, batch_size=8, lr=0.02), seed=0,
                                device=torch.device("cpu"), crop_pad=0, flip=False)
        model.meta.test_accuracy = 0.5
        save(model, data / "victims" / f"{victim}.pt")
        result = CliRunner().invoke(app, [
            "generate", "--victim-ckpt", str(data / "victims" / f"{victim}.pt"), "--clean", str(data / "clean"),
            "--out", str(data / "adv" / victim / "fast"), "--method", "fgsm", "--eps", "0.1",
            "--device", "cpu", "--workers", "0"])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["publish", str(data / "adv" / "mlp")])  # as the README says, before loading
    assert result.exit_code == 0, result.output
    return root


SNIPPETS = blocks(section("Sharing and loading shards"), "python")


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_sharing_snippets_run_as_written(readme_data, snippet):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(readme_data / "hf")}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=readme_data, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, f"README snippet failed:\n{snippet}\n{result.stderr[-3000:]}"


def test_the_sharing_section_has_snippets():
    assert len(SNIPPETS) >= 2  # plain webdataset, and advgen's helpers
