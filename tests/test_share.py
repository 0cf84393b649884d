"""Sharing through a DVC remote: push a reproduced tiny profile, clone, pull, get the same bytes, verify.

What a collaborator does with the real project: ``git clone`` then ``dvc pull``
in a profile folder. The pulled data must be byte-identical to what was pushed
and pass ``advgen verify`` on its own.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from test_dvc import _run, make_tiny_repo

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def _digests(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_push_clone_pull_gives_identical_verified_data(tmp_path, mnist_mirror, cli_env):
    # The tiny profile, laid out as test_dvc.py (and demo/) lay it out, with one epoch.
    repo, profile, env = make_tiny_repo(tmp_path, mnist_mirror, cli_env, epochs=1)
    _run(["dvc", "repro"], profile, env)

    # Publish: a local folder stands in for the shared remote; the lock and config go to git.
    remote = tmp_path / "remote"
    _run(["dvc", "remote", "add", "-d", "-f", "shared", str(remote)], profile, env)  # the profile's own project
    _run(["git", "add", "-A"], repo, env)
    _run([*GIT, "commit", "-qm", "tiny profile reproduced"], repo, env)
    assert not _run(["git", "status", "--porcelain"], repo, env).strip(), "data must be ignored by git"
    _run(["dvc", "push"], profile, env)
    assert any(p.is_file() for p in remote.rglob("*"))

    # Receive: a fresh clone has code, lock and config but no data until it pulls.
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    before = [p.name for p in (clone / "tiny" / "data").rglob("*") if p.is_file()]
    assert before and set(before) == {".gitignore"}  # git carries only DVC's ignore files, no data
    env = {**env, "PYTHONPATH": str(clone)}
    # A bare `dvc pull` in the profile: its own DVC project, so the root study (never produced) is not in it.
    _run(["dvc", "pull"], clone / "tiny", env)

    original, pulled = _digests(profile / "data"), _digests(clone / "tiny" / "data")
    assert sorted(pulled) == sorted(original)
    assert pulled == original
    for part in ("mnist/clean/_stats.json", "mnist/clean/README.md", "mnist/clean/test-000000.tar",
                 "mnist/clean/test-000000.parquet", "mnist/victims/mlp.pt",
                 "mnist/adv/mlp/fast/fgsm/eps=0.1/_stats.json", "mnist/adv/mlp/fast/fgsm/eps=0.1/README.md",
                 "mnist/adv/mlp/fast/d_fgsm/eps=0.05/test-000007.tar",
                 "mnist/adv/mlp/fast/d_fgsm/eps=0.05/test-000007.parquet"):
        assert part in pulled, part

    data = clone / "tiny" / "data" / "mnist"
    out = subprocess.run(["advgen", "verify", str(data / "adv" / "mlp" / "fast")], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(line.split(":")[0] for line in out.stdout.splitlines()) == [
        f"OK {data / 'adv/mlp/fast' / m / e}" for m in ("d_fgsm", "fgsm") for e in ("eps=0.05", "eps=0.1")]
    out = subprocess.run(["advgen", "verify", str(data / "clean")], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"OK {data / 'clean'}: clean mnist, ")
