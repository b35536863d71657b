"""The swap directory's lifecycle: setup checks, file allocation, removal.

[Note: swap faults]
At setup every rank checks that ``nvme_path`` exists, is a directory, accepts a file
(a real probe write: permission bits say nothing for root or read-only mounts) and has
room for every byte this rank will swap; the files are then allocated up front
(``posix_fallocate``), so a disk that fills up later cannot take them away. Each failure
raises ``SwapSetupError`` naming the path and the sizes. Mid-run I/O errors are
swapper.py's ``SwapIOError``; the backend then refuses to step again. The directory
(one per rank and engine) is removed by ``engine.destroy()`` and, failing that, at
interpreter exit or when the backend is garbage collected (``weakref.finalize``).
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref
from pathlib import Path
from typing import Optional

from hf_zero.config.parse import ConfigError

GIB = 1024 ** 3


class SwapSetupError(RuntimeError):
    """``nvme_path`` cannot hold this rank's swap files."""


def free_bytes(path: Path) -> int:
    """Bytes available to this user under ``path`` (the one free-space query; tests patch it)."""
    return shutil.disk_usage(path).free


def _sizes(needed: int, free: Optional[int] = None) -> str:
    text = f"needs {needed / GIB:.3f} GiB ({needed} bytes)"
    return text if free is None else f"{text}, {free / GIB:.3f} GiB ({free} bytes) free"


def check_swap_dir(nvme_path: Optional[str], needed_bytes: int, key: str) -> Path:
    """Raise one clear error unless ``nvme_path`` can take ``needed_bytes`` of swap files."""
    if not nvme_path:
        raise ConfigError([(f"{key}.nvme_path", "is required when device is 'nvme'")])
    path = Path(nvme_path)
    if not path.exists():
        raise SwapSetupError(f"hf_zero: {key}.nvme_path {path} does not exist (swap {_sizes(needed_bytes)})")
    if not path.is_dir():
        raise SwapSetupError(f"hf_zero: {key}.nvme_path {path} is not a directory")
    probe = path / f".hf_zero_probe_{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
    except OSError as err:
        raise SwapSetupError(f"hf_zero: {key}.nvme_path {path} is not writable ({err.strerror}); "
                             f"swap {_sizes(needed_bytes)}") from err
    probe.unlink()
    free = free_bytes(path)
    if free < needed_bytes:
        raise SwapSetupError(f"hf_zero: {key}.nvme_path {path} has too little space: this rank's swap "
                             f"{_sizes(needed_bytes, free)}")
    return path


def _remove(directory: str, owner_pid: int) -> None:
    # A forked child (a DataLoader worker) inherits the finalizer; only the owner may remove.
    if os.getpid() == owner_pid:
        shutil.rmtree(directory, ignore_errors=True)


class SwapDir:
    """A private directory under ``nvme_path`` holding one rank's swap files."""

    def __init__(self, root: Path, rank: int):
        self.path = root / f"hf_zero_swap_rank{rank}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self._finalizer = weakref.finalize(self, _remove, str(self.path), os.getpid())

    def allocate(self, name: str, nbytes: int) -> Path:
        """Create ``name`` with ``nbytes`` reserved (reads as zeros)."""
        file = self.path / name
        fd = os.open(file, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as err:
                if err.errno not in (95, 22):   # EOPNOTSUPP / EINVAL: no fallocate here, size it sparse
                    raise SwapSetupError(f"hf_zero: cannot allocate {nbytes} bytes for {file}: {err}") from err
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        return file

    def remove(self) -> None:
        self._finalizer()
