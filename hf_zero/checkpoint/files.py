"""Durable, atomic file operations and tag validation for checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model."""


def validate_tag(tag: str) -> str:
    """A tag is one plain directory name: no separators, no '..', nothing hidden."""
    if not isinstance(tag, str) or not _TAG.match(tag) or ".." in tag:
        raise ValueError(f"invalid checkpoint tag {tag!r}: use letters, digits, '_', '-' and '.', "
                         "not starting with '.', without '/' or '..'")
    return tag


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, value: Any) -> None:
    """Write next to ``path`` then rename over it, so readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes_durable(tmp, json.dumps(value, indent=1, sort_keys=True).encode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes_durable(tmp, text.encode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path, block_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            digest.update(chunk)
    return digest.hexdigest()



def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file: {path}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupted checkpoint file {path}: {err}") from None
