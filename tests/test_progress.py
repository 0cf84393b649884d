"""Progress: periodic plain lines with done/total, percent, images/s and ETA off a terminal; the rich bar on one."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

# Two bars: "work" under the interval the test sets, "quiet" under the default (30 s).
SCRIPT = """
import os, time
from advgen.stages.progress import bar
for name in ("work", "quiet"):
    with bar(name) as b:
        for i in range(1, 13):
            time.sleep(0.05)
            b.update(i, 12, f"item {i}", line=i == 6, images=32 * i)
    os.environ.pop("ADVGEN_PROGRESS_SECONDS", None)
"""
LINE = re.compile(r"^  (work|quiet): (\d+)/12 \((\d+)%\), (\d+) images/s, "
                  r"(ETA \d+:\d\d:\d\d|done in \d+:\d\d:\d\d) - item (\d+)$")


def test_periodic_lines_off_a_terminal():
    env = {**os.environ, "ADVGEN_PROGRESS_SECONDS": "0.12"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert result.stdout == "" and lines[0] == "work" and "quiet" in lines, lines
    work, quiet = lines[1:lines.index("quiet")], lines[lines.index("quiet") + 1:]
    matches = [LINE.match(line) for line in work]
    assert all(matches), work
    done = [int(m[2]) for m in matches]
    assert done == sorted(done) and done[-1] == 12 and len(done) >= 4, work  # 0.6 s of work, a line per 0.12 s
    for m in matches:
        assert int(m[3]) == round(100 * int(m[2]) / 12) and int(m[6]) == int(m[2])
        assert 0 < int(m[4]) < 32 * 12 / 0.05  # images/s: at most 32 images per 50 ms sleep
    assert all(m[5].startswith("ETA") for m in matches[:-1]) and matches[-1][5].startswith("done in")
    # The default interval is far longer than the run: only the caller's milestone and the end.
    assert [int(LINE.match(line)[2]) for line in quiet] == [6, 12], quiet


def test_rich_bar_on_a_terminal_shows_rate_and_eta():
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stderr=slave, stdout=subprocess.DEVNULL,
                            env={**os.environ, "COLUMNS": "200", "TERM": "xterm"})
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed its side and everything was read
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    assert proc.wait(timeout=120) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode("utf-8", "replace"))
    assert "12/12" in text and "100%" in text and "images/s" in text and "done" in text, text[-500:]
    assert re.search(r"ETA \d+:\d\d:\d\d", text), text[-500:]
