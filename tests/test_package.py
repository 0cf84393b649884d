"""advgen as a library from any project: one installed namespace, attacks in one line on any nn.Module."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, torch, advgen
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()  # any module, logits out
x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
x_adv = advgen.attack("pgd", model, x, y, eps=8 / 255)
df = advgen.attack("deepfool", model, x, y)
found = {}
for name in ("pipeline", "stages"):
    try:
        __import__(name)
        found[name] = True
    except ModuleNotFoundError:
        found[name] = False
print(json.dumps({"linf": float((x_adv - x).abs().max()), "df_changed": int((df != x).flatten(1).any(1).sum()),
                  "methods": sorted(advgen.METHODS), "version": advgen.__version__, "file": advgen.__file__,
                  "top_level": found}))
"""


def test_import_advgen_from_elsewhere_and_attack_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 0 < out["linf"] <= 8 / 255 + 1e-6  # PGD moved the images and stayed in its ball
    assert out["df_changed"] >= 1
    assert {"fgsm", "pgd", "deepfool"} <= set(out["methods"])
    # One namespace: the folders pipeline/ and stages/ are not installed as top-level packages
    # that would collide with other projects' modules of those names.
    assert out["top_level"] == {"pipeline": False, "stages": False}
