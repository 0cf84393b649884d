"""What verify holds a folder to: the names of its files and the patterns of keys, shards and sums lines."""

from __future__ import annotations

import re
import struct
import zlib

from PIL import Image


CARD = "README.md"
KINDS = ("clean", "variant")
SUMS = "SHA256SUMS"  # beside a root card written by advgen publish, in the format `sha256sum -c` reads
PUBLISHED = "published"  # advgen.kind in the front matter of such a root card
_SUMS_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]*")
_GLOB_PART = re.compile(r"[A-Za-z0-9_*][A-Za-z0-9_.=*-]*")
SAMPLE_PROBLEMS = 5  # per shard; a shard that is wrong everywhere says so once, not 60000 times
# What Pillow raises on damaged PNGs (bad chunks, truncated zlib streams, bomb-sized headers).
_PNG_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, struct.error, Image.DecompressionBombError)
_KEY = re.compile(r"\d{6,}")
_CLS = re.compile(rb"\d+")
_SHARD = re.compile(r"(?P<split>[A-Za-z0-9_]+)-\d{6}\.tar")
_FILE_ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \|$", re.MULTILINE)
# What the card's advgen block repeats from a variant's stats.
_VARIANT_FIELDS = ("method", "direction", "norm", "eps", "label_source", "seed", "device", "params", "victim",
                   "fingerprint")


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name
