"""The on-disk format: request keys, the lines of a segment file, and the names of its files.

A line is ``<32 hex of key> <8 hex of CRC-32 over the JSON> <JSON>\n``: a torn or
garbled line is recognised by its CRC and skipped, never read as an answer.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COMPACT_PREFIX",
    "FORMAT",
    "HEAD",
    "INDEX",
    "KEY_HEX",
    "MARKER",
    "OPEN",
    "SEALED",
    "SEGMENTS",
    "TMP",
    "Scan",
    "as_numpy",
    "encode_line",
    "file_kind",
    "file_stem",
    "key_prefix",
    "list_segments",
    "load_index",
    "read_line",
    "request_key",
    "sampled",
    "scan_lines",
    "valid_key",
]

FORMAT = 1
MARKER = "parsl-chat-cache.json"
SEGMENTS = "segments"
OPEN, SEALED, INDEX, TMP = ".open", ".seg", ".idx", ".tmp"
COMPACT_PREFIX = "compact-"
KEY_HEX = 32  # 16-byte keys: a collision is as likely as guessing a random 128-bit number
#: a line: 32 hex of key, space, 8 hex of CRC-32 over the JSON, space, the JSON, newline
HEAD = KEY_HEX + 1 + 8 + 1
_READ_BLOCK = 1 << 20

# --------------------------------------------------------------------------- keys


def request_key(body: Mapping[str, Any]) -> bytes:
    """16 bytes naming a request body: canonical JSON (sorted keys, no spaces), hashed."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.blake2b(canon.encode(), digest_size=16).digest()


def sampled(body: Mapping[str, Any]) -> bool:
    """Whether the answer is drawn at random: temperature above 0, or unset (servers default to 1)."""
    temperature = body.get("temperature")
    try:
        return temperature is None or float(temperature) > 0
    except (TypeError, ValueError):
        return True


def key_prefix(key: bytes) -> int:
    return int.from_bytes(key[:8], "big")


# --------------------------------------------------------------------------- lines


def encode_line(key: bytes, record: Mapping[str, Any]) -> bytes:
    payload = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%s %08x %s\n" % (key.hex().encode(), zlib.crc32(payload), payload)


def valid_key(line: bytes) -> bytes | None:
    """The key of a whole, undamaged line (with its newline), else None."""
    if len(line) <= HEAD + 1 or line[KEY_HEX : KEY_HEX + 1] != b" " or line[HEAD - 1 : HEAD] != b" ":
        return None
    try:
        key = bytes.fromhex(line[:KEY_HEX].decode("ascii"))
        crc = int(line[KEY_HEX + 1 : HEAD - 1], 16)
    except ValueError:
        return None
    return key if zlib.crc32(line[HEAD:-1]) == crc else None


@dataclass
class Scan:
    """What :func:`scan_lines` found in one file."""

    # typed arrays, 8 bytes an entry: no Python int per line, however big the segment
    prefixes: array.array[int] = field(default_factory=lambda: array.array("Q"))
    seconds: array.array[int] = field(default_factory=lambda: array.array("Q"))  # the key's last 8 bytes
    offsets: array.array[int] = field(default_factory=lambda: array.array("Q"))
    damaged: int = 0  # lines skipped: torn, garbled
    end: int = 0  # where the next scan of this file starts


def scan_lines(path: Path, start: int, *, sealed: bool) -> Scan:
    """Index the lines of ``path`` from ``start``.

    In a sealed file a damaged line is skipped and counted. In an open one the scan
    stops before it: it may be a line still being written, or on NFS a region another
    client wrote that is not yet visible here; the next scan looks again.
    """
    found = Scan(end=start)
    with path.open("rb") as fh:
        fh.seek(start)
        offset, rest = start, b""
        while True:
            block = fh.read(_READ_BLOCK)
            if not block:
                break
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for text in lines:
                line = text + b"\n"
                key = valid_key(line)
                if key is not None:
                    found.prefixes.append(key_prefix(key))
                    found.seconds.append(int.from_bytes(key[8:], "big"))
                    found.offsets.append(offset)
                elif not sealed:
                    found.end = offset
                    return found
                else:
                    found.damaged += 1
                offset += len(line)
                found.end = offset
        if rest and sealed:
            found.damaged += 1  # a torn tail: the write that was cut never counted
            found.end = offset + len(rest)
    return found


def as_numpy(values: array.array[int]) -> np.ndarray:
    return np.frombuffer(values, dtype=np.uint64) if len(values) else np.zeros(0, dtype=np.uint64)


def read_line(fd: int, offset: int) -> bytes:
    data = b""
    while True:
        block = os.pread(fd, 1 << 16, offset + len(data))
        if not block:
            return data
        data += block
        newline = data.find(b"\n")
        if newline >= 0:
            return data[: newline + 1]


# --------------------------------------------------------------------------- files


def file_kind(name: str) -> str | None:
    if name.endswith(OPEN):
        return "open"
    if name.endswith(SEALED):
        return "compacted" if name.startswith(COMPACT_PREFIX) else "sealed"
    return None


def file_stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def list_segments(segments: Path) -> dict[str, str]:
    """stem -> file name of every data file (a sealed name wins over a stale open one)."""
    names = os.listdir(segments)
    out: dict[str, str] = {}
    for name in sorted(names, key=lambda n: n.endswith(SEALED)):
        if file_kind(name) is not None:
            out[file_stem(name)] = name
    return out


def load_index(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A compacted file's (prefixes, seconds, offsets), or None when its .idx is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = data["prefix"], data["second"], data["offset"]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if not len(arrays[0]) == len(arrays[1]) == len(arrays[2]):
        return None
    return arrays
